"""`merge`, `unmerge`, `delta`: the adapted weights ``W' = W ± s · A ⊗ B``, formed once.

A DoRA target (``LoraConfig.use_dora``) merges to ``W' = m ⊙ V / ‖V‖``, ``V = W + s · A ⊗ B``
(`Target.dora_weight`); its `delta` is ``W' - W``, and it cannot be unmerged from ``W'`` alone.

Pure and jit-able; the input trees are never mutated. Merging is for inference and
export; training never forms ``W'`` (see `lorax_jax.transform`). Merged kernels keep their
``NamedSharding`` (a `QArray`'s: the one of the float kernel it stands for, `lorax_jax.sharding`),
in one process or many (``jax.distributed``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lorax_jax.config import LoraConfig
from lorax_jax.lora_tree import Lora, check_saved, check_tokens, target_factors, with_tokens
from lorax_jax.paths import Path, get_path, path_str, tree_path
from lorax_jax.qarray import is_quantized, leaves_with_paths, requantize as quantize_like
from lorax_jax.sharding import kernel_sharding, shard_quantized
from lorax_jax.targets import accumulation_dtype, find_targets


def delta(params: Any, lora: Lora, cfg: LoraConfig) -> dict[Path, jax.Array]:
  """``s · A ⊗ B`` for every target, kernel-shaped (float32, or float64 factors' dtype), keyed by path.

  For a DoRA target the change `merge` makes: ``W' - W`` with ``W'`` DoRA's merged weight. With
  ``lora_bias`` the frozen bias beside each kernel gets ``s · c`` (``c`` ``lora_B``'s bias), keyed by
  its own path.

  Args:
    params: the params tree (`QArray` kernels are dequantized for DoRA's norm).
    lora: the LoRA tree.
    cfg: the config ``lora`` was made with.

  Returns:
    ``{path: update}``, one kernel-shaped array per target (not added to anything).

  Raises:
    ValueError: ``cfg`` matches no parameter, or ``lora`` does not hold its targets' factors
      (as `find_targets`, `check_factors`).

  >>> import jax.numpy as jnp, lorax_jax
  >>> params = {"dense": {"kernel": jnp.zeros((4, 3))}}
  >>> cfg = lorax_jax.LoraConfig(r=1, alpha=1, targets=["dense"])
  >>> lora = {"dense": {"kernel": {"a": jnp.ones((1, 4)), "b": jnp.full((1, 3), 0.5)}}}
  >>> {path: d.shape for path, d in lorax_jax.delta(params, lora, cfg).items()}
  {('dense', 'kernel'): (4, 3)}
  >>> float(lorax_jax.delta(params, lora, cfg)["dense", "kernel"][0, 0])  # s · a[:, 0] · b[:, 0]
  0.5
  """
  out = {}
  kernels = dict(leaves_with_paths(params))
  for t, a, b in target_factors(find_targets(params, cfg), lora):
    if t.dora:
      w = kernels[t.path]
      w = w.dequantize() if is_quantized(w) else w
      out[t.path] = t.dora_weight(w, a, b, get_path(lora, t.path)["m"]) - jnp.asarray(w, accumulation_dtype(w, a, b))
    else:
      out[t.path] = t.delta(a, b)
    if t.lora_bias:  # lora_B's bias: s·c added to the frozen bias beside the kernel
      c = get_path(lora, t.path)["bias"]
      out[t.bias_path] = t.scale * jnp.asarray(c, accumulation_dtype(c))
  return out


def merge(params: Any, lora: Lora, cfg: LoraConfig, *, all_uses: bool = False,
          requantize: bool = False) -> Any:
  """``params`` with every targeted kernel replaced by ``W' = W + s · A ⊗ B`` (in W's dtype),
  and every ``modules_to_save`` leaf (and bias trained by ``bias``) by its trained copy in ``lora``;
  with ``lora_bias`` each kernel's bias gets ``s · c``, and with ``trainable_token_indices`` each table
  its trained rows.

  On a quantized base (`lorax_jax.QArray` leaves) the result is float, ``W' = deq(Q) + s · A ⊗ B``
  and the other quantized kernels dequantized, unless ``requantize``.

  Sharded params and factors merge where they are: every merged kernel keeps the kernel's
  ``NamedSharding`` (a `QArray`'s float kernel's: `lorax_jax.sharding.kernel_sharding`), in one
  process or under ``jax.distributed`` (every process calls it). Under ``jit`` the caller's
  ``out_shardings`` place the result.

  Args:
    params: the base params tree (float or `QArray` kernels); not mutated.
    lora: the trained LoRA tree, with the ``modules_to_save`` copies if any.
    cfg: the config ``lora`` was made with.
    requantize: quantize each merged kernel again in its `QArray`'s format, block size and axis
      (`lorax_jax.qarray.requantize`; on the host, not under ``jit``) and keep the other
      quantized kernels as they are.
    all_uses: merge targets limited to some uses (`LoraConfig.target_uses`) too. ``W'`` then
      reaches *every* use of the weight: for a tied embedding with a lookup-only adapter the
      tied head sees the update as well, which is not the adapter's model.

  Raises:
    ValueError: a target has ``target_uses`` (a tied weight cannot carry a lookup-only update)
      and ``all_uses`` is False; or a merged float16/bfloat16 kernel overflows to inf; or
      ``lora`` does not fit ``cfg``'s targets.

  Returns:
    A new params tree of the same structure, the adapted kernels merged.

  >>> import jax.numpy as jnp, lorax_jax
  >>> params = {"dense": {"kernel": jnp.zeros((4, 3))}}
  >>> cfg = lorax_jax.LoraConfig(r=1, alpha=1, targets=["dense"])
  >>> lora = {"dense": {"kernel": {"a": jnp.ones((1, 4)), "b": jnp.full((1, 3), 0.5)}}}
  >>> merged = lorax_jax.merge(params, lora, cfg)
  >>> merged["dense"]["kernel"].shape, merged["dense"]["kernel"].tolist()[0]
  ((4, 3), [0.5, 0.5, 0.5])
  """
  limited = [t.name for t in find_targets(params, cfg).values() if t.uses is not None]
  if limited and not all_uses:
    raise ValueError(
        f"merge: targets {', '.join(limited)} are limited to some uses (LoraConfig.target_uses); a "
        "merged weight reaches all its uses (a tied embedding's head too), so it cannot carry that "
        "update. Keep the factored model (lora_transform), or pass all_uses=True to merge anyway")
  copies = check_saved(params, cfg, lora)
  params = with_tokens(params, check_tokens(params, cfg, lora))
  if copies:  # first, so that lora_bias adds to a trained bias (bias="all") as it does in the forward pass
    params = jax.tree_util.tree_map_with_path(lambda kp, w: copies.get(tree_path(kp), w), params, is_leaf=is_quantized)
  merged = _apply(params, delta(params, lora, cfg), 1.0, requantize)
  if not requantize:
    merged = jax.tree_util.tree_map_with_path(
        lambda kp, x: _placed_like(x.dequantize(), x, kp) if is_quantized(x) else x, merged, is_leaf=is_quantized)
  return merged


def unmerge(params: Any, lora: Lora, cfg: LoraConfig) -> Any:
  """The inverse of `merge`: ``W' - s · A ⊗ B``, exact up to float rounding
  (``modules_to_save`` leaves, trained biases and trainable token rows stay as they are: the frozen
  originals are not in ``lora``; ``lora_bias``'s ``s · c`` is subtracted from its bias).

  Args:
    params: the merged params tree (`merge`'s output).
    lora: the LoRA tree that was merged.
    cfg: its config.

  Returns:
    A new params tree with ``s · A ⊗ B`` subtracted from every target.

  Raises:
    ValueError: ``cfg.use_dora``: ``W'`` holds only the direction of ``W + s · A ⊗ B``, not its
      norm, so ``W`` cannot be recovered from it; keep the original params instead.

  >>> import jax.numpy as jnp, lorax_jax
  >>> params = {"dense": {"kernel": jnp.zeros((4, 3))}}
  >>> cfg = lorax_jax.LoraConfig(r=1, alpha=1, targets=["dense"])
  >>> lora = {"dense": {"kernel": {"a": jnp.ones((1, 4)), "b": jnp.full((1, 3), 0.5)}}}
  >>> back = lorax_jax.unmerge(lorax_jax.merge(params, lora, cfg), lora, cfg)
  >>> bool(jnp.allclose(back["dense"]["kernel"], params["dense"]["kernel"]))
  True
  """
  if cfg.use_dora:
    raise ValueError("unmerge: a DoRA merge (LoraConfig.use_dora) cannot be undone from W' = m ⊙ V/‖V‖ "
                     "(the norm ‖V‖ is lost); keep the unmerged params and merge again when needed")
  return _apply(params, delta(params, lora, cfg), -1.0)


def _apply(params: Any, deltas: dict[Path, jax.Array], sign: float, requantize: bool = False) -> Any:
  def update(kp, w):
    d = deltas.get(tree_path(kp))
    if d is None:
      return w
    kernel = w
    q, w = (w, w.dequantize()) if is_quantized(w) else (None, w)
    out = (jnp.asarray(w, accumulation_dtype(w, d)) + sign * d).astype(jnp.result_type(w))
    _check_finite(out, w, tree_path(kp))
    if requantize and q is not None:
      return _placed_like(quantize_like(out, q), kernel, kp)
    return _placed_like(out, kernel, kp)
  return jax.tree_util.tree_map_with_path(update, params, is_leaf=is_quantized)


def _placed_like(out: Any, kernel: Any, kp: tuple) -> Any:
  """``out`` (a float array or `QArray`) on the ``NamedSharding`` of the float ``kernel`` (or the
  one a `QArray` kernel stands for: `lorax_jax.sharding.kernel_sharding`), so that a merge keeps
  every kernel where it was; as it is when ``kernel`` is unplaced or traced (under ``jit`` the
  caller's ``out_shardings`` decide)."""
  if isinstance(out, jax.core.Tracer) or any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(kernel)):
    return out
  sharding = kernel_sharding(path_str(tree_path(kp)), kernel)
  if sharding is None:
    return out
  return shard_quantized(out, sharding, name=path_str(tree_path(kp))) if is_quantized(out) else jax.device_put(out, sharding)


def _check_finite(out: jax.Array, w: Any, path: Path) -> None:
  """Raise if merging made a finite kernel overflow its dtype (checked when values are concrete)."""
  if isinstance(out, jax.core.Tracer) or isinstance(w, jax.core.Tracer):
    return
  if not bool(jnp.all(jnp.isfinite(out))) and bool(jnp.all(jnp.isfinite(w))):
    raise ValueError(
        f"merge: kernel {'/'.join(path)} overflows {jnp.result_type(w)} once merged (|W + s·A⊗B| "
        f"exceeds {float(jnp.finfo(jnp.result_type(w)).max):g}); merge into a float32 copy of the params")
