"""The Flax Llama against transformers' torch ``LlamaForCausalLM``: random configs and SmolLM2."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorax_jax.models import gguf as G
from lorax_jax.models.generate import generate
from lorax_jax.models.hf import tensors_from_params
from lorax_jax.models.llama import LLAMA_PATH_MAP, load_llama, save_llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.numpy()


def torch_llama(config, params):
  """transformers' Llama holding our params, converted back through LLAMA_PATH_MAP."""
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf())).eval()
  state = {k: torch.tensor(v) for k, v in tensors_from_params(params, LLAMA_PATH_MAP).items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert not unexpected and set(missing) <= ({"lm_head.weight"} if config.tie_word_embeddings else set())
  return model


@pytest.mark.parametrize("tied, heads, kv_heads, theta", [
    (False, 6, 2, 5000.0), (True, 4, 4, 10000.0), (True, 8, 1, 123.0)])
def test_random_llama_matches_torch(tmp_path, tied, heads, kv_heads, theta):
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
      vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
      num_attention_heads=heads, num_key_value_heads=kv_heads, rope_theta=theta,
      tie_word_embeddings=tied, initializer_range=0.2, rms_norm_eps=1e-5)
  reference = transformers.LlamaForCausalLM(hf_config).eval()
  with torch.no_grad():  # norms away from 1, so that a missing or swapped norm shows
    for name, p in reference.named_parameters():
      if "norm" in name:
        p.add_(0.3 * torch.randn_like(p))
  reference.save_pretrained(str(tmp_path / "hf"))
  config, model, params = load_llama(str(tmp_path / "hf"))
  assert config.rope_theta == theta and config.tie_word_embeddings == tied
  tokens = np.random.default_rng(0).integers(0, 97, (2, 13))
  expected = torch_logits(reference, tokens)
  assert np.abs(expected).max() > 1  # a meaningful scale for the tolerance
  np.testing.assert_allclose(jax.jit(model.apply)(params, jnp.asarray(tokens)), expected, atol=1e-4)

  save_llama(str(tmp_path / "ours"), params, config)  # merged export loads in transformers
  exported = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
  np.testing.assert_allclose(torch_logits(exported, tokens), expected, atol=1e-5)


@pytest.fixture(scope="module")
def smollm2(smollm2):
  """conftest's SmolLM2 plus its transformers twin."""
  config, model, params, tok = smollm2
  return config, model, params, tok, torch_llama(config, params)


def test_smollm2_logits_match_torch(smollm2):
  config, model, params, tok, reference = smollm2
  tokens = np.asarray([tok.chat("Give me three tips for staying healthy.")])
  expected = torch_logits(reference, tokens)
  got = np.asarray(jax.jit(model.apply)(params, jnp.asarray(tokens)))
  np.testing.assert_allclose(got, expected, atol=1e-3)
  assert got[0, -1].argmax() == expected[0, -1].argmax()


def test_smollm2_greedy_generation_matches_torch(smollm2):
  _, model, params, tok, reference = smollm2
  prompts = [tok.chat("Write a haiku about the sea."), tok.chat("Name a fruit.")]
  ours = generate(model, params, prompts, max_new_tokens=10, stop_tokens=[tok.eos_id])
  for prompt, got in zip(prompts, ours):
    with torch.no_grad():
      out = reference.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                               eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    assert got == out[0, len(prompt):].tolist()


def test_smollm2_weights_and_tokenizer_match_transformers_gguf_loader(smollm2):
  """transformers dequantizes and un-permutes the same GGUF file by its own code."""
  _, _, params, tok, _ = smollm2
  path = G.smollm2_path()
  directory, name = path.rsplit("/", 1)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)
  theirs = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  ours = tensors_from_params(params, LLAMA_PATH_MAP)
  assert set(ours) <= set(theirs)
  for k, v in ours.items():
    np.testing.assert_allclose(v, theirs[k], atol=1e-6, err_msg=k)
  hf_tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
  from test_gguf import TEXTS
  for text in TEXTS:
    assert tok.encode(text) == hf_tok(text, add_special_tokens=False).input_ids, text
