"""DoRA: the per-output scale ``g = m / ‖W + s · A ⊗ B‖`` computed from the factors, and applied
at each use of the kernel."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from lorax_jax.dropout import dropout_bilinear, keep_mask
from lorax_jax.targets import accumulation_dtype
from lorax_jax.transform.core import Context
from lorax_jax.transform.kernels import LoraKernel, QuantizedKernel, dequantized


def dora_scale(k: LoraKernel, m: jax.Array) -> jax.Array:
  """DoRA's ``g = m / stop_gradient(‖V‖)``, ``V = W + s · A ⊗ B``, without forming ``V``.

  Per output unit ``j`` (and stack index), over the input axes ``i``:

      ‖V_j‖² = ‖W_j‖² + 2s · Σ_r B_rj (A·W)_rj + s² · Σ_{r,r'} B_rj B_r'j (A·Aᵀ)_rr'

  one ``[r, out]`` product ``A·W`` and an ``r × r`` Gram matrix; the norm is detached as in PEFT
  (``weight_norm.detach()``), so only ``m`` gets a gradient through ``g``. ``k`` is in its
  target's layout (the jaxpr input); ``m`` has `Target.m_shape`. Accumulates in float32 at
  ``HIGHEST`` precision; returns ``g`` laid out like ``b`` with a rank of 1, in ``m``'s dtype.
  """
  a_sub, b_sub, k_sub = k.subscripts()
  units, stack = k.g_units(), b_sub[:k.rank_axis]  # a mixed batch's adapters lead: one g per adapter
  w = dequantized(k.w)  # a quantized base: its norms from the dequantized kernel (no gradient flows)
  dtype = accumulation_dtype(w, k.a, k.b)
  w, a, b = (x.astype(dtype) for x in (w, k.a, k.b))
  dot = functools.partial(jnp.einsum, precision=lax.Precision.HIGHEST)
  q_sub = b_sub.replace("R", "Q")
  aw = dot(f"{a_sub},{k_sub}->{b_sub}", a, w)  # A·W: [S, r, O]
  gram = dot(f"{a_sub},{a_sub.replace('R', 'Q')}->{stack}RQ", a, a)  # A·Aᵀ: [S, r, r]
  gb = dot(f"{stack}RQ,{q_sub}->{b_sub}", gram, b)  # (A·Aᵀ)·B: [S, r, O]
  n2 = (dot(f"{k_sub},{k_sub}->{units[k.lead:]}", w, w)
        + jnp.sum(b * (2 * k.scale * aw + k.scale ** 2 * gb), axis=k.rank_axis))
  n = lax.stop_gradient(jnp.sqrt(jnp.maximum(n2, 0)))
  return jnp.expand_dims(m / n.astype(m.dtype), k.rank_axis)


def dora_output(k: LoraKernel, ctx: Context, x: jax.Array, key: jax.Array | None, base: jax.Array,
                branch: jax.Array, use: Callable[[jax.Array, jax.Array], jax.Array] | None,
                times_g: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """A DoRA use's output from ``base = use(x, W)`` and the LoRA ``branch`` (of ``x`` dropped out).

  Without dropout ``g ⊙ (base + branch)``; with dropout PEFT's ``DoraLinearVariant.forward``
  (the base is recomputed on the dropped-out input ``x̃``, with the same mask as the branch):

      use(x, W) + (g - 1) ⊙ use(x̃, W) + g ⊙ branch

  ``times_g`` broadcasts ``g`` over an output-shaped array. Float32 at least, then ``base``'s dtype.
  """
  dtype = accumulation_dtype(base, branch)
  if key is None:
    return times_g(base.astype(dtype) + branch.astype(dtype)).astype(base.dtype)
  if isinstance(k.w, QuantizedKernel):  # its dequantizing use has a custom VJP, which has no transpose
    x_dropped = jnp.where(keep_mask(key, x.shape, ctx.rate), x / (1 - ctx.rate), jnp.zeros((), x.dtype))
    dropped = use(x_dropped.astype(x.dtype), k.w).astype(dtype)
  else:
    dropped = dropout_bilinear(use, x, k.w, key, ctx.rate).astype(dtype)
  return (base.astype(dtype) - dropped + times_g(dropped + branch.astype(dtype))).astype(base.dtype)


def times_along(y: jax.Array, g: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """``y ⊙ g``, ``g``'s axes in order being ``y``'s ``axes``, broadcast over the others.

  A plain broadcast multiply (not an einsum, whose ``dot_general`` with ``g``'s axes as batch
  dimensions would transpose ``y`` to put them first, forward and backward), so XLA fuses it into
  the producer of ``y`` and its consumers, and ``∂g`` is a reduce of ``dy ⊙ y`` in ``y``'s layout.
  """
  order = sorted(range(g.ndim), key=lambda j: axes[j])
  shape = [1] * y.ndim
  for j in order:
    shape[axes[j]] = g.shape[j]
  return y * jnp.transpose(g, order).astype(y.dtype).reshape(shape)

