"""Quantized kernels (QLoRA): a `QuantizedKernel` is followed lazily to its uses and dequantized
there, again in the backward pass, so no float copy of it is kept."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
from jax import lax

from lorax_jax.qarray import QArray
from lorax_jax.transform.kernels import QuantizedKernel, rebind
from lorax_jax.transform.registry import NO_RULE, RULES, register


def quantized_use(eqn: jex.core.JaxprEqn, invals: Sequence[Any], params: dict[str, Any]) -> list[Any]:
  """``eqn`` on operands among which a `QuantizedKernel` is: a layout equation (`Rule.kind`) of the
  kernel alone is recorded on it; a primitive with a `Rule.quantized` rule runs that (an embedding
  lookup gathering only the looked-up rows' blocks, a tied head multiplied in chunks), where the
  layout allows; any other equation (a ``dot_general``, a conv, an operation without a rule) runs
  on the kernel dequantized at this use and dequantized again in the backward pass
  (`_dequantized_use`)."""
  rule = RULES.get(eqn.primitive.name, NO_RULE)
  if rule.kind == "layout" and len(invals) == 1 and not params:
    return [invals[0].then(eqn, n) for n in range(len(eqn.outvars))]
  if rule.quantized is not None and not params:
    out = rule.quantized(eqn, invals)
    if out is not None:
      return [out]
  return _dequantized_use(lambda *vals: rebind(eqn, vals, **params), invals)


def _dequantized_use(op: Callable[..., Any], args: Sequence[Any]) -> Any:
  """``op(*args)`` with each `QuantizedKernel` in ``args`` dequantized, never kept for the backward pass.

  A custom VJP. The forward pass dequantizes once the other inputs are ready (an optimization
  barrier ties them) and saves the other inputs and the stored blocks only; the backward pass
  dequantizes again once the cotangent has arrived (tied by a barrier as well) and pulls it back
  through ``op`` to the other inputs. The quantized base is frozen: its cotangents are zero.
  So at any time only the kernels of the uses being computed exist in float.
  """
  where = tuple(isinstance(x, QuantizedKernel) for x in args)
  rest = [x for x, q in zip(args, where) if not q]
  frozen = [x for x, q in zip(args, where) if q]

  def full(rest, floats):
    it_rest, it_float = iter(rest), iter(floats)
    return op(*[next(it_float) if q else next(it_rest) for q in where])

  @jax.custom_vjp
  def run(rest, frozen):
    return full(rest, [k.dequantize() for k in frozen])

  def fwd(rest, frozen):
    tied_rest, tied = lax.optimization_barrier((rest, frozen))
    return full(tied_rest, [k.dequantize() for k in _after(tied, tied_rest)]), (rest, frozen)

  def bwd(res, g):
    rest, frozen = res
    g, tied = lax.optimization_barrier((g, frozen))
    floats = [k.dequantize() for k in _after(tied, g)]
    _, pull = jax.vjp(lambda r: full(r, floats), rest)
    return pull(g)[0], jax.tree_util.tree_map(_zero_cotangent, frozen)

  run.defvjp(fwd, bwd)
  return run(rest, frozen)


def _after(frozen: Any, g: Any) -> Any:
  """``frozen`` with its float leaves (block scales) plus ``0 · g₀``, ``g₀`` the first float of
  ``g``: equal values, now computed after ``g``.

  Needed because the barriers alone do not order the dequantizations: XLA's CPU pipeline removes
  optimization barriers before common-subexpression elimination and scheduling, which then merge
  the backward pass's dequantization with the forward pass's (and may hoist all the forward ones
  to the start), keeping the float kernels alive in between (the step's temporaries then hold
  every quantized kernel in float;
  ``tests/test_quantize.py::test_engine_step_keeps_no_float_copy_of_the_kernels`` fails without it).
  """
  first = next((x for x in jax.tree_util.tree_leaves(g) if jnp.issubdtype(x.dtype, jnp.inexact)), None)
  if first is None:
    return frozen
  zero = jnp.zeros((), jnp.float32) * first.reshape(-1)[0].astype(jnp.float32)
  return jax.tree_util.tree_map(
      lambda x: x + zero.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.inexact) else x, frozen)


def _zero_cotangent(x: Any) -> Any:
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros(x.shape, x.dtype)
  return np.zeros(x.shape, jax.dtypes.float0)


def _gather_rows(eqn: jex.core.JaxprEqn, invals: Sequence[Any]) -> jax.Array | None:
  """An embedding lookup ``E[ids]`` of a quantized table whose blocks run along its last axis, the
  looked-up features (a GGUF ``token_embd``): the same gather picks the rows' codes, scales and
  zero points, and only the picked rows are dequantized. None when the layout does not allow it
  (the blocks run along the indexed axis, a non-cast layout is pending, double quantization)."""
  k, ids = invals
  if not isinstance(k, QuantizedKernel) or isinstance(ids, QuantizedKernel):
    return None
  q, dn, sizes = k.q, eqn.params["dimension_numbers"], tuple(eqn.params["slice_sizes"])
  last = q.ndim - 1
  if (any(e.primitive.name != "convert_element_type" for e, _ in k.ops) or q.axis != last
      or q.scale_absmax is not None or last in dn.start_index_map or last in dn.collapsed_slice_dims
      or sizes[last] != q.shape[last] or getattr(dn, "operand_batching_dims", ())):
    return None
  feature = dn.offset_dims[-1]  # where the table's last axis lands in the output

  def pick(x):
    if x is None:
      return None
    # Out-of-range rows: the float scales take the lookup's fill (NaN), so the rows dequantize to it.
    fill = {} if jnp.issubdtype(x.dtype, jnp.inexact) else {"fill_value": 0}
    return jnp.moveaxis(rebind(eqn, [x, ids], slice_sizes=(*sizes[:-1], x.shape[-1]), **fill)[0], feature, -1)
  rows = QArray(pick(q.data), pick(q.scale), pick(q.zero), fmt=q.fmt, shape=eqn.outvars[0].aval.shape,
                dtype=q.dtype, block_size=q.block_size, axis=feature).dequantize()
  for cast, _ in k.ops:
    rows = rebind(cast, [rows])[0]
  return rows


register("gather", quantized=_gather_rows)


_CHUNK_BYTES = 4 << 20  # a quantized kernel larger than this in float is multiplied in chunks of its rows


def _chunked_dot(eqn: jex.core.JaxprEqn, invals: Sequence[Any]) -> jax.Array | None:
  """A ``dot_general`` with one quantized kernel over ``_CHUNK_BYTES`` in float whose stored rows
  (axis 0, not blocked) are a free axis of the product: the tied head ``h @ E.T`` of a GGUF
  embedding. ``out = concat_c (x · deq(Q[rows_c]))`` along that axis, as a ``lax.map`` over row
  chunks of at most ``_CHUNK_BYTES`` in float, each a ``jax.checkpoint`` (dequantized again in the
  backward pass): one chunk at a time exists in float instead of the whole table (113 MB for
  SmolLM2's). None when the layout does not allow it (blocks along the rows, double
  quantization, a pending layout other than casts and transposes, rows contracted)."""
  which = [n for n, x in enumerate(invals) if isinstance(x, QuantizedKernel)]
  if len(which) != 1:
    return None
  i, k = which[0], invals[which[0]]
  q, rows = k.q, k.q.shape[0]
  row_bytes = k.size // rows * jnp.dtype(k.dtype).itemsize
  if (q.axis == 0 or q.scale_absmax is not None or rows * row_bytes <= _CHUNK_BYTES
      or any(e.primitive.name not in ("convert_element_type", "transpose") for e, _ in k.ops)):
    return None
  axis = 0  # where the stored rows are in the kernel the model sees
  for e, _ in k.ops:
    if e.primitive.name == "transpose":
      axis = list(e.params["permutation"]).index(axis)
  contract, batch = eqn.params["dimension_numbers"]
  if axis in contract[i] or axis in batch[i]:
    return None
  free = [[d for d in range(len(x.shape)) if d not in (*contract[n], *batch[n])] for n, x in enumerate(invals)]
  out_axis = len(batch[0]) + (free[0].index(axis) if i == 0 else len(free[0]) + free[1].index(axis))
  chunks = next(c for c in range(-(-rows * row_bytes // _CHUNK_BYTES), rows + 1) if rows % c == 0)
  stored = [None if x is None else x.reshape(chunks, rows // chunks, *x.shape[1:]) for x in (q.data, q.scale, q.zero)]

  def product(part):
    w = QArray(*part, fmt=q.fmt, shape=(rows // chunks, *q.shape[1:]), dtype=q.dtype, block_size=q.block_size,
               axis=q.axis).dequantize()
    for e, _ in k.ops:
      w = rebind(e, [w])[0]
    return rebind(eqn, [w if n == i else x for n, x in enumerate(invals)])[0]

  out = lax.map(jax.checkpoint(product), stored)
  return jnp.moveaxis(out, 0, out_axis).reshape(eqn.outvars[0].aval.shape)


register("dot_general", quantized=_chunked_dot)


def slice_quantized(k: QuantizedKernel) -> tuple[Any, Callable[[Any], QuantizedKernel] | None]:
  """What scan slices for a quantized kernel scanned over its axis 0, and how to rebuild the
  slice: the stored arrays, when axis 0 is one of their leading axes (blocks along another axis,
  no pending layout, no double quantization); else the dequantized stack (rebuild None)."""
  q = k.q
  if k.ops or q.axis == 0 or q.scale_absmax is not None:
    return k.dequantize(), None

  return (q.data, q.scale, q.zero), lambda children: QuantizedKernel.of(q.layer(children))
