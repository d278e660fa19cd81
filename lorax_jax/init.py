"""`init_lora`: the LoRA pytree, and the check that a LoRA tree fits its params.

The LoRA tree mirrors the params tree as nested dicts keyed by the path strings, holding
only the targeted kernels, each replaced by ``{"a": a, "b": b}`` (layouts in
`lorax_jax.targets`). ``b`` starts at zero, so the adapted model equals the base model.

With ``LoraConfig.modules_to_save`` the tree also holds, under the top-level key `SAVED_KEY`
(``"modules_to_save"``), a nested dict mirroring ``params`` with a trainable copy of every
saved leaf (PEFT's ``modules_to_save``: a classification head, an embedding); the model runs
with those copies in place of the frozen leaves.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lorax_jax.config import LoraConfig
from lorax_jax.targets import (Path, Target, find_targets, get_path, leaves_with_paths, path_str, saved_leaves,
                               set_path)

Lora = dict[str, Any]
SAVED_KEY = "modules_to_save"


def init_lora(params: Any, cfg: LoraConfig, rng: jax.Array) -> Lora:
  """Fresh factors for every target of ``cfg`` in ``params``; one key per target.

  ``a`` follows ``cfg.init`` (PEFT's kaiming-uniform ``U(±1/sqrt(fan_in))`` or a
  gaussian of std ``1/r``), ``b`` is zero; embeddings follow PEFT instead (``a = 0``,
  ``b ~ N(0, 1)``). Either way ``A ⊗ B = 0`` at step 0.

  Raises:
    TypeError: ``rng`` is not a single PRNG key.
    ValueError: from `find_targets` (nothing matched, a bad target).
  """
  if not _is_key(rng):
    raise TypeError(f"init_lora: rng must be one PRNG key such as jax.random.key(0), got {rng!r}")
  targets = find_targets(params, cfg)
  keys = jax.random.split(rng, len(targets))
  lora: Lora = {}
  for key, t in zip(keys, targets.values()):
    a, b = t.masked(*_init_factors(key, t, cfg))
    set_path(lora, t.path, {"a": a, "b": b})
  for path, leaf in saved_leaves(params, cfg).items():
    set_path(lora.setdefault(SAVED_KEY, {}), path, jnp.array(leaf))
  return lora


def _is_key(rng: Any) -> bool:
  """A typed key (``jax.random.key``) or a raw ``uint32[2]`` one (``jax.random.PRNGKey``)."""
  dtype, shape = getattr(rng, "dtype", None), getattr(rng, "shape", None)
  if dtype is None or shape is None:
    return False
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return shape == ()
  return dtype == jnp.uint32 and shape == (2,)


def _init_factors(key: jax.Array, t: Target, cfg: LoraConfig) -> tuple[jax.Array, jax.Array]:
  dtype = cfg.param_dtype
  if t.path[-1] == "embedding":
    return jnp.zeros(t.a_shape, dtype), jax.random.normal(key, t.b_shape, dtype)
  if cfg.init == "gaussian":
    a = jax.random.normal(key, t.a_shape, dtype) / t.rank
  else:
    bound = 1.0 / math.sqrt(math.prod(t.in_shape))
    a = jax.random.uniform(key, t.a_shape, dtype, -bound, bound)
  return a, jnp.zeros(t.b_shape, dtype)


def target_factors(targets: Mapping[Path, Target], lora: Lora) -> Iterator[tuple[Target, jax.Array, jax.Array]]:
  """``(target, a, b)`` for every target, after `check_lora`."""
  check_lora(targets, lora)
  for path, t in targets.items():
    node = get_path(lora, path)
    yield t, *t.masked(node["a"], node["b"])


def check_lora(targets: Mapping[Path, Target], lora: Lora) -> None:
  """Raise an error naming the path unless ``lora`` holds exactly the targets' factors.

  Raises:
    ValueError: an unexpected, missing or mis-shaped entry, or a non-float factor.
    TypeError: a factor that is not an array (a Python list, say).
  """
  seen = set()
  for path, node in _lora_nodes(lora, ()):
    name = path_str(path)
    if path not in targets:
      raise ValueError(f"LoRA tree has an unexpected entry {name} (no such target in the params)")
    seen.add(path)
    t = targets[path]
    if not isinstance(node, Mapping) or set(node) != {"a", "b"}:
      got = sorted(node) if isinstance(node, Mapping) else type(node).__name__
      raise ValueError(f"LoRA entry {name} must be {{'a', 'b'}}, got {got}")
    for k, want in (("a", t.a_shape), ("b", t.b_shape)):
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


def _lora_nodes(tree: Any, prefix: Path) -> Iterator[tuple[Path, Any]]:
  """The ``{"a", "b"}`` nodes of a LoRA tree (and anything malformed in their place); the
  saved leaves (`SAVED_KEY`, checked by `check_saved`) are skipped."""
  if isinstance(tree, Mapping) and not ({"a", "b"} & set(tree)):
    for k, v in tree.items():
      if not prefix and k == SAVED_KEY:
        continue
      yield from _lora_nodes(v, (*prefix, str(k)))
  else:
    yield prefix, tree
