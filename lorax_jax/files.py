"""Atomic writes into destinations of the library's own, and reads of regular files only.

New files and directories get the permissions a plain ``open`` / ``mkdir`` gives under the
user's umask, and their data is fsynced before they are renamed into place (then the parent
directory is fsynced, so the rename itself survives a power cut).

`write_dir_atomic` swaps a whole directory: the files are written into a fresh sibling
directory, which then *exchanges* places with the old one in one atomic step
(``renameat2(RENAME_EXCHANGE)`` on Linux, ``renamex_np(RENAME_SWAP)`` on macOS; a plain
rename when there is no old directory); the old one is deleted afterwards. A reader that
opens the directory once and reads its files through that handle (`open_regular` with
``dir_fd``) sees one complete version; it gets ``FileNotFoundError`` if a writer deleted that
version under it, and can then simply open the directory again. A crash leaves at most a hidden sibling
``.<name>.tmp-*`` behind, never a mixed directory.

Nothing the library did not create is ever deleted, renamed away or overwritten. Every writer
checks its destination with `check_destination` once, on the resolved path, and writes there:
``""``, the working directory, the home directory, ``/`` (and any folder holding one of them)
are refused, and so is an existing folder holding anything but the writer's own entries (the
regular files and folders it writes, and the hidden temporaries a crashed write of them
leaves). So the old version `write_dir_atomic` swaps out is a folder that passed this check,
and it is emptied by name: only the writer's own entries are removed, then the empty folder.

Every reader opens files with `open_regular`: without blocking (a FIFO does not wait for a
writer), and only a regular file (checked on the opened descriptor: a FIFO, socket, device or
directory is a one-line error naming it). `read_regular` reads at most a stated bound:
`MAX_CONFIG_BYTES` for JSON and YAML configs, `MAX_TEXT_BYTES` for tokenizers and data files;
a larger file (a 2 GB sparse config, say) is refused from its size before anything is read.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import stat
import sys
import warnings
from collections.abc import Callable, Collection, Mapping
from typing import BinaryIO

_RENAME_EXCHANGE = 2  # linux/fs.h
_RENAME_SWAP = 2  # macOS stdio.h
_AT_FDCWD = -100
# A JSON or YAML config: PEFT's adapter_config.json is a few KB, but `save_adapter` names every
# adapted module in target_modules, which for a mixture-of-experts model adapted per expert
# (tens of thousands of modules) is a few MB.
MAX_CONFIG_BYTES = 16 * 2**20
# tokenizer.json (the largest published ones are ~35 MB), a fine-tuning data file.
MAX_TEXT_BYTES = 256 * 2**20
_TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{16}-(?P<file>.+)|\.(?P<folder>.+)\.tmp-[0-9a-f]{16}")
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def check_destination(path: str | os.PathLike[str], files: Collection[str], folders: Collection[str] = ()) -> str:
  """The resolved absolute path of ``path``, where a writer of ``files`` and ``folders`` may write.

  The destination is a directory that the writer fills with its own entries: the regular files
  named in ``files`` and the folders named in ``folders``. It is refused if it could hold the
  user's files: an empty path (an unset variable, a blank config field), a path resolving to the
  working directory, the home directory, ``/`` or a folder holding one of them, an existing
  non-directory, or an existing directory holding anything else than those entries and the
  hidden temporaries a crashed write of them leaves (``.tmp-<hex>-<file>``, ``.<name>.tmp-<hex>``).
  A missing or empty directory is fine. Symbolic links are resolved: the checked path is the one
  to write to.

  Args:
    path: the destination directory as the user gave it.
    files: names of the regular files the writer writes there.
    folders: names of the folders the writer writes there (each checked by its own writer).

  Raises:
    TypeError: ``path`` is not a str or os.PathLike.
    ValueError: a refused destination; the message names it, why, and what to do.
  """
  resolved = _resolve(path, "destination")
  shown = f"{os.fspath(path)!r}" + ("" if os.fspath(path) == resolved else f" (resolves to {resolved})")
  fix = "give a new (or empty) directory of its own, such as out/adapter"
  for name, where in (("the working directory", os.getcwd()), ("the home directory", os.path.expanduser("~"))):
    where = os.path.realpath(where)
    if os.path.commonpath([resolved, where]) == resolved:
      kind = name if where == resolved else f"a folder holding {name} {where}"
      raise ValueError(f"destination {shown} is {kind}, which holds your files; lorax_jax writes only into a "
                       f"directory of its own: {fix}")
  if not os.path.lexists(resolved):
    return resolved
  if not os.path.isdir(resolved):
    raise ValueError(f"destination {shown} exists and is not a directory: {fix}")
  foreign = sorted(e.name for e in os.scandir(resolved) if not _is_own(e, files, folders))
  if foreign:
    listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    raise ValueError(f"destination {shown} holds {listed}, which lorax_jax did not write (it writes only "
                     f"{', '.join(sorted([*files, *folders]))} there, replacing them): {fix}, or move those "
                     "away")
  return resolved


def open_regular(path: str, dir_fd: int | None = None, shown: str | None = None) -> BinaryIO:
  """``path`` (relative to the directory open as ``dir_fd``, if given) open for binary reading, if
  it is a regular file or a symbolic link to one.

  It is opened without blocking, so a FIFO does not wait for a writer, and checked on the opened
  descriptor, so it cannot change in between; then it is set back to blocking.

  Args:
    path: the file.
    dir_fd: a directory descriptor ``path`` is relative to.
    shown: how errors name the file (default ``path``).

  Raises:
    FileNotFoundError: no such file.
    ValueError: a directory, FIFO, socket or device (named, with the file).
  """
  shown = path if shown is None else shown
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=dir_fd)
  except OSError as e:
    if e.errno != errno.ENXIO:  # ENXIO: a socket (opening one is an error, whatever the flags)
      raise
    raise _not_regular(shown, os.stat(path, dir_fd=dir_fd).st_mode) from None
  try:
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
      raise _not_regular(shown, mode)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")
  except BaseException:
    os.close(fd)
    raise


def read_limited(f: BinaryIO, path: str, limit: int, what: str) -> bytes:
  """The whole content of the regular file open as ``f``, if it has at most ``limit`` bytes.

  Raises:
    ValueError: the file is larger (checked from its size before anything is read, and again by
      what is read); the message names ``path``, ``what`` it should be and the limit.
  """
  size = os.fstat(f.fileno()).st_size
  data = f.read(limit + 1) if size <= limit else b""
  if size > limit or len(data) > limit:
    raise ValueError(f"{path} has {max(size, len(data)):,} bytes, more than a {what} may have "
                     f"({limit:,}; lorax_jax reads no more): is it the right file?")
  return data


def read_regular(path: str, limit: int, what: str) -> bytes:
  """The content of the regular file ``path`` (`open_regular`), at most ``limit`` bytes (`read_limited`).

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a regular file, or larger than ``limit``.
  """
  with open_regular(path) as f:
    return read_limited(f, path, limit, what)


def write_atomic(path: str, write: Callable[[str], object]) -> None:
  """Call ``write(tmp_path)`` on a fresh file beside ``path``, fsync it, then rename it onto ``path``.

  ``path``'s directory is the caller's to check (`check_destination`).

  Raises:
    ValueError: an empty ``path``.
    OSError: from ``write`` or the file system; ``path`` is then untouched.
  """
  path = _resolve(path, "file")
  directory = os.path.dirname(path)
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

  ``directory`` must pass `check_destination` for these files (a missing, empty or earlier
  version of this directory); it is written at its resolved path.

  Raises:
    ValueError: a destination `check_destination` refuses.
    OSError: from the writers or the file system; the old directory is then untouched.
  """
  directory = check_destination(directory, files)
  parent, name = os.path.split(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{name}.tmp-{secrets.token_hex(8)}")
  os.mkdir(tmp)
  try:
    for file, write in files.items():
      _write(os.path.join(tmp, file), write)
    _fsync(tmp, directory=True)
    _swap_in(tmp, directory)
  except BaseException:
    _remove_own(tmp, files)
    raise
  _fsync(parent, directory=True)
  _remove_own(tmp, files)  # the old version, if there was one


def _resolve(path: str | os.PathLike[str], what: str) -> str:
  """``path`` resolved (absolute, symbolic links followed); a ValueError for an empty one."""
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError(f"the {what} path must be a str or os.PathLike, got {type(path).__name__}")
  if os.fspath(path) == "":
    raise ValueError(f"the {what} path is empty (an unset environment variable or a blank setting?): "
                     "give a path")
  return os.path.realpath(path)


def _is_own(entry: os.DirEntry, files: Collection[str], folders: Collection[str]) -> bool:
  """Whether ``entry`` is one a writer of ``files`` and ``folders`` wrote (or a temporary of one)."""
  temporary = _TEMPORARY.fullmatch(entry.name)
  name = entry.name if temporary is None else temporary["file"] or temporary["folder"]
  if entry.is_file(follow_symlinks=False):
    return name in files
  return entry.is_dir(follow_symlinks=False) and name in folders


def _remove_own(directory: str, files: Collection[str]) -> None:
  """Remove ``directory`` (a version `write_dir_atomic` wrote, or one that passed its check) by
  deleting the regular files ``files`` in it, then the empty folder. Anything else found there
  (put there while the save ran) is left in place, with a warning naming it."""
  if not os.path.isdir(directory):
    return  # a plain rename replaced an empty directory: nothing was swapped out
  for entry in os.scandir(directory):
    if entry.is_file(follow_symlinks=False) and _is_own(entry, files, ()):
      os.unlink(entry.path)
  try:
    os.rmdir(directory)
  except OSError:
    warnings.warn(f"lorax_jax left {directory}: it holds {', '.join(sorted(os.listdir(directory)))}, which "
                  "appeared during the save and which lorax_jax did not write", stacklevel=3)


def _not_regular(path: str, mode: int) -> ValueError:
  kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
  return ValueError(f"{path} is {kind}, not a regular file: lorax_jax reads only regular files (a FIFO "
                    "would block, a device never ends); give the file itself")


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
