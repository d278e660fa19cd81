"""Generation: the KV cache against full-sequence decoding, compile counts, sampling filters, stops, LoRA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorax_jax import LoraConfig, init_lora, merge
from lorax_jax.models.generate import Sampling, filter_logits, generate, sample
from lorax_jax.models.llama import Llama, LlamaConfig

CONFIG = LlamaConfig(vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=300.0)
PROMPTS = [[5, 9, 2], [7, 1, 4, 4, 8], [3, 3, 3, 10, 11, 12, 13]]
TRACES: list[tuple[int, ...]] = []


class CountingLlama(Llama):
  """Records the token shape of every trace (a jitted call traces once per compilation)."""

  def __call__(self, tokens, *args, **kwargs):
    TRACES.append(tuple(tokens.shape))
    return super().__call__(tokens, *args, **kwargs)


@pytest.fixture(scope="module")
def model_params():
  model = Llama(CONFIG)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  # Larger weights than the init's make sharper, more varied next-token choices.
  return model, jax.tree.map(lambda x: 3 * x, params)


def uncached_greedy(model, params, prompts, n):
  """Greedy decoding by re-running the whole (unpadded) sequence for every token, no cache."""
  apply = jax.jit(model.apply)
  out = []
  for prompt in prompts:
    seq = list(prompt)
    for _ in range(n):
      # Right padding to a fixed length: causal attention keeps position len-1 unaffected.
      padded = jnp.asarray([seq + [0] * (32 - len(seq))])
      seq.append(int(jnp.argmax(apply(params, padded)[0, len(seq) - 1])))
    out.append(seq[len(prompt):])
  return out


def test_cached_generation_equals_uncached(model_params):
  model, params = model_params
  got = generate(model, params, PROMPTS, max_new_tokens=10)
  assert got == uncached_greedy(model, params, PROMPTS, 10)
  assert len({tuple(g) for g in got}) == len(PROMPTS)  # the rows really differ


def test_decode_step_compiles_once_per_batch_and_cache_length(model_params):
  _, params = model_params
  model = CountingLlama(CONFIG)
  TRACES.clear()
  generate(model, params, PROMPTS, max_new_tokens=6, cache_length=64)
  generate(model, params, [p[::-1] for p in PROMPTS], max_new_tokens=9, cache_length=64)
  generate(model, params, [p + [1] * 10 for p in PROMPTS], max_new_tokens=3, cache_length=64)
  assert TRACES.count((3, 1)) == 1, TRACES
  generate(model, params, PROMPTS[:2], max_new_tokens=6, cache_length=64)
  generate(model, params, PROMPTS, max_new_tokens=6, cache_length=128)
  assert TRACES.count((2, 1)) == 1 and TRACES.count((3, 1)) == 2, TRACES


def test_top_k_one_equals_greedy(model_params):
  model, params = model_params
  greedy = generate(model, params, PROMPTS, max_new_tokens=8)
  sampled = generate(model, params, PROMPTS, max_new_tokens=8, temperature=1.5, top_k=1,
                     rng=jax.random.key(7))
  assert sampled == greedy


def test_sampling_is_random_and_seeded(model_params):
  model, params = model_params
  draw = lambda seed: generate(model, params, PROMPTS, max_new_tokens=8, temperature=2.0,
                               rng=jax.random.key(seed))
  assert draw(1) == draw(1)
  assert draw(1) != draw(2)


def test_top_p_keeps_the_nucleus():
  """p = [.5, .3, .15, .05]: top_p=.7 keeps the first two (mass before the third is .8 >= .7)."""
  probs = np.asarray([0.15, 0.5, 0.05, 0.3])
  logits = jnp.log(jnp.asarray([probs, probs[::-1]]))
  kept = np.isfinite(np.asarray(filter_logits(logits, Sampling(1.0, top_p=0.7))))
  np.testing.assert_array_equal(kept, [[False, True, False, True], [True, False, True, False]])
  kept = np.isfinite(np.asarray(filter_logits(logits, Sampling(1.0, top_p=0.85))))
  np.testing.assert_array_equal(kept[0], [True, True, False, True])
  kept = np.isfinite(np.asarray(filter_logits(logits, Sampling(1.0, top_p=0.4))))
  np.testing.assert_array_equal(kept[0], [False, True, False, False])
  kept = np.isfinite(np.asarray(filter_logits(logits, Sampling(1.0, top_k=3, top_p=0.95))))
  np.testing.assert_array_equal(kept[0], [True, True, False, True])


def test_top_p_sampling_frequencies():
  """Draws follow the renormalised nucleus: .5/.8 and .3/.8."""
  logits = jnp.log(jnp.asarray([[0.15, 0.5, 0.05, 0.3]] * 4000))
  draws = np.asarray(sample(logits, jax.random.key(0), Sampling(1.0, top_p=0.7)))
  freq = np.bincount(draws, minlength=4) / draws.size
  np.testing.assert_allclose(freq, [0, 0.625, 0, 0.375], atol=0.03)


def test_stop_tokens_stop(model_params):
  model, params = model_params
  full = generate(model, params, PROMPTS, max_new_tokens=10)
  stop = full[0][3]
  got = generate(model, params, PROMPTS, max_new_tokens=10, stop_tokens=[stop])
  for g, f in zip(got, full):
    n = f.index(stop) + 1 if stop in f else len(f)
    assert g == f[:n]
  assert got[0][-1] == stop and len(got[0]) <= 4
  # Every row stopping ends generation early: it still returns the rows.
  assert generate(model, params, [PROMPTS[0]], max_new_tokens=10, stop_tokens=[full[0][0]]) == [[full[0][0]]]


def test_lora_factored_merged_and_base(model_params):
  model, params = model_params
  cfg = LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], dropout=0.1, dropout_seed=0)
  lora = init_lora(params, cfg, jax.random.key(1))
  lora = jax.tree.map(lambda x: x + jax.random.normal(jax.random.key(2), x.shape), lora)  # b != 0
  base = generate(model, params, PROMPTS, max_new_tokens=8)
  factored = generate(model, params, PROMPTS, max_new_tokens=8, lora=lora, cfg=cfg)
  merged = generate(model, params, PROMPTS, max_new_tokens=8, lora=lora, cfg=cfg, merged=True)
  assert factored == merged == uncached_greedy(model, merge(params, lora, cfg), PROMPTS, 8)
  assert factored != base


def test_bad_input(model_params):
  model, params = model_params
  with pytest.raises(ValueError, match="cache_length"):
    generate(model, params, PROMPTS, max_new_tokens=8, cache_length=16)
  with pytest.raises(ValueError, match="at least one token"):
    generate(model, params, [[1], []], max_new_tokens=2)
  with pytest.raises(ValueError, match="cfg"):
    generate(model, params, PROMPTS, max_new_tokens=2, lora={})
  with pytest.raises(ValueError, match="top_p"):
    generate(model, params, PROMPTS, max_new_tokens=2, temperature=1.0, top_p=1.5)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(model, params, PROMPTS, max_new_tokens=0)
