"""Hot swap without recompiling, against PEFT's `hotswap_adapter` on a compiled-hotswap-ready model.

One adapter is stacked alone (``k = 1``) at rank 16, a jitted forward and a jitted training step
take the stacked tree as an argument and run it through `take_adapter`, and `swap_adapter` puts
in PEFT adapters (saved by PEFT, loaded with `load_adapter`) of ranks (q_proj, v_proj) = (11, 11),
(7, 13), (13, 7) and other alphas. Each swap must reuse the compiled step (a trace counter and
``_cache_size``) and give PEFT's logits and LoRA gradients after ``hotswap_adapter`` on the model
``prepare_model_for_compiled_hotswap(model, target_rank=16)`` padded.

PEFT 0.21.2's ``hotswap_adapter`` resolves ``rank_pattern``/``alpha_pattern`` against the
parameter's name (``…v_proj.lora_A.default.weight``), which no pattern matches, so it scales
pattern modules by ``lora_alpha / r`` (huggingface/peft#3738, fixed by #3752). `peft_hotswap`
applies that fix (each module's scale from its module name, as PEFT's own loading does), and the
swapped PEFT model is checked against the same adapter loaded fresh by ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lorax_jax import (LoraConfig, find_targets, init_lora, load_adapter, lora_transform, per_adapter, stack_adapters,
                       swap_adapter, take_adapter)
from lorax_jax.models.llama import LLAMA_PATH_MAP, load_llama
from lorax_jax.paths import get_path
from test_peft import LLAMA_TOKENS, llama_dir, max_diff, randomize_lora, torch_llama, torch_logits  # noqa: F401

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from peft.utils.hotswap import _update_scaling, hotswap_adapter, prepare_model_for_compiled_hotswap  # noqa: E402
from peft.utils.other import get_pattern_key  # noqa: E402

TOL = 1e-4
PADDED = 16
FIRST = dict(r=4, lora_alpha=8)  # the adapter loaded first, then swapped out
SWAPS = {  # (q_proj, v_proj) ranks: PEFT kwargs, each with its own alpha
    "11-11": dict(r=11, lora_alpha=5),
    "7-13": dict(r=7, lora_alpha=9, rank_pattern={"v_proj": 13}),
    "13-7": dict(r=13, lora_alpha=3, rank_pattern={"v_proj": 7}),
}
WEIGHTS = np.random.default_rng(2).normal(size=(*LLAMA_TOKENS.shape, 64)).astype(np.float32)  # loss = Σ logits·W


@pytest.fixture(scope="module")
def adapters(llama_dir, tmp_path_factory):
  """``{name: directory}`` of PEFT adapters of q_proj and v_proj, saved by PEFT."""
  root = tmp_path_factory.mktemp("hotswap")
  out = {}
  for seed, (name, kwargs) in enumerate({"first": FIRST, **SWAPS}.items()):
    model = peft.get_peft_model(torch_llama(llama_dir), peft.LoraConfig(task_type="CAUSAL_LM",
                                                                        target_modules=["q_proj", "v_proj"], **kwargs))
    randomize_lora(model, seed)
    out[name] = str(root / name)
    model.save_pretrained(out[name])
  return out


def peft_hotswap(model, directory: str) -> None:
  """``hotswap_adapter``, then each module's scale resolved from its module name (PEFT#3738's fix)."""
  hotswap_adapter(model, directory, adapter_name="default", torch_device="cpu")
  cfg = peft.LoraConfig.from_pretrained(directory)
  for name, module in model.named_modules():
    if isinstance(module, peft.tuners.lora.LoraLayer):
      key = name.removeprefix("base_model.model.")
      r = cfg.rank_pattern.get(get_pattern_key(cfg.rank_pattern.keys(), key), cfg.r)
      alpha = cfg.alpha_pattern.get(get_pattern_key(cfg.alpha_pattern.keys(), key), cfg.lora_alpha)
      _update_scaling(module, "default", alpha / r)


def peft_grads(model, params, cfg) -> dict:
  """PEFT's gradient of ``Σ logits · WEIGHTS`` w.r.t. its padded factors, as ``{path: (a, b)}`` in
  our layout (``a`` ``[r, in]``, ``b`` ``[r, out]``)."""
  model.zero_grad()
  (model(torch.from_numpy(LLAMA_TOKENS)).logits * torch.from_numpy(WEIGHTS)).sum().backward()
  modules = dict(model.named_modules())
  out = {}
  for path, t in find_targets(params, cfg).items():
    module = modules["base_model.model." + LLAMA_PATH_MAP.to_hf(t.name)[0].removesuffix(".weight")]
    out[path] = (module.lora_A["default"].weight.grad.numpy(), module.lora_B["default"].weight.grad.numpy().T)
  return out


@pytest.fixture(scope="module")
def hot(llama_dir, adapters):
  """Our side: the first adapter stacked at rank 16, and a jitted forward and training step of the
  stacked tree, each counting its traces."""
  _, flax_model, params = load_llama(llama_dir)
  stacked, cfg = stack_adapters(params, [load_adapter(adapters["first"], params, LLAMA_PATH_MAP)], max_rank=PADDED)
  apply = lora_transform(flax_model.apply, params, cfg)
  tx = per_adapter(optax.adam(1e-2))
  traces = {"forward": 0, "step": 0}

  @jax.jit
  def forward(params, stacked, tokens):
    traces["forward"] += 1
    return apply(params, take_adapter(stacked, 0), tokens)

  @jax.jit
  def step(params, stacked, opt_state, tokens, weights):
    traces["step"] += 1
    loss = lambda s: jnp.sum(apply(params, take_adapter(s, 0), tokens) * weights)
    grads = jax.grad(loss)(stacked)
    updates, opt_state = tx.update(grads, opt_state, stacked)
    return optax.apply_updates(stacked, updates), opt_state, grads

  return params, stacked, cfg, tx, forward, step, traces


def test_hot_swap_matches_peft_and_traces_once(llama_dir, adapters, hot):
  params, stacked, cfg, tx, forward, step, traces = hot
  tokens, weights = jnp.asarray(LLAMA_TOKENS), jnp.asarray(WEIGHTS)
  model = peft.PeftModel.from_pretrained(torch_llama(llama_dir), adapters["first"], is_trainable=True).eval()
  prepare_model_for_compiled_hotswap(model, target_rank=PADDED)
  assert max_diff(forward(params, stacked, tokens), torch_logits(model, LLAMA_TOKENS)) < TOL
  step(params, stacked, tx.init(stacked), tokens, weights)
  for name, kwargs in SWAPS.items():
    lora, lora_cfg = load_adapter(adapters[name], params, LLAMA_PATH_MAP)
    ranks = {t.name.split("/")[-2]: t.rank for t in find_targets(params, lora_cfg).values()}
    assert ranks == dict(zip(("q_proj", "v_proj"), map(int, name.split("-")))), ranks
    stacked = swap_adapter(params, stacked, 0, lora, lora_cfg)
    peft_hotswap(model, adapters[name])
    fresh = torch_logits(peft.PeftModel.from_pretrained(torch_llama(llama_dir), adapters[name]).eval(), LLAMA_TOKENS)
    want = torch_logits(model, LLAMA_TOKENS)
    assert max_diff(want, fresh) < 1e-5, name  # the reference: PEFT's swapped model is the adapter's own
    assert max_diff(forward(params, stacked, tokens), want) < TOL, name

    trained, _, grads = jax.tree.map(np.asarray, step(params, stacked, tx.init(stacked), tokens, weights))
    for path, (a, b) in peft_grads(model, params, cfg).items():
      node, t = get_path(grads, path), find_targets(params, lora_cfg)[path]
      np.testing.assert_allclose(node["a"][0], a, rtol=TOL, atol=TOL, err_msg=f"{name} {t.name}")
      np.testing.assert_allclose(node["b"][0], b, rtol=TOL, atol=TOL, err_msg=f"{name} {t.name}")
      assert not node["scale"].any()
      for k in ("a", "b"):  # padded rows: no gradient, and still zero after the update
        assert not node[k][0, t.rank:].any() and not get_path(trained, path)[k][0, t.rank:].any(), (name, t.name, k)
  assert traces == {"forward": 1, "step": 1}
  assert forward._cache_size() == 1 and step._cache_size() == 1


def test_hot_swap_refuses_a_larger_rank_or_other_modules(hot):
  params, stacked, *_ = hot
  big = LoraConfig(r=8, alpha=8, targets=["q_proj", "v_proj"], rank_pattern={"layers_1/self_attn/q_proj": 17})
  with pytest.raises(ValueError, match=r"swap_adapter: the new adapter has rank 17 at "
                                       r"params/model/layers_1/self_attn/q_proj/kernel, above the stacked tree's "
                                       r"padded rank 16"):
    swap_adapter(params, stacked, 0, init_lora(params, big, jax.random.key(0)), big)
  other = LoraConfig(r=4, alpha=8, targets=["q_proj", "k_proj"])
  with pytest.raises(ValueError, match=r"the new adapter adapts params/model/layers_0/self_attn/k_proj/kernel "
                                       r"\(rank 4\), .*the stacked tree does not; the stacked tree adapts "
                                       r"params/model/layers_0/self_attn/v_proj/kernel, .*the new adapter does not"):
    swap_adapter(params, stacked, 0, init_lora(params, other, jax.random.key(0)), other)
