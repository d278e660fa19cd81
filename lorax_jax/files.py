"""Atomic writes: a file, or a directory of files, is either the old one or the whole new one.

New files and directories get the permissions a plain ``open`` / ``mkdir`` gives under the
user's umask, and their data is fsynced before they are renamed into place (then the parent
directory is fsynced, so the rename itself survives a power cut).

`write_dir_atomic` swaps a whole directory: the files are written into a fresh sibling
directory, which then *exchanges* places with the old one in one atomic step
(``renameat2(RENAME_EXCHANGE)`` on Linux, ``renamex_np(RENAME_SWAP)`` on macOS; a plain
rename when there is no old directory); the old one is deleted afterwards. A reader that
opens the directory once and reads its files through that handle (`open_in`) sees one
complete version; it gets ``FileNotFoundError`` if a writer deleted that version under it,
and can then simply open the directory again. A crash leaves at most a hidden sibling
``.<name>.tmp-*`` behind, never a mixed directory.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Mapping
from typing import IO

_RENAME_EXCHANGE = 2  # linux/fs.h
_RENAME_SWAP = 2  # macOS stdio.h
_AT_FDCWD = -100


def write_atomic(path: str, write: Callable[[str], object]) -> None:
  """Call ``write(tmp_path)`` on a fresh file beside ``path``, fsync it, then rename it onto ``path``."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".tmp-{secrets.token_hex(8)}-{os.path.basename(path)}")
  try:
    _write(tmp, write)
    os.replace(tmp, path)
  except BaseException:
    if os.path.lexists(tmp):
      os.remove(tmp)
    raise
  _fsync(directory, directory=True)


def write_text_atomic(path: str, text: str) -> None:
  """Write ``text`` to ``path`` atomically."""
  write_atomic(path, text_writer(text))


def text_writer(text: str) -> Callable[[str], None]:
  """A ``write(path)`` that writes ``text`` (UTF-8)."""
  def write(path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
  return write


def write_dir_atomic(directory: str, files: Mapping[str, Callable[[str], object]]) -> None:
  """Make ``directory`` hold exactly ``files`` (name -> ``write(path)``), all at once.

  Raises:
    ValueError: ``directory`` exists and is not a directory.
    OSError: from the writers or the file system; the old directory is then untouched.
  """
  directory = os.path.abspath(directory)
  parent, name = os.path.split(directory)
  os.makedirs(parent, exist_ok=True)
  if os.path.lexists(directory) and not os.path.isdir(directory):
    raise ValueError(f"{directory} exists and is not a directory; remove it or save elsewhere")
  tmp = os.path.join(parent, f".{name}.tmp-{secrets.token_hex(8)}")
  os.mkdir(tmp)
  try:
    for file, write in files.items():
      _write(os.path.join(tmp, file), write)
    _fsync(tmp, directory=True)
    _swap_in(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  _fsync(parent, directory=True)
  shutil.rmtree(tmp, ignore_errors=True)  # the old version, if there was one


def open_in(dir_fd: int, name: str) -> IO[bytes]:
  """The file ``name`` inside the directory open as ``dir_fd``, for reading in binary."""
  return open(name, "rb", opener=lambda p, flags: os.open(p, flags, dir_fd=dir_fd))


def _swap_in(new: str, directory: str) -> None:
  """Put directory ``new`` at ``directory``; the old one, if any, ends up at ``new``."""
  while True:
    try:
      os.rename(new, directory)  # atomic; fails when directory exists and is not empty
      return
    except OSError as e:
      if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
        raise
    try:
      _exchange(new, directory)
      return
    except FileNotFoundError:
      continue  # another writer's swap is in flight, or the directory was removed: retry


def _exchange(a: str, b: str) -> None:
  """Atomically exchange the paths ``a`` and ``b`` (raises the audit event ``lorax_jax.exchange``,
  as ``os.rename`` raises ``os.rename``)."""
  sys.audit("lorax_jax.exchange", a, b)
  libc = ctypes.CDLL(None, use_errno=True)  # the C library is linked into the interpreter
  if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
    rc = libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
  elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
    rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), _RENAME_SWAP)
  else:
    raise OSError(errno.ENOSYS, f"this system cannot exchange two directories atomically; save to a "
                  f"new directory instead of over {b}")
  if rc != 0:
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS):
      raise OSError(err, f"the file system of {b} cannot exchange two directories atomically; save to a "
                    "new directory instead of over an existing one")
    raise OSError(err, os.strerror(err), b)


def _write(path: str, write: Callable[[str], object]) -> None:
  """``write(path)`` on a new file that keeps a plain ``open``'s permissions (0o666 minus the
  umask, even if ``write`` replaces the file, as safetensors does), then fsync it."""
  os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
  mode = os.stat(path).st_mode & 0o777
  write(path)
  if os.stat(path).st_mode & 0o777 != mode:
    os.chmod(path, mode)
  _fsync(path)


def _fsync(path: str, directory: bool = False) -> None:
  fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
  try:
    os.fsync(fd)
  finally:
    os.close(fd)
