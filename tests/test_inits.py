"""LoRA initialisations (gaussian, orthogonal, PiSSA, OLoRA) and LoRA+ against PEFT 0.21.2.

PiSSA and OLoRA are deterministic up to the signs of SVD/QR components, so their factors are
compared through ``s · B A`` and the residual base; random inits are fed PEFT's own draws.
"""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

from lorax_jax import (LoraConfig, find_targets, init_lora, init_lora_and_base, load_adapter, lora_transform, loraplus,
                       merge, on_original_base, save_adapter)
from lorax_jax.init import orthogonal_factors, svd_lowrank
from lorax_jax.models.hf import tensors_from_params
from lorax_jax.models.llama import LLAMA_PATH_MAP, load_llama
from lorax_jax.optim import loraplus_labels
from test_peft import LLAMA_TOKENS, llama_dir, max_diff, randomize_lora, state, torch_llama, torch_logits  # noqa: F401

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
TARGETS = ["q_proj", "v_proj", "down_proj"]  # square, wide ([16, 32]) and tall ([32, 48]) weights
BASE_CHANGING = ["pissa", "olora"]


def peft_model(directory, init, r=4, alpha=8, **kwargs):
  return peft.get_peft_model(torch_llama(directory), peft.LoraConfig(
      task_type="CAUSAL_LM", r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=init, **kwargs))


def products(tensors, scale):
  """``{module: s · B @ A}`` of a PEFT adapter's tensors, ``s = scale(module)``."""
  return {m: scale(m) * tensors[f"{m}.lora_B.weight"] @ tensors[f"{m}.lora_A.weight"]
          for m in (k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight"))}


def factorization_tol(w, r, init, scale=1.0):
  """Bound on the entries of ``s·B₀A₀`` (and of the residual ``W - s·B₀A₀``) between two float32
  implementations (XLA/LAPACK here, torch/MKL in PEFT). Each SVD (PiSSA) or QR (OLoRA) is backward
  stable, exact for ``W + E`` with ``‖E‖ ≲ ε‖W‖`` (LAPACK's error estimates take p(m, n) = 1), and
  the rank-r subspace it keeps turns by at most ``‖E‖/δ`` (Wedin's sin θ): δ the gap ``σ_r - σ_{r+1}``
  (PiSSA: ``s·B₀A₀`` is the rank-r truncation) or ``σ_min(W[:, :r])`` (OLoRA: ``s·Q_r Q_rᵀ W``, the
  span of the first r columns). So ``‖Δ(s·B₀A₀)‖ ≤ k ε σ₁ (1 + 2σ₁/δ)`` per side (k = 1 for PiSSA, s for
  OLoRA); ×2 for the two sides and ×2 for the float32 products and subtraction. A wrong rank, scale,
  sign or transpose moves ``s·B₀A₀`` by ~σ_r (~0.1 here), orders above this."""
  w = np.asarray(w, np.float64)
  s = np.linalg.svd(w, compute_uv=False)
  gap = s[r - 1] - s[r] if init == "pissa" else np.linalg.svd(w[:, :r], compute_uv=False)[-1]
  k = 1.0 if init == "pissa" else scale
  return 4 * np.finfo(np.float32).eps * s[0] * (1 + k * (1 + 2 * s[0] / gap))


def peft_factors(model):
  """PEFT's adapter tensors as save_pretrained names them (``base_model.model.…lora_A.weight``)."""
  return {k.replace(".default", ""): v.detach().numpy().copy() for k, v in model.state_dict().items()
          if "lora_" in k}


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("init", BASE_CHANGING)
def test_pissa_olora_init_equals_peft(tmp_path, llama_dir, init, use_rslora):
  """Same ``s · B₀ A₀`` and the same residual base as PEFT (to float32 factorization accuracy,
  `factorization_tol`); residual + initial = original."""
  model = peft_model(llama_dir, init, use_rslora=use_rslora, rank_pattern={"down_proj": 2})
  _, flax_model, params = load_llama(llama_dir)
  cfg = LoraConfig(r=4, alpha=8, targets=TARGETS, init=init, use_rslora=use_rslora, rank_pattern={"down_proj": 2})
  lora0, base = init_lora_and_base(params, cfg, jax.random.key(0))
  with pytest.raises(ValueError, match="init_lora_and_base"):
    init_lora(params, cfg, jax.random.key(0))

  save_adapter(str(tmp_path), lora0, cfg, params, LLAMA_PATH_MAP)
  assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == init
  ours, theirs = load_file(str(tmp_path / "adapter_model.safetensors")), peft_factors(model)
  assert ours.keys() == theirs.keys()
  scale = lambda m: 8 / (math.sqrt if use_rslora else float)(2 if "down_proj" in m else 4)
  got, want = products(ours, scale), products(theirs, scale)
  original_state = state(torch_llama(llama_dir))
  tol = {m: factorization_tol(original_state[f"{m.removeprefix('base_model.model.')}.weight"],
                              2 if "down_proj" in m else 4, init, scale(m)) for m in want}
  for k in want:
    assert max_diff(got[k], want[k]) <= tol[k], k  # float32 SVD/QR accuracy, not one machine's digits
    assert np.abs(want[k]).max() > 1e-2  # the factors carry part of W (whose entries are ~0.02)

  residual_here, residual_peft = tensors_from_params(base, LLAMA_PATH_MAP), state(model.unload())
  changed = 0
  for k, v in residual_here.items():
    # targets: `factorization_tol`; the other tensors are the checkpoint's bytes on both sides
    assert max_diff(v, residual_peft[k]) <= tol.get(f"base_model.model.{k.removesuffix('.weight')}", 0.0), k
    changed += max_diff(v, original_state[k]) > 1e-3
  assert changed == 2 * len(TARGETS)  # every target of both layers, nothing else

  original = flax_model.apply(params, jnp.asarray(LLAMA_TOKENS))
  rebuilt = lora_transform(flax_model.apply, base, cfg)(base, lora0, jnp.asarray(LLAMA_TOKENS))
  assert max_diff(rebuilt, original) < 1e-5
  assert jax.tree.all(jax.tree.map(lambda x, y: max_diff(x, y) < 1e-5, merge(base, lora0, cfg), params))


def test_pissa_residual_of_a_bf16_base_equals_peft(llama_dir):
  """PEFT's dtype handling: the SVD and ``W - s·B A`` in float32, the residual cast back to bfloat16.

  How many bfloat16 entries round differently from PEFT's depends on the SVDs' last float32 bits
  (the LAPACK/BLAS kernels a CPU picks), so it is not asserted: the float32 residual matches PEFT's
  to SVD accuracy, the bfloat16 base is that residual rounded once, hence PEFT's within one bfloat16
  step plus the float32 difference."""
  pcfg = lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa")
  bf16 = transformers.LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16)
  want = {k: v.float().numpy() for k, v in peft.get_peft_model(bf16, pcfg()).unload().state_dict().items()}
  # PEFT on the same bfloat16 values held in float32: its residual before the cast (`.to(float32)` is a no-op)
  f32 = transformers.LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).float()
  weights = state(f32)
  want32 = state(peft.get_peft_model(f32, pcfg()).unload())
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), load_llama(llama_dir)[2])
  cfg = LoraConfig(r=4, alpha=8, targets=TARGETS, init="pissa")
  _, base = init_lora_and_base(params, cfg, jax.random.key(0))
  _, base32 = init_lora_and_base(jax.tree.map(lambda x: x.astype(jnp.float32), params), cfg, jax.random.key(0))
  assert {x.dtype for x in jax.tree.leaves(base)} == {jnp.dtype(jnp.bfloat16)}
  got32 = tensors_from_params(base32, LLAMA_PATH_MAP)
  for k, v in tensors_from_params(base, LLAMA_PATH_MAP).items():
    v, r32 = np.asarray(v, np.float32), np.asarray(got32[k], np.float32)
    tol = factorization_tol(weights[k], 4, "pissa") if any(t in k for t in TARGETS) else 0.0
    assert max_diff(r32, want32[k]) <= tol, k  # float32 residual: PEFT's to float32 SVD accuracy
    # rounded once to bfloat16: within half a step (≤ 2⁻⁸·|x|, 8 significant bits), plus the float32 slack
    assert np.all(np.abs(v - r32) <= np.abs(r32) * 2.0 ** -8 + tol), k
    # so PEFT's bfloat16 residual is within one step (two half steps) plus the float32 difference
    assert np.all(np.abs(v - want[k]) <= (np.abs(r32) + np.abs(want32[k])) * 2.0 ** -8 + tol), k


def test_stacked_and_transposed_kernels_per_slice():
  """A stacked ``[L, in, out]`` kernel gets each slice's PiSSA/OLoRA; an ``[out, in]`` kernel
  (``"oi"``) gets the transpose's."""
  w = np.random.default_rng(0).normal(size=(3, 12, 8)).astype(np.float32)
  for init in ("pissa", "olora", "pissa_niter_2"):
    cfg = LoraConfig(r=2, alpha=3, init=init, targets=["w"], kernel_axes={"w": "sio"})
    lora, base = init_lora_and_base({"w": jnp.asarray(w)}, cfg, jax.random.key(0))
    assert max_diff(merge(base, lora, cfg)["w"], w) < 1e-5
    for i in range(3) if init != "pissa_niter_2" else ():
      one = LoraConfig(r=2, alpha=3, init=init, targets=["w"])
      lora_i, base_i = init_lora_and_base({"w": jnp.asarray(w[i])}, one, jax.random.key(0))
      assert max_diff(base["w"][i], base_i["w"]) < 1e-5
      t = LoraConfig(r=2, alpha=3, init=init, targets=["w"], kernel_axes={"w": "oi"})
      lora_t, base_t = init_lora_and_base({"w": jnp.asarray(w[i].T)}, t, jax.random.key(0))
      assert max_diff(base_t["w"].T, base_i["w"]) < 1e-5


def test_pissa_niter_adapter_is_saved_converted_only(tmp_path):
  """PEFT re-derives a ``pissa_niter_K`` base with an unseeded sketch, so it must be saved converted."""
  params = {"attn": {"query": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(8, 6)), jnp.float32)}}}
  cfg = LoraConfig(r=2, alpha=4, init="pissa_niter_2")
  lora0, _ = init_lora_and_base(params, cfg, jax.random.key(0))
  with pytest.raises(ValueError, match="initial="):
    save_adapter(str(tmp_path / "a"), lora0, cfg, params)
  save_adapter(str(tmp_path / "a"), lora0, cfg, params, initial=lora0)
  lora, loaded = load_adapter(str(tmp_path / "a"), params)
  assert loaded.r == 4 and max_diff(merge(params, lora, loaded)["attn"]["query"]["kernel"],
                                    params["attn"]["query"]["kernel"]) < 1e-6  # A⊗B - A₀⊗B₀ = 0


def svd_lowrank_tol(m, sketch, niter):
  """Bound (first order) on two float32 runs of ``svd_lowrank``, on ``U S Vᴴ = Q Qᵀ W`` and on ``S``:
  each orthonormalisation of ``M = W X`` (float32 product error ``≲ ε‖W‖‖X‖``) turns ``range(M)`` by
  ``≲ ε‖W‖‖X‖/σ_min(M)``; the angles add over the ``2·niter + 1`` steps (replayed here in float64), and
  move ``Q Qᵀ W`` by ``2σ₁`` times their sum, plus ``ε σ₁`` for the last SVD; ×2 for two sides, ×2 for
  the products. A wrong sketch, niter or transpose moves the result by O(σ), orders above this."""
  m = np.asarray(m, np.float64)
  tall = m if m.shape[0] >= m.shape[1] else m.T
  norm, angles = np.linalg.norm(tall, 2), []
  def basis(x, y):
    p = x @ y
    angles.append(np.linalg.norm(x, 2) * np.linalg.norm(y, 2) / np.linalg.svd(p, compute_uv=False)[-1])
    return np.linalg.qr(p)[0]
  q = basis(tall, np.asarray(sketch, np.float64))
  for _ in range(niter):
    q = basis(tall, basis(tall.T, q))
  return 4 * np.finfo(np.float32).eps * norm * (1 + 2 * sum(angles))


def test_pissa_niter_is_torch_svd_lowrank():
  """``svd_lowrank`` on torch's gaussian sketch equals ``torch.svd_lowrank`` (wide and tall)."""
  w = np.random.default_rng(0).normal(size=(24, 10)).astype(np.float32)
  for m in (w, w.T):
    torch.manual_seed(3)
    sketch = torch.randn(min(m.shape), 4)
    torch.manual_seed(3)
    u, s, v = torch.svd_lowrank(torch.from_numpy(m), q=4, niter=2)
    got_u, got_s, got_vh = svd_lowrank(jnp.asarray(m), jnp.asarray(sketch.numpy()), 2)
    tol = svd_lowrank_tol(m, sketch.numpy(), 2)  # float32 accuracy of a randomized SVD (torch/MKL vs XLA)
    assert max_diff(got_s, s.numpy()) <= tol
    assert max_diff(got_u * got_s @ got_vh, (u * s @ v.T).numpy()) <= tol


def test_orthogonal_init_equals_peft(llama_dir):
  """PEFT's orthogonal_init and `orthogonal_factors` on the same draws give the same factors;
  ``A ⊗ B = 0`` so the model starts as the base."""
  model = peft_model(llama_dir, "orthogonal")
  layer = model.base_model.model.model.layers[0].self_attn.v_proj
  torch.manual_seed(7)
  layer.orthogonal_init("default")
  torch.manual_seed(7)
  draws = torch.randn(4, 4), torch.randn(32, 2), torch.randn(2, 16)
  a, b = orthogonal_factors(*(jnp.asarray(x.numpy()) for x in draws))
  assert max_diff(a, layer.lora_A["default"].weight.detach().numpy()) < 1e-6
  assert max_diff(b, layer.lora_B["default"].weight.detach().numpy()) < 1e-6

  _, flax_model, params = load_llama(llama_dir)
  cfg = LoraConfig(r=4, alpha=8, targets=TARGETS, init="orthogonal")
  lora = init_lora(params, cfg, jax.random.key(0))
  for path, t in find_targets(params, cfg).items():
    node = functools.reduce(lambda d, k: d[k], path, lora)
    assert float(jnp.abs(node["b"]).min()) > 0 and max_diff(t.delta(node["a"], node["b"]), 0) < 1e-6
  with pytest.raises(ValueError, match="even rank"):
    init_lora(params, cfg.replace(r=3), jax.random.key(0))


def test_gaussian_init_has_peft_std(llama_dir):
  """``a ~ N(0, 1/r²)`` and ``b = 0`` like PEFT's (the draws differ: torch's vs JAX's generator)."""
  model = peft_model(llama_dir, "gaussian", r=8)
  _, _, params = load_llama(llama_dir)
  lora = init_lora(params, LoraConfig(r=8, alpha=8, targets=TARGETS, init="gaussian"), jax.random.key(0))
  ours = np.concatenate([x.ravel() for x in jax.tree.leaves(jax.tree.map(np.asarray, lora))[0::2]])
  theirs = np.concatenate([v.ravel() for k, v in peft_factors(model).items() if "lora_A" in k])
  assert ours.size == theirs.size
  for x in (ours, theirs):
    assert abs(x.std() - 1 / 8) < 0.1 / 8
  assert not any(np.any(x) for x in jax.tree.leaves(jax.tree.map(np.asarray, lora))[1::2])


def perturb(model, seed):
  """A few training-like steps: every factor moved by a small random amount."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.add_(0.05 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("init", BASE_CHANGING)
def test_converted_adapter_equals_peft_conversion(tmp_path, llama_dir, init):
  """``save_adapter(initial=...)`` writes PEFT's ``path_initial_model_for_weight_conversion``
  tensors and config, and PEFT loads it on the original base with our logits."""
  model = peft_model(llama_dir, init)

  def save_plain(directory):  # PEFT's factors as they are, to read them here
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(str(tmp_path / directory))
    model.peft_config["default"].init_lora_weights = init

  save_plain("initial")
  perturb(model, 0)
  save_plain("trained")
  model.save_pretrained(str(tmp_path / "peft_converted"),
                        path_initial_model_for_weight_conversion=str(tmp_path / "initial"))

  _, flax_model, params = load_llama(llama_dir)
  initial, cfg = load_adapter(str(tmp_path / "initial"), params, LLAMA_PATH_MAP)  # PEFT's A₀, B₀
  trained, _ = load_adapter(str(tmp_path / "trained"), params, LLAMA_PATH_MAP)
  save_adapter(str(tmp_path / "ours"), trained, cfg.replace(init=init), params, LLAMA_PATH_MAP, initial=initial,
               task_type="CAUSAL_LM")

  ours, want = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ours", "peft_converted"))
  assert ours.keys() == want.keys()
  for k in want:
    assert ours[k].shape == want[k].shape and max_diff(ours[k], want[k]) < 1e-5, k
  config, want_config = (json.loads((tmp_path / d / "adapter_config.json").read_text())
                         for d in ("ours", "peft_converted"))
  for key in ("r", "lora_alpha", "init_lora_weights", "rank_pattern", "alpha_pattern"):
    assert config[key] == (want_config[key] or {} if key.endswith("pattern") else want_config[key]), key

  loaded = peft.PeftModel.from_pretrained(torch_llama(llama_dir), str(tmp_path / "ours")).eval()
  converted, converted_cfg = on_original_base(params, trained, initial, cfg)
  got = lora_transform(flax_model.apply, params, converted_cfg)(params, converted, jnp.asarray(LLAMA_TOKENS))
  assert max_diff(got, torch_logits(loaded, LLAMA_TOKENS)) < TOL
  assert max_diff(got, torch_logits(model.eval(), LLAMA_TOKENS)) < TOL  # PEFT's trained model on W_res
  assert max_diff(got, torch_logits(torch_llama(llama_dir), LLAMA_TOKENS)) > 1e-2


@pytest.mark.parametrize("init", BASE_CHANGING)
def test_trained_here_saved_converted_runs_in_peft(tmp_path, llama_dir, init):
  """Our init, a few Adam steps on the residual base, saved converted: PEFT's logits on the
  original base are ours (1e-4)."""
  _, flax_model, params = load_llama(llama_dir)
  cfg = LoraConfig(r=4, alpha=8, targets=TARGETS, init=init, rank_pattern={"down_proj": 2})
  lora0, base = init_lora_and_base(params, cfg, jax.random.key(0))
  apply = lora_transform(flax_model.apply, base, cfg)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, size=(4, 9)))

  def loss(lora):
    logits = apply(base, lora, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  opt = optax.adam(2e-2)
  lora, opt_state = lora0, opt.init(lora0)
  for _ in range(3):
    updates, opt_state = opt.update(jax.grad(loss)(lora), opt_state)
    lora = optax.apply_updates(lora, updates)
  save_adapter(str(tmp_path), lora, cfg, params, LLAMA_PATH_MAP, initial=lora0)
  model = peft.PeftModel.from_pretrained(torch_llama(llama_dir), str(tmp_path)).eval()
  got = apply(base, lora, jnp.asarray(LLAMA_TOKENS))
  assert max_diff(got, torch_logits(model, LLAMA_TOKENS)) < TOL
  assert max_diff(got, flax_model.apply(params, jnp.asarray(LLAMA_TOKENS))) > 1e-3  # training moved it


@pytest.mark.parametrize("init", BASE_CHANGING)
def test_unconverted_peft_adapter_loads_with_peft_logits(tmp_path, llama_dir, init):
  """A PiSSA/OLoRA adapter PEFT saved as it is: PEFT re-derives the residual from the base it
  loads it on; `load_adapter` re-derives the same from the original params."""
  model = peft_model(llama_dir, init, rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 6})
  randomize_lora(model)
  model.save_pretrained(str(tmp_path))
  want = torch_logits(model.eval(), LLAMA_TOKENS)
  reloaded = peft.PeftModel.from_pretrained(torch_llama(llama_dir), str(tmp_path)).eval()
  assert max_diff(torch_logits(reloaded, LLAMA_TOKENS), want) < TOL  # PEFT's own semantics
  _, flax_model, params = load_llama(llama_dir)
  lora, cfg = load_adapter(str(tmp_path), params, LLAMA_PATH_MAP)
  assert cfg.init == "kaiming" and {t.rank for t in find_targets(params, cfg).values()} == {8, 4}
  got = lora_transform(flax_model.apply, params, cfg)(params, lora, jnp.asarray(LLAMA_TOKENS))
  assert max_diff(got, want) < TOL


# ---- LoRA+ ----------------------------------------------------------------------------------

def lora_tree():
  rng = np.random.default_rng(0)
  leaf = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {"params": {"q": {"kernel": {"a": leaf(2, 8), "b": leaf(2, 6)}},
                     "embed": {"embedding": {"a": leaf(2, 10), "b": leaf(2, 8)}}}}


@pytest.mark.parametrize("optimizer", [optax.sgd, optax.adam])
def test_loraplus_first_step(optimizer):
  """SGD: ``Δb = -16 η g_b``, ``Δa = -η g_a``; Adam's first step: ``-η sign(g)`` and ``-16 η sign(g)``;
  embedding factors move with ``lr_embedding``."""
  lora, lr = lora_tree(), 1e-2
  grads = jax.tree.map(lambda x: 0.5 * x + 0.1, lora)
  tx = loraplus(optimizer, lr, ratio=16.0)
  updates, _ = tx.update(grads, tx.init(lora), lora)
  direction = (lambda g: -g) if optimizer is optax.sgd else (lambda g: -jnp.sign(g))
  # a bound, not a fit: a few float32 roundings; Adam's step is -η g/(|g| + 1e-8) with its bias
  # correction 1 - b₂ in float32 (0.999 is no float32: 1.3e-5 off relative, half that after the √)
  rtol = 8 * np.finfo(np.float32).eps
  if optimizer is optax.adam:
    smallest = min(float(jnp.abs(g).min()) for g in jax.tree.leaves(grads))
    rtol += abs(float(np.float32(0.999)) - 0.999) / 0.001 / 2 + 1e-8 / smallest
  q, gq = updates["params"]["q"]["kernel"], grads["params"]["q"]["kernel"]
  np.testing.assert_allclose(q["a"], lr * direction(gq["a"]), rtol=rtol)
  np.testing.assert_allclose(q["b"], 16 * lr * direction(gq["b"]), rtol=rtol)
  e, ge = updates["params"]["embed"]["embedding"], grads["params"]["embed"]["embedding"]
  for k in "ab":
    np.testing.assert_allclose(e[k], 1e-6 * direction(ge[k]), rtol=rtol)


def test_loraplus_groups_equal_peft(llama_dir):
  """The per-leaf learning rates equal PEFT's create_loraplus_optimizer param groups."""
  from peft.optimizers import create_loraplus_optimizer
  model = peft.get_peft_model(torch_llama(llama_dir), peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]))
  opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
  names = {id(p): n for n, p in model.named_parameters()}
  peft_lr = {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
  _, _, params = load_llama(llama_dir)
  cfg = LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "embed_tokens"])
  lr_of = {"a": 1e-3, "b": 16e-3, "embedding": 1e-6}
  ours = {}
  for path, label in jax.tree_util.tree_flatten_with_path(loraplus_labels(init_lora(params, cfg, jax.random.key(0))))[0]:
    keys = tuple(k.key for k in path)
    module = LLAMA_PATH_MAP.to_hf("/".join(keys[:-1]))[0].removesuffix(".weight")
    kind = {"a": "lora_A", "b": "lora_B"}[keys[-1]]
    torch_name = (f"base_model.model.{module}.lora_embedding_{kind[-1]}.default" if keys[-2] == "embedding"
                  else f"base_model.model.{module}.{kind}.default.weight")
    ours[torch_name] = lr_of[label]
  assert ours == peft_lr
  with pytest.raises(ValueError, match="ratio"):
    loraplus(optax.adam, 1e-3, ratio=0)
