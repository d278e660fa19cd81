"""Mixed batches: ``lora_apply(params, stacked, x, adapter_ids=ids)`` runs each example through its own
adapter of a stacked tree (`lorax_jax.stack_adapters`), -1 through the base model.

The reference is independent of the mixed path: each example run alone (``jax.vmap`` of a one-example
call) through the single-adapter engine with that adapter's own tree and config, or through the bare
model for id -1; its outputs, and the gradients of ``Σ y · w`` for a fixed random ``w``, summed per
adapter. Then real PEFT: a tiny Llama with 3 adapters, ``model(x, adapter_names=[...])``.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lorax_jax as lj
from lorax_jax.paths import set_path
import zoo
import zoo_frameworks
from lorax_jax.models.llama import Llama, LlamaConfig, stack_config, stack_layers

TOL = 1e-5


def configs(k: int, top: int = 4, **common) -> list[lj.LoraConfig]:
  """``k`` configs of ranks 1 … ``top`` and alphas 1, 2.5, 4, ... (every third rsLoRA)."""
  return [lj.LoraConfig(r=1 + j % top, alpha=1.0 + 1.5 * j, use_rslora=j % 3 == 2, **common) for j in range(k)]


def random_adapters(params, cfgs) -> list[tuple[dict, lj.LoraConfig]]:
  """One adapter per config, every factor random (DoRA's magnitudes near 1), drawn with NumPy."""
  rng = np.random.default_rng(0)
  out = []
  for c in cfgs:
    lora = {}
    for path, t in lj.find_targets(params, c).items():
      node = {"a": 0.3 * rng.standard_normal(t.a_shape), "b": 0.3 * rng.standard_normal(t.b_shape)}
      if c.use_dora:
        node["m"] = 1 + 0.3 * rng.standard_normal(t.m_shape)
      set_path(lora, path, {k: jnp.asarray(v, jnp.float32) for k, v in node.items()})
    out.append((lora, c))
  return out


def per_example_reference(apply_fn, params, x, adapters, ids, w):
  """Each example alone (``jax.vmap`` of a one-example call) through the model with its adapter merged
  into the (dequantized) weights, the bare model for -1: the outputs, and each adapter's gradient of
  ``Σ y · w`` over its own examples (zero where it has none), pulled back through `lorax_jax.merge`.
  One compiled step serves every adapter (the merged weights have the base's shapes)."""
  @jax.jit
  def step(p, w):
    def loss(p):
      y = jax.vmap(lambda xi: apply_fn(p, xi[None])[0])(x)
      return jnp.vdot(y, w), y
    (_, y), g = jax.value_and_grad(loss, has_aux=True)(p)
    return y, g
  ids = np.asarray(ids)
  base = lj.dequantize(params)
  y, _ = step(base, jnp.zeros_like(w))
  y = np.array(y)
  grads = []
  for j, (lora, cfg) in enumerate(adapters):
    mine = (ids == j).reshape(-1, *(1,) * (w.ndim - 1))
    merged, pull = jax.vjp(lambda l: lj.merge(base, l, cfg), lora)
    yj, dp = step(merged, jnp.where(mine, w, 0))
    y[ids == j] = np.asarray(yj)[ids == j]
    grads.append(pull(dp)[0])
  return y, grads


def check_mixed(apply_fn, params, x, adapters, ids, *, tol=TOL):
  """The mixed batch's outputs and LoRA gradients equal `per_example_reference`'s (``tol``); the
  gradient of every adapter absent from ``ids`` is exactly zero, and so is every scale's."""
  loras, cfgs = zip(*adapters)
  stacked, cfg = lj.stack_adapters(params, loras, cfgs)
  mixed = lj.lora_transform(apply_fn, params, cfg)
  ids = jnp.asarray(ids, jnp.int32)
  shape = jax.eval_shape(lambda: apply_fn(lj.dequantize(params), x)).shape
  w = jax.random.normal(jax.random.key(5), shape)
  y, pull = jax.vjp(lambda s: mixed(params, s, x, adapter_ids=ids), stacked)
  (got,) = pull(w)
  want_y, want = per_example_reference(apply_fn, params, x, adapters, ids, w)
  zoo.close(y, want_y, tol)
  want_stacked, _ = lj.stack_adapters(params, want, cfgs)
  want_stacked = jax.tree_util.tree_map_with_path(
      lambda p, g: jnp.zeros_like(g) if p[-1].key == "scale" else g, want_stacked)
  zoo.close(got, want_stacked, tol)
  for j in sorted(set(range(len(adapters))) - set(np.asarray(ids).tolist())):
    assert all(bool((g[j] == 0).all()) for g in jax.tree.leaves(got)), f"adapter {j} is absent but has a gradient"
  assert mixed.fallbacks == set()
  return stacked, mixed


def ids_for(k: int, batch: int, seed: int = 0) -> np.ndarray:
  """``batch`` ids over ``-1 … k-1`` with the last adapter left out when ``k > 1`` (its gradient must
  be exactly zero) and at least one base row."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(-1, max(k - 1, 1), size=batch)
  ids[0] = -1
  return ids


def zoo_case(name):
  """One model of `zoo` (built alone: `zoo.cases` initializes all of them)."""
  key = jax.random.key(42)
  if name == "moe_ragged_dot":
    ks = jax.random.split(key, 3)
    moe = {"router": jax.random.normal(ks[0], (16, 4)),
           "experts": {"w_in": jax.random.normal(ks[1], (4, 16, 24)) / 4,
                       "w_out": jax.random.normal(ks[2], (4, 24, 16)) / 5}}
    return zoo.Case(name, zoo.moe_layer, moe, (jax.random.normal(key, (20, 16)),),
                    lj.LoraConfig(r=2, alpha=4, targets=["experts/w_in", "experts/w_out"],
                                  kernel_axes={"experts/.*": "sio"}))
  if name == "nnx":
    graphdef, state = nnx.split(zoo.NNXModel(nnx.Rngs(0)))
    return zoo.Case(name, lambda s, x: nnx.merge(graphdef, s)(x), state, (jax.random.normal(key, (5, 12)),),
                    lj.LoraConfig(r=2, alpha=4))
  ids = jax.random.randint(key, (2, 7), 0, 40)
  model, x, cfg = {
      "mlp": (zoo.MLP(), jax.random.normal(key, (4, 10)), lj.LoraConfig(targets="all-linear")),
      "cnn": (zoo.CNN(), jax.random.normal(key, (2, 9, 9, 3)), lj.LoraConfig(targets=["conv1", "conv2", "head"])),
      "embed_lm": (zoo.EmbedLM(), jax.random.randint(key, (3, 5), 0, 50),
                   lj.LoraConfig(targets=["embed", "hidden", "lm_head"])),
      "mha_transformer": (zoo.MHATransformer(), ids,
                          lj.LoraConfig(targets=["query", "key", "value", "out", "fc1", "fc2"])),
      "scan_remat_transformer": (zoo.ScanTransformer(), ids,
                                 lj.LoraConfig(targets="all-linear", kernel_axes={"params/blocks/.*": (1, 1)})),
  }[name]
  return zoo.Case(name, model.apply, jax.jit(model.init)(jax.random.key(0), x), (x,), cfg)


@pytest.mark.parametrize("k", [1, 4, 16])
def test_linen_mlp_mixed_ranks_alphas_rslora_rank_pattern(k):
  case = zoo_case("mlp")
  cfgs = configs(k, targets="all-linear")
  cfgs = [c.replace(rank_pattern={"fc2": 1 + j % 2}) if j % 4 == 3 else c for j, c in enumerate(cfgs)]
  x = jax.random.normal(jax.random.key(1), (max(2 * k, 6), 10))
  check_mixed(case.apply_fn, case.params, x, random_adapters(case.params, cfgs), ids_for(k, x.shape[0]))


@pytest.mark.parametrize("k", [1, 4, 16])
def test_dense_dispatch_moe(k):
  """An MoE whose experts ``[E, in, out]`` run as einsums over every token keeps the batch axis at
  every expert use, so a mixed batch routes each example through its own adapter's experts (a
  sorted `ragged_dot` MoE is refused by name: `test_refused_uses_are_named`)."""
  ks = jax.random.split(jax.random.key(0), 3)
  params = {"router": jax.random.normal(ks[0], (16, 4)),
            "experts": {"w_in": jax.random.normal(ks[1], (4, 16, 24)) / 4,
                        "w_out": jax.random.normal(ks[2], (4, 24, 16)) / 5}}
  x = jax.random.normal(jax.random.key(3), (max(6, k + 2), 5, 16))
  cfgs = configs(k, targets=["experts/w_in", "experts/w_out"], kernel_axes={"experts/.*": "sio"})
  check_mixed(zoo.dense_moe_layer, params, x, random_adapters(params, cfgs), ids_for(k, x.shape[0]))


@pytest.mark.parametrize("name, x", [
    ("mha_transformer", jax.random.randint(jax.random.key(2), (6, 7), 0, 40)),
    ("scan_remat_transformer", jax.random.randint(jax.random.key(3), (6, 5), 0, 40)),
    ("nnx", jax.random.normal(jax.random.key(4), (6, 12))),
], ids=["mha_transformer", "scan_remat_transformer", "nnx"])
def test_zoo_models(name, x):
  case = zoo_case(name)
  common = {f: getattr(case.cfg, f) for f in ("targets", "kernel_axes")}
  cfgs = configs(4, **common)
  check_mixed(case.apply_fn, case.params, x, random_adapters(case.params, cfgs), ids_for(4, x.shape[0]))


def test_equinox_vmapped_model():
  """Equinox's model runs on one example under ``jax.vmap``: its uses' activations carry the batch
  first all the same (the conv is left out: it has no per-example rule)."""
  case = zoo_frameworks.equinox_case("equinox_model", zoo_frameworks.EqxModel(jax.random.key(7)),
                                     jnp.zeros((2, 3, 7, 7)), {})
  cfgs = configs(4, top=3, targets=[r"mlp/layers/\d+/weight", "out"])
  x = jax.random.normal(jax.random.key(5), (5, 3, 7, 7))
  check_mixed(case.apply_fn, case.params, x, random_adapters(case.params, cfgs), ids_for(4, 5))


def test_dora_magnitudes_per_adapter():
  case = zoo_case("mlp")
  cfgs = configs(4, targets="all-linear", use_dora=True)
  x = jax.random.normal(jax.random.key(6), (7, 10))
  check_mixed(case.apply_fn, case.params, x, random_adapters(case.params, cfgs), ids_for(4, 7))


def test_nf4_base():
  case = zoo_case("mlp")
  qparams = lj.quantize(case.params, "nf4", block_size=2, targets=["fc1", "fc2"])
  cfgs = configs(4, targets="all-linear")
  x = jax.random.normal(jax.random.key(7), (6, 10))
  check_mixed(case.apply_fn, qparams, x, random_adapters(qparams, cfgs), ids_for(4, 6))


def tiny_llama():
  config = LlamaConfig.from_hf({"vocab_size": 48, "hidden_size": 16, "intermediate_size": 24,
                                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                "rms_norm_eps": 1e-5, "rope_theta": 500.0, "max_position_embeddings": 32})
  model = Llama(config)
  return model, jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def test_scanned_llama():
  """`Llama` with ``scan_layers``: the layers' factors ``[k, layers, R, ...]`` sliced per layer in the scan."""
  model, params = tiny_llama()
  cfgs = configs(4, targets="all-linear")
  adapters = [(stack_layers(lora), stack_config(c, params)) for lora, c in random_adapters(params, cfgs)]
  tokens = jax.random.randint(jax.random.key(8), (5, 6), 0, 48)
  scanned = model.clone(scan_layers=True)
  check_mixed(lambda p, t: scanned.apply(p, t), stack_layers(params), tokens, adapters, ids_for(4, 5))


def test_dropout_masks_do_not_depend_on_the_ids():
  """With dropout, row ``i`` is row ``i`` of adapter ``ids[i]``'s run over the whole batch with the same
  key (the mask is drawn over the activation, whichever adapters its rows go to)."""
  case = zoo_case("mlp")
  cfgs = configs(3, targets="all-linear", dropout=0.3)
  adapters = random_adapters(case.params, cfgs)
  stacked, cfg = lj.stack_adapters(case.params, *zip(*adapters))
  x = jax.random.normal(jax.random.key(9), (6, 10))
  ids = np.array([0, 1, 2, -1, 2, 0])
  key = jax.random.key(3)
  got = lj.lora_transform(case.apply_fn, case.params, cfg)(case.params, stacked, x, adapter_ids=ids, rng=key)
  for j, (lora, c) in enumerate(adapters):
    want = lj.lora_transform(case.apply_fn, case.params, c)(case.params, lora, x, rng=key)
    zoo.close(got[ids == j], want[ids == j])
  zoo.close(got[ids == -1], case.apply_fn(case.params, x)[ids == -1])
  no_dropout = cfgs[0].replace(dropout=0.0)
  alone = lj.lora_transform(case.apply_fn, case.params, no_dropout)(case.params, adapters[0][0], x)
  assert float(jnp.abs(got[ids == 0] - alone[ids == 0]).max()) > 1e-3  # the masks did drop something


def test_base_rows_are_the_base_model_and_traced_bad_ids_are_nan():
  case = zoo_case("mlp")
  cfgs = configs(2, targets="all-linear")
  stacked, cfg = lj.stack_adapters(case.params, *zip(*random_adapters(case.params, cfgs)))
  apply = lj.lora_transform(case.apply_fn, case.params, cfg)
  x = jax.random.normal(jax.random.key(10), (4, 10))
  zoo.close(apply(case.params, stacked, x, adapter_ids=jnp.full(4, -1)), case.apply_fn(case.params, x))
  y = jax.jit(lambda i: apply(case.params, stacked, x, adapter_ids=i))(jnp.array([0, 2, -2, 1]))
  y = np.asarray(y)
  assert np.isnan(y[1:3]).all() and np.isfinite(y[[0, 3]]).all()


def test_named_errors():
  case = zoo_case("mlp")
  cfgs = configs(2, targets="all-linear")
  adapters = random_adapters(case.params, cfgs)
  stacked, cfg = lj.stack_adapters(case.params, *zip(*adapters))
  apply = lj.lora_transform(case.apply_fn, case.params, cfg)
  x = jax.random.normal(jax.random.key(11), (3, 10))
  with pytest.raises(ValueError, match="stacked .*pass adapter_ids"):
    apply(case.params, stacked, x)
  with pytest.raises(ValueError, match="adapter_ids selects adapters of a stacked tree"):
    single = lj.lora_transform(case.apply_fn, case.params, cfgs[0])
    single(case.params, adapters[0][0], x, adapter_ids=jnp.zeros(3, int))
  with pytest.raises(ValueError, match=re.escape("adapter_ids [2, 5] are out of range")):
    apply(case.params, stacked, x, adapter_ids=np.array([2, 5, 0]))
  with pytest.raises(ValueError, match="1-D integer array"):
    apply(case.params, stacked, x, adapter_ids=jnp.zeros((3,), jnp.float32))
  with pytest.raises(ValueError, match="rank 4 at params/fc1/kernel, the transform was built for rank 1"):
    bigger, _ = lj.stack_adapters(case.params, *zip(*adapters), max_rank=4)
    lj.lora_transform(case.apply_fn, case.params, cfgs[0])(case.params, bigger, x, adapter_ids=jnp.zeros(3, int))
  with pytest.raises(ValueError, match="mode='reference'.*mode='factored'"):
    reference = lj.lora_transform(case.apply_fn, case.params, cfg, mode="reference")
    reference(case.params, stacked, x, adapter_ids=jnp.zeros(3, int))
  # A model that flattens batch and sequence into one axis: the use cannot tell the examples apart.
  flat = lambda p, x: (x.reshape(-1, x.shape[-1]) @ p["fc"]["kernel"]).reshape(*x.shape[:2], -1)
  params = {"fc": {"kernel": jax.random.normal(jax.random.key(0), (4, 5))}}
  fc = configs(2, targets=["fc"])
  st, c = lj.stack_adapters(params, *zip(*random_adapters(params, fc)))
  with pytest.raises(ValueError, match=r"kernel fc/kernel reaches `dot_general`: .*shape \(6, 4\)"):
    lj.lora_transform(flat, params, c)(params, st, jnp.ones((2, 3, 4)), adapter_ids=jnp.array([0, 1]))


@pytest.mark.parametrize("name, batch, use", [
    ("moe_ragged_dot", 20, "experts/w_in reaches `ragged_dot_general`"),
    ("cnn", 2, "conv1/kernel reaches `conv_general_dilated`"),
    ("embed_lm", 3, "embed/embedding reaches `gather`"),
], ids=["moe", "cnn", "embed_lm"])
def test_refused_uses_are_named(name, batch, use):
  case = zoo_case(name)
  common = {f: getattr(case.cfg, f) for f in ("targets", "kernel_axes")}
  cfgs = configs(2, **common)
  stacked, cfg = lj.stack_adapters(case.params, *zip(*random_adapters(case.params, cfgs)))
  with pytest.raises(ValueError, match=re.escape(use)):
    lj.lora_transform(case.apply_fn, case.params, cfg)(case.params, stacked, *case.inputs,
                                                       adapter_ids=jnp.zeros(batch, jnp.int32))


def test_peft_adapter_names_mixed_batch(tmp_path):
  """A tiny random Hugging Face Llama with 3 PEFT adapters of different r / alpha (one rsLoRA): PEFT's
  ``model(x, adapter_names=[...])`` logits equal ours for the same mixed batch, each adapter loaded from
  PEFT's files with `lorax_jax.load_adapter`."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  transformers = pytest.importorskip("transformers")
  from lorax_jax.models.llama import LLAMA_PATH_MAP, load_llama
  from test_peft import randomize_lora
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                    rope_theta=500.0)
  base_dir = str(tmp_path / "llama")
  transformers.LlamaForCausalLM(config).save_pretrained(base_dir)
  specs = {"a0": (2, 4.0, False), "a1": (4, 3.0, True), "a2": (3, 12.0, False)}
  targets = ["q_proj", "v_proj", "down_proj"]
  model = None
  for name, (r, alpha, rslora) in specs.items():
    peft_cfg = peft.LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets)
    if model is None:
      model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base_dir).eval(), peft_cfg,
                                  adapter_name=name)
    else:
      model.add_adapter(name, peft_cfg)
  randomize_lora(model)
  model.eval()
  model.save_pretrained(str(tmp_path / "adapters"), selected_adapters=list(specs))
  tokens = np.random.default_rng(1).integers(0, 64, size=(5, 7))
  names = ["a0", "a2", "__base__", "a1", "a2"]
  with torch.no_grad():
    want = model(torch.from_numpy(tokens), adapter_names=names).logits.numpy()
  _, flax_model, params = load_llama(base_dir)
  dirs = [str(tmp_path / "adapters" / name) for name in specs]  # PEFT saves each named adapter in its folder
  stacked, cfg = lj.stack_adapters(params, [lj.load_adapter(d, params, LLAMA_PATH_MAP) for d in dirs])
  ids = jnp.array([0, 2, -1, 1, 2])
  got = lj.lora_transform(flax_model.apply, params, cfg)(params, stacked, jnp.asarray(tokens), adapter_ids=ids)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4)
  with torch.no_grad():
    plain = model(torch.from_numpy(tokens), adapter_names=["__base__"] * 5).logits.numpy()
  assert min(float(np.abs(want[i] - plain[i]).max()) for i in (0, 1, 3, 4)) > 1e-2  # every adapter changes its row


def test_generate_serves_a_batch_of_different_adapters():
  """`generate` with a stacked tree and one adapter id per prompt: each row's tokens equal that prompt
  generated alone with its own adapter (the base model for -1), greedy."""
  from lorax_jax.models.generate import generate
  model, params = tiny_llama()
  cfgs = configs(3, targets=["q_proj", "v_proj", "down_proj"])
  adapters = random_adapters(params, cfgs)
  stacked, cfg = lj.stack_adapters(params, *zip(*adapters))
  prompts = [[3, 9, 4], [7, 1], [5, 5, 5, 2], [11]]
  ids = [2, -1, 0, 2]
  got = generate(model, params, prompts, max_new_tokens=5, lora=stacked, cfg=cfg, adapter_ids=ids)
  for prompt, j, row in zip(prompts, ids, got):
    alone = dict(lora=adapters[j][0], cfg=adapters[j][1]) if j >= 0 else {}
    assert row == generate(model, params, [prompt], max_new_tokens=5, **alone)[0]
  assert got != generate(model, params, prompts, max_new_tokens=5)  # the adapters change something
  with pytest.raises(ValueError, match=re.escape("adapter_ids [3] are out of range for 3")):
    generate(model, params, prompts, max_new_tokens=2, lora=stacked, cfg=cfg, adapter_ids=[3, 0, 0, 0])


@pytest.mark.parametrize("option", [{"lora_bias": True}, {"trainable_token_indices": {"embed": [1, 2]}}])
def test_options_without_a_per_example_path_are_named(option):
  """A transform built with ``lora_bias`` or trainable tokens refuses a mixed batch by the option's name."""
  params = {"embed": {"embedding": jnp.ones((5, 4))}, "dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
  model = lambda p, ids: p["embed"]["embedding"][ids] @ p["dense"]["kernel"] + p["dense"]["bias"]
  plain = lj.LoraConfig(r=2, alpha=2, targets=["dense"])
  stacked, _ = lj.stack_adapters(params, [lj.init_lora(params, plain, jax.random.key(0))] * 2, [plain] * 2)
  apply = lj.lora_transform(model, params, plain.replace(**option))
  with pytest.raises(ValueError, match=f"adapter_ids with {next(iter(option))}"):
    apply(params, stacked, jnp.array([0, 1]), adapter_ids=jnp.array([0, 1]))
