"""``targets="all-linear"`` decided by use (`lorax_jax.find_linear`, `lorax_jax.axes_from_use`).

The reference is PEFT's own selection (``get_peft_model(..., LoraConfig(target_modules="all-linear"))``
on the same transformers model) for every causal-LM family `lorax_jax.models.load_model` reads and
for BERT, and the third-party library's own linear layer classes (keras ``Dense``/``EinsumDense``, a
torch ``nn.Sequential``'s ``Linear``s for a Haiku MLP) elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_jax as lj
from lorax_jax.io.modules import modules
from lorax_jax.paths import path_str

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lorax_jax.models import load_model, path_map  # noqa: E402
from lorax_jax.models.bert import BERT_PATH_MAP, BertForSequenceClassification, load_bert  # noqa: E402
from test_families import FAMILIES  # noqa: E402
from test_gpt2 import CONFIGS as GPT2_CONFIGS  # noqa: E402
from test_moe_family import mixtral_config  # noqa: E402

CAUSAL_LMS = {**FAMILIES, **GPT2_CONFIGS, "mixtral": mixtral_config}  # every family load_model reads


def peft_selection(model, **kwargs) -> set[str]:
  """What PEFT's ``all-linear`` adapts on a torch ``model``: the modules it wraps in LoRA layers, by
  module name, and the parameters it wraps (``target_parameters``: a MoE router's ``weight``, the
  experts' stacks), by parameter name (the owner module, less PEFT's nesting, then the parameter)."""
  wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules="all-linear", **kwargs))
  found = set()
  for name, module in wrapped.base_model.model.named_modules():
    if isinstance(module, peft.tuners.lora.ParamWrapper):
      owner = re.sub(r"(\.base_layer)+$", "", name)
      found.add(f"{owner}.{module.parameter_name}")
    elif isinstance(module, peft.tuners.lora.LoraLayer):
      found.add(name)
  return found


def our_selection(apply_fn, params, path_map, cfg, *args) -> set[str]:
  """The module names (PEFT's, through ``path_map``: a parameter module by its parameter's name)
  `axes_from_use` targets for ``all-linear``; also checks that the config targets exactly
  `find_linear`'s paths (less modules_to_save)."""
  filled = lj.axes_from_use(apply_fn, params, cfg, *args)
  targets = lj.find_targets(params, filled)
  saved = {p for p in lj.find_linear(apply_fn, params, *args)
           if any(path_str(p).startswith(f"params/{m}") for m in cfg.modules_to_save or ())}
  assert set(targets) == set(lj.find_linear(apply_fn, params, *args)) - saved
  names = {m.path: m.name for m in modules(params, path_map)}
  return {names[p] for p in targets}


@pytest.mark.parametrize("family", list(CAUSAL_LMS))
def test_family_all_linear_equals_peft(tmp_path, family):
  """Every projection but the head over the vocabulary (tied or not); Phi-3's fused ``qkv_proj`` and
  GPT-2's ``Conv1D``\\ s as PEFT sees them; Mixtral's router and experts as PEFT's ``target_parameters``."""
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(CAUSAL_LMS[family]())
  model.save_pretrained(str(tmp_path))
  config, flax_model, params = load_model(str(tmp_path))
  ours = our_selection(flax_model.apply, params, path_map(config), lj.LoraConfig(targets="all-linear"),
                       jnp.zeros((1, 5), jnp.int32))
  assert ours == peft_selection(model, task_type="CAUSAL_LM")
  assert not any(re.search("lm_head|embed|wte|wpe", name) for name in ours)
  if family == "mixtral":
    assert {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.experts.down_proj"} <= ours


@pytest.mark.parametrize("task", [None, "SEQ_CLS"])
def test_bert_all_linear_equals_peft(tmp_path, task):
  """Without a task PEFT adapts the classifier too (a head over labels, not the vocabulary);
  with ``SEQ_CLS`` it saves it whole instead, as ``modules_to_save=["classifier"]`` does here."""
  torch.manual_seed(0)
  config = transformers.BertConfig(vocab_size=101, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=24, max_position_embeddings=32, type_vocab_size=2, num_labels=3)
  model = transformers.BertForSequenceClassification(config)
  model.save_pretrained(str(tmp_path))
  bert_config, params = load_bert(str(tmp_path))
  ids = jnp.ones((1, 6), jnp.int32)
  cfg = lj.LoraConfig(targets="all-linear", modules_to_save=["classifier"] if task else ())
  ours = our_selection(BertForSequenceClassification(bert_config).apply, params, BERT_PATH_MAP, cfg,
                       ids, jnp.ones_like(ids), jnp.zeros_like(ids))
  assert ours == peft_selection(model, **({"task_type": task} if task else {}))
  assert {"bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.1.output.dense",
          "bert.encoder.layer.0.attention.self.query", "bert.pooler.dense"} <= ours


def test_haiku_mlp_all_linear_equals_peft_on_the_torch_mlp():
  hk = pytest.importorskip("haiku")
  sizes = [5, 8, 8, 3]
  net = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP(sizes[1:])(x)))
  x = jnp.ones((2, sizes[0]))
  params = net.init(jax.random.key(0), x)
  found = {path_str(p) for p in lj.find_linear(net.apply, params, x)}
  layers = [torch.nn.Linear(i, o) for i, o in zip(sizes, sizes[1:])]
  torch_mlp = torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1], torch.nn.ReLU(), layers[2])
  want = {f"mlp/~/linear_{int(name) // 2}/w" for name in peft_selection(torch_mlp)}
  assert found == want and len(want) == 3


def test_equinox_mlp_all_linear_is_every_linear_weight():
  eqx = pytest.importorskip("equinox")
  mlp = eqx.nn.MLP(5, 3, 8, depth=2, key=jax.random.key(0))
  params, static = eqx.partition(mlp, eqx.is_array)
  found = lj.find_linear(lambda p, x: eqx.combine(p, static)(x), params, jnp.ones(5))
  want = [path for path, leaf in jax.tree_util.tree_leaves_with_path(params) if leaf.ndim == 2]
  assert len(found) == len(want) == 3 and all(p[-1] == "weight" for p in found)


def test_use_decides_not_names():
  """The name rule misses a kernel named ``gating_einsum`` and takes a conv kernel named
  ``kernel``; the use rule does the opposite, and leaves out the head over the vocabulary."""
  k = jax.random.split(jax.random.key(0), 5)
  params = {"embedding": jax.random.normal(k[0], (50, 8)), "gating_einsum": jax.random.normal(k[1], (2, 8, 16)),
            "linear": jax.random.normal(k[2], (16, 8)), "conv": {"kernel": jax.random.normal(k[3], (3, 8, 8))},
            "lm_head": {"kernel": jax.random.normal(k[4], (8, 50))}}

  def apply_fn(p, ids):
    h = p["embedding"][ids]
    gate, up = jnp.einsum("td,gdf->gtf", h, p["gating_einsum"])
    h = h + (jax.nn.gelu(gate) * up) @ p["linear"]
    h = jax.lax.conv_general_dilated(h[None], p["conv"]["kernel"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))[0]
    return h @ p["lm_head"]["kernel"]

  ids = jnp.arange(4)
  assert lj.find_linear(apply_fn, params, ids) == [("gating_einsum",), ("linear",)]
  by_name = lj.find_targets(params, lj.LoraConfig(targets="all-linear"))
  assert list(by_name) == [("conv", "kernel")]
  cfg = lj.axes_from_use(apply_fn, params, lj.LoraConfig(r=2, targets="all-linear"), ids)
  assert {t.name: t.axes for t in lj.find_targets(params, cfg).values()} == {"gating_einsum": "oio", "linear": "io"}


def test_no_linear_use_is_an_error():
  params = {"table": jnp.ones((10, 4))}
  with pytest.raises(ValueError, match="all-linear.*found no linear layer"):
    lj.axes_from_use(lambda p, ids: p["table"][ids], params, lj.LoraConfig(targets="all-linear"), jnp.arange(3))


def needs(package: str) -> None:
  """Skips the test where ``package`` is not installed (the ``frameworks`` extra), without importing
  it: importing it here would bring TensorFlow into this process."""
  if importlib.util.find_spec(package) is None:
    pytest.skip(f"{package} is not installed (the frameworks extra: pip install -e '.[frameworks]')")


def run_isolated(script: str) -> dict:
  """Runs ``script`` in a fresh Python (Keras on its JAX backend) and returns the JSON object its last
  line prints. The third-party libraries import TensorFlow (half a GB resident, its own abseil beside
  jaxlib's and torch's), kept out of the pytest worker that runs the other tests."""
  env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": os.pathsep.join(sys.path), "TF_CPP_MIN_LOG_LEVEL": "3"}
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


KERAS_HUB = textwrap.dedent("""
  import json, keras, keras_hub, jax.numpy as jnp, lorax_jax as lj
  backbone = keras_hub.models.GemmaBackbone(vocabulary_size=64, num_layers=2, num_query_heads=2,
                                            num_key_value_heads=1, hidden_dim=16, intermediate_dim=32, head_dim=8)
  trainable = backbone.trainable_variables
  frozen = [v.value for v in backbone.non_trainable_variables]
  params = {v.path: v.value for v in trainable}
  apply_fn = lambda p, x: backbone.stateless_call([p[v.path] for v in trainable], frozen, x)[0]
  inputs = {"token_ids": jnp.ones((1, 6), jnp.int32), "padding_mask": jnp.ones((1, 6), jnp.int32)}
  found = [p[0] for p in lj.find_linear(apply_fn, params, inputs)]
  linear = (keras.layers.Dense, keras.layers.EinsumDense)
  want = [layer.kernel.path for layer in backbone._flatten_layers() if isinstance(layer, linear)]
  print(json.dumps({"found": found, "want": want}))
""")


def test_keras_hub_gemma_backbone_attention_and_mlp():
  needs("keras_hub")
  got = run_isolated(KERAS_HUB)
  assert sorted(got["found"]) == sorted(got["want"])
  names = " ".join(got["found"])
  for part in ("query", "key", "value", "attention_output", "ffw_gating", "ffw_linear"):
    assert part in names, (part, got["found"])
  assert "embedding" not in names


GEMMA_LIBRARY = textwrap.dedent("""
  import json, jax, jax.numpy as jnp, numpy as np, lorax_jax as lj
  from lorax_jax.paths import path_str
  from gemma.gm.nn import _config, _modules, _transformer  # `from gemma import gm` needs kauldron's API
  config = _config.TransformerConfig(
      num_embed=64, embed_dim=16, hidden_dim=32, num_heads=2, head_dim=8, num_kv_heads=1,
      final_logit_softcap=None, use_post_attn_norm=True, use_post_ffw_norm=True, use_qk_norm=True,
      attention_types=(_modules.AttentionType.LOCAL_SLIDING, _modules.AttentionType.GLOBAL),
      sliding_window_size=4, transpose_gating_einsum=True)
  model = _transformer.Transformer(config=config)
  tokens = jnp.ones((1, 6), jnp.int32)
  params = model.init(jax.random.key(0), tokens)
  apply_fn = lambda p, t: model.apply(p, t).logits
  found = [path_str(p) for p in lj.find_linear(apply_fn, params, tokens)]
  flat = {path_str(p): leaf for p, leaf in lj.qarray.leaves_with_paths(params)}
  want = [name for name, leaf in flat.items()
          if np.ndim(leaf) >= 2 and name.rsplit("/", 1)[-1] in ("w", "gating_einsum", "linear")]
  by_name = [t.name for t in lj.find_targets(params, lj.LoraConfig(targets="all-linear")).values()]
  print(json.dumps({"found": found, "want": want, "by_name": by_name}))
""")


def test_gemma_library_gemma3_attention_and_mlp():
  """Google DeepMind's ``gemma`` library: attention ``Einsum`` leaves are named ``w``, the MLP's
  ``gating_einsum`` and ``linear``; the embedding (tied to the logits) is not a linear layer.
  The gating einsum's output (2 × 32) has the vocabulary's size (64): not a head all the same.
  The reference is the library's own ``Einsum`` modules and MLP params, read off the tree."""
  needs("gemma")
  got = run_isolated(GEMMA_LIBRARY)
  found = set(got["found"])
  assert found == set(got["want"])
  for layer in ("layer_0", "layer_1"):
    for part in ("attn/q_einsum/w", "attn/kv_einsum/w", "attn/attn_vec_einsum/w", "mlp/gating_einsum", "mlp/linear"):
      assert f"params/{layer}/{part}" in found, (layer, part, sorted(found))
  assert not any("embed" in name for name in found)
  assert not any("gating_einsum" in name for name in got["by_name"])  # what the name rule missed
