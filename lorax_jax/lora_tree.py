"""The LoRA tree: its type, the check that it fits its params, and its factors target by target.

The LoRA tree mirrors the params tree as nested dicts keyed by the path strings, holding only
the targeted kernels, each replaced by ``{"a": a, "b": b}`` (layouts in `lorax_jax.targets`),
plus DoRA's magnitude ``"m"`` and ``lora_B``'s bias ``"bias"`` (`LoraConfig.lora_bias`), both of shape
`Target.m_shape`. With ``LoraConfig.modules_to_save`` it
also holds, under the top-level key `SAVED_KEY` (``"modules_to_save"``), a nested dict mirroring
``params`` with a trainable copy of every saved leaf; with ``LoraConfig.trainable_token_indices``,
under `TOKENS_KEY` (``"trainable_tokens"``), the trained rows of each table (``[n, *row]``, PEFT's
``trainable_tokens_delta``), which replace those rows of the table at every use.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
import jax.numpy as jnp

from lorax_jax.config import LoraConfig
from lorax_jax.qarray import leaves_with_paths
from lorax_jax.paths import Path, get_path, path_str, tree_path
from lorax_jax.targets import Target, find_targets, saved_leaves, token_rows

Lora = dict[str, Any]


SAVED_KEY = "modules_to_save"
TOKENS_KEY = "trainable_tokens"  # `LoraConfig.trainable_token_indices`: {table path...: rows [n, *row]}
SCALE = "scale"  # a stacked tree's per-adapter scales (`lorax_jax.stack_adapters`)


def target_factors(targets: Mapping[Path, Target], lora: Lora) -> Iterator[tuple[Target, jax.Array, jax.Array]]:
  """``(target, a, b)`` for every target, after `check_factors`."""
  check_factors(targets, lora)
  for path, t in targets.items():
    node = get_path(lora, path)
    yield t, *t.masked(node["a"], node["b"])


def factor_names(t: Target) -> set[str]:
  """The leaves of a target's LoRA node: ``{"a", "b"}``, ``"m"`` for DoRA, ``"bias"`` with ``lora_bias``."""
  return {"a", "b"} | ({"m"} if t.dora else set()) | ({"bias"} if t.lora_bias else set())


def check_factors(targets: Mapping[Path, Target], lora: Lora) -> None:
  """Raise an error naming the path unless ``lora`` holds exactly the targets' factors
  (and DoRA magnitudes).

  Args:
    targets: the targets, `find_targets`'s output.
    lora: a LoRA tree (``modules_to_save`` copies apart: see `check_saved`).

  Raises:
    ValueError: an unexpected, missing or mis-shaped entry, or a non-float factor.
    TypeError: ``lora`` is not a mapping, or a factor is not an array (a Python list, say).

  >>> import jax.numpy as jnp, lorax_jax
  >>> from lorax_jax.lora_tree import check_factors
  >>> params = {"dense": {"kernel": jnp.zeros((8, 6))}}
  >>> targets = lorax_jax.find_targets(params, lorax_jax.LoraConfig(r=2, targets=["dense"]))
  >>> check_factors(targets, {"dense": {"kernel": {"a": jnp.zeros((2, 8)), "b": jnp.zeros((2, 6))}}})
  >>> check_factors(targets, {"dense": {"kernel": {"a": jnp.zeros((3, 8)), "b": jnp.zeros((2, 6))}}})
  Traceback (most recent call last):
  ...
  ValueError: LoRA factor dense/kernel/a has shape (3, 8), expected (2, 8) for kernel (8, 6)
  """
  if not isinstance(lora, Mapping):
    raise TypeError(f"lora must be a mapping (a LoRA tree of nested dicts, as init_lora or load_adapter "
                    f"return it), got {type(lora).__name__}")
  seen = set()
  for path, node in _lora_nodes(lora, ()):
    name = path_str(path)
    if path not in targets:
      raise ValueError(f"LoRA tree has an unexpected entry {name} (no such target in the params)")
    seen.add(path)
    t = targets[path]
    if not isinstance(node, Mapping) or set(node) != factor_names(t):
      got = sorted(node) if isinstance(node, Mapping) else type(node).__name__
      hint = (" (LoraConfig.use_dora=True: DoRA's magnitude 'm' too)" if t.dora
              else " (a DoRA tree needs LoraConfig(use_dora=True))" if isinstance(node, Mapping) and "m" in node
              else "")
      want = "{" + ", ".join(map(repr, sorted(factor_names(t)))) + "}"
      raise ValueError(f"LoRA entry {name} must be {want}, got {got}{hint}")
    for k, want in (("a", t.a_shape), ("b", t.b_shape), ("m", t.m_shape), ("bias", t.m_shape)):
      if k not in factor_names(t):
        continue
      x = node[k]
      if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"LoRA factor {name}/{k} must be an array, got {type(x).__name__}: "
                        "wrap it with jnp.asarray")
      if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"LoRA factor {name}/{k} must be a float array, got dtype {x.dtype}")
      got = tuple(jnp.shape(x))
      if got != want:
        raise ValueError(f"LoRA factor {name}/{k} has shape {got}, expected {want} for kernel {t.shape}")
  missing = [path_str(p) for p in targets if p not in seen]
  if missing:
    raise ValueError(f"LoRA tree is missing the factors of {', '.join(missing)}")


def check_lora(params: Any, lora: Lora, cfg: LoraConfig) -> None:
  """Raise an error naming the problem unless ``lora`` is a LoRA tree of ``cfg`` for ``params``:
  exactly the targets' factors (`check_factors`) and, with ``modules_to_save``, their copies
  (`check_saved`).

  Args:
    params: the params tree the adapter is for.
    lora: the LoRA tree.
    cfg: its config.

  >>> import jax, jax.numpy as jnp, lorax_jax
  >>> params = {"dense": {"kernel": jnp.zeros((4, 3))}}
  >>> cfg = lorax_jax.LoraConfig(r=2, targets="dense")
  >>> lora = lorax_jax.init_lora(params, cfg, jax.random.key(0))
  >>> lorax_jax.check_lora(params, lora, cfg)  # fits: no error
  >>> lorax_jax.check_lora(params, {}, cfg)
  Traceback (most recent call last):
  ...
  ValueError: LoRA tree is missing the factors of dense/kernel

  Raises:
    ValueError: an unexpected, missing or mis-shaped entry, a non-float factor, or a
      ``modules_to_save`` copy that does not match.
    TypeError: ``lora`` is not a mapping, or a factor is not an array (a Python list, say).
  """
  check_factors(find_targets(params, cfg), lora)
  check_saved(params, cfg, lora)
  check_tokens(params, cfg, lora)


def check_saved(params: Any, cfg: LoraConfig, lora: Lora) -> dict[Path, Any]:
  """The saved leaves' paths mapped to their trained copies in ``lora[SAVED_KEY]``.

  Raises:
    ValueError: a missing, unexpected or mis-shaped copy (naming its path), or params with a
      top-level key `SAVED_KEY` (it would be ambiguous).
  """
  saved = saved_leaves(params, cfg)
  if saved and isinstance(params, Mapping) and SAVED_KEY in params:
    raise ValueError(f"params have a top-level key {SAVED_KEY!r}, which LoRA trees reserve for modules_to_save")
  tree = lora.get(SAVED_KEY, {}) if isinstance(lora, Mapping) else {}
  copies = dict(leaves_with_paths(tree))
  extra = [path_str(p) for p in copies if p not in saved]
  missing = [path_str(p) for p in saved if p not in copies]
  if extra or missing:
    raise ValueError(f"LoRA tree's {SAVED_KEY} does not match modules_to_save: "
                     + (f"missing {', '.join(missing[:5])}" if missing else "")
                     + ("; " if extra and missing else "") + (f"unexpected {', '.join(extra[:5])}" if extra else ""))
  for path, leaf in saved.items():
    got = (tuple(jnp.shape(copies[path])), jnp.result_type(copies[path]))
    want = (tuple(jnp.shape(leaf)), jnp.result_type(leaf))
    if got != want:
      raise ValueError(f"LoRA tree's {SAVED_KEY} copy of {path_str(path)} is {got[0]} {got[1]}, expected "
                       f"{want[0]} {want[1]} (the frozen leaf's shape and dtype)")
  return copies


def check_tokens(params: Any, cfg: LoraConfig, lora: Lora) -> dict[Path, tuple[tuple[int, ...], Any]]:
  """``{table path: (token indices, trained rows)}`` of ``cfg.trainable_token_indices`` in ``lora[TOKENS_KEY]``.

  Raises:
    ValueError: missing, unexpected or mis-shaped rows (naming the path), or params with a top-level
      key `TOKENS_KEY`.
  """
  want = token_rows(params, cfg)
  if want and isinstance(params, Mapping) and TOKENS_KEY in params:
    raise ValueError(f"params have a top-level key {TOKENS_KEY!r}, which LoRA trees reserve for trainable tokens")
  rows = dict(leaves_with_paths(lora.get(TOKENS_KEY, {}) if isinstance(lora, Mapping) else {}))
  leaves = dict(leaves_with_paths(params))
  if set(rows) != set(want):
    raise ValueError(f"LoRA tree's {TOKENS_KEY} must hold the rows of {sorted(map(path_str, want))} "
                     f"(LoraConfig.trainable_token_indices), got {sorted(map(path_str, rows))}")
  for path, idx in want.items():
    shape = (len(idx), *jnp.shape(leaves[path])[1:])
    if tuple(jnp.shape(rows[path])) != shape or not jnp.issubdtype(jnp.result_type(rows[path]), jnp.floating):
      raise ValueError(f"LoRA tree's {TOKENS_KEY} rows of {path_str(path)} are {jnp.shape(rows[path])} "
                       f"{jnp.result_type(rows[path])}, expected float {shape}")
  return {path: (idx, rows[path]) for path, idx in want.items()}


def with_tokens(params: Any, tokens: Mapping[Path, tuple[tuple[int, ...], Any]]) -> Any:
  """``params`` with each table's trained rows in place (`check_tokens`'s output), in the table's dtype."""
  if not tokens:
    return params
  def put(path: Path, w: Any) -> Any:
    if path not in tokens:
      return w
    idx, rows = tokens[path]
    return jnp.asarray(w).at[jnp.asarray(idx)].set(jnp.asarray(rows).astype(jnp.result_type(w)))
  return jax.tree_util.tree_map_with_path(lambda kp, w: put(tree_path(kp), w), params)


def check_stacked(stacked: Lora, targets: Mapping[Path, Target], k: int | None, who: str
                  ) -> tuple[int, dict[Path, int]]:
  """``(number of adapters, {path: padded rank})`` of ``stacked``, after checking that it holds
  exactly the stacked nodes of ``targets`` (``k`` adapters, when given).

  Args:
    stacked: a stacked tree (`lorax_jax.stack_adapters`).
    targets: the targets of one adapter's slice of it.
    k: the number of adapters it must hold (None: any).
    who: the caller, named in the errors.

  Raises:
    ValueError: an unexpected, missing or mis-shaped entry, named.
  """
  leaves = dict(leaves_with_paths(stacked))
  want = {(*p, key) for p, t in targets.items() for key in (*factor_names(t), SCALE)}
  extra, missing = sorted(set(leaves) - want), sorted(want - set(leaves))
  if extra or missing:
    detail = "; ".join(s for s in (f"unexpected {', '.join(map(path_str, extra[:5]))}" if extra else "",
                                   f"missing {', '.join(map(path_str, missing[:5]))}" if missing else "") if s)
    raise ValueError(f"{who}: the stacked tree does not hold these targets' nodes ({detail})")
  n = k if k is not None else next(iter(np.shape(leaves[min(want)])), 0)  # shapes are checked below
  ranks = {}
  for path, t in targets.items():
    node = get_path(stacked, path)
    rank = np.shape(node["a"])[1 + t.n_stack] if np.ndim(node["a"]) > 1 + t.n_stack else -1
    shapes = {"a": (n, *t.a_shape[:t.n_stack], rank, *t.in_shape), "b": (n, *t.b_shape[:t.n_stack], rank, *t.out_shape),
              SCALE: (n,), "m": (n, *t.m_shape)}
    for key in (*sorted(factor_names(t)), SCALE):
      if tuple(np.shape(node[key])) != shapes[key]:
        raise ValueError(f"{who}: the stacked tree's {t.name}/{key} has shape {tuple(np.shape(node[key]))}, expected "
                         f"{shapes[key]} ({n} adapters of kernel {t.shape}, axes {t.axes!r})")
    ranks[path] = rank
  return n, ranks


def is_stacked(lora: Any) -> bool:
  """Whether ``lora`` is a stacked tree (a `SCALE` leaf in some node, as `lorax_jax.stack_adapters` makes)."""
  return isinstance(lora, Mapping) and any(path[-1:] == (SCALE,) for path, _ in leaves_with_paths(lora))


def _lora_nodes(tree: Any, prefix: Path) -> Iterator[tuple[Path, Any]]:
  """The ``{"a", "b"}`` (DoRA: ``{"a", "b", "m"}``) nodes of a LoRA tree (and anything malformed in
  their place); the saved leaves (`SAVED_KEY`, checked by `check_saved`) are skipped."""
  if isinstance(tree, Mapping) and not ({"a", "b"} & set(tree)):
    for k, v in tree.items():
      if not prefix and k in (SAVED_KEY, TOKENS_KEY):
        continue
      yield from _lora_nodes(v, (*prefix, str(k)))
  else:
    yield prefix, tree
