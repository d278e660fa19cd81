"""`combine`: one adapter from several, PEFT's ``add_weighted_adapter`` (PEFT 0.21's math).

At a target, adapter ``i`` (weight ``w_i``) has scale ``s_i``, ``A_i = a_i`` (PEFT's ``lora_A``,
``[r_i, in]``) and ``B_i = b_iᵀ`` (``lora_B``, ``[out, r_i]``), so ``ΔW_i = s_i B_i A_i``. Only
the adapters that adapt a target take part there; the result adapts the union of the targets. It
has scale 1 (PEFT's new config has ``lora_alpha = r``; here ``alpha = r`` per target, no rsLoRA):

- ``"cat"``: ``A = [w_1 s_1 A_1; …; w_n s_n A_n]``, ``B = [B_1 … B_n]``, so ``ΔW = Σ w_i s_i B_i A_i``
  exactly, at rank ``Σ r_i`` (PEFT pads every target to the sum of each adapter's largest rank:
  the same ``ΔW``).
- the factor methods ``"linear"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"``,
  ``"magnitude_prune"`` merge each factor on its own,
  ``A = merge({A_i}, {σ_i √|w_i s_i|})`` and ``B = merge({B_i}, {√|w_i s_i|})`` with
  ``σ_i = sign(w_i s_i)`` (+1 at 0): ``B A ≠ Σ w_i s_i B_i A_i`` in general, an approximation
  that needs every adapter of a target at one rank (the result's).
- the SVD methods ``"svd"``, ``"ties_svd"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``,
  ``"magnitude_prune_svd"`` merge the updates, ``D = merge({ΔW_i}, {w_i})``, and truncate the SVD
  ``D = U S Vᴴ`` (reduced, per stacked slice, ``D`` as torch's ``[out, in]`` matrix) to rank ``k``:
  ``B = U_k S_k``, ``A = Vᴴ_k``; with ``svd_clamp = q`` both are clamped to ``±h``,
  ``h = quantile(concat(B, A), q)`` (linear interpolation, per slice). The clamp depends on the
  sign of each singular pair, which LAPACK leaves open (PEFT takes torch's): here the largest
  ``|entry|`` of each column of ``U`` is positive. Beyond the rank of ``D`` the singular vectors
  are any basis of a null space, so there the clamp (PEFT's too) depends on the SVD routine. ``k`` is ``svd_rank`` or
  the largest rank in any of the configs (PEFT's ``max(r, *rank_pattern.values())``).

``merge(T, ω)`` of tensors ``T_i`` with weights ``ω_i`` (SVD methods: the name without ``_svd``;
``"svd"`` is ``"linear"``):

- ``linear``: ``Σ ω_i T_i`` (task arithmetic).
- ``magnitude_prune``: ``Σ ω_i P(T_i)``, ``P`` keeping the ``⌊density · n⌋`` entries of largest
  ``|·|`` of each tensor of ``n`` entries (a tensor: one module, so one stacked slice) and zeroing
  the rest.
- ``ties``: ``P`` as above, the elected sign ``σ = sign(Σ_i P(T_i))`` (``majority_sign_method
  "total"``) or ``sign(Σ_i sign P(T_i))`` (``"frequency"``), ``+1`` where that is 0, then
  ``Σ_i ω_i P(T_i) [sign P(T_i) = σ] / max(1, #{i: sign P(T_i) = σ})``.
- ``dare_linear`` / ``dare_ties``: as ``linear`` / ``ties`` with ``P(T) = T ⊙ M / density``,
  ``M ~ Bernoulli(density)`` per entry. PEFT draws ``M`` with ``torch.bernoulli``; here it comes
  from ``key``: with ``keys = jax.random.split(key, (n_targets, 2, n_adapters))`` (targets of the
  result in the params' tree order), adapter ``i``'s mask at target ``j`` is
  ``jax.random.bernoulli(keys[j, side, i], density, x.shape)`` with ``x`` its ``a`` (side 0) or
  ``b`` (side 1) in lorax_jax's layout, or for the SVD methods its kernel-shaped ``ΔW_i`` (side 0).

``density >= 1`` prunes nothing; with one adapter every method is ``"linear"`` (both PEFT's rules).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from lorax_jax.adapters import READING_FIELDS, adapter_targets, check_same_reading, unit_config
from lorax_jax.config import LoraConfig
from lorax_jax.init import torch_matrices
from lorax_jax.lora_tree import Lora, target_factors
from lorax_jax.paths import Path, set_path
from lorax_jax.qarray import leaves_with_paths
from lorax_jax.targets import Target, accumulation_dtype

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = (*FACTOR_METHODS, "cat", *SVD_METHODS)
SIGN_METHODS = ("total", "frequency")
Method = Literal["linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                 "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"]


@dataclasses.dataclass(frozen=True)
class _Merge:
  """``merge`` (module docstring) in two steps: `pruned` each tensor, then `mix` them."""

  method: str  # one of FACTOR_METHODS
  density: float | None
  sign_method: str

  @property
  def prune(self) -> str | None:
    """``"random"`` (DARE), ``"magnitude"`` or None."""
    if self.method.startswith("dare"):
      return "random"
    return "magnitude" if self.method in ("ties", "magnitude_prune") else None

  def pruned(self, x: jax.Array, n_slices: int, key: jax.Array | None) -> jax.Array:
    """``P(x)`` in float32 or wider; ``x``'s leading axes are ``n_slices`` slices, each one
    tensor of PEFT's (used by magnitude pruning only)."""
    x = jnp.asarray(x, accumulation_dtype(x))
    if self.prune is None or self.density >= 1:
      return x
    if self.prune == "random":
      return x * jax.random.bernoulli(key, self.density, x.shape).astype(x.dtype) / self.density
    rows = x.reshape(n_slices, -1)
    keep = jnp.zeros(rows.shape, bool)
    top = int(self.density * rows.shape[1])
    if top:
      keep = keep.at[jnp.arange(n_slices)[:, None], jax.lax.top_k(jnp.abs(rows), top)[1]].set(True)
    return jnp.where(keep, rows, 0).reshape(x.shape)

  def mix(self, pruned: Sequence[jax.Array], weights: Sequence[float]) -> jax.Array:
    """The weighted sum of the pruned tensors, or TIES' disjoint merge of them."""
    x = jnp.stack(pruned)
    w = jnp.asarray(weights, x.dtype).reshape(-1, *(1,) * (x.ndim - 1))
    if not self.method.endswith("ties"):
      return (x * w).sum(0)
    sign = jnp.sign(x)
    votes = x.sum(0) if self.sign_method == "total" else sign.sum(0)
    agree = sign == jnp.where(votes >= 0, 1, -1).astype(x.dtype)
    return (x * w * agree).sum(0) / jnp.maximum(agree.sum(0), 1).astype(x.dtype)


def combine(params: Any, loras: Sequence[Lora], cfgs: Sequence[LoraConfig], weights: Sequence[float],
            method: Method = "linear", *, density: float | None = None,
            majority_sign_method: Literal["total", "frequency"] = "total", svd_rank: int | None = None,
            svd_clamp: float | None = None, key: jax.Array | None = None) -> tuple[Lora, LoraConfig]:
  """One adapter from ``loras``, as PEFT's ``add_weighted_adapter`` makes it (module docstring).

  Args:
    params: the base the adapters were made for.
    loras, cfgs: the adapters and their configs (plain LoRA: no DoRA, no ``modules_to_save``,
      PiSSA/OLoRA converted with `on_original_base` first).
    weights: one weight per adapter, any sign.
    method: one of `METHODS`.
    density: the fraction of entries kept, in ``[0, 1]`` (``(0, 1]`` for the ``dare`` methods);
      needed by every method but ``linear``, ``cat`` and ``svd``.
    majority_sign_method: ``"total"`` or ``"frequency"``, for the ``ties`` methods.
    svd_rank: the rank of the SVD methods' result (default: the largest rank of any config).
    svd_clamp: a quantile in ``[0, 1]``: clamp the SVD methods' factors to ``±`` that quantile
      of their entries (PEFT's ``svd_clamp``).
    key: a PRNG key, for the ``dare`` methods' masks.

  Returns:
    ``(lora, cfg)``: the combined adapter (in the first adapter's factor dtype at each target)
    and its config (each target at its rank with ``alpha = r``, the first config's dropout).

  Raises:
    ValueError: a bad argument (named); an adapter that does not fit its config; DoRA; adapters
      reading one kernel with different layouts or uses; a factor method over different ranks
      at a target; a result rank above a kernel's ``min(in, out)``.
    TypeError: no ``key`` for a ``dare`` method.

  >>> import jax, jax.numpy as jnp, lorax_jax
  >>> params = {"attn": {"query": {"kernel": jnp.ones((4, 6))}}}
  >>> cfgs = [lorax_jax.LoraConfig(r=1, alpha=2), lorax_jax.LoraConfig(r=2, alpha=2)]
  >>> loras = [jax.tree.map(lambda x: x + 1, lorax_jax.init_lora(params, c, jax.random.key(j)))
  ...          for j, c in enumerate(cfgs)]
  >>> lora, cfg = lorax_jax.combine(params, loras, cfgs, [0.5, 2.0], "cat")
  >>> lora["attn"]["query"]["kernel"]["a"].shape, cfg.r
  ((3, 4), 3)
  >>> want = sum(w * d for w, c, l in zip([0.5, 2.0], cfgs, loras)
  ...            for d in lorax_jax.delta(params, l, c).values())
  >>> got, = lorax_jax.delta(params, lora, cfg).values()
  >>> bool(jnp.allclose(got, want, atol=1e-5))
  True
  """
  _check_arguments(loras, cfgs, weights, method, density, majority_sign_method, svd_rank, svd_clamp)
  method = "linear" if len(loras) == 1 else method
  if method.startswith("dare") and key is None:
    raise TypeError(f"combine: method {method!r} draws random masks: pass key=jax.random.key(seed)")
  targets = [adapter_targets(params, lora, cfg, i, "combine") for i, (lora, cfg) in enumerate(zip(loras, cfgs))]
  if any(cfg.use_dora for cfg in cfgs):
    raise ValueError(f"combine: adapter {next(i for i, c in enumerate(cfgs) if c.use_dora)} is DoRA; combining "
                     "adapters combines their low-rank updates only, and DoRA's magnitudes have no such "
                     "combination (PEFT's add_weighted_adapter leaves them out)")
  factors = [{t.path: (t, a, b) for t, a, b in target_factors(ts, lora)} for ts, lora in zip(targets, loras)]
  order = {p: n for n, (p, _) in enumerate(leaves_with_paths(params))}
  paths = sorted({p for ts in targets for p in ts}, key=order.__getitem__)
  keys = jax.random.split(key, (len(paths), 2, len(loras))) if method.startswith("dare") else None
  svd_k = svd_rank or max(max([cfg.r, *cfg.rank_pattern.values()]) for cfg in cfgs)
  merge = _Merge(method.removesuffix("_svd").replace("svd", "linear"), density, majority_sign_method)
  out: Lora = {}
  ranks: dict[Path, int] = {}
  union: dict[Path, Target] = {}
  for j, path in enumerate(paths):
    parts = [(i, *f[path]) for i, f in enumerate(factors) if path in f]
    t = parts[0][1]
    for i, t_i, _, _ in parts[1:]:
      check_same_reading(t_i, i, t, parts[0][0], "combine", READING_FIELDS)  # other layers: masked to 0
    a, b = _combine_target(t, parts, weights, method, merge, None if keys is None else keys[j], svd_k, svd_clamp)
    ranks[path] = a.shape[t.n_stack]
    if ranks[path] > min(math.prod(t.in_shape), math.prod(t.out_shape)):
      raise ValueError(f"combine: the combined rank {ranks[path]} at {t.name} exceeds its input or output size "
                       f"(kernel {t.shape}); combine fewer adapters with 'cat', or use an SVD method")
    union[path] = t
    dtype = jnp.result_type(parts[0][2])
    set_path(out, path, {"a": a.astype(dtype), "b": b.astype(dtype)})
  return out, unit_config(ranks, union, cfgs[0])


def _combine_target(t: Target, parts: Sequence[tuple[int, Target, jax.Array, jax.Array]], weights: Sequence[float],
                    method: str, merge: _Merge, keys: jax.Array | None, svd_k: int, svd_clamp: float | None
                    ) -> tuple[jax.Array, jax.Array]:
  """``(a, b)`` of the combined adapter at target ``t`` from ``parts``, the ``(i, target, a, b)``
  of the adapters ``i`` that adapt it (module docstring); ``keys[side, i]``: DARE's mask keys."""
  key = lambda side, i: None if keys is None else keys[side, i]
  scaled = [weights[i] * t_i.scale for i, t_i, _, _ in parts]
  n_slices = math.prod(t.stack_shape)
  if method == "cat":
    a = jnp.concatenate([w * jnp.asarray(a_i, accumulation_dtype(a_i)) for w, (*_, a_i, _) in zip(scaled, parts)],
                        t.n_stack)
    return a, jnp.concatenate([b_i for *_, b_i in parts], t.n_stack)
  if method in SVD_METHODS:
    deltas = [t_i.delta(a_i, b_i) for _, t_i, a_i, b_i in parts]
    if merge.prune == "random":  # DARE's masks are drawn on the kernel-shaped updates
      deltas = [merge.pruned(d, n_slices, key(0, i)) for d, (i, *_) in zip(deltas, parts)]
    mats = [torch_matrices(t, d) for d in deltas]  # [slices, out, in]
    if merge.prune == "magnitude":
      mats = [merge.pruned(m, n_slices, None) for m in mats]
    return _svd_factors(t, merge.mix(mats, [weights[i] for i, *_ in parts]), svd_k, svd_clamp)
  ranks = sorted({t_i.rank for _, t_i, _, _ in parts})
  if len(ranks) > 1:
    raise ValueError(f"combine: method {method!r} merges factors entry by entry, so every adapter of a target "
                     f"needs one rank; {t.name} has ranks {ranks} (use 'cat' or an SVD method)")
  roots = [math.sqrt(abs(s)) for s in scaled]
  a = merge.mix([merge.pruned(a_i, n_slices, key(0, i)) for i, _, a_i, _ in parts],
                [r if s >= 0 else -r for r, s in zip(roots, scaled)])
  return a, merge.mix([merge.pruned(b_i, n_slices, key(1, i)) for i, _, _, b_i in parts], roots)


def _svd_factors(t: Target, d: jax.Array, rank: int, clamp: float | None) -> tuple[jax.Array, jax.Array]:
  """``(a, b)`` of rank ``rank`` from the truncated SVD of ``d [slices, out, in]`` (module docstring)."""
  if rank > min(d.shape[1:]):
    raise ValueError(f"combine: SVD rank {rank} exceeds {t.name}'s input or output size (kernel {t.shape}); "
                     "pass a smaller svd_rank")
  u, s, vh = jnp.linalg.svd(d, full_matrices=False)
  u, s, vh = u[..., :rank], s[..., :rank], vh[..., :rank, :]
  # One sign per singular pair (the clamp's quantile depends on it): the largest |entry| of u's column positive.
  peak = jnp.take_along_axis(u, jnp.argmax(jnp.abs(u), axis=-2, keepdims=True), axis=-2)
  sign = jnp.where(peak < 0, -1, 1).astype(u.dtype)
  u, vh = u * (sign * s[..., None, :]), vh * jnp.swapaxes(sign, -1, -2)
  if clamp is not None:
    high = jax.vmap(lambda x, y: jnp.quantile(jnp.concatenate([x.ravel(), y.ravel()]), clamp))(u, vh)[:, None, None]
    u, vh = jnp.clip(u, -high, high), jnp.clip(vh, -high, high)
  t_k = dataclasses.replace(t, rank=rank)
  return vh.reshape(t_k.a_shape), jnp.swapaxes(u, -1, -2).reshape(t_k.b_shape)


def _check_arguments(loras: Sequence[Lora], cfgs: Sequence[LoraConfig], weights: Sequence[float], method: str,
                     density: float | None, sign_method: str, svd_rank: int | None, svd_clamp: float | None) -> None:
  """A ValueError naming the first bad argument."""
  if not loras or len(loras) != len(cfgs) or len(loras) != len(weights):
    raise ValueError(f"combine: needs one config and one weight per adapter, got {len(loras)} adapters, "
                     f"{len(cfgs)} configs and {len(weights)} weights")
  if not all(isinstance(w, numbers.Real) and math.isfinite(w) for w in weights):
    raise ValueError(f"combine: weights must be finite numbers, got {list(weights)!r}")
  if method not in METHODS:
    raise ValueError(f"combine: method must be one of {METHODS}, got {method!r}")
  if sign_method not in SIGN_METHODS:
    raise ValueError(f"combine: majority_sign_method must be one of {SIGN_METHODS}, got {sign_method!r}")
  if method not in ("linear", "cat", "svd"):
    low = 0.0 if "dare" not in method else None
    if (not isinstance(density, numbers.Real) or not density <= 1
        or not (density >= low if low is not None else density > 0)):
      raise ValueError(f"combine: method {method!r} needs density, the fraction of entries kept, in "
                       f"{'[0, 1]' if low is not None else '(0, 1] (DARE divides by it)'}; got {density!r}")
  if svd_rank is not None and not (isinstance(svd_rank, numbers.Integral) and svd_rank >= 1):
    raise ValueError(f"combine: svd_rank must be a positive integer, got {svd_rank!r}")
  if svd_clamp is not None and not (isinstance(svd_clamp, numbers.Real) and 0 <= svd_clamp <= 1):
    raise ValueError(f"combine: svd_clamp must be a quantile in [0, 1], got {svd_clamp!r}")
