"""`init_lora`: the LoRA pytree, and the check that a LoRA tree fits its params.

The LoRA tree mirrors the params tree as nested dicts keyed by the path strings, holding
only the targeted kernels, each replaced by ``{"a": a, "b": b}`` (layouts in
`lorax_jax.targets`), plus DoRA's magnitude ``"m"`` (shape `Target.m_shape`) with
``LoraConfig.use_dora``. ``b`` starts at zero and ``m`` at ``‖W‖``, so the adapted model equals
the base model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lorax_jax.config import LoraConfig
from lorax_jax.targets import Path, Target, find_targets, get_path, path_str, set_path

Lora = dict[str, Any]


def init_lora(params: Any, cfg: LoraConfig, rng: jax.Array) -> Lora:
  """Fresh factors for every target of ``cfg`` in ``params``; one key per target.

  ``a`` follows ``cfg.init`` (PEFT's kaiming-uniform ``U(±1/sqrt(fan_in))`` or a
  gaussian of std ``1/r``), ``b`` is zero; embeddings follow PEFT instead (``a = 0``,
  ``b ~ N(0, 1)``). Either way ``A ⊗ B = 0`` at step 0. With ``cfg.use_dora`` each target also
  gets ``m = ‖W‖`` per output unit (`Target.magnitude`), so ``W' = W`` at step 0.

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
    a, b = _init_factors(key, t, cfg)
    node = {"a": a, "b": b}
    if t.dora:
      node["m"] = t.magnitude(get_path(params, t.path)).astype(cfg.param_dtype)
    set_path(lora, t.path, node)
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
    yield t, node["a"], node["b"]


def factor_names(t: Target) -> set[str]:
  """The leaves of a target's LoRA node: ``{"a", "b"}``, and ``"m"`` for DoRA."""
  return {"a", "b", "m"} if t.dora else {"a", "b"}


def check_lora(targets: Mapping[Path, Target], lora: Lora) -> None:
  """Raise an error naming the path unless ``lora`` holds exactly the targets' factors
  (and DoRA magnitudes).

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
    if not isinstance(node, Mapping) or set(node) != factor_names(t):
      got = sorted(node) if isinstance(node, Mapping) else type(node).__name__
      hint = (" (LoraConfig.use_dora=True: DoRA's magnitude 'm' too)" if t.dora
              else " (a DoRA tree needs LoraConfig(use_dora=True))" if isinstance(node, Mapping) and "m" in node
              else "")
      want = "{" + ", ".join(map(repr, sorted(factor_names(t)))) + "}"
      raise ValueError(f"LoRA entry {name} must be {want}, got {got}{hint}")
    for k, want in (("a", t.a_shape), ("b", t.b_shape), ("m", t.m_shape))[:len(factor_names(t))]:
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


def _lora_nodes(tree: Any, prefix: Path) -> Iterator[tuple[Path, Any]]:
  """The ``{"a", "b"}`` (DoRA: ``{"a", "b", "m"}``) nodes of a LoRA tree (and anything malformed in their place)."""
  if isinstance(tree, Mapping) and not ({"a", "b"} & set(tree)):
    for k, v in tree.items():
      yield from _lora_nodes(v, (*prefix, str(k)))
  else:
    yield prefix, tree
