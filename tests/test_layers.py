"""Which layers (``layers_to_transform`` / ``layers_pattern``) and ``modules_to_save``, against PEFT.

PEFT 0.21.2 on tiny random Hugging Face Llama and BERT models; a stacked (``nn.scan``) model
for the per-slice masks.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

import lorax_jax
from lorax_jax import LoraConfig, axes_from_use, find_targets, init_lora, lora_transform, merge
from lorax_jax.io import load_adapter, save_adapter
from lorax_jax.lora_tree import SAVED_KEY
from lorax_jax.models.bert import BERT_PATH_MAP, BertForSequenceClassification, load_bert
from lorax_jax.models.llama import LLAMA_PATH_MAP, DecoderLayer, RMSNorm, load_llama
from lorax_jax.pathmap import PathMap
from lorax_jax.paths import path_str
from test_io import random_lora
from test_peft import LLAMA_TOKENS, TOL, llama_dir, max_diff, randomize_lora, torch_llama, torch_logits  # noqa: F401
from zoo import ScanTransformer

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def peft_adapted(model) -> set[str]:
  """The module names PEFT put a LoRA layer on."""
  return {name for name, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def our_adapted(params, cfg) -> set[str]:
  return {LLAMA_PATH_MAP.to_hf(path_str(p))[0].removesuffix(".weight") for p in find_targets(params, cfg)}


# ---- layers_to_transform on an unrolled Llama -------------------------------------------------

@pytest.mark.parametrize("layers, pattern", [(1, "layers"), ([0], None), ([0, 1], ["layers"])])
def test_llama_layer_selection_is_peft_s(llama_dir, layers, pattern):
  """The same config selects the same modules here as in PEFT."""
  model = peft.get_peft_model(torch_llama(llama_dir), peft.LoraConfig(
      r=2, target_modules=["q_proj", "down_proj"], layers_to_transform=layers, layers_pattern=pattern))
  _, _, params = load_llama(llama_dir)
  cfg = LoraConfig(r=2, targets=["q_proj", "down_proj"], layers_to_transform=layers, layers_pattern=pattern)
  assert our_adapted(params, cfg) == {n.removeprefix("base_model.model.") for n in peft_adapted(model)}


def test_llama_peft_layers_adapter_runs_here(tmp_path, llama_dir):
  model = peft.get_peft_model(torch_llama(llama_dir), peft.LoraConfig(
      task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
      layers_to_transform=[1], layers_pattern="layers"))
  randomize_lora(model)
  model.save_pretrained(str(tmp_path))
  _, flax_model, params = load_llama(llama_dir)
  lora, cfg = load_adapter(str(tmp_path), params, LLAMA_PATH_MAP)
  assert {p[2] for p in find_targets(params, cfg)} == {"layers_1"}
  got = lora_transform(flax_model.apply, params, cfg)(params, lora, jnp.asarray(LLAMA_TOKENS))
  want = torch_logits(model, LLAMA_TOKENS)
  assert max_diff(got, want) < TOL
  assert max_diff(want, torch_logits(torch_llama(llama_dir), LLAMA_TOKENS)) > 1e-2


def test_llama_layers_adapter_trained_here_runs_in_peft(tmp_path, llama_dir):
  _, flax_model, params = load_llama(llama_dir)
  cfg = LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "up_proj"], layers_to_transform=0,
                   layers_pattern="layers")
  lora = random_lora(params, cfg)
  assert set(lora["params"]["model"]) == {"layers_0"}
  save_adapter(str(tmp_path), lora, cfg, params, LLAMA_PATH_MAP, task_type="CAUSAL_LM")
  keys = load_file(str(tmp_path / "adapter_model.safetensors"))
  assert keys and all(".layers.0." in k for k in keys)
  model = peft.PeftModel.from_pretrained(torch_llama(llama_dir), str(tmp_path)).eval()
  got = lora_transform(flax_model.apply, params, cfg)(params, lora, jnp.asarray(LLAMA_TOKENS))
  assert max_diff(got, torch_logits(model, LLAMA_TOKENS)) < TOL
  assert peft_adapted(model) == {f"base_model.model.model.layers.0.{m}" for m in
                                 ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")}


def test_layer_errors_name_the_problem(llama_dir):
  _, _, params = load_llama(llama_dir)
  with pytest.raises(ValueError, match=r"layers_to_transform: layer 2 is out of range.*\[0, 1\]"):
    find_targets(params, LoraConfig(targets=["q_proj"], layers_to_transform=[0, 2]))
  with pytest.raises(ValueError, match="layers_pattern 'h' matches no component"):
    find_targets(params, LoraConfig(targets=["q_proj"], layers_to_transform=0, layers_pattern="h"))
  with pytest.raises(ValueError, match="layers_pattern must be None unless layers_to_transform is set"):
    LoraConfig(targets=["q_proj"], layers_pattern="layers")
  with pytest.raises(ValueError, match="layers_to_transform must be a layer index >= 0"):
    LoraConfig(targets=["q_proj"], layers_to_transform=[1, 1])


# ---- layers_to_transform on a stacked (nn.scan) model -----------------------------------------

@pytest.fixture(scope="module")
def scanned():
  ids = jax.random.randint(jax.random.key(0), (2, 7), 0, 40)
  model = ScanTransformer(depth=4)
  params = model.init(jax.random.key(1), ids)
  cfg = axes_from_use(model.apply, params, LoraConfig(r=2, alpha=4, targets=["query", "value", "fc1"],
                                                      layers_to_transform=[1, 3], layers_pattern="blocks"), ids)
  return model, params, cfg, ids


def test_stacked_unselected_slices_stay_zero_through_training(scanned):
  model, params, cfg, ids = scanned
  targets = find_targets(params, cfg)
  assert targets and all(t.layers == (1, 3) and t.stack_shape == (4,) for t in targets.values())
  lora = init_lora(params, cfg, jax.random.key(2))
  apply = lora_transform(model.apply, params, cfg)

  def loss(lora):
    return optax.softmax_cross_entropy_with_integer_labels(apply(params, lora, ids[:, :-1]), ids[:, 1:]).mean()

  opt = optax.adamw(1e-2)

  @jax.jit
  def step(lora, state):
    grads = jax.grad(loss)(lora)
    updates, state = opt.update(grads, state, lora)
    return optax.apply_updates(lora, updates), state, grads

  lora, state, grads = step(lora, opt.init(lora))
  lora, state, _ = step(lora, state)
  for t in targets.values():
    for side in ("a", "b"):
      g, x = (np.asarray(lorax_jax.paths.get_path(tree, t.path)[side]) for tree in (grads, lora))
      assert not g[[0, 2]].any() and not x[[0, 2]].any(), (t.name, side)  # exactly zero
      assert x[1].any() and x[3].any(), (t.name, side)
  got = apply(params, lora, ids)
  assert max_diff(got, model.apply(merge(params, lora, cfg), ids)) < 1e-5
  # Non-zero values in the unselected slices of a tree (a hand-edited one) change nothing.
  noisy = jax.tree.map(lambda x: x + 1.0, lora)
  assert max_diff(apply(params, noisy, ids), model.apply(merge(params, noisy, cfg), ids)) < 1e-5
  merged = merge(params, noisy, cfg)["params"]["blocks"]["query"]["kernel"]
  np.testing.assert_array_equal(merged[0], params["params"]["blocks"]["query"]["kernel"][0])


def test_stacked_layer_out_of_range(scanned):
  model, params, cfg, ids = scanned
  with pytest.raises(ValueError, match=r"params/blocks/\w+/kernel stacks 4 layers.*asks for layer 4"):
    find_targets(params, cfg.replace(layers_to_transform=[1, 4]))


# ---- modules_to_save on BERT sequence classification ------------------------------------------

@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=40, max_position_embeddings=16, num_labels=3,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  directory = str(tmp_path_factory.mktemp("bert"))
  transformers.BertForSequenceClassification(config).save_pretrained(directory)
  return directory


def torch_bert(directory):
  return transformers.BertForSequenceClassification.from_pretrained(directory).eval()


BERT_IDS = np.random.default_rng(0).integers(0, 50, size=(2, 6))
BERT_MASK = np.array([[1] * 6, [1] * 4 + [0] * 2])


def bert_logits(model):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(BERT_IDS), attention_mask=torch.from_numpy(BERT_MASK)).logits.numpy()


def jax_bert_logits(bert_dir, lora, cfg):
  bert_config, params = load_bert(bert_dir)
  apply_fn = BertForSequenceClassification(bert_config).apply
  args = (jnp.asarray(BERT_IDS), jnp.asarray(BERT_MASK))
  got = lora_transform(apply_fn, params, cfg)(params, lora, *args)
  assert max_diff(got, apply_fn(merge(params, lora, cfg), *args)) < 1e-5
  return got


def test_peft_seq_cls_adapter_with_modules_to_save_runs_here(tmp_path, bert_dir):
  """SEQ_CLS puts the classifier in modules_to_save; PEFT saves it as ``classifier.weight``."""
  model = peft.get_peft_model(torch_bert(bert_dir), peft.LoraConfig(
      task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"]))
  randomize_lora(model)
  with torch.no_grad():  # "train" the head
    model.base_model.model.classifier.modules_to_save["default"].weight.mul_(3.0).add_(0.5)
  model.save_pretrained(str(tmp_path))
  assert "base_model.model.classifier.weight" in load_file(str(tmp_path / "adapter_model.safetensors"))
  _, params = load_bert(bert_dir)
  lora, cfg = load_adapter(str(tmp_path), params, BERT_PATH_MAP)
  assert set(lora[SAVED_KEY]["params"]["classifier"]) == {"kernel", "bias"}
  want = bert_logits(model)
  assert max_diff(jax_bert_logits(bert_dir, lora, cfg), want) < TOL
  without_head = {k: v for k, v in lora.items() if k != SAVED_KEY}
  assert max_diff(jax_bert_logits(bert_dir, without_head, cfg.replace(modules_to_save=None)), want) > 1e-2


def test_modules_to_save_trained_here_runs_in_peft(tmp_path, bert_dir):
  _, params = load_bert(bert_dir)
  cfg = LoraConfig(r=4, alpha=8, targets=["query", "value"], modules_to_save=["classifier"])
  lora = random_lora(params, cfg)
  assert lorax_jax.count(lora) == lorax_jax.lora_count(params, cfg)
  head = params["params"]["classifier"]
  assert lorax_jax.count(lora[SAVED_KEY]) == head["kernel"].size + head["bias"].size
  save_adapter(str(tmp_path), lora, cfg, params, BERT_PATH_MAP, task_type="SEQ_CLS")
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert config["modules_to_save"] == ["classifier"]
  model = peft.PeftModel.from_pretrained(torch_bert(bert_dir), str(tmp_path)).eval()
  assert max_diff(jax_bert_logits(bert_dir, lora, cfg), bert_logits(model)) < TOL
  loaded, cfg2 = load_adapter(str(tmp_path), params, BERT_PATH_MAP)
  jax.tree.map(np.testing.assert_array_equal, loaded, lora)


def test_modules_to_save_errors(bert_dir):
  _, params = load_bert(bert_dir)
  with pytest.raises(ValueError, match="modules_to_save 'head' matches no module; modules: params/bert"):
    init_lora(params, LoraConfig(targets=["query"], modules_to_save=["head"]), jax.random.key(0))
  cfg = LoraConfig(targets=["query"], modules_to_save=["classifier"])
  lora = init_lora(params, cfg, jax.random.key(0))
  apply = lora_transform(BertForSequenceClassification(load_bert(bert_dir)[0]).apply, params, cfg)
  args = (jnp.asarray(BERT_IDS), jnp.asarray(BERT_MASK))
  with pytest.raises(ValueError, match="missing params/classifier/bias"):
    apply(params, {**lora, SAVED_KEY: {"params": {"classifier": {"kernel": lora[SAVED_KEY]["params"]["classifier"]["kernel"]}}}}, *args)
  # A saved module is never a LoRA target (as in PEFT).
  assert not any("classifier" in path_str(p) for p in find_targets(
      params, LoraConfig(targets="params/.*/kernel", modules_to_save=["classifier"])))


# ---- a scanned Llama: stacked kernels in per-layer PEFT files ----------------------------------

SCANNED_MAP = PathMap(tuple((f.replace("layers_{i}", "layers"), h, k) for f, h, k in LLAMA_PATH_MAP.rules))


@pytest.fixture(scope="module")
def scanned_llama(llama_dir):
  """The tiny Llama's params with the layers stacked (``params/model/layers/...: [L, ...]``) and a
  forward pass that scans over them; logits equal the unrolled model's."""
  config, flax_model, params = load_llama(llama_dir)
  model = params["params"]["model"]
  n = config.num_hidden_layers
  layers = jax.tree.map(lambda *xs: jnp.stack(xs), *[model[f"layers_{i}"] for i in range(n)])
  stacked = {"params": {"lm_head": params["params"]["lm_head"],
                        "model": {"embed_tokens": model["embed_tokens"], "norm": model["norm"], "layers": layers}}}
  layer, norm = DecoderLayer(config), RMSNorm(config.rms_norm_eps)

  def apply(p, tokens):
    m = p["params"]["model"]
    b, l = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(l), (b, l))
    step = lambda x, lp: (layer.apply({"params": lp}, x, positions, jnp.ones((b, l), bool), 0, None)[0], None)
    x, _ = jax.lax.scan(step, m["embed_tokens"]["embedding"][tokens], m["layers"])
    return norm.apply({"params": m["norm"]}, x) @ p["params"]["lm_head"]["kernel"]

  tokens = jnp.asarray(LLAMA_TOKENS)
  assert max_diff(apply(stacked, tokens), flax_model.apply(params, tokens)) < 1e-5
  return stacked, apply


def test_scanned_llama_loads_a_peft_layers_adapter(tmp_path, llama_dir, scanned_llama):
  """PEFT's per-layer modules fill their slices; the other layers' factors are zero."""
  model = peft.get_peft_model(torch_llama(llama_dir), peft.LoraConfig(
      task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
      layers_to_transform=[1], layers_pattern="layers"))
  randomize_lora(model)
  model.save_pretrained(str(tmp_path))
  params, apply = scanned_llama
  lora, cfg = load_adapter(str(tmp_path), params, SCANNED_MAP)
  assert cfg.layers_to_transform == (1,)
  targets = find_targets(params, cfg)
  assert {t.name for t in targets.values()} == {f"params/model/layers/{m}/kernel" for m in
                                                ("self_attn/q_proj", "self_attn/v_proj", "mlp/down_proj")}
  for t in targets.values():
    node = lorax_jax.paths.get_path(lora, t.path)
    assert t.axes == "sio" and not np.asarray(node["a"][0]).any() and np.asarray(node["b"][1]).any()
  got = lora_transform(apply, params, cfg)(params, lora, jnp.asarray(LLAMA_TOKENS))
  assert max_diff(got, torch_logits(model, LLAMA_TOKENS)) < TOL


def test_scanned_llama_adapter_lists_only_its_layers_and_runs_in_peft(tmp_path, llama_dir, scanned_llama):
  params, apply = scanned_llama
  tokens = jnp.asarray(LLAMA_TOKENS)
  cfg = axes_from_use(apply, params, LoraConfig(r=4, alpha=8, targets=["q_proj", "up_proj"],
                                                layers_to_transform=[0]), tokens)
  lora = random_lora(params, cfg)  # random in every slice: layer 1's values are masked out
  save_adapter(str(tmp_path), lora, cfg, params, SCANNED_MAP, task_type="CAUSAL_LM")
  keys = load_file(str(tmp_path / "adapter_model.safetensors"))
  assert sorted(keys) == sorted(f"base_model.model.model.layers.0.{m}.lora_{x}.weight"
                                for m in ("self_attn.q_proj", "mlp.up_proj") for x in "AB")
  model = peft.PeftModel.from_pretrained(torch_llama(llama_dir), str(tmp_path)).eval()
  got = lora_transform(apply, params, cfg)(params, lora, tokens)
  assert max_diff(got, torch_logits(model, LLAMA_TOKENS)) < TOL
  loaded, cfg2 = load_adapter(str(tmp_path), params, SCANNED_MAP)
  assert max_diff(lora_transform(apply, params, cfg2)(params, loaded, tokens), got) < 1e-5


def test_modules_to_save_in_combined_trees_and_summary(bert_dir):
  _, params = load_bert(bert_dir)
  cfg = LoraConfig(r=2, targets=["query"], modules_to_save=["classifier"])
  lora = random_lora(params, cfg)
  combined = lorax_jax.join_params(params, lora)
  frozen, back = lorax_jax.split_params(combined, cfg)
  jax.tree.map(np.testing.assert_array_equal, (frozen, back), (params, lora))
  assert "params/classifier/kernel  (modules_to_save)  (32, 3)" in lorax_jax.summary(params, cfg)


def test_stacked_path_map_rules():
  rule = ("params/blocks/q/kernel", "model.layers.{i}.q_proj.weight", "linear")
  pm = PathMap((rule, ("params/head/kernel", "lm_head.weight", "linear")))
  assert pm.layer_names("params/blocks/q/kernel", 3) == (
      [f"model.layers.{i}.q_proj.weight" for i in range(3)], "linear")
  assert pm.to_hf("params/blocks/q/kernel") is None and pm.to_flax("model.layers.1.q_proj.weight") is None
  assert pm.layer_names("params/head/kernel", 3) is None and pm.to_hf("params/head/kernel") == ("lm_head.weight", "linear")
  for bad in [("params/layers_{i}/k", "model.layers.{j}.k.weight", "linear"),
              ("params/k", "model.{i}.layers.{j}.k.weight", "linear")]:
    with pytest.raises(ValueError, match="at most one on the Hugging Face side only"):
      PathMap((bad,))
