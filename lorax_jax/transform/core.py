"""The interpreter core: the evaluator and the axes walk, both driven by the one rule registry.

`evaluate` runs a jaxpr equation by equation: an equation with a `LoraKernel` operand runs its
primitive's `Rule.eval` (or is merged for that use, `fallback_rule`); anything else is bound again
(`bind`), a `QuantizedKernel` operand followed or dequantized there. Each equation is re-emitted in
its own source context (traceback and name stack), so the compiled program keeps the model's scope
names. `Walk` follows kernels' axes through a jaxpr by the same rules' `Rule.walk`.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.extend as jex
# The one use of JAX's source-info machinery, as `jax.core.eval_jaxpr` uses it: `jax.extend`
# re-exports `jax._src.source_info_util`.
from jax.extend import source_info_util

from lorax_jax.transform.kernels import LoraKernel, QuantizedKernel, dequantized, rebind
from lorax_jax.transform.quantized import quantized_use
from lorax_jax.transform.registry import NO_RULE, RULES

SHARED_KEY = 2**32 - 1  # folded into `rng` for `shared_dropout` keys; no target index reaches it


@dataclasses.dataclass
class LoopCosts:
  """What a loop's cost trial (`Context.loop_invariants`) records: for each use of a loop-invariant
  kernel, ``(its invariant numbers, use FLOPs, branch FLOPs, the primitive)``, the FLOPs over all
  ``trips`` iterations of the body being traced; and the kernels left to the per-use rule."""

  trips: int
  uses: list[tuple[tuple[int, ...], float, float, str]] = dataclasses.field(default_factory=list)
  undecided: set[int] = dataclasses.field(default_factory=set)


def _merge_flops(k: LoraKernel) -> int:
  """Forming ``W' = W + s · A ⊗ B`` and differentiating it to both factors: ``6 · r · |W|``."""
  return 6 * k.a.shape[k.rank_axis] * k.w.size


def _cost_reason(what: str, factored: float, merged: float) -> str | None:
  """The cost rule's verdict on a use (or a loop's uses) ``what``: the reason to merge, or None."""
  if merged >= factored:
    return None
  return f"{what}, merged: cheaper (factored {factored:.0f} FLOPs > merged {merged:.0f})"


@dataclasses.dataclass
class Context:
  """What one evaluation needs besides values: dropout key and rate, strictness, the report.

  A ``quiet`` context records its fallbacks in ``fallbacks`` without warning (a nested rule trying
  a body, which decides from them what to report). Inside a loop's cost trial ``trial`` collects
  the uses of its loop-invariant kernels; ``kept`` holds the loop-invariant kernels (their
  `LoraKernel.invariant` numbers, drawn from ``serial``) that enclosing loops keep factored.
  """

  rng: jax.Array | None
  rate: float
  strict: bool
  names: tuple[str, ...]
  fallbacks: set[tuple[str, str]]
  branch_dtype: str = "factors"
  shared_dropout: bool = False
  uses: dict[int, int] = dataclasses.field(default_factory=dict)
  inputs: dict[int, tuple[Any, int]] = dataclasses.field(default_factory=dict)
  producers: dict[Any, tuple[tuple[int, ...], Any]] = dataclasses.field(default_factory=dict)
  quiet: bool = False
  trial: LoopCosts | None = None
  kept: frozenset[int] = frozenset()
  serial: Iterator[int] = dataclasses.field(default_factory=itertools.count)

  def fold(self, i: jax.Array) -> Context:
    """The context for one iteration ``i`` of a loop: its own dropout keys."""
    rng = None if self.rng is None else jax.random.fold_in(self.rng, i)
    return dataclasses.replace(self, rng=rng, uses={}, inputs={})

  def adapts(self, k: LoraKernel, use: str) -> bool:
    """Whether ``k`` gets its branch at a ``use`` (``"lookup"``, ``"matmul"``, ``"conv"``)."""
    return k.uses is None or use in k.uses

  def dtype(self, k: LoraKernel) -> Any:
    """The branch's compute dtype (`LoraConfig.branch_dtype`)."""
    return k.a.dtype if self.branch_dtype == "factors" else k.w.dtype

  def dropout_key(self, x: jax.Array, k: LoraKernel) -> jax.Array | None:
    """The dropout key of this use of ``k`` on input ``x`` (None: no dropout): ``rng`` folded
    with the target and its use count (or, with ``shared_dropout``, the order in which this
    input tensor first met a branch). The mask itself is `lorax_jax.dropout`'s counter hash.

    Under ``jax.vmap`` over per-example keys the masks differ per example; a key shared by the
    whole batch gives every example the same mask.
    """
    if self.rng is None or self.rate == 0.0:
      return None
    if self.shared_dropout:
      _, n = self.inputs.setdefault(id(x), (x, len(self.inputs)))  # x kept alive: ids stay unique
      return jax.random.fold_in(jax.random.fold_in(self.rng, SHARED_KEY), n)
    use = self.uses.get(k.index, 0)
    self.uses[k.index] = use + 1
    return jax.random.fold_in(jax.random.fold_in(self.rng, k.index), use)

  def may_merge(self, k: LoraKernel) -> bool:
    """Whether the cost rule may merge ``k``: never with ``strict`` (every use factored), in a mixed
    batch (no one merged kernel), for a quantized kernel (merging would form its float copy, what
    QLoRA avoids), or while dropout is active (the merged kernel cannot drop out the branch's
    input)."""
    return not (self.strict or k.ids is not None or isinstance(k.w, QuantizedKernel)
                or (self.rng is not None and self.rate > 0.0))

  def cheaper_merged(self, k: LoraKernel, use_flops: float, branch_flops: float, what: str) -> str | None:
    """The cost rule: the reason to merge ``k`` for this use by ``what`` (the primitive) when a
    training step is cheaper so, else None. One formula for every use; each use rule supplies
    ``use_flops``, the FLOPs of the kernel's gradient at this use (for a product, ``dot_general``,
    a conv, ``ragged_dot``: the product's own FLOPs; for an embedding ``gather``: the scatter-add
    of the cotangent, one per output element), and ``branch_flops``, the FLOPs of the factored
    branch's forward (its products, two per use).

    A training step differentiates the factors (the frozen step, forward and backward to the
    activations, is the same either way). Factored, the branch runs forward, and backward to its
    input and to both factors, each about its forward's cost; merged, ``W' = W + s · A ⊗ B`` is
    formed (``2r·|W|``), the use's kernel gradient ``∂W'`` is computed, and ``∂A = s · ∂W'·Bᵀ``,
    ``∂B = s · Aᵀ·∂W'`` (``2r·|W|`` each)::

        factored = 3 · branch_flops
        merged   = use_flops + 6 · r · |W|          merge when merged < factored

    Elementwise work (the scale, adding the branch) is left out. A plain LoRA dot with ``M``
    rows and ``W [in, out]`` is merged when ``6·M·r·(in + out) > 2·M·in·out + 6·r·in·out``: with
    ``in = out = d`` about ``r > d / 6`` when ``M ≫ d``, never for small ``M``. Never merged where
    `may_merge` says so, nor in a ``quiet`` trial of a custom-derivative body (whose call is then
    factored or merged whole, as ``strict`` or not decides outside it).

    A use of a loop-invariant kernel (``k.invariant``, inside a ``scan``) is decided by its loop
    (`loop_invariants`): in the loop's trial it is recorded, not decided; in the body it stays
    factored when the loop kept it so.

    Args:
      k: the kernel at this use.
      use_flops: the FLOPs of the kernel's gradient at this use.
      branch_flops: the FLOPs of the factored branch's forward.
      what: the use's primitive, the start of the reason.

    Returns:
      ``"<what>, merged: cheaper (factored F FLOPs > merged M)"`` when merged is cheaper, else None.
    """
    if not self.may_merge(k):
      return None
    if k.invariant and self.trial is not None:
      self.trial.uses.append((k.invariant, self.trial.trips * use_flops, self.trial.trips * branch_flops, what))
      return None
    if self.quiet or (k.invariant and set(k.invariant) <= self.kept):
      return None
    return _cost_reason(what, 3 * branch_flops, use_flops + _merge_flops(k))

  def loop_invariants(self, consts: list[Any], length: int,
                      trace: Callable[[list[Any], Context], Any]) -> tuple[list[Any], Context]:
    """The cost rule for the kernels a loop of ``length`` iterations reads unchanged (its
    constants ``consts``): each merged once before the loop, or kept factored in its body.

    Per use, the rule would compare one iteration's branch with one iteration's use plus forming
    and differentiating ``W'``, but the branch is paid every iteration and a loop-invariant
    ``W'`` once. So ``trace(consts, ctx)`` traces the loop abstractly (`jax.eval_shape`) with the
    kernels numbered (`LoraKernel.invariant`) and each of their uses recorded, its FLOPs times the
    iterations (nested scans multiply; a ``while``'s unknown count is taken as one). Kernels that
    meet in a use (a concatenation of gate kernels) are decided together, a group ``G`` of them
    with uses ``U``::

        factored = Σ_U length · 3 · branch
        merged   = Σ_U length · use + Σ_G 6 · r · |W|        merge G before the loop when merged < factored

    the per-use formula (`cheaper_merged`) summed over the iterations, ``W'`` formed and
    differentiated once (each kernel at its own rank and size, not the concatenation's). A group
    merged is reported like any fallback (``"dot_general in a scan of length 5 (W' formed once,
    before it), merged: cheaper (...)"``) and enters the body as ``W'``; a group kept is factored
    at every use in the body. A kernel that the body merges at a use for another reason, or
    concatenates with one that is not loop-invariant, is left to the per-use rule, as are all of
    them where `may_merge` forbids merging, kernels adapted at some uses only (``target_uses``:
    ``W'`` would reach the others), an enclosing loop's trial (that loop decides) and a ``quiet``
    trial of a custom-derivative body.

    Args:
      consts: the loop's constant operands.
      length: its number of iterations.
      trace: traces the loop on constants and a context (its outputs are not used).

    Returns:
      ``consts`` with each loop-invariant kernel merged or marked, and the context for the body.
    """
    if self.trial is not None:
      return consts, dataclasses.replace(self, trial=dataclasses.replace(self.trial, trips=self.trial.trips * length))
    if self.quiet:  # a custom-derivative body's trial: its call is factored or merged whole
      return consts, self
    numbers = {j: next(self.serial) for j, x in enumerate(consts)
               if isinstance(x, LoraKernel) and x.uses is None and self.may_merge(x)
               and not (x.invariant and set(x.invariant) <= self.kept)}
    if not numbers:
      return consts, self
    marked = [dataclasses.replace(x, invariant=(numbers[j],)) if j in numbers else x for j, x in enumerate(consts)]
    trial = LoopCosts(length)
    trial_ctx = dataclasses.replace(self, quiet=True, fallbacks=set(), producers={}, trial=trial)
    jax.eval_shape(lambda: trace(marked, trial_ctx))
    kernel = {numbers[j]: marked[j] for j in numbers}
    group = {n: frozenset([n]) for n in kernel}
    for ns, *_ in trial.uses:
      if not set(ns) <= group.keys():  # with a kernel of another loop
        trial.undecided.update(n for n in ns if n in group)
        continue
      joined = frozenset().union(*(group[n] for n in ns))
      group.update(dict.fromkeys(joined, joined))
    merged: dict[int, str] = {}
    kept: set[int] = set()
    for g in set(group.values()):
      uses = [u for u in trial.uses if set(u[0]) <= g]
      if not uses or g & trial.undecided:
        continue
      what = ", ".join(sorted({u[3] for u in uses}))
      reason = _cost_reason(f"{what} in a scan of length {length} (W' formed once, before it)",
                            3 * sum(u[2] for u in uses),
                            sum(u[1] for u in uses) + sum(_merge_flops(kernel[n]) for n in g))
      if reason:
        merged.update(dict.fromkeys(g, reason))
      else:
        kept.update(g)
    out = [self.fallback(x, merged[numbers[j]]) if j in numbers and numbers[j] in merged
           else marked[j] if j in numbers and numbers[j] in kept else x for j, x in enumerate(consts)]
    return out, dataclasses.replace(self, kept=self.kept | kept)

  def joined(self, ks: Sequence[LoraKernel]) -> tuple[int, ...]:
    """The `LoraKernel.invariant` of a kernel built from ``ks`` (a concatenation): all of theirs
    when each is loop-invariant, else none (and, in a loop's trial, theirs left to the per-use rule)."""
    if all(x.invariant for x in ks):
      return tuple(sorted({n for x in ks for n in x.invariant}))
    if self.trial is not None:
      self.trial.undecided.update(n for x in ks for n in x.invariant)
    return ()

  def refuse(self, k: LoraKernel, what: str, why: str) -> ValueError:
    """The error for a mixed batch (``adapter_ids``) that cannot run ``k``'s use by ``what``."""
    return ValueError(f"lora_apply(adapter_ids=...): kernel {self.names[k.index]} reaches `{what}`: {why}. "
                      "Run this model one adapter at a time (a plain LoRA tree, no adapter_ids), or "
                      "leave this kernel out of the targets")

  def fallback(self, k: LoraKernel, what: str) -> jax.Array:
    """Merge ``k`` for one use by ``what``, and report it (or raise if strict). In a mixed batch
    there is no one merged kernel (each example has its own): an error naming the use."""
    if k.ids is not None:
      raise self.refuse(k, what, "a mixed batch has no merged kernel for it (each example has its own "
                        "adapter), and the engine has no per-example rule there")
    if self.trial is not None:  # merged at a use inside a loop's trial: the per-use rule decides it
      self.trial.undecided.update(k.invariant)
    name = self.names[k.index]
    if self.strict:
      raise NotImplementedError(
          f"lora_transform(strict=True): kernel {name} reaches `{what}`, which the factored engine "
          "does not handle; it would be merged for that use")
    if (name, what) not in self.fallbacks and not self.quiet:
      warnings.warn(f"lorax_jax: kernel {name} reaches `{what}`; merged W' for that use", stacklevel=2)
    self.fallbacks.add((name, what))
    return k.merged()


def evaluate(jaxpr: jex.core.Jaxpr, consts: Sequence[Any], args: Sequence[Any], ctx: Context) -> list[Any]:
  """``jaxpr``'s outputs on ``args`` (arrays, `LoraKernel`s, `QuantizedKernel`s), each equation by
  its primitive's rule in `RULES` and in its own source context."""
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jex.core.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    with source_context(eqn):
      outvals = _equation(eqn, [read(v) for v in eqn.invars], ctx)
    for v, x in zip(eqn.outvars, outvals):
      env[v] = x
  return [read(v) for v in jaxpr.outvars]


def _equation(eqn: jex.core.JaxprEqn, invals: list[Any], ctx: Context) -> list[Any]:
  """One equation's outputs (see `Rule`)."""
  rule = RULES.get(eqn.primitive.name, NO_RULE)
  if any(isinstance(x, LoraKernel) for x in invals):
    return (rule.eval or fallback_rule)(eqn, invals, ctx)
  if rule.kind == "nested" and any(isinstance(x, QuantizedKernel) for x in invals):
    return rule.eval(eqn, invals, ctx)
  outvals = bind(eqn, invals)
  if rule.observe is not None:
    rule.observe(eqn, invals, outvals, ctx)
  return outvals


def source_context(eqn: jex.core.JaxprEqn) -> Any:
  """The context in which ``eqn`` is re-emitted: its traceback, and its name stack under the
  current one (the model's module scopes, e.g. ``attn/q_proj``: the compiled program's op
  metadata), as `jax.core.eval_jaxpr` does. Rules run inside it, so the branch's operations carry
  the names of the use they adapt."""
  name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
  return source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack)


def bind(eqn: jex.core.JaxprEqn, invals: Sequence[Any], **params: Any) -> list[Any]:
  """``eqn``'s primitive on ``invals`` (with ``params`` overriding its own); a quantized kernel
  among them is followed or dequantized at this use (`quantized.quantized_use`)."""
  if any(isinstance(x, QuantizedKernel) for x in invals):
    return quantized_use(eqn, invals, params)
  return rebind(eqn, invals, **params)


def as_array(x: Any, ctx: Context, what: str) -> Any:
  """``x`` as a plain array: a `LoraKernel` merged for this use (reported as ``what``), a
  `QuantizedKernel` dequantized, anything else as is."""
  return ctx.fallback(x, what) if isinstance(x, LoraKernel) else dequantized(x)


def fallback_rule(eqn: jex.core.JaxprEqn, invals: list[Any], ctx: Context, what: str | None = None) -> list[Any]:
  """``eqn`` on the merged kernels (reported as ``what``, by default the primitive's name)."""
  return bind(eqn, [as_array(x, ctx, what or eqn.primitive.name) for x in invals])


# --- the axes walk ----------------------------------------------------------------------

AxisMap = tuple[frozenset[int], ...]  # for each axis of a value: the target kernel's axes it spans
Tracked = tuple[int, AxisMap]  # a value the walk follows: (target number, its AxisMap)


class Walk:
  """Follows `Tracked` values through jaxprs by the registry's `Rule.walk` rules, recording in
  ``roles[target][axis]`` the role (``"stack"``, ``"input"``, ``"output"``) each use gives each
  of a target's axes. A primitive without a walk rule ends the walk of its operands."""

  def __init__(self, roles: dict[int, dict[int, dict[str, str]]]):
    self.roles = roles

  def __call__(self, jaxpr: jex.core.Jaxpr, args: Sequence[Tracked | None]) -> list[Tracked | None]:
    """``jaxpr``'s outputs as `Tracked` values (None: not a kernel's), its inputs ``args``."""
    env: dict[Any, Any] = dict(zip(jaxpr.invars, args))
    read = lambda v: None if isinstance(v, jex.core.Literal) else env.get(v)
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      rule = RULES.get(eqn.primitive.name, NO_RULE)
      if rule.walk is None or all(x is None for x in ins):
        continue
      for v, x in zip(eqn.outvars, rule.walk(eqn, ins, self) or ()):
        env[v] = x
    return [read(v) for v in jaxpr.outvars]

  def note(self, x: Tracked, role_of: Callable[[int], str | None], use: str) -> None:
    """Record, for each axis ``q`` of the value ``x``, the role ``role_of(q)`` at ``use``."""
    n, axes = x
    for pos, originals in enumerate(axes):
      role = role_of(pos)
      for j in originals if role else ():
        self.roles[n].setdefault(j, {})[f"{use} #{len(self.roles[n].get(j, {}))}"] = role


def first_tracked(ins: Sequence[Tracked | None]) -> tuple[int, Tracked]:
  """The position and value of the first tracked operand."""
  return next((i, x) for i, x in enumerate(ins) if x is not None)
