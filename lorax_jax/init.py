"""`init_lora`: the LoRA pytree, and the check that a LoRA tree fits its params.

The LoRA tree mirrors the params tree as nested dicts keyed by the path strings, holding
only the targeted kernels, each replaced by ``{"a": a, "b": b}`` (layouts in
`lorax_jax.targets`), plus DoRA's magnitude ``"m"`` (shape `Target.m_shape`, initialised to ``‖W‖``)
with ``LoraConfig.use_dora``.

Initialisations (`LoraConfig.init`, PEFT's ``init_lora_weights``), written with PEFT's
``A = lora_A [r, in]`` (lorax_jax's ``a``) and ``B = lora_B [out, r]`` (``bᵀ``), ``W`` the kernel
as a torch ``[out, in]`` matrix (input axes flattened, per stacked slice), ``s`` the scale:

- ``"kaiming"``: ``A ~ U(±1/sqrt(in))``, ``B = 0``. ``"gaussian"``: ``A ~ N(0, 1/r²)``, ``B = 0``.
- ``"orthogonal"`` (even ``r``): ``Q`` the QR factor of an ``[r, r]`` gaussian,
  ``A = (G_A Q[0::2])ᵀ / 10``, ``B = G_Bᵀ Q[1::2] / 10`` with gaussians ``G_A [in, r/2]``,
  ``G_B [r/2, out]``; the rows of ``Q`` are orthonormal, so ``B A = 0``.
- ``"pissa"``: ``W = V S Uᴴ`` (SVD), ``A = sqrt(S_r / s) Uᴴ_r``, ``B = V_r sqrt(S_r / s)``, so
  ``s · B A`` is the top-``r`` part of ``W``. ``"pissa_niter_K"``: the same from torch's
  ``svd_lowrank(W, q=r, niter=K)`` (Halko et al.; a gaussian sketch, ``K`` power iterations).
- ``"olora"``: ``W = Q R`` (QR), ``A = R[:r]``, ``B = Q[:, :r]``, unscaled (PEFT's choice), so
  ``s · B A = s · Q_r R_r``.

Embedding tables keep PEFT's embedding init whatever ``init`` says (``a = 0``, ``b ~ N(0, 1)``),
as PEFT does; every init but PiSSA and OLoRA makes ``A ⊗ B = 0`` at step 0.

PiSSA and OLoRA put part of ``W`` in the factors, so the adapted model is ``W_res + s · A ⊗ B``
with the residual base ``W_res = W - s · A₀ ⊗ B₀`` (computed in float32, cast to ``W``'s dtype,
as PEFT does): `init_lora_and_base` returns both. After training, ``A ⊗ B - A₀ ⊗ B₀`` is a plain
LoRA of rank ``2r`` on the original ``W`` (`on_original_base`): ``a' = [a; a₀]``,
``b' = [b; -b₀]`` along the rank axis, ``r' = 2r`` and ``alpha' = 2·alpha`` (``sqrt(2)·alpha``
with rsLoRA) so that ``s`` is unchanged; PEFT's ``path_initial_model_for_weight_conversion``.

With ``LoraConfig.modules_to_save`` the tree also holds, under the top-level key `SAVED_KEY`
(``"modules_to_save"``), a nested dict mirroring ``params`` with a trainable copy of every
saved leaf (PEFT's ``modules_to_save``: a classification head, an embedding); the model runs
with those copies in place of the frozen leaves.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from lorax_jax.config import PISSA_NITER, LoraConfig
from lorax_jax.lora_tree import SAVED_KEY, TOKENS_KEY, Lora, target_factors
from lorax_jax.merge import unmerge
from lorax_jax.paths import Path, get_path, set_path
from lorax_jax.qarray import is_quantized, leaves_with_paths
from lorax_jax.targets import Target, accumulation_dtype, find_targets, saved_leaves, token_rows


def init_lora(params: Any, cfg: LoraConfig, rng: jax.Array) -> Lora:
  """Fresh factors for every target of ``cfg`` in ``params``; one key per target.

  ``cfg.init`` picks the factors (module docstring); with every init but PiSSA and OLoRA
  ``A ⊗ B = 0``, so the adapted model starts as the base model.
  With ``cfg.use_dora`` each target also gets ``m = ‖W‖`` per output unit
  (`Target.magnitude`), so ``W' = W`` at step 0.
  Kernels placed by ``NamedSharding``\\ s give factors created directly on their shardings,
  `lorax_jax.lora_shardings` (the rule is in `lorax_jax.sharding`); otherwise they are created
  on the default device.

  Args:
    params: the model's params tree (any pytree: nested dicts, Flax variables, Equinox modules).
    cfg: what to adapt and how.
    rng: one PRNG key (``jax.random.key(0)``), split into one key per target.

  Returns:
    The LoRA tree: ``{"a": [r, in], "b": [r, out]}`` (plus ``"m"`` with DoRA) at each target's
    path, and the ``modules_to_save`` copies under `SAVED_KEY`.

  Raises:
    TypeError: ``rng`` is not a single PRNG key.
    ValueError: from `find_targets` (nothing matched, a bad target); ``cfg.init`` is PiSSA or
      OLoRA (whose factors need the residual base: use `init_lora_and_base`); an odd rank
      with ``"orthogonal"``.

  >>> import jax, jax.numpy as jnp, lorax_jax
  >>> params = {"dense": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}}
  >>> lora = lorax_jax.init_lora(params, lorax_jax.LoraConfig(r=2, targets=["dense"]), jax.random.key(0))
  >>> jax.tree.map(jnp.shape, lora)
  {'dense': {'kernel': {'a': (2, 4), 'b': (2, 3)}}}
  >>> bool((lora["dense"]["kernel"]["b"] == 0).all())  # A ⊗ B = 0: the base model at step 0
  True
  """
  if cfg.changes_base:
    raise ValueError(f"init_lora: init={cfg.init!r} puts part of W in the factors, so the model must run on "
                     "the residual base W - s·A⊗B: use lora, params = init_lora_and_base(params, cfg, rng)")
  return init_lora_and_base(params, cfg, rng)[0]


def init_lora_and_base(params: Any, cfg: LoraConfig, rng: jax.Array) -> tuple[Lora, Any]:
  """``(lora, base)``: fresh factors as `init_lora`, and the base they go with.

  For PiSSA and OLoRA the base is the residual ``W - s · A₀ ⊗ B₀`` of every non-embedding
  target (accumulated in float32, cast to the kernel's dtype), so ``base + s · A₀ ⊗ B₀`` is
  ``params`` up to rounding; for the other inits it is ``params`` itself. Keep the returned
  ``lora`` as the initial adapter to save the trained one for the original base
  (``save_adapter(..., initial=lora0)``, `on_original_base`).

  Args:
    params: the model's params tree.
    cfg: what to adapt and how (any ``init``).
    rng: one PRNG key.

  Returns:
    ``(lora, base)``: the LoRA tree as `init_lora`'s, and the params to run it on.

  Raises:
    TypeError: ``rng`` is not a single PRNG key; a PiSSA/OLoRA target whose kernel is not a
      float array (quantize after initialising, on the residual).
    ValueError: from `find_targets`; an odd rank with ``"orthogonal"``.

  >>> import jax, jax.numpy as jnp, lorax_jax
  >>> params = {"dense": {"kernel": jnp.arange(48.0).reshape(8, 6) / 10}}
  >>> cfg = lorax_jax.LoraConfig(r=2, targets=["dense"], init="pissa")
  >>> lora0, base = lorax_jax.init_lora_and_base(params, cfg, jax.random.key(0))
  >>> d, = lorax_jax.delta(base, lora0, cfg).values()
  >>> bool(jnp.allclose(base["dense"]["kernel"] + d, params["dense"]["kernel"], atol=1e-4))
  True
  """
  if not _is_key(rng):
    raise TypeError(f"init_lora: rng must be one PRNG key such as jax.random.key(0), got {rng!r}")
  from lorax_jax.sharding import target_shardings  # sharding builds on this module
  targets = find_targets(params, cfg)
  saved = saved_leaves(params, cfg)
  shardings = target_shardings(params, targets, saved)
  kernels = dict(leaves_with_paths(params))  # any pytree: dicts, Equinox modules, ...
  read = [kernels[t.path] if cfg.changes_base or t.dora else None for t in targets.values()]

  def create(keys: jax.Array, read: list[Any]) -> tuple[list[Lora], list[Lora]]:
    nodes, exact = [], []  # exact: the float32 factors the residual is computed from, as PEFT does
    for key, t, kernel in zip(keys, targets.values(), read):
      a, b = t.masked(*_init_factors(key, t, cfg, kernel))
      exact.append({"a": a, "b": b})
      nodes.append({"a": a.astype(cfg.param_dtype), "b": b.astype(cfg.param_dtype)})
      if t.dora:
        nodes[-1]["m"] = t.magnitude(_float(kernel)).astype(cfg.param_dtype)
      if t.lora_bias:  # PEFT's zero init of lora_B.bias
        nodes[-1]["bias"] = jnp.zeros(t.m_shape, cfg.param_dtype)
    return nodes, exact if cfg.changes_base else []

  placed = [get_path(shardings, path) for path in targets]
  if any(isinstance(s, NamedSharding) for s in jax.tree_util.tree_leaves(placed)):  # each factor made on its shards
    exact_placed = [{"a": s["a"], "b": s["b"]} for s in placed] if cfg.changes_base else []
    create = jax.jit(create, out_shardings=(placed, exact_placed))
  nodes, exact = create(jax.random.split(rng, len(targets)), read)
  lora = _nested(targets, nodes)
  for path, leaf in saved.items():
    copy = jax.device_put(leaf, get_path(shardings, (SAVED_KEY, *path)), may_alias=False)
    set_path(lora.setdefault(SAVED_KEY, {}), path, copy)
  for path, idx in token_rows(params, cfg).items():  # PEFT starts trainable tokens at the table's rows
    set_path(lora.setdefault(TOKENS_KEY, {}), path, jnp.asarray(kernels[path])[jnp.asarray(idx)])
  if not cfg.changes_base:
    return lora, params
  return lora, unmerge(params, _nested(targets, exact), cfg.replace(use_dora=False))  # W_res = W - s·A₀⊗B₀


def on_original_base(params: Any, lora: Lora, initial: Lora, cfg: LoraConfig) -> tuple[Lora, LoraConfig]:
  """The plain LoRA of the original base equal to ``lora`` on the residual base of ``initial``.

  ``W_res + s · A ⊗ B = W + s · (A ⊗ B - A₀ ⊗ B₀)``: ``a' = [a; a₀]``, ``b' = [b; -b₀]`` along
  the rank axis, every rank doubled and every alpha times 2 (``sqrt(2)`` with rsLoRA) so that
  each scale ``s`` is unchanged; ``init`` becomes ``"kaiming"`` (a plain adapter). This is
  PEFT's ``save_pretrained(..., path_initial_model_for_weight_conversion=...)``, which also
  doubles ``rank_pattern`` / ``alpha_pattern`` (with rsLoRA and an ``alpha_pattern`` PEFT's
  doubling is wrong; here each alpha gets the rsLoRA factor).

  Args:
    params: the original params (or the residual base: only the targets' shapes are read).
    lora: the trained factors (for ``params`` with ``cfg``).
    initial: the factors as initialised (`init_lora_and_base`), same shapes.
    cfg: the config both were made with.

  Returns:
    ``(lora', cfg')``: the plain LoRA tree of rank ``2r`` for the original ``params``, and its
    config (ranks and alphas doubled, ``init="kaiming"``).

  Raises:
    ValueError: ``lora`` or ``initial`` does not fit ``cfg``'s targets (from `check_factors`).

  >>> import jax, jax.numpy as jnp, lorax_jax
  >>> params = {"dense": {"kernel": jnp.arange(48.0).reshape(8, 6) / 10}}
  >>> cfg = lorax_jax.LoraConfig(r=2, targets=["dense"], init="pissa")
  >>> lora0, base = lorax_jax.init_lora_and_base(params, cfg, jax.random.key(0))
  >>> trained = jax.tree.map(lambda x: x + 0.1, lora0)
  >>> plain, plain_cfg = lorax_jax.on_original_base(params, trained, lora0, cfg)
  >>> jax.tree.map(jnp.shape, plain), plain_cfg.r, plain_cfg.alpha, plain_cfg.init
  ({'dense': {'kernel': {'a': (4, 8), 'b': (4, 6)}}}, 4, 4.0, 'kaiming')
  >>> x, y = lorax_jax.merge(base, trained, cfg), lorax_jax.merge(params, plain, plain_cfg)
  >>> bool(jnp.allclose(x["dense"]["kernel"], y["dense"]["kernel"], atol=1e-4))
  True
  """
  targets = find_targets(params, cfg)
  pairs = zip(target_factors(targets, lora), target_factors(targets, initial))
  out: Lora = {}
  for (t, a, b), (_, a0, b0) in pairs:
    axis = t.n_stack
    node = {"a": jnp.concatenate([a, a0.astype(a.dtype)], axis), "b": jnp.concatenate([b, -b0.astype(b.dtype)], axis)}
    if t.dora:  # m ⊙ V/‖V‖ with the same V = W + s·(A⊗B - A₀⊗B₀): m carries over
      node["m"] = get_path(lora, t.path)["m"]
    if t.lora_bias:
      node["bias"] = get_path(lora, t.path)["bias"]
    set_path(out, t.path, node)
  for key in (SAVED_KEY, TOKENS_KEY):
    if key in lora:
      out[key] = lora[key]
  factor = math.sqrt(2.0) if cfg.use_rslora else 2.0
  doubled = cfg.replace(r=2 * cfg.r, alpha=factor * cfg.alpha, init="kaiming",
                        rank_pattern={k: 2 * v for k, v in cfg.rank_pattern.items()},
                        alpha_pattern={k: factor * v for k, v in cfg.alpha_pattern.items()})
  return out, doubled


def _nested(paths: Iterable[Path], nodes: Iterable[Lora]) -> Lora:
  """The LoRA tree holding ``nodes`` at ``paths``."""
  tree: Lora = {}
  for path, node in zip(paths, nodes):
    set_path(tree, path, node)
  return tree


def _float(w: Any) -> Any:
  """``w``, dequantized if it is a `lorax_jax.QArray` (DoRA's ``‖W‖`` of a quantized base)."""
  return w.dequantize() if is_quantized(w) else w


def _is_key(rng: Any) -> bool:
  """A typed key (``jax.random.key``) or a raw ``uint32[2]`` one (``jax.random.PRNGKey``)."""
  dtype, shape = getattr(rng, "dtype", None), getattr(rng, "shape", None)
  if dtype is None or shape is None:
    return False
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return shape == ()
  return dtype == jnp.uint32 and shape == (2,)


def _init_factors(key: jax.Array, t: Target, cfg: LoraConfig, kernel: Any) -> tuple[jax.Array, jax.Array]:
  """``(a, b)`` of target ``t`` per ``cfg.init``; float32 for PiSSA/OLoRA/orthogonal (the caller
  casts), ``cfg.param_dtype`` otherwise."""
  dtype = cfg.param_dtype
  if t.path[-1] == "embedding":
    return jnp.zeros(t.a_shape, dtype), jax.random.normal(key, t.b_shape, dtype)
  if cfg.init == "gaussian":
    return jax.random.normal(key, t.a_shape, dtype) / t.rank, jnp.zeros(t.b_shape, dtype)
  if cfg.init == "kaiming":
    bound = 1.0 / math.sqrt(math.prod(t.in_shape))
    return jax.random.uniform(key, t.a_shape, dtype, -bound, bound), jnp.zeros(t.b_shape, dtype)
  n_slices, n_in, n_out = math.prod(t.stack_shape), math.prod(t.in_shape), math.prod(t.out_shape)
  if cfg.init == "orthogonal":
    if t.rank % 2:
      raise ValueError(f"init='orthogonal' needs an even rank (PEFT's rule), got r={t.rank} for {t.name}")
    k_q, k_a, k_b = jax.random.split(key, 3)
    half = t.rank // 2
    a, b = jax.vmap(orthogonal_factors)(jax.random.normal(k_q, (n_slices, t.rank, t.rank)),
                                        jax.random.normal(k_a, (n_slices, n_in, half)),
                                        jax.random.normal(k_b, (n_slices, half, n_out)))
  else:
    if not (hasattr(kernel, "dtype") and jnp.issubdtype(kernel.dtype, jnp.floating)):
      raise TypeError(f"init={cfg.init!r} needs a float kernel at {t.name}, got "
                      f"{getattr(kernel, 'dtype', type(kernel).__name__)}: initialise on the float weights and "
                      "quantize the residual base afterwards")
    w = torch_matrices(t, kernel)
    if cfg.init == "olora":
      a, b = jax.vmap(lambda m: olora_factors(m, t.rank))(w)
    else:
      niter = PISSA_NITER.fullmatch(cfg.init)
      if niter is None:
        a, b = jax.vmap(lambda m: pissa_factors(m, t.rank, t.scale))(w)
      else:
        sketch = jax.random.normal(key, (n_slices, min(w.shape[1:]), t.rank), w.dtype)
        a, b = jax.vmap(lambda m, g: pissa_factors(m, t.rank, t.scale, g, int(niter["niter"])))(w, sketch)
  return a.reshape(t.a_shape), jnp.swapaxes(b, -1, -2).reshape(t.b_shape)


def torch_matrices(t: Target, kernel: Any) -> jax.Array:
  """The kernel as ``[slices, out, in]`` matrices (torch's ``Linear.weight`` per stacked slice),
  in float32 (float64 stays)."""
  _, _, k_sub = t.subscripts()
  side = lambda c: "".join(k for k, x in zip(k_sub, t.axes) if x == c)
  w = jnp.einsum(f"{k_sub}->{side('s')}{side('o')}{side('i')}", jnp.asarray(kernel))
  w = w.astype(accumulation_dtype(w))
  return w.reshape(math.prod(t.stack_shape), math.prod(t.out_shape), math.prod(t.in_shape))


def orthogonal_factors(x: jax.Array, g_a: jax.Array, g_b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """PEFT's orthogonal init from its gaussians ``x [r, r]``, ``g_a [in, r/2]``, ``g_b [r/2, out]``:
  ``(A [r, in], B [out, r])`` with ``Q = qr(x).Q``, ``A = (g_a Q[0::2])ᵀ / 10``,
  ``B = g_bᵀ Q[1::2] / 10``."""
  q, _ = jnp.linalg.qr(x)
  return (g_a @ q[0::2]).T / 10.0, g_b.T @ q[1::2] / 10.0


def olora_factors(w: jax.Array, r: int) -> tuple[jax.Array, jax.Array]:
  """PEFT's OLoRA of ``w [out, in]``: ``Q, R = qr(w)``, ``(A, B) = (R[:r], Q[:, :r])``."""
  q, rr = jnp.linalg.qr(w)
  return rr[:r], q[:, :r]


def pissa_factors(w: jax.Array, r: int, scale: float, sketch: jax.Array | None = None,
                  niter: int = 0) -> tuple[jax.Array, jax.Array]:
  """PEFT's PiSSA of ``w [out, in]``: ``(A, B) = (sqrt(S_r/s) Uᴴ_r, V_r sqrt(S_r/s))`` from the SVD
  ``w = V S Uᴴ``; with a gaussian ``sketch [min(out, in), r]``, from torch's ``svd_lowrank(w, r,
  niter)`` on that sketch instead of the full SVD."""
  if sketch is None:
    v, s, uh = jnp.linalg.svd(w, full_matrices=False)
    v, s, uh = v[:, :r], s[:r], uh[:r]
  else:
    v, s, uh = svd_lowrank(w, sketch, niter)
  root = jnp.sqrt(s / scale)
  return root[:, None] * uh, v * root[None, :]


def svd_lowrank(w: jax.Array, sketch: jax.Array, niter: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """torch's ``svd_lowrank(w, q, niter)`` on the gaussian ``sketch [min(m, n), q]`` it would draw:
  ``(U [m, q], S [q], Vᴴ [q, n])`` with ``w ≈ U S Vᴴ`` (Halko, Martinsson & Tropp 2009)."""
  tall = w if w.shape[0] >= w.shape[1] else w.T
  basis = lambda x: jnp.linalg.qr(x)[0]
  q = basis(tall @ sketch)
  for _ in range(niter):
    q = basis(tall @ basis(tall.T @ q))
  u, s, vh = jnp.linalg.svd(q.T @ tall, full_matrices=False)
  u = q @ u
  return (u, s, vh) if w.shape[0] >= w.shape[1] else (vh.T, s, u.T)


