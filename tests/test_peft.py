"""Adapters cross PyTorch PEFT <-> lorax_jax both ways with the same numbers.

A tiny custom torch model (embedding, q/v/o linears, 3×3 conv) mirrored by `test_io.Net`,
then Hugging Face Llama and BERT with the reference Flax models.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

from lorax_jax import LoraConfig, find_targets, init_lora, lora_transform, merge
from lorax_jax.io import load_adapter, save_adapter
from lorax_jax.lora_tree import target_factors
from lorax_jax.models.bert import (BERT_MODEL_PATH_MAP, BERT_PATH_MAP, BertForSequenceClassification, BertModel,
                                   load_bert)
from lorax_jax.models.hf import params_from_tensors, tensors_from_params
from lorax_jax.models.llama import LLAMA_PATH_MAP, load_llama, save_llama
from test_io import NET_MAP, Net, random_lora

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOL = 1e-4


class TorchBlock(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.q_proj, self.v_proj, self.o_proj = (torch.nn.Linear(8, 8) for _ in range(3))

  def forward(self, x):
    return x + self.o_proj(self.q_proj(x) * self.v_proj(x))


class TorchNet(torch.nn.Module):
  """`test_io.Net` in torch, with the module names of `test_io.NET_MAP`."""

  def __init__(self):
    super().__init__()
    self.model = torch.nn.Module()
    self.model.embed_tokens = torch.nn.Embedding(16, 8)
    self.model.layers = torch.nn.ModuleList([TorchBlock(), TorchBlock()])
    self.conv_in = torch.nn.Conv2d(3, 4, 3, padding=1)

  def forward(self, tokens, image):
    x = self.model.embed_tokens(tokens)
    for layer in self.model.layers:
      x = layer(x)
    return x, self.conv_in(image)


def state(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def randomize_lora(model, seed=0):
  """Every LoRA factor random (PEFT starts lora_B at zero, which would test nothing)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def max_diff(x, y) -> float:
  return float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))


@pytest.fixture(scope="module")
def net():
  torch.manual_seed(0)
  base = TorchNet().eval()
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 16, size=(2, 5))
  image = rng.normal(size=(2, 3, 6, 6)).astype(np.float32)
  return base, state(base), tokens, image


def torch_net(weights):
  model = TorchNet().eval()
  model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
  return model


def run_torch(model, tokens, image):
  with torch.no_grad():
    x, y = model(torch.from_numpy(tokens), torch.from_numpy(image))
  return x.numpy(), y.numpy().transpose(0, 2, 3, 1)  # NCHW -> NHWC


def run_jax(params, lora, cfg, tokens, image):
  """Factored (`lora_transform`) outputs, checked against the merged reference."""
  args = (jnp.asarray(tokens), jnp.asarray(image.transpose(0, 2, 3, 1)))
  out = lora_transform(Net().apply, params, cfg)(params, lora, *args)
  ref = Net().apply(merge(params, lora, cfg), *args)
  for o, r in zip(out, ref):
    assert max_diff(o, r) < TOL
  return out


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("peft_kwargs", [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules="all-linear", rank_pattern={"o_proj": 2, "layers.1.q_proj": 3}, alpha_pattern={"v_proj": 5}),
    dict(target_modules=["embed_tokens", "conv_in", "q_proj"], rank_pattern={"conv_in": 2}),
], ids=["qv", "all-linear-patterns", "embedding-conv"])
def test_peft_adapter_runs_here(tmp_path, net, peft_kwargs, use_rslora):
  _, weights, tokens, image = net
  model = peft.get_peft_model(torch_net(weights), peft.LoraConfig(r=4, lora_alpha=8, use_rslora=use_rslora, **peft_kwargs))
  randomize_lora(model)
  model.save_pretrained(str(tmp_path))
  params = params_from_tensors(weights, NET_MAP)
  lora, cfg = load_adapter(str(tmp_path), params, NET_MAP)
  want = run_torch(model, tokens, image)
  got = run_jax(params, lora, cfg, tokens, image)
  base = run_torch(torch_net(weights), tokens, image)
  for g, w, b in zip(got, want, base):
    assert max_diff(g, w) < TOL
  assert max(max_diff(w, b) for w, b in zip(want, base)) > 1e-2  # the adapter changes the outputs


def train(loss, lora, params, cfg, steps=3):
  """A few optax steps on the factors only; every ``b`` ends non-zero."""
  opt = optax.adam(5e-2)

  @jax.jit
  def step(lora, opt_state):
    updates, opt_state = opt.update(jax.grad(loss)(lora), opt_state)
    return optax.apply_updates(lora, updates), opt_state

  opt_state = opt.init(lora)
  for _ in range(steps):
    lora, opt_state = step(lora, opt_state)
  assert all(float(jnp.abs(b).max()) > 0 for _, _, b in target_factors(find_targets(params, cfg), lora))
  return lora


@pytest.mark.parametrize("use_rslora", [False, True])
def test_adapter_trained_here_runs_in_peft(tmp_path, net, use_rslora):
  _, weights, tokens, image = net
  params = params_from_tensors(weights, NET_MAP)
  cfg = LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "o_proj", "embed_tokens", "conv_in"],
                   rank_pattern={"conv_in": 2, "layers_1/v_proj": 3}, alpha_pattern={"o_proj": 3.0},
                   use_rslora=use_rslora)
  rng = np.random.default_rng(1)
  t, x = jnp.asarray(tokens), jnp.asarray(rng.normal(size=(2, 6, 6, 3)).astype(np.float32))
  target = rng.normal(size=(2, 5, 8)).astype(np.float32)

  lora_apply = lora_transform(Net().apply, params, cfg)

  def loss(lora):
    h, y = lora_apply(params, lora, t, x)
    return jnp.mean((h - target) ** 2) + jnp.mean(y ** 2)

  lora = train(loss, init_lora(params, cfg, jax.random.key(0)), params, cfg)
  save_adapter(str(tmp_path), lora, cfg, params, NET_MAP)
  model = peft.PeftModel.from_pretrained(torch_net(weights), str(tmp_path)).eval()
  for g, w in zip(run_jax(params, lora, cfg, tokens, image), run_torch(model, tokens, image)):
    assert max_diff(g, w) < TOL
  merged_torch = state(model.merge_and_unload())
  merged_here = tensors_from_params(merge(params, lora, cfg), NET_MAP)
  assert merged_torch.keys() == merged_here.keys()
  for k in merged_here:
    assert max_diff(merged_here[k], merged_torch[k]) < 1e-5, k


# ---- Hugging Face Llama ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                    rope_theta=500.0)
  directory = str(tmp_path_factory.mktemp("llama"))
  transformers.LlamaForCausalLM(config).save_pretrained(directory)
  return directory


def torch_llama(directory):
  return transformers.LlamaForCausalLM.from_pretrained(directory).eval()


def torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.from_numpy(tokens)).logits.numpy()


LLAMA_TOKENS = np.random.default_rng(0).integers(0, 64, size=(2, 7))


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("peft_kwargs", [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules="all-linear", rank_pattern={"down_proj": 2, "layers.1.self_attn.q_proj": 3},
         alpha_pattern={"v_proj": 3}),
    dict(target_modules=["embed_tokens", "o_proj"]),  # PEFT also saves the base embedding table
], ids=["qv", "all-linear-patterns", "embedding"])
def test_llama_peft_adapter_runs_here(tmp_path, llama_dir, peft_kwargs, use_rslora):
  model = peft.get_peft_model(torch_llama(llama_dir), peft.LoraConfig(
      task_type="CAUSAL_LM", r=4, lora_alpha=8, use_rslora=use_rslora, **peft_kwargs))
  randomize_lora(model)
  model.save_pretrained(str(tmp_path))
  _, flax_model, params = load_llama(llama_dir)
  lora, cfg = load_adapter(str(tmp_path), params, LLAMA_PATH_MAP)
  got = lora_transform(flax_model.apply, params, cfg)(params, lora, jnp.asarray(LLAMA_TOKENS))
  want = torch_logits(model, LLAMA_TOKENS)
  assert max_diff(got, want) < TOL
  assert max_diff(want, torch_logits(torch_llama(llama_dir), LLAMA_TOKENS)) > 1e-2


@pytest.mark.parametrize("use_rslora", [False, True])
def test_llama_adapter_trained_here_runs_in_peft(tmp_path, llama_dir, use_rslora):
  _, flax_model, params = load_llama(llama_dir)
  cfg = LoraConfig(r=4, alpha=8, targets="all-linear", rank_pattern={"mlp/down_proj": 2},
                   alpha_pattern={"layers_1/self_attn/v_proj": 3.0}, use_rslora=use_rslora)
  lora_apply = lora_transform(flax_model.apply, params, cfg)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, size=(4, 9)))

  def loss(lora):
    logits = lora_apply(params, lora, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  lora = train(loss, init_lora(params, cfg, jax.random.key(0)), params, cfg)
  save_adapter(str(tmp_path / "adapter"), lora, cfg, params, LLAMA_PATH_MAP, base_model_name_or_path=llama_dir,
               task_type="CAUSAL_LM")
  model = peft.PeftModel.from_pretrained(torch_llama(llama_dir), str(tmp_path / "adapter")).eval()
  assert isinstance(model, peft.PeftModelForCausalLM)
  got = lora_apply(params, lora, jnp.asarray(LLAMA_TOKENS))
  assert max_diff(got, torch_logits(model, LLAMA_TOKENS)) < TOL

  merged = model.merge_and_unload()
  save_llama(str(tmp_path / "merged"), merge(params, lora, cfg), load_llama(llama_dir)[0])
  exported = torch_llama(str(tmp_path / "merged"))
  exported_state, merged_state = state(exported), state(merged)
  for k, v in merged_state.items():
    assert max_diff(exported_state[k], v) < 1e-5, k
  assert max_diff(torch_logits(exported, LLAMA_TOKENS), torch_logits(merged, LLAMA_TOKENS)) < TOL


# ---- Hugging Face BERT ----------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["peft-to-jax", "jax-to-peft"])
def test_bert_classifier_adapter(tmp_path, direction):
  torch.manual_seed(0)
  config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=40, max_position_embeddings=16, num_labels=3,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  transformers.BertForSequenceClassification(config).save_pretrained(str(tmp_path / "base"))
  base = lambda: transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "base")).eval()
  bert_config, params = load_bert(str(tmp_path / "base"))
  apply_fn = BertForSequenceClassification(bert_config).apply
  if direction == "peft-to-jax":
    # No task_type: LoRA alone (SEQ_CLS adds the classifier to modules_to_save: test_layers.py).
    model = peft.get_peft_model(base(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"],
                                                        rank_pattern={"intermediate.dense": 2}))
    randomize_lora(model)
    model.save_pretrained(str(tmp_path / "adapter"))
    lora, cfg = load_adapter(str(tmp_path / "adapter"), params, BERT_PATH_MAP)
  else:
    cfg = LoraConfig(r=4, alpha=8, targets=["query", "value"], rank_pattern={"layer_1/attention/self/value": 2})
    lora = random_lora(params, cfg)
    save_adapter(str(tmp_path / "adapter"), lora, cfg, params, BERT_PATH_MAP)
    model = peft.PeftModel.from_pretrained(base(), str(tmp_path / "adapter")).eval()
  ids = np.random.default_rng(0).integers(0, 50, size=(2, 6))
  mask = np.ones_like(ids)
  got = lora_transform(apply_fn, params, cfg)(params, lora, jnp.asarray(ids), jnp.asarray(mask))
  with torch.no_grad():
    want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    plain = base()(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
  assert max_diff(got, want) < TOL
  assert max_diff(want, plain) > 1e-3  # the adapter changes the logits


# ---- PEFT inits that change the base ---------------------------------------------------------

def test_non_rederivable_init_refused_with_working_recipe(tmp_path, net):
  """PiSSA with PEFT's randomized SVD (``pissa_niter_K``, torch's unseeded sketch) cannot be
  re-derived at load time (PiSSA and OLoRA are: tests/test_inits.py): it is refused with PEFT's
  conversion recipe, and the recipe's output loads with PEFT's outputs."""
  _, weights, tokens, image = net
  init = "pissa_niter_2"
  model = peft.get_peft_model(torch_net(weights), peft.LoraConfig(
      r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=init))
  model.peft_config["default"].init_lora_weights = True  # the recipe: keep the initial adapter
  model.save_pretrained(str(tmp_path / "initial"))
  model.peft_config["default"].init_lora_weights = init
  randomize_lora(model)  # "training"
  model.save_pretrained(str(tmp_path / "trained"))
  params = params_from_tensors(weights, NET_MAP)  # the original base
  with pytest.raises(ValueError, match=rf"init_lora_weights='{init}' changes the base weights.*"
                                       "path_initial_model_for_weight_conversion"):
    load_adapter(str(tmp_path / "trained"), params, NET_MAP)
  model.save_pretrained(str(tmp_path / "converted"),
                        path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
  lora, cfg = load_adapter(str(tmp_path / "converted"), params, NET_MAP)
  for got, want in zip(run_jax(params, lora, cfg, tokens, image), run_torch(model, tokens, image)):
    assert max_diff(got, want) < TOL


@pytest.mark.parametrize("init", ["corda", "loftq", "lora_ga", "mica"])
def test_data_dependent_inits_refused(tmp_path, net, init):
  """CorDA, LoftQ, LoRA-GA and MiCA change the base from data or quantisation lorax_jax cannot
  re-derive: refused with the recipe."""
  _, weights, _, _ = net
  model = peft.get_peft_model(torch_net(weights), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
  model.save_pretrained(str(tmp_path))
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"init_lora_weights": init}))
  with pytest.raises(ValueError, match=rf"init_lora_weights='{init}' changes the base weights"):
    load_adapter(str(tmp_path), params_from_tensors(weights, NET_MAP), NET_MAP)


# ---- a bare BertModel (sentence-transformers layout) ------------------------------------------

@pytest.mark.parametrize("direction", ["peft-to-jax", "jax-to-peft"])
def test_bare_bert_model_adapter(tmp_path, direction):
  """Before: BERT_PATH_MAP refused a bare BertModel's adapter (names without ``bert.``) with a
  list of keys and no cause."""
  torch.manual_seed(0)
  config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=40, max_position_embeddings=16,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  transformers.BertModel(config).save_pretrained(str(tmp_path / "base"))
  base = lambda: transformers.BertModel.from_pretrained(str(tmp_path / "base")).eval()
  bert_config, params = load_bert(str(tmp_path / "base"))
  if direction == "peft-to-jax":
    model = peft.get_peft_model(base(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"],
                                                        rank_pattern={"intermediate.dense": 2}))
    randomize_lora(model)
    model.save_pretrained(str(tmp_path / "adapter"))
    assert "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight" in \
        load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    lora, cfg = load_adapter(str(tmp_path / "adapter"), params, BERT_PATH_MAP)
    lora2, cfg2 = load_adapter(str(tmp_path / "adapter"), params, BERT_MODEL_PATH_MAP)
    assert cfg2 == cfg and jax.tree.all(jax.tree.map(np.array_equal, lora, lora2))
  else:
    cfg = LoraConfig(r=4, alpha=8, targets=["query", "value"], rank_pattern={"layer_1/attention/self/value": 2})
    lora = random_lora(params, cfg)
    save_adapter(str(tmp_path / "adapter"), lora, cfg, params, BERT_MODEL_PATH_MAP)
    model = peft.PeftModel.from_pretrained(base(), str(tmp_path / "adapter")).eval()
  apply_fn = lambda p, ids, mask: BertModel(bert_config).apply({"params": p["params"]["bert"]}, ids, mask)
  ids = np.random.default_rng(0).integers(0, 50, size=(2, 6))
  mask = np.ones_like(ids)
  got = lora_transform(apply_fn, params, cfg)(params, lora, jnp.asarray(ids), jnp.asarray(mask))
  with torch.no_grad():
    want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    plain = base()(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  assert max_diff(got[0], want.last_hidden_state.numpy()) < TOL
  assert max_diff(got[1], want.pooler_output.numpy()) < TOL
  assert max_diff(want.last_hidden_state.numpy(), plain.last_hidden_state.numpy()) > 1e-3


# ---- tied embeddings (issue 8 item 6) -----------------------------------------------------------

@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                    rope_theta=500.0, tie_word_embeddings=True)
  directory = str(tmp_path_factory.mktemp("tied_llama"))
  transformers.LlamaForCausalLM(config).save_pretrained(directory)
  return directory


EMBED = "params/model/embed_tokens/embedding"


def test_tied_embedding_peft_adapter_runs_here(tmp_path, tied_llama_dir):
  """PEFT adapts a tied embedding at the token lookup only; load_adapter says so with
  target_uses, and the logits are PEFT's. Before: 4.6 away (also applied at the head).
  Needs the engine's LoraConfig.target_uses."""
  model = peft.get_peft_model(torch_llama(tied_llama_dir), peft.LoraConfig(
      task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]))
  randomize_lora(model)
  model.save_pretrained(str(tmp_path))
  _, flax_model, params = load_llama(tied_llama_dir)
  assert "lm_head" not in params["params"]
  lora, cfg = load_adapter(str(tmp_path), params, LLAMA_PATH_MAP)
  assert {k: tuple(v) for k, v in cfg.target_uses.items()} == {re.escape(EMBED): ("lookup",)}
  got = lora_transform(flax_model.apply, params, cfg)(params, lora, jnp.asarray(LLAMA_TOKENS))
  want = torch_logits(model, LLAMA_TOKENS)
  assert max_diff(got, want) < TOL


def test_tied_embedding_adapter_trained_here_runs_in_peft(tmp_path, tied_llama_dir):
  """An adapter of a tied embedding at every use is refused (PEFT would load it wrongly: 28 away
  before); limited to the lookup, PEFT gives its logits. Needs the engine's LoraConfig.target_uses."""
  _, flax_model, params = load_llama(tied_llama_dir)
  everywhere = LoraConfig(r=4, alpha=8, targets=["embed_tokens", "q_proj"])
  with pytest.raises(ValueError, match="embedding model.embed_tokens, which these params tie to the output head "
                                       "lm_head.weight.*target_uses="):
    save_adapter(str(tmp_path / "all"), random_lora(params, everywhere), everywhere, params, LLAMA_PATH_MAP)
  assert not (tmp_path / "all").exists()
  cfg = LoraConfig(r=4, alpha=8, targets=["embed_tokens", "q_proj"], target_uses={EMBED: ("lookup",)})
  lora = random_lora(params, cfg)
  save_adapter(str(tmp_path / "adapter"), lora, cfg, params, LLAMA_PATH_MAP, task_type="CAUSAL_LM")
  model = peft.PeftModel.from_pretrained(torch_llama(tied_llama_dir), str(tmp_path / "adapter")).eval()
  got = lora_transform(flax_model.apply, params, cfg)(params, lora, jnp.asarray(LLAMA_TOKENS))
  assert max_diff(got, torch_logits(model, LLAMA_TOKENS)) < TOL


def test_tied_embedding_in_modules_to_save_is_refused_both_ways(tmp_path, tied_llama_dir):
  """PEFT's modules_to_save copy of a tied embedding feeds the lookup only (the head keeps the
  original table); here the copy would replace the leaf at both uses, so both ways are refused."""
  model = peft.get_peft_model(torch_llama(tied_llama_dir), peft.LoraConfig(
      task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "modules_to_save" in name:
        p.add_(0.1)
  model.save_pretrained(str(tmp_path / "peft"))
  _, _, params = load_llama(tied_llama_dir)
  with pytest.raises(ValueError, match="modules_to_save holds model.embed_tokens, an embedding these params tie"):
    load_adapter(str(tmp_path / "peft"), params, LLAMA_PATH_MAP)
  cfg = LoraConfig(r=4, alpha=8, targets=["q_proj"], modules_to_save=["embed_tokens"])
  lora = init_lora(params, cfg, jax.random.key(0))
  with pytest.raises(ValueError, match="modules_to_save holds model.embed_tokens"):
    save_adapter(str(tmp_path / "ours"), lora, cfg, params, LLAMA_PATH_MAP)
  assert not (tmp_path / "ours").exists()


def test_bf16_base_with_float32_factors_as_close_to_truth_as_peft(tmp_path, llama_dir):
  """Branch precision: a bf16 base with float32 factors is no further from the float32 truth than
  PEFT on the same weights (×1.2): the branch computes in the factors' dtype, as PEFT's does."""
  model = peft.get_peft_model(torch_llama(llama_dir), peft.LoraConfig(
      task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
  randomize_lora(model, seed=3)
  model.save_pretrained(str(tmp_path))
  truth = torch_logits(model, LLAMA_TOKENS)
  bf16_base = transformers.LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).eval()
  peft_bf16 = peft.PeftModel.from_pretrained(bf16_base, str(tmp_path)).eval()
  assert all(p.dtype == torch.float32 for n, p in peft_bf16.named_parameters() if "lora_" in n)
  with torch.no_grad():
    peft_err = max_diff(peft_bf16(torch.from_numpy(LLAMA_TOKENS)).logits.float().numpy(), truth)
  _, flax_model, params = load_llama(llama_dir, dtype=jnp.bfloat16)
  params = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)
  lora, cfg = load_adapter(str(tmp_path), params, LLAMA_PATH_MAP)
  assert cfg.branch_dtype == "factors" and all(x.dtype == jnp.float32 for x in jax.tree.leaves(lora))
  ours = lora_transform(flax_model.apply, params, cfg)(params, lora, jnp.asarray(LLAMA_TOKENS))
  our_err = max_diff(np.asarray(ours, np.float32), truth)
  assert our_err <= 1.2 * peft_err, (our_err, peft_err)
  # The branch in the bf16 kernel's dtype (the old behaviour, now branch_dtype="kernel") misses it.
  in_kernel_dtype = lora_transform(flax_model.apply, params, cfg.replace(branch_dtype="kernel"))
  kernel_err = max_diff(np.asarray(in_kernel_dtype(params, lora, jnp.asarray(LLAMA_TOKENS)), np.float32), truth)
  assert kernel_err > 1.2 * peft_err, (kernel_err, peft_err)
