"""GPT-2 (`lorax_jax.models.gpt2`) against transformers' ``GPT2LMHeadModel`` and PEFT.

Tiny random checkpoints written by transformers itself (LayerNorm weights and every bias moved off
their init, so a misplaced one shows): the logits, greedy generation, a written-back checkpoint,
and adapters on the ``Conv1D`` layers (PEFT's ``fan_in_fan_out``) both ways.
"""

from __future__ import annotations

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorax_jax import LoraConfig, lora_transform
from lorax_jax.io import load_adapter, save_adapter
from lorax_jax.apps import finetune
from lorax_jax.models import hf, load_model, path_map
from lorax_jax.models.generate import generate
from lorax_jax.models.gpt2 import GPT2_PATH_MAP, GPT2Config, load_gpt2, save_gpt2
from test_io import random_lora
from test_peft import TOL, max_diff, randomize_lora, torch_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 128
SMALL = dict(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2,
             bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(**SMALL),
    # the options a GPT-2 config may change: layer-scaled scores, another MLP width, an untied head
    "gpt2-options": lambda: transformers.GPT2Config(**SMALL, scale_attn_by_inverse_layer_idx=True, n_inner=80,
                                                    tie_word_embeddings=False),
}
TARGETS = ["c_attn", "c_proj", "c_fc"]  # every Conv1D (c_proj: attention's and the MLP's)
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 12))


def torch_model(directory: str):
  return transformers.GPT2LMHeadModel.from_pretrained(directory, attn_implementation="eager").eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory) -> str:
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(CONFIGS[request.param]())
  with torch.no_grad():
    for name, p in model.named_parameters():
      if ".ln_" in name or name.endswith(".bias"):
        p.add_(0.3 * torch.randn_like(p))
  directory = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(directory, safe_serialization=True)
  return directory


def test_logits_match_transformers(checkpoint, tmp_path):
  expected = torch_logits(torch_model(checkpoint), TOKENS)
  assert np.abs(expected).max() > 1
  config, model, params = load_gpt2(checkpoint)
  np.testing.assert_allclose(jax.jit(model.apply)(params, TOKENS), expected, atol=TOL)
  assert load_model(checkpoint)[0] == config and path_map(config) is GPT2_PATH_MAP  # the family from config.json
  save_gpt2(str(tmp_path), params, config)  # written back: the same config, loaded by transformers
  assert GPT2Config.from_hf(hf.read_config(str(tmp_path))) == config
  np.testing.assert_allclose(torch_logits(torch_model(str(tmp_path)), TOKENS), expected, atol=1e-5)


def test_greedy_generation_matches_transformers(checkpoint):
  """Batched and left-padded here (positions count real tokens), one prompt at a time there."""
  reference = torch_model(checkpoint)
  reference.generation_config.eos_token_id = None
  _, model, params = load_gpt2(checkpoint)
  prompts = [TOKENS[0, :9].tolist(), TOKENS[1, :5].tolist()]
  for prompt, got in zip(prompts, generate(model, params, prompts, max_new_tokens=6)):
    with torch.no_grad():
      out = reference.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert got == out[0, len(prompt):].tolist()


def test_gpt2model_checkpoint_loads_as_the_lm(tmp_path):
  """OpenAI's ``gpt2`` on the Hub is a ``GPT2Model`` checkpoint (names without ``transformer.``):
  read as the ``GPT2LMHeadModel`` transformers builds from it."""
  torch.manual_seed(1)
  transformers.GPT2Model(CONFIGS["gpt2"]()).save_pretrained(str(tmp_path), safe_serialization=True)
  expected = torch_logits(torch_model(str(tmp_path)), TOKENS)
  _, model, params = load_gpt2(str(tmp_path))
  np.testing.assert_allclose(model.apply(params, TOKENS), expected, atol=TOL)


@pytest.mark.parametrize("change, message", [
    ({"activation_function": "relu"}, "activation_function='relu' is not implemented"),
    ({"add_cross_attention": True}, "add_cross_attention=True"),
    ({"rotary_dim": 16}, "rotary_dim=16"),
    ({"model_type": "llama"}, "model_type='llama', not 'gpt2'"),
])
def test_config_refuses_what_it_does_not_implement(change, message):
  with pytest.raises(ValueError, match=message):
    GPT2Config.from_hf({**CONFIGS["gpt2"]().to_dict(), **change})


def test_finetune_names_the_family_it_does_not_run(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(CONFIGS["gpt2"]().to_dict()))
  with pytest.raises(ValueError, match="holds a 'gpt2' model; finetune runs the Llama families"):
    finetune.load_model(str(tmp_path))


def adapted_logits(checkpoint, lora, cfg) -> np.ndarray:
  _, model, params = load_gpt2(checkpoint)
  return np.asarray(lora_transform(model.apply, params, cfg)(params, lora, jnp.asarray(TOKENS)))


def test_adapter_saved_here_runs_in_peft(checkpoint, tmp_path):
  """The factors of a ``Conv1D`` LoRA are a linear layer's: PEFT runs an adapter written here."""
  _, _, params = load_gpt2(checkpoint)
  cfg = LoraConfig(r=4, alpha=8, targets=TARGETS)
  lora = jax.tree.map(lambda x: 0.1 * x, random_lora(params, cfg))
  save_adapter(str(tmp_path), lora, cfg, params, GPT2_PATH_MAP, task_type="CAUSAL_LM")
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "fan_in_fan_out is set to False")  # PEFT sets it itself, on load
    model = peft.PeftModel.from_pretrained(torch_model(checkpoint), str(tmp_path)).eval()
  want = torch_logits(model, TOKENS)
  assert max_diff(adapted_logits(checkpoint, lora, cfg), want) < TOL
  assert max_diff(want, torch_logits(torch_model(checkpoint), TOKENS)) > 1e-2


def test_peft_adapter_both_ways(checkpoint, tmp_path):
  """A PEFT adapter (``fan_in_fan_out=True``) runs here; one written here is PEFT's own file
  (``fan_in_fan_out`` True, PEFT's keys) and loads without a warning."""
  model = peft.get_peft_model(torch_model(checkpoint), peft.LoraConfig(
      task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=TARGETS, fan_in_fan_out=True))
  randomize_lora(model)
  model.save_pretrained(str(tmp_path / "peft"))
  want = torch_logits(model, TOKENS)
  _, _, params = load_gpt2(checkpoint)
  lora, cfg = load_adapter(str(tmp_path / "peft"), params, GPT2_PATH_MAP)
  assert max_diff(adapted_logits(checkpoint, lora, cfg), want) < TOL

  save_adapter(str(tmp_path / "here"), lora, cfg, params, GPT2_PATH_MAP, task_type="CAUSAL_LM")
  with open(os.path.join(tmp_path / "here", "adapter_config.json")) as f:
    assert json.load(f)["fan_in_fan_out"] is True
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    reloaded = peft.PeftModel.from_pretrained(torch_model(checkpoint), str(tmp_path / "here")).eval()
  assert not [w for w in caught if any(s in str(w.message) for s in ("fan_in_fan_out", "missing", "unexpected"))]
  assert max_diff(torch_logits(reloaded, TOKENS), want) < TOL
  assert max_diff(want, torch_logits(torch_model(checkpoint), TOKENS)) > 1e-2
