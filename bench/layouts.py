"""The small-rank matmuls of one LoRA layer in both factor layouts: ``python -m bench.layouts``.

lorax_jax stores ``a: [r, in]`` and ``b: [r, out]`` (rank first); NNX and Qwix store
``lora_a: [in, r]``. Each line times one ``dot_general`` (min and median of 200 calls, µs)
for tokens ``N``, width ``d`` and rank ``r``: the down-projection ``x·A``, the gradient of
``A`` (``gᵀx`` into ``[r, in]`` or ``xᵀg`` into ``[in, r]``), the up-projection ``t·B``, and
the base ``x·W`` for scale.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from jax import lax

SHAPES = ((256, 512, 8), (1024, 512, 8), (256, 2048, 8), (256, 512, 64))


def _time(f, *args, n: int = 200) -> tuple[float, float]:
  f = jax.jit(f)
  jax.block_until_ready(f(*args))
  ts = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.min(ts) * 1e6), float(np.median(ts) * 1e6)


def _dot(lc: int, rc: int):
  return lambda x, y: lax.dot_general(x, y, (((lc,), (rc,)), ((), ())))


def main() -> None:
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  out = {}
  for n, d, r in SHAPES:
    x, g = jax.random.normal(k1, (n, d)), jax.random.normal(k2, (n, r))
    a = jax.random.normal(k3, (r, d))
    out[f"N={n} d={d} r={r}"] = {
        "down x·aᵀ, a [r,in] (lorax_jax)": _time(_dot(1, 1), x, a),
        "down x·a, a [in,r] (NNX, Qwix)": _time(_dot(1, 0), x, a.T + 0),
        "dA = gᵀx -> [r,in] (lorax_jax)": _time(_dot(0, 0), g, x),
        "dA = xᵀg -> [in,r] (NNX, Qwix)": _time(_dot(0, 0), x, g),
        "up t·b, b [r,out]": _time(_dot(1, 0), g, a),
        "base x·W [d,d]": _time(_dot(1, 0), x, jax.random.normal(k3, (d, d))),
    }
  for shape, rows in out.items():
    print(shape)
    for name, (mn, md) in rows.items():
      print(f"  {name:34s} min {mn:8.1f} µs   median {md:8.1f} µs")
  print(json.dumps(out))


if __name__ == "__main__":
  main()
