"""Quantized frozen bases: `QArray` leaves, `quantize`, `dequantize`, dequantization at use.

A `QArray` stands in a params tree for one float kernel ``W`` of logical shape ``S`` and dtype
``D``. Its blocks run along one axis (``axis``, by default the kernel's input axis ``ndim - 2``
of a Flax ``[..., in, out]`` kernel): the stored arrays hold ``V = moveaxis(W, axis, -1)`` of
shape ``[..., n]`` cut into ``n / block_size`` blocks of the last axis, and

    nf4:   W_i = NF4[q_i] · absmax_blk                 (QLoRA; bitsandbytes' codes and nibbles)
    int4:  W_i = (q_i - 8) · scale_blk,  q_i - 8 ∈ [-7, 7],  scale = absmax / 7
    int8:  W_i = q_i · scale_blk,        q_i ∈ [-127, 127],  scale = absmax / 127
    Q4_0:  W_i = (q_i - 8) · d_blk                     (GGUF, 32-blocks, d float16)
    Q4_1:  W_i = q_i · d_blk + m_blk                   (GGUF, 32-blocks, d and m float16)
    Q8_0:  W_i = q_i · d_blk                           (GGUF, 32-blocks, int8 q, d float16)

all computed in float32, then cast to ``D``. For a 2-D ``[in, out]`` kernel ``V = Wᵀ`` is the
torch / ggml ``[out, in]`` weight, so the packed bytes are bitsandbytes' ``quantize_4bit``
output and the GGUF file's blocks unchanged. NF4's double quantization (bitsandbytes'
``compress_statistics``) stores the absmax as 8-bit dynamic-map codes of ``absmax - mean`` in
blocks of 256, with one float32 absmax per such block.

`dequantize` is pure ``jnp`` and runs inside ``jit`` on any backend. `lorax_jax.lora_transform`
takes trees holding `QArray`\\ s and dequantizes each at the operation that consumes it, again in
the backward pass, so the float kernel is never kept for it (QLoRA: ``y = x·deq(Q) + s·(x·A)·B``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax.paths import Path, matches, path_str, tree_path

QUANTIZE_FORMATS = ("nf4", "int4", "int8")
GGUF_FORMATS = ("Q4_0", "Q4_1", "Q8_0")
FORMATS = QUANTIZE_FORMATS + GGUF_FORMATS
GGUF_BLOCK = 32
DOUBLE_QUANT_BLOCK = 256

# bitsandbytes' NF4 table (``get_4bit_type("nf4")``), float32.
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)


@functools.cache
def dynamic_map() -> np.ndarray:
  """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``), sorted, float32.

  Seven exponents ``10^(e-6)``, each with the ``2^e`` midpoints of ``linspace(0.1, 1, 2^e + 1)``,
  both signs, plus 0 and 1. The ``linspace`` is torch's float32 one (``start + i·step`` in the
  first half, ``end - (n-1-i)·step`` in the second, each rounded once), so the table is
  bit-identical to bitsandbytes'.
  """
  data = [0.0, 1.0]
  for e in range(7):
    bounds = _torch_linspace(np.float32(0.1), np.float32(1.0), 2 ** e + 1)
    means = (bounds[:-1] + bounds[1:]) / np.float32(2)
    data += [*(np.float32(10.0 ** (e - 6)) * means), *(np.float32(-10.0 ** (e - 6)) * means)]
  return np.sort(np.array(data + [0.0] * (256 - len(data)), np.float32))


def _torch_linspace(start: np.float32, end: np.float32, n: int) -> np.ndarray:
  step = np.float32((end - start) / np.float32(n - 1))
  i = np.arange(n)
  up = (np.float64(start) + np.float64(step) * i).astype(np.float32)
  down = (np.float64(end) - np.float64(step) * (n - 1 - i)).astype(np.float32)
  return np.where(i < n // 2, up, down)


@jax.tree_util.register_pytree_with_keys_class
class QArray:
  """A quantized kernel: packed codes, block scales (zero points, double-quant statistics).

  Children (arrays, over the stored layout ``[..., n]`` described in the module docstring):
    data: ``uint8 [..., n/2]`` (4-bit formats, two codes a byte) or ``int8 [..., n]``.
    scale: ``[..., n/block_size]``: float32 (``nf4``, ``int4``, ``int8``), float16 (GGUF), or
      uint8 dynamic-map codes (``nf4`` with double quantization).
    zero: ``Q4_1``'s float16 block minima ``m``, else None.
    scale_absmax, scale_offset: double quantization's float32 absmax per 256 scale codes and
      the subtracted mean, else None.

  Static: ``fmt``, the logical ``shape`` and ``dtype``, ``block_size`` and the blocked ``axis``.

  Made by `quantize` (or `from_gguf`); a pytree, so it passes through ``jit`` and
  ``tree_map`` (use `is_quantized` as ``is_leaf`` to treat it as one leaf).

  >>> import jax.numpy as jnp, lorax_jax
  >>> from lorax_jax import quantize
  >>> params = quantize({"dense": {"kernel": jnp.arange(12.0).reshape(4, 3) / 10}}, "int8", block_size=None)
  >>> q = params["dense"]["kernel"]
  >>> q
  QArray(int8, shape=(4, 3), dtype=float32, block_size=4, axis=0)
  >>> q.data.dtype, q.data.shape, q.scale.shape  # codes over the stored layout [out, in]
  (dtype('int8'), (3, 4), (3, 1))
  >>> q.dequantize().shape
  (4, 3)
  """

  CHILDREN = ("data", "scale", "zero", "scale_absmax", "scale_offset")

  def __init__(self, data: Any, scale: Any, zero: Any = None, scale_absmax: Any = None,
               scale_offset: Any = None, *, fmt: str, shape: Sequence[int], dtype: Any,
               block_size: int, axis: int):
    self.data, self.scale, self.zero = data, scale, zero
    self.scale_absmax, self.scale_offset = scale_absmax, scale_offset
    self.fmt, self.shape, self.dtype = fmt, tuple(int(n) for n in shape), jnp.dtype(dtype)
    self.block_size, self.axis = int(block_size), int(axis)

  def tree_flatten_with_keys(self):
    children = tuple((jax.tree_util.GetAttrKey(n), getattr(self, n)) for n in self.CHILDREN)
    return children, (self.fmt, self.shape, self.dtype, self.block_size, self.axis)

  @classmethod
  def tree_unflatten(cls, aux: tuple, children: Sequence[Any]) -> QArray:
    fmt, shape, dtype, block_size, axis = aux
    return cls(*children, fmt=fmt, shape=shape, dtype=dtype, block_size=block_size, axis=axis)

  @classmethod
  def stack(cls, xs: Sequence[QArray]) -> QArray:
    """``xs`` (alike in format, shape and blocking) stacked on a new leading axis: their stored
    arrays stacked, the blocked axis moved one on. `layer` is its inverse."""
    q = xs[0]
    children = [None if getattr(q, n) is None else jnp.stack([getattr(x, n) for x in xs]) for n in cls.CHILDREN]
    return cls(*children, fmt=q.fmt, shape=(len(xs), *q.shape), dtype=q.dtype, block_size=q.block_size,
               axis=q.axis + 1 if q.axis >= 0 else q.axis)

  def layer(self, children: Sequence[Any]) -> QArray:
    """One slice along the leading (unblocked) axis, from ``children``: the stored arrays (in
    `CHILDREN` order; missing ones None) sliced alike on their leading axis."""
    return QArray(*children, fmt=self.fmt, shape=self.shape[1:], dtype=self.dtype,
                  block_size=self.block_size, axis=self.axis - 1 if self.axis >= 0 else self.axis)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes of the stored arrays (what the quantized leaf costs in memory)."""
    return sum(int(np.prod(np.shape(x))) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(self))

  def aval(self) -> jax.ShapeDtypeStruct:
    """The logical float array this stands for."""
    return jax.ShapeDtypeStruct(self.shape, self.dtype)

  def dequantize(self) -> jax.Array:
    """The float kernel (pure ``jnp``; see the module docstring for the formulas)."""
    n_blocks = self.scale.shape[-1]
    lead = self.scale.shape[:-1]
    if self.fmt == "nf4":
      values = jnp.asarray(NF4)[_unpack_pairs(self.data)]
      scale = self.scale
      if self.scale_absmax is not None:  # bitsandbytes: dyn[code] · absmax2, then + offset
        codes = scale.reshape(-1)
        blocks = -(-codes.size // DOUBLE_QUANT_BLOCK)
        pad = jnp.pad(jnp.asarray(dynamic_map())[codes], (0, blocks * DOUBLE_QUANT_BLOCK - codes.size))
        scale = (pad.reshape(blocks, -1) * self.scale_absmax[:, None]).reshape(-1)[:codes.size]
        scale = (scale + self.scale_offset).reshape(self.scale.shape)
    elif self.fmt == "int4":
      values, scale = _unpack_pairs(self.data).astype(jnp.float32) - 8.0, self.scale
    elif self.fmt in ("int8", "Q8_0"):
      values, scale = self.data.astype(jnp.float32), self.scale.astype(jnp.float32)
    elif self.fmt == "Q4_0":
      values, scale = _unpack_ggml(self.data).astype(jnp.float32) - 8.0, self.scale.astype(jnp.float32)
    elif self.fmt == "Q4_1":
      values, scale = _unpack_ggml(self.data).astype(jnp.float32), self.scale.astype(jnp.float32)
    else:
      raise ValueError(f"QArray: unknown format {self.fmt!r}; expected one of {FORMATS}")
    out = values.reshape(*lead, n_blocks, -1) * scale[..., None]
    if self.zero is not None:
      out = out + self.zero.astype(jnp.float32)[..., None]
    return jnp.moveaxis(out.reshape(*lead, -1).astype(self.dtype), -1, self.axis)

  def __repr__(self) -> str:
    return (f"QArray({self.fmt}, shape={self.shape}, dtype={self.dtype.name}, "
            f"block_size={self.block_size}, axis={self.axis})")


def is_quantized(x: Any) -> bool:
  """Whether ``x`` is a `QArray`; use as ``is_leaf`` to treat quantized kernels as leaves.

  Args:
    x: anything.

  Returns:
    ``True`` for a `QArray`, else ``False``.

  >>> import jax.numpy as jnp, lorax_jax
  >>> from lorax_jax import quantize
  >>> params = quantize({"dense": {"kernel": jnp.arange(12.0).reshape(4, 3) / 10}}, "int8", block_size=None)
  >>> lorax_jax.is_quantized(params["dense"]["kernel"]), lorax_jax.is_quantized(jnp.zeros(3))
  (True, False)
  """
  return isinstance(x, QArray)


def abstract(tree: Any) -> Any:
  """``tree`` with every `QArray` replaced by the ``jax.ShapeDtypeStruct`` of its float kernel."""
  return jax.tree_util.tree_map(lambda x: x.aval() if is_quantized(x) else x, tree, is_leaf=is_quantized)


def dequantize(tree: Any) -> Any:
  """``tree`` with every `QArray` replaced by its float kernel (`QArray.dequantize`).

  Args:
    tree: any pytree; leaves other than `QArray`\\ s are kept as they are.

  Returns:
    A tree of the same structure with float arrays in the `QArray`\\ s' logical shape and dtype.

  >>> import jax.numpy as jnp, lorax_jax
  >>> from lorax_jax import quantize
  >>> params = quantize({"dense": {"kernel": jnp.arange(12.0).reshape(4, 3) / 10}}, "int8", block_size=None)
  >>> kernel = lorax_jax.dequantize(params)["dense"]["kernel"]
  >>> kernel.shape, kernel.dtype, bool(jnp.allclose(kernel, jnp.arange(12.0).reshape(4, 3) / 10, atol=0.01))
  ((4, 3), dtype('float32'), True)
  """
  return jax.tree_util.tree_map(lambda x: x.dequantize() if is_quantized(x) else x, tree,
                                is_leaf=is_quantized)


def quantize(params: Any, fmt: str, *, block_size: int | None = 64,
             targets: str | Sequence[str] | None = None, double_quant: bool = False) -> Any:
  """``params`` with the selected kernels replaced by `QArray`\\ s of format ``fmt``.

  Blocks run along each kernel's axis ``ndim - 2`` (a Flax ``[..., in, out]`` kernel's input
  axis, a conv ``HWIO`` kernel's ``I``). Quantization runs once, on the host (NumPy):

    nf4:  absmax_blk = max |V|, q = the NF4 entry nearest V / absmax (bitsandbytes' midpoint
          rule: the number of midpoints below the value)
    int4: scale = absmax / 7, q = clip(round(V / scale), -7, 7) + 8, two codes a byte
    int8: scale = absmax / 127, q = round(V / scale)

  Args:
    params: a params pytree (Flax ``{"params": ...}``, an NNX state, a dict of arrays, ...).
    fmt: ``"nf4"``, ``"int4"`` or ``"int8"``. GGUF's formats come from a file unchanged
      (`from_gguf`, ``load_gguf(..., quantized=True)``), never by re-quantizing.
    block_size: values per block (bitsandbytes' ``blocksize``); None for one block per
      output channel (the whole axis: ``int8`` per-channel).
    targets: which leaves, as `LoraConfig.targets` (a regex full-matching the ``/``-joined
      path, or a list of module-name suffixes). Default: every float leaf of rank >= 2 but
      embeddings (a path entry containing ``embed``).
    double_quant: quantize nf4's absmax again (bitsandbytes' ``compress_statistics``).

  Raises:
    ValueError: an unknown ``fmt``, ``double_quant`` with another format than nf4, a selected
      leaf that is not a float array of rank >= 2, a ``block_size`` that does not divide the
      blocked axis (or is odd for a 4-bit format), or ``targets`` selecting nothing.
  """
  if fmt in GGUF_FORMATS:
    raise ValueError(f"quantize: {fmt} blocks come from a GGUF file as stored (from_gguf, "
                     f"load_gguf(..., quantized=True)); quantize makes {QUANTIZE_FORMATS}")
  if fmt not in QUANTIZE_FORMATS:
    raise ValueError(f"quantize: unknown format {fmt!r}; expected one of {QUANTIZE_FORMATS}")
  if double_quant and fmt != "nf4":
    raise ValueError(f"quantize: double_quant is for nf4's absmax, not {fmt!r}")
  if block_size is not None and (not isinstance(block_size, int) or block_size <= 0):
    raise ValueError(f"quantize: block_size must be a positive int or None, got {block_size!r}")
  chosen = {path for path, leaf in leaves_with_paths(params) if _selected(path, leaf, targets)}
  if targets is not None and not chosen:
    raise ValueError(f"quantize: targets {targets!r} select no leaf")

  def one(kp, leaf):
    path = tree_path(kp)
    if path not in chosen:
      return leaf
    return _quantize_leaf(path_str(path), leaf, fmt, block_size, double_quant)
  return jax.tree_util.tree_map_with_path(one, params)


def requantize(w: Any, like: QArray) -> QArray:
  """``w`` (a float array of ``like``'s logical shape) quantized in ``like``'s format, block size
  and blocked axis, on the host: `quantize`'s rules, or for GGUF formats llama.cpp's reference
  quantizer (``gguf.quants.quantize``). `lorax_jax.merge` uses it (``requantize=True``).

  Raises:
    ValueError: ``w``'s shape differs from ``like``'s.
  """
  if tuple(np.shape(w)) != like.shape:
    raise ValueError(f"requantize: array of shape {tuple(np.shape(w))} for a QArray of shape {like.shape}")
  if like.fmt not in GGUF_FORMATS:
    return _quantize_leaf("the merged kernel", jnp.asarray(w, like.dtype), like.fmt, like.block_size,
                          like.scale_absmax is not None, like.axis)
  import gguf
  v = np.moveaxis(np.asarray(w, np.float32), like.axis, -1)
  raw = gguf.quants.quantize(np.ascontiguousarray(v), getattr(gguf.GGMLQuantizationType, like.fmt))
  return from_gguf(raw, like.fmt, dtype=like.dtype, embedding=like.axis == 1)


def _selected(path: tuple[str, ...], leaf: Any, targets: str | Sequence[str] | None) -> bool:
  name = path_str(path)
  if targets is not None:
    if not matches(targets, name):
      return False
    if np.ndim(leaf) < 2 or not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise ValueError(f"quantize: {name} must be a float array of rank >= 2 to be quantized, got "
                       f"shape {tuple(np.shape(leaf))} dtype {jnp.result_type(leaf)}")
    return True
  return (hasattr(leaf, "shape") and np.ndim(leaf) >= 2
          and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
          and not any("embed" in p.lower() for p in path))


def _quantize_leaf(name: str, leaf: Any, fmt: str, block_size: int | None, double_quant: bool,
                   axis: int | None = None) -> QArray:
  dtype = jnp.result_type(leaf)
  axis = np.ndim(leaf) - 2 if axis is None else axis
  v = np.moveaxis(np.asarray(leaf, np.float32), axis, -1)
  n = v.shape[-1]
  bs = n if block_size is None else block_size
  if n % bs or (fmt != "int8" and bs % 2):
    raise ValueError(f"quantize: block_size {bs} does not divide axis {axis} (size {n}) of {name} "
                     f"shape {tuple(np.shape(leaf))}" + ("" if fmt == "int8" else " into even blocks")
                     + "; pick a block size dividing it")
  blocks = v.reshape(*v.shape[:-1], n // bs, bs)
  absmax = np.abs(blocks).max(-1)
  meta = dict(fmt=fmt, shape=np.shape(leaf), dtype=dtype, block_size=bs, axis=axis)
  if fmt == "nf4":
    scaled = np.clip(blocks * (np.float32(1) / np.maximum(absmax, np.float32(1e-38)))[..., None], -1, 1)
    codes = np.searchsorted((NF4[:-1] + NF4[1:]) / np.float32(2), scaled, side="left").astype(np.uint8)
    data = _pack_pairs(codes.reshape(v.shape))
    if double_quant:
      return QArray(jnp.asarray(data), *_double_quant(absmax), **meta)
    return QArray(jnp.asarray(data), jnp.asarray(absmax), **meta)
  levels = 7 if fmt == "int4" else 127
  scale = absmax / np.float32(levels)
  safe = np.where(scale == 0, np.float32(1), scale)[..., None]
  q = np.clip(np.rint(blocks / safe), -levels, levels).reshape(v.shape)
  data = _pack_pairs((q + 8).astype(np.uint8)) if fmt == "int4" else q.astype(np.int8)
  return QArray(jnp.asarray(data), jnp.asarray(scale), **meta)


def _double_quant(absmax: np.ndarray) -> tuple[jax.Array, None, jax.Array, jax.Array]:
  """bitsandbytes' ``quantize_blockwise(absmax - mean, blocksize=256)`` with the dynamic map."""
  flat = absmax.reshape(-1)
  offset = flat.mean(dtype=np.float32)
  centred = flat - offset
  blocks = -(-flat.size // DOUBLE_QUANT_BLOCK)
  padded = np.pad(centred, (0, blocks * DOUBLE_QUANT_BLOCK - flat.size)).reshape(blocks, -1)
  absmax2 = np.abs(padded).max(-1)
  scaled = np.clip(padded * (np.float32(1) / np.maximum(absmax2, np.float32(1e-38)))[:, None], -1, 1)
  code = dynamic_map()
  codes = np.searchsorted((code[:-1] + code[1:]) / np.float32(2), scaled, side="left").astype(np.uint8)
  codes = codes.reshape(-1)[:flat.size].reshape(absmax.shape)
  return jnp.asarray(codes), None, jnp.asarray(absmax2), jnp.asarray(offset)


def from_gguf(blocks: np.ndarray, ggml_type: str, *, dtype: Any = jnp.float32, embedding: bool = False) -> QArray:
  """A GGUF tensor's blocks, as stored in the file, as the `QArray` of its Flax ``[in, out]`` kernel
  (or, with ``embedding``, of its ``[rows, in]`` table as stored: an embedding ``[vocab, features]``
  whose blocks run along the features, so a lookup dequantizes only the rows it picks).

  Args:
    blocks: the tensor's bytes as ``uint8 [out, in / 32 · bytes_per_block]`` (``gguf``'s
      ``ReaderTensor.data`` of a quantized 2-D tensor: one row per output, blocks along ``in``).
    ggml_type: the tensor type's name, ``"Q4_0"``, ``"Q4_1"`` or ``"Q8_0"``.
    dtype: the logical dtype of the dequantized kernel.
    embedding: keep the stored ``[rows, in]`` orientation instead of the transposed kernel.

  Raises:
    ValueError: another tensor type, or bytes that are not whole blocks of ``ggml_type``.
  """
  if ggml_type not in GGUF_FORMATS:
    raise ValueError(f"GGUF tensor type {ggml_type} is not supported quantized; supported: {GGUF_FORMATS}")
  scale_bytes = 4 if ggml_type == "Q4_1" else 2
  q_bytes = GGUF_BLOCK if ggml_type == "Q8_0" else GGUF_BLOCK // 2
  per_block = scale_bytes + q_bytes
  blocks = np.asarray(blocks)
  if blocks.dtype != np.uint8 or blocks.ndim != 2 or blocks.shape[1] % per_block:
    raise ValueError(f"{ggml_type} blocks must be uint8 [rows, k · {per_block}], got "
                     f"{blocks.dtype} {blocks.shape}")
  rows, n_blocks = blocks.shape[0], blocks.shape[1] // per_block
  b = blocks.reshape(rows, n_blocks, per_block)
  d = np.ascontiguousarray(b[..., :2]).view(np.float16)[..., 0]
  zero = np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0] if ggml_type == "Q4_1" else None
  qs = np.ascontiguousarray(b[..., scale_bytes:]).reshape(rows, n_blocks * q_bytes)
  if ggml_type == "Q8_0":
    qs = qs.view(np.int8)
  shape, axis = ((rows, n_blocks * GGUF_BLOCK), 1) if embedding else ((n_blocks * GGUF_BLOCK, rows), 0)
  return QArray(jnp.asarray(qs), jnp.asarray(d), None if zero is None else jnp.asarray(zero),
                fmt=ggml_type, shape=shape, dtype=dtype, block_size=GGUF_BLOCK, axis=axis)


def _pack_pairs(codes: np.ndarray) -> np.ndarray:
  """4-bit codes, consecutive pairs into one byte, the first in the high nibble (bitsandbytes)."""
  return (codes[..., 0::2] << 4) | codes[..., 1::2]


def _unpack_pairs(data: jax.Array) -> jax.Array:
  return jnp.stack([data >> 4, data & 15], -1).reshape(*data.shape[:-1], -1)


def _unpack_ggml(data: jax.Array) -> jax.Array:
  """ggml's 4-bit blocks: byte ``j`` of a 32-block holds element ``j`` (low) and ``j + 16`` (high)."""
  d = data.reshape(*data.shape[:-1], -1, GGUF_BLOCK // 2)
  return jnp.concatenate([d & 15, d >> 4], -1).reshape(*data.shape[:-1], -1)


def leaves_with_paths(tree: Any) -> list[tuple[Path, Any]]:
  """``(path, leaf)`` for every leaf, in `jax.tree_util` order, paths as tuples of strings.

  A quantized kernel (`lorax_jax.QArray`) is one leaf: it stands for one float array.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)
  return [(tree_path(kp), leaf) for kp, leaf in flat]
