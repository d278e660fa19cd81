"""`merge`, `unmerge`, `delta`: the adapted weights ``W' = W ± s · A ⊗ B``, formed once.

Pure and jit-able; the input trees are never mutated. Merging is for inference and
export; training never forms ``W'`` (see `lorax_jax.transform`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lorax_jax.config import LoraConfig
from lorax_jax.init import Lora, factors
from lorax_jax.targets import Path, find_targets, tree_path


def delta(params: Any, lora: Lora, cfg: LoraConfig) -> dict[Path, jax.Array]:
  """``s · A ⊗ B`` for every target, kernel-shaped (float32), keyed by path."""
  return {t.path: t.delta(a, b) for t, a, b in factors(find_targets(params, cfg), lora)}


def merge(params: Any, lora: Lora, cfg: LoraConfig) -> Any:
  """``params`` with every targeted kernel replaced by ``W + s · A ⊗ B`` (in W's dtype)."""
  return _apply(params, delta(params, lora, cfg), 1.0)


def unmerge(params: Any, lora: Lora, cfg: LoraConfig) -> Any:
  """The inverse of `merge`: ``W' - s · A ⊗ B``, exact up to float rounding."""
  return _apply(params, delta(params, lora, cfg), -1.0)


def _apply(params: Any, deltas: dict[Path, jax.Array], sign: float) -> Any:
  def update(kp, w):
    d = deltas.get(tree_path(kp))
    if d is None:
      return w
    return (jnp.asarray(w, jnp.float32) + sign * d).astype(jnp.result_type(w))
  return jax.tree_util.tree_map_with_path(update, params)
