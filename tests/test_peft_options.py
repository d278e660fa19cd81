"""PEFT options beyond plain LoRA, each both ways against real PEFT (issue 23).

For every option: a PEFT adapter (random factors) loads here with PEFT's outputs, and an adapter
saved here loads in PEFT with no missing or unexpected key, the same outputs, and exactly the
tensor keys of PEFT's own ``get_peft_model_state_dict``.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.torch import load_file

from lorax_jax import LoraConfig, init_lora, lora_transform, merge
from lorax_jax.io import load_adapter, save_adapter
from lorax_jax.models.bert import BERT_PATH_MAP, BertForSequenceClassification, load_bert
from lorax_jax.lora_tree import TOKENS_KEY
from lorax_jax.models.hf import params_from_tensors, tensors_from_params
from lorax_jax.models.llama import LLAMA_PATH_MAP, load_llama
from lorax_jax.pathmap import PathMap
from test_io import random_lora
from test_layers import bert_dir  # noqa: F401 (a fixture: tiny BERT sequence classifier)
from test_peft import tied_llama_dir  # noqa: F401 (a fixture: tiny tied Llama)

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
WEIGHTS = "adapter_model.safetensors"


def max_diff(x, y) -> float:
  return float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))


def randomize(model, seed=0):
  """Every trainable PEFT tensor random (PEFT starts lora_B at zero, copies equal to the base)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in model.named_parameters():
      if p.requires_grad:
        p.add_(0.5 * torch.randn(p.shape, generator=gen))


def peft_loads(base, directory):
  """``base`` with the adapter in ``directory`` loaded by PEFT, checked: no missing adapter key
  (PEFT's warning), no unexpected key, and the file's keys exactly PEFT's own state dict's."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = peft.PeftModel.from_pretrained(base, str(directory)).eval()
  assert not [w for w in caught if "missing adapter keys" in str(w.message)]
  ours = load_file(str(directory / WEIGHTS))
  result = peft.set_peft_model_state_dict(model, ours)
  assert result.unexpected_keys == []
  assert set(ours) == set(peft.get_peft_model_state_dict(model))
  return model


# ---- BERT ---------------------------------------------------------------------------------------

BERT_IDS = np.random.default_rng(0).integers(0, 50, size=(2, 6))


def torch_bert(directory):
  return transformers.BertForSequenceClassification.from_pretrained(directory).eval()


def _bert_logits_torch(model, ids=BERT_IDS):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids), attention_mask=torch.ones(ids.shape)).logits.numpy()


def _bert_logits_jax(bert_dir, params, lora, cfg, ids=BERT_IDS):
  bert_config, _ = load_bert(bert_dir)
  apply_fn = BertForSequenceClassification(bert_config).apply
  ids = jnp.asarray(ids)
  return lora_transform(apply_fn, params, cfg)(params, lora, ids, jnp.ones_like(ids))


def bert_both_ways(tmp_path, bert_dir, peft_cfg, cfg, ids=BERT_IDS):
  """PEFT → here and here → PEFT on the BERT classifier (token ``ids``), each within TOL, each changing
  the logits; returns the config `load_adapter` gave the PEFT adapter."""
  _, params = load_bert(bert_dir)
  bert_logits_torch = functools.partial(_bert_logits_torch, ids=ids)
  bert_logits_jax = functools.partial(_bert_logits_jax, ids=ids)
  plain = bert_logits_torch(torch_bert(bert_dir))
  model = peft.get_peft_model(torch_bert(bert_dir), peft_cfg)
  randomize(model)
  model.save_pretrained(str(tmp_path / "peft"))
  lora, loaded_cfg = load_adapter(str(tmp_path / "peft"), params, BERT_PATH_MAP)
  want = bert_logits_torch(model.eval())
  assert max_diff(bert_logits_jax(bert_dir, params, lora, loaded_cfg), want) < TOL
  assert max_diff(want, plain) > 1e-3

  lora = random_lora(params, cfg)
  save_adapter(str(tmp_path / "ours"), lora, cfg, params, BERT_PATH_MAP)
  model = peft_loads(torch_bert(bert_dir), tmp_path / "ours")
  want = bert_logits_torch(model)
  assert max_diff(bert_logits_jax(bert_dir, params, lora, cfg), want) < TOL
  assert max_diff(want, plain) > 1e-3
  return loaded_cfg


def test_modules_to_save_parent_module(tmp_path, bert_dir):
  """``modules_to_save=["pooler"]`` wraps the whole ``bert.pooler`` (PEFT saves its
  ``dense.weight``/``.bias``). Before: refused as unexpected keys."""
  cfg = bert_both_ways(tmp_path, bert_dir,
                       peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query"], modules_to_save=["pooler"]),
                       LoraConfig(r=4, alpha=8, targets=["query"], modules_to_save=["pooler"]))
  assert cfg.modules_to_save is not None


def test_rank_above_the_smaller_dimension(tmp_path, bert_dir):
  """``rank_pattern`` rank 40 on the 32×32 query (PEFT accepts it; ``ΔW = s·B@A`` still holds).
  Before: refused as a rank exceeding the input size."""
  bert_both_ways(tmp_path, bert_dir,
                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], rank_pattern={"query": 40}),
                 LoraConfig(r=4, alpha=8, targets=["query", "value"], rank_pattern={"query": 40}))


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_trained_biases(tmp_path, bert_dir, bias):
  """``bias="lora_only"`` trains the adapted layers' biases (PEFT saves ``<m>.base_layer.bias``),
  ``"all"`` every bias (LayerNorms and the classifier too). Before: refused."""
  cfg = bert_both_ways(tmp_path, bert_dir,
                       peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], bias=bias),
                       LoraConfig(r=4, alpha=8, targets=["query", "value"], bias=bias))
  assert cfg.bias == bias


def test_lora_bias(tmp_path, bert_dir):
  """``lora_bias=True``: PEFT's ``lora_B`` has a bias ``c`` and the layer adds ``s·(B(A x) + c)``;
  here ``s·c`` adds to the frozen bias. Checked against PEFT both ways and against `merge`. Before: refused."""
  cfg = LoraConfig(r=4, alpha=8, targets=["query", "value"], lora_bias=True)
  loaded = bert_both_ways(tmp_path, bert_dir,
                          peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_bias=True), cfg)
  assert loaded.lora_bias
  _, params = load_bert(bert_dir)
  lora = random_lora(params, cfg)
  bert_config, _ = load_bert(bert_dir)
  ids = jnp.asarray(BERT_IDS)
  merged = BertForSequenceClassification(bert_config).apply(merge(params, lora, cfg), ids, jnp.ones_like(ids))
  assert max_diff(_bert_logits_jax(bert_dir, params, lora, cfg), merged) < TOL


# ---- GPT-2's Conv1D (fan_in_fan_out) ---------------------------------------------------------------

class TorchConv1DNet(torch.nn.Module):
  """Two transformers ``Conv1D`` layers (weights stored ``[in, out]``, as GPT-2's) and a Linear."""

  def __init__(self):
    super().__init__()
    from transformers.pytorch_utils import Conv1D
    self.c_attn, self.c_proj = Conv1D(12, 8), Conv1D(8, 12)  # Conv1D(nf=out, nx=in)
    self.head = torch.nn.Linear(8, 5)

  def forward(self, x):
    return self.head(x + self.c_proj(torch.tanh(self.c_attn(x))))


def conv1d_net(p, x):
  """`TorchConv1DNet` in JAX, kernels ``[in, out]``."""
  dense = lambda name, h: h @ p["params"][name]["kernel"] + p["params"][name]["bias"]
  return dense("head", x + dense("c_proj", jnp.tanh(dense("c_attn", x))))


CONV1D_MAP = PathMap(tuple((f"params/{n}/kernel", f"{n}.weight", "conv1d") for n in ("c_attn", "c_proj"))
                     + (("params/head/kernel", "head.weight", "linear"),)
                     + tuple((f"params/{n}/bias", f"{n}.bias", "param") for n in ("c_attn", "c_proj", "head")))


def test_fan_in_fan_out_conv1d(tmp_path):
  """PEFT's ``fan_in_fan_out=True`` on ``Conv1D`` layers (``lora_A [r, in]``, ``lora_B [out, r]`` as for a
  Linear; the delta transposed onto the ``[in, out]`` weight): path-map kind ``"conv1d"``. Before: refused."""
  torch.manual_seed(0)
  base = TorchConv1DNet().eval()
  weights = {k: v.detach().numpy().copy() for k, v in base.state_dict().items()}
  params = params_from_tensors(weights, CONV1D_MAP)
  x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
  run_torch = lambda m: m(torch.from_numpy(x)).detach().numpy()
  fresh = lambda: _loaded(weights)
  model = peft.get_peft_model(fresh(), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_proj"],
                                                       fan_in_fan_out=True))
  randomize(model)
  model.save_pretrained(str(tmp_path / "peft"))
  lora, cfg = load_adapter(str(tmp_path / "peft"), params, CONV1D_MAP)
  want = run_torch(model.eval())
  assert max_diff(lora_transform(conv1d_net, params, cfg)(params, lora, jnp.asarray(x)), want) < TOL
  assert max_diff(want, run_torch(base)) > 1e-2

  cfg = LoraConfig(r=3, alpha=6, targets=["c_attn", "c_proj", "head"], rank_pattern={"c_proj": 2})
  lora = random_lora(params, cfg)
  save_adapter(str(tmp_path / "ours"), lora, cfg, params, CONV1D_MAP)
  model = peft_loads(fresh(), tmp_path / "ours")
  want = run_torch(model)
  assert max_diff(lora_transform(conv1d_net, params, cfg)(params, lora, jnp.asarray(x)), want) < TOL
  assert max_diff(want, run_torch(base)) > 1e-2
  merged = tensors_from_params(merge(params, lora, cfg), CONV1D_MAP)
  for k, v in model.merge_and_unload().state_dict().items():
    assert max_diff(merged[k], v.numpy()) < 1e-5, k


def _loaded(weights):
  model = TorchConv1DNet().eval()
  model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
  return model


# ---- trainable tokens ---------------------------------------------------------------------------

def test_trainable_tokens_bert(tmp_path, bert_dir):
  """``trainable_token_indices=[3, 5]`` (PEFT 0.15): those rows of the word embeddings trained in full
  (PEFT saves ``...word_embeddings.token_adapter.trainable_tokens_delta``). Before: refused."""
  ids = BERT_IDS.copy()
  ids[:, :2] = [3, 5]  # the trained rows are looked up
  cfg = LoraConfig(r=4, alpha=8, targets=["query"], trainable_token_indices={"word_embeddings": (3, 5)})
  loaded = bert_both_ways(tmp_path, bert_dir,
                          peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query"], trainable_token_indices=[3, 5]),
                          cfg, ids)
  assert list(loaded.trainable_token_indices.values()) == [(3, 5)]


def test_trainable_tokens_with_a_tied_head(tmp_path, tied_llama_dir):
  """On a tied Llama PEFT ties the head to the token adapter: the trained rows reach the lookup and
  the head; here the table's rows are replaced at both uses. Both ways."""
  tokens = np.array([[1, 7, 9, 2, 7], [9, 3, 1, 1, 4]])
  torch_model = lambda: transformers.LlamaForCausalLM.from_pretrained(tied_llama_dir).eval()
  logits = lambda m: m(torch.from_numpy(tokens)).logits.detach().numpy()
  _, flax_model, params = load_llama(tied_llama_dir)
  ours = lambda lora, cfg: lora_transform(flax_model.apply, params, cfg)(params, lora, jnp.asarray(tokens))
  model = peft.get_peft_model(torch_model(), peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                             target_modules=["q_proj"], trainable_token_indices=[7, 9]))
  randomize(model)
  model.save_pretrained(str(tmp_path / "peft"))
  lora, cfg = load_adapter(str(tmp_path / "peft"), params, LLAMA_PATH_MAP)
  assert max_diff(ours(lora, cfg), logits(model)) < TOL

  cfg = LoraConfig(r=4, alpha=8, targets=["q_proj"], trainable_token_indices={"embed_tokens": (7, 9)})
  lora = random_lora(params, cfg)
  save_adapter(str(tmp_path / "ours"), lora, cfg, params, LLAMA_PATH_MAP, task_type="CAUSAL_LM")
  model = peft_loads(torch_model(), tmp_path / "ours")
  want = logits(model)
  assert max_diff(ours(lora, cfg), want) < TOL
  untouched = lora | {TOKENS_KEY: init_lora(params, cfg, jax.random.key(0))[TOKENS_KEY]}
  assert max_diff(ours(untouched, cfg)[..., [7, 9]], want[..., [7, 9]]) > 1e-2  # the head sees the rows


def test_layer_replication_refused_with_its_reason(tmp_path, tied_llama_dir):
  """PEFT's layer_replication adapter names layers the checkpoint does not have: refused, saying why."""
  base = transformers.LlamaForCausalLM.from_pretrained(tied_llama_dir).eval()
  model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"], layer_replication=[[0, 2], [1, 2]]))
  model.save_pretrained(str(tmp_path))
  _, _, params = load_llama(tied_llama_dir)
  with pytest.raises(ValueError, match=r"layer_replication=\[\[0, 2\], \[1, 2\]\].*never adds layers"):
    load_adapter(str(tmp_path), params, LLAMA_PATH_MAP)
