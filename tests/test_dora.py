"""DoRA (``LoraConfig.use_dora``): factored in the engine, equal to the merged weight and to PEFT.

The reference here is written out by hand, independently of `Target.dora_weight` and the
engine: ``W' = m ⊙ V / stop_gradient(‖V‖)``, ``V = W + s · A ⊗ B``, the norm over the kernel's
input axes (``"i"`` in its layout), then ``apply_fn`` on ``W'``.
"""

from __future__ import annotations

import string

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorax_jax as lj
import zoo
from lorax_jax.paths import get_path, set_path

TOL = 1e-5


def dora_lora(params, cfg, seed=1, scale=0.3):
  """init_lora's DoRA tree with random ``a``, ``b`` and ``m = ‖W‖ · (1 + 0.3 · noise)``."""
  lora = lj.init_lora(params, cfg, jax.random.key(seed))
  keys = iter(jax.random.split(jax.random.key(seed + 1), 3 * len(lj.find_targets(params, cfg))))
  for t in lj.find_targets(params, cfg).values():
    node = get_path(lora, t.path)
    set_path(lora, t.path, {
        "a": scale * jax.random.normal(next(keys), node["a"].shape),
        "b": scale * jax.random.normal(next(keys), node["b"].shape),
        "m": node["m"] * (1 + 0.3 * jax.random.normal(next(keys), node["m"].shape))})
  return lora


def hand_dora_params(params, lora, cfg):
  """``params`` with each target's kernel replaced by DoRA's ``W'``, written out directly."""
  out = jax.tree.map(lambda x: x, params)
  for t in lj.find_targets(params, cfg).values():
    node, w = get_path(lora, t.path), get_path(params, t.path)
    letters = string.ascii_lowercase[:w.ndim]
    pick = lambda c: "".join(l for l, x in zip(letters, t.axes) if x == c)
    s_, i_, o_ = pick("s"), pick("i"), pick("o")
    v = w + t.scale * jnp.einsum(f"{s_}z{i_},{s_}z{o_}->{letters}", node["a"], node["b"],
                                 precision="highest")
    inputs = tuple(j for j, x in enumerate(t.axes) if x == "i")
    norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(v * v, axis=inputs, keepdims=True)))
    m = jnp.einsum(f"{s_}{o_}->{letters.translate({ord(c): None for c in i_})}", node["m"])
    set_path(out, t.path, jnp.expand_dims(m, inputs) * v / norm)
  return out


def max_diff(x, y) -> float:
  return float(max(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
                   for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y))))


COVERED = ("mlp", "torch_style_mlp", "einsum_attention", "mha_transformer", "cnn", "scan_remat_transformer",
           "fused_qkv_attention", "mup_scaled")


@pytest.mark.parametrize("case", [c for c in zoo.cases() if c.name in COVERED], ids=lambda c: c.name)
def test_factored_dora_equals_hand_merged_weight(case):
  """Dense, ``[out, in]``, einsum / DenseGeneral (3-axis), conv, stacked (nn.scan + remat), fused QKV
  (split), muP scalings: outputs and gradients of ``a``, ``b``, ``m`` within 1e-5, strict (no merge)."""
  cfg = case.cfg.replace(use_dora=True)
  lora = dora_lora(case.params, cfg)
  apply = lj.lora_transform(case.apply_fn, case.params, cfg, strict=True)
  out = apply(case.params, lora, *case.inputs)
  want = case.apply_fn(hand_dora_params(case.params, lora, cfg), *case.inputs)
  assert max_diff(out, want) < TOL * (1 + float(jnp.max(jnp.abs(want))))
  assert max_diff(want, case.apply_fn(case.params, *case.inputs)) > 1e-2  # DoRA changes the model
  probe = jax.tree.map(lambda y: jax.random.normal(jax.random.key(7), y.shape), want)
  loss = lambda f: lambda lo: sum(jnp.vdot(y, p) for y, p in zip(jax.tree.leaves(f(lo)), jax.tree.leaves(probe)))
  got = jax.grad(loss(lambda lo: apply(case.params, lo, *case.inputs)))(lora)
  ref = jax.grad(loss(lambda lo: case.apply_fn(hand_dora_params(case.params, lo, cfg), *case.inputs)))(lora)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    assert max_diff(g, r) < TOL * (1 + float(jnp.max(jnp.abs(r))))
  assert all(float(jnp.max(jnp.abs(x["m"]))) > 0 for x in _nodes(got))  # m is trained
  # The reference mode (merge) is the same model, gradients included.
  merged = lj.lora_transform(case.apply_fn, case.params, cfg, mode="reference")
  assert max_diff(merged(case.params, lora, *case.inputs), want) < TOL * (1 + float(jnp.max(jnp.abs(want))))


def _nodes(tree):
  return [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, dict) and "m" in x)]


@pytest.mark.parametrize("name,what", [
    ("embed_lm", "contracting a DoRA kernel's output axes"),  # embed.attend: the tied head
    ("moe_ragged_dot", "ragged_dot of a DoRA kernel"),
    ("optimized_lstm", "concatenate of DoRA kernels"),
])
def test_uncovered_dora_use_is_merged_and_reported(name, what):
  case = next(c for c in zoo.cases() if c.name == name)
  cfg = case.cfg.replace(use_dora=True)
  lora = dora_lora(case.params, cfg)
  apply = lj.lora_transform(case.apply_fn, case.params, cfg)
  with pytest.warns(UserWarning, match=what):
    out = apply(case.params, lora, *case.inputs)
  assert any(what in op for _, op in apply.fallbacks)
  want = case.apply_fn(hand_dora_params(case.params, lora, cfg), *case.inputs)
  assert max_diff(out, want) < TOL * (1 + float(jnp.max(jnp.abs(want))))
  with pytest.raises(NotImplementedError, match=what):
    lj.lora_transform(case.apply_fn, case.params, cfg, strict=True)(case.params, lora, *case.inputs)


def test_dora_dropout_is_peft_formula():
  """With dropout, PEFT's DoRA output is ``x·W + (g - 1) ⊙ (x̃·W) + g ⊙ s·(x̃·A)·B`` (``x̃`` the
  dropped-out input, ``g = m / ‖V‖``). ``x̃·W`` and ``s·(x̃·A)·B`` are read off plain LoRA runs with
  the same key (same mask): one with this ``A``, ``B``, one with ``A = I``, ``B = W``, ``s = 1``."""
  d_in, d_out, rate, key = 10, 12, 0.3, jax.random.key(5)
  w = jax.random.normal(jax.random.key(0), (d_in, d_out)) / 3
  params = {"fc": {"kernel": w}}
  x = jax.random.normal(jax.random.key(1), (4, 6, d_in))
  apply_fn = lambda p, x: x @ p["fc"]["kernel"]
  cfg = lj.LoraConfig(r=3, alpha=6, targets=["fc"], dropout=rate, use_dora=True)
  lora = dora_lora(params, cfg)
  got = lj.lora_transform(apply_fn, params, cfg)(params, lora, x, rng=key)
  plain = lambda c, lo: lj.lora_transform(apply_fn, params, c)(params, lo, x, rng=key) - x @ w
  branch = plain(cfg.replace(use_dora=False), {"fc": {"kernel": {k: lora["fc"]["kernel"][k] for k in "ab"}}})
  dropped_base = plain(cfg.replace(use_dora=False, r=d_in, alpha=d_in),
                       {"fc": {"kernel": {"a": jnp.eye(d_in), "b": w}}})
  v = w + cfg.alpha / cfg.r * lora["fc"]["kernel"]["a"].T @ lora["fc"]["kernel"]["b"]
  g = lora["fc"]["kernel"]["m"] / jnp.linalg.norm(v, axis=0)
  want = x @ w + (g - 1) * dropped_base + g * branch
  assert max_diff(got, want) < TOL
  no_dropout = lj.lora_transform(apply_fn, params, cfg.replace(dropout=0.0))(params, lora, x)
  assert max_diff(got, no_dropout) > 1e-2


def test_dora_init_is_the_base_and_tree_checks():
  case = next(c for c in zoo.cases() if c.name == "mlp")
  cfg = case.cfg.replace(use_dora=True)
  lora = lj.init_lora(case.params, cfg, jax.random.key(0))
  base = case.apply_fn(case.params, *case.inputs)
  assert max_diff(lj.lora_transform(case.apply_fn, case.params, cfg)(case.params, lora, *case.inputs), base) < 1e-6
  w = case.params["params"]["fc1"]["kernel"]
  assert max_diff(lora["params"]["fc1"]["kernel"]["m"], jnp.linalg.norm(w, axis=0)) < 1e-6
  assert lj.count(lora) == lj.lora_count(case.params, cfg)
  plain = jax.tree.map(lambda x: x, lora)
  del plain["params"]["fc1"]["kernel"]["m"]
  with pytest.raises(ValueError, match=r"must be \{'a', 'b', 'm'\}.*use_dora=True"):
    lj.lora_transform(case.apply_fn, case.params, cfg)(case.params, plain, *case.inputs)
  with pytest.raises(ValueError, match=r"must be \{'a', 'b'\}.*needs LoraConfig\(use_dora=True\)"):
    lj.lora_transform(case.apply_fn, case.params, case.cfg)(case.params, lora, *case.inputs)
  combined = lj.join_params(case.params, lora)
  assert set(combined["params"]["fc1"]["lora"]["kernel"]) == {"a", "b", "m"}
  assert max_diff(lj.split_params(combined, cfg)[1], lora) == 0


def test_dora_merge_delta_unmerge():
  case = next(c for c in zoo.cases() if c.name == "torch_style_mlp")
  cfg = case.cfg.replace(use_dora=True)
  lora = dora_lora(case.params, cfg)
  want = hand_dora_params(case.params, lora, cfg)
  assert max_diff(lj.merge(case.params, lora, cfg), want) < 1e-6
  for path, d in lj.delta(case.params, lora, cfg).items():
    assert max_diff(get_path(case.params, path) + d, get_path(want, path)) < 1e-6
  with pytest.raises(ValueError, match="DoRA merge .* cannot be undone"):
    lj.unmerge(want, lora, cfg)


def test_dora_train_step_flops_near_lora():
  """The factored DoRA train step costs at most 1.05× the LoRA step's compiled FLOPs (a GPT,
  all-linear, r=8): the norms come from ``A·W`` and ``A·Aᵀ``, never from ``W'``. And at most
  1.25× its compiled bytes accessed (1.22 measured): ``g`` scales each output by a broadcast
  multiply that XLA fuses, not an einsum whose batched ``dot_general`` transposes every
  ``[tokens, out]`` output and cotangent (1.33×, and 1.39× LoRA's step time on the bench)."""
  from bench.models import Gpt, GptConfig
  c = GptConfig(vocab=256, d=128, layers=2, heads=2, seq=64)
  model = Gpt(c)
  ids = jax.random.randint(jax.random.key(0), (2, c.seq), 0, c.vocab)
  params = jax.jit(model.init)(jax.random.key(1), ids)
  opt = optax.adam(1e-3)
  flops, moved = {}, {}
  for dora in (False, True):
    cfg = lj.LoraConfig(r=8, alpha=16, targets="all-linear", use_dora=dora)
    apply = lj.lora_transform(model.apply, params, cfg, strict=True)
    lora = lj.init_lora(params, cfg, jax.random.key(2))

    def step(lora, opt_state, params, ids, apply=apply):
      loss = lambda lo: optax.softmax_cross_entropy_with_integer_labels(apply(params, lo, ids)[:, :-1], ids[:, 1:]).mean()
      updates, opt_state = opt.update(jax.grad(loss)(lora), opt_state)
      return optax.apply_updates(lora, updates), opt_state
    cost = jax.jit(step).lower(lora, opt.init(lora), params, ids).compile().cost_analysis()
    flops[dora], moved[dora] = cost["flops"], cost["bytes accessed"]
  assert flops[True] <= 1.05 * flops[False], flops
  assert moved[True] <= 1.25 * moved[False], moved


# ---- PEFT, both directions -------------------------------------------------------------------

def _peft():
  return (pytest.importorskip("torch"), pytest.importorskip("peft"), pytest.importorskip("transformers"))


def randomize_dora(model, seed=0):
  """PEFT's factors random, and each magnitude ``‖W‖ · (1 + 0.3 · noise)`` (PEFT starts ``B`` at 0
  and ``m`` at ``‖W‖``, which would test nothing)."""
  torch, _, _ = _peft()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_magnitude_vector" in name:
        p.mul_(1 + 0.3 * torch.randn(p.shape, generator=gen))
      elif "lora_" in name:
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))


NET_TARGETS = ["embed_tokens", "conv_in", "q_proj", "v_proj", "o_proj"]


def torch_net_case(seed):
  """`test_peft.TorchNet`'s weights (seed 0), its params here, and inputs drawn with ``seed``."""
  torch, _, _ = _peft()
  from test_peft import TorchNet, state
  from test_io import NET_MAP
  from lorax_jax.models.hf import params_from_tensors
  torch.manual_seed(0)
  weights = state(TorchNet())
  rng = np.random.default_rng(seed)
  tokens, image = rng.integers(0, 16, size=(2, 5)), rng.normal(size=(2, 3, 6, 6)).astype(np.float32)
  return weights, params_from_tensors(weights, NET_MAP), tokens, image


def test_peft_dora_adapter_runs_here(tmp_path):
  """PEFT DoRA on an embedding, a 3×3 conv and linears → lorax_jax, outputs within 1e-4."""
  _, peft, _ = _peft()
  from test_peft import TOL, run_jax, run_torch, torch_net
  from test_io import NET_MAP
  weights, params, tokens, image = torch_net_case(0)
  model = peft.get_peft_model(torch_net(weights), peft.LoraConfig(
      r=2, lora_alpha=4, use_dora=True, target_modules=NET_TARGETS, rank_pattern={"conv_in": 3}))
  randomize_dora(model)
  model.eval()
  model.save_pretrained(str(tmp_path))
  lora, cfg = lj.load_adapter(str(tmp_path), params, NET_MAP)
  assert cfg.use_dora
  got = run_jax(params, lora, cfg, tokens, image)  # also checks factored == merge
  for g, w, b in zip(got, run_torch(model, tokens, image), run_torch(torch_net(weights), tokens, image)):
    assert max_diff(g, w) < TOL
    assert max_diff(w, b) > 1e-2


def test_dora_adapter_saved_here_runs_in_peft(tmp_path):
  """lorax_jax DoRA → PEFT: outputs within 1e-4, and PEFT's merged weights equal `merge`'s."""
  _, peft, _ = _peft()
  from test_peft import TOL, run_jax, run_torch, state, torch_net
  from test_io import NET_MAP
  from lorax_jax.models.hf import tensors_from_params
  weights, params, tokens, image = torch_net_case(1)
  cfg = lj.LoraConfig(r=2, alpha=4, targets=NET_TARGETS, rank_pattern={"conv_in": 3}, use_dora=True)
  lora = dora_lora(params, cfg, scale=0.2)
  lj.save_adapter(str(tmp_path), lora, cfg, params, NET_MAP)
  model = peft.PeftModel.from_pretrained(torch_net(weights), str(tmp_path)).eval()
  for g, w in zip(run_jax(params, lora, cfg, tokens, image), run_torch(model, tokens, image)):
    assert max_diff(g, w) < TOL
  merged_torch = state(model.merge_and_unload())
  merged_here = tensors_from_params(lj.merge(params, lora, cfg), NET_MAP)
  for k in merged_here:
    assert max_diff(merged_here[k], merged_torch[k]) < 1e-5, k
  loaded, cfg2 = lj.load_adapter(str(tmp_path), params, NET_MAP)
  assert cfg2.use_dora and max_diff(loaded, lora) == 0


@pytest.mark.parametrize("direction", ["peft-to-jax", "jax-to-peft"])
def test_llama_dora_both_directions(tmp_path, direction):
  """A tiny random Llama, DoRA on all linear layers: logits within 1e-4 of PEFT's, both ways."""
  torch, peft, transformers = _peft()
  from test_peft import TOL, torch_logits
  from lorax_jax.models.llama import LLAMA_PATH_MAP, load_llama
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
  transformers.LlamaForCausalLM(config).save_pretrained(str(tmp_path / "base"))
  base = lambda: transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "base")).eval()
  _, flax_model, params = load_llama(str(tmp_path / "base"))
  tokens = np.random.default_rng(0).integers(0, 64, size=(2, 7))
  if direction == "peft-to-jax":
    model = peft.get_peft_model(base(), peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, use_dora=True,
                                                        target_modules="all-linear"))
    randomize_dora(model)
    model.eval()
    model.save_pretrained(str(tmp_path / "adapter"))
    lora, cfg = lj.load_adapter(str(tmp_path / "adapter"), params, LLAMA_PATH_MAP)
    assert cfg.use_dora
  else:
    cfg = lj.LoraConfig(r=4, alpha=8, targets="all-linear", use_dora=True)
    lora = dora_lora(params, cfg, scale=0.1)
    lj.save_adapter(str(tmp_path / "adapter"), lora, cfg, params, LLAMA_PATH_MAP, task_type="CAUSAL_LM")
    model = peft.PeftModel.from_pretrained(base(), str(tmp_path / "adapter")).eval()
  got = lj.lora_transform(flax_model.apply, params, cfg, strict=True)(params, lora, jnp.asarray(tokens))
  want = torch_logits(model, tokens)
  assert max_diff(got, want) < TOL
  assert max_diff(want, torch_logits(base(), tokens)) > 1e-2


def test_dora_magnitudes_on_disk_must_match_the_config(tmp_path):
  """A magnitude with ``use_dora`` false, or a mis-shaped one, is refused by name."""
  import json
  from safetensors.numpy import load_file, save_file
  from test_io import NET_MAP, Net
  params = Net().init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 6, 6, 3)))
  cfg = lj.LoraConfig(r=2, alpha=4, targets=["q_proj", "conv_in"], use_dora=True)
  lj.save_adapter(str(tmp_path), dora_lora(params, cfg), cfg, params, NET_MAP)
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert config["use_dora"] is True
  tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
  key = "base_model.model.conv_in.lora_magnitude_vector"
  assert tensors[key].shape == (1, 4, 1, 1)  # PEFT's conv layout
  (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
  with pytest.raises(ValueError, match="holds DoRA magnitudes .* use_dora false"):
    lj.load_adapter(str(tmp_path), params, NET_MAP)
  (tmp_path / "adapter_config.json").write_text(json.dumps(config))
  save_file({**tensors, key: tensors[key].reshape(4)}, str(tmp_path / "adapter_model.safetensors"))
  with pytest.raises(ValueError, match=r"conv_in.lora_magnitude_vector has shape \(4,\), expected \(1, 4, 1, 1\)"):
    lj.load_adapter(str(tmp_path), params, NET_MAP)


def test_finetune_use_dora_setting():
  from lorax_jax.apps import finetune
  from lorax_jax.apps.settings import SettingsError
  assert not finetune.lora_config(finetune.parse_args([])[0]).use_dora
  assert finetune.lora_config(finetune.parse_args(["--use_dora"])[0]).use_dora
  assert not finetune.parse_args(["--use_dora", "false"])[0].use_dora
  with pytest.raises(SettingsError, match="setting use_dora must be true or false, got 'maybe'"):
    finetune.parse_args(["--use_dora", "maybe"])


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dora_on_a_quantized_base_equals_dora_on_the_dequantized_one(dropout):
  """QDoRA: an nf4 base through the engine (norms and dropped-out base from the dequantized kernel)
  gives the outputs and gradients (a, b, m) of DoRA on ``dequantize(qparams)``, strict."""
  from lorax_jax.qarray import quantize
  rng = np.random.default_rng(0)
  params = {"w1": jnp.asarray(rng.normal(size=(64, 128)), jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(128, 64)), jnp.float32)}
  f = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
  q = quantize(params, "nf4")
  floats = lj.dequantize(q)
  cfg = lj.LoraConfig(r=4, targets=["w1", "w2"], use_dora=True, dropout=dropout)
  lora = jax.tree.map(lambda t: t + 0.05, lj.init_lora(q, cfg, jax.random.key(0)))
  x, key = jnp.asarray(rng.normal(size=(8, 64)), jnp.float32), jax.random.key(3)
  apply, ref = lj.lora_transform(f, q, cfg, strict=True), lj.lora_transform(f, floats, cfg, strict=True)
  loss = lambda run, p: lambda l: jnp.sum(jnp.sin(run(p, l, x, rng=key)))
  np.testing.assert_allclose(apply(q, lora, x, rng=key), ref(floats, lora, x, rng=key), atol=1e-4)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-4),
               jax.grad(loss(apply, q))(lora), jax.grad(loss(ref, floats))(lora))
  np.testing.assert_allclose(f(lj.merge(q, lora, cfg), x), ref(floats, lora, x, rng=None), atol=1e-4)
