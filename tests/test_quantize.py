"""Quantized frozen bases: bit-exactness against bitsandbytes and gguf, QArray, errors, QLoRA.

References: bitsandbytes' CPU ``quantize_4bit`` / ``dequantize_4bit`` (NF4), gguf's
``quants.quantize`` / ``quants.dequantize`` (Q4_0, Q4_1, Q8_0, and the SmolLM2 file's own Q4_1
tensors), the blockwise formulas written out here (int4, int8), and for QLoRA the model run on
``merge(dequantize(qparams), lora)``.
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_jax as lj
from lorax_jax import qarray as Q
from lorax_jax.models.llama import Llama, LlamaConfig

import zoo

torch = pytest.importorskip("torch")


def bnb():
  return pytest.importorskip("bitsandbytes.functional")


def smollm2_reader():
  from lorax_jax.models import gguf as G
  if importlib.util.find_spec(G.SMOLLM2_PACKAGE) is None:
    pytest.skip(f"needs the SmolLM2 package: {G.SMOLLM2_INSTALL}")
  gguf = pytest.importorskip("gguf")
  return gguf, gguf.GGUFReader(G.smollm2_path())


def _kernel_q(w_torch: np.ndarray, fmt: str, **kw) -> Q.QArray:
  """The QArray of the Flax kernel ``[in, out]`` of a torch ``[out, in]`` weight."""
  return Q.quantize({"w": jnp.asarray(w_torch.T)}, fmt, **kw)["w"]


def _assert_nf4_matches_bnb(w: np.ndarray) -> float:
  """Codes, absmax bit-identical to bitsandbytes; returns max |dequantize - dequantize_4bit|."""
  F = bnb()
  packed, state = F.quantize_4bit(torch.from_numpy(w), quant_type="nf4", blocksize=64)
  q = _kernel_q(w, "nf4")
  np.testing.assert_array_equal(np.asarray(q.data).reshape(-1), packed.numpy().reshape(-1))
  np.testing.assert_array_equal(np.asarray(q.scale).reshape(-1).view(np.uint32),
                                state.absmax.numpy().view(np.uint32))
  want = F.dequantize_4bit(packed, state).numpy()
  return float(np.abs(np.asarray(jax.jit(Q.QArray.dequantize)(q)).T - want).max())


# --- NF4 against bitsandbytes -----------------------------------------------------------


@pytest.mark.parametrize("shape, scale", [((64, 64), 1.0), ((192, 576), 0.02), ((96, 1536), 30.0)])
def test_nf4_bit_identical_to_bitsandbytes_random(shape, scale):
  w = (np.random.default_rng(sum(shape)).standard_t(4, size=shape) * scale).astype(np.float32)
  w[0, :64] = 0.0  # an all-zero block
  assert _assert_nf4_matches_bnb(w) <= 1e-6


def test_nf4_bit_identical_to_bitsandbytes_smollm2():
  gguf, reader = smollm2_reader()
  names = {"blk.0.attn_q.weight", "blk.7.ffn_down.weight", "blk.29.ffn_up.weight"}
  tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors if t.name in names}
  assert len(tensors) == 3
  worst = max(_assert_nf4_matches_bnb(np.asarray(w, np.float32)) for w in tensors.values())
  assert worst <= 1e-6


def test_nf4_stacked_kernel_blocks_follow_each_layer():
  """``[layers, in, out]``: each layer's blocks are bitsandbytes' blocks of its ``[out, in]``."""
  w = np.random.default_rng(1).normal(size=(3, 128, 64)).astype(np.float32)
  q = Q.quantize({"w": jnp.asarray(w)}, "nf4")["w"]
  assert q.data.shape == (3, 64, 64) and q.scale.shape == (3, 64, 2)
  F = bnb()
  for layer in range(3):
    packed, state = F.quantize_4bit(torch.from_numpy(w[layer].T.copy()), quant_type="nf4", blocksize=64)
    np.testing.assert_array_equal(np.asarray(q.data[layer]).reshape(-1), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(q.scale[layer]).reshape(-1), state.absmax.numpy())
  np.testing.assert_allclose(np.asarray(q.dequantize()), w, atol=np.abs(w).max() * 0.15)


def test_dynamic_map_is_bitsandbytes():
  np.testing.assert_array_equal(Q.dynamic_map().view(np.uint32),
                                bnb().create_dynamic_map().numpy().view(np.uint32))


def test_nf4_double_quant():
  """Dequantizing bitsandbytes' own nested state gives its values; ours picks the nearest code."""
  F = bnb()
  w = np.random.default_rng(2).normal(size=(384, 1024)).astype(np.float32)  # 6144 absmax: 24 blocks of 256
  packed, state = F.quantize_4bit(torch.from_numpy(w), quant_type="nf4", blocksize=64, compress_statistics=True)
  want = F.dequantize_4bit(packed, state).numpy()
  theirs = Q.QArray(jnp.asarray(packed.numpy().reshape(384, 512)), jnp.asarray(state.absmax.numpy().reshape(384, 16)),
                    None, jnp.asarray(state.state2.absmax.numpy()), jnp.asarray(state.offset.numpy()),
                    fmt="nf4", shape=(1024, 384), dtype=jnp.float32, block_size=64, axis=0)
  # A weight is q·A (|q| ≤ 1), A = code₂·absmax₂ + offset (|A - offset| ≤ A): two roundings for A and
  # one for q·A on each side, in another order: within 4ε·A of each other, A the block's largest |w|.
  block_tol = 4 * np.finfo(np.float32).eps * np.repeat(np.abs(want).reshape(384, 16, 64).max(-1), 64, axis=1)
  assert np.all(np.abs(np.asarray(theirs.dequantize()).T - want) <= block_tol)

  ours = _kernel_q(w, "nf4", double_quant=True)
  np.testing.assert_array_equal(np.asarray(ours.data).reshape(-1), packed.numpy().reshape(-1))
  # The mean of the absmax is summed in another order than torch's: equal to 1e-6.
  np.testing.assert_allclose(float(ours.scale_offset), float(state.offset), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(ours.scale_absmax), state.state2.absmax.numpy(), rtol=1e-6)
  # Our codes are the nearest entries of the dynamic map (bitsandbytes' CPU search is off by
  # one in a few of them: not a fraction to tune, its code is our code's neighbour in the sorted
  # map); where they agree the dequantized weights agree.
  absmax = np.asarray(_kernel_q(w, "nf4").scale).reshape(-1)
  centred = (absmax - np.float32(ours.scale_offset)).reshape(-1, 256) / np.asarray(ours.scale_absmax)[:, None]
  nearest = np.abs(centred.reshape(-1)[:, None] - Q.dynamic_map()[None]).argmin(-1)
  np.testing.assert_array_equal(np.asarray(ours.scale).reshape(-1), nearest)
  order = np.argsort(np.argsort(Q.dynamic_map()))  # each code's rank in the sorted map
  codes, their_codes = np.asarray(ours.scale).reshape(-1), state.absmax.numpy().astype(np.int64)
  assert np.all(np.abs(order[codes] - order[their_codes]) <= 1)
  agree = codes == their_codes
  rows = np.repeat(agree.reshape(384, 16), 64, axis=1)
  assert np.all(np.abs(np.asarray(ours.dequantize()).T - want)[rows] <= block_tol[rows])
  assert ours.nbytes < _kernel_q(w, "nf4").nbytes


# --- GGUF blocks against gguf -----------------------------------------------------------


def test_gguf_q4_1_bit_identical_smollm2():
  gguf, reader = smollm2_reader()
  deq = jax.jit(Q.QArray.dequantize)
  checked = 0
  for t in reader.tensors:
    if t.tensor_type.name != "Q4_1":
      continue
    q = Q.from_gguf(t.data, "Q4_1")
    assert q.shape == tuple(int(n) for n in t.shape) and q.nbytes == t.data.nbytes
    want = gguf.quants.dequantize(t.data, t.tensor_type)
    np.testing.assert_array_equal(np.asarray(deq(q)).T.view(np.uint32), want.view(np.uint32))
    checked += 1
  assert checked == 210


@pytest.mark.parametrize("fmt", Q.GGUF_FORMATS)
def test_gguf_synthetic_blocks_bit_identical(fmt):
  gguf = pytest.importorskip("gguf")
  kind = getattr(gguf.GGMLQuantizationType, fmt)
  w = np.random.default_rng(3).normal(size=(48, 256)).astype(np.float32)
  w[1] = 0.0
  raw = gguf.quants.quantize(w, kind)
  q = Q.from_gguf(raw, fmt)
  assert (q.shape, q.fmt, q.block_size) == ((256, 48), fmt, 32)
  got = np.asarray(jax.jit(Q.QArray.dequantize)(q)).T
  np.testing.assert_array_equal(got.view(np.uint32), gguf.quants.dequantize(raw, kind).view(np.uint32))


# --- int8 / int4 against the formulas -----------------------------------------------------


@pytest.mark.parametrize("fmt, levels", [("int8", 127), ("int4", 7)])
@pytest.mark.parametrize("block_size", [32, None])
def test_int_formats_follow_the_formula(fmt, levels, block_size):
  w = np.random.default_rng(4).normal(size=(128, 24)).astype(np.float32)  # Flax [in, out]
  q = Q.quantize({"w": jnp.asarray(w)}, fmt, block_size=block_size)["w"]
  bs = block_size or 128
  blocks = w.T.reshape(24, 128 // bs, bs)
  scale = np.abs(blocks).max(-1) / np.float32(levels)
  np.testing.assert_array_equal(np.asarray(q.scale), scale)
  want = (np.clip(np.rint(blocks / scale[..., None]), -levels, levels) * scale[..., None]).reshape(24, 128).T
  np.testing.assert_allclose(np.asarray(q.dequantize()), want, rtol=1e-6, atol=0)
  assert np.abs(np.asarray(q.dequantize()) - w).max() <= scale.max() / 2 * (1 + 1e-6)
  per_value = 1 if fmt == "int8" else 0.5
  assert q.nbytes == int(w.size * per_value) + scale.size * 4


# --- the QArray node and tree functions ---------------------------------------------------


def test_qarray_is_a_pytree_node_with_a_logical_shape():
  case = next(c for c in zoo.cases() if c.name == "embed_lm")
  qp = Q.quantize(case.params, "int8", block_size=None, targets=["hidden", "lm_head"])
  q = qp["params"]["hidden"]["kernel"]
  assert Q.is_quantized(q) and (q.shape, q.ndim, q.dtype) == ((16, 16), 2, jnp.float32)
  assert not Q.is_quantized(qp["params"]["embed"]["embedding"])
  flat, tree = jax.tree_util.tree_flatten(qp)
  assert all(isinstance(x, jax.Array) for x in flat)  # children only: jit, device_put, tree.map
  assert any("hidden/kernel/data" in jax.tree_util.keystr(p, simple=True, separator="/")
             for p, _ in jax.tree_util.tree_flatten_with_path(qp)[0])
  again = jax.jit(lambda t: t)(qp)
  assert jax.tree_util.tree_structure(again) == tree
  abstract = Q.abstract(qp)
  assert abstract["params"]["hidden"]["kernel"] == jax.ShapeDtypeStruct((16, 16), jnp.float32)
  assert abstract["params"]["embed"]["embedding"] is qp["params"]["embed"]["embedding"]
  deq = Q.dequantize(qp)
  np.testing.assert_allclose(deq["params"]["hidden"]["kernel"], case.params["params"]["hidden"]["kernel"],
                             atol=2e-2)


def test_default_selection_skips_embeddings_norms_and_integers():
  case = next(c for c in zoo.cases() if c.name == "mha_transformer")
  params = {**case.params, "steps": jnp.ones((4, 4), jnp.int32)}
  qp = Q.quantize(params, "int8", block_size=None)
  quantized = {jax.tree_util.keystr(p, simple=True, separator="/").removesuffix("/data")
               for p, x in jax.tree_util.tree_flatten_with_path(qp)[0] if getattr(p[-1], "name", None) == "data"}
  want = {"/".join(path) for path, x in lj.qarray.leaves_with_paths(case.params)
          if x.ndim >= 2 and "embed" not in "/".join(path)}
  assert quantized == want and any("attn/query" in name for name in want)
  assert not Q.is_quantized(qp["params"]["embed"]["embedding"])
  assert qp["steps"] is params["steps"]


def test_bf16_kernel_dequantizes_to_bf16():
  w = jnp.asarray(np.random.default_rng(5).normal(size=(64, 8)), jnp.bfloat16)
  q = Q.quantize({"w": w}, "nf4")["w"]
  assert q.dtype == jnp.bfloat16 and q.dequantize().dtype == jnp.bfloat16


# --- bad input ------------------------------------------------------------------------------


def test_errors_name_the_bad_input():
  params = {"dense": {"kernel": jnp.ones((96, 8))}, "ids": jnp.ones((4, 4), jnp.int32)}
  with pytest.raises(ValueError, match="unknown format 'nf3'"):
    Q.quantize(params, "nf3")
  with pytest.raises(ValueError, match="Q4_1 blocks come from a GGUF file"):
    Q.quantize(params, "Q4_1")
  with pytest.raises(ValueError, match=r"block_size 64 does not divide axis 0 \(size 96\) of dense/kernel"):
    Q.quantize(params, "nf4")
  with pytest.raises(ValueError, match="block_size 3 .* into even blocks"):
    Q.quantize(params, "int4", block_size=3)
  with pytest.raises(ValueError, match=r"ids must be a float array of rank >= 2 .*int32"):
    Q.quantize(params, "int8", targets=["ids"])
  with pytest.raises(ValueError, match="double_quant is for nf4"):
    Q.quantize(params, "int8", double_quant=True)
  with pytest.raises(ValueError, match="select no leaf"):
    Q.quantize(params, "int8", targets=["nothing"])
  with pytest.raises(ValueError, match="GGUF tensor type Q6_K is not supported"):
    Q.from_gguf(np.zeros((4, 210), np.uint8), "Q6_K")
  with pytest.raises(ValueError, match=r"Q8_0 blocks must be uint8 \[rows, k · 34\]"):
    Q.from_gguf(np.zeros((4, 30), np.uint8), "Q8_0")


# --- QLoRA through the engine ----------------------------------------------------------


QLORA_CASES = [c for c in zoo.cases() if c.name in ("mlp", "cnn", "mha_transformer", "einsum_attention", "nnx",
                                                  "scan_remat_transformer", "fused_qkv_attention", "moe_ragged_dot")]


def _qlora_reference(case, qparams):
  params = Q.dequantize(qparams)
  return lambda lora: jnp.mean(jnp.sin(case.apply_fn(lj.merge(params, lora, case.cfg), *case.inputs)))


def tiny_llama():
  config = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64)
  model = Llama(config)
  ids = jax.random.randint(jax.random.key(0), (2, 16), 0, 128)
  return model, model.init(jax.random.key(1), ids), ids


def _step_memory(loss, lora, qparams, ids):
  stats = jax.jit(jax.grad(loss)).lower(lora, qparams, ids).compile().memory_analysis()
  return stats.temp_size_in_bytes


# --- the engine taking QArrays (QLoRA, lorax_jax/transform/quantized.py) -----------------


@pytest.mark.parametrize("case", QLORA_CASES, ids=[c.name for c in QLORA_CASES])
def test_engine_qlora_equals_merged_dequantized(case):
  qparams = Q.quantize(case.params, "int8", block_size=None)
  lora = zoo.random_lora(case)
  assert jax.tree.structure(lj.init_lora(qparams, case.cfg, jax.random.key(0))) == jax.tree.structure(lora)
  apply = lj.lora_transform(case.apply_fn, qparams, case.cfg, strict=True)
  loss = lambda lo: jnp.mean(jnp.sin(apply(qparams, lo, *case.inputs)))
  reference = _qlora_reference(case, qparams)
  zoo.close(loss(lora), reference(lora))
  zoo.close(jax.grad(loss)(lora), jax.grad(reference)(lora))


def test_engine_step_keeps_no_float_copy_of_the_kernels():
  """The compiled QLoRA step holds the float step's temporaries plus a few kernels in float, not
  all of them: dropping the dequantization's ordering (`transform.quantized._after`) fails this."""
  model, params, ids = tiny_llama()
  qparams = Q.quantize(params, "nf4")
  float_bytes = sum(x.size * 4 for x in jax.tree.leaves(qparams, is_leaf=Q.is_quantized) if Q.is_quantized(x))
  cfg = lj.LoraConfig(r=8, alpha=16, targets="all-linear")
  lora = lj.init_lora(qparams, cfg, jax.random.key(2))
  apply = lj.lora_transform(model.apply, qparams, cfg, strict=True)
  temp = _step_memory(lambda lo, qp, x: jnp.mean(apply(qp, lo, x) ** 2), lora, qparams, ids)
  float_step = _step_memory(lambda lo, p, x: jnp.mean(lj.lora_transform(model.apply, p, cfg)(p, lo, x) ** 2),
                            lora, params, ids)
  assert temp < float_step + float_bytes / 2


def gguf_llama(config: LlamaConfig, seed: int = 0):
  """A Llama with the GGUF file's formats, made by gguf's own quantizer: Q4_1 projection kernels,
  a Q8_0 embedding in its stored ``[vocab, features]`` rows (blocks along the features)."""
  gguf = pytest.importorskip("gguf")
  model = Llama(config)
  ids = jax.random.randint(jax.random.key(seed), (2, 16), 0, config.vocab_size)
  params = model.init(jax.random.key(seed + 1), ids)

  def blocks(kp, w):
    name = jax.tree_util.keystr(kp)
    if "embedding" in name:
      return Q.from_gguf(gguf.quants.quantize(np.asarray(w), gguf.GGMLQuantizationType.Q8_0), "Q8_0",
                         embedding=True)
    if w.ndim == 2:
      return Q.from_gguf(gguf.quants.quantize(np.asarray(w).T, gguf.GGMLQuantizationType.Q4_1), "Q4_1")
    return w
  return model, jax.tree_util.tree_map_with_path(blocks, params), ids


@pytest.mark.parametrize("chunk_bytes", [None, 4096])
def test_engine_quantized_embedding_lookup_and_tied_head(chunk_bytes, monkeypatch):
  """A Q8_0 embedding: its lookup gathers the rows' blocks (targeted too: LoRA on the lookup and
  the tied head ``h @ Eᵀ`` dequantized at its use), equal to the merged dequantized model. With
  ``chunk_bytes`` (a table over ``transform.quantized._CHUNK_BYTES`` in float) the head runs as a map over
  chunks of the table's rows (`transform.quantized._chunked_dot`): the same outputs and gradients."""
  if chunk_bytes is not None:
    monkeypatch.setattr(lj.transform.quantized, "_CHUNK_BYTES", chunk_bytes)
  config = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True)
  model, qparams, ids = gguf_llama(config)
  assert qparams["params"]["model"]["embed_tokens"]["embedding"].axis == 1
  cfg = lj.LoraConfig(r=4, alpha=8, targets=["embed_tokens", "q_proj", "down_proj"],
                      target_uses={"embed_tokens": ("lookup",)})
  lora = zoo.random_factors(qparams, cfg, seed=3)
  apply = lj.lora_transform(model.apply, qparams, cfg, strict=True)
  loss = lambda lo: jnp.mean(jnp.sin(apply(qparams, lo, ids)))
  params = Q.dequantize(qparams)
  ref_apply = lj.lora_transform(model.apply, params, cfg, strict=True)  # the engine on floats: checked elsewhere
  reference = lambda lo: jnp.mean(jnp.sin(ref_apply(params, lo, ids)))
  zoo.close(jax.jit(loss)(lora), reference(lora))
  zoo.close(jax.jit(jax.grad(loss))(lora), jax.grad(reference)(lora))
  assert ("scan" in str(jax.make_jaxpr(loss)(lora))) == (chunk_bytes is not None)
  base = lj.lora_transform(model.apply, qparams, cfg)(qparams, lj.init_lora(qparams, cfg, jax.random.key(0)), ids)
  zoo.close(base, model.apply(params, ids))


def test_merge_and_adapters_on_a_quantized_base(tmp_path):
  """`merge` gives ``deq(Q) + s·A⊗B`` in float (or re-quantized in the same format); `save_adapter`
  writes the same files from the quantized base as from its float one."""
  from lorax_jax.models.llama import LLAMA_PATH_MAP
  model, params, ids = tiny_llama()
  qparams = Q.quantize(params, "nf4")
  cfg = lj.LoraConfig(r=4, alpha=8, targets=["q_proj", "up_proj"])
  lora = zoo.random_factors(qparams, cfg, seed=3)
  deq = Q.dequantize(qparams)
  merged = lj.merge(qparams, lora, cfg)
  assert not any(Q.is_quantized(x) for x in jax.tree.leaves(merged, is_leaf=Q.is_quantized))
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(lj.merge(deq, lora, cfg))):
    np.testing.assert_array_equal(a, b)
  again = lj.merge(qparams, lora, cfg, requantize=True)
  path = ("params", "model", "layers_0", "self_attn", "q_proj", "kernel")
  q = lj.paths.get_path(again, path)
  assert Q.is_quantized(q) and (q.fmt, q.block_size, q.axis) == ("nf4", 64, 0)
  want = Q.quantize({"w": lj.paths.get_path(merged, path)}, "nf4")["w"]
  np.testing.assert_array_equal(q.data, want.data)
  assert lj.paths.get_path(again, path[:-2] + ("k_proj", "kernel")) is lj.paths.get_path(qparams, path[:-2] + ("k_proj", "kernel"))
  lj.save_adapter(str(tmp_path / "q"), lora, cfg, qparams, LLAMA_PATH_MAP)
  lj.save_adapter(str(tmp_path / "f"), lora, cfg, deq, LLAMA_PATH_MAP)
  for name in ("adapter_model.safetensors", "adapter_config.json"):
    assert (tmp_path / "q" / name).read_bytes() == (tmp_path / "f" / name).read_bytes()
  loaded, _ = lj.load_adapter(str(tmp_path / "q"), qparams, LLAMA_PATH_MAP)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(lora)):
    np.testing.assert_array_equal(a, b)


def test_requantize_gguf_is_llama_cpp_quantizer():
  gguf = pytest.importorskip("gguf")
  w = np.random.default_rng(6).normal(size=(64, 24)).astype(np.float32)  # Flax [in, out]
  like = Q.from_gguf(gguf.quants.quantize(w.T.copy(), gguf.GGMLQuantizationType.Q4_1), "Q4_1")
  q = Q.requantize(jnp.asarray(w) * 2, like)
  raw = gguf.quants.quantize(np.ascontiguousarray((w * 2).T), gguf.GGMLQuantizationType.Q4_1)
  np.testing.assert_array_equal(np.asarray(q.dequantize()).T, gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1))
  with pytest.raises(ValueError, match=r"requantize: array of shape \(24, 64\) for a QArray of shape \(64, 24\)"):
    Q.requantize(jnp.asarray(w.T), like)


def smollm2_shaped(layers: int = 2, vocab: int = 3072):
  """SmolLM2-135M's layers (576 wide, MLP 1536, 9 heads / 3 KV heads of 64, tied embedding) in the
  file's formats, with fewer layers and a vocabulary that keeps the embedding's share of the
  parameters near the full model's (21%), so the memory ratios are the full model's within a few %."""
  config = LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
  return gguf_llama(config)


def test_main_job_step_memory_on_a_gguf_base():
  """The main job's train step as QLoRA runs it (finetune defaults: the shared prompt once, the LM
  head at the trained positions, the layers scanned over their stacked params; ``remat``), the
  Q4_1/Q8_0 base kept quantized, against the float32 base dequantized from the same blocks with the
  same options (XLA's ``memory_analysis``), on SmolLM2's shape reduced to 4 layers at batch 2, where
  the float step's temporaries are 0.27x its arguments (full size: 0.19x, so the argument share, and
  with it the saving, is larger there): argument bytes <= 0.25x (measured 0.187x), temporaries at
  most the float step's plus a quarter of the kernels in float (measured 17.6 MB against 17.5 MB; no
  float copy of the kernels, the tied head's table in chunks, `transform.quantized._chunked_dot`), argument +
  temporaries <= 0.45x (measured 0.361x; full size 0.327x, BENCHMARKS.md from ``python -m bench.qlora``).
  At 2 layers the temporaries are 0.46x the arguments, harder than full size: 0.453x."""
  from bench.main import chat_batch
  from bench.qlora import compiled_memory, main_job_step
  from lorax_jax.apps import finetune
  from lorax_jax.models.causal_lm import max_targets_per_batch
  model, qparams, _ = smollm2_shaped(layers=4)
  params = Q.dequantize(qparams)
  s, _ = finetune.parse_args(["--batch_size", "2"])
  vocab = model.config.vocab_size
  tokens, weights, prefix_len = chat_batch(vocab, s.batch_size, s.seq_len)
  batch = (jnp.asarray(tokens % vocab), jnp.asarray(weights), prefix_len, max_targets_per_batch(weights, s.batch_size))
  f, q = (compiled_memory(*main_job_step(model, p, s, batch, remat=True)) for p in (params, qparams))
  kernels = sum(x.size * 4 for x in jax.tree.leaves(qparams, is_leaf=Q.is_quantized) if Q.is_quantized(x))
  assert f["temp"] >= 0.19 * f["argument"], (f["temp"], f["argument"])  # no easier than full size
  assert q["argument"] <= 0.25 * f["argument"], (q["argument"], f["argument"])
  assert q["temp"] <= f["temp"] + kernels / 4, (q["temp"], f["temp"], kernels)
  assert q["argument"] + q["temp"] <= 0.45 * (f["argument"] + f["temp"]), (q, f)
