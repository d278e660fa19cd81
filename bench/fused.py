"""Experiment: one adapted layer's train step three ways, XLA's compiled cost and a short timing.

``python -m bench.fused`` — for ``y = x·W + s·(x·aᵀ)·b`` with frozen ``W [d, m]``, factors
``a [r, d]``, ``b [r, m]``, the step is the loss ``Σ tanh(y)·g`` (``g`` fixed)
(``tanh``: the forward value is needed) differentiated for ``dx``, ``da``, ``db``:

- ``autodiff``: the engine's formulation, left to JAX's autodiff.
- ``fused``: ``[y | t] = x·[W | aᵀ]`` in one dot forward; backward ``dx = [dy | s·dt]·[W | aᵀ]ᵀ``
  in one dot, through a custom VJP, so no gradient of the concatenated kernel is formed.
- ``recompute``: ``t = x·aᵀ`` recomputed in the backward (``jax.checkpoint`` on the branch)
  instead of saved.

Each is checked against ``autodiff`` (1e-5 relative) before it is measured.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def branch_autodiff(x, w, a, b, s):
  return x @ w + s * (x @ a.T) @ b


@jax.custom_vjp
def _fused(x, w, a, b, s):
  return branch_autodiff(x, w, a, b, s)


def _fused_fwd(x, w, a, b, s):
  m = w.shape[1]
  yt = x @ jnp.concatenate([w, a.T], axis=1)                      # [N, m + r], one pass over x
  t = yt[:, m:]
  return yt[:, :m] + s * t @ b, (x, w, a, b, s, t)


def _fused_bwd(res, dy):
  x, w, a, b, s, t = res
  dt = s * dy @ b.T                                               # [N, r]
  dx = jnp.concatenate([dy, dt], axis=1) @ jnp.concatenate([w, a.T], axis=1).T  # one pass over dx
  return dx, jnp.zeros_like(w), dt.T @ x, s * t.T @ dy, jnp.zeros_like(s)


_fused.defvjp(_fused_fwd, _fused_bwd)


def branch_fused(x, w, a, b, s):
  return _fused(x, jax.lax.stop_gradient(w), a, b, s)


def branch_recompute(x, w, a, b, s):
  return x @ w + s * jax.checkpoint(lambda x, a: x @ a.T)(x, a) @ b


VARIANTS = {"autodiff": branch_autodiff, "fused": branch_fused, "recompute": branch_recompute}


def step(fn):
  def loss(x, a, b, w, g, s):
    return jnp.sum(jnp.tanh(fn(x, w, a, b, s)) * g)  # non-linear: the forward value is needed
  return jax.grad(loss, argnums=(0, 1, 2))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--reps", type=int, default=50)
  args = p.parse_args(argv)
  print("| N x d -> m, r | variant | MFLOP | MB accessed | temp KB | median ms |\n|---|---|---:|---:|---:|---:|")
  for n, d, m, r in ((256, 512, 512, 8), (256, 512, 2048, 8), (512, 576, 576, 8), (512, 576, 192, 8)):
    k = jax.random.split(jax.random.key(0), 5)
    x, w = jax.random.normal(k[0], (n, d)), jax.random.normal(k[1], (d, m)) / np.sqrt(d)
    a, b = jax.random.normal(k[2], (r, d)) / np.sqrt(d), jax.random.normal(k[3], (r, m))
    g, s = jax.random.normal(k[4], (n, m)), jnp.float32(2.0)
    ref = jax.jit(step(branch_autodiff))(x, a, b, w, g, s)
    for name, fn in VARIANTS.items():
      c = jax.jit(step(fn)).lower(x, a, b, w, g, s).compile()
      got = c(x, a, b, w, g, s)
      for u, v in zip(got, ref):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(v))))
      cost = c.cost_analysis()
      t = []
      for _ in range(args.reps):
        t0 = time.perf_counter()
        jax.block_until_ready(c(x, a, b, w, g, s))
        t.append(time.perf_counter() - t0)
      print(f"| {n}x{d}->{m}, {r} | {name} | {cost['flops'] / 1e6:.1f} | {cost['bytes accessed'] / 1e6:.2f} | "
            f"{c.memory_analysis().temp_size_in_bytes / 1024:.0f} | {np.median(t) * 1e3:.3f} |", flush=True)


if __name__ == "__main__":
  main()
