"""The Llama-shaped families against transformers and PEFT: Llama 3.x (llama3/linear RoPE scaling,
attention and MLP biases), Qwen2 (q/k/v biases, per-layer sliding windows), Qwen3 (per-head q/k
RMSNorm, explicit head_dim), Mistral (a sliding window shorter than the sequences) and Phi-3 (fused
qkv_proj and gate_up_proj, partial RoPE, a sliding window) and Gemma 2 ((1 + w) norms, sandwich norms,
a scaled embedding, soft-capped scores and logits, alternate sliding layers), Gemma 3 (text: q/k norms,
a local RoPE in sliding layers, a scaled global one in full layers).

Each family is a tiny random checkpoint written by transformers' own model class; lorax_jax loads
it with `load_llama` and must give its logits, its greedy generation and, with an adapter trained
in either library, PEFT's logits.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorax_jax import LoraConfig, lora_transform
from lorax_jax.io import load_adapter, save_adapter
from lorax_jax.models import load_model, model_type, path_map
from lorax_jax.models.generate import generate
from lorax_jax.models.hf import read_config
from lorax_jax.models.llama import LLAMA_PATH_MAP, Llama, LlamaConfig, RopeScaling, load_llama, save_llama, stack_layers
from test_io import random_lora
from test_peft import TOL, max_diff, randomize_lora, torch_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 128
SMALL = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, initializer_range=0.2)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # head_dim 12: frequencies in all three bands
FAMILIES = {
    "llama3": lambda: transformers.LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True,
                                               max_position_embeddings=256, rope_scaling=LLAMA3_ROPE),
    "llama-linear": lambda: transformers.LlamaConfig(**SMALL, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=4,
                                              max_window_layers=1, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=16),
    "mistral": lambda: transformers.MistralConfig(**SMALL, sliding_window=4),
    # scores and logits of a tiny model are small: caps this low bend them
    "gemma2": lambda: transformers.Gemma2Config(**SMALL, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                                                attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    # layer 0 slides with the local RoPE, layer 1 sees everything with the global, linearly scaled one
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **SMALL, head_dim=16, sliding_window=4, query_pre_attn_scalar=24, final_logit_softcapping=3.0,
        layer_types=["sliding_attention", "full_attention"], rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "phi3": lambda: transformers.Phi3Config(**SMALL, sliding_window=4, partial_rotary_factor=0.5,
                                            bos_token_id=1, eos_token_id=2, pad_token_id=0),
}
ABLATIONS = {  # the option each family adds, removed: the logits must then differ
    "llama3": dict(rope_scaling=None), "llama-linear": dict(rope_scaling=None),
    "qwen2": dict(sliding_window=None, layer_types=None), "mistral": dict(sliding_window=None),
    "phi3": dict(sliding_window=None, partial_rotary_factor=1.0),
    "gemma2": dict(sliding_window=None, layer_types=None, attn_logit_softcapping=None),
    "gemma3": dict(rope_local_base_freq=None),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FUSED_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]  # Phi-3's modules
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 12))  # longer than the sliding windows (4)


def torch_model(directory: str):
  """transformers' model of the checkpoint, eager attention (its reference masking)."""
  return transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def checkpoint(request, tmp_path_factory) -> tuple[str, str]:
  """``(directory, family)``: a random checkpoint saved by transformers, its norms away from 1
  and biases away from 0 (their init), so that a missing or misplaced one shows."""
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(FAMILIES[request.param]())
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith(".bias"):
        p.add_(0.3 * torch.randn_like(p))
  directory = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(directory, safe_serialization=True)
  return directory, request.param


def test_logits_match_transformers(checkpoint, tmp_path):
  directory, family = checkpoint
  expected = torch_logits(torch_model(directory), TOKENS)
  assert np.abs(expected).max() > 1  # a meaningful scale for the tolerance
  config, model, params = load_llama(directory)
  np.testing.assert_allclose(jax.jit(model.apply)(params, TOKENS), expected, atol=TOL)
  assert load_model(directory)[0] == config and path_map(config) is LLAMA_PATH_MAP  # the family from config.json
  scanned = Llama(config, scan_layers=True)  # one layer compiled: the windows become scanned data
  np.testing.assert_allclose(jax.jit(scanned.apply)(stack_layers(params), TOKENS), expected, atol=TOL)
  if family in ABLATIONS:
    plain = Llama(dataclasses.replace(config, **ABLATIONS[family]))
    assert max_diff(jax.jit(plain.apply)(params, TOKENS), expected) > 1e-2

  save_llama(str(tmp_path), params, config)  # written back: the same config, loaded by transformers
  assert LlamaConfig.from_hf(read_config(str(tmp_path))) == config
  np.testing.assert_allclose(torch_logits(torch_model(str(tmp_path)), TOKENS), expected, atol=1e-5)


def test_greedy_generation_matches_transformers(checkpoint):
  """Batched and left-padded here (the window counts real tokens), one prompt at a time there."""
  directory, _ = checkpoint
  reference = torch_model(directory)
  reference.generation_config.eos_token_id = None  # no early stop: every step compared
  _, model, params = load_llama(directory)
  prompts = [TOKENS[0, :9].tolist(), TOKENS[1, :5].tolist()]
  ours = generate(model, params, prompts, max_new_tokens=6)
  for prompt, got in zip(prompts, ours):
    with torch.no_grad():
      out = reference.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert got == out[0, len(prompt):].tolist()


def targets(family: str) -> list[str]:
  """Every projection of the family's layers, PEFT's module names."""
  return FUSED_TARGETS if family == "phi3" else TARGETS


def assert_adapted_logits_are_peft(directory, flax_model, params, lora, cfg, peft_model) -> None:
  """The adapted logits here are PEFT's, and the adapter changes them (it tests something)."""
  got = lora_transform(flax_model.apply, params, cfg)(params, lora, jnp.asarray(TOKENS))
  want = torch_logits(peft_model, TOKENS)
  assert max_diff(got, want) < TOL
  assert max_diff(want, torch_logits(torch_model(directory), TOKENS)) > 1e-2


def test_peft_adapter_runs_here(checkpoint, tmp_path):
  directory, family = checkpoint
  assert_peft_adapter_runs_here(directory, targets(family), tmp_path)


def assert_peft_adapter_runs_here(directory, target_modules, tmp_path) -> None:
  """A PEFT adapter (random factors on ``target_modules``) of the checkpoint in ``directory``, saved
  by PEFT and loaded here, gives PEFT's logits."""
  model = peft.get_peft_model(torch_model(directory), peft.LoraConfig(
      task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=target_modules))
  randomize_lora(model)
  model.save_pretrained(str(tmp_path))
  _, flax_model, params = load_llama(directory)
  lora, cfg = load_adapter(str(tmp_path), params, LLAMA_PATH_MAP)
  assert_adapted_logits_are_peft(directory, flax_model, params, lora, cfg, model)


def test_adapter_saved_here_runs_in_peft(checkpoint, tmp_path):
  directory, family = checkpoint
  _, flax_model, params = load_llama(directory)
  cfg = LoraConfig(r=4, alpha=8, targets=targets(family))
  lora = jax.tree.map(lambda x: 0.1 * x, random_lora(params, cfg))
  save_adapter(str(tmp_path), lora, cfg, params, LLAMA_PATH_MAP, task_type="CAUSAL_LM")
  model = peft.PeftModel.from_pretrained(torch_model(directory), str(tmp_path)).eval()
  assert_adapted_logits_are_peft(directory, flax_model, params, lora, cfg, model)


def test_llama3_frequencies_are_transformers():
  """`RopeScaling.scale` against transformers' ``_compute_llama3_parameters`` itself."""
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  hf_config = FAMILIES["llama3"]()
  config = LlamaConfig.from_hf(hf_config.to_dict())
  want, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](hf_config)
  plain = 1.0 / np.float32(config.rope_theta) ** (np.arange(0, 12, 2).astype(np.float32) / np.float32(12))
  got = config.rope_scaling.scale(plain)
  np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
  assert attention_factor == 1.0
  ratio = got / plain  # high frequencies kept, low ones divided by factor, the middle in between
  assert ratio[0] == 1 and ratio[-1] == 1 / 8 and ((ratio > 1 / 8) & (ratio < 1)).any()


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
     "rope_type='yarn' is not implemented"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type='dynamic' is not implemented"),
    ({"rope_scaling": {**LLAMA3_ROPE, "partial_rotary_factor": 0.5}}, "partial_rotary_factor=0.5"),
    ({"rope_scaling": {"rope_type": "linear"}}, "'linear' lacks factor"),
    ({"model_type": "mistral", "mlp_bias": True}, "'mistral' model has mlp_bias=True"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4,
      "layer_types": ["sliding_attention", "bogus"]}, "layer_types"),
    ({"model_type": "qwen3", "use_sliding_window": False,
      "layer_types": ["sliding_attention", "full_attention"]}, "sliding_window is None"),
    ({"rope_interleaved": True}, "rope_interleaved=True"),
    ({"model_type": "phi3", "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 6,
                                             "long_factor": [2.0] * 6}}, "rope_type='longrope' is not implemented"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),  # Phi-3's option, not Llama's
    ({"model_type": "gemma2", "hidden_activation": "gelu"}, "'gemma2' model has hidden_activation='gelu'"),
    ({"model_type": "gemma2", "use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0"),  # Gemma's option, not Llama's
    ({"model_type": "gemma3_text", "rope_parameters": {"full_attention": {"rope_type": "default"},
                                                       "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     "sliding layers' RoPE .* is not implemented"),
])
def test_config_refuses_what_no_family_implements(change, message):
  base = {"model_type": "llama", **{k: v for k, v in SMALL.items() if k != "initializer_range"}}
  with pytest.raises(ValueError, match=message):
    LlamaConfig.from_hf({**base, **change})


@pytest.mark.parametrize("family", list(FAMILIES))
def test_config_round_trips(family):
  config = LlamaConfig.from_hf(FAMILIES[family]().to_dict())
  assert config.model_type == FAMILIES[family]().model_type
  assert LlamaConfig.from_hf(config.to_hf()) == config


def test_layer_windows():
  """Qwen's rule (layers from max_window_layers on slide) and Mistral's (every layer slides)."""
  qwen = LlamaConfig.from_hf(FAMILIES["qwen2"]().to_dict())
  assert [qwen.layer_window(i) for i in range(2)] == [None, 4]
  mistral = LlamaConfig.from_hf(FAMILIES["mistral"]().to_dict())
  assert mistral.layer_types is None and [mistral.layer_window(i) for i in range(2)] == [4, 4]
  assert LlamaConfig.from_hf({**FAMILIES["qwen3"]().to_dict()}).sliding_window is None
  with pytest.raises(ValueError, match="sliding_window=4 is not an option of model_type='llama'"):
    LlamaConfig(**{k: v for k, v in SMALL.items() if k != "initializer_range"}, head_dim=12, sliding_window=4)
  assert RopeScaling("linear", 2.0).to_hf() == {"rope_type": "linear", "factor": 2.0}


def test_after_prefix_is_the_whole_sequence(checkpoint):
  """Rows after a shared prefix (`Llama.after_prefix`, the fine-tuning prompt's one pass; unrolled
  and scanned) give the whole sequence's states: sliding windows count cache slots there too."""
  _, model, params = load_llama(checkpoint[0])
  rows = jnp.asarray(TOKENS).at[1, :5].set(TOKENS[0, :5])  # both rows start with the same 5 tokens
  want = jax.jit(functools.partial(model.apply, method=Llama.hidden))(params, rows)[0]
  for scan in (False, True):
    after_prefix = functools.partial(model.clone(scan_layers=scan).apply, method=Llama.after_prefix)
    got = jax.jit(after_prefix)(stack_layers(params) if scan else params, rows[:1, :5], rows[:, 5:])
    np.testing.assert_allclose(got, want[:, 5:], atol=1e-5)


def test_load_model_picks_the_family_and_refuses_by_name(tmp_path):
  """`load_model` reads ``model_type`` (else ``architectures``); an unknown one, or an unknown field
  of a known one, is an error naming it."""
  assert model_type({"architectures": ["Qwen3ForCausalLM"]}) == "qwen3"
  assert model_type({"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}) == "phi3"
  base = {k: v for k, v in SMALL.items() if k != "initializer_range"}
  for config, message in [({**base, "model_type": "qwen2_moe"}, "model_type='qwen2_moe'; the supported causal LMs are"),
                          ({**base, "architectures": ["Qwen2MoeForCausalLM"]}, "architectures=.*Qwen2MoeForCausalLM"),
                          ({**base, "model_type": "qwen2", "moe_intermediate_size": 8}, "moe_intermediate_size=8")]:
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
      load_model(str(tmp_path))
