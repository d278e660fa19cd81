"""Atomic file writes: a file is either the old one or the whole new one, never half-written."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable


def write_atomic(path: str, write: Callable[[str], object]) -> None:
  """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it onto ``path``."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text_atomic(path: str, text: str) -> None:
  """Write ``text`` to ``path`` atomically."""
  def write(tmp: str) -> None:
    with open(tmp, "w") as f:
      f.write(text)
  write_atomic(path, write)
