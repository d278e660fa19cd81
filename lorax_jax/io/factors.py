"""LoRA factors in lorax_jax's layout <-> torch's (PEFT ``lora_A``/``lora_B``, Kohya ``lora_down``/``lora_up``).

For a kernel with stack axes ``S``, input axes ``I`` and output axes ``O`` (`lorax_jax.targets`)
lorax_jax holds ``a: S+(r,)+I`` and ``b: S+(r,)+O``; torch holds

- linear and embedding: ``A: S+(r, prod(I))``, ``B: S+(prod(O), r)``, so ``A = a`` and
  ``B = bᵀ`` for a ``Dense`` kernel ``[in, out]`` or an embedding table ``[vocab, d]``
  (``I``/``O`` flattened row-major, as ``nn.Linear`` sees a reshaped kernel);
- conv (``HWIO`` kernel ``[kh, kw, cin, cout]``): ``A: [r, cin, kh, kw]`` (a convolution
  with the layer's kernel size) and ``B: [cout, r, 1, 1]`` (a 1×1 convolution).

In both, ``ΔW_torch = s · B @ A`` is the torch-layout image of ``ΔW = s · aᵀ b``.

- experts (PEFT's ``lora.ParamWrapper`` on a stacked ``[E, out, in]`` parameter, lorax_jax's
  ``[E, in, out]`` kernel of layout ``"sio"``): one ``nn.Linear`` pair of rank ``E r`` holds every
  expert's rank-``r`` factors, ``A: [E r, in]`` expert-major and ``B: [out, r E]`` expert-minor:
  ``A = a.reshape(E r, in)``, ``B[o, j E + e] = b[e, j, o]``; expert ``e``'s update is
  ``s · B[:, e::E] @ A[e r:(e + 1) r]``.
"""

from __future__ import annotations

import math

import numpy as np

from lorax_jax.paths import path_str
from lorax_jax.targets import Target


def torch_shapes(t: Target, kind: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """The shapes of ``(A, B)`` in torch's layout for target ``t`` of layout ``kind``."""
  if kind == "conv":
    _check_conv(t)
    *spatial, cin = t.in_shape
    return (t.rank, cin, *spatial), (t.out_shape[0], t.rank, *(1,) * len(spatial))
  r, n_in, n_out = t.rank, math.prod(t.in_shape), math.prod(t.out_shape)
  if kind == "experts":
    _check_experts(t)
    return (t.stack_shape[0] * r, n_in), (n_out, r * t.stack_shape[0])
  return (*t.stack_shape, r, n_in), (*t.stack_shape, n_out, r)


def factors_to_torch(a: np.ndarray, b: np.ndarray, t: Target, kind: str) -> tuple[np.ndarray, np.ndarray]:
  """``(A, B)`` in torch's layout from lorax_jax's ``(a, b)``."""
  a, b = np.asarray(a), np.asarray(b)
  shape_a, shape_b = torch_shapes(t, kind)
  if kind == "conv":
    return np.moveaxis(a, -1, 1), b.T.reshape(shape_b)
  if kind == "experts":
    return a.reshape(shape_a), b.reshape(*b.shape[:2], -1).transpose(2, 1, 0).reshape(shape_b)
  return a.reshape(shape_a), np.swapaxes(b.reshape(*t.stack_shape, t.rank, -1), -1, -2)


def factors_from_torch(A: np.ndarray, B: np.ndarray, t: Target, kind: str) -> tuple[np.ndarray, np.ndarray]:
  """lorax_jax's ``(a, b)`` from torch-layout ``(A, B)`` of the shapes `torch_shapes` gives."""
  if kind == "conv":
    return np.moveaxis(A, 1, -1), B.reshape(B.shape[:2]).T
  if kind == "experts":
    return A.reshape(t.a_shape), B.reshape(B.shape[0], t.rank, -1).transpose(2, 1, 0).reshape(t.b_shape)
  return A.reshape(t.a_shape), np.swapaxes(B, -1, -2).reshape(t.b_shape)


def fit(x: np.ndarray, want: tuple[int, ...], key: str, t: Target, unit_axes: bool = False
        ) -> np.ndarray:
  """``x`` checked by `check_shape` and reshaped to ``want``."""
  check_shape(x.shape, want, key, t, unit_axes)
  return x.reshape(want)


def check_shape(shape: tuple[int, ...], want: tuple[int, ...], key: str, t: Target, unit_axes: bool = False
                ) -> None:
  """A ValueError naming ``key`` unless ``shape`` is ``want`` (with ``unit_axes``, or differs from
  it only by axes of size 1, as a 1×1 conv factor does from a linear one)."""
  if shape == want or (unit_axes and [n for n in shape if n != 1] == [n for n in want if n != 1]):
    return
  raise ValueError(f"{key} has shape {shape}, expected {want} (rank {t.rank}, kernel "
                   f"{path_str(t.path)} of shape {t.shape})")


def magnitude_shape(t: Target, kind: str) -> tuple[int, ...]:
  """The torch shape of DoRA's ``lora_magnitude_vector`` for target ``t``: ``S + (prod(O),)``
  (linear, embedding), ``(1, cout, 1, ...)`` (conv). lorax_jax's ``m`` is `Target.m_shape`; the
  two are reshapes of each other."""
  if kind == "conv":
    _check_conv(t)
    return (1, t.out_shape[0], *(1,) * (len(t.in_shape) - 1))
  return (*t.stack_shape, math.prod(t.out_shape))


def lora_bias_shape(t: Target, kind: str) -> tuple[int, ...]:
  """The torch shape of ``lora_B.bias`` (`lorax_jax.LoraConfig.lora_bias`) for target ``t``: ``S + (prod(O),)``
  (linear), ``(cout,)`` (conv); lorax_jax's ``"bias"`` is `Target.m_shape`, a reshape of it."""
  return (t.out_shape[0],) if kind == "conv" else (*t.stack_shape, math.prod(t.out_shape))


def _check_experts(t: Target) -> None:
  if t.axes[0] != "s" or t.n_stack != 1:
    raise ValueError(f"LoRA target {path_str(t.path)} is a stack of experts [E, in, out] but its layout is "
                     f"{t.axes!r}: set LoraConfig.kernel_axes to 'sio' for it (or let axes_from_use read it off "
                     "its ragged_dot)")


def _check_conv(t: Target) -> None:
  if t.n_stack or len(t.out_shape) != 1 or len(t.in_shape) < 2:
    raise ValueError(f"LoRA target {path_str(t.path)} is a conv but its kernel {t.shape} is not "
                     "[*spatial, cin, cout] (kernel_axes n_stack=0, n_in=ndim-1)")
