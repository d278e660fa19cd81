"""Control-flow rules: the kernel followed into nested ``jit`` (inlined), functions with a custom
derivative (inlined where the kernel's use is linear), ``remat``/``checkpoint``, ``scan``, ``cond``,
``while`` and ``shard_map``, which are re-emitted through ``jax.checkpoint``, ``jax.lax`` and
``jax.shard_map``."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from lorax_jax.transform.core import Context, Tracked, Walk, as_array, bind, evaluate, fallback_rule
from lorax_jax.transform.kernels import LoraKernel, QuantizedKernel, dequantized, on_g
from lorax_jax.transform.quantized import slice_quantized
from lorax_jax.transform.registry import rule


def _jit_walk(eqn: jex.core.JaxprEqn, ins: list[Tracked | None], walk: Walk) -> list[Tracked | None]:
  return walk(eqn.params["jaxpr"].jaxpr, ins)


@rule("pjit", "jit", "closed_call", "core_call", kind="nested", walk=_jit_walk)
def _jit_rule(eqn: jex.core.JaxprEqn, invals: list[Any], ctx: Context) -> list[Any]:
  """A nested ``jit``: evaluated inline (the outer trace compiles it as one program), under its
  name in the name stack (``jit(f)``, as JAX lowers a nested ``jit``)."""
  closed = eqn.params["jaxpr"]
  name = eqn.params.get("name")
  with jax.named_scope(f"jit({name})") if name else contextlib.nullcontext():
    return evaluate(closed.jaxpr, closed.consts, invals, ctx)


def _custom_walk(eqn: jex.core.JaxprEqn, ins: list[Tracked | None], walk: Walk) -> list[Tracked | None]:
  return walk(eqn.params["call_jaxpr"].jaxpr, ins)


@rule("custom_jvp_call", "custom_vjp_call", kind="nested", walk=_custom_walk)
def _custom_derivative_rule(eqn: jex.core.JaxprEqn, invals: list[Any], ctx: Context) -> list[Any]:
  """A function with a custom derivative (``jax.custom_jvp``, ``jax.custom_vjp``) that a kernel is
  passed to: its primal body evaluated inline through the engine (factored) where the body uses
  every kernel only through rules the engine factors; else the call on the merged kernels.

  The factored call is ``f(x, W')`` computed without ``W'``, and JAX differentiates that factored
  body: the user's rule is not called at this call. The rule was written for ``(x, W)``, not for
  the factors; keeping it would mean evaluating it at ``W'`` and contracting its kernel-sized
  cotangent ``∂L/∂W'`` into ``∂L/∂a = s · ∂L/∂W' · bᵀ`` and ``∂L/∂b = s · aᵀ · ∂L/∂W'`` every
  step, the merged step's cost. Where the rule is the body's derivative (a numerically stable or
  memory-saving formulation, the usual reason to write one) gradients are the merged reference's
  within float rounding; a rule that is deliberately not the derivative (gradient clipping, a
  straight-through estimator) is not applied to this call, whose gradients are then the body's
  true derivative, ``x``'s included. A warning names each such call, so this is never silent.

  A body that takes anything but a factored use of a kernel (``sin(W)``, a narrow cast, a
  primitive without a rule) is tried quietly first; the call is then bound again on the merged
  kernels, the user's rule kept, and each kernel reported as ``custom_jvp_call <name> (...)``
  with what the body does to it. A call without a `LoraKernel` operand is bound as it is.
  """
  if not any(isinstance(x, LoraKernel) for x in invals):
    return bind(eqn, invals)
  closed = eqn.params["call_jaxpr"]
  trial = dataclasses.replace(ctx, strict=False, quiet=True, fallbacks=set())
  outs = evaluate(closed.jaxpr, closed.consts, invals, trial)
  name = f"{eqn.primitive.name} {closed.jaxpr.debug_info.func_name}"
  if not trial.fallbacks:
    if not ctx.quiet:
      warnings.warn(f"lorax_jax: {name} is factored, and JAX differentiates its body: its custom rule is not "
                    "applied there (the LoRA gradients are exact when the rule is the body's derivative)", stacklevel=2)
    return outs
  inside = ", ".join(sorted({what for _, what in trial.fallbacks}))
  return fallback_rule(eqn, invals, ctx, f"{name} (its body applies {inside} to a kernel)")


def _remat_walk(eqn: jex.core.JaxprEqn, ins: list[Tracked | None], walk: Walk) -> list[Tracked | None]:
  return walk(eqn.params["jaxpr"], ins)


@rule("remat2", "checkpoint", kind="nested", walk=_remat_walk)
def _remat_rule(eqn: jex.core.JaxprEqn, invals: list[Any], ctx: Context) -> list[Any]:
  """``jax.checkpoint`` re-emitted with the same policy, the factors saved like the kernel."""
  jaxpr = eqn.params["jaxpr"]
  body = jax.checkpoint(lambda *args: evaluate(jaxpr, (), args, ctx),
                        prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"])
  return body(*invals)


def _scan_walk(eqn: jex.core.JaxprEqn, ins: list[Tracked | None], walk: Walk) -> None:
  """The scanned axis of a kernel is stacked; the body sees the kernel without it."""
  p = eqn.params
  k = p["num_consts"] + p["num_carry"]
  for x in ins[k:]:
    if x is not None:
      for j in x[1][0]:
        walk.roles[x[0]].setdefault(j, {})["scan"] = "stack"
  walk(p["jaxpr"].jaxpr, [x if q < k or x is None else (x[0], x[1][1:]) for q, x in enumerate(ins)])


@rule("scan", kind="nested", walk=_scan_walk)
def _scan_rule(eqn: jex.core.JaxprEqn, invals: list[Any], ctx: Context) -> list[Any]:
  """``lax.scan`` re-emitted; a stacked kernel is sliced with its factors, per iteration. A kernel
  among the loop's constants is costed over all ``length`` iterations (`Context.loop_invariants`):
  merged once before the loop (reported) or kept factored in the body."""
  p = eqn.params
  n_carry = p["num_carry"]
  consts, init, xs = _cut(invals, p["num_consts"], n_carry)
  init = [as_array(x, ctx, "a scan carry") for x in init]
  sliced = [_slice_leading(x) if isinstance(x, LoraKernel) else slice_quantized(x)
            if isinstance(x, QuantizedKernel) else (x, None) for x in xs]
  closed = p["jaxpr"]
  steps = (jnp.arange(p["length"]), [x for x, _ in sliced])

  def scan(consts: list[Any], ctx: Context) -> tuple[list[Any], list[Any]]:
    def body(carry, step):
      i, x_leaves = step
      xs_now = [rebuild(x) if rebuild else x for x, (_, rebuild) in zip(x_leaves, sliced)]
      outs = evaluate(closed.jaxpr, closed.consts, [*consts, *carry, *xs_now], ctx.fold(i))
      outs = [as_array(x, ctx, "a scan output") for x in outs]
      return outs[:n_carry], outs[n_carry:]
    return lax.scan(body, init, steps, length=p["length"], reverse=p["reverse"], unroll=p["unroll"])

  carry, ys = scan(*ctx.loop_invariants(consts, p["length"], scan))
  return [*carry, *ys]


def _slice_leading(k: LoraKernel) -> tuple[dict[str, Any], Callable[[dict[str, Any]], LoraKernel]]:
  """What scan slices for a kernel scanned over its axis 0, and how to rebuild the slice.

  A stack axis slices ``w``, ``a`` and ``b``; an ``a`` (``b``) axis slices ``w`` and ``a``
  (``b``), and the other factor is closed over.
  """
  side, i = k.labels[0]
  axis = k.factor_axis((side, i))
  w, rebuild_w = slice_quantized(k.w) if isinstance(k.w, QuantizedKernel) else (k.w, None)
  leaves = {"w": w,
            "a": jnp.moveaxis(k.a, axis, 0) if side in "sa" else None,
            "b": jnp.moveaxis(k.b, axis, 0) if side in "sb" else None,
            "g": on_g(k, lambda g: jnp.moveaxis(g, axis, 0)) if side in "sb" else None}
  labels = tuple((s, n - 1) if s == side and n > i else (s, n) for s, n in k.labels[1:])

  def rebuild(x: dict[str, Any]) -> LoraKernel:
    return dataclasses.replace(k, w=rebuild_w(x["w"]) if rebuild_w else x["w"], labels=labels,
                               a=k.a if x["a"] is None else x["a"],
                               b=k.b if x["b"] is None else x["b"],
                               g=k.g if x["g"] is None else x["g"])
  return leaves, rebuild


def _cond_walk(eqn: jex.core.JaxprEqn, ins: list[Tracked | None], walk: Walk) -> None:
  for branch in eqn.params["branches"]:
    walk(branch.jaxpr, ins[1:])


@rule("cond", kind="nested", walk=_cond_walk)
def _cond_rule(eqn: jex.core.JaxprEqn, invals: list[Any], ctx: Context) -> list[Any]:
  """``lax.switch`` re-emitted; a kernel leaving a branch is merged."""
  index, *ops = invals
  index = as_array(index, ctx, "a cond index")

  def branch(closed):
    def run(*args):
      outs = evaluate(closed.jaxpr, closed.consts, args, ctx)
      return [as_array(x, ctx, "a cond output") for x in outs]
    return run
  return list(lax.switch(index, [branch(c) for c in eqn.params["branches"]], *ops))


def _while_walk(eqn: jex.core.JaxprEqn, ins: list[Tracked | None], walk: Walk) -> None:
  walk(eqn.params["body_jaxpr"].jaxpr, ins[eqn.params["cond_nconsts"]:])


@rule("while", kind="nested", walk=_while_walk)
def _while_rule(eqn: jex.core.JaxprEqn, invals: list[Any], ctx: Context) -> list[Any]:
  """``lax.while_loop`` re-emitted, with an iteration counter for dropout keys."""
  p = eqn.params
  cond_consts, body_consts, init = _cut(invals, p["cond_nconsts"], p["body_nconsts"])
  init = [as_array(x, ctx, "a while carry") for x in init]
  cond, body = p["cond_jaxpr"], p["body_jaxpr"]

  def cond_fn(state):
    _, carry = state
    return evaluate(cond.jaxpr, cond.consts, [*cond_consts, *carry], ctx)[0]

  def body_fn(state):
    i, carry = state
    outs = evaluate(body.jaxpr, body.consts, [*body_consts, *carry], ctx.fold(i))
    return i + 1, [as_array(x, ctx, "a while carry") for x in outs]
  return lax.while_loop(cond_fn, body_fn, (jnp.asarray(0, jnp.int32), init))[1]


def _cut(xs: list[Any], *sizes: int) -> list[list[Any]]:
  """``xs`` cut into consecutive pieces of ``sizes``, then the rest (a loop's operands)."""
  pieces, start = [], 0
  for n in sizes:
    pieces.append(xs[start:start + n])
    start += n
  return [*pieces, xs[start:]]


def _shard_map_walk(eqn: jex.core.JaxprEqn, ins: list[Tracked | None], walk: Walk) -> list[Tracked | None]:
  """The body sees each kernel's local block: the same axes, so the same roles."""
  return walk(eqn.params["jaxpr"], ins)


@rule("shard_map", kind="nested", walk=_shard_map_walk)
def _shard_map_rule(eqn: jex.core.JaxprEqn, invals: list[Any], ctx: Context) -> list[Any]:
  """``jax.shard_map`` re-emitted, a kernel entering with its factors sharded like it.

  A kernel on ``in_specs`` entry ``P(k_0, k_1, …)`` enters as its local block ``W_d`` with
  ``a_d`` (``a`` ``[s…, r, in…]`` split by the entries of the kernel's stack and input axes, the
  rank whole), ``b_d`` (by those of its stack and output axes) and DoRA's ``g_d`` (like ``b``).
  Slicing commutes with the outer product over a whole rank, ``(W + s·a⊗b)_d = W_d + s·a_d⊗b_d``,
  so the body evaluated by the engine on ``(W_d, a_d, b_d)`` computes what the model's body
  computes on the merged kernel's block, collectives included: a body that splits the contracted
  axis and ``psum``\\ s ``x_d·W_d`` sums the branch's partial products ``s·(x_d·a_d)·b`` in the
  same ``psum``, and a ``g`` computed from the whole kernel scales each output block. The outputs
  are the body's. Dropout keys are folded with the device's index over the manual axes (each
  device draws its own masks: the body sees local blocks, so an unsharded run's masks cannot be
  reproduced). A quantized kernel enters dequantized; a kernel leaving the body is merged there
  (reported); a mixed batch (``adapter_ids``) is refused: its per-example ids are global, the
  body's batch is a block of it.
  """
  p = eqn.params
  specs, leaves, rebuilds = [], [], []
  for x, spec in zip(invals, p["in_specs"]):
    if isinstance(x, LoraKernel) and x.ids is not None:
      raise ctx.refuse(x, "shard_map", "its adapter ids index the whole batch, the mapped body sees a block of it")
    if isinstance(x, LoraKernel):  # its leaves w, a, b (, g), in the order _factor_specs gives
      x = dataclasses.replace(x, w=dequantized(x.w))
      specs += _factor_specs(x, spec)
      leaves += jax.tree.leaves(x)
      rebuilds.append((len(jax.tree.leaves(x)), jax.tree.structure(x).unflatten))
    else:
      specs.append(spec)
      leaves.append(dequantized(x))
      rebuilds.append((1, lambda v: v[0]))
  keyed = ctx.rng is not None
  names = tuple(a for a in p["mesh"].axis_names if a in p["newly_manual_axes"])

  def body(*args):
    rng, args = (args[0], args[1:]) if keyed else (None, args)
    inner = dataclasses.replace(ctx, rng=rng).fold(lax.axis_index(names) if keyed else 0)
    vals, start = [], 0
    for n, rebuild in rebuilds:
      vals.append(rebuild(args[start:start + n]))
      start += n
    outs = evaluate(p["jaxpr"], (), vals, inner)
    return [as_array(x, inner, "a shard_map output") for x in outs]

  mapped = jax.shard_map(body, mesh=p["mesh"], in_specs=(*(PartitionSpec(),) * keyed, *specs),
                         out_specs=list(p["out_specs"]), axis_names=set(names), check_vma=p["check_vma"])
  return list(mapped(*([ctx.rng] if keyed else []), *leaves))


def _factor_specs(k: LoraKernel, spec: PartitionSpec) -> list[PartitionSpec]:
  """The specs of ``k``'s ``w``, ``a``, ``b`` (and ``g``) for the kernel's ``spec``: each factor
  axis gets the entry of the kernel axis it holds, the rank None."""
  a_sub, b_sub, k_sub = k.subscripts()
  entry = dict(zip(k_sub, (*spec, *(None,) * (len(k_sub) - len(spec)))))
  of = lambda sub: PartitionSpec(*(entry.get(c) for c in sub))
  return [spec, of(a_sub), of(b_sub), *([] if k.g is None else [of(b_sub)])]
