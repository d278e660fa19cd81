"""What a LoRA step costs, from XLA's compiled cost and memory analyses (no timing).

Each check lowers and compiles (never runs) a training step, so it costs seconds:

- SmolLM2's tied embedding (vocab 49,152, d 576) adapted at all its uses, lookup and head:
  temp memory and FLOPs of the train step against the same step without the embedding targeted;
- kernels stored ``[out, in]`` (ported from PyTorch, used as ``x @ W.T``; an Equinox MLP) and a
  mixture of experts through `lax.ragged_dot`: FLOPs of the LoRA step against the frozen lower
  bound, the model's forward plus its backward to the input activations;
- every zoo model (tests/zoo.py, tests/zoo_frameworks.py): FLOPs of the LoRA step at most the
  merged step's (`lora_transform(mode="reference")`), the cost rule merging where that is cheaper.
"""

from __future__ import annotations

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest

import lorax_jax as lj
import zoo
import zoo_frameworks as zf
from lorax_jax.models.llama import Llama, LlamaConfig

OPT = optax.adam(1e-3)


def _compiled(fn, *args):
  """The compiled executable of ``jax.jit(fn)`` for arguments shaped as ``args``."""
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), args)
  return jax.jit(fn).lower(*shapes).compile()


def _flops(fn, *args) -> float:
  return float(_compiled(fn, *args).cost_analysis()["flops"])


def _lora_step(apply, loss):
  """One optimizer step on the factors: ``loss(apply(params, lora, *x))``, its gradient, Adam."""
  def step(params, lora, opt_state, *x):
    grads = jax.grad(lambda l: loss(apply(params, l, *x)))(lora)
    updates, opt_state = OPT.update(grads, opt_state)
    return optax.apply_updates(lora, updates), opt_state
  return step


def _lora_step_flops(apply_fn, params, cfg, loss, x) -> float:
  lora = lj.init_lora(params, cfg, jax.random.key(1))
  apply = lj.lora_transform(apply_fn, params, cfg, strict=True)
  return _flops(_lora_step(apply, loss), params, lora, OPT.init(lora), x)


def _lower_bound_flops(apply_fn, params, loss, x) -> float:
  """Forward, and backward to the input activations only (what any adapter must at least pay)."""
  return _flops(lambda p, x: jax.grad(lambda x: loss(apply_fn(p, x)))(x), params, x)


def _sin_loss(y):
  return jnp.mean(jnp.sin(y))


SMOLLM2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)


def test_smollm2_tied_embedding_at_all_uses():
  """Adapting the tied embedding (lookup and head) costs ≤ 1.25× temp memory and ≤ 1.02× FLOPs.

  SmolLM2's shape (30 layers, random weights), the main job's batch, rank and q/k/v/o targets.
  The head's branch ``(h·bᵀ)·a`` inherently adds one logits-sized buffer (``B·L·V`` floats, 100 MB:
  a 1-layer model would show 1.47×, the full model 1.12×) and ``3 · 2 · B·L · V · r`` FLOPs.
  """
  model = Llama(SMOLLM2)
  ids = jnp.zeros((8, 64), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), ids)
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def xent(logits):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

  def compiled(targets):
    uses = {"embed_tokens": ("lookup", "matmul")} if "embed_tokens" in targets else {}
    cfg = lj.LoraConfig(r=8, alpha=16, targets=targets, target_uses=uses)
    lora = lj.init_lora(params, cfg, jax.random.key(1))
    apply = lj.lora_transform(model.apply, params, cfg, strict=True)
    return _compiled(_lora_step(apply, xent), params, lora, OPT.init(lora), ids)

  attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
  with_embed = compiled(["embed_tokens", *attention])
  without = compiled(attention)
  temp = with_embed.memory_analysis().temp_size_in_bytes / without.memory_analysis().temp_size_in_bytes
  flops = with_embed.cost_analysis()["flops"] / without.cost_analysis()["flops"]
  assert temp <= 1.25, temp
  assert flops <= 1.02, flops


def _ported_params(key: jax.Array) -> dict:
  """A 256 → 512 → 512 → 256 MLP with PyTorch's ``weight [out, in]``."""
  sizes = [(512, 256), (512, 512), (256, 512)]
  ks = jax.random.split(key, len(sizes))
  return {f"l{i}": {"weight": jax.random.normal(k, s) / s[1] ** 0.5} for i, (k, s) in enumerate(zip(ks, sizes))}


def _ported_mlp(params: dict, x: jax.Array) -> jax.Array:
  for i in range(len(params)):
    x = x @ params[f"l{i}"]["weight"].T
    x = jax.nn.gelu(x) if i < len(params) - 1 else x
  return x


def test_out_in_kernel_used_transposed_near_lower_bound():
  params = _ported_params(jax.random.key(0))
  x = jnp.zeros((256, 256))
  cfg = lj.LoraConfig(r=4, alpha=8, targets=["l0", "l1", "l2"])
  bound = _lower_bound_flops(_ported_mlp, params, _sin_loss, x)
  ratio = _lora_step_flops(_ported_mlp, params, cfg, _sin_loss, x) / bound
  assert ratio <= 1.03, ratio


def test_equinox_mlp_near_lower_bound():
  model = eqx.nn.MLP(256, 256, 512, depth=2, key=jax.random.key(0))
  params, static = eqx.partition(model, eqx.is_array)
  apply_fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)
  x = jnp.zeros((256, 256))
  cfg = lj.LoraConfig(r=4, alpha=8, targets=[r"layers/\d+/weight"])
  bound = _lower_bound_flops(apply_fn, params, _sin_loss, x)
  ratio = _lora_step_flops(apply_fn, params, cfg, _sin_loss, x) / bound
  assert ratio <= 1.03, ratio


def test_ragged_dot_experts_near_lower_bound():
  """All 8 experts (``[E, in, out]`` up and down projections) adapted, no fallback."""
  e, d, f = 8, 256, 512
  ks = jax.random.split(jax.random.key(0), 4)
  params = {"router": jax.random.normal(ks[0], (d, e)) / d ** 0.5,
            "up": jax.random.normal(ks[1], (e, d, f)) / d ** 0.5,
            "down": jax.random.normal(ks[2], (e, f, d)) / f ** 0.5}
  x = jax.random.normal(ks[3], (8, 64, d))
  cfg = lj.LoraConfig(r=4, alpha=8, targets=["up", "down"], kernel_axes={"up|down": "sio"})
  bound = _lower_bound_flops(zf.moe_layer, params, _sin_loss, x)
  ratio = _lora_step_flops(zf.moe_layer, params, cfg, _sin_loss, x) / bound
  assert ratio <= 1.05, ratio


# The zoo, but models with `target_uses` (a tied embedding adapted at some uses: no merged model).
ZOO = [pytest.param(c, id=c.name) for c in zoo.cases() + zf.cases() if not c.cfg.target_uses]


@pytest.mark.parametrize("case", ZOO)
def test_zoo_step_flops_at_most_merged(case):
  """A LoRA train step's compiled FLOPs are at most the merged step's, on every zoo model; the
  uses the cost rule merged (small convolutions) are reported, and nothing else is merged."""
  lora = lj.init_lora(case.params, case.cfg, jax.random.key(1))
  factored = lj.lora_transform(case.apply_fn, case.params, case.cfg)
  merged = lj.lora_transform(case.apply_fn, case.params, case.cfg, mode="reference")
  flops = lambda apply: _flops(_lora_step(apply, zf.sin_loss), case.params, lora, OPT.init(lora), *case.inputs)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # a merged use warns; its report is `fallbacks`
    got = flops(factored)
  assert got <= flops(merged), (got, sorted(factored.fallbacks))
  assert all(", merged: cheaper (factored " in what for _, what in factored.fallbacks), factored.fallbacks
