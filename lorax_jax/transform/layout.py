"""Layout rules: the kernel followed through casts, transposes, reshapes, slices, reversals,
splits, concatenations and scalings, its factors moved (or scaled) to match."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.extend as jex
import jax.numpy as jnp
import numpy as np
from jax import lax

from lorax_jax.transform.core import AxisMap, Context, Tracked, Walk, as_array, bind, fallback_rule, first_tracked
from lorax_jax.transform.kernels import Label, LoraKernel, on_g
from lorax_jax.transform.registry import register, rule


def same_axes(eqn: jex.core.JaxprEqn, ins: list[Tracked | None], walk: Walk) -> list[Tracked]:
  """The walk of a primitive whose every output has the kernel's axes as they are."""
  return [first_tracked(ins)[1]] * len(eqn.outvars)


def _permuted_axes(eqn: jex.core.JaxprEqn, ins: list[Tracked | None], walk: Walk) -> list[Tracked]:
  n, axes = first_tracked(ins)[1]
  return [(n, tuple(axes[q] for q in eqn.params["permutation"]))]


def _reshaped_axes(eqn: jex.core.JaxprEqn, ins: list[Tracked | None], walk: Walk) -> list[Tracked]:
  n, axes = first_tracked(ins)[1]
  return [(n, _reshape_axes(axes, eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape))]


@rule("convert_element_type", "copy", "copy_p", kind="layout", walk=same_axes)
def _convert_rule(eqn: jex.core.JaxprEqn, invals: list[Any], ctx: Context) -> list[Any]:
  """A dtype cast: followed between float types of >= 16 bits; any other cast (to an integer or
  8-bit float) would cast the factors too and is merged for that use instead."""
  (k,) = invals
  new = eqn.params.get("new_dtype", k.w.dtype)
  if not (jnp.issubdtype(new, jnp.floating) and jnp.issubdtype(k.w.dtype, jnp.floating)
          and jnp.finfo(new).bits >= 16):
    return fallback_rule(eqn, invals, ctx, f"a cast to {jnp.dtype(new).name}")
  return [k.with_w(bind(eqn, [k.w])[0])]


@rule("pvary", kind="layout", walk=same_axes)
def _pvary_rule(eqn: jex.core.JaxprEqn, invals: list[Any], ctx: Context) -> list[Any]:
  """A replicated kernel marked varying over manual axes in a ``shard_map`` body (``check_vma``):
  ``w`` marked, the factors as they are (the branch's own ops mark them where they meet a
  varying operand, and differentiate that to the ``psum`` of their gradients)."""
  (k,) = invals
  return [k.with_w(bind(eqn, [k.w])[0])]


@rule("transpose", kind="layout", walk=_permuted_axes)
def _transpose_rule(eqn: jex.core.JaxprEqn, invals: list[Any], ctx: Context) -> list[Any]:
  (k,) = invals
  perm = eqn.params["permutation"]
  return [k.with_w(bind(eqn, [k.w])[0], tuple(k.labels[p] for p in perm))]


@rule("reshape", "squeeze", "broadcast_in_dim", kind="layout", walk=_reshaped_axes)
def _reshape_rule(eqn: jex.core.JaxprEqn, invals: list[Any], ctx: Context) -> list[Any]:
  """``reshape``, ``squeeze`` and size-preserving ``broadcast_in_dim``: row-major reshapes."""
  k = invals[0]
  dims = eqn.params.get("broadcast_dimensions", ())
  transposes = eqn.primitive.name == "reshape" and eqn.params.get("dimensions") is not None
  if len(invals) == 1 and not transposes and list(dims) == sorted(dims):
    w = bind(eqn, [k.w])[0]
    moved = _reshape_factors(k, w.shape) if w.size == k.w.size else None
    if moved is not None:
      return [moved.with_w(w)]
  return fallback_rule(eqn, invals, ctx)


def _reshape_factors(k: LoraKernel, shape: tuple[int, ...]) -> LoraKernel | None:
  """``k`` with its factors reshaped to follow ``w.reshape(shape)``, or None if they can't.

  They can when every group of axes merged or split lies on one side (stack, ``a`` or
  ``b``) as consecutive axes in the factor's order. Size-1 axes come and go freely
  (new ones are put on ``a``).
  """
  rank = {}
  for side in "sab":
    side_axes = sorted(l[1] for j, l in enumerate(k.labels) if l[0] == side and k.w.shape[j] != 1)
    rank.update({(side, i): n for n, i in enumerate(side_axes)})
  old = [j for j, n in enumerate(k.w.shape) if n != 1]
  new = [j for j, n in enumerate(shape) if n != 1]
  firsts: dict[str, dict[int, list[int]]] = {"s": {}, "a": {}, "b": {}}
  for gi, gj in _reshape_groups([k.w.shape[j] for j in old], [shape[j] for j in new]):
    labels = [k.labels[old[x]] for x in gi]
    side, ranks = labels[0][0], [rank[l] for l in labels]
    if any(l[0] != side for l in labels) or ranks != list(range(ranks[0], ranks[0] + len(ranks))):
      return None
    firsts[side][ranks[0]] = [new[x] for x in gj]
  new_labels: dict[int, Label] = {}
  dims: dict[str, list[int]] = {}
  for side in "sab":
    axes = [axis for first in sorted(firsts[side]) for axis in firsts[side][first]]
    dims[side] = [shape[axis] for axis in axes]
    new_labels.update({axis: (side, n) for n, axis in enumerate(axes)})
  for axis in (j for j, n in enumerate(shape) if n == 1):
    new_labels[axis] = ("a", len(dims["a"]))
    dims["a"].append(1)
  lead, r = k.a.shape[:k.lead], k.a.shape[k.rank_axis]
  a = k.a.reshape(*lead, *dims["s"], r, *dims["a"])
  b = k.b.reshape(*lead, *dims["s"], r, *dims["b"])
  g = on_g(k, lambda g: g.reshape(*lead, *dims["s"], 1, *dims["b"]))
  return dataclasses.replace(k, a=a, b=b, g=g, labels=tuple(new_labels[j] for j in range(len(shape))))


def _reshape_groups(old: list[int], new: list[int]) -> list[tuple[list[int], list[int]]]:
  """Split a reshape (no size-1 axes) into groups of old and new axes of equal size."""
  groups, i, j = [], 0, 0
  while i < len(old) and j < len(new):
    gi, gj, pi, pj = [i], [j], old[i], new[j]
    while pi != pj:
      if pi < pj:
        i += 1
        gi.append(i)
        pi *= old[i]
      else:
        j += 1
        gj.append(j)
        pj *= new[j]
    groups.append((gi, gj))
    i, j = i + 1, j + 1
  return groups


def _reshape_axes(axes: AxisMap, old: Sequence[int], new: Sequence[int]) -> AxisMap:
  """The `AxisMap` after a row-major reshape from ``old`` to ``new`` (size-1 axes span nothing)."""
  old_keep = [j for j, s in enumerate(old) if s != 1]
  new_keep = [j for j, s in enumerate(new) if s != 1]
  out = [frozenset()] * len(new)
  for gi, gj in _reshape_groups([old[j] for j in old_keep], [new[j] for j in new_keep]):
    spanned = frozenset().union(*(axes[old_keep[x]] for x in gi))
    for x in gj:
      out[new_keep[x]] = spanned
  return tuple(out)


@rule("slice", "dynamic_slice", kind="layout", walk=same_axes)
def _slice_rule(eqn: jex.core.JaxprEqn, invals: list[Any], ctx: Context) -> list[Any]:
  """``slice`` / ``dynamic_slice``: each factor is sliced along the kernel axes it owns."""
  k, *starts = invals
  w = bind(eqn, [k.w, *[as_array(x, ctx, "a slice index") for x in starts]])[0]
  out = k
  for j, label in enumerate(k.labels):
    if w.shape[j] == k.w.shape[j]:
      continue
    if eqn.primitive.name == "slice":
      start, limit = eqn.params["start_indices"][j], eqn.params["limit_indices"][j]
      stride = (eqn.params["strides"] or (1,) * k.w.ndim)[j]
      out = out.along(label, lambda x, axis: lax.slice_in_dim(x, start, limit, stride, axis))
    else:
      out = out.along(label, lambda x, axis: lax.dynamic_slice_in_dim(x, starts[j], w.shape[j], axis))
  return [out.with_w(w)]


@rule("rev", kind="layout", walk=same_axes)
def _rev_rule(eqn: jex.core.JaxprEqn, invals: list[Any], ctx: Context) -> list[Any]:
  """``rev`` (``jnp.flip``, ``W[::-1]``): each factor is reversed along the kernel axes it owns."""
  (k,) = invals
  for j in eqn.params["dimensions"]:
    k = k.along(k.labels[j], lambda x, axis: lax.rev(x, (axis,)))
  return [k.with_w(bind(eqn, [k.w])[0])]


@rule("split", kind="layout", walk=same_axes)
def _split_rule(eqn: jex.core.JaxprEqn, invals: list[Any], ctx: Context) -> list[Any]:
  """``jnp.split`` of a fused kernel (QKV, gate-up): each piece carries its slice of the factor
  owning the split axis (both factors for a stack axis)."""
  (k,) = invals
  axis = eqn.params["axis"]
  pieces = bind(eqn, [k.w])
  start, out = 0, []
  for w in pieces:
    n = w.shape[axis]
    out.append(k.along(k.labels[axis], lambda x, at: lax.slice_in_dim(x, start, start + n, axis=at)).with_w(w))
    start += n
  return out


@rule("concatenate", kind="layout", walk=same_axes)
def _concatenate_rule(eqn: jex.core.JaxprEqn, invals: list[Any], ctx: Context) -> list[Any]:
  """Kernels concatenated along an axis (``nn.OptimizedLSTMCell``'s gates): one kernel whose
  factors are block-diagonal over the rank.

  Along an ``a`` (``b``) axis: ``a`` (``b``) is the pieces' factors concatenated along that axis
  and zero-padded over the others' rank blocks, the other factor the pieces' concatenated along
  the rank; each piece's scale is folded into its ``b``. Exact; the rank is the sum of the ranks.
  Along a stacked axis (layers or experts of equal rank) both factors are concatenated there.
  """
  axis = eqn.params["dimension"]
  ks = [x for x in invals if isinstance(x, LoraKernel)]
  if len(ks) != len(invals) or any(x.labels != ks[0].labels or x.a.dtype != ks[0].a.dtype for x in ks):
    return fallback_rule(eqn, invals, ctx)
  if any(x.g is not None for x in ks):
    return fallback_rule(eqn, invals, ctx, "concatenate of DoRA kernels")
  k0 = dataclasses.replace(ks[0], invariant=ctx.joined(ks))
  cat_side = k0.labels[axis][0]
  r_axis = k0.rank_axis
  w = bind(eqn, [x.w for x in ks])[0]
  if cat_side == "s":
    if any(x.a.shape[r_axis] != k0.a.shape[r_axis] for x in ks):
      return fallback_rule(eqn, invals, ctx, "concatenate of stacked kernels of different ranks")
    stack = k0.factor_axis(k0.labels[axis])
    a = jnp.concatenate([x.a for x in ks], axis=stack)
    b = jnp.concatenate([x.b * jnp.asarray(x.scale, x.b.dtype) for x in ks], axis=stack)
    return [dataclasses.replace(k0, w=w, a=a, b=b, scale=1.0)]
  ranks = [x.a.shape[r_axis] for x in ks]
  a = [x.a for x in ks]
  b = [x.b * jnp.asarray(x.scale, x.b.dtype) for x in ks]
  blocks = a if cat_side == "a" else b
  padded = []
  for n, x in enumerate(blocks):
    pad = [(0, 0, 0)] * x.ndim
    pad[r_axis] = (sum(ranks[:n]), sum(ranks[n + 1:]), 0)
    padded.append(lax.pad(x, jnp.zeros((), x.dtype), pad))
  along = jnp.concatenate(padded, axis=k0.factor_axis(k0.labels[axis]))
  stacked = jnp.concatenate(b if cat_side == "a" else a, axis=r_axis)
  a, b = (along, stacked) if cat_side == "a" else (stacked, along)
  return [dataclasses.replace(k0, w=w, a=a, b=b, scale=1.0)]


@rule("neg", kind="layout", walk=same_axes)
def _neg_rule(eqn: jex.core.JaxprEqn, invals: list[Any], ctx: Context) -> list[Any]:
  """``-W``: ``-W - s · a ⊗ b`` (the scale negated)."""
  (k,) = invals
  return [dataclasses.replace(k, w=bind(eqn, [k.w])[0], scale=-k.scale)]


@rule("mul", "div", kind="layout", walk=same_axes)
def _scale_rule(eqn: jex.core.JaxprEqn, invals: list[Any], ctx: Context) -> list[Any]:
  """``W * c`` / ``W / c`` with ``c`` a scalar or varying along one side's axes only (muP,
  per-channel scales): that side's factor is multiplied (divided) by ``c``, as `merge` would."""
  k, c = invals
  c_var = eqn.invars[1]
  if eqn.primitive.name == "mul" and not isinstance(k, LoraKernel):
    (c, k), c_var = invals, eqn.invars[0]
  if isinstance(c, LoraKernel) or not isinstance(k, LoraKernel):
    return fallback_rule(eqn, invals, ctx)
  compact = _compact(c, c_var, ctx)
  varying = {k.labels[j] for j, n in enumerate(np.shape(compact)) if n != 1}
  sides = {side for side, _ in varying} - {"s"}
  if len(sides) > 1:
    return fallback_rule(eqn, invals, ctx, f"{eqn.primitive.name} by an array varying along input and output axes")
  side = sides.pop() if sides else "b"
  factor = k.a if side == "a" else k.b
  if np.ndim(compact) == 0:
    m = jnp.asarray(compact)
  else:  # c's axes in the factor's order (the other side's, all of size 1, dropped), the rank as size 1
    kept = [j for j, l in enumerate(k.labels) if l[0] in ("s", side)]
    m = jnp.reshape(jnp.asarray(compact), [np.shape(compact)[j] for j in kept])
    order = sorted((k.factor_axis(k.labels[j]), n) for n, j in enumerate(kept))
    m = jnp.expand_dims(jnp.transpose(m, [n for _, n in order]), k.n_stack)
  op = jnp.multiply if eqn.primitive.name == "mul" else jnp.divide
  scaled = op(factor, m.astype(factor.dtype))
  w = bind(eqn, [k.w, c])[0]
  k = dataclasses.replace(k, a=scaled) if side == "a" else dataclasses.replace(k, b=scaled)
  return [k.with_w(w)]


def _compact(c: Any, var: Any, ctx: Context) -> Any:
  """``c``, or, when it was broadcast from a smaller array, that array with size-1 axes where the
  broadcast added them (so its non-1 axes are those along which ``c`` varies)."""
  if np.ndim(c) == 0:
    return c
  if isinstance(var, jex.core.Literal) or var not in ctx.producers:
    return c
  dims, src = ctx.producers[var]
  shape = [1] * np.ndim(c)
  for d, n in zip(dims, np.shape(src)):
    shape[d] = n
  return jnp.reshape(src, shape)


def _note_broadcast(eqn: jex.core.JaxprEqn, invals: list[Any], outvals: list[Any], ctx: Context) -> None:
  """Remember what a ``broadcast_in_dim`` of plain arrays broadcast, for `_compact`."""
  ctx.producers[eqn.outvars[0]] = (eqn.params["broadcast_dimensions"], invals[0])


register("broadcast_in_dim", observe=_note_broadcast)
