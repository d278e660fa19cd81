"""Frozen and trainable parts of a params tree: split, join, mask, count, size, summary.

Lorax's ``Params.filter`` and ``Params.size``. A *combined* tree is the params tree with
the factors stored in their module under ``"lora"``, keyed by the leaf they adapt:
``{..., "q_proj": {"kernel": W, "bias": c, "lora": {"kernel": {"a": a, "b": b}}}}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from lorax_jax.config import LoraConfig
from lorax_jax.lora_tree import SAVED_KEY, TOKENS_KEY, Lora, check_lora
from lorax_jax.paths import Path, path_str, set_path
from lorax_jax.qarray import leaves_with_paths
from lorax_jax.targets import find_targets, saved_leaves, token_rows

LORA_KEY = "lora"


def split_params(tree: Mapping[str, Any], cfg: LoraConfig) -> tuple[dict, Lora]:
  """A combined tree into ``(frozen params, lora tree)``, ready for `lora_transform`; the
  combined tree's top-level `SAVED_KEY` (``modules_to_save`` copies) and `TOKENS_KEY` (trainable token rows)
  go to the lora tree.

  Args:
    tree: a combined params tree (`join_params`'s output): each factor pair under ``"lora"`` in
      the module of the kernel it adapts.
    cfg: the config the factors were made with (checked against them).

  Returns:
    ``(params, lora)``: the frozen params tree without any ``"lora"`` node, and the LoRA tree.

  Raises:
    TypeError: ``tree`` is not a mapping or ``cfg`` not a `LoraConfig` (e.g. the arguments of
      `join_params` passed instead).
    ValueError: factors beside no kernel, or a lora tree ``cfg`` does not describe.

  >>> import jax, jax.numpy as jnp, lorax_jax
  >>> params = {"dense": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}}
  >>> cfg = lorax_jax.LoraConfig(r=2, targets=["dense"])
  >>> combined = lorax_jax.join_params(params, lorax_jax.init_lora(params, cfg, jax.random.key(0)))
  >>> frozen, lora = lorax_jax.split_params(combined, cfg)
  >>> sorted(frozen["dense"]), jax.tree.map(jnp.shape, lora)
  (['bias', 'kernel'], {'dense': {'kernel': {'a': (2, 4), 'b': (2, 3)}}})
  """
  check_mapping(tree, "tree", "the combined params tree join_params returns, factors under 'lora'")
  if not isinstance(cfg, LoraConfig):
    raise TypeError(f"split_params: cfg must be a LoraConfig, got {type(cfg).__name__} (call "
                    "split_params(combined_tree, cfg); join_params(params, lora) is the inverse)")
  tree = dict(tree)
  kept = {key: tree.pop(key) for key in (SAVED_KEY, TOKENS_KEY) if key in tree}
  frozen, lora = _split(tree, ())
  lora.update(kept)
  check_lora(frozen, lora, cfg)
  return frozen, lora


def join_params(params: Mapping[str, Any], lora: Lora) -> dict:
  """The inverse of `split_params`: put each factor pair beside its kernel (and the
  ``modules_to_save`` copies and trainable token rows at the top level, under `SAVED_KEY` and `TOKENS_KEY`).

  Args:
    params: the frozen params tree.
    lora: the LoRA tree (`init_lora`, `load_adapter`), its paths those of ``params``.

  Returns:
    The combined tree: ``params`` with ``{"lora": {leaf: {"a": ..., "b": ...}}}`` added to each
    adapted module (the inputs are not mutated).

  Raises:
    TypeError: ``params`` or ``lora`` is not a mapping.
    ValueError: a LoRA path that is not in ``params``.

  >>> import jax, jax.numpy as jnp, lorax_jax
  >>> params = {"dense": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}}
  >>> cfg = lorax_jax.LoraConfig(r=2, targets=["dense"])
  >>> combined = lorax_jax.join_params(params, lorax_jax.init_lora(params, cfg, jax.random.key(0)))
  >>> jax.tree.map(jnp.shape, combined["dense"])
  {'bias': (3,), 'kernel': (4, 3), 'lora': {'kernel': {'a': (2, 4), 'b': (2, 3)}}}
  """
  check_mapping(params, "params", "the params tree")
  check_mapping(lora, "lora", "the LoRA tree init_lora or load_adapter returns")
  kept = {key: lora[key] for key in (SAVED_KEY, TOKENS_KEY) if key in lora}
  if kept:
    return {**join_params(params, {k: v for k, v in lora.items() if k not in kept}), **kept}
  def join(node: Any, sub: Any) -> Any:
    if not isinstance(sub, Mapping):
      return node
    out = dict(node)
    for key, value in sub.items():
      if key not in node:
        raise ValueError(f"join_params: LoRA path {key!r} is not in the params")
      if isinstance(value, Mapping) and {"a", "b"} <= set(value) <= {"a", "b", "m", "bias"}:
        out.setdefault(LORA_KEY, {})[key] = value
      else:
        out[key] = join(node[key], value)
    return out
  return join(params, lora)


def check_mapping(tree: Any, name: str, what: str) -> None:
  """A TypeError ``"<name> must be a mapping (<what>), got <type>"`` unless ``tree`` is a Mapping."""
  if not isinstance(tree, Mapping):
    raise TypeError(f"{name} must be a mapping ({what}), got {type(tree).__name__} {tree!r:.60}")


def _split(tree: Any, prefix: Path) -> tuple[Any, Lora]:
  if not isinstance(tree, Mapping):
    return tree, {}
  frozen, lora = {}, {}
  kernels = [k for k in tree if k != LORA_KEY]
  for key in kernels:
    f, l = _split(tree[key], (*prefix, str(key)))
    frozen[key] = f
    if l:
      lora[str(key)] = l
  factors_by_leaf = tree.get(LORA_KEY, {})
  check_mapping(factors_by_leaf, path_str((*prefix, LORA_KEY)), "each adapted kernel's name -> its factors")
  for leaf, factors in factors_by_leaf.items():
    if leaf not in kernels or isinstance(tree[leaf], Mapping):
      raise ValueError(f"split_params: {path_str((*prefix, LORA_KEY, str(leaf)))} adapts no kernel "
                       f"{leaf!r} beside it (found {kernels})")
    check_mapping(factors, path_str((*prefix, LORA_KEY, str(leaf))), "the factors {'a': ..., 'b': ...}")
    lora[str(leaf)] = dict(factors)
  return frozen, lora


def trainable_mask(params: Any, lora: Lora) -> tuple[Any, Lora]:
  """The optax mask for ``(params, lora)``: ``False`` on every frozen leaf, ``True`` on LoRA.

  Args:
    params: the frozen params tree.
    lora: the LoRA tree.

  Returns:
    ``(params mask, lora mask)``: trees of bools with the structures of ``params`` and ``lora``
    (for ``optax.masked`` over the pair ``(params, lora)``).

  >>> import jax, jax.numpy as jnp, lorax_jax
  >>> params = {"dense": {"kernel": jnp.zeros((4, 3))}}
  >>> lora = lorax_jax.init_lora(params, lorax_jax.LoraConfig(targets=["dense"]), jax.random.key(0))
  >>> lorax_jax.trainable_mask(params, lora)
  ({'dense': {'kernel': False}}, {'dense': {'kernel': {'a': True, 'b': True}}})
  """
  return (jax.tree_util.tree_map(lambda _: False, params),
          jax.tree_util.tree_map(lambda _: True, lora))


def count(tree: Any, where: Callable[[Path, Any], bool] | None = None) -> int:
  """The number of scalars in ``tree`` (those at leaves where ``where(path, leaf)``).

  With `size`, Lorax's ``Params.size``: `count` in scalars, `size` in bytes.

  Args:
    tree: any pytree of arrays (params, a LoRA tree, `QArray` leaves count their logical size).
    where: ``where(path, leaf) -> bool`` with ``path`` a tuple of strings; ``None``: every leaf.

  Returns:
    The total number of elements, an int.

  >>> import jax.numpy as jnp, lorax_jax
  >>> params = {"dense": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}}
  >>> lorax_jax.count(params), lorax_jax.count(params, lambda path, x: path[-1] == "kernel")
  (15, 12)
  """
  return sum(int(np.size(x)) for p, x in leaves_with_paths(tree) if where is None or where(p, x))


def size(tree: Any, where: Callable[[Path, Any], bool] | None = None) -> int:
  """The bytes held by ``tree``: with `count`, Lorax's ``Params.size`` (`count` in scalars).

  Args:
    tree: any pytree of arrays.
    where: ``where(path, leaf) -> bool`` with ``path`` a tuple of strings; ``None``: every leaf.

  Returns:
    The total ``size × itemsize`` of the selected leaves, an int.

  >>> import jax.numpy as jnp, lorax_jax
  >>> params = {"dense": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3, jnp.bfloat16)}}
  >>> lorax_jax.size(params), lorax_jax.size(params, lambda path, x: path[-1] == "bias")
  (54, 6)
  """
  return sum(int(np.size(x)) * np.dtype(x.dtype).itemsize
             for p, x in leaves_with_paths(tree) if where is None or where(p, x))


def filter_params(tree: Any, where: Callable[[Path, Any], bool]) -> dict:
  """The leaves of ``tree`` where ``where(path, leaf)``, as nested dicts (Lorax's ``Params.filter``).

  Args:
    tree: any pytree of arrays.
    where: ``where(path, leaf) -> bool`` with ``path`` a tuple of strings.

  Returns:
    A new tree of nested dicts holding only the selected leaves (empty modules dropped).

  >>> import jax.numpy as jnp, lorax_jax
  >>> params = {"dense": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}, "norm": {"scale": jnp.ones(3)}}
  >>> kernels = lorax_jax.filter_params(params, lambda path, x: path[-1] == "kernel")
  >>> {k: {n: x.shape for n, x in v.items()} for k, v in kernels.items()}
  {'dense': {'kernel': (4, 3)}}
  """
  out: dict = {}
  for path, leaf in leaves_with_paths(tree):
    if where(path, leaf):
      set_path(out, path, leaf)
  return out


def lora_count(params: Any, cfg: LoraConfig) -> int:
  """Trainable scalars ``cfg`` adds to ``params``, without allocating them (the factors, DoRA's
  magnitudes, and a copy of each ``modules_to_save`` leaf).

  Args:
    params: the params tree (arrays or ``jax.ShapeDtypeStruct`` leaves: only shapes are read).
    cfg: the LoRA config.

  Returns:
    The number of trainable scalars, an int.

  Raises:
    ValueError: ``cfg`` matches no parameter, or an invalid rank or layout (as `find_targets`).

  >>> import jax.numpy as jnp, lorax_jax
  >>> params = {"dense": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}}
  >>> lorax_jax.lora_count(params, lorax_jax.LoraConfig(r=2, targets=["dense"]))  # 2·4 + 2·3
  14
  """
  leaves = dict(leaves_with_paths(params))
  return (sum(math.prod(t.a_shape) + math.prod(t.b_shape) + math.prod(t.m_shape) * (t.dora + t.lora_bias)
              for t in find_targets(params, cfg).values())
          + sum(int(np.size(x)) for x in saved_leaves(params, cfg).values())
          + sum(len(idx) * math.prod(np.shape(leaves[path])[1:]) for path, idx in token_rows(params, cfg).items()))


def summary(params: Any, cfg: LoraConfig) -> str:
  """The matched paths with their ranks, and trainable / total parameter counts.

  What PEFT users know as ``print_trainable_parameters``.

  Args:
    params: the params tree.
    cfg: the LoRA config.

  Returns:
    One line per target (path, rank, alpha, kernel shape) and per ``modules_to_save`` leaf,
    then the counts line, joined by newlines.

  Raises:
    ValueError: ``cfg`` matches no parameter, or an invalid rank or layout (as `find_targets`).

  >>> import jax.numpy as jnp, lorax_jax
  >>> params = {"dense": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}}
  >>> print(lorax_jax.summary(params, lorax_jax.LoraConfig(r=2, targets=["dense"])))
  dense/kernel  r=2   alpha=2  (4, 3)
  trainable params: 14 || all params: 29 || trainable%: 48.2759
  """
  found = find_targets(params, cfg)
  total = count(params)
  trainable = lora_count(params, cfg)
  width = max(len(t.name) for t in found.values())
  lines = [f"{t.name:<{width}}  r={t.rank:<3} alpha={t.alpha:g}  {t.shape}" for t in found.values()]
  lines += [f"{path_str(p)}  (modules_to_save)  {np.shape(x)}" for p, x in saved_leaves(params, cfg).items()]
  lines += [f"{path_str(p)}  (trainable tokens {list(idx)})" for p, idx in token_rows(params, cfg).items()]
  lines.append(
      f"trainable params: {trainable:,} || all params: {total + trainable:,} || "
      f"trainable%: {100 * trainable / (total + trainable):.4f}")
  return "\n".join(lines)
