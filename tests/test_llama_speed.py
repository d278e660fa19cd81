"""`causal_lm_loss_sums`: its work-saving options give the plain loss and LoRA gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_jax
from lorax_jax.models.causal_lm import causal_lm_loss_sums, max_targets_per_batch
from lorax_jax.models.llama import stack_config, stack_layers, unstack_layers
from tests.test_llama import tiny

PREFIX = 9  # shared input tokens; the 10th token of each row is its first target


def chat_batch(vocab: int, batch: int = 4, length: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Rows ``[batch, length + 1]``: one prompt of ``PREFIX + 1`` tokens, answers of several lengths
  (weights 1 on the answer), then padding (weight 0), like a chat fine-tune's batch."""
  rng = np.random.default_rng(seed)
  prompt = rng.integers(1, vocab, PREFIX + 1)
  tokens = rng.integers(1, vocab, (batch, length + 1)).astype(np.int32)
  tokens[:, :PREFIX + 1] = prompt
  weights = np.zeros((batch, length + 1), np.float32)
  for b, end in enumerate(np.linspace(PREFIX + 3, length + 1, batch).astype(int)):
    weights[b, PREFIX + 1:end] = 1.0
    tokens[b, end:] = 0
  return tokens, weights


def plain_loss_sums(lora_apply, params, lora, tokens, weights):
  """The reference: logits everywhere, log-softmax written out, weighted."""
  logits = lora_apply(params, lora, tokens[:, :-1]).astype(jnp.float32)
  logp = logits - jax.scipy.special.logsumexp(logits, axis=-1, keepdims=True)
  ce = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum(ce * weights[:, 1:]), jnp.sum(weights[:, 1:])


def setup(tied: bool):
  model, params = tiny(tied)
  cfg = lorax_jax.LoraConfig(r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
  lora = lorax_jax.init_lora(params, cfg, jax.random.key(1))
  lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(x.size), x.shape), lora)
  return model, params, cfg, lora


def loss_and_grads(loss_sums, params, lora, tokens, weights):
  def mean(lo):
    total, count = loss_sums(params, lo, tokens, weights)
    return total / count
  return jax.jit(jax.value_and_grad(mean))(lora)


@pytest.mark.parametrize("tied", [False, True])
def test_options_equal_the_plain_loss_and_lora_grads(tied):
  model, params, cfg, lora = setup(tied)
  tokens, weights = chat_batch(model.config.vocab_size)
  k = max_targets_per_batch(weights, len(tokens))
  lora_apply = lorax_jax.lora_transform(model.apply, params, cfg)
  merged = lorax_jax.lora_transform(model.apply, params, cfg, mode="reference")
  want_loss, want_grads = loss_and_grads(lambda p, lo, t, w: plain_loss_sums(merged, p, lo, t, w),
                                         params, lora, tokens, weights)
  for prefix_len, max_targets in [(0, None), (0, k), (PREFIX, None), (PREFIX, k), (PREFIX - 3, 10 * k)]:
    got_loss, got_grads = loss_and_grads(
        lambda p, lo, t, w: causal_lm_loss_sums(lora_apply, p, lo, t, w, prefix_len=prefix_len,
                                                max_targets=max_targets),
        params, lora, tokens, weights)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, err_msg=f"{prefix_len=} {max_targets=}")
    for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(want))),
                                 err_msg=f"{prefix_len=} {max_targets=}")


def scanned_setup(model, params, cfg, lora):
  """The scanned model, its stacked params, the config for them and the stacked LoRA."""
  return model.clone(scan_layers=True), stack_layers(params), stack_config(cfg, params), stack_layers(lora)


def test_scanned_layers_equal_the_unrolled_model():
  """``scan_layers`` on the stacked params: the logits, cached decoding, loss and LoRA gradients
  (also with the work-saving options) of the unrolled layers on the per-layer params."""
  model, params, cfg, lora = setup(False)
  tokens, weights = chat_batch(model.config.vocab_size)
  scanned, stacked, stacked_cfg, stacked_lora = scanned_setup(model, params, cfg, lora)
  # The layouts `axes_from_use` reads off the scanned model's uses.
  assert stacked_cfg.kernel_axes == lorax_jax.axes_from_use(scanned.apply, stacked, cfg, tokens).kernel_axes
  np.testing.assert_allclose(scanned.apply(stacked, tokens), model.apply(params, tokens), atol=1e-5)
  for m, p in ((model, params), (scanned, stacked)):
    cache = m.init_cache(len(tokens), tokens.shape[1])
    _, cache = m.apply(p, tokens[:, :PREFIX], cache=cache)
    got, _ = m.apply(p, tokens[:, PREFIX:PREFIX + 1], cache=cache)
    np.testing.assert_allclose(got[:, 0], model.apply(params, tokens[:, :PREFIX + 1])[:, -1], atol=1e-5)
  k = max_targets_per_batch(weights, len(tokens))
  results = []
  for m, p, c, lo in ((model, params, cfg, lora), (scanned, stacked, stacked_cfg, stacked_lora)):
    lora_apply = lorax_jax.lora_transform(m.apply, p, c, strict=True)
    results.append(loss_and_grads(
        lambda p, lo, t, w: causal_lm_loss_sums(lora_apply, p, lo, t, w, prefix_len=PREFIX, max_targets=k),
        p, lo, tokens, weights))
  (want_loss, want_grads), (got_loss, got_grads) = results
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  got_grads = unstack_layers(got_grads)
  assert jax.tree.structure(got_grads) == jax.tree.structure(want_grads)
  for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(want))))


def test_stack_layers_round_trips_and_lays_out_layer_i_at_slice_i():
  model, params, cfg, lora = setup(False)
  n = model.config.num_hidden_layers
  for tree in (params, lora, model.init_cache(2, 8)):
    stacked = stack_layers(tree)
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(stacked), tree)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(stacked)]
    assert paths and not any("layers_" in p for p in paths)
  stacked = stack_layers(lora)["params"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
  for i in range(n):
    layer = lora["params"]["model"][f"layers_{i}"]["self_attn"]["q_proj"]["kernel"]
    for side in ("a", "b"):
      np.testing.assert_array_equal(stacked[side][i], layer[side])
  # A quantized base stacks its stored blocks: dequantizing commutes with stacking.
  q = lorax_jax.quantize(params, "nf4", block_size=16)
  up = lambda tree: tree["params"]["model"]["layers"]["mlp"]["up_proj"]["kernel"]
  np.testing.assert_array_equal(up(lorax_jax.dequantize(stack_layers(q))),
                                up(stack_layers(lorax_jax.dequantize(q))))
  jax.tree.map(np.testing.assert_array_equal, lorax_jax.dequantize(unstack_layers(stack_layers(q))),
               lorax_jax.dequantize(q))


@pytest.mark.parametrize("variant", ["nf4", "dora"])
def test_scanned_quantized_or_dora_equals_the_unrolled_model(variant):
  """A quantized base (QLoRA: stacked with its stored blocks) or DoRA (its magnitudes stacked):
  the unrolled model's loss (strict: the engine follows both into the scan, no fallback)."""
  model, params, cfg, lora = setup(False)
  if variant == "nf4":
    params = lorax_jax.quantize(params, "nf4", block_size=16)
  else:
    cfg = cfg.replace(use_dora=True)
    lora = jax.tree.map(lambda x: x + 0.05, lorax_jax.init_lora(params, cfg, jax.random.key(1)))
  tokens, weights = chat_batch(model.config.vocab_size)
  losses = []
  for m, p, c, lo in ((model, params, cfg, lora), scanned_setup(model, params, cfg, lora)):
    f = lorax_jax.lora_transform(m.apply, p, c, strict=True)
    loss = lambda lo, p, f=f: causal_lm_loss_sums(f, p, lo, tokens, weights, prefix_len=PREFIX)
    losses.append(jax.jit(loss)(lo, p))
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6)


def test_wrong_layer_layout_is_an_error_naming_the_helper():
  model, params, cfg, _ = setup(False)
  with pytest.raises(ValueError, match="layers_to_transform=1 .*without scan_layers"):
    stack_config(cfg.replace(layers_to_transform=1), params)
  tokens = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError, match=r"stack_layers\(params\)"):
    model.clone(scan_layers=True).apply(params, tokens)
  with pytest.raises(ValueError, match=r"unstack_layers\(params\)"):
    model.apply(stack_layers(params), tokens)
  broken = jax.tree.map(lambda x: x, params)
  broken["params"]["model"]["layers_1"]["mlp"]["up_proj"]["kernel"] = jnp.zeros((3, 3))
  with pytest.raises(ValueError, match=r"'mlp'\]\['up_proj'\]\['kernel'\].*differ in shape"):
    stack_layers(broken)
  del broken["params"]["model"]["layers_0"]
  with pytest.raises(ValueError, match=r"not numbered 0\.\."):
    stack_layers(broken)


@pytest.mark.parametrize("scan", [False, True])
def test_remat_gives_the_same_loss_and_grads(scan):
  """``remat``: each layer recomputed in the backward pass from its input: the loss and LoRA
  gradients of the model without it; with ``scan_layers``, less temp memory in the compiled step
  (XLA's count; unrolled, XLA's CPU backend schedules the recomputation early and saves ~5%)."""
  model, params, cfg, lora = setup(False)
  tokens, weights = chat_batch(model.config.vocab_size, batch=8, length=48)
  if scan:
    model, params, cfg, lora = scanned_setup(model, params, cfg, lora)
  results, temps = [], []
  for m in (model, model.clone(remat=True)):
    lora_apply = lorax_jax.lora_transform(m.apply, params, cfg, strict=True)
    loss_sums = lambda p, lo, t, w, f=lora_apply: causal_lm_loss_sums(f, p, lo, t, w)
    results.append(loss_and_grads(loss_sums, params, lora, tokens, weights))
    step = jax.jit(jax.grad(lambda lo, f=loss_sums: f(params, lo, tokens, weights)[0]))
    temps.append(step.lower(lora).compile().memory_analysis().temp_size_in_bytes)
  (want_loss, want_grads), (got_loss, got_grads) = results
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(want))))
  if scan:
    assert temps[1] < 0.6 * temps[0], temps


@pytest.mark.parametrize("scan, remat", [(False, False), (True, False), (True, True), (False, True)])
def test_after_prefix_is_the_hidden_state_of_each_whole_row(scan, remat):
  """``Llama.after_prefix(prefix, rows)``: each row's hidden states as `Llama.hidden` gives them for
  the prefix followed by that row (a reference computed row by row, without LoRA's engine), through
  the engine with LoRA, for the unrolled and scanned layers, with and without remat."""
  model, params, cfg, lora = setup(False)
  tokens, _ = chat_batch(model.config.vocab_size)
  reference = lorax_jax.merge(params, lora, cfg)
  want = np.stack([model.apply(reference, row[None], method="hidden")[0][0, PREFIX:] for row in tokens])
  if scan:
    model, params, cfg, lora = scanned_setup(model, params, cfg, lora)
  model = model.clone(remat=remat)
  apply = lorax_jax.lora_transform(model.apply, params, cfg, strict=True)
  got = apply(params, lora, tokens[:1, :PREFIX], tokens[:, PREFIX:], method="after_prefix")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"prefix \[1, P\].*\(2, 9\)"):
    apply(params, lora, tokens[:2, :PREFIX], tokens[:, PREFIX:], method="after_prefix")


def test_broken_preconditions_give_nan_loss_and_grads():
  model, params, cfg, lora = setup(False)
  lora_apply = lorax_jax.lora_transform(model.apply, params, cfg)
  for break_what in ("prompt", "weight", "targets"):
    tokens, weights = chat_batch(model.config.vocab_size)
    k = max_targets_per_batch(weights, len(tokens))
    if break_what == "prompt":
      tokens[2, 3] += 1
    elif break_what == "weight":
      weights[1, PREFIX] = 1.0  # the prefix's last prediction would count
    else:
      k -= 1
    loss, grads = loss_and_grads(
        lambda p, lo, t, w: causal_lm_loss_sums(lora_apply, p, lo, t, w, prefix_len=PREFIX, max_targets=k),
        params, lora, tokens, weights)
    assert np.isnan(loss) and all(np.isnan(g).all() for g in jax.tree.leaves(grads)), break_what


def test_counts_and_bad_options():
  weights = np.zeros((5, 8), np.float32)
  weights[:, 0] = 1.0  # weights[:, 0] is no target
  weights[np.arange(5), 1 + np.arange(5)] = 1.0
  weights[4, 1:] = 1.0
  assert max_targets_per_batch(weights, 2) == 7 + 1
  model, params, cfg, lora = setup(False)
  tokens, w = chat_batch(model.config.vocab_size)
  lora_apply = lorax_jax.lora_transform(model.apply, params, cfg)
  with pytest.raises(ValueError, match="prefix_len=24"):
    causal_lm_loss_sums(lora_apply, params, lora, tokens, w, prefix_len=24)
  with pytest.raises(ValueError, match="max_targets=0"):
    causal_lm_loss_sums(lora_apply, params, lora, tokens, w, max_targets=0)


@pytest.mark.parametrize("positions_only", [False, True], ids=["every_position", "max_targets"])
def test_per_adapter_sums_equal_each_adapter_alone(positions_only):
  """With ``adapter_ids`` the sums are per adapter: each equals `plain_loss_sums` of that adapter
  alone (a plain tree, its own rank and alpha) on its own rows; a base row (-1) counts nowhere,
  and the gradient of the summed means reaches each adapter from its own rows only."""
  model, params, _, _ = setup(False)
  cfgs = [lorax_jax.LoraConfig(r=r, alpha=a, targets=["q_proj", "v_proj"]) for r, a in ((2, 4), (4, 2), (3, 9))]
  loras = [jax.tree.map(lambda x, j=j: x + 0.05 * jax.random.normal(jax.random.key(j), x.shape),
                        lorax_jax.init_lora(params, c, jax.random.key(j))) for j, c in enumerate(cfgs)]
  stacked, stacked_cfg = lorax_jax.stack_adapters(params, list(zip(loras, cfgs)))
  tokens, weights = chat_batch(model.config.vocab_size, batch=6)
  ids = np.array([2, 0, -1, 2, 0, 0], np.int32)  # adapter 1 absent
  k = max_targets_per_batch(weights, len(tokens)) if positions_only else None
  apply = lorax_jax.lora_transform(model.apply, params, stacked_cfg)

  def mean_sum(st):
    total, count = causal_lm_loss_sums(apply, params, st, tokens, weights, max_targets=k, adapter_ids=ids)
    return jnp.sum(total / jnp.maximum(count, 1.0)), (total, count)

  (_, (total, count)), grads = jax.jit(jax.value_and_grad(mean_sum, has_aux=True))(stacked)
  for j, (lora, cfg) in enumerate(zip(loras, cfgs)):
    alone = lorax_jax.lora_transform(model.apply, params, cfg)
    want = plain_loss_sums(alone, params, lora, tokens, weights * (ids == j)[:, None])
    np.testing.assert_allclose([total[j], count[j]], want, rtol=1e-5, err_msg=f"adapter {j}")
  grad_1 = [g[1] for kp, g in jax.tree_util.tree_leaves_with_path(grads) if kp[-1].key != "scale"]
  assert all(not np.any(g) for g in grad_1)  # absent adapter: exactly zero
  alone = lorax_jax.lora_transform(model.apply, params, cfgs[0])
  want_grad = jax.grad(lambda lo: jnp.divide(*plain_loss_sums(alone, params, lo, tokens, weights * (ids == 0)[:, None]))
                       )(loras[0])
  got = {kp: g for kp, g in jax.tree_util.tree_leaves_with_path(grads)}
  for kp, want in jax.tree_util.tree_leaves_with_path(want_grad):  # rows 0 … r-1 of adapter 0's slice
    np.testing.assert_allclose(got[kp][0, :cfgs[0].r], want, rtol=1e-4, atol=1e-6, err_msg=str(kp))


def test_per_adapter_sums_refuse_a_prefix_and_a_plain_tree():
  model, params, cfg, lora = setup(False)
  tokens, weights = chat_batch(model.config.vocab_size)
  stacked, stacked_cfg = lorax_jax.stack_adapters(params, [(lora, cfg)])
  ids = np.zeros(len(tokens), np.int32)
  with pytest.raises(ValueError, match="prefix_len=9 runs the shared prefix once"):
    causal_lm_loss_sums(lorax_jax.lora_transform(model.apply, params, stacked_cfg), params, stacked, tokens, weights,
                        prefix_len=PREFIX, adapter_ids=ids)
  with pytest.raises(ValueError, match="this lora is one adapter"):
    causal_lm_loss_sums(lorax_jax.lora_transform(model.apply, params, cfg), params, lora, tokens, weights,
                        adapter_ids=ids)
