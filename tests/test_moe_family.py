"""Mixtral (`lorax_jax.models.llama` with a sparse mixture of experts) against transformers'
``MixtralForCausalLM`` and PEFT.

A tiny random checkpoint written by transformers itself (per-expert ``block_sparse_moe`` tensors on
disk, read as transformers' fused ``mlp.experts.gate_up_proj`` / ``down_proj``): the logits, greedy
generation, a written-back checkpoint, and adapters both ways, on the attention projections
(``target_modules``) and on the stacked experts (PEFT's ``target_parameters``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorax_jax import LoraConfig, axes_from_use, find_targets, lora_transform
from lorax_jax.io import load_adapter, save_adapter
from lorax_jax.models import load_model, path_map
from lorax_jax.models.generate import generate
from lorax_jax.io.tensors import read_safetensors
from lorax_jax.models.hf import read_config
from lorax_jax.models.llama import (LLAMA_PATH_MAP, Llama, LlamaConfig, load_llama, save_llama,
                                    stack_config, stack_layers)
from test_families import assert_adapted_logits_are_peft, assert_peft_adapter_runs_here
from test_io import random_lora
from test_peft import TOL, max_diff, randomize_lora, torch_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 128
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 12))
ATTENTION = ["q_proj", "v_proj"]


def torch_model(directory: str):
  return transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()


def mixtral_config():
  """4 experts, top 2, hidden 32, 2 layers."""
  return transformers.MixtralConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, initializer_range=0.2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
  """`mixtral_config`'s random checkpoint; norms moved off their init (1) so a misplaced one shows."""
  torch.manual_seed(0)
  model = transformers.MixtralForCausalLM(mixtral_config())
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.3 * torch.randn_like(p))
  directory = str(tmp_path_factory.mktemp("mixtral"))
  model.save_pretrained(directory, safe_serialization=True)
  return directory


def test_logits_match_transformers(checkpoint, tmp_path):
  expected = torch_logits(torch_model(checkpoint), TOKENS)
  assert np.abs(expected).max() > 1
  config, model, params = load_llama(checkpoint)
  assert config.model_type == "mixtral" and (config.num_local_experts, config.num_experts_per_tok) == (4, 2)
  np.testing.assert_allclose(jax.jit(model.apply)(params, TOKENS), expected, atol=TOL)
  assert load_model(checkpoint)[0] == config and path_map(config) is LLAMA_PATH_MAP
  scanned = Llama(config, scan_layers=True)
  np.testing.assert_allclose(jax.jit(scanned.apply)(stack_layers(params), TOKENS), expected, atol=TOL)
  top1 = Llama(dataclasses.replace(config, num_experts_per_tok=1))  # the routing matters
  assert max_diff(jax.jit(top1.apply)(params, TOKENS), expected) > 1e-2

  save_llama(str(tmp_path), params, config)  # written back: per-expert tensors, loaded by transformers
  assert LlamaConfig.from_hf(read_config(str(tmp_path))) == config
  np.testing.assert_allclose(torch_logits(torch_model(str(tmp_path)), TOKENS), expected, atol=1e-5)


def test_greedy_generation_matches_transformers(checkpoint):
  reference = torch_model(checkpoint)
  reference.generation_config.eos_token_id = None
  _, model, params = load_llama(checkpoint)
  prompts = [TOKENS[0, :9].tolist(), TOKENS[1, :5].tolist()]
  for prompt, got in zip(prompts, generate(model, params, prompts, max_new_tokens=6)):
    with torch.no_grad():
      out = reference.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert got == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("change, message", [
    ({"num_experts_per_tok": 5}, "1 <= num_experts_per_tok <= num_local_experts"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"shared_expert_intermediate_size": 8}, "shared_expert_intermediate_size=8"),
])
def test_config_refuses_what_it_does_not_implement(change, message):
  base = dict(model_type="mixtral", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_local_experts=4)
  with pytest.raises(ValueError, match=message):
    LlamaConfig.from_hf({**base, **change})


def test_checkpoint_missing_an_expert_is_named(checkpoint):
  from lorax_jax.models.hf import read_tensors
  from lorax_jax.models.llama import llama_from_tensors

  config, _, _ = load_llama(checkpoint)
  tensors = read_tensors(checkpoint)
  del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
  with pytest.raises(ValueError, match=r"lacks model.layers.1.block_sparse_moe.experts.2.w3.weight"):
    llama_from_tensors(config, tensors)


def test_peft_adapter_on_attention_runs_here(checkpoint, tmp_path):
  assert_peft_adapter_runs_here(checkpoint, ATTENTION, tmp_path)


def test_adapter_on_attention_saved_here_runs_in_peft(checkpoint, tmp_path):
  _, flax_model, params = load_llama(checkpoint)
  cfg = LoraConfig(r=4, alpha=8, targets=ATTENTION)
  lora = jax.tree.map(lambda x: 0.1 * x, random_lora(params, cfg))
  save_adapter(str(tmp_path), lora, cfg, params, LLAMA_PATH_MAP, task_type="CAUSAL_LM")
  model = peft.PeftModel.from_pretrained(torch_model(checkpoint), str(tmp_path)).eval()
  assert_adapted_logits_are_peft(checkpoint, flax_model, params, lora, cfg, model)


EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]  # PEFT's target_parameters


def factored_logits(flax_model, params, lora, cfg) -> np.ndarray:
  """The adapted logits, every expert LoRA factored by the engine's ragged_dot rule (no merged fallback; the
  tiny router may be merged by the cost rule)."""
  with warnings.catch_warnings():
    warnings.filterwarnings("error", "lorax_jax: kernel .*/experts/.* merged")
    return np.asarray(lora_transform(flax_model.apply, params, cfg)(params, lora, jnp.asarray(TOKENS)))


@pytest.mark.parametrize("parameters", [EXPERTS, ["experts.down_proj"]])
def test_peft_target_parameters_adapter_runs_here(checkpoint, tmp_path, parameters):
  """Both experts' parameters (nested ParamWrappers: ``experts.base_layer.lora_A``) or one, beside
  attention modules, with a rank_pattern on the experts."""
  model = peft.get_peft_model(torch_model(checkpoint), peft.LoraConfig(
      task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=ATTENTION, target_parameters=parameters,
      rank_pattern={"experts.down_proj": 2}))
  randomize_lora(model)
  model.save_pretrained(str(tmp_path))
  want = torch_logits(model, TOKENS)
  _, flax_model, params = load_llama(checkpoint)
  lora, cfg = load_adapter(str(tmp_path), params, LLAMA_PATH_MAP)
  down = lora["params"]["model"]["layers_1"]["mlp"]["experts"]["down_proj"]
  assert down["a"].shape == (4, 2, 48) and down["b"].shape == (4, 2, 32)  # per expert, rank 2
  assert max_diff(factored_logits(flax_model, params, lora, cfg), want) < TOL
  assert max_diff(want, torch_logits(torch_model(checkpoint), TOKENS)) > 1e-2
  scanned = Llama(flax_model.config, scan_layers=True)  # the layers' expert factors stacked once more
  got = factored_logits(scanned, stack_layers(params), stack_layers(lora), stack_config(cfg, params))
  assert max_diff(got, want) < TOL


@pytest.mark.parametrize("parameters", [EXPERTS, ["experts.gate_up_proj"]])
def test_target_parameters_adapter_saved_here_is_pefts(checkpoint, tmp_path, parameters):
  """Written here: PEFT loads it without a warning, with the logits here, and its keys are those
  ``get_peft_model_state_dict`` gives a PEFT model of the same config."""
  _, flax_model, params = load_llama(checkpoint)
  flax_names = [p.replace(".", "/") for p in parameters]
  cfg = LoraConfig(r=4, alpha=8, targets=ATTENTION + flax_names, rank_pattern={"gate_up_proj": 2},
                   kernel_axes={name: "sio" for name in flax_names})
  lora = jax.tree.map(lambda x: 0.1 * x, random_lora(params, cfg))
  assert_saved_here_is_pefts(checkpoint, str(tmp_path), flax_model, params, lora, cfg)


def assert_saved_here_is_pefts(checkpoint, directory, flax_model, params, lora, cfg) -> dict:
  """``lora`` saved to ``directory``: PEFT loads it without a warning, with the logits here (factored),
  and its keys are those ``get_peft_model_state_dict`` gives a PEFT model of the written config,
  which is returned."""
  save_adapter(directory, lora, cfg, params, LLAMA_PATH_MAP, task_type="CAUSAL_LM")
  got = factored_logits(flax_model, params, lora, cfg)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = peft.PeftModel.from_pretrained(torch_model(checkpoint), directory).eval()
  assert not [w for w in caught if any(s in str(w.message).lower() for s in ("missing", "unexpected"))]
  want = torch_logits(model, TOKENS)
  assert max_diff(got, want) < TOL
  assert max_diff(want, torch_logits(torch_model(checkpoint), TOKENS)) > 1e-2
  with open(os.path.join(directory, "adapter_config.json")) as f:
    written = json.load(f)
  reference = peft.get_peft_model(torch_model(checkpoint), peft.LoraConfig(
      task_type="CAUSAL_LM", r=cfg.r, lora_alpha=cfg.alpha, target_modules=written["target_modules"],
      target_parameters=written["target_parameters"], rank_pattern=written["rank_pattern"]))
  want_shapes = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(reference).items()}
  assert {k: v.shape for k, v in read_safetensors(os.path.join(directory, "adapter_model.safetensors")).items()
          } == want_shapes
  return written


def test_all_linear_adapter_both_ways(checkpoint, tmp_path):
  """PEFT's ``all-linear`` on Mixtral adapts the attention projections, the router (``target_parameters``
  ``gate.weight``: transformers' router is no ``nn.Linear``) and both expert stacks: such an adapter runs
  here. ``all-linear`` by use adapts the same kernels, and its adapter saved here is PEFT's file, the
  router and the experts in ``target_parameters``."""
  model = peft.get_peft_model(torch_model(checkpoint), peft.LoraConfig(
      task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear"))
  randomize_lora(model)
  model.save_pretrained(str(tmp_path / "peft"))
  _, flax_model, params = load_llama(checkpoint)
  lora, cfg = load_adapter(str(tmp_path / "peft"), params, LLAMA_PATH_MAP)
  assert "params/model/layers_1/mlp/gate/kernel" in {t.name for t in find_targets(params, cfg).values()}
  assert max_diff(factored_logits(flax_model, params, lora, cfg), torch_logits(model, TOKENS)) < TOL

  by_use = axes_from_use(flax_model.apply, params, LoraConfig(r=4, alpha=8, targets="all-linear"), TOKENS[:1])
  assert set(find_targets(params, by_use)) == set(find_targets(params, cfg))
  lora = jax.tree.map(lambda x: 0.1 * x, random_lora(params, by_use))
  written = assert_saved_here_is_pefts(checkpoint, str(tmp_path / "here"), flax_model, params, lora, by_use)
  assert "model.layers.1.mlp.gate.weight" in written["target_parameters"]
  assert not any("mlp" in name for name in written["target_modules"])


def test_router_named_in_target_modules_loads(checkpoint, tmp_path):
  """A router adapter that names ``mlp.gate`` in ``target_modules`` (a transformers 4 adapter, where the
  router was an ``nn.Linear``; PEFT converts it to ``target_parameters`` ``gate.weight``) loads here too."""
  _, flax_model, params = load_llama(checkpoint)
  cfg = LoraConfig(r=4, alpha=8, targets=ATTENTION + ["mlp/gate/kernel"])
  lora = jax.tree.map(lambda x: 0.1 * x, random_lora(params, cfg))
  save_adapter(str(tmp_path), lora, cfg, params, LLAMA_PATH_MAP, task_type="CAUSAL_LM")
  config_file = tmp_path / "adapter_config.json"
  config = json.loads(config_file.read_text())
  config["target_modules"] += [name.removesuffix(".weight") for name in config.pop("target_parameters")]
  config_file.write_text(json.dumps(config))
  model = peft.PeftModel.from_pretrained(torch_model(checkpoint), str(tmp_path)).eval()
  loaded, loaded_cfg = load_adapter(str(tmp_path), params, LLAMA_PATH_MAP)
  got = lora_transform(flax_model.apply, params, loaded_cfg)(params, loaded, jnp.asarray(TOKENS))
  assert max_diff(got, torch_logits(model, TOKENS)) < TOL
  assert max_diff(got, lora_transform(flax_model.apply, params, cfg)(params, lora, jnp.asarray(TOKENS))) < 1e-6


def test_target_parameters_refusals(checkpoint, tmp_path):
  _, _, params = load_llama(checkpoint)
  cfg = LoraConfig(r=2, targets=["experts/down_proj"], kernel_axes={"experts/down_proj": "sio"}, dropout=0.1)
  lora = random_lora(params, cfg)
  with pytest.raises(ValueError, match="PEFT refuses lora_dropout, use_dora and lora_bias"):
    save_adapter(str(tmp_path / "dropout"), lora, cfg, params, LLAMA_PATH_MAP)
  router = LoraConfig(r=2, targets=["mlp/gate/kernel"], dropout=0.1)  # a parameter too
  with pytest.raises(ValueError, match="target params/model/layers_0/mlp/gate/kernel is the parameter "
                                       r"model.layers.0.mlp.gate.weight \(PEFT's target_parameters\)"):
    save_adapter(str(tmp_path / "router"), random_lora(params, router), router, params, LLAMA_PATH_MAP)
  by_name = LoraConfig(r=2, targets=["experts/down_proj"])  # the name rule's layout: "iio"
  with pytest.raises(ValueError, match="set LoraConfig.kernel_axes to 'sio'"):
    save_adapter(str(tmp_path / "axes"), random_lora(params, by_name), by_name, params, LLAMA_PATH_MAP)
