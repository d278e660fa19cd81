"""Contraction rules: where the kernel is consumed (``dot_general``, ``ragged_dot``, a conv, an
embedding ``gather``) the low-rank branch is added, in the order that keeps its intermediate
smallest."""

from __future__ import annotations

import math
import string
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
from jax import lax

from lorax_jax.dropout import dropout_bilinear, dropout_einsum
from lorax_jax.transform.core import Context, Tracked, Walk, bind, fallback_rule, first_tracked
from lorax_jax.transform.dora import dora_output, times_along
from lorax_jax.transform.kernels import ADAPTER, LoraKernel
from lorax_jax.transform.registry import rule


def _dot_general_walk(eqn: jex.core.JaxprEqn, ins: list[Tracked | None], walk: Walk) -> None:
  """Contracted axes are input, batch axes stacked, free axes output."""
  i, x = first_tracked(ins)
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  c, b = (lc, lb) if i == 0 else (rc, rb)
  walk.note(x, lambda q: "input" if q in c else "stack" if q in b else "output", "dot_general")


@rule("dot_general", kind="use", walk=_dot_general_walk)
def _dot_general_rule(eqn: jex.core.JaxprEqn, invals: list[Any], ctx: Context) -> list[Any]:
  """``x·W + s · (dropout(x)·F)·G``, for the kernel on either side of the dot.

  ``F`` is the factor owning the kernel axes that ``x`` contracts (``a`` for ``x @ W``, ``b`` for
  ``x @ W.T`` or a tied LM head), so the intermediate is ``x``'s free axes times ``r``; ``G`` is
  the other factor. A dot contracting axes of both factors is merged for that use.
  """
  lhs, rhs = invals
  if isinstance(lhs, LoraKernel) and isinstance(rhs, LoraKernel):
    lhs = ctx.fallback(lhs, "dot_general with two kernels")
  side = 1 if isinstance(rhs, LoraKernel) else 0
  k, x = (rhs, lhs) if side else (lhs, rhs)
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  (xc, kc), (xb, kb) = ((lc, rc), (lb, rb)) if side else ((rc, lc), (rb, lb))
  contracted = {k.labels[i][0] for i in kc} - {"s"}
  if not ctx.adapts(k, "matmul"):
    return bind(eqn, [lhs, k.w] if side else [k.w, rhs])
  if contracted == {"a", "b"}:
    return fallback_rule(eqn, invals, ctx, "dot_general contracting input and output axes")
  base = bind(eqn, [lhs, k.w] if side else [k.w, rhs])[0]
  if k.ids is not None:
    k = per_example(k, x, 0 not in (*xc, *xb), ctx, "dot_general")
  a_sub, b_sub, k_sub = k.subscripts()
  x_sub = [c for c in string.ascii_uppercase if c not in ("R", ADAPTER)][:x.ndim]
  for xi, ki in (*zip(xc, kc), *zip(xb, kb)):
    x_sub[xi] = k_sub[ki]
  x_sub = "".join(x_sub)
  a_sub, b_sub = (s.replace(ADAPTER, x_sub[0]) for s in (a_sub, b_sub))  # a mixed batch: per example
  g_units = b_sub.replace("R", "")
  batch = "".join(k_sub[i] for i in kb)
  x_free = "".join(c for i, c in enumerate(x_sub) if i not in xc and i not in xb)
  k_free = "".join(c for i, c in enumerate(k_sub) if i not in kc and i not in kb)
  out_sub = batch + (x_free + k_free if side else k_free + x_free)
  if k.g is not None and not set(g_units) <= set(out_sub):
    return fallback_rule(eqn, invals, ctx, "dot_general contracting a DoRA kernel's output axes")
  (f, f_sub), (g, g_sub) = ((k.b, b_sub), (k.a, a_sub)) if contracted == {"b"} else ((k.a, a_sub), (k.b, b_sub))
  spec = f"{x_sub},{f_sub},{g_sub}->{out_sub}"
  sizes = {**dict(zip(x_sub, x.shape)), **dict(zip(f_sub, f.shape)), **dict(zip(g_sub, g.shape))}
  reason = ctx.cheaper_merged(k, _einsum_flops(f"{x_sub},{k_sub}->{out_sub}", sizes),
                              sum(_einsum_flops(s, sizes) for s in _two_steps(spec)), "dot_general")
  if reason:
    return fallback_rule(eqn, invals, ctx, reason)
  key = ctx.dropout_key(x, k)
  branch = _two_step(spec, x, f, g, k, ctx, key,
                     precision=eqn.params.get("precision"),
                     preferred_element_type=eqn.params.get("preferred_element_type"),
                     out_sharding=eqn.params.get("out_sharding"))
  if k.g is None:
    return [base + branch.astype(base.dtype)]
  use = lambda u, v: bind(eqn, [u, v] if side else [v, u])[0]
  g_axes = tuple(out_sub.index(c) for c in g_units)
  return [dora_output(k, ctx, x, key, base, branch, use,
                      lambda y: times_along(y, jnp.squeeze(k.g, k.rank_axis), g_axes))]


def per_example(k: LoraKernel, x: jax.Array, free: bool, ctx: Context, what: str) -> LoraKernel:
  """A mixed batch's kernel at a use whose activation ``x`` (the operand that is not the kernel)
  carries the batch on its leading axis: ``k`` with each example's factors (`LoraKernel.per_example`).

  The rule: the batch of a mixed batch is axis 0 of the activation entering each use, which must be
  a free axis of the use (``free``: not contracted with the kernel, not a dot batch axis) of size
  ``len(adapter_ids)``; checked at trace time.

  Raises:
    ValueError: the activation has no such axis (a model that flattens batch and sequence into one
      axis, a use inside ``vmap`` over the batch of a model whose activation lost it), naming the
      kernel and ``what``.
  """
  n = k.ids.shape[0]
  if x.ndim == 0 or not free or x.shape[0] != n:
    raise ctx.refuse(k, what, f"in a mixed batch each use's activation must carry the batch on its leading, "
                     f"uncontracted axis, of size len(adapter_ids) = {n}, but it has shape {tuple(x.shape)}"
                     + ("" if free else " and its axis 0 meets the kernel")
                     + " (a model that flattens batch and sequence into one axis, or moves the batch, cannot "
                     "say which example a row belongs to)")
  return k.per_example()


def _two_step(spec: str, x: jax.Array, f: jax.Array, g: jax.Array, k: LoraKernel, ctx: Context,
              key: jax.Array | None, **dot: Any) -> jax.Array:
  """``scale · einsum(spec, dropout(x), f, g)`` as ``(dropout(x)·f)·g`` in the branch dtype,
  ``key`` the use's dropout key (`Context.dropout_key`; None: no dropout).

  The intermediate keeps only the letters of ``x`` and ``f`` that the output or ``g`` needs.
  ``dot`` holds the use's ``precision``, ``preferred_element_type`` (kept where it widens the
  branch dtype) and ``out_sharding`` (for the second product, shaped like the output).
  """
  first, second = _two_steps(spec)
  dtype = ctx.dtype(k)
  pet = _widening(dot.get("preferred_element_type"), dtype)
  t = dropout_einsum(first, x.astype(dtype), f.astype(dtype), key, ctx.rate,
                     precision=dot.get("precision"), preferred_element_type=pet)
  return jnp.einsum(second, t * jnp.asarray(k.scale, t.dtype), g.astype(t.dtype),
                    precision=dot.get("precision"), preferred_element_type=pet,
                    out_sharding=dot.get("out_sharding"))


def _two_steps(spec: str) -> tuple[str, str]:
  """``"x,f,g->out"`` as its two products, ``"x,f->t"`` and ``"t,g->out"``: the intermediate
  ``t`` keeps only the letters of ``x`` and ``f`` that the output or ``g`` needs."""
  ins, out = spec.split("->")
  x_sub, f_sub, g_sub = ins.split(",")
  t_sub = "".join(dict.fromkeys(c for c in x_sub + f_sub if c in out + g_sub))
  return f"{x_sub},{f_sub}->{t_sub}", f"{t_sub},{g_sub}->{out}"


def _einsum_flops(spec: str, sizes: dict[str, int]) -> int:
  """The FLOPs of a two-operand einsum: 2 × the product of the sizes of all its distinct letters."""
  return 2 * math.prod(sizes[c] for c in set(spec) - set(",->"))


def _widening(preferred: Any, dtype: Any) -> Any:
  """The use's ``preferred_element_type`` where it is wider than the branch dtype, else None."""
  return preferred if preferred is not None and jnp.finfo(preferred).bits > jnp.finfo(dtype).bits else None


def _ragged_dot_walk(eqn: jex.core.JaxprEqn, ins: list[Tracked | None], walk: Walk) -> None:
  """The expert (group) and batch axes are stacked, the contracted input, the rest output."""
  i, x = first_tracked(ins)
  if i == 1:
    dn = eqn.params["ragged_dot_dimension_numbers"]
    (_, rc), (_, rb) = dn.dot_dimension_numbers
    walk.note(x, lambda q: "stack" if q in (*rb, *dn.rhs_group_dimensions) else "input" if q in rc else "output",
              "ragged_dot")


@rule("ragged_dot_general", kind="use", walk=_ragged_dot_walk)
def _ragged_dot_rule(eqn: jex.core.JaxprEqn, invals: list[Any], ctx: Context) -> list[Any]:
  """``ragged_dot(x, W, groups) + s · ragged_dot(ragged_dot(dropout(x), Fᵀ, groups), G, groups)``.

  The canonical mixture-of-experts form: ``x [m, k]`` rows grouped by expert, ``W [E, k, n]``
  with the expert axis stacked; ``F`` owns ``k`` (``a`` for ``"sio"``, ``b`` for ``"soi"``).
  """
  x, k, groups = invals
  dn = eqn.params["ragged_dot_dimension_numbers"]
  if isinstance(k, LoraKernel) and k.ids is not None and ctx.adapts(k, "matmul"):
    raise ctx.refuse(k, "ragged_dot_general", "mixture-of-experts routing groups the rows of every example "
                     "together, so the example (the adapter) of a row is not known at this use")
  if (isinstance(x, LoraKernel) or isinstance(groups, LoraKernel) or not isinstance(k, LoraKernel)
      or not ctx.adapts(k, "matmul")):
    if isinstance(k, LoraKernel) and not ctx.adapts(k, "matmul"):
      return bind(eqn, [x, k.w, groups])
    return fallback_rule(eqn, invals, ctx)
  canonical = (dn.dot_dimension_numbers == (((1,), (1,)), ((), ())) and tuple(dn.lhs_ragged_dimensions) == (0,)
               and tuple(dn.rhs_group_dimensions) == (0,) and x.ndim == 2 and k.w.ndim == 3)
  if not canonical or k.labels[0][0] != "s" or {k.labels[1][0], k.labels[2][0]} != {"a", "b"}:
    return fallback_rule(eqn, invals, ctx, "ragged_dot of a non-canonical expert kernel")
  if k.g is not None:
    return fallback_rule(eqn, invals, ctx, "ragged_dot of a DoRA kernel")
  f, g = (k.a, k.b) if k.labels[1][0] == "a" else (k.b, k.a)
  (m, d_in), (d_out, r) = x.shape, (g.shape[2], g.shape[1])
  reason = ctx.cheaper_merged(k, 2 * m * d_in * d_out, 2 * m * r * (d_in + d_out), "ragged_dot_general")
  if reason:
    return fallback_rule(eqn, invals, ctx, reason)
  base = bind(eqn, [x, k.w, groups])[0]
  dtype = ctx.dtype(k)
  pet = _widening(eqn.params.get("preferred_element_type"), dtype)
  dot = dict(precision=eqn.params.get("precision"), preferred_element_type=pet,
             group_offset=eqn.params.get("group_offset"))
  t = dropout_bilinear(lambda u, v: lax.ragged_dot(u, v, groups, **dot), x.astype(dtype),
                       jnp.swapaxes(f, 1, 2).astype(dtype), ctx.dropout_key(x, k), ctx.rate)
  branch = lax.ragged_dot(t * jnp.asarray(k.scale, t.dtype), g.astype(t.dtype), groups, **dot)
  return [base + branch.astype(base.dtype)]


def _conv_walk(eqn: jex.core.JaxprEqn, ins: list[Tracked | None], walk: Walk) -> None:
  """The output-feature axis is output, the others input."""
  i, x = first_tracked(ins)
  if i == 1:
    out_feature = eqn.params["dimension_numbers"].rhs_spec[0]
    walk.note(x, lambda q: "output" if q == out_feature else "input", "conv")


@rule("conv_general_dilated", kind="use", walk=_conv_walk)
def _conv_rule(eqn: jex.core.JaxprEqn, invals: list[Any], ctx: Context) -> list[Any]:
  """``conv(x, W) + s · conv_G(dropout(x), [A; …; A]) ·_group B``, grouped or not.

  The kernel is ``W [window…, C/G, O]`` (in its own dimension order), ``G`` the
  ``feature_group_count`` (1: a plain conv; ``C``: depthwise), output feature ``o`` in group
  ``g(o) = o // (O/G)``, reading input channels ``g·C/G + c``. With ``ΔW[w, c, o] = s · Σ_r
  A[r, w, c] · B[r, o]`` (``a`` is ``[r, window…, C/G]``, shared by all groups; ``b`` is ``[r, O]``),
  the update's output at position ``p`` is

      Σ_{w,c} x[p+w, g(o)·C/G + c] · ΔW[w, c, o] = s · Σ_r B[r, o] · T[p, g(o), r],
      T[p, g, r] = Σ_{w,c} x[p+w, g·C/G + c] · A[r, w, c],

  and ``T`` is the same grouped conv (strides, dilations, padding, ``G``) of ``x`` with ``A``
  repeated once per group (``G·r`` output channels, group ``g``'s being ``A``); then each group's
  ``r`` channels meet that group's columns of ``B`` (``[r, G, O/G]``). Exact, and for ``G = 1``
  the plain ``A`` conv into ``r`` channels and a 1×1 conv ``B``. FLOPs per output position:
  ``2·r·(window·C + O)`` against the use's ``2·O·window·C/G``, so a depthwise conv is usually
  cheaper merged (`Context.cheaper_merged` decides, and reports it).
  """
  x, k = invals
  dn = eqn.params["dimension_numbers"]
  out_feature = dn.rhs_spec[0]
  if isinstance(k, LoraKernel) and not isinstance(x, LoraKernel) and not ctx.adapts(k, "conv"):
    return bind(eqn, [x, k.w])
  if isinstance(k, LoraKernel) and k.ids is not None:
    raise ctx.refuse(k, "conv_general_dilated", "mixed batches have a per-example rule for dot_general only")
  if (isinstance(x, LoraKernel) or not isinstance(k, LoraKernel) or k.n_stack
      or k.labels[out_feature] != ("b", 0) or k.b.ndim != 2 or eqn.params["batch_group_count"] != 1):
    return fallback_rule(eqn, invals, ctx)
  groups, (r, out) = eqn.params["feature_group_count"], k.b.shape
  positions, window = math.prod(eqn.outvars[0].aval.shape) // out, k.w.size // out
  reason = ctx.cheaper_merged(k, 2 * positions * out * window, 2 * positions * r * (groups * window + out),
                              "conv_general_dilated")
  if reason:
    return fallback_rule(eqn, invals, ctx, reason)
  base = bind(eqn, [x, k.w])[0]
  dtype = ctx.dtype(k)
  key = ctx.dropout_key(x, k)
  # `a` laid out as the kernel, with r in place of the output features, once per group.
  perm = [0 if j == out_feature else 1 + k.labels[j][1] for j in range(k.w.ndim)]
  a = jnp.concatenate([k.a.astype(dtype).transpose(perm)] * groups, axis=out_feature)
  t = dropout_bilinear(lambda u, v: bind(eqn, [u, v], preferred_element_type=None)[0], x.astype(dtype), a, key,
                       ctx.rate)
  t = jnp.moveaxis(t * jnp.asarray(k.scale, t.dtype), dn.out_spec[1], -1)
  t = jnp.einsum("...gr,rgo->...go", t.reshape(*t.shape[:-1], groups, r),
                 k.b.astype(t.dtype).reshape(r, groups, out // groups))
  branch = jnp.moveaxis(t.reshape(*t.shape[:-2], out), -1, dn.out_spec[1])
  if k.g is None:
    return [base + branch.astype(base.dtype)]
  return [dora_output(k, ctx, x, key, base, branch, lambda u, v: bind(eqn, [u, v])[0],
                      lambda y: times_along(y, k.g[0], (dn.out_spec[1],)))]


def _gather_walk(eqn: jex.core.JaxprEqn, ins: list[Tracked | None], walk: Walk) -> None:
  """The indexed axes are input, the gathered features output."""
  i, x = first_tracked(ins)
  if i == 0:
    sizes, shape = eqn.params["slice_sizes"], eqn.invars[0].aval.shape
    walk.note(x, lambda q: "output" if sizes[q] == shape[q] and shape[q] != 1 else "input", "gather")


@rule("gather", kind="use", walk=_gather_walk)
def _gather_rule(eqn: jex.core.JaxprEqn, invals: list[Any], ctx: Context) -> list[Any]:
  """An embedding lookup: ``W[ids] + s · F[ids] · G``, ``F`` the factor owning the indexed axes.

  ``F`` is ``a`` for a ``[vocab, features]`` table (``"io"``) and ``b`` for ``"oi"``. The table
  may be stored either way round and gathered along either axis (``table[ids]``,
  ``jnp.take(table, ids, axis=1)``, ``table[:, ids]``, penzai's lookup of an ``[embedding,
  vocabulary]`` view, which keeps the vocabulary axis as a size-1 axis of the slice): the rows are
  every axis but the one feature axis taken whole, each sliced to size 1, collapsed or kept.
  """
  k, ids = invals
  if isinstance(k, LoraKernel) and not isinstance(ids, LoraKernel) and not ctx.adapts(k, "lookup"):
    return bind(eqn, [k.w, ids])
  if isinstance(k, LoraKernel) and k.ids is not None:
    raise ctx.refuse(k, "gather", "mixed batches have a per-example rule for dot_general only (an embedding "
                     "lookup's adapter is not supported in a mixed batch)")
  dn = eqn.params["dimension_numbers"]
  slice_sizes = tuple(eqn.params["slice_sizes"])
  sides = {l[0] for l in k.labels} if isinstance(k, LoraKernel) else set()
  feature_axes = [j for j, n in enumerate(slice_sizes) if isinstance(k, LoraKernel) and n == k.w.shape[j] and n != 1]
  if (isinstance(ids, LoraKernel) or sides != {"a", "b"} or len(feature_axes) != 1
      or getattr(dn, "operand_batching_dims", ())):
    return fallback_rule(eqn, invals, ctx)
  (feature,) = feature_axes
  g_side = k.labels[feature][0]
  rows = [j for j in range(k.w.ndim) if j != feature]
  if sum(1 for l in k.labels if l[0] == g_side) != 1 or any(slice_sizes[j] != 1 for j in rows):
    return fallback_rule(eqn, invals, ctx)
  if k.g is not None and g_side != "b":
    return fallback_rule(eqn, invals, ctx, "gather of DoRA rows (an [out, in] table)")
  out_size = math.prod(eqn.outvars[0].aval.shape)  # the kernel gradient here: a scatter-add, one add each
  reason = ctx.cheaper_merged(k, out_size, 2 * k.a.shape[0] * out_size, "gather")
  if reason:
    return fallback_rule(eqn, invals, ctx, reason)
  base = bind(eqn, [k.w, ids])[0]
  f, g = (k.a, k.b) if g_side == "b" else (k.b, k.a)
  dtype = ctx.dtype(k)
  # `f` laid out as the kernel, with r in place of the features; gather its rows.
  perm = [0 if j == feature else 1 + k.labels[j][1] for j in range(k.w.ndim)]
  sizes = tuple(f.shape[0] if j == feature else n for j, n in enumerate(slice_sizes))
  picked = bind(eqn, [f.astype(dtype).transpose(perm), ids], slice_sizes=sizes)[0]
  kept = [j for j in range(k.w.ndim) if j not in dn.collapsed_slice_dims]  # the slice's axes, in order
  out_axis = dn.offset_dims[kept.index(feature)]
  picked = jnp.moveaxis(picked * jnp.asarray(k.scale, dtype), out_axis, -1) @ g.astype(dtype)
  branch = jnp.moveaxis(picked, -1, out_axis)
  if k.g is None:
    return [base + branch.astype(base.dtype)]
  return [dora_output(k, ctx, ids, None, base, branch, None,
                      lambda y: times_along(y, k.g.reshape(-1), (out_axis,)))]

