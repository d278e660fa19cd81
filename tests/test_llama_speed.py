"""`causal_lm_loss_sums`: its work-saving options give the plain loss and LoRA gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_jax
from lorax_jax.models.causal_lm import causal_lm_loss_sums, max_targets_per_batch
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


def test_scanned_layers_equal_the_unrolled_model():
  """``scan_layers``: the same params tree, logits, cached decoding, loss and LoRA gradients
  (also with the work-saving options) as the unrolled layers."""
  model, params, cfg, lora = setup(False)
  scanned = model.clone(scan_layers=True)
  tokens, weights = chat_batch(model.config.vocab_size)
  np.testing.assert_allclose(scanned.apply(params, tokens), model.apply(params, tokens), atol=1e-5)
  for m in (model, scanned):
    cache = m.init_cache(len(tokens), tokens.shape[1])
    _, cache = m.apply(params, tokens[:, :PREFIX], cache=cache)
    got, _ = m.apply(params, tokens[:, PREFIX:PREFIX + 1], cache=cache)
    np.testing.assert_allclose(got[:, 0], model.apply(params, tokens[:, :PREFIX + 1])[:, -1], atol=1e-5)
  k = max_targets_per_batch(weights, len(tokens))
  results = []
  for m in (model, scanned):
    lora_apply = lorax_jax.lora_transform(m.apply, params, cfg, strict=True)
    results.append(loss_and_grads(
        lambda p, lo, t, w: causal_lm_loss_sums(lora_apply, p, lo, t, w, prefix_len=PREFIX, max_targets=k),
        params, lora, tokens, weights))
  (want_loss, want_grads), (got_loss, got_grads) = results
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(want))))


@pytest.mark.parametrize("scan", [False, True])
def test_remat_gives_the_same_loss_and_grads(scan):
  """``remat``: each layer recomputed in the backward pass from its input: the loss and LoRA
  gradients of the model without it; with ``scan_layers``, less temp memory in the compiled step
  (XLA's count; unrolled, XLA's CPU backend schedules the recomputation early and saves ~5%)."""
  model, params, cfg, lora = setup(False)
  tokens, weights = chat_batch(model.config.vocab_size, batch=8, length=48)
  results, temps = [], []
  for m in (model.clone(scan_layers=scan), model.clone(scan_layers=scan, remat=True)):
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
