"""Many adapters over one base as one tree: `stack_adapters`, `unstack_adapters`, `swap_adapter`,
`take_adapter`.

(Not `lorax_jax.io.stacked`, which is about ``nn.scan`` *layers* stacked in one kernel.)

``k`` adapters of the same targets (one params tree, the same kernels with the same layouts)
stack into one LoRA tree with a leading adapter axis. Each target's node is

    {"a": [k, *S, R, *I], "b": [k, *S, R, *O], "scale": [k]}      DoRA: also "m": [k, *S, *O]

with ``S``, ``I``, ``O`` the target's stack, input and output axes (`lorax_jax.targets`) and ``R``
its padded rank: the largest rank any of the ``k`` adapters has there, or ``max_rank``. Adapter
``j`` of rank ``r_j`` at that target fills rows ``0 … r_j-1`` of ``a[j]`` and ``b[j]``; rows
``r_j … R-1`` are zero, so

    scale[j] · Σ_{ρ<R} a[j, ρ] ⊗ b[j, ρ]  =  s_j · Σ_{ρ<r_j} a_j[ρ] ⊗ b_j[ρ]  =  ΔW_j     exactly

(each padded term is a product of exact zeros), where ``s_j`` is adapter ``j``'s own scale at that
target, ``alpha_j / r_j`` (``alpha_j / sqrt(r_j)`` with rsLoRA), ``rank_pattern`` and
``alpha_pattern`` included, held in at least float32. Adapters of different ranks and alphas, and
a hot swap (`swap_adapter`), therefore keep every shape and dtype of the tree: a step compiled
for it is reused.

`stack_adapters` also returns the config of the stacked tree: it targets exactly these paths, each
at rank ``R`` with ``alpha = R`` and no rsLoRA, so its `Target.scale` is 1 and the scale comes from
the tree alone; ``find_targets(params, cfg)`` gives the shapes of one adapter's slice ``a[j]``,
``b[j]``.

One adapter of the tree runs as a plain LoRA tree of that config: `take_adapter` gives
``{"a": a[j], "b": scale[j] · b[j]}``, traced inside ``jit`` (the scale folded into ``b`` is an
array, so ``alpha`` and ``r`` are values of the compiled step, not constants of it). Hot swap of a
single adapter is therefore ``stack_adapters(params, [(lora, cfg)], max_rank=R)`` (``k = 1``),
a step that calls `take_adapter` on its stacked-tree argument, and `swap_adapter`: every adapter of
rank ≤ ``R`` at each target, of any alpha, runs in the step compiled once (PEFT's
``prepare_model_for_compiled_hotswap(model, target_rank=R)`` and ``hotswap_adapter``).

Running: ``lora_transform(model, params, cfg)(params, stacked, x, adapter_ids=ids)`` sends example
``n`` through adapter ``ids[n]`` (-1: the base model), a mixed batch (docs/many-adapters.md).

Training: ``scale`` is a constant, not a parameter (the engine reads it under ``stop_gradient``).
`lorax_jax.per_adapter` maps an optax optimizer over the adapter axis and holds every ``scale`` leaf
fixed (zero update, no state). A padded row's gradient is exactly zero (each padded term is
multiplied by the other factor's zero row), so under `per_adapter` padded rows stay zero (Adam's
update of a zero gradient from a zero state is zero, weight decay of zero is zero).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax.config import LoraConfig
from lorax_jax.io.modules import exact_config
from lorax_jax.lora_tree import SAVED_KEY, SCALE, TOKENS_KEY, Lora, check_factors, check_stacked, factor_names
from lorax_jax.paths import Path, get_path, path_str, set_path
from lorax_jax.qarray import leaves_with_paths
from lorax_jax.targets import Target, accumulation_dtype, find_targets

SHARED_FIELDS = ("dropout", "dropout_seed", "branch_dtype", "shared_dropout")  # one value runs a stacked tree
READING_FIELDS = (("axes", "kernel_axes"), ("uses", "target_uses"))  # `Target` fields, their `LoraConfig` names
LAYOUT_FIELDS = (*READING_FIELDS, ("layers", "layers_to_transform"))
Adapter = tuple[Lora, LoraConfig]


def stack_adapters(params: Any, loras: Sequence[Lora] | Sequence[Adapter], cfgs: Sequence[LoraConfig] | None = None,
                   *, max_rank: int | None = None) -> tuple[Lora, LoraConfig]:
  """``k`` adapters of the same targets as one tree with a leading adapter axis (module docstring).

  Each target's ``a`` and ``b`` are zero-padded along the rank axis to ``R`` (the largest rank of
  the adapters there, or ``max_rank``: at most ``min(in, out)``, the largest rank a target can
  have), so ``scale[j] · a[j] ⊗ b[j]`` is adapter ``j``'s ``ΔW`` exactly.

  Args:
    params: the base the adapters were made for.
    loras: the adapters' LoRA trees, or ``(lora, cfg)`` pairs (what `load_adapter` returns) when
      ``cfgs`` is None.
    cfgs: each adapter's config.
    max_rank: pad every target to this rank, so that `swap_adapter` can later put in an
      adapter of a larger rank than these.

  Returns:
    ``(stacked, cfg)``: the stacked tree, and the config of one adapter's slice of it (each
    target at its padded rank with scale 1).

  Raises:
    ValueError: no adapters; an adapter that does not fit its config (from `check_factors`, naming
      the adapter); adapters that target different kernels, read one with different layouts,
      uses or layers, mix DoRA and plain LoRA, differ in dropout settings or factor dtypes; an
      adapter of PiSSA/OLoRA (residual base) or with ``modules_to_save``; a rank above
      ``max_rank``.

  >>> import jax, jax.numpy as jnp, lorax_jax
  >>> params = {"attn": {"query": {"kernel": jnp.ones((4, 6))}}}
  >>> cfgs = [lorax_jax.LoraConfig(r=1, alpha=2), lorax_jax.LoraConfig(r=3, alpha=3)]
  >>> loras = [lorax_jax.init_lora(params, c, jax.random.key(j)) for j, c in enumerate(cfgs)]
  >>> stacked, cfg = lorax_jax.stack_adapters(params, loras, cfgs)
  >>> node = stacked["attn"]["query"]["kernel"]
  >>> node["a"].shape, node["b"].shape, node["scale"].tolist()
  ((2, 3, 4), (2, 3, 6), [2.0, 1.0])
  >>> bool((node["a"][0, 1:] == 0).all())
  True
  """
  adapters = _adapters(loras, cfgs)
  targets = _targets(params, [cfg for _, cfg in adapters], "stack_adapters")
  for j, ((lora, _), ts) in enumerate(zip(adapters, targets)):
    _check_factors(ts, lora, j, "stack_adapters")
    _check_dtypes(ts, lora, adapters[0][0], f"adapter {j}", "adapter 0", "stack_adapters")
  if max_rank is not None and not (isinstance(max_rank, numbers.Integral) and max_rank >= 1):
    raise ValueError(f"stack_adapters: max_rank must be a positive integer, got {max_rank!r}")
  ranks = {}
  for path, t in targets[0].items():
    largest = max(ts[path].rank for ts in targets)
    if max_rank is not None and largest > max_rank:
      j = next(j for j, ts in enumerate(targets) if ts[path].rank == largest)
      raise ValueError(f"stack_adapters: adapter {j} has rank {largest} at {t.name}, above max_rank={max_rank}")
    ranks[path] = largest if max_rank is None else min(max_rank, math.prod(t.in_shape), math.prod(t.out_shape))
  stacked: Lora = {}
  for path in targets[0]:
    nodes = [padded(ts[path], get_path(lora, path), ranks[path]) for ts, (lora, _) in zip(targets, adapters)]
    set_path(stacked, path, {k: jnp.stack([n[k] for n in nodes]) for k in nodes[0]})
  cfg0 = adapters[0][1]
  return stacked, unit_config(ranks, targets[0], cfg0, use_dora=cfg0.use_dora,
                              layers_to_transform=cfg0.layers_to_transform, layers_pattern=cfg0.layers_pattern)


def unstack_adapters(params: Any, stacked: Lora, cfgs: Sequence[LoraConfig]) -> list[Lora]:
  """The adapters of a stacked tree, each with its own ranks: ``stack_adapters``' inverse, exactly.

  Adapter ``j`` is rows ``0 … r_j-1`` of ``a[j]`` and ``b[j]`` (and ``m[j]``), ``r_j`` its rank
  per ``cfgs[j]``; each is an ordinary LoRA tree for ``(params, cfgs[j])`` (`save_adapter` writes
  it as a PEFT adapter).

  Outside ``jax.jit`` the tree is checked against ``cfgs``: every stored ``scale[j]`` must be
  ``cfgs[j]``'s scale, and every padded row zero (or it would be dropped).

  Args:
    params: the params tree the adapters were made for.
    stacked: the stacked tree (`stack_adapters`, possibly trained).
    cfgs: the configs the adapters were stacked with, in order.

  Returns:
    One LoRA tree per config, ``[lora_0, lora_1, ...]``.

  Raises:
    ValueError: the stacked tree does not hold ``len(cfgs)`` adapters of the configs' targets
      (a missing, unexpected or mis-shaped entry, named); a scale or a non-zero padded row that
      says these are not the configs it was stacked with; configs that cannot stack (as in
      `stack_adapters`).

  >>> import jax, jax.numpy as jnp, lorax_jax
  >>> params = {"attn": {"query": {"kernel": jnp.ones((4, 6))}}}
  >>> cfgs = [lorax_jax.LoraConfig(r=1), lorax_jax.LoraConfig(r=3)]
  >>> loras = [lorax_jax.init_lora(params, c, jax.random.key(j)) for j, c in enumerate(cfgs)]
  >>> stacked, _ = lorax_jax.stack_adapters(params, loras, cfgs)
  >>> back = lorax_jax.unstack_adapters(params, stacked, cfgs)
  >>> back[0]["attn"]["query"]["kernel"]["a"].shape
  (1, 4)
  >>> all(bool((x == y).all()) for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(loras)))
  True
  """
  who = "unstack_adapters"
  targets = _targets(params, cfgs, who)
  _, ranks = check_stacked(stacked, targets[0], len(cfgs), who)
  out = []
  for j, ts in enumerate(targets):
    lora: Lora = {}
    for path, t in ts.items():
      node = get_path(stacked, path)
      if t.rank > ranks[path]:
        raise ValueError(f"{who}: cfgs[{j}] has rank {t.rank} at {t.name}, but the stacked tree's rank there "
                         f"is {ranks[path]}: these are not the configs it was stacked with")
      _check_slice(node, j, t, who)
      rows = {k: jax.lax.slice_in_dim(node[k][j], 0, t.rank, axis=t.n_stack) for k in ("a", "b")}
      set_path(lora, path, {**rows, **({"m": node["m"][j]} if t.dora else {})})
    out.append(lora)
  return out


def swap_adapter(params: Any, stacked: Lora, i: int, lora: Lora, cfg: LoraConfig) -> Lora:
  """``stacked`` with adapter ``i`` replaced by ``lora`` (hot swap), every shape and dtype kept.

  ``lora`` may have any rank up to the stacked tree's padded rank at each target; it is padded
  as in `stack_adapters` and its scale written to ``scale[i]``. A jitted function taking the
  stacked tree as an argument runs the result without retracing.

  Args:
    params: the params tree the adapters are for.
    stacked: the stacked tree (`stack_adapters`); not mutated.
    i: the index of the adapter to replace.
    lora: the new adapter's LoRA tree.
    cfg: the new adapter's config.

  Returns:
    A new stacked tree with ``lora`` (zero-padded) and its scale at index ``i``.

  Raises:
    ValueError: ``i`` out of range; ``lora`` does not fit ``cfg``, targets other kernels than
      the stacked tree (naming them, with the new adapter's ranks there), reads them with other
      shapes, has a rank above the padded rank (naming the target and both ranks),
      other factor dtypes, DoRA where the tree has none (or the reverse), PiSSA/OLoRA factors
      or ``modules_to_save`` copies.

  >>> import jax, jax.numpy as jnp, lorax_jax
  >>> params = {"attn": {"query": {"kernel": jnp.ones((4, 6))}}}
  >>> cfg = lorax_jax.LoraConfig(r=1)
  >>> lora = lorax_jax.init_lora(params, cfg, jax.random.key(0))
  >>> stacked, _ = lorax_jax.stack_adapters(params, [lora, lora], [cfg, cfg], max_rank=4)
  >>> big = lorax_jax.LoraConfig(r=4, alpha=2)
  >>> new = lorax_jax.swap_adapter(params, stacked, 1, lorax_jax.init_lora(params, big, jax.random.key(1)), big)
  >>> new["attn"]["query"]["kernel"]["a"].shape, new["attn"]["query"]["kernel"]["scale"].tolist()
  ((2, 4, 4), [2.0, 0.5])
  """
  who = "swap_adapter"
  (ts,) = _targets(params, [cfg], who)
  _check_factors(ts, lora, i, who)
  _check_same_kernels(ts, stacked, who)
  k, ranks = check_stacked(stacked, ts, None, who)
  if not (isinstance(i, numbers.Integral) and 0 <= i < k):
    raise ValueError(f"{who}: adapter index {i!r} is out of range for a stacked tree of {k} adapters")
  _check_dtypes(ts, lora, stacked, "the new adapter", "the stacked tree", who)
  out = jax.tree_util.tree_map(lambda x: x, stacked)  # fresh containers; the input is not mutated
  for path, t in ts.items():
    if t.rank > ranks[path]:
      raise ValueError(f"{who}: the new adapter has rank {t.rank} at {t.name}, above the stacked tree's padded "
                       f"rank {ranks[path]} (stack with max_rank={t.rank} or more to make room)")
    node = padded(t, get_path(lora, path), ranks[path])
    old = get_path(stacked, path)
    set_path(out, path, {key: old[key].at[i].set(node[key]) for key in old})
  return out


def take_adapter(stacked: Lora, i: int | jax.Array) -> Lora:
  """Adapter ``i`` of a stacked tree as a plain LoRA tree of the stacked config, inside ``jit``.

  Each node ``{"a", "b", "scale"}`` (DoRA: ``"m"``) becomes

      {"a": a[i], "b": scale[i] · b[i]}          (DoRA: "m": m[i])

  a LoRA tree for the config `stack_adapters` returns (every target at its padded rank, scale 1),
  so ``lora_transform(apply_fn, params, cfg)(params, take_adapter(stacked, i), x)`` runs adapter
  ``i`` with its own ``ΔW_i = s_i · A_i ⊗ B_i`` exactly (the padded rows are zero). The scale is
  read from the tree, so a jitted step taking ``stacked`` as an argument runs every adapter
  `swap_adapter` puts in (any rank up to the padded one, any alpha, rsLoRA or not) without
  retracing. Gradients reach ``a`` and ``b`` as for the adapter alone (``∂L/∂b_i = s_i ·
  ∂L/∂b'_i``), zero on padded rows, and exactly zero on ``scale`` (a constant: `per_adapter`
  holds it fixed). ``b`` keeps its dtype (the product is rounded to it once).

  Args:
    stacked: the stacked tree (`stack_adapters`, `swap_adapter`).
    i: the adapter's index: an int, checked to be in range; or a traced int32 scalar, for which
      an index outside ``0 … k-1`` (negative included) gives NaN factors, so it cannot run
      another adapter silently.

  Returns:
    Adapter ``i``'s LoRA tree, factors padded to the stacked tree's ranks.

  Raises:
    ValueError: a concrete ``i`` out of range; a node that is not a stacked node (no ``scale``
      beside ``a`` and ``b``, other keys) or leaves without the adapter axis, named.

  >>> import jax, jax.numpy as jnp, lorax_jax
  >>> params = {"attn": {"query": {"kernel": jnp.ones((4, 6))}}}
  >>> cfgs = [lorax_jax.LoraConfig(r=1, alpha=2), lorax_jax.LoraConfig(r=3, alpha=3)]
  >>> loras = [lorax_jax.init_lora(params, c, jax.random.key(j)) for j, c in enumerate(cfgs)]
  >>> loras = [jax.tree.map(lambda f: f + 1, lora) for lora in loras]
  >>> stacked, cfg = lorax_jax.stack_adapters(params, loras, cfgs)
  >>> one = lorax_jax.take_adapter(stacked, 0)
  >>> one["attn"]["query"]["kernel"]["b"].shape
  (3, 6)
  >>> got = lorax_jax.delta(params, one, cfg)[("attn", "query", "kernel")]
  >>> want = lorax_jax.delta(params, loras[0], cfgs[0])[("attn", "query", "kernel")]
  >>> bool(jnp.allclose(got, want))
  True
  """
  who = "take_adapter"
  scales = [(p, x) for p, x in leaves_with_paths(stacked) if p[-1:] == (SCALE,)]
  if not scales:
    raise ValueError(f"{who}: the tree has no {SCALE!r} leaves: it is not a stacked tree (stack_adapters makes one)")
  k = np.shape(scales[0][1])[0] if np.ndim(scales[0][1]) else 0
  for path, x in leaves_with_paths(stacked):
    if np.shape(x)[:1] != (k,):
      raise ValueError(f"{who}: {path_str(path)} has shape {tuple(np.shape(x))}, but {path_str(scales[0][0])} holds "
                       f"{k} adapters: every leaf of a stacked tree has the adapter axis first")
  if isinstance(i, jax.core.Tracer):
    index = jnp.where(i < 0, k, i)  # out of range both ways: `take`'s fill, not a wrap to the last adapter
  elif np.ndim(i) == 0 and np.issubdtype(np.asarray(i).dtype, np.integer):  # an int, a NumPy or concrete JAX one
    if not 0 <= int(i) < k:
      raise ValueError(f"{who}: adapter index {int(i)} is out of range for a stacked tree of {k} adapters")
    index = int(i)
  else:
    raise ValueError(f"{who}: the adapter index must be an integer scalar, got {i!r}")
  pick = lambda x: jnp.take(x, index, axis=0, mode="fill", fill_value=jnp.nan)

  def node(path: Path, tree: Any) -> Any:
    if isinstance(tree, Mapping) and SCALE not in tree and not {"a", "b"} & set(tree):
      return {key: node((*path, key), sub) for key, sub in tree.items()}
    keys = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
    if not isinstance(tree, Mapping) or not {"a", "b", SCALE} <= set(tree) <= {"a", "b", "m", SCALE}:
      raise ValueError(f"{who}: {path_str(path)} must be a stacked node {{'a', 'b', 'scale'}} (DoRA: and 'm'), "
                       f"got {keys}")
    b = pick(tree["b"])
    out = {"a": pick(tree["a"]), "b": (b * jax.lax.stop_gradient(pick(tree[SCALE]))).astype(b.dtype)}
    return {**out, **({"m": pick(tree["m"])} if "m" in tree else {})}

  return node((), stacked)


def padded(t: Target, node: Mapping[str, jax.Array], rank: int) -> dict[str, jax.Array]:
  """One adapter's node of target ``t`` as a slice of a stacked tree: ``a`` and ``b`` zero-padded
  to ``rank`` along the rank axis, its scale (at least float32), and DoRA's ``m``."""
  def pad(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    return jnp.pad(x, [(0, rank - t.rank) if ax == t.n_stack else (0, 0) for ax in range(x.ndim)])
  a, b = pad(node["a"]), pad(node["b"])
  out = {"a": a, "b": b, SCALE: jnp.asarray(t.scale, accumulation_dtype(a))}
  if t.dora:
    out["m"] = jnp.asarray(node["m"])
  return out


def unit_config(ranks: Mapping[Path, int], targets: Mapping[Path, Target], cfg: LoraConfig,
                **fields: Any) -> LoraConfig:
  """A config that targets exactly ``ranks``' paths at those ranks with ``alpha = rank`` and no
  rsLoRA (every `Target.scale` is 1), with ``targets``' layouts and uses, ``cfg``'s dropout
  settings and dtypes, and ``fields``."""
  top = max(ranks.values())
  uses = {re.escape(targets[p].name): targets[p].uses for p in ranks if targets[p].uses is not None}
  return exact_config(ranks, ranks, top, top, kernel_axes={re.escape(targets[p].name): targets[p].axes for p in ranks},
                      **({"target_uses": uses} if uses else {}),
                      **{f: getattr(cfg, f) for f in (*SHARED_FIELDS, "param_dtype")}, **fields)


def adapter_targets(params: Any, lora: Lora, cfg: LoraConfig, j: int, who: str) -> dict[Path, Target]:
  """The targets of adapter ``j``, checked to be a plain adapter tree that fits them.

  Raises:
    ValueError: from `check_factors` (prefixed with ``who`` and the adapter); PiSSA/OLoRA (whose
      factors apply to a residual base); ``modules_to_save`` copies.
  """
  targets = _config_targets(params, cfg, j, who)
  _check_factors(targets, lora, j, who)
  return targets


def _config_targets(params: Any, cfg: LoraConfig, j: int, who: str) -> dict[Path, Target]:
  if cfg.lora_bias or cfg.bias != "none":
    raise ValueError(f"{who}: adapter {j} trains biases (lora_bias={cfg.lora_bias}, bias={cfg.bias!r}), which add "
                     "to the frozen bias and so cannot differ per example; only single adapters support them")
  if cfg.changes_base:
    raise ValueError(f"{who}: adapter {j} has init={cfg.init!r}, whose factors apply to a residual base; convert "
                     "it to a plain LoRA of the original base first (lorax_jax.on_original_base)")
  return find_targets(params, cfg)


def _check_factors(targets: Mapping[Path, Target], lora: Lora, j: int, who: str) -> None:
  if isinstance(lora, Mapping) and TOKENS_KEY in lora:
    raise ValueError(f"{who}: adapter {j} holds {TOKENS_KEY} rows (trainable_token_indices), which only single "
                     "adapters support")
  if isinstance(lora, Mapping) and SAVED_KEY in lora:
    raise ValueError(f"{who}: adapter {j} holds {SAVED_KEY} copies (modules trained in full), which only "
                     "single adapters support")
  try:
    check_factors(targets, lora)
  except (ValueError, TypeError) as e:
    raise type(e)(f"{who}: adapter {j}: {e}") from None


def _adapters(loras: Sequence[Any], cfgs: Sequence[LoraConfig] | None) -> list[Adapter]:
  """``loras`` and ``cfgs`` as ``(lora, cfg)`` pairs; ``cfgs`` None: ``loras`` are pairs already."""
  if cfgs is None:
    pairs = list(loras)
    bad = [j for j, p in enumerate(pairs) if not (isinstance(p, tuple) and len(p) == 2
                                                 and isinstance(p[1], LoraConfig))]
    if bad:
      raise ValueError(f"stack_adapters: without cfgs, loras must be (lora, cfg) pairs; item {bad[0]} is not")
  else:
    pairs = list(zip(loras, cfgs))
    if len(loras) != len(cfgs):
      raise ValueError(f"stack_adapters: {len(loras)} LoRA trees but {len(cfgs)} configs")
  if not pairs:
    raise ValueError("stack_adapters: no adapters to stack")
  return pairs


def _targets(params: Any, cfgs: Sequence[LoraConfig], who: str) -> list[dict[Path, Target]]:
  """Each config's targets, checked to stack: the same kernels with the same layouts, uses and
  layers, all DoRA or none, one dropout setting."""
  if not cfgs:
    raise ValueError(f"{who}: no adapter configs")
  out = [_config_targets(params, cfg, j, who) for j, cfg in enumerate(cfgs)]
  cfg0, ts0 = cfgs[0], out[0]
  for j, (cfg, ts) in enumerate(zip(cfgs, out)):
    if cfg.use_dora != cfg0.use_dora:
      kinds = ["DoRA" if c.use_dora else "plain LoRA" for c in (cfg, cfg0)]
      raise ValueError(f"{who}: adapter {j} is {kinds[0]} but adapter 0 is {kinds[1]}; mixed DoRA and plain "
                       "LoRA adapters do not stack (a plain adapter has no magnitudes)")
    for field in SHARED_FIELDS:
      if getattr(cfg, field) != getattr(cfg0, field):
        raise ValueError(f"{who}: adapter {j} has {field}={getattr(cfg, field)!r}, adapter 0 "
                         f"{getattr(cfg0, field)!r}; a stacked tree runs with one {field}")
    only = [path_str(p) for p in ts if p not in ts0]
    missing = [path_str(p) for p in ts0 if p not in ts]
    if only or missing:
      detail = "; ".join(s for s in (f"only adapter {j} targets {', '.join(only[:5])}" if only else "",
                                     f"only adapter 0 targets {', '.join(missing[:5])}" if missing else "") if s)
      raise ValueError(f"{who}: adapters {j} and 0 target different kernels ({detail}); stacked adapters must "
                       "adapt the same kernels")
    for path, t in ts.items():
      check_same_reading(t, j, ts0[path], 0, who)
  return out


def check_same_reading(t: Target, j: int, t0: Target, j0: int, who: str,
                       fields: Sequence[tuple[str, str]] = LAYOUT_FIELDS) -> None:
  """Adapters ``j`` and ``j0`` read their kernel alike (`Target` ``fields``, named as in `LoraConfig`).

  Raises:
    ValueError: naming the first field that differs.
  """
  for field, name in fields:
    if getattr(t, field) != getattr(t0, field):
      raise ValueError(f"{who}: adapter {j} reads {t.name} with {name} {getattr(t, field)!r}, adapter {j0} with "
                       f"{getattr(t0, field)!r}; adapters of one kernel must read it alike")


def _check_dtypes(targets: Mapping[Path, Target], lora: Lora, reference: Lora, name: str, ref_name: str,
                  who: str) -> None:
  """Every factor of ``lora`` has the dtype of the same factor in ``reference``."""
  for path, t in targets.items():
    for k in sorted(factor_names(t)):
      got, want = jnp.result_type(get_path(lora, path)[k]), jnp.result_type(get_path(reference, path)[k])
      if got != want:
        raise ValueError(f"{who}: {name}'s factor {t.name}/{k} is {got}, {ref_name}'s {want}; cast it "
                         "(jax.tree.map(lambda x: x.astype(...), lora)) so the stacked tree keeps one dtype")


def _check_same_kernels(targets: Mapping[Path, Target], stacked: Lora, who: str) -> None:
  """The new adapter's ``targets`` are exactly the stacked tree's nodes (parents of its ``scale`` leaves).

  Raises:
    ValueError: naming the kernels only one of them adapts, with the new adapter's rank at each.
  """
  nodes = {p[:-1] for p, _ in leaves_with_paths(stacked) if p[-1:] == (SCALE,)}
  only_new = [f"{t.name} (rank {t.rank})" for p, t in targets.items() if p not in nodes]
  only_old = [path_str(p) for p in sorted(nodes) if p not in targets]
  if only_new or only_old:
    detail = "; ".join(s for s in (f"the new adapter adapts {', '.join(only_new[:5])}, the stacked tree does not"
                                   if only_new else "",
                                   f"the stacked tree adapts {', '.join(only_old[:5])}, the new adapter does not"
                                   if only_old else "") if s)
    raise ValueError(f"{who}: the new adapter targets other kernels than the stacked tree ({detail}); an adapter "
                     "swapped in must adapt exactly the stacked tree's kernels")



def _check_slice(node: Mapping[str, jax.Array], j: int, t: Target, who: str) -> None:
  """Adapter ``j``'s stored scale is ``t``'s and its padded rows are zero (when the values are
  concrete, i.e. outside ``jit``)."""
  if any(isinstance(node[k], jax.core.Tracer) for k in ("a", "b", SCALE)):
    return
  scale = node[SCALE][j]
  if scale != jnp.asarray(t.scale, scale.dtype):
    raise ValueError(f"{who}: the stacked tree's scale of adapter {j} at {t.name} is {float(scale):g}, cfgs[{j}] gives "
                     f"{t.scale:g} (rank {t.rank}, alpha {t.alpha:g}): these are not the configs it was stacked with")
  for k in ("a", "b"):
    rest = jax.lax.slice_in_dim(node[k][j], t.rank, node[k].shape[1 + t.n_stack], axis=t.n_stack)
    if bool(jnp.any(rest != 0)):
      raise ValueError(f"{who}: adapter {j}'s {t.name}/{k} is non-zero in the padded rows {t.rank}…; cfgs[{j}] says "
                       f"rank {t.rank}, so they would be lost (a config of too small a rank, or training that moved "
                       "padded rows: use lorax_jax.per_adapter)")
