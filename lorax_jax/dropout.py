"""LoRA dropout at the cost of a mask: counter-hash masks, recomputed in the backward.

The LoRA branch is bilinear in its input and its first factor: ``t = f(dropout(x), a)``
(an einsum for a dense use, a convolution for a conv use). Dropout multiplies ``x`` by
``m / (1 - p)``, ``m ∈ {0, 1}`` a keep mask with ``P(m = 1) = 1 - p``. Two costs are avoided here:

- **The bits.** ``m`` is not drawn from a block cipher (threefry) but from a keyed integer
  hash of each element's flat index, pure ``uint32`` arithmetic that XLA fuses into the
  consumer of the mask:

      h(i) = L(L(i ⊕ s₀) + s₁),   m(i) = [h(i) ≥ ⌊p · 2³²⌋]

  with ``L`` Wellons' ``lowbias32`` mixer (two xor-shift-multiply rounds, a bijection of
  ``uint32`` whose output bits flip with probability ≈ ½ ± 0.002 for any input bit flip)
  and ``(s₀, s₁)`` the key's words mixed by ``L``. The keep rate is ``1 - ⌊p · 2³²⌋ / 2³²``,
  exact to 2⁻³². The same key gives the same mask on every backend.
- **The residual.** ``dropout_bilinear`` has a custom VJP whose residuals are ``x``, ``a``
  and the key's two seed words, not the masked copy of ``x``; the backward recomputes ``m``:

      dx = m / (1 - p) · (∂f/∂x)ᵀ dt,   da = (∂f/∂a)ᵀ dt at x̃ = m · x / (1 - p).

  ``x`` is already kept alive by the frozen base ``x · W``, so a target's dropout stores
  nothing of the input's size.

Under ``jax.vmap`` the key is mapped like any other argument: a batch of keys (``vmap`` over
``jax.random.split(key, n)``) gives each example its own mask; one key shared by the batch
(``in_axes=None``) gives every example the same mask, because the element index counts within
one example. Forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``) is not defined through the
custom VJP; differentiate in reverse mode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_MUL1 = np.uint32(0x7FEB352D)
_MUL2 = np.uint32(0x846CA68B)
_SEED = np.uint32(0x9E3779B9)  # 2³² / golden ratio: no zero seed word


def _mix(h: jax.Array) -> jax.Array:
  """Wellons' ``lowbias32``: ``h ^= h >> 16; h *= 0x7feb352d; h ^= h >> 15; h *= 0x846ca68b;
  h ^= h >> 16``, a bijection of ``uint32``."""
  h = (h ^ (h >> 16)) * _MUL1
  h = (h ^ (h >> 15)) * _MUL2
  return h ^ (h >> 16)


def check_key(rng: object) -> None:
  """Accept ``None`` or a single JAX PRNG key: a typed key of shape ``()`` (``jax.random.key``; one per
  example under ``vmap``) or a raw one (``jax.random.PRNGKey``'s ``uint32`` words).

  Raises:
    TypeError: anything else (an int seed, a float array, a batch of keys), naming ``rng``.
  """
  if rng is None:
    return
  dtype, shape = getattr(rng, "dtype", None), getattr(rng, "shape", None)
  typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
  if (typed and shape == ()) or (dtype == np.uint32 and shape == _raw_key_shape()):
    return
  kind = "a key array" if typed else dtype
  got = f"{type(rng).__name__} {rng!r:.60}" if shape is None else f"{kind} of shape {shape}"
  raise TypeError(f"rng must be a jax.random.key (e.g. jax.random.key(0); under vmap one per example) or None, "
                  f"got {got}")


@functools.cache
def _raw_key_shape() -> tuple[int, ...]:
  return tuple(jax.random.key_data(jax.random.key(0)).shape)


def seeds(key: jax.Array) -> jax.Array:
  """The two ``uint32`` seed words ``(s₀, s₁)`` of the mask hash, from any JAX PRNG key.

  Every word ``w`` of the key's data is folded in: ``s ← L(s ⊕ w)`` from ``s = 0x9e3779b9``,
  then ``s₀ = s``, ``s₁ = L(s ⊕ 0x9e3779b9)``. So keys that differ in any bit (``key(0)`` and
  ``key(1)``, two ``fold_in`` children) give unrelated seeds.

  Args:
    key: a typed key (``jax.random.key``) or a raw ``uint32`` key (``jax.random.PRNGKey``),
      any implementation (threefry, rbg). A single key: map over key arrays with ``vmap``.

  Raises:
    TypeError: ``key`` is neither a typed key nor an unsigned 32-bit array.
  """
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.ndim:
      raise TypeError(f"dropout key: expected a single key, got a key array of shape {key.shape}; "
                      "map over key arrays with jax.vmap")
    words = jax.random.key_data(key).reshape(-1)
  elif key.dtype == jnp.uint32 and key.ndim == 1:
    words = key
  else:
    raise TypeError(f"dropout key: expected a jax.random.key or a uint32 PRNGKey of shape (n,), got "
                    f"dtype {key.dtype} shape {key.shape}")
  s = jnp.asarray(_SEED, jnp.uint32)
  for j in range(words.shape[0]):
    s = _mix(s ^ words[j])
  return jnp.stack([s, _mix(s ^ _SEED)])


def _threshold(rate: float) -> np.uint32:
  """``⌊p · 2³²⌋``; an element is kept when its hash is at least this."""
  return np.uint32(min(int(rate * 2.0**32), 2**32 - 1))


def _keep(words: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
  """The keep mask of ``shape`` for seed words ``words`` (see `keep_mask`)."""
  size = int(np.prod(shape, dtype=np.int64))
  if size >= 2**32:
    raise ValueError(f"dropout mask of shape {shape} has {size} ≥ 2³² elements; the hash counts "
                     "elements in uint32: apply dropout to smaller pieces (e.g. per layer or per batch row)")
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
    stride *= shape[axis]
  h = _mix(_mix(index ^ words[0]) + words[1])
  return h >= _threshold(rate)


def keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
  """A boolean keep mask: ``m(i) = [L(L(i ⊕ s₀) + s₁) ≥ ⌊p · 2³²⌋]`` at flat index ``i``.

  ``L`` is the ``lowbias32`` mixer and ``(s₀, s₁) = seeds(key)``. Each element is kept with
  probability ``1 - ⌊p · 2³²⌋ / 2³²``; masks of different keys, and neighbouring elements of one
  mask, are independent to the tests' resolution (``tests/test_dropout.py``).

  Args:
    key: a single JAX PRNG key (typed or raw ``uint32``).
    shape: the mask's shape; fewer than 2³² elements.
    rate: the drop probability ``p``, in ``[0, 1)``.

  Raises:
    ValueError: ``rate`` outside ``[0, 1)``, or ``shape`` with 2³² elements or more.
    TypeError: ``key`` is not a single PRNG key.
  """
  _check_rate(rate)
  return _keep_mask(key, tuple(shape), float(rate))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
  return _keep(seeds(key), shape, rate)


def _check_rate(rate: float) -> None:
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate must be in [0, 1), got {rate}")


def _masked(x: jax.Array, words: jax.Array, rate: float) -> jax.Array:
  """``m · x / (1 - p)``."""
  keep = _keep(words, x.shape, rate)
  return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), jnp.zeros((), x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def _dropout_bilinear(f, x, a, words, rate):
  return f(_masked(x, words, rate), a)


def _fwd(f, x, a, words, rate):
  return f(_masked(x, words, rate), a), (x, a, words)


def _bwd(f, rate, res, dt):
  x, a, words = res
  xm = _masked(x, words, rate)
  (dxm,) = jax.linear_transpose(lambda u: f(u, a), xm)(dt)
  (da,) = jax.linear_transpose(lambda v: f(xm, v), a)(dt)
  return _masked(dxm, words, rate), da, None


_dropout_bilinear.defvjp(_fwd, _bwd)


def dropout_bilinear(f: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, a: jax.Array,
                     key: jax.Array | None, rate: float) -> jax.Array:
  """``f(m · x / (1 - p), a)`` for ``f`` bilinear, without saving the masked ``x``.

  ``m = keep_mask(key, x.shape, rate)``. The reverse-mode derivative is
  ``dx = m / (1 - p) · (∂f/∂x)ᵀ dt`` and ``da = (∂f/∂a)ᵀ dt`` at the masked ``x``, with ``m``
  recomputed from the key; the residuals are ``x``, ``a`` and two seed words.

  Args:
    f: linear in each argument separately (an einsum, a convolution with fixed parameters);
      it is transposed with `jax.linear_transpose` in the backward.
    x: the branch input, fewer than 2³² elements per example.
    a: the first factor, laid out as ``f`` expects.
    key: a single PRNG key, or ``None`` for no dropout.
    rate: the drop probability ``p`` in ``[0, 1)``; ``0`` means no dropout.

  Raises:
    ValueError: ``rate`` outside ``[0, 1)``, or ``x`` too large for the hash's counter.
    TypeError: ``key`` is not a single PRNG key.
  """
  _check_rate(rate)
  if key is None or rate == 0.0:
    return f(x, a)
  return _dropout_bilinear(f, x, a, seeds(key), float(rate))


def dropout_einsum(spec: str, x: jax.Array, a: jax.Array, key: jax.Array | None, rate: float, *,
                   precision: lax.PrecisionLike = None,
                   preferred_element_type: jnp.dtype | None = None) -> jax.Array:
  """``jnp.einsum(spec, m · x / (1 - p), a)`` with ``m = keep_mask(key, x.shape, rate)``.

  The einsum case of `dropout_bilinear`: the backward recomputes ``m`` instead of keeping the
  masked ``x``. ``key=None`` or ``rate=0`` is the plain einsum.

  Args:
    spec: a two-operand einsum spec (``"btd,dr->btr"``), ``x`` first.
    x: the branch input.
    a: the first factor.
    key: a single PRNG key, or ``None``.
    rate: the drop probability ``p`` in ``[0, 1)``.
    precision: passed to `jnp.einsum`.
    preferred_element_type: passed to `jnp.einsum`.

  Raises:
    ValueError: ``rate`` outside ``[0, 1)``.
    TypeError: ``key`` is not a single PRNG key.
  """
  f = functools.partial(_einsum, spec, precision, preferred_element_type)
  return dropout_bilinear(f, x, a, key, rate)


def _einsum(spec, precision, preferred_element_type, x, a):
  return jnp.einsum(spec, x, a, precision=precision, preferred_element_type=preferred_element_type)
