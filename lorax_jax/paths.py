"""Paths into a pytree: tuples of strings, their ``/``-joined names, and matching them.

A leaf's path is the tuple of its keys as strings: ``("params", "layers_3", "attn", "q_proj",
"kernel")``, named ``"params/layers_3/attn/q_proj/kernel"``. A pattern matches a name when it
full-matches it as a regex, or ends it at a ``/`` boundary as a suffix (``"q_proj"`` matches the
module ``.../attn/q_proj`` and its kernel).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax

Path = tuple[str, ...]


KERNEL_LEAVES = ("kernel", "weight", "w", "embedding")


def path_str(path: Path) -> str:
  return "/".join(path)


def get_path(tree: Any, path: Path) -> Any:
  """The node of nested ``tree`` at ``path``."""
  for key in path:
    tree = tree[key]
  return tree


def set_path(tree: dict, path: Path, value: Any) -> None:
  """Put ``value`` at ``path`` in nested dicts ``tree``, creating the dicts on the way."""
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def key_str(key: Any) -> str:
  """One pytree path entry as a string (dict key, attribute, or sequence index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def tree_path(keys: Sequence[Any]) -> Path:
  """A pytree key path as a tuple of strings; NNX's trailing ``.value`` is dropped."""
  if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
    keys = keys[:-1]
  return tuple(key_str(k) for k in keys)


def matches(patterns: str | Sequence[str], name: str) -> bool:
  """A regex full-matches ``name``, or a listed suffix ends it at a ``/`` boundary."""
  if isinstance(patterns, str):
    return re.fullmatch(patterns, name) is not None or _suffix_match(patterns, name)
  return any(_suffix_match(p, name) or re.fullmatch(p, name) is not None for p in patterns)


def _suffix_match(suffix: str, name: str) -> bool:
  module = _module_path(name)
  return any(n == suffix or n.endswith("/" + suffix) for n in (name, module))


def _module_path(name: str) -> str:
  head, _, leaf = name.rpartition("/")
  return head if leaf in KERNEL_LEAVES else name
