"""`lora_transform` and the function it returns, `LoraApply`: the model traced to a jaxpr per
argument structure, its targeted kernels entered as `LoraKernel`s, evaluated by `core.evaluate`."""

from __future__ import annotations

import collections
import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax.config import LoraConfig
from lorax_jax.dropout import check_key
from lorax_jax.lora_tree import (SAVED_KEY, SCALE, TOKENS_KEY, Lora, check_factors, check_saved, check_stacked,
                                 check_tokens, is_stacked)
from lorax_jax.merge import merge
from lorax_jax.paths import get_path, path_str
from lorax_jax.qarray import is_quantized, leaves_with_paths
from lorax_jax.targets import Target, find_targets, saved_leaves, token_rows
from lorax_jax.transform.core import Context, as_array, evaluate
from lorax_jax.transform.dora import dora_scale
from lorax_jax.transform.kernels import Label, LoraKernel, QuantizedKernel

CACHE_SIZE = 32  # compiled programs kept per `LoraApply` (least recently used evicted)


class LoraApply:
  """``lora_apply(params, lora, *args, rng=None, **kwargs)``; see `lora_transform`."""

  def __init__(self, apply_fn: Callable[..., Any], params: Any, cfg: LoraConfig, strict: bool):
    self.apply_fn, self.cfg, self.strict = apply_fn, cfg, strict
    self.targets = find_targets(params, cfg)
    self.saved = list(saved_leaves(params, cfg))
    self.tokens = token_rows(params, cfg)
    self.fallbacks: set[tuple[str, str]] = set()
    self._compiled: collections.OrderedDict[Any, Callable[..., Any]] = collections.OrderedDict()
    self._treedef = jax.tree_util.tree_structure(params, is_leaf=is_quantized)
    self._paths = [path for path, _ in leaves_with_paths(params)]
    self._biased = {t.path: t.bias_path for t in self.targets.values() if t.lora_bias}
    self._leaf_index = {path: self._paths.index(path)
                        for path in dict.fromkeys([*self.targets, *self.saved, *self._biased.values(), *self.tokens])}
    self._avals = {path: (tuple(np.shape(x)), jnp.result_type(x))
                   for path, x in leaves_with_paths(params) if path in self._leaf_index}
    self._warned_no_key = False

  def __call__(self, params: Any, lora: Lora, *args: Any, rng: jax.Array | None = None,
               adapter_ids: jax.Array | None = None, **kwargs: Any) -> Any:
    if adapter_ids is None:
      if is_stacked(lora):
        raise ValueError("lora_apply: this LoRA tree is stacked (lorax_jax.stack_adapters: a 'scale' per adapter); "
                         "pass adapter_ids= (int32 [batch], each example's adapter, -1 the base model), or run one "
                         "adapter of it (lorax_jax.unstack_adapters)")
      check_factors(self.targets, lora)
    else:
      adapter_ids = self._check_mixed(lora, adapter_ids)
    self._check_params(params)
    if self.saved or SAVED_KEY in lora:
      check_saved(params, self.cfg, lora)
    if self.tokens or TOKENS_KEY in lora:
      check_tokens(params, self.cfg, lora)
    check_key(rng)
    if rng is None and self.cfg.dropout_seed is not None:
      rng = jax.random.key(self.cfg.dropout_seed)
    if rng is None and self.cfg.dropout > 0 and not self._warned_no_key:
      warnings.warn(f"lorax_jax: LoraConfig.dropout={self.cfg.dropout} but no key reaches the call "
                    "(rng=None and no dropout_seed): running without LoRA dropout", stacklevel=2)
      self._warned_no_key = True
    leaves, treedef = jax.tree_util.tree_flatten((params, args, kwargs), is_leaf=is_quantized)
    dynamic = tuple(is_array(x) for x in leaves)
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
    return run([x for x, d in zip(leaves, dynamic) if d], lora, rng, adapter_ids)

  def _check_mixed(self, lora: Lora, ids: Any) -> jax.Array:
    """``ids`` as int32, after checking that they select adapters of ``lora``, a stacked tree of
    this transform's targets at their ranks (the config `stack_adapters` returned).

    Raises:
      ValueError: ``lora`` is not stacked or does not fit; ``ids`` not a 1-D integer array, or (when
        concrete) outside ``[-1, k)``; ``modules_to_save``, trained biases, ``lora_bias`` or trainable
        tokens in the config.
    """
    if not is_stacked(lora):
      raise ValueError("lora_apply: adapter_ids selects adapters of a stacked tree (lorax_jax.stack_adapters), "
                       "but this LoRA tree is one adapter; stack it with the others, or drop adapter_ids")
    for present, option in ((self.saved, "modules_to_save (and bias='lora_only'/'all')"),
                            (self._biased, "lora_bias"), (self.tokens, "trainable_token_indices")):
      if present:
        raise ValueError(f"lora_apply: adapter_ids with {option}: stacked adapters hold factors only, so a mixed "
                         "batch has no per-example copy of those; run such adapters one at a time")
    if np.ndim(ids) != 1 or not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
      raise ValueError(f"lora_apply: adapter_ids must be a 1-D integer array (one adapter per example, -1 the "
                       f"base model), got {jnp.result_type(ids)} of shape {np.shape(ids)}")
    n, ranks = check_stacked(lora, self.targets, None, "lora_apply")
    for path, t in self.targets.items():
      if ranks[path] != t.rank:
        raise ValueError(f"lora_apply: the stacked tree has rank {ranks[path]} at {t.name}, the transform was built "
                         f"for rank {t.rank}: build it with the config stack_adapters returned")
    if not isinstance(ids, jax.core.Tracer):
      bad = np.asarray(ids)[(np.asarray(ids) < -1) | (np.asarray(ids) >= n)]
      if bad.size:
        raise ValueError(f"lora_apply: adapter_ids {sorted(set(bad.tolist()))[:5]} are out of range for a stacked "
                         f"tree of {n} adapters (ids are 0 … {n - 1}, or -1 for the base model)")
    return jnp.asarray(ids, jnp.int32)

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
      if not is_array(leaves[i]) or got != self._avals[path]:
        raise ValueError(
            f"lora_apply: target {path_str(path)} is {got[0]} {got[1]} (a {type(leaves[i]).__name__}), "
            f"but lora_transform was built for {self._avals[path][0]} {self._avals[path][1]}")

  def _run(self, treedef: Any, dynamic: tuple[bool, ...], statics: tuple[Any, ...],
           dyn: list[Any], lora: Lora, rng: jax.Array | None, ids: jax.Array | None) -> Any:
    """Trace ``apply_fn`` on the arrays ``dyn`` and evaluate it with the LoRA branches (``ids``: a
    mixed batch's adapter per example, `mixed_kernel`)."""
    def fn(*dyn_leaves):
      p, a, kw = jax.tree_util.tree_unflatten(treedef, interleave(dynamic, dyn_leaves, statics))
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
      if ids is not None:
        invals[i] = mixed_kernel(w, node, t, n, ids)
        continue
      a, b = t.masked(node["a"], node["b"])
      invals[i] = LoraKernel(w, a, b, _labels(t), n, t.scale, t.uses)
      if t.dora:
        invals[i] = dataclasses.replace(invals[i], g=dora_scale(invals[i], node["m"]))
    for path in self.saved:  # modules_to_save: the trained copies in place of the frozen leaves
      invals[int(dyn_index[self._leaf_index[path]])] = get_path(lora[SAVED_KEY], path)
    for path, idx in self.tokens.items():  # trainable tokens: the trained rows in place, at every use
      i = int(dyn_index[self._leaf_index[path]])
      invals[i] = invals[i].at[jnp.asarray(idx)].set(get_path(lora[TOKENS_KEY], path).astype(invals[i].dtype))
    for path, bias_path in self._biased.items():  # lora_B's bias c: s·c adds to the frozen bias (x-independent)
      i = int(dyn_index[self._leaf_index[bias_path]])
      invals[i] = (invals[i] + self.targets[path].scale * get_path(lora, path)["bias"]).astype(invals[i].dtype)
    ctx = Context(rng, self.cfg.dropout, self.strict, tuple(t.name for t in self.targets.values()),
                  self.fallbacks, self.cfg.branch_dtype, self.cfg.shared_dropout)
    outs = evaluate(closed.jaxpr, closed.consts, invals, ctx)
    outs = [as_array(x, ctx, "the output") for x in outs]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shape), outs)


def interleave(dynamic: Sequence[bool], dyn: Sequence[Any], statics: Sequence[Any]) -> list[Any]:
  """The flat leaves again, from the array leaves and the static (Python) ones."""
  dyn_it, static_it = iter(dyn), iter(statics)
  return [next(dyn_it) if d else next(static_it) for d in dynamic]


def lora_transform(apply_fn: Callable[..., Any], params: Any, cfg: LoraConfig, *,
                   mode: Literal["factored", "reference"] = "factored",
                   strict: bool = False) -> Callable[..., Any]:
  """``apply_fn`` with LoRA: ``lora_apply(params, lora, *args, rng=None, **kwargs)``.

  Each targeted kernel ``W`` is used as ``W' = W + s · A ⊗ B`` without forming ``W'``: where the
  model computes ``x @ W`` the engine computes ``x @ W + s · (dropout(x) @ A) @ B``.

  >>> import jax, jax.numpy as jnp, numpy as np, lorax_jax
  >>> def model(p, x):
  ...   return jnp.tanh(x @ p["value"]["kernel"])
  >>> params = {"value": {"kernel": jax.random.normal(jax.random.key(0), (4, 3))}}
  >>> x = jnp.ones((2, 4))
  >>> cfg = lorax_jax.LoraConfig(r=2, alpha=4, targets=["value"])
  >>> lora = jax.tree.map(lambda f: f + 0.1, lorax_jax.init_lora(params, cfg, jax.random.key(1)))
  >>> apply = lorax_jax.lora_transform(model, params, cfg)
  >>> y = apply(params, lora, x)
  >>> bool(np.allclose(y, model(lorax_jax.merge(params, lora, cfg), x), atol=1e-5))
  True
  >>> apply.fallbacks  # nothing had to be merged
  set()

  Args:
    apply_fn: ``apply_fn(params, *args, **kwargs)``, e.g. a linen ``model.apply`` or
      ``lambda state, x: nnx.merge(graphdef, state)(x)``.
    params: the frozen params (their structure and shapes decide the targets).
    cfg: the `LoraConfig`.
    mode: ``"factored"`` (the engine, never forms ``W'``) or ``"reference"``
      (``apply_fn(merge(params, lora, cfg), ...)``; no LoRA dropout).
    strict: raise instead of merging a kernel that reaches an unsupported operation, and factor
      every use the engine has a rule for (the cost rule, which merges a use where a training
      step is cheaper merged, is off).

  Returns:
    A pure function with ``apply_fn``'s outputs. In factored mode it is a `LoraApply`
    whose ``fallbacks`` lists ``(kernel, operation)`` pairs that were merged (no rule, or
    cheaper merged: docs/engine.md's cost rule). Built with the
    config `stack_adapters` returns, it runs a stacked tree as a mixed batch:
    ``lora_apply(params, stacked, x, adapter_ids=ids)``, example ``n`` through adapter ``ids[n]``
    (-1: the base model). The batch is axis 0 of the activation entering each use, checked at
    trace time; a use where it is not, and a use with no per-example rule (a conv, an embedding
    lookup, a ``ragged_dot``, a merged fallback), is a ValueError naming the kernel and the
    primitive (docs/many-adapters.md).

  Raises:
    ValueError: from `find_targets` (a target that matches nothing, a bad rank); ``mode`` unknown.
      At call time: a LoRA tree or params that do not fit (the path named), ``rng`` not a key,
      and with ``strict`` a kernel reaching an operation without a rule; a stacked tree without
      ``adapter_ids``, ``adapter_ids`` with a plain tree, ids that are not a 1-D integer array or
      (when concrete) outside ``[-1, k)``, a use a mixed batch cannot run.
  """
  if mode == "reference":
    targets = find_targets(params, cfg)

    def reference_apply(params: Any, lora: Lora, *args: Any, rng: jax.Array | None = None,
                        adapter_ids: jax.Array | None = None, **kwargs: Any) -> Any:
      del rng  # the merged path has no branch input to drop out
      if adapter_ids is not None or is_stacked(lora):
        raise ValueError("lora_transform(mode='reference') merges one adapter into the weights; a stacked tree "
                         "and adapter_ids (a mixed batch) need mode='factored'")
      check_factors(targets, lora)
      return apply_fn(merge(params, lora, cfg), *args, **kwargs)
    return reference_apply
  if mode != "factored":
    raise ValueError(f"lora_transform: mode must be 'factored' or 'reference', got {mode!r}")
  return LoraApply(apply_fn, params, cfg, strict)


def mixed_kernel(w: jax.Array | QuantizedKernel, node: Lora, t: Target, index: int, ids: jax.Array) -> LoraKernel:
  """Target ``t``'s kernel in a mixed batch, from its stacked node ``{"a", "b", "scale"(, "m")}``.

  Adapter ``j``'s scale is folded into its ``b`` (read under ``stop_gradient``: the scales are
  constants, their gradient is zero), DoRA's ``g`` computed per adapter, and two adapters appended:
  a zero one for the base model's rows (``g`` = 1) and a NaN one for ids out of range (which only a
  traced call can reach: its rows come out NaN, never another adapter's). ``ids`` becomes each
  example's row of these.
  """
  a, b = jax.vmap(t.masked)(node["a"], node["b"])
  scale = jax.lax.stop_gradient(node[SCALE])
  b = b * scale.astype(b.dtype).reshape(-1, *(1,) * (b.ndim - 1))
  k = LoraKernel(w, a, b, _labels(t), index, 1.0, t.uses, ids=ids)
  g = dora_scale(k, node["m"]) if t.dora else None
  count = a.shape[0]

  def extended(x: jax.Array, base: float) -> jax.Array:
    fill = lambda v: jnp.full((1, *x.shape[1:]), v, x.dtype)
    return jnp.concatenate([x, fill(base), fill(jnp.nan)])
  rows = jnp.where(ids == -1, count, jnp.where((ids >= 0) & (ids < count), ids, count + 1))
  return dataclasses.replace(k, a=extended(a, 0.0), b=extended(b, 0.0), g=None if g is None else extended(g, 1.0),
                             ids=rows.astype(jnp.int32))


def _labels(t: Target) -> tuple[Label, ...]:
  """The `LoraKernel` labels of a target's layout: its n-th ``s``/``i``/``o`` axis is
  ``("s", n)`` / ``("a", n)`` / ``("b", n)``."""
  side = {"s": "s", "i": "a", "o": "b"}
  return tuple((side[c], t.axes[:j].count(c)) for j, c in enumerate(t.axes))


def is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic)) or hasattr(x, "aval")

