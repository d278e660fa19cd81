"""`lorax_jax.dropout`: the counter-hash keep mask (statistics, determinism) and the bilinear
dropout whose backward recomputes the mask (against plain autodiff through the materialised mask)."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from lorax_jax.dropout import dropout_bilinear, dropout_einsum, keep_mask, seeds

MAIN_SHAPE = (8, 64, 576)  # the main job's adapted input: batch 8 × 64 tokens, d 576


def _np_mix(h: np.ndarray) -> np.ndarray:
  """``lowbias32`` in numpy ``uint32`` arithmetic (wrapping multiplication)."""
  h = h ^ (h >> np.uint32(16))
  h = h * np.uint32(0x7FEB352D)
  h = h ^ (h >> np.uint32(15))
  h = h * np.uint32(0x846CA68B)
  return h ^ (h >> np.uint32(16))


def _np_keep(key_words: np.ndarray, shape: tuple[int, ...], rate: float) -> np.ndarray:
  """The documented mask, written out in numpy from the formula in `keep_mask`'s docstring."""
  with np.errstate(over="ignore"):
    s = np.uint32(0x9E3779B9)
    for w in key_words:
      s = _np_mix(s ^ np.uint32(w))
    s0, s1 = s, _np_mix(s ^ np.uint32(0x9E3779B9))
    i = np.arange(int(np.prod(shape)), dtype=np.uint32).reshape(shape)
    h = _np_mix(_np_mix(i ^ s0) + s1)
  return h >= np.uint32(int(rate * 2**32))


def _corr(u: np.ndarray, v: np.ndarray) -> float:
  u, v = u.astype(np.float64).ravel(), v.astype(np.float64).ravel()
  return float(np.corrcoef(u, v)[0, 1])


@pytest.mark.parametrize("key", [jax.random.key(0), jax.random.key(12345), jax.random.PRNGKey(7),
                                 jax.random.key(3, impl="rbg")], ids=["key0", "key12345", "raw", "rbg"])
def test_mask_equals_the_formula_in_numpy(key):
  """Pure uint32 arithmetic: the JAX mask is bit-for-bit the numpy one, eager and under jit."""
  words = np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key)
  expected = _np_keep(words.ravel(), (4, 33, 17), 0.3)
  np.testing.assert_array_equal(np.asarray(keep_mask(key, (4, 33, 17), 0.3)), expected)
  np.testing.assert_array_equal(np.asarray(jax.jit(keep_mask, static_argnums=(1, 2))(key, (4, 33, 17), 0.3)),
                                expected)


def test_same_key_same_mask_typed_or_raw():
  m1 = keep_mask(jax.random.key(5), MAIN_SHAPE, 0.05)
  np.testing.assert_array_equal(m1, keep_mask(jax.random.key(5), MAIN_SHAPE, 0.05))
  np.testing.assert_array_equal(m1, keep_mask(jax.random.PRNGKey(5), MAIN_SHAPE, 0.05))
  assert not np.array_equal(m1, keep_mask(jax.random.key(6), MAIN_SHAPE, 0.05))


@pytest.mark.parametrize("rate", [0.01, 0.05, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", [MAIN_SHAPE, (100_003,), (3, 5, 7, 11, 13)])
def test_keep_rate_within_binomial_bound(rate, shape):
  """Over several keys, the kept fraction is within 5 binomial standard deviations of 1 - p."""
  masks = np.stack([np.asarray(keep_mask(jax.random.key(s), shape, rate)) for s in range(4)])
  n = masks.size
  sd = np.sqrt(rate * (1 - rate) / n)
  assert abs(masks.mean() - (1 - rate)) < 5 * sd, (masks.mean(), 1 - rate, sd)
  # and per key (each n / 4 elements)
  for m in masks:
    assert abs(m.mean() - (1 - rate)) < 5 * sd * 2


def test_masks_of_different_keys_uncorrelated():
  """Masks of ``key(0..7)`` and of ``fold_in`` children (what the engine uses per target, use
  and loop iteration): pairwise correlations within 5/√n."""
  base = jax.random.key(0)
  keys = ([jax.random.key(s) for s in range(8)] + [jax.random.fold_in(base, i) for i in range(8)]
          + [jax.random.fold_in(jax.random.fold_in(base, 3), u) for u in range(4)])
  masks = [np.asarray(keep_mask(k, MAIN_SHAPE, 0.5)) for k in keys]
  bound = 5 / np.sqrt(masks[0].size)
  worst = max(abs(_corr(masks[i], masks[j])) for i in range(len(masks)) for j in range(i))
  assert worst < bound, (worst, bound)


@pytest.mark.parametrize("rate", [0.05, 0.5])
def test_no_serial_correlation_or_period(rate):
  """Autocorrelation of the flat mask at every lag 1..8192 (neighbours along each axis, powers of
  two, the row length 576) within 6/√n: no visible period."""
  m = np.asarray(keep_mask(jax.random.key(1), MAIN_SHAPE, rate)).ravel().astype(np.float64)
  m -= m.mean()
  n = m.size
  spectrum = np.fft.rfft(m, 2 * n)
  acf = np.fft.irfft(spectrum * np.conj(spectrum))[:8193] / (m @ m)
  lags = np.arange(1, 8193)
  bound = 6 / np.sqrt(n - lags)
  assert np.all(np.abs(acf[1:]) < bound), (lags[np.argmax(np.abs(acf[1:]) / bound)], np.abs(acf[1:]).max())
  # neighbours along the batch axis (lag 64·576) too
  assert abs(_corr(m[:-64 * 576], m[64 * 576:])) < 6 / np.sqrt(n - 64 * 576)


def _reference(spec, x, a, key, rate):
  """Plain autodiff through the materialised mask."""
  keep = keep_mask(key, x.shape, rate)
  return jnp.einsum(spec, jnp.where(keep, x * jnp.asarray(1 / (1 - rate), x.dtype), 0), a)


# Specs as `_dot_general_rule` writes them (x first): one contraction; a kernel used on the left
# (x's free axes last); several contracting axes (`DenseGeneral`, attention out-projection); a batch
# (stacked-layer) axis shared by x and a.
SPECS = [("ABc,cR->ABR", (3, 5, 6), (6, 4)),
         ("cA,cR->RA", (6, 7), (6, 4)),
         ("ABcd,cdR->ABR", (2, 5, 3, 4), (3, 4, 2)),
         ("lAc,lcR->lAR", (3, 5, 6), (3, 6, 2))]


@pytest.mark.parametrize("spec,xs,as_", SPECS, ids=[s for s, _, _ in SPECS])
@pytest.mark.parametrize("rate", [0.05, 0.5])
def test_dropout_einsum_equals_autodiff_through_the_mask(spec, xs, as_, rate):
  kx, ka, kd, kc = jax.random.split(jax.random.key(0), 4)
  x, a = jax.random.normal(kx, xs), jax.random.normal(ka, as_)
  c = jax.random.normal(kc, jnp.einsum(spec, x, a).shape)
  loss = lambda f: lambda x, a: jnp.sum(jnp.sin(f(spec, x, a, kd, rate)) * c)
  ours = jax.jit(jax.value_and_grad(loss(dropout_einsum), argnums=(0, 1)))(x, a)
  ref = jax.jit(jax.value_and_grad(loss(_reference), argnums=(0, 1)))(x, a)
  chex.assert_trees_all_close(ours, ref, rtol=1e-6, atol=1e-6)
  # some inputs dropped, their gradient exactly zero
  dropped = ~np.asarray(keep_mask(kd, xs, rate))
  assert dropped.any() and np.all(np.asarray(ours[1][0])[dropped] == 0)


def test_residuals_are_x_a_and_two_words():
  """The backward keeps ``x``, ``a`` and the seed words, never the masked ``x`` (plain autodiff
  through the mask keeps it: that is the memory this module saves)."""
  x, a, key = jnp.ones(MAIN_SHAPE), jnp.ones((576, 8)), jax.random.key(0)
  _, vjp = jax.vjp(lambda x, a: dropout_einsum("btd,dr->btr", x, a, key, 0.05), x, a)
  saved = sum(leaf.size for leaf in jax.tree.leaves(vjp))
  assert saved == x.size + a.size + 2
  _, vjp_ref = jax.vjp(lambda x, a: _reference("btd,dr->btr", x, a, key, 0.05), x, a)
  assert sum(leaf.size for leaf in jax.tree.leaves(vjp_ref)) >= saved + x.size - 2


def test_no_dropout_is_the_plain_einsum():
  x, a = jax.random.normal(jax.random.key(1), (4, 6)), jax.random.normal(jax.random.key(2), (6, 3))
  plain = jnp.einsum("bd,dr->br", x, a)
  np.testing.assert_array_equal(dropout_einsum("bd,dr->br", x, a, None, 0.5), plain)
  np.testing.assert_array_equal(dropout_einsum("bd,dr->br", x, a, jax.random.key(0), 0.0), plain)


def test_bad_inputs_are_named():
  x, a = jnp.ones((4, 6)), jnp.ones((6, 3))
  with pytest.raises(ValueError, match="rate must be in"):
    dropout_einsum("bd,dr->br", x, a, jax.random.key(0), 1.0)
  with pytest.raises(TypeError, match="single key"):
    dropout_einsum("bd,dr->br", x, a, jax.random.split(jax.random.key(0), 2), 0.1)
  with pytest.raises(TypeError, match="uint32 PRNGKey"):
    keep_mask(jnp.zeros(2, jnp.int32), (3,), 0.1)


def test_vmap_keys_per_example_or_shared():
  """``vmap`` over a key array: each example its own mask; one shared key: the same mask for all."""
  x, eye = jnp.ones((4, 16, 32)), jnp.eye(32)
  f = lambda x, key: dropout_einsum("td,de->te", x, eye, key, 0.5)
  keys = jax.random.split(jax.random.key(0), 4)
  per_example = np.asarray(jax.jit(jax.vmap(f))(x, keys))
  for i, k in enumerate(keys):
    np.testing.assert_array_equal(per_example[i], 2.0 * np.asarray(keep_mask(k, (16, 32), 0.5)))
  assert len({per_example[i].tobytes() for i in range(4)}) == 4
  shared = np.asarray(jax.jit(jax.vmap(f, in_axes=(0, None)))(x, keys[0]))
  np.testing.assert_array_equal(shared, np.broadcast_to(per_example[0], shared.shape))
  # gradients under vmap match the per-example reference
  g = jax.jit(jax.vmap(jax.grad(lambda x, k: jnp.sum(f(x, k) ** 2))))(x, keys)
  g_ref_one = jax.jit(jax.grad(lambda x, k: jnp.sum(_reference("td,de->te", x, eye, k, 0.5) ** 2)))
  g_ref = jnp.stack([g_ref_one(x[i], k) for i, k in enumerate(keys)])
  np.testing.assert_allclose(g, g_ref, rtol=1e-6)


def test_scan_and_remat():
  """In a ``scan`` with a key folded per iteration, under ``checkpoint``: same loss and gradients
  as the reference."""
  kx, ka, kd = jax.random.split(jax.random.key(3), 3)
  x, a = jax.random.normal(kx, (5, 8, 12)), jax.random.normal(ka, (5, 12, 12)) / 4

  def model(f):
    def body(h, inp):
      i, a_i = inp
      return jnp.tanh(f("bd,de->be", h, a_i, jax.random.fold_in(kd, i), 0.2)), None

    def loss(x0, a):
      h, _ = lax.scan(jax.checkpoint(body), x0, (jnp.arange(5), a))
      return jnp.sum(h ** 2)
    return loss

  ours = jax.jit(jax.value_and_grad(model(dropout_einsum), argnums=(0, 1)))(x[0], a)
  ref = jax.jit(jax.value_and_grad(model(_reference), argnums=(0, 1)))(x[0], a)
  chex.assert_trees_all_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_conv_branch_equals_autodiff_through_the_mask():
  """`dropout_bilinear` with a convolution (the conv rule's branch ``conv(dropout(x), A)``)."""
  kx, ka, kd = jax.random.split(jax.random.key(4), 3)
  x, a = jax.random.normal(kx, (2, 9, 9, 3)), jax.random.normal(ka, (3, 3, 3, 4))
  conv = functools.partial(lax.conv_general_dilated, window_strides=(2, 2), padding="SAME",
                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
  keep = keep_mask(kd, x.shape, 0.3)
  ref = lambda x, a: jnp.sum(jnp.sin(conv(jnp.where(keep, x * jnp.float32(1 / 0.7), 0), a)))
  ours = lambda x, a: jnp.sum(jnp.sin(dropout_bilinear(conv, x, a, kd, 0.3)))
  got, want = jax.jit(jax.value_and_grad(ours, (0, 1)))(x, a), jax.jit(jax.value_and_grad(ref, (0, 1)))(x, a)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)


def test_mixed_precision_keeps_dtypes():
  """bf16 input and factor with a float32 result: the gradients come back in bf16."""
  x, a = jnp.ones((4, 8), jnp.bfloat16), jnp.ones((8, 2), jnp.bfloat16)
  f = lambda x, a: jnp.sum(dropout_einsum("bd,dr->br", x, a, jax.random.key(0), 0.5,
                                          preferred_element_type=jnp.float32))
  (dx, da), ref = jax.jit(jax.grad(f, (0, 1)))(x, a), jax.jit(jax.grad(
      lambda x, a: jnp.sum(_reference("bd,dr->br", x, a, jax.random.key(0), 0.5)), (0, 1)))(x, a)
  assert dx.dtype == da.dtype == jnp.bfloat16
  np.testing.assert_array_equal(dx, ref[0])
  np.testing.assert_array_equal(da, ref[1])


def test_seeds_depend_on_every_key_word():
  s = {tuple(np.asarray(seeds(jnp.array(w, jnp.uint32)))) for w in ([0, 0], [0, 1], [1, 0], [1, 1])}
  assert len(s) == 4
