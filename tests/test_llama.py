"""The Flax Llama without torch: config parsing, the KV cache, checkpoints on disk.

Comparisons with transformers' torch Llama are in test_llama_torch.py.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorax_jax.models.hf import read_config, tensors_from_params
from lorax_jax.models.llama import LLAMA_PATH_MAP, Llama, LlamaConfig, hf_shapes, load_llama, rope, save_llama

HF_CONFIG = {"model_type": "llama", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "rms_norm_eps": 1e-5, "rope_theta": 500.0, "tie_word_embeddings": False,
             "max_position_embeddings": 64}


def tiny(tied: bool = False) -> tuple[Llama, dict]:
  config = LlamaConfig.from_hf({**HF_CONFIG, "tie_word_embeddings": tied})
  model = Llama(config)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  # Non-trivial norm weights so that a swapped or missing norm shows up.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 * jax.random.normal(jax.random.key(len(p)), x.shape)
      if p[-1].key == "weight" else x, params)
  return model, params


def test_config_from_hf_reads_v4_and_v5_rope_keys():
  c4 = LlamaConfig.from_hf(HF_CONFIG)
  c5 = LlamaConfig.from_hf({**{k: v for k, v in HF_CONFIG.items() if k != "rope_theta"},
                            "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}})
  assert c4 == c5
  assert c4.head_dim == 8 and c4.rope_theta == 500.0 and c4.num_key_value_heads == 2
  assert LlamaConfig.from_hf({**HF_CONFIG, "num_key_value_heads": None}).num_key_value_heads == 4


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3' lacks low_freq_factor"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "yarn"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "qwen2", "attention_bias": True}, "'qwen2' model has attention_bias=True"),
    ({"model_type": "gemma"}, "gemma"),
    ({"quantization_config": {"quant_method": "bnb"}}, "quantization_config"),
    ({"num_key_value_heads": 3}, "multiple"),
])
def test_config_rejects_what_it_does_not_implement(change, message):
  with pytest.raises(ValueError, match=message):
    LlamaConfig.from_hf({**HF_CONFIG, **change})


def test_config_names_missing_keys():
  with pytest.raises(ValueError, match="hidden_size"):
    LlamaConfig.from_hf({k: v for k, v in HF_CONFIG.items() if k != "hidden_size"})


def test_rope_matches_complex_rotation():
  """HF's rotate_half RoPE rotates the pair (x_k, x_{k+D/2}) by angle p·theta^(-2k/D)."""
  x = jax.random.normal(jax.random.key(1), (2, 5, 3, 8))
  pos = jnp.asarray([[0, 1, 2, 3, 4], [7, 3, 0, 9, 11]])
  d, theta = 8, 50.0
  z = x[..., :d // 2] + 1j * x[..., d // 2:]
  angle = pos[..., None, None] * theta ** (-np.arange(0, d, 2) / d)
  rz = z * np.exp(1j * angle)
  expected = np.concatenate([rz.real, rz.imag], axis=-1)
  np.testing.assert_allclose(rope(x, pos, theta), expected, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_params_paths_mirror_hf_names(tied):
  model, params = tiny(tied)
  tensors = tensors_from_params(params, LLAMA_PATH_MAP)
  assert {k: v.shape for k, v in tensors.items()} == hf_shapes(model.config)
  names = set(tensors)
  assert "model.layers.1.self_attn.k_proj.weight" in names
  assert "model.layers.0.mlp.down_proj.weight" in names
  assert ("lm_head.weight" in names) == (not tied)
  assert len(names) == 2 + 9 * 2 + (not tied)


def test_cached_chunks_equal_full_sequence():
  """Feeding a sequence in chunks through the cache gives the full-sequence logits."""
  model, params = tiny()
  tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, 61)
  apply = jax.jit(model.apply)
  full = apply(params, tokens)
  cache = model.init_cache(2, 16)
  parts = []
  for lo, hi in ((0, 4), (4, 5), (5, 9)):
    logits, cache = apply(params, tokens[:, lo:hi], cache=cache)
    parts.append(logits)
  np.testing.assert_allclose(jnp.concatenate(parts, axis=1), full, atol=1e-5)
  assert int(cache["index"]) == 9 and bool(cache["mask"][:, :9].all()) and not cache["mask"][:, 9:].any()


def test_left_padding_is_masked():
  """A left-padded row with padding masked out and positions counting real tokens equals the unpadded row."""
  model, params = tiny()
  tokens = jax.random.randint(jax.random.key(3), (1, 5), 0, 61)
  padded = jnp.concatenate([jnp.full((1, 3), 7), tokens], axis=1)
  mask = jnp.asarray([[False] * 3 + [True] * 5])
  positions = jnp.asarray([[0, 0, 0, 0, 1, 2, 3, 4]])
  apply = jax.jit(model.apply)
  logits, _ = apply(params, padded, positions, mask, cache=model.init_cache(1, 8))
  np.testing.assert_allclose(logits[:, 3:], apply(params, tokens), atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_save_then_load_roundtrip(tmp_path, tied):
  model, params = tiny(tied)
  save_llama(str(tmp_path), params, model.config)
  config, model2, params2 = load_llama(str(tmp_path))
  assert config == model.config
  assert jax.tree.structure(params2) == jax.tree.structure(params)
  tokens = jnp.arange(6)[None] % 61
  np.testing.assert_array_equal(jax.jit(model2.apply)(params2, tokens), jax.jit(model.apply)(params, tokens))


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_llama(str(tmp_path))
  model, params = tiny()
  save_llama(str(tmp_path), params, model.config)
  config = read_config(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
  with pytest.raises(ValueError, match="model.layers.2"):
    load_llama(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
  with pytest.raises(ValueError, match="shape"):
    load_llama(str(tmp_path))
