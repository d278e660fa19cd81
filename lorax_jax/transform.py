"""`lora_transform`: the factored LoRA engine, the whole story in one file.

``lora_transform(apply_fn, params, cfg)`` returns ``lora_apply(params, lora, *args, rng=None,
**kwargs)``, which computes ``apply_fn(params, *args, **kwargs)`` as if every targeted
kernel were ``W' = W + s · A ⊗ B``, without ever forming ``W'``:

1. Trace ``apply_fn`` to a jaxpr, inside a ``jax.jit`` cached per argument structure
   (Python scalars among the arguments are static).
2. Evaluate the jaxpr equation by equation. A targeted kernel enters as a `LoraKernel`:
   the frozen ``w`` with its factors ``a``, ``b`` and a record of which of the kernel's
   current axes belong to ``a`` (input), to ``b`` (output) or to both (stacked layers, experts);
   the layout is the target's ``kernel_axes`` (`axes_from_use` reads it off the uses).
   The jaxpr's inputs are the array leaves only; call-time params must have the tree, shapes and
   dtypes the transform was built for.
3. Followed on the factors (lazily where possible): float casts of >= 16 bits (any other cast is
   merged for that use), transposes, reshapes, ``slice``/``dynamic_slice``, ``split`` (a fused
   QKV or gate-up kernel: each piece carries its slice of the factor owning the split axis),
   ``concatenate`` of kernels (``nn.OptimizedLSTMCell``: one kernel with factors block-diagonal
   over the summed rank), ``neg`` (the scale negated), ``mul``/``div`` by a scalar or an array
   varying along one side's axes (muP, per-channel gains: that side's factor scaled, as
   `merge` would).
4. Where the kernel is consumed, the low-rank branch is added, in the factors' dtype by default
   (``LoraConfig.branch_dtype``), honouring the use's ``precision``, ``preferred_element_type``
   and ``out_sharding``:
   ``dot_general(x, W) + s · (dropout(x) · F) · G`` where ``F`` is the factor owning the kernel
   axes ``x`` contracts (``a`` for ``x @ W``, ``b`` for a tied LM head ``h @ E.T`` or ``x @ W.T``
   with ``W`` stored ``[out, in]``), so no intermediate is larger than ``x``'s free axes times
   ``r``; a dot contracting axes of both factors is merged for that use. ``ragged_dot`` with an
   expert stack ``[E, in, out]``: two ragged dots with the same group sizes. For
   ``conv_general_dilated`` ``A`` is a conv with the layer's window into ``r`` channels and
   ``B`` a 1×1 conv; for an embedding ``gather`` the rows of the factor owning the indexed
   axes are gathered, then multiplied by the other. A target limited by
   ``LoraConfig.target_uses`` gets no branch at its other uses (PEFT's tied embedding).
   DoRA (``LoraConfig.use_dora``) is a per-output scale on the same uses: ``g ⊙ (x·W + branch)``
   with ``g = m / ‖W + s · A ⊗ B‖`` computed once per call from ``A·W`` and ``A·Aᵀ``
   (`_dora_scale`); a use contracting the output axes (a tied head), a ``ragged_dot``, an
   ``[out, in]`` embedding lookup or a concatenation is merged for that use.
5. Nested ``jit`` is inlined; ``remat``/``checkpoint`` (its policy kept), ``scan`` (stacked
   kernels are sliced with their factors), ``cond`` and ``while`` are re-emitted through
   ``jax.checkpoint`` and ``jax.lax``, so outer ``jit``, ``grad``, ``vmap`` and shardings compose.
6. A kernel that reaches any other operation is merged for that use only
   (``W + s · A ⊗ B``), and listed in ``lora_apply.fallbacks``; ``strict=True`` raises instead.
7. A quantized kernel (a `lorax_jax.QArray` leaf, targeted or not) is traced as its
   float array and enters as a `QuantizedKernel`: its layout equations (casts, transposes,
   reshapes, slices, splits) are recorded, not run, and at each use it is dequantized inside a
   custom VJP that dequantizes it again in the backward pass, so no float copy of it is a
   residual (QLoRA: ``y = x·deq(Q) + s·(x·A)·B``). An embedding lookup of a table blocked along
   its features gathers the rows' blocks and dequantizes only those (and a product with a
   table over 4 MiB in float along its rows, the tied head, runs over chunks of its rows); scan slices the stored
   blocks of a stacked kernel.

The compiled programs are cached per argument structure and the type and value of each static
(non-array) argument, the least recently used of more than `CACHE_SIZE` evicted.

Dropout is applied to the branch input ``x`` with a key folded from ``rng``, the
target's index, its use and, inside loops, the iteration (with ``shared_dropout``: one key per
distinct input tensor, shared by the targets reading it). ``rng=None`` uses
``jax.random.key(cfg.dropout_seed)`` when ``cfg.dropout_seed`` is set, else no dropout (with a
one-time warning when ``cfg.dropout > 0``). Under ``jax.vmap`` a key shared by the batch gives
every example the same mask; to draw one mask per example, vmap over per-example keys
(``jax.vmap(lambda x, k: apply(params, lora, x, rng=k))(xs, jax.random.split(key, n))``).

`axes_from_use` traces a model abstractly and fills ``kernel_axes`` from each target's uses.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
import string
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
from jax import lax

from lorax_jax.config import LoraConfig
from lorax_jax.dropout import check_key, dropout_bilinear, dropout_einsum, keep_mask
from lorax_jax.lora_tree import SAVED_KEY, Lora, check_factors, check_saved
from lorax_jax.merge import merge
from lorax_jax.paths import get_path, matches, path_str
from lorax_jax.qarray import QArray, is_quantized, leaves_with_paths
from lorax_jax.targets import Target, accumulation_dtype, find_targets, low_rank_update, saved_leaves

# Each axis of a kernel in flight is labelled ``(side, i)`` by where the factors hold it:
#   ("s", i): stack axis i, shared by a and b (axis i of both);
#   ("a", i): a's own axis i after the rank (an input axis: "i" in `Target.axes`);
#   ("b", i): b's own axis i after the rank (an output axis: "o" in `Target.axes`).
Label = tuple[str, int]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraKernel:
  """A targeted kernel in flight: ``w`` as the model sees it now, plus its factors.

  ``a`` has axes ``(stack..., r, a-axes...)`` and ``b`` ``(stack..., r, b-axes...)``; the
  kernel's current axis ``j`` is ``labels[j]``. The update is ``scale · Σ_r a ⊗ b``. Rules reach
  the frozen weight only as ``w``; ``uses`` is the target's `LoraConfig.target_uses` (None: all).
  A DoRA kernel also carries ``g = m / ‖W + s · a ⊗ b‖`` (`_dora_scale`), laid out like ``b`` with a
  rank of 1, and is ``g ⊙ (w + scale · Σ_r a ⊗ b)``: rules move ``g`` wherever they move ``b``.
  """

  w: jax.Array | QuantizedKernel
  a: jax.Array
  b: jax.Array
  labels: tuple[Label, ...] = dataclasses.field(metadata=dict(static=True))
  index: int = dataclasses.field(metadata=dict(static=True))
  scale: float = dataclasses.field(metadata=dict(static=True))
  uses: tuple[str, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))
  g: jax.Array | None = None

  @property
  def n_stack(self) -> int:
    return sum(1 for side, _ in self.labels if side == "s")

  def subscripts(self) -> tuple[str, str, str]:
    """einsum subscripts of ``a``, ``b`` and the kernel (``r`` is ``"R"``)."""
    kernel = string.ascii_lowercase[: len(self.labels)]
    where = {label: kernel[j] for j, label in enumerate(self.labels)}
    stack = "".join(where["s", i] for i in range(self.n_stack))
    a = stack + "R" + "".join(where["a", i] for i in range(self.a.ndim - self.n_stack - 1))
    b = stack + "R" + "".join(where["b", i] for i in range(self.b.ndim - self.n_stack - 1))
    return a, b, kernel

  def factor_axis(self, label: Label) -> int:
    """The axis of ``a`` (for an ``"a"`` or ``"s"`` label) or ``b`` (``"b"``, ``"s"``) holding ``label``."""
    side, i = label
    return i if side == "s" else self.n_stack + 1 + i

  def merged(self) -> jax.Array:
    """``w + scale · a ⊗ b`` (DoRA: times ``g``) in the kernel's current layout and dtype."""
    _, b_sub, k_sub = subs = self.subscripts()
    d = low_rank_update(subs, self.a, self.b, self.scale)
    w = _dequantized(self.w)
    v = w.astype(accumulation_dtype(w, d)) + d
    if self.g is not None:
      v = jnp.einsum(f"{k_sub},{b_sub}->{k_sub}", v, self.g.astype(v.dtype))
    return v.astype(w.dtype)

  def g_units(self) -> str:
    """The einsum letters of ``g`` without its rank axis (its stack and output axes)."""
    return self.subscripts()[1].replace("R", "")

  def with_w(self, w: jax.Array | QuantizedKernel, labels: tuple[Label, ...] | None = None) -> LoraKernel:
    return dataclasses.replace(self, w=w, labels=self.labels if labels is None else labels)


@dataclasses.dataclass
class _Context:
  """What one evaluation needs besides values: dropout key and rate, strictness, the report."""

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

  def fold(self, i: jax.Array) -> _Context:
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

  def fallback(self, k: LoraKernel, what: str) -> jax.Array:
    """Merge ``k`` for one use by ``what``, and report it (or raise if strict)."""
    name = self.names[k.index]
    if self.strict:
      raise NotImplementedError(
          f"lora_transform(strict=True): kernel {name} reaches `{what}`, which the factored engine "
          "does not handle; it would be merged for that use")
    if (name, what) not in self.fallbacks:
      warnings.warn(f"lorax_jax: kernel {name} reaches `{what}`; merged W' for that use", stacklevel=2)
      self.fallbacks.add((name, what))
    return k.merged()


CACHE_SIZE = 32  # compiled programs kept per `LoraApply` (least recently used evicted)
SHARED_KEY = 2**32 - 1  # folded into `rng` for `shared_dropout` keys; no target index reaches it


class LoraApply:
  """``lora_apply(params, lora, *args, rng=None, **kwargs)``; see `lora_transform`."""

  def __init__(self, apply_fn: Callable[..., Any], params: Any, cfg: LoraConfig, strict: bool):
    self.apply_fn, self.cfg, self.strict = apply_fn, cfg, strict
    self.targets = find_targets(params, cfg)
    self.saved = list(saved_leaves(params, cfg))
    self.fallbacks: set[tuple[str, str]] = set()
    self._compiled: collections.OrderedDict[Any, Callable[..., Any]] = collections.OrderedDict()
    self._treedef = jax.tree_util.tree_structure(params, is_leaf=is_quantized)
    self._paths = [path for path, _ in leaves_with_paths(params)]
    self._leaf_index = {path: self._paths.index(path) for path in [*self.targets, *self.saved]}
    self._avals = {path: (tuple(np.shape(x)), jnp.result_type(x))
                   for path, x in leaves_with_paths(params) if path in self._leaf_index}
    self._warned_no_key = False

  def __call__(self, params: Any, lora: Lora, *args: Any, rng: jax.Array | None = None,
               **kwargs: Any) -> Any:
    check_factors(self.targets, lora)
    self._check_params(params)
    if self.saved or SAVED_KEY in lora:
      check_saved(params, self.cfg, lora)
    check_key(rng)
    if rng is None and self.cfg.dropout_seed is not None:
      rng = jax.random.key(self.cfg.dropout_seed)
    if rng is None and self.cfg.dropout > 0 and not self._warned_no_key:
      warnings.warn(f"lorax_jax: LoraConfig.dropout={self.cfg.dropout} but no key reaches the call "
                    "(rng=None and no dropout_seed): running without LoRA dropout", stacklevel=2)
      self._warned_no_key = True
    leaves, treedef = jax.tree_util.tree_flatten((params, args, kwargs), is_leaf=is_quantized)
    dynamic = tuple(_is_array(x) for x in leaves)
    statics = tuple(x for x, d in zip(leaves, dynamic) if not d)
    key = (treedef, dynamic, tuple((type(x), x) for x in statics))
    try:
      run = self._compiled.get(key)
    except TypeError:  # an unhashable static argument: evaluate without the cache
      key, run = None, None
    if run is None:
      run = functools.partial(self._run, treedef, dynamic, statics)
      if key is not None:
        run = self._compiled[key] = jax.jit(run)
        if len(self._compiled) > CACHE_SIZE:
          self._compiled.popitem(last=False)
    elif key is not None:
      self._compiled.move_to_end(key)
    return run([x for x, d in zip(leaves, dynamic) if d], lora, rng)

  def _check_params(self, params: Any) -> None:
    """Raise a ValueError naming the path if ``params`` is not the tree the transform was built for."""
    if jax.tree_util.tree_structure(params, is_leaf=is_quantized) != self._treedef:
      paths = [path for path, _ in leaves_with_paths(params)]
      missing = [path_str(p) for p in self._paths if p not in paths]
      extra = [path_str(p) for p in paths if p not in self._paths]
      raise ValueError(
          "lora_apply: params differ in structure from the tree given to lora_transform"
          + (f"; missing {', '.join(missing[:5])}" if missing else "")
          + (f"; unexpected {', '.join(extra[:5])}" if extra else "")
          + ". Build the transform with the params you call it with")
    leaves = jax.tree_util.tree_leaves(params, is_leaf=is_quantized)
    for path, i in self._leaf_index.items():
      got = (tuple(np.shape(leaves[i])), jnp.result_type(leaves[i]))
      if not _is_array(leaves[i]) or got != self._avals[path]:
        raise ValueError(
            f"lora_apply: target {path_str(path)} is {got[0]} {got[1]} (a {type(leaves[i]).__name__}), "
            f"but lora_transform was built for {self._avals[path][0]} {self._avals[path][1]}")

  def _run(self, treedef: Any, dynamic: tuple[bool, ...], statics: tuple[Any, ...],
           dyn: list[Any], lora: Lora, rng: jax.Array | None) -> Any:
    """Trace ``apply_fn`` on the arrays ``dyn`` and evaluate it with the LoRA branches."""
    def fn(*dyn_leaves):
      p, a, kw = jax.tree_util.tree_unflatten(treedef, _interleave(dynamic, dyn_leaves, statics))
      return self.apply_fn(p, *a, **kw)
    # A quantized kernel is traced as its float array and enters as a `QuantizedKernel`.
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(*[x.aval() if is_quantized(x) else x for x in dyn])
    # The jaxpr's inputs are the array leaves only: a target's position counts those before it.
    dyn_index = np.cumsum(dynamic) - 1
    invals = [QuantizedKernel.of(x) if is_quantized(x) else x for x in dyn]
    for n, (path, t) in enumerate(self.targets.items()):
      node = get_path(lora, path)
      i = int(dyn_index[self._leaf_index[path]])
      w = invals[i] if isinstance(invals[i], QuantizedKernel) else jnp.asarray(invals[i])
      a, b = t.masked(node["a"], node["b"])
      invals[i] = LoraKernel(w, a, b, _labels(t), n, t.scale, t.uses)
      if t.dora:
        invals[i] = dataclasses.replace(invals[i], g=_dora_scale(invals[i], node["m"]))
    for path in self.saved:  # modules_to_save: the trained copies in place of the frozen leaves
      invals[int(dyn_index[self._leaf_index[path]])] = get_path(lora[SAVED_KEY], path)
    ctx = _Context(rng, self.cfg.dropout, self.strict, tuple(t.name for t in self.targets.values()),
                   self.fallbacks, self.cfg.branch_dtype, self.cfg.shared_dropout)
    outs = _eval(closed.jaxpr, closed.consts, invals, ctx)
    outs = [_as_array(x, ctx, "the output") for x in outs]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shape), outs)


def _dora_scale(k: LoraKernel, m: jax.Array) -> jax.Array:
  """DoRA's ``g = m / stop_gradient(‖V‖)``, ``V = W + s · A ⊗ B``, without forming ``V``.

  Per output unit ``j`` (and stack index), over the input axes ``i``:

      ‖V_j‖² = ‖W_j‖² + 2s · Σ_r B_rj (A·W)_rj + s² · Σ_{r,r'} B_rj B_r'j (A·Aᵀ)_rr'

  one ``[r, out]`` product ``A·W`` and an ``r × r`` Gram matrix; the norm is detached as in PEFT
  (``weight_norm.detach()``), so only ``m`` gets a gradient through ``g``. ``k`` is in its
  target's layout (the jaxpr input); ``m`` has `Target.m_shape`. Accumulates in float32 at
  ``HIGHEST`` precision; returns ``g`` laid out like ``b`` with a rank of 1, in ``m``'s dtype.
  """
  a_sub, b_sub, k_sub = k.subscripts()
  units, stack = k.g_units(), b_sub[:k.n_stack]
  w = _dequantized(k.w)  # a quantized base: its norms from the dequantized kernel (no gradient flows)
  dtype = accumulation_dtype(w, k.a, k.b)
  w, a, b = (x.astype(dtype) for x in (w, k.a, k.b))
  dot = functools.partial(jnp.einsum, precision=lax.Precision.HIGHEST)
  q_sub = b_sub.replace("R", "Q")
  aw = dot(f"{a_sub},{k_sub}->{b_sub}", a, w)  # A·W: [S, r, O]
  gram = dot(f"{a_sub},{a_sub.replace('R', 'Q')}->{stack}RQ", a, a)  # A·Aᵀ: [S, r, r]
  gb = dot(f"{stack}RQ,{q_sub}->{b_sub}", gram, b)  # (A·Aᵀ)·B: [S, r, O]
  n2 = (dot(f"{k_sub},{k_sub}->{units}", w, w)
        + jnp.sum(b * (2 * k.scale * aw + k.scale ** 2 * gb), axis=k.n_stack))
  n = lax.stop_gradient(jnp.sqrt(jnp.maximum(n2, 0)))
  return jnp.expand_dims(m / n.astype(m.dtype), k.n_stack)


def _interleave(dynamic: Sequence[bool], dyn: Sequence[Any], statics: Sequence[Any]) -> list[Any]:
  """The flat leaves again, from the array leaves and the static (Python) ones."""
  dyn_it, static_it = iter(dyn), iter(statics)
  return [next(dyn_it) if d else next(static_it) for d in dynamic]


def lora_transform(apply_fn: Callable[..., Any], params: Any, cfg: LoraConfig, *,
                   mode: Literal["factored", "reference"] = "factored",
                   strict: bool = False) -> Callable[..., Any]:
  """``apply_fn`` with LoRA: ``lora_apply(params, lora, *args, rng=None, **kwargs)``.

  Args:
    apply_fn: ``apply_fn(params, *args, **kwargs)``, e.g. a linen ``model.apply`` or
      ``lambda state, x: nnx.merge(graphdef, state)(x)``.
    params: the frozen params (their structure and shapes decide the targets).
    cfg: the `LoraConfig`.
    mode: ``"factored"`` (the engine, never forms ``W'``) or ``"reference"``
      (``apply_fn(merge(params, lora, cfg), ...)``; no LoRA dropout).
    strict: raise instead of merging a kernel that reaches an unsupported operation.

  Returns:
    A pure function with ``apply_fn``'s outputs. In factored mode it is a `LoraApply`
    whose ``fallbacks`` lists ``(kernel, operation)`` pairs that had to be merged.
  """
  if mode == "reference":
    targets = find_targets(params, cfg)

    def reference_apply(params: Any, lora: Lora, *args: Any, rng: jax.Array | None = None,
                        **kwargs: Any) -> Any:
      del rng  # the merged path has no branch input to drop out
      check_factors(targets, lora)
      return apply_fn(merge(params, lora, cfg), *args, **kwargs)
    return reference_apply
  if mode != "factored":
    raise ValueError(f"lora_transform: mode must be 'factored' or 'reference', got {mode!r}")
  return LoraApply(apply_fn, params, cfg, strict)


def _labels(t: Target) -> tuple[Label, ...]:
  """The `LoraKernel` labels of a target's layout: its n-th ``s``/``i``/``o`` axis is
  ``("s", n)`` / ``("a", n)`` / ``("b", n)``."""
  side = {"s": "s", "i": "a", "o": "b"}
  return tuple((side[c], t.axes[:j].count(c)) for j, c in enumerate(t.axes))


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic)) or hasattr(x, "aval")


# ---------------------------------------------------------------------------------------
# The interpreter


def _eval(jaxpr: jex.core.Jaxpr, consts: Sequence[Any], args: Sequence[Any], ctx: _Context) -> list[Any]:
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jex.core.Literal) else env[v]

  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if any(isinstance(x, LoraKernel) for x in invals):
      rule = _RULES.get(eqn.primitive.name, _fallback_rule)
      outvals = rule(eqn, invals, ctx)
    elif eqn.primitive.name in _NESTED and any(isinstance(x, QuantizedKernel) for x in invals):
      outvals = _RULES[eqn.primitive.name](eqn, invals, ctx)
    else:
      outvals = _bind(eqn, invals)
      if eqn.primitive.name == "broadcast_in_dim":
        ctx.producers[eqn.outvars[0]] = (eqn.params["broadcast_dimensions"], invals[0])
    for v, x in zip(eqn.outvars, outvals):
      env[v] = x
  return [read(v) for v in jaxpr.outvars]


def _bind(eqn: jex.core.JaxprEqn, invals: Sequence[Any], **params: Any) -> list[Any]:
  """``eqn``'s primitive on ``invals`` (with ``params`` overriding its own); a quantized kernel
  among them is followed or dequantized at this use (`_quantized_use`)."""
  if any(isinstance(x, QuantizedKernel) for x in invals):
    return _quantized_use(eqn, invals, params)
  bind_params = eqn.primitive.get_bind_params({**eqn.params, **params})
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*invals, **bind_params)
  return list(out) if eqn.primitive.multiple_results else [out]


def _as_array(x: Any, ctx: _Context, what: str) -> Any:
  """``x`` as a plain array: a `LoraKernel` merged for this use (reported as ``what``), a
  `QuantizedKernel` dequantized, anything else as is."""
  return ctx.fallback(x, what) if isinstance(x, LoraKernel) else _dequantized(x)


def _fallback_rule(eqn, invals, ctx, what: str | None = None):
  """``eqn`` on the merged kernels (reported as ``what``, by default the primitive's name)."""
  return _bind(eqn, [_as_array(x, ctx, what or eqn.primitive.name) for x in invals])


# --- following the kernel: casts, transposes, reshapes ---------------------------------


def _convert_rule(eqn, invals, ctx):
  """A dtype cast: followed between float types of >= 16 bits; any other cast (to an integer or
  8-bit float) would cast the factors too and is merged for that use instead."""
  (k,) = invals
  new = eqn.params.get("new_dtype", k.w.dtype)
  if not (jnp.issubdtype(new, jnp.floating) and jnp.issubdtype(k.w.dtype, jnp.floating)
          and jnp.finfo(new).bits >= 16):
    return _fallback_rule(eqn, invals, ctx, f"a cast to {jnp.dtype(new).name}")
  return [k.with_w(_bind(eqn, [k.w])[0])]


def _transpose_rule(eqn, invals, ctx):
  (k,) = invals
  perm = eqn.params["permutation"]
  return [k.with_w(_bind(eqn, [k.w])[0], tuple(k.labels[p] for p in perm))]


def _reshape_rule(eqn, invals, ctx):
  """``reshape``, ``squeeze`` and size-preserving ``broadcast_in_dim``: row-major reshapes."""
  k = invals[0]
  dims = eqn.params.get("broadcast_dimensions", ())
  transposes = eqn.primitive.name == "reshape" and eqn.params.get("dimensions") is not None
  if len(invals) == 1 and not transposes and list(dims) == sorted(dims):
    w = _bind(eqn, [k.w])[0]
    moved = _reshape_factors(k, w.shape) if w.size == k.w.size else None
    if moved is not None:
      return [moved.with_w(w)]
  return _fallback_rule(eqn, invals, ctx)


def _reshape_factors(k: LoraKernel, shape: tuple[int, ...]) -> LoraKernel | None:
  """``k`` with its factors reshaped to follow ``w.reshape(shape)``, or None if they can't.

  They can when every group of axes merged or split lies on one side (stack, ``a`` or
  ``b``) as consecutive axes in the factor's order. Size-1 axes come and go freely
  (new ones are put on ``a``).
  """
  ns = k.n_stack
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
  r = k.a.shape[ns]
  a = k.a.reshape(*dims["s"], r, *dims["a"])
  b = k.b.reshape(*dims["s"], r, *dims["b"])
  g = _on_g(k, lambda g: g.reshape(*dims["s"], 1, *dims["b"]))
  return dataclasses.replace(k, a=a, b=b, g=g, labels=tuple(new_labels[j] for j in range(len(shape))))


def _on_g(k: LoraKernel, fn: Callable[[jax.Array], jax.Array]) -> jax.Array | None:
  """``fn(k.g)`` for a DoRA kernel (``g`` moves with ``b``), None otherwise."""
  return None if k.g is None else fn(k.g)


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


def _slice_rule(eqn, invals, ctx):
  """``slice`` / ``dynamic_slice``: each factor is sliced along the kernel axes it owns."""
  k, *starts = invals
  w = _bind(eqn, [k.w, *[_as_array(x, ctx, "a slice index") for x in starts]])[0]
  a, b, g = k.a, k.b, k.g
  for j, (side, i) in enumerate(k.labels):
    if w.shape[j] == k.w.shape[j]:
      continue
    if eqn.primitive.name == "slice":
      start, limit = eqn.params["start_indices"][j], eqn.params["limit_indices"][j]
      stride = (eqn.params["strides"] or (1,) * k.w.ndim)[j]
      cut = lambda x, axis: lax.slice_in_dim(x, start, limit, stride, axis)
    else:
      cut = lambda x, axis: lax.dynamic_slice_in_dim(x, starts[j], w.shape[j], axis)
    axis = k.factor_axis((side, i))
    a = cut(a, axis) if side in "sa" else a
    b = cut(b, axis) if side in "sb" else b
    g = cut(g, axis) if side in "sb" and g is not None else g
  return [dataclasses.replace(k, w=w, a=a, b=b, g=g)]


# --- consuming the kernel: the low-rank branch ----------------------------------------


def _dot_general_rule(eqn, invals, ctx):
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
    return _bind(eqn, [lhs, k.w] if side else [k.w, rhs])
  if contracted == {"a", "b"}:
    return _fallback_rule(eqn, invals, ctx, "dot_general contracting input and output axes")
  base = _bind(eqn, [lhs, k.w] if side else [k.w, rhs])[0]
  a_sub, b_sub, k_sub = k.subscripts()
  x_sub = list(string.ascii_uppercase[:x.ndim].replace("R", "Z"))
  for xi, ki in (*zip(xc, kc), *zip(xb, kb)):
    x_sub[xi] = k_sub[ki]
  x_sub = "".join(x_sub)
  batch = "".join(k_sub[i] for i in kb)
  x_free = "".join(c for i, c in enumerate(x_sub) if i not in xc and i not in xb)
  k_free = "".join(c for i, c in enumerate(k_sub) if i not in kc and i not in kb)
  out_sub = batch + (x_free + k_free if side else k_free + x_free)
  if k.g is not None and not set(k.g_units()) <= set(out_sub):
    return _fallback_rule(eqn, invals, ctx, "dot_general contracting a DoRA kernel's output axes")
  (f, f_sub), (g, g_sub) = ((k.b, b_sub), (k.a, a_sub)) if contracted == {"b"} else ((k.a, a_sub), (k.b, b_sub))
  key = ctx.dropout_key(x, k)
  branch = _two_step(f"{x_sub},{f_sub},{g_sub}->{out_sub}", x, f, g, k, ctx, key,
                     precision=eqn.params.get("precision"),
                     preferred_element_type=eqn.params.get("preferred_element_type"),
                     out_sharding=eqn.params.get("out_sharding"))
  if k.g is None:
    return [base + branch.astype(base.dtype)]
  use = lambda u, v: _bind(eqn, [u, v] if side else [v, u])[0]
  g_axes = tuple(out_sub.index(c) for c in k.g_units())
  return [_dora_output(k, ctx, x, key, base, branch, use,
                       lambda y: _times_along(y, jnp.squeeze(k.g, k.n_stack), g_axes))]


def _dora_output(k: LoraKernel, ctx: _Context, x: jax.Array, key: jax.Array | None, base: jax.Array,
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


def _two_step(spec: str, x: jax.Array, f: jax.Array, g: jax.Array, k: LoraKernel, ctx: _Context,
              key: jax.Array | None, **dot: Any) -> jax.Array:
  """``scale · einsum(spec, dropout(x), f, g)`` as ``(dropout(x)·f)·g`` in the branch dtype,
  ``key`` the use's dropout key (`_Context.dropout_key`; None: no dropout).

  The intermediate keeps only the letters of ``x`` and ``f`` that the output or ``g`` needs.
  ``dot`` holds the use's ``precision``, ``preferred_element_type`` (kept where it widens the
  branch dtype) and ``out_sharding`` (for the second product, shaped like the output).
  """
  ins, out = spec.split("->")
  x_sub, f_sub, g_sub = ins.split(",")
  t_sub = "".join(dict.fromkeys(c for c in x_sub + f_sub if c in out + g_sub))
  dtype = ctx.dtype(k)
  pet = _widening(dot.get("preferred_element_type"), dtype)
  t = dropout_einsum(f"{x_sub},{f_sub}->{t_sub}", x.astype(dtype), f.astype(dtype), key, ctx.rate,
                     precision=dot.get("precision"), preferred_element_type=pet)
  return jnp.einsum(f"{t_sub},{g_sub}->{out}", t * jnp.asarray(k.scale, t.dtype), g.astype(t.dtype),
                    precision=dot.get("precision"), preferred_element_type=pet,
                    out_sharding=dot.get("out_sharding"))


def _widening(preferred: Any, dtype: Any) -> Any:
  """The use's ``preferred_element_type`` where it is wider than the branch dtype, else None."""
  return preferred if preferred is not None and jnp.finfo(preferred).bits > jnp.finfo(dtype).bits else None


def _ragged_dot_rule(eqn, invals, ctx):
  """``ragged_dot(x, W, groups) + s · ragged_dot(ragged_dot(dropout(x), Fᵀ, groups), G, groups)``.

  The canonical mixture-of-experts form: ``x [m, k]`` rows grouped by expert, ``W [E, k, n]``
  with the expert axis stacked; ``F`` owns ``k`` (``a`` for ``"sio"``, ``b`` for ``"soi"``).
  """
  x, k, groups = invals
  dn = eqn.params["ragged_dot_dimension_numbers"]
  if (isinstance(x, LoraKernel) or isinstance(groups, LoraKernel) or not isinstance(k, LoraKernel)
      or not ctx.adapts(k, "matmul")):
    if isinstance(k, LoraKernel) and not ctx.adapts(k, "matmul"):
      return _bind(eqn, [x, k.w, groups])
    return _fallback_rule(eqn, invals, ctx)
  canonical = (dn.dot_dimension_numbers == (((1,), (1,)), ((), ())) and tuple(dn.lhs_ragged_dimensions) == (0,)
               and tuple(dn.rhs_group_dimensions) == (0,) and x.ndim == 2 and k.w.ndim == 3)
  if not canonical or k.labels[0][0] != "s" or {k.labels[1][0], k.labels[2][0]} != {"a", "b"}:
    return _fallback_rule(eqn, invals, ctx, "ragged_dot of a non-canonical expert kernel")
  if k.g is not None:
    return _fallback_rule(eqn, invals, ctx, "ragged_dot of a DoRA kernel")
  base = _bind(eqn, [x, k.w, groups])[0]
  f, g = (k.a, k.b) if k.labels[1][0] == "a" else (k.b, k.a)
  dtype = ctx.dtype(k)
  pet = _widening(eqn.params.get("preferred_element_type"), dtype)
  dot = dict(precision=eqn.params.get("precision"), preferred_element_type=pet,
             group_offset=eqn.params.get("group_offset"))
  t = dropout_bilinear(lambda u, v: lax.ragged_dot(u, v, groups, **dot), x.astype(dtype),
                       jnp.swapaxes(f, 1, 2).astype(dtype), ctx.dropout_key(x, k), ctx.rate)
  branch = lax.ragged_dot(t * jnp.asarray(k.scale, t.dtype), g.astype(t.dtype), groups, **dot)
  return [base + branch.astype(base.dtype)]


def _conv_rule(eqn, invals, ctx):
  """``conv(x, W) + s · conv(dropout(x), A) ·_features B``: A a conv into r channels, B a 1×1 conv."""
  x, k = invals
  dn = eqn.params["dimension_numbers"]
  out_feature = dn.rhs_spec[0]
  if isinstance(k, LoraKernel) and not isinstance(x, LoraKernel) and not ctx.adapts(k, "conv"):
    return _bind(eqn, [x, k.w])
  if (isinstance(x, LoraKernel) or not isinstance(k, LoraKernel) or k.n_stack
      or k.labels[out_feature] != ("b", 0) or k.b.ndim != 2
      or eqn.params["feature_group_count"] != 1 or eqn.params["batch_group_count"] != 1):
    return _fallback_rule(eqn, invals, ctx)
  base = _bind(eqn, [x, k.w])[0]
  dtype = ctx.dtype(k)
  key = ctx.dropout_key(x, k)
  # `a` laid out as the kernel, with r in place of the output features.
  perm = [0 if j == out_feature else 1 + k.labels[j][1] for j in range(k.w.ndim)]
  t = dropout_bilinear(lambda u, v: _bind(eqn, [u, v], preferred_element_type=None)[0],
                       x.astype(dtype), k.a.astype(dtype).transpose(perm), key, ctx.rate)
  t = jnp.moveaxis(t * jnp.asarray(k.scale, t.dtype), dn.out_spec[1], -1) @ k.b.astype(t.dtype)
  branch = jnp.moveaxis(t, -1, dn.out_spec[1])
  if k.g is None:
    return [base + branch.astype(base.dtype)]
  return [_dora_output(k, ctx, x, key, base, branch, lambda u, v: _bind(eqn, [u, v])[0],
                       lambda y: _times_along(y, k.g[0], (dn.out_spec[1],)))]


def _times_along(y: jax.Array, g: jax.Array, axes: tuple[int, ...]) -> jax.Array:
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


def _gather_rule(eqn, invals, ctx):
  """An embedding lookup: ``W[ids] + s · F[ids] · G``, ``F`` the factor owning the indexed axes.

  ``F`` is ``a`` for a ``[vocab, features]`` table (``"io"``) and ``b`` for ``"oi"``.
  """
  k, ids = invals
  if isinstance(k, LoraKernel) and not isinstance(ids, LoraKernel) and not ctx.adapts(k, "lookup"):
    return _bind(eqn, [k.w, ids])
  dn = eqn.params["dimension_numbers"]
  slice_sizes = tuple(eqn.params["slice_sizes"])
  sides = {l[0] for l in k.labels} if isinstance(k, LoraKernel) else set()
  feature_axes = [j for j, n in enumerate(slice_sizes) if isinstance(k, LoraKernel) and n == k.w.shape[j] and n != 1]
  if (isinstance(ids, LoraKernel) or sides != {"a", "b"} or len(feature_axes) != 1
      or getattr(dn, "operand_batching_dims", ())):
    return _fallback_rule(eqn, invals, ctx)
  (feature,) = feature_axes
  g_side = k.labels[feature][0]
  rows = [j for j in range(k.w.ndim) if j != feature]
  if (sum(1 for l in k.labels if l[0] == g_side) != 1
      or any(slice_sizes[j] != 1 or j not in dn.collapsed_slice_dims for j in rows)):
    return _fallback_rule(eqn, invals, ctx)
  if k.g is not None and g_side != "b":
    return _fallback_rule(eqn, invals, ctx, "gather of DoRA rows (an [out, in] table)")
  base = _bind(eqn, [k.w, ids])[0]
  f, g = (k.a, k.b) if g_side == "b" else (k.b, k.a)
  dtype = ctx.dtype(k)
  # `f` laid out as the kernel, with r in place of the features; gather its rows.
  perm = [0 if j == feature else 1 + k.labels[j][1] for j in range(k.w.ndim)]
  sizes = tuple(f.shape[0] if j == feature else n for j, n in enumerate(slice_sizes))
  picked = _bind(eqn, [f.astype(dtype).transpose(perm), ids], slice_sizes=sizes)[0]
  out_axis = dn.offset_dims[0]
  picked = jnp.moveaxis(picked * jnp.asarray(k.scale, dtype), out_axis, -1) @ g.astype(dtype)
  branch = jnp.moveaxis(picked, -1, out_axis)
  if k.g is None:
    return [base + branch.astype(base.dtype)]
  return [_dora_output(k, ctx, ids, None, base, branch, None,
                       lambda y: _times_along(y, k.g.reshape(-1), (out_axis,)))]


# --- kernels combined with others: split, concatenate, scaling ---------------------------


def _split_rule(eqn, invals, ctx):
  """``jnp.split`` of a fused kernel (QKV, gate-up): each piece carries its slice of the factor
  owning the split axis (both factors for a stack axis)."""
  (k,) = invals
  axis = eqn.params["axis"]
  pieces = _bind(eqn, [k.w])
  start, out = 0, []
  for w in pieces:
    n = w.shape[axis]
    cut = lambda x: lax.slice_in_dim(x, start, start + n, axis=k.factor_axis(k.labels[axis]))
    side = k.labels[axis][0]
    out.append(dataclasses.replace(k, w=w, a=cut(k.a) if side in "sa" else k.a,
                                   b=cut(k.b) if side in "sb" else k.b,
                                   g=_on_g(k, cut) if side in "sb" else k.g))
    start += n
  return out


def _concatenate_rule(eqn, invals, ctx):
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
    return _fallback_rule(eqn, invals, ctx)
  if any(x.g is not None for x in ks):
    return _fallback_rule(eqn, invals, ctx, "concatenate of DoRA kernels")
  k0 = ks[0]
  cat_side = k0.labels[axis][0]
  r_axis = k0.n_stack
  w = _bind(eqn, [x.w for x in ks])[0]
  if cat_side == "s":
    if any(x.a.shape[r_axis] != k0.a.shape[r_axis] for x in ks):
      return _fallback_rule(eqn, invals, ctx, "concatenate of stacked kernels of different ranks")
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


def _neg_rule(eqn, invals, ctx):
  """``-W``: ``-W - s · a ⊗ b`` (the scale negated)."""
  (k,) = invals
  return [dataclasses.replace(k, w=_bind(eqn, [k.w])[0], scale=-k.scale)]


def _scale_rule(eqn, invals, ctx):
  """``W * c`` / ``W / c`` with ``c`` a scalar or varying along one side's axes only (muP,
  per-channel scales): that side's factor is multiplied (divided) by ``c``, as `merge` would."""
  k, c = invals
  c_var = eqn.invars[1]
  if eqn.primitive.name == "mul" and not isinstance(k, LoraKernel):
    (c, k), c_var = invals, eqn.invars[0]
  if isinstance(c, LoraKernel) or not isinstance(k, LoraKernel):
    return _fallback_rule(eqn, invals, ctx)
  compact = _compact(c, c_var, ctx)
  varying = {k.labels[j] for j, n in enumerate(np.shape(compact)) if n != 1}
  sides = {side for side, _ in varying} - {"s"}
  if len(sides) > 1:
    return _fallback_rule(eqn, invals, ctx, f"{eqn.primitive.name} by an array varying along input and output axes")
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
  w = _bind(eqn, [k.w, c])[0]
  k = dataclasses.replace(k, a=scaled) if side == "a" else dataclasses.replace(k, b=scaled)
  return [k.with_w(w)]


def _compact(c: Any, var: Any, ctx: _Context) -> Any:
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


# --- following the kernel into nested computations --------------------------------------


def _jit_rule(eqn, invals, ctx):
  """A nested ``jit``: evaluated inline (the outer trace compiles it as one program)."""
  closed = eqn.params["jaxpr"]
  return _eval(closed.jaxpr, closed.consts, invals, ctx)


def _remat_rule(eqn, invals, ctx):
  """``jax.checkpoint`` re-emitted with the same policy, the factors saved like the kernel."""
  jaxpr = eqn.params["jaxpr"]
  body = jax.checkpoint(lambda *args: _eval(jaxpr, (), args, ctx),
                        prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"])
  return body(*invals)


def _scan_rule(eqn, invals, ctx):
  """``lax.scan`` re-emitted; a stacked kernel is sliced with its factors, per iteration."""
  p = eqn.params
  n_consts, n_carry = p["num_consts"], p["num_carry"]
  consts, init, xs = invals[:n_consts], invals[n_consts:n_consts + n_carry], invals[n_consts + n_carry:]
  init = [_as_array(x, ctx, "a scan carry") for x in init]
  sliced = [_slice_leading(x) if isinstance(x, LoraKernel) else _slice_quantized(x)
            if isinstance(x, QuantizedKernel) else (x, None) for x in xs]
  closed = p["jaxpr"]

  def body(carry, step):
    i, x_leaves = step
    xs_now = [rebuild(x) if rebuild else x for x, (_, rebuild) in zip(x_leaves, sliced)]
    outs = _eval(closed.jaxpr, closed.consts, [*consts, *carry, *xs_now], ctx.fold(i))
    outs = [_as_array(x, ctx, "a scan output") for x in outs]
    return outs[:n_carry], outs[n_carry:]

  steps = (jnp.arange(p["length"]), [x for x, _ in sliced])
  carry, ys = lax.scan(body, init, steps, length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
  return [*carry, *ys]


def _slice_leading(k: LoraKernel) -> tuple[dict[str, Any], Callable[[dict[str, Any]], LoraKernel]]:
  """What scan slices for a kernel scanned over its axis 0, and how to rebuild the slice.

  A stack axis slices ``w``, ``a`` and ``b``; an ``a`` (``b``) axis slices ``w`` and ``a``
  (``b``), and the other factor is closed over.
  """
  side, i = k.labels[0]
  axis = k.factor_axis((side, i))
  w, rebuild_w = _slice_quantized(k.w) if isinstance(k.w, QuantizedKernel) else (k.w, None)
  leaves = {"w": w,
            "a": jnp.moveaxis(k.a, axis, 0) if side in "sa" else None,
            "b": jnp.moveaxis(k.b, axis, 0) if side in "sb" else None,
            "g": _on_g(k, lambda g: jnp.moveaxis(g, axis, 0)) if side in "sb" else None}
  labels = tuple((s, n - 1) if s == side and n > i else (s, n) for s, n in k.labels[1:])

  def rebuild(x: dict[str, Any]) -> LoraKernel:
    return dataclasses.replace(k, w=rebuild_w(x["w"]) if rebuild_w else x["w"], labels=labels,
                               a=k.a if x["a"] is None else x["a"],
                               b=k.b if x["b"] is None else x["b"],
                               g=k.g if x["g"] is None else x["g"])
  return leaves, rebuild


def _cond_rule(eqn, invals, ctx):
  """``lax.switch`` re-emitted; a kernel leaving a branch is merged."""
  index, *ops = invals
  index = _as_array(index, ctx, "a cond index")

  def branch(closed):
    def run(*args):
      outs = _eval(closed.jaxpr, closed.consts, args, ctx)
      return [_as_array(x, ctx, "a cond output") for x in outs]
    return run
  return list(lax.switch(index, [branch(c) for c in eqn.params["branches"]], *ops))


def _while_rule(eqn, invals, ctx):
  """``lax.while_loop`` re-emitted, with an iteration counter for dropout keys."""
  p = eqn.params
  nc, nb = p["cond_nconsts"], p["body_nconsts"]
  cond_consts, body_consts, init = invals[:nc], invals[nc:nc + nb], invals[nc + nb:]
  init = [_as_array(x, ctx, "a while carry") for x in init]
  cond, body = p["cond_jaxpr"], p["body_jaxpr"]

  def cond_fn(state):
    _, carry = state
    return _eval(cond.jaxpr, cond.consts, [*cond_consts, *carry], ctx)[0]

  def body_fn(state):
    i, carry = state
    outs = _eval(body.jaxpr, body.consts, [*body_consts, *carry], ctx.fold(i))
    return i + 1, [_as_array(x, ctx, "a while carry") for x in outs]
  return lax.while_loop(cond_fn, body_fn, (jnp.asarray(0, jnp.int32), init))[1]


# --- quantized kernels: followed lazily, dequantized at each use ------------------------

_LAYOUT = frozenset({"convert_element_type", "copy", "copy_p", "transpose", "reshape", "squeeze",
                     "broadcast_in_dim", "slice", "split", "rev", "neg"})
_NESTED = frozenset({"pjit", "jit", "closed_call", "core_call", "remat2", "checkpoint", "scan", "cond", "while"})


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class QuantizedKernel:
  """A quantized kernel in flight: the stored `QArray` ``q`` and the layout-only equations
  (casts, transposes, reshapes, slices, splits, negation) the model has applied to its float
  value so far, replayed on ``deq(q)`` at each use. ``shape`` and ``dtype`` are the float
  value's now. A targeted kernel's `LoraKernel.w` may be one."""

  q: QArray
  ops: tuple[tuple[Any, int], ...]  # (equation, which of its outputs)
  shape: tuple[int, ...]
  dtype: Any

  @classmethod
  def of(cls, q: QArray) -> QuantizedKernel:
    return cls(q, (), q.shape, q.dtype)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  def then(self, eqn: jex.core.JaxprEqn, out: int) -> QuantizedKernel:
    """This kernel after output ``out`` of the layout equation ``eqn``."""
    aval = eqn.outvars[out].aval
    return QuantizedKernel(self.q, (*self.ops, (eqn, out)), tuple(aval.shape), aval.dtype)

  def dequantize(self) -> jax.Array:
    """The float value the model sees: ``deq(q)`` with the pending equations applied."""
    w = self.q.dequantize()
    for eqn, out in self.ops:
      w = _bind(eqn, [w])[out]
    return w

  def tree_flatten(self):
    return (self.q,), (self.ops, self.shape, self.dtype)

  @classmethod
  def tree_unflatten(cls, aux: tuple, children: Sequence[Any]) -> QuantizedKernel:
    return cls(children[0], *aux)


def _dequantized(x: Any) -> Any:
  """``x``'s float value if it is a `QuantizedKernel`, else ``x``."""
  return x.dequantize() if isinstance(x, QuantizedKernel) else x


def _quantized_use(eqn: jex.core.JaxprEqn, invals: Sequence[Any], params: dict[str, Any]) -> list[Any]:
  """``eqn`` on operands among which a `QuantizedKernel` is: a layout equation of the kernel alone
  is recorded on it; an embedding lookup whose blocks run along the looked-up features gathers
  the rows' blocks and dequantizes only them (`_gather_rows`); any other equation (a
  ``dot_general``, a conv, a tied head ``h @ E.T``, an operation without a rule) runs on the
  kernel dequantized at this use and dequantized again in the backward pass (`_dequantized_use`)."""
  if eqn.primitive.name in _LAYOUT and len(invals) == 1 and not params:
    return [invals[0].then(eqn, n) for n in range(len(eqn.outvars))]
  if eqn.primitive.name == "gather" and not params:
    rows = _gather_rows(eqn, *invals)
    if rows is not None:
      return [rows]
  if eqn.primitive.name == "dot_general" and not params:
    out = _chunked_dot(eqn, invals)
    if out is not None:
      return [out]
  return _dequantized_use(lambda *vals: _bind(eqn, vals, **params), invals)


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


def _gather_rows(eqn: jex.core.JaxprEqn, k: Any, ids: Any) -> jax.Array | None:
  """An embedding lookup ``E[ids]`` of a quantized table whose blocks run along its last axis, the
  looked-up features (a GGUF ``token_embd``): the same gather picks the rows' codes, scales and
  zero points, and only the picked rows are dequantized. None when the layout does not allow it
  (the blocks run along the indexed axis, a non-cast layout is pending, double quantization)."""
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
    return jnp.moveaxis(_bind(eqn, [x, ids], slice_sizes=(*sizes[:-1], x.shape[-1]), **fill)[0], feature, -1)
  rows = QArray(pick(q.data), pick(q.scale), pick(q.zero), fmt=q.fmt, shape=eqn.outvars[0].aval.shape,
                dtype=q.dtype, block_size=q.block_size, axis=feature).dequantize()
  for cast, _ in k.ops:
    rows = _bind(cast, [rows])[0]
  return rows


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
      w = _bind(e, [w])[0]
    return _bind(eqn, [w if n == i else x for n, x in enumerate(invals)])[0]

  out = lax.map(jax.checkpoint(product), stored)
  return jnp.moveaxis(out, 0, out_axis).reshape(eqn.outvars[0].aval.shape)


def _slice_quantized(k: QuantizedKernel) -> tuple[Any, Callable[[Any], QuantizedKernel] | None]:
  """What scan slices for a quantized kernel scanned over its axis 0, and how to rebuild the
  slice: the stored arrays, when axis 0 is one of their leading axes (blocks along another axis,
  no pending layout, no double quantization); else the dequantized stack (rebuild None)."""
  q = k.q
  if k.ops or q.axis == 0 or q.scale_absmax is not None:
    return k.dequantize(), None

  return (q.data, q.scale, q.zero), lambda children: QuantizedKernel.of(q.layer(children))


_RULES: dict[str, Callable[..., list[Any]]] = {
    "convert_element_type": _convert_rule,
    "copy": _convert_rule,
    "copy_p": _convert_rule,
    "transpose": _transpose_rule,
    "reshape": _reshape_rule,
    "squeeze": _reshape_rule,
    "broadcast_in_dim": _reshape_rule,
    "slice": _slice_rule,
    "dynamic_slice": _slice_rule,
    "dot_general": _dot_general_rule,
    "ragged_dot_general": _ragged_dot_rule,
    "split": _split_rule,
    "concatenate": _concatenate_rule,
    "neg": _neg_rule,
    "mul": _scale_rule,
    "div": _scale_rule,
    "conv_general_dilated": _conv_rule,
    "gather": _gather_rule,
    "pjit": _jit_rule,
    "jit": _jit_rule,
    "closed_call": _jit_rule,
    "core_call": _jit_rule,
    "remat2": _remat_rule,
    "checkpoint": _remat_rule,
    "scan": _scan_rule,
    "cond": _cond_rule,
    "while": _while_rule,
}


# ---------------------------------------------------------------------------------------
# Axes from use


AxisMap = tuple[frozenset[int], ...]  # for each axis of a value: the target kernel's axes it spans
_ROLE_LETTER = {"stack": "s", "input": "i", "output": "o"}


def axes_from_use(apply_fn: Callable[..., Any], params: Any, cfg: LoraConfig, *args: Any,
                  **kwargs: Any) -> LoraConfig:
  """``cfg`` with ``kernel_axes`` filled for every target from how ``apply_fn`` uses it.

  Traces ``apply_fn(params, *args, **kwargs)`` abstractly (shapes only, no FLOPs) and follows each
  target through casts, transposes, reshapes, slices, splits, scalings, nested ``jit``/``remat``,
  ``scan`` (the scanned axis is stacked), ``cond`` and ``while`` to its uses, where each kernel
  axis gets a role: at ``dot_general`` contracted axes are input (``"i"``), batch axes stacked
  (``"s"``), free axes output (``"o"``); at ``ragged_dot`` the expert axis is stacked, the
  contracted input, the rest output; at a conv the output-feature axis is output, the others
  input; at an embedding ``gather`` the indexed axes are input, the gathered features output.
  Where a lookup and a matmul disagree (a tied embedding and its LM head) the lookup decides,
  as in PEFT. Axes of a target with no use seen keep their name-based default.

  Args:
    apply_fn, params: as for `lora_transform`.
    cfg: the config; its explicit ``kernel_axes`` entries win over what the uses say.
    *args, **kwargs: example inputs (arrays or `jax.ShapeDtypeStruct`s).

  Returns:
    ``cfg`` with one ``kernel_axes`` entry per target, keyed by ``re.escape`` of its path.

  Raises:
    ValueError: two uses of a kernel give an axis different roles (the message names the kernel
      and the uses); set its ``kernel_axes`` explicitly.
  """
  # Every candidate's axes, whatever its layer: the stack axes decide which layers a kernel holds.
  targets = find_targets(params, cfg.replace(layers_to_transform=None, layers_pattern=None), check_rank=False)
  leaves, treedef = jax.tree_util.tree_flatten((params, args, kwargs), is_leaf=is_quantized)
  dynamic = [_is_array(x) or isinstance(x, jax.ShapeDtypeStruct) for x in leaves]
  statics = [x for x, d in zip(leaves, dynamic) if not d]
  dyn = [jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x.dtype)) for x, d in zip(leaves, dynamic) if d]

  def fn(*dyn_leaves):
    p, a, kw = jax.tree_util.tree_unflatten(treedef, _interleave(dynamic, dyn_leaves, statics))
    return apply_fn(p, *a, **kw)
  closed = jax.make_jaxpr(fn)(*dyn)
  dyn_index = np.cumsum(dynamic) - 1
  paths = [path for path, _ in leaves_with_paths(params)]
  env: list[Any] = [None] * len(dyn)
  for n, path in enumerate(targets):
    env[int(dyn_index[paths.index(path)])] = (n, tuple(frozenset([j]) for j in range(len(targets[path].shape))))
  roles: dict[int, dict[int, dict[str, str]]] = {n: {} for n in range(len(targets))}
  _walk(closed.jaxpr, env, roles)
  explicit = {re.escape(t.name): axes for t in targets.values()
              for pattern, axes in cfg.kernel_axes.items() if matches(pattern, t.name)}
  found = {}
  for n, t in enumerate(targets.values()):
    letters = list(t.axes)
    for j, by_use in ({} if re.escape(t.name) in explicit else roles[n]).items():
      kinds = set(by_use.values())
      lookup = {r for u, r in by_use.items() if u.startswith("gather")}
      if len(kinds) > 1 and len(lookup) == 1 and "stack" not in kinds:
        kinds = lookup
      if len(kinds) > 1:
        uses = "; ".join(f"{u}: {r}" for u, r in by_use.items())
        raise ValueError(f"axes_from_use: the uses of kernel {t.name} disagree on its axis {j} "
                         f"({uses}); set LoraConfig.kernel_axes for it")
      letters[j] = _ROLE_LETTER[kinds.pop()]
    found[re.escape(t.name)] = "".join(letters)
  filled = cfg.replace(kernel_axes={**found, **explicit, **cfg.kernel_axes})
  find_targets(params, filled)  # the rank check, now that the layouts are known
  return filled


def _walk(jaxpr: jex.core.Jaxpr, args: Sequence[Any], roles: dict[int, dict[int, dict[str, str]]]) -> list[Any]:
  """Follow ``(target, AxisMap)`` values through ``jaxpr``, recording axis roles at each use."""
  env: dict[Any, Any] = dict(zip(jaxpr.invars, args))
  read = lambda v: None if isinstance(v, jex.core.Literal) else env.get(v)
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    if not any(x is not None for x in ins):
      continue
    name, p = eqn.primitive.name, eqn.params
    outs: list[Any] = [None] * len(eqn.outvars)
    tracked = [(i, x) for i, x in enumerate(ins) if x is not None]
    i, (n, axes) = tracked[0]

    def note(role_of: Callable[[int], str | None], use: str) -> None:
      for pos, originals in enumerate(axes):
        role = role_of(pos)
        for j in originals if role else ():
          roles[n].setdefault(j, {})[f"{use} #{len(roles[n].get(j, {}))}"] = role
    if name in ("convert_element_type", "copy", "copy_p", "neg", "slice", "dynamic_slice",
                "split", "mul", "div", "concatenate"):
      outs = [(n, axes)] * len(eqn.outvars)
    elif name == "transpose":
      outs = [(n, tuple(axes[q] for q in p["permutation"]))]
    elif name in ("reshape", "squeeze", "broadcast_in_dim"):
      outs = [(n, _reshape_axes(axes, eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape))]
    elif name == "dot_general":
      (lc, rc), (lb, rb) = p["dimension_numbers"]
      c, b = (lc, lb) if i == 0 else (rc, rb)
      note(lambda q: "input" if q in c else "stack" if q in b else "output", "dot_general")
    elif name == "ragged_dot_general" and i == 1:
      dn = p["ragged_dot_dimension_numbers"]
      (_, rc), (_, rb) = dn.dot_dimension_numbers
      note(lambda q: "stack" if q in (*rb, *dn.rhs_group_dimensions) else "input" if q in rc else "output",
           "ragged_dot")
    elif name == "conv_general_dilated" and i == 1:
      out_feature = p["dimension_numbers"].rhs_spec[0]
      note(lambda q: "output" if q == out_feature else "input", "conv")
    elif name == "gather" and i == 0:
      sizes = p["slice_sizes"]
      shape = eqn.invars[0].aval.shape
      note(lambda q: "output" if sizes[q] == shape[q] and shape[q] != 1 else "input", "gather")
    elif name in ("pjit", "jit", "closed_call", "core_call"):
      outs = _walk(p["jaxpr"].jaxpr, ins, roles)
    elif name in ("remat2", "checkpoint"):
      outs = _walk(p["jaxpr"], ins, roles)
    elif name == "scan":
      k = p["num_consts"] + p["num_carry"]
      body = [x if q < k or x is None else (x[0], x[1][1:]) for q, x in enumerate(ins)]
      for q, x in enumerate(ins[k:]):
        if x is not None:
          for j in x[1][0]:
            roles[x[0]].setdefault(j, {})["scan"] = "stack"
      _walk(p["jaxpr"].jaxpr, body, roles)
    elif name == "cond":
      for branch in p["branches"]:
        _walk(branch.jaxpr, ins[1:], roles)
    elif name == "while":
      nc = p["cond_nconsts"]
      _walk(p["body_jaxpr"].jaxpr, ins[nc:], roles)
    for v, x in zip(eqn.outvars, outs):
      env[v] = x
  return [read(v) for v in jaxpr.outvars]


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
