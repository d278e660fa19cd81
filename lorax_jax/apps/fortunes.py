"""Offline text data for the applications and examples: Debian's ``fortunes`` files.

Each file in ``/usr/share/games/fortunes`` is one topic; its items are separated by
lines holding only ``%``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from lorax_jax.files import MAX_TEXT_BYTES, read_regular

FORTUNES_DIR = "/usr/share/games/fortunes"
_SEPARATOR = re.compile(r"^%[ \t]*$", re.MULTILINE)


def fortune_topics(directory: str = FORTUNES_DIR) -> list[str]:
  """The topic files installed (``art``, ``computers``, ...), sorted."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no fortunes at {directory}: install them with `apt-get install fortunes`")
  return sorted(f for f in os.listdir(directory)
                if "." not in f and os.path.isfile(os.path.join(directory, f)))


def fortune_items(topics: Sequence[str] | None = None,
                  directory: str = FORTUNES_DIR) -> dict[str, list[str]]:
  """``{topic: [item, ...]}`` for ``topics`` (all installed topics when None), items in file order,
  stripped, empty ones dropped."""
  available = fortune_topics(directory)
  missing = sorted(set(topics or ()) - set(available))
  if missing:
    raise FileNotFoundError(f"no fortunes topic {', '.join(missing)} in {directory} "
                            f"(available: {', '.join(available)}); `apt-get install fortunes` installs them")
  out = {}
  for topic in topics or available:
    text = read_regular(os.path.join(directory, topic), MAX_TEXT_BYTES, "fortunes file").decode("utf-8", "replace")
    out[topic] = [s.strip() for s in _SEPARATOR.split(text) if s.strip()]
  return out
