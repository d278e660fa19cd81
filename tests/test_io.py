"""Adapters on disk without torch: PEFT-layout round trips, strict loading, atomic saves, Kohya files."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lorax_jax
from lorax_jax import LoraConfig, PathMap, find_targets, init_lora, merge
from lorax_jax.io import load_adapter, load_kohya, save_adapter

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    q = nn.Dense(8, name="q_proj")(x)
    v = nn.Dense(8, name="v_proj")(x)
    return x + nn.Dense(8, name="o_proj")(q * v)


class Net(nn.Module):
  """Embedding, two blocks of linears and a 3×3 conv: every layout an adapter file has."""

  @nn.compact
  def __call__(self, tokens, image):
    x = nn.Embed(16, 8, name="embed_tokens")(tokens)
    for i in range(2):
      x = Block(name=f"layers_{i}")(x)
    y = nn.Conv(4, (3, 3), name="conv_in")(image)
    return x, y


def _proj_rules():
  # PathMap fields are digits; spell the projections out instead.
  return tuple((f"params/layers_{{i}}/{p}/{leaf}", f"model.layers.{{i}}.{p}.{hf}", kind)
               for p in ("q_proj", "v_proj", "o_proj")
               for leaf, hf, kind in (("kernel", "weight", "linear"), ("bias", "bias", "param")))


NET_MAP = PathMap((
    ("params/embed_tokens/embedding", "model.embed_tokens.weight", "embedding"),
    *_proj_rules(),
    ("params/conv_in/kernel", "conv_in.weight", "conv"),
    ("params/conv_in/bias", "conv_in.bias", "param"),
))


@pytest.fixture(scope="module")
def params():
  tokens = jnp.zeros((1, 3), jnp.int32)
  image = jnp.zeros((1, 6, 6, 3))
  return Net().init(jax.random.key(0), tokens, image)


def make_cfg(**kw) -> LoraConfig:
  kw.setdefault("targets", ["q_proj", "v_proj", "o_proj", "conv_in", "embed_tokens"])
  return LoraConfig(r=2, alpha=4.0, rank_pattern={"conv_in": 3, "layers_1/v_proj": 1},
                    alpha_pattern={"o_proj": 7.0}, **kw)


def random_lora(params, cfg, seed=1):
  """init_lora's tree with every factor random (b non-zero too)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape).astype(x.dtype)),
                      init_lora(params, cfg, jax.random.key(seed)))


def assert_same_targets(params, cfg_a, cfg_b):
  ta, tb = find_targets(params, cfg_a), find_targets(params, cfg_b)
  assert list(ta) == list(tb)
  for p in ta:
    assert (ta[p].rank, ta[p].alpha, ta[p].scale, ta[p].shape) == (tb[p].rank, tb[p].alpha, tb[p].scale, tb[p].shape)


def assert_tree_equal(x, y):
  """Same structure, shapes and dtypes, and bitwise-equal values (compared as float32, bf16 included)."""
  chex.assert_trees_all_equal_shapes_and_dtypes(x, y)  # checks the structures first
  as_f32 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float32), t)
  chex.assert_trees_all_equal(as_f32(x), as_f32(y))


# ---- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("path_map", [None, NET_MAP], ids=["flax-names", "path-map"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_round_trip_exact(tmp_path, params, path_map, use_rslora):
  cfg = make_cfg(use_rslora=use_rslora, dropout=0.1)
  lora = random_lora(params, cfg)
  save_adapter(str(tmp_path), lora, cfg, params, path_map)
  loaded, cfg2 = load_adapter(str(tmp_path), params, path_map)
  assert_tree_equal(loaded, lora)
  assert_same_targets(params, cfg, cfg2)
  assert (cfg2.use_rslora, cfg2.dropout) == (use_rslora, 0.1)
  assert_tree_equal(merge(params, loaded, cfg2), merge(params, lora, cfg))
  assert sorted(os.listdir(tmp_path)) == [CONFIG, WEIGHTS]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtypes(tmp_path, params, dtype):
  cfg = make_cfg(param_dtype=dtype)
  lora = random_lora(params, cfg)
  save_adapter(str(tmp_path), lora, cfg, params)
  stored = load_file(str(tmp_path / WEIGHTS))
  assert {x.dtype for x in stored.values()} == {np.dtype(dtype)}
  same, cfg_same = load_adapter(str(tmp_path), params, param_dtype=dtype)
  assert_tree_equal(same, lora)
  assert cfg_same.param_dtype == dtype
  up, cfg_up = load_adapter(str(tmp_path), params)  # default float32: an exact upcast
  assert cfg_up.param_dtype == jnp.float32
  assert_tree_equal(up, jax.tree.map(lambda x: x.astype(jnp.float32), lora))


def test_file_layout_is_pytorch(tmp_path, params):
  """The file's tensors, read as PEFT does (ΔW_torch = s · B @ A), are the torch image of our delta."""
  cfg = make_cfg()
  lora = random_lora(params, cfg)
  save_adapter(str(tmp_path), lora, cfg, params, NET_MAP, base_model_name_or_path="tiny", task_type="CAUSAL_LM")
  config = json.loads((tmp_path / CONFIG).read_text())
  assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
  assert config["base_model_name_or_path"] == "tiny"
  assert (config["r"], config["lora_alpha"]) == (2, 4)
  assert config["target_modules"] == sorted(
      ["model.embed_tokens", "conv_in"] + [f"model.layers.{i}.{p}" for i in range(2) for p in ("q_proj", "v_proj", "o_proj")])
  tensors = load_file(str(tmp_path / WEIGHTS))
  deltas = lorax_jax.delta(params, lora, cfg)
  t = find_targets(params, cfg)
  for path, d in deltas.items():
    name = NET_MAP.to_hf("/".join(path))[0].removesuffix(".weight")
    s = t[path].scale
    if path[-1] == "embedding":
      A, B = tensors[f"base_model.model.{name}.lora_embedding_A"], tensors[f"base_model.model.{name}.lora_embedding_B"]
      np.testing.assert_allclose(s * (B @ A).T, d, rtol=1e-5, atol=1e-6)  # table [vocab, d]
    elif path[-2] == "conv_in":
      A, B = tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"]
      assert A.shape == (3, 3, 3, 3) and B.shape == (4, 3, 1, 1)  # [r, cin, kh, kw], [cout, r, 1, 1]
      oihw = s * np.einsum("or,rihw->oihw", B[:, :, 0, 0], A)
      np.testing.assert_allclose(oihw.transpose(2, 3, 1, 0), d, rtol=1e-5, atol=1e-6)
    else:
      A, B = tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"]
      np.testing.assert_allclose(s * (B @ A), np.asarray(d).T, rtol=1e-5, atol=1e-6)  # nn.Linear [out, in]


def test_flax_names_round_trip_underscores(tmp_path, params):
  cfg = make_cfg()
  save_adapter(str(tmp_path), random_lora(params, cfg), cfg, params)
  names = json.loads((tmp_path / CONFIG).read_text())["target_modules"]
  assert "params.layers_1.v_proj" in names and "params.embed_tokens" in names


def test_stacked_kernels_round_trip(tmp_path):
  """nn.scan-stacked kernels keep their layer axis on both factors; pass the same kernel_axes."""
  params = {"params": {"layers": {"q_proj": {"kernel": jnp.ones((3, 8, 6))}}}}
  cfg = LoraConfig(r=2, targets=["q_proj"], kernel_axes={"q_proj": (1, 1)})
  lora = random_lora(params, cfg)
  save_adapter(str(tmp_path), lora, cfg, params)
  stored = load_file(str(tmp_path / WEIGHTS))
  assert stored["base_model.model.params.layers.q_proj.lora_A.weight"].shape == (3, 2, 8)
  assert stored["base_model.model.params.layers.q_proj.lora_B.weight"].shape == (3, 6, 2)
  loaded, cfg2 = load_adapter(str(tmp_path), params, kernel_axes=cfg.kernel_axes)
  assert_tree_equal(loaded, lora)
  assert_tree_equal(merge(params, loaded, cfg2), merge(params, lora, cfg))


def test_ambiguous_flax_names(tmp_path):
  w = jnp.ones((4, 4))
  params = {"params": {"a.b": {"c": {"kernel": w}}, "a": {"b.c": {"kernel": w}}}}
  cfg = LoraConfig(targets="params/.*/kernel")
  with pytest.raises(ValueError, match="ambiguous"):
    save_adapter(str(tmp_path), random_lora(params, cfg), cfg, params)


def test_unmapped_target_refused(tmp_path, params):
  cfg = make_cfg()
  partial = PathMap(NET_MAP.rules[:1])
  with pytest.raises(ValueError, match="params/conv_in/kernel has no module name"):
    save_adapter(str(tmp_path), random_lora(params, cfg), cfg, params, partial)


def test_peft_patterns_on_load(tmp_path, params):
  """A PEFT-written config: short target names, unescaped rank_pattern keys, first match wins."""
  cfg = make_cfg(targets=["q_proj", "v_proj"])
  save_adapter(str(tmp_path), random_lora(params, cfg), cfg, params, NET_MAP)
  config = json.loads((tmp_path / CONFIG).read_text())
  config.update(target_modules=["q_proj", "v_proj"], rank_pattern={"layers.1.v_proj": 1}, alpha_pattern={})
  (tmp_path / CONFIG).write_text(json.dumps(config))
  _, cfg2 = load_adapter(str(tmp_path), params, NET_MAP)
  t = find_targets(params, cfg2)
  assert t["params", "layers_1", "v_proj", "kernel"].rank == 1
  assert t["params", "layers_0", "v_proj", "kernel"].rank == 2
  assert {x.alpha for x in t.values()} == {4.0}


# ---- strict loading --------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path, params):
  cfg = make_cfg()
  save_adapter(str(tmp_path), random_lora(params, cfg), cfg, params, NET_MAP)
  return tmp_path


def edit_weights(directory, edit):
  tensors = load_file(str(directory / WEIGHTS))
  edit(tensors)
  save_file(tensors, str(directory / WEIGHTS))


def edit_config(directory, **changes):
  config = json.loads((directory / CONFIG).read_text())
  config.update(changes)
  (directory / CONFIG).write_text(json.dumps(config))


Q0_A = "base_model.model.model.layers.0.q_proj.lora_A.weight"
Q0_B = "base_model.model.model.layers.0.q_proj.lora_B.weight"


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop(Q0_B), f"missing keys {Q0_B}"),
    (lambda t: t.update({"base_model.model.lm_head.lora_A.weight": np.ones((2, 8), np.float32)}),
     "unexpected keys.*lm_head.lora_A"),
    (lambda t: t.update({Q0_A.replace("lora_A.weight", "lora_magnitude_vector"): np.ones(8, np.float32)}),
     r"holds DoRA magnitudes \(.*q_proj.lora_magnitude_vector\) but its adapter_config.json has use_dora false"),
    (lambda t: t.update({Q0_A: np.ones((3, 8), np.float32)}), r"lora_A.weight has shape \(3, 8\), expected \(2, 8\)"),
    (lambda t: t.update({Q0_B: np.ones((8, 2, 1), np.float32)}), r"lora_B.weight has shape \(8, 2, 1\)"),
])
def test_bad_weights(saved, params, edit, match):
  edit_weights(saved, edit)
  with pytest.raises(ValueError, match=match):
    load_adapter(str(saved), params, NET_MAP)


def test_base_layer_copy(saved, params):
  """PEFT saves the base table beside an adapted embedding: accepted when it is params' table."""
  key = "base_model.model.model.embed_tokens.base_layer.weight"
  table = np.asarray(params["params"]["embed_tokens"]["embedding"])
  edit_weights(saved, lambda t: t.update({key: table}))
  load_adapter(str(saved), params, NET_MAP)
  edit_weights(saved, lambda t: t.update({key: table + 1}))
  with pytest.raises(ValueError, match=f"{key} is a copy of the base weight model.embed_tokens that differs"):
    load_adapter(str(saved), params, NET_MAP)


def test_module_missing_from_file(saved, params):
  edit_weights(saved, lambda t: (t.pop(Q0_A), t.pop(Q0_B)))
  with pytest.raises(ValueError, match="missing the factors of model.layers.0.q_proj"):
    load_adapter(str(saved), params, NET_MAP)


@pytest.mark.parametrize("changes, match", [
    ({"peft_type": "IA3"}, "peft_type is 'IA3'"),
    ({"use_dora": True}, r"missing keys .*q_proj.lora_magnitude_vector.* \(the config has use_dora true\)"),
    ({"use_dora": "yes"}, "field 'use_dora' is 'yes'; it must be true or false"),
    ({"fan_in_fan_out": "yes"}, "field 'fan_in_fan_out' is 'yes'"),
    ({"bias": "some"}, "field 'bias' is 'some'"),
    ({"bias": "all"}, r"missing .*q_proj/bias.*bias='all' train these leaves"),
    ({"lora_bias": True}, r"lora_bias: target params/embed_tokens/embedding needs a float bias"),
    ({"modules_to_save": "lm_head"}, "field 'modules_to_save' is 'lm_head'; it must be a list of module names"),
    ({"layer_replication": [[0, 1]]}, "layer_replication"),
    ({"rank_pattern": {"q_proj": 4, "conv_in": 3}}, r"q_proj.lora_A.weight has shape \(2, 8\), expected \(4, 8\)"),
])
def test_bad_config(saved, params, changes, match):
  edit_config(saved, **changes)
  with pytest.raises(ValueError, match=match):
    load_adapter(str(saved), params, NET_MAP)


def test_wrong_kind_for_names(saved, params):
  with pytest.raises(ValueError, match="unexpected keys"):
    load_adapter(str(saved), params)  # saved with HF names, loaded with Flax names


def test_pickle_refused(tmp_path, params):
  (tmp_path / CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
  (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
  with pytest.raises(ValueError, match="never unpickles.*safetensors"):
    load_adapter(str(tmp_path), params)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors(saved, params, damage):
  path = saved / WEIGHTS
  data = path.read_bytes()
  path.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(len(data)), "empty": b""}[damage])
  with pytest.raises(ValueError, match=f"{WEIGHTS} is not a readable safetensors file"):
    load_adapter(str(saved), params, NET_MAP)


def test_missing_files(tmp_path, params):
  with pytest.raises(FileNotFoundError, match=CONFIG):
    load_adapter(str(tmp_path), params)
  (tmp_path / CONFIG).write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    load_adapter(str(tmp_path), params)
  (tmp_path / CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
  with pytest.raises(FileNotFoundError, match=WEIGHTS):
    load_adapter(str(tmp_path), params)


@pytest.mark.parametrize("fail_at", ["weights", "swap"])
def test_failed_save_keeps_old_pair(saved, params, monkeypatch, fail_at):
  before = {f: (saved / f).read_bytes() for f in os.listdir(saved)}
  siblings = set(os.listdir(saved.parent))
  cfg = make_cfg(targets=["q_proj"])
  if fail_at == "weights":
    def broken(tensors, path, metadata=None):
      with open(path, "wb") as f:
        f.write(b"half a file")
      raise OSError("disk full")
    monkeypatch.setattr("lorax_jax.io.tensors.save_file", broken)
  else:
    def broken(a, b):
      raise OSError("crash")
    monkeypatch.setattr("lorax_jax.files._exchange", broken)
  with pytest.raises(OSError):
    save_adapter(str(saved), random_lora(params, cfg), cfg, params, NET_MAP)
  assert {f: (saved / f).read_bytes() for f in os.listdir(saved)} == before
  assert set(os.listdir(saved.parent)) == siblings  # no temporary directory left either
  load_adapter(str(saved), params, NET_MAP)


# ---- Kohya -----------------------------------------------------------------------------------

UNET_MAP = PathMap((
    ("params/down_blocks_{i}/attentions_{j}/proj_in/kernel", "down_blocks.{i}.attentions.{j}.proj_in.weight", "conv"),
    ("params/down_blocks_{i}/attentions_{j}/to_q/kernel", "down_blocks.{i}.attentions.{j}.to_q.weight", "linear"),
    ("params/text/layers_{i}/q_proj/kernel", "text_model.encoder.layers.{i}.self_attn.q_proj.weight", "linear"),
))


@pytest.fixture(scope="module")
def unet_params():
  rng = np.random.default_rng(0)
  return {"params": {
      "down_blocks_0": {"attentions_0": {"proj_in": {"kernel": rng.normal(size=(3, 3, 4, 6)).astype(np.float32)},
                                         "to_q": {"kernel": rng.normal(size=(6, 6)).astype(np.float32)}}},
      "text": {"layers_0": {"q_proj": {"kernel": rng.normal(size=(5, 5)).astype(np.float32)}}},
  }}


def kohya_tensors(dtype=np.float32):
  rng = np.random.default_rng(1)
  n = lambda *s: rng.normal(size=s).astype(dtype)
  conv, q, te = "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_down_blocks_0_attentions_0_to_q", \
      "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
  return {
      f"{conv}.lora_down.weight": n(3, 4, 3, 3), f"{conv}.lora_up.weight": n(6, 3, 1, 1),
      f"{conv}.alpha": np.array(1.5, dtype),
      f"{q}.lora_down.weight": n(2, 6), f"{q}.lora_up.weight": n(6, 2),  # no alpha: alpha = r
      f"{te}.lora_down.weight": n(4, 5), f"{te}.lora_up.weight": n(5, 4), f"{te}.alpha": np.array(8.0, dtype),
  }


def kohya_expected(params, tensors):
  """W + alpha/r · up @ down, by hand, in Flax layout."""
  p = params["params"]
  f = lambda k: np.asarray(tensors[k], np.float32)
  conv, q, te = "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_down_blocks_0_attentions_0_to_q", \
      "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
  oihw = np.einsum("or,rihw->oihw", f(f"{conv}.lora_up.weight")[:, :, 0, 0], f(f"{conv}.lora_down.weight"))
  return {
      ("params", "down_blocks_0", "attentions_0", "proj_in", "kernel"):
          p["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"] + 1.5 / 3 * oihw.transpose(2, 3, 1, 0),
      ("params", "down_blocks_0", "attentions_0", "to_q", "kernel"):
          p["down_blocks_0"]["attentions_0"]["to_q"]["kernel"] + 2 / 2 * (f(f"{q}.lora_up.weight") @ f(f"{q}.lora_down.weight")).T,
      ("params", "text", "layers_0", "q_proj", "kernel"):
          p["text"]["layers_0"]["q_proj"]["kernel"] + 8 / 4 * (f(f"{te}.lora_up.weight") @ f(f"{te}.lora_down.weight")).T,
  }


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_kohya_merge(tmp_path, unet_params, dtype):
  tensors = kohya_tensors(dtype)
  save_file(tensors, str(tmp_path / "lora.safetensors"))
  lora, cfg = load_kohya(str(tmp_path / "lora.safetensors"), unet_params, UNET_MAP)
  targets = find_targets(unet_params, cfg)
  assert {p: (t.rank, t.alpha) for p, t in targets.items()} == {
      ("params", "down_blocks_0", "attentions_0", "proj_in", "kernel"): (3, 1.5),
      ("params", "down_blocks_0", "attentions_0", "to_q", "kernel"): (2, 2.0),
      ("params", "text", "layers_0", "q_proj", "kernel"): (4, 8.0)}
  merged = merge(unet_params, lora, cfg)
  for path, want in kohya_expected(unet_params, tensors).items():
    got = merged
    for k in path:
      got = got[k]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_kohya_prefix_skip_and_errors(tmp_path, unet_params):
  path = str(tmp_path / "lora.safetensors")
  tensors = kohya_tensors()
  save_file(tensors, path)
  lora, cfg = load_kohya(path, unet_params, UNET_MAP, prefix_map={"lora_unet_": "", "lora_te_": None})
  assert set(lora["params"]) == {"down_blocks_0"}
  with pytest.raises(ValueError, match="not Kohya LoRA factors.*lora_te_text_model"):
    load_kohya(path, unet_params, UNET_MAP, prefix_map={"lora_unet_": ""})
  save_file({**tensors, "lora_unet_mid_block_proj_out.lora_down.weight": np.ones((2, 2), np.float32)}, path)
  with pytest.raises(ValueError, match="lora_unet_mid_block_proj_out.lora_down.weight"):
    load_kohya(path, unet_params, UNET_MAP)
  save_file({k: v for k, v in tensors.items() if not k.endswith("to_q.lora_up.weight")}, path)
  with pytest.raises(ValueError, match="missing keys lora_unet_down_blocks_0_attentions_0_to_q.lora_up.weight"):
    load_kohya(path, unet_params, UNET_MAP)
  save_file({**tensors, "lora_unet_down_blocks_0_attentions_0_to_q.lora_up.weight": np.ones((6, 3), np.float32)}, path)
  with pytest.raises(ValueError, match=r"to_q.lora_up.weight has shape \(6, 3\), expected \(6, 2\)"):
    load_kohya(path, unet_params, UNET_MAP)


def test_kohya_ambiguous_names(tmp_path):
  w = np.ones((4, 4), np.float32)
  params = {"params": {"x": {"kernel": w}, "y": {"kernel": w}}}
  path_map = PathMap((("params/x/kernel", "a.b_c.weight", "linear"), ("params/y/kernel", "a_b.c.weight", "linear")))
  save_file({"lora_unet_a_b_c.lora_down.weight": np.ones((1, 4), np.float32),
             "lora_unet_a_b_c.lora_up.weight": np.ones((4, 1), np.float32)}, str(tmp_path / "l.safetensors"))
  with pytest.raises(ValueError, match="ambiguous: params/x/kernel and params/y/kernel"):
    load_kohya(str(tmp_path / "l.safetensors"), params, path_map)
