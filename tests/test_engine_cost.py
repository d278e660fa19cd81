"""What a LoRA step costs, from XLA's compiled cost and memory analyses (no timing).

Each check lowers and compiles (never runs) a training step, so it costs seconds:

- SmolLM2's tied embedding (vocab 49,152, d 576) adapted at all its uses, lookup and head:
  temp memory and FLOPs of the train step against the same step without the embedding targeted;
- kernels stored ``[out, in]`` (ported from PyTorch, used as ``x @ W.T``; an Equinox MLP) and a
  mixture of experts through `lax.ragged_dot`: FLOPs of the LoRA step against the frozen lower
  bound, the model's forward plus its backward to the input activations;
- every zoo model (tests/zoo.py, tests/zoo_frameworks.py): FLOPs of the LoRA step at most the
  merged step's (`lora_transform(mode="reference")`), the cost rule merging where that is cheaper
  (the LSTMs' gate kernels, read at every step of `nn.RNN`'s scan, merged once before it).

And the cost rule in a loop, without compiling: a scan's constant kernel merged once before the
scan, or kept factored, as the loop formula (written out here) says; outputs and gradients
against `zoo_frameworks.hand_merge`.
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


# The cost rule in a loop: a kernel the scan reads unchanged, costed over all its iterations.
BATCH = 4


def _rnn(params, xs):
  """``h ← tanh(h·W + x_t)`` over ``xs [length, batch, d]``, ``W`` a constant of the scan."""
  def step(h, x):
    h = jnp.tanh(h @ params["w"] + x)
    return h, h
  return jax.lax.scan(step, jnp.zeros_like(xs[0]), xs)[1]


def _nested_rnn(params, xs):
  """The same recurrence over ``xs [outer, inner, batch, d]``: a scan of scans, ``W`` a constant of both."""
  return jax.lax.scan(lambda h, chunk: (_rnn_from(params, h, chunk), None), jnp.zeros_like(xs[0, 0]), xs)[0]


def _rnn_from(params, h, xs):
  return jax.lax.scan(lambda h, x: (jnp.tanh(h @ params["w"] + x), None), h, xs)[0]


def _loop_cost(trips: int, d: int) -> tuple[int, int]:
  """docs/engine.md's cost rule for a loop, written out for `_rnn`'s one use of ``W [d, d]``:
  (factored, merged) FLOPs over ``trips`` iterations, ``W'`` formed once."""
  r = zf.R
  branch = 2 * BATCH * d * r + 2 * BATCH * r * d
  return trips * 3 * branch, trips * 2 * BATCH * d * d + 6 * r * d * d


def _scan_level(jaxpr):
  """The (nested jit's) jaxpr holding the outermost scan, and that scan's equation."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      return jaxpr, eqn
    if eqn.primitive.name in ("pjit", "jit"):
      found = _scan_level(eqn.params["jaxpr"].jaxpr)
      if found:
        return found
  return None


def _loop_case(model, d: int, shape: tuple[int, ...], **config) -> tuple[zf.Case, object]:
  ks = jax.random.split(jax.random.key(0), 2)
  params = {"w": jax.random.normal(ks[0], (d, d)) / d ** 0.5}
  case = zf.Case("loop", model, params, (jax.random.normal(ks[1], (*shape, BATCH, d)),), dict(targets=["w"], **config))
  return case, zoo.random_factors(params, case.cfg)


def _check_exact(case: zf.Case, apply, lora) -> None:
  """Outputs and LoRA gradients equal the hand-merged model's (1e-5)."""
  merged = lambda l: case.apply_fn(zf.hand_merge(case, l), *case.inputs)
  zoo.close(apply(case.params, lora, *case.inputs), merged(lora))
  zoo.close(jax.grad(lambda l: zf.sin_loss(apply(case.params, l, *case.inputs)))(lora),
            jax.grad(lambda l: zf.sin_loss(merged(l)))(lora))


@pytest.mark.parametrize("model,shape", [(_rnn, (8,)), (_nested_rnn, (2, 4))], ids=["scan", "scan_of_scans"])
def test_loop_invariant_kernel_merged_once_before_the_scan(model, shape):
  """``W [8, 8]`` (r 2) read at every one of 8 iterations: per iteration its branch costs more
  than its use (``3·branch > use``) but less than forming and differentiating ``W'``, so the
  per-use rule would keep it factored at any length; over 8 iterations ``W'`` formed once is
  cheaper. The merge is before the scan (the scan gets ``W'``, not the factors; a scan of scans
  counts 2 × 4 iterations), reported with the loop's numbers, and exact."""
  d = 8
  case, lora = _loop_case(model, d, shape)
  apply = lj.lora_transform(case.apply_fn, case.params, case.cfg)
  with pytest.warns(UserWarning, match="merged: cheaper"):
    _check_exact(case, apply, lora)
  factored, merged = _loop_cost(8, d)
  assert merged < factored
  assert apply.fallbacks == {("w", f"dot_general in a scan of length {shape[0]} (W' formed once, before it), "
                                   f"merged: cheaper (factored {factored} FLOPs > merged {merged})")}
  level, scan = _scan_level(jax.make_jaxpr(lambda l: apply(case.params, l, *case.inputs))(lora).jaxpr)
  before = level.eqns[:level.eqns.index(scan)]
  assert any(e.primitive.name == "dot_general" and e.outvars[0].aval.shape == (d, d)
             and [v.aval.shape for v in e.invars] == [(zf.R, d), (zf.R, d)] for e in before)  # Σ_r a ⊗ b
  assert (d, d) in [v.aval.shape for v in scan.invars] and (zf.R, d) not in [v.aval.shape for v in scan.invars]
  # Never under strict, nor with dropout active.
  for kwargs, cfg in (({}, case.cfg), ({"rng": jax.random.key(2)}, lj.LoraConfig(r=zf.R, targets=["w"], dropout=0.1))):
    kept = lj.lora_transform(case.apply_fn, case.params, cfg, strict=not kwargs)
    kept(case.params, lora, *case.inputs, **kwargs)
    assert kept.fallbacks == set()


@pytest.mark.parametrize("length,d", [(2, 8), (32, 32)])
def test_loop_kernel_stays_factored_where_the_loop_costs_less_so(length, d):
  """The decision follows the loop formula: ``W [8, 8]`` over 2 iterations (``W'``'s cost not
  repaid: factored, where 8 iterations merge it) and ``W [32, 32]`` (r 2) over 32, whose branch
  is cheaper than its use at every iteration (factored at any length). The factors enter the
  scan; exact."""
  case, lora = _loop_case(_rnn, d, (length,))
  factored, merged = _loop_cost(length, d)
  assert factored <= merged
  apply = lj.lora_transform(case.apply_fn, case.params, case.cfg)
  _check_exact(case, apply, lora)
  assert apply.fallbacks == set()
  _, scan = _scan_level(jax.make_jaxpr(lambda l: apply(case.params, l, *case.inputs))(lora).jaxpr)
  assert (zf.R, d) in [v.aval.shape for v in scan.invars]
