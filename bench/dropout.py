"""The cost of LoRA dropout on the main job's train step: ``python -m bench.dropout [--reps N] [--out F]``.

SmolLM2-135M-Instruct (float32), batch 8 × 64 tokens, r=8, alpha 16, q/k/v/o of all 30 layers,
AdamW; one jitted train step per variant, compared by XLA's compiled numbers (temp memory,
bytes accessed, flops) and, as a hint only, a short interleaved timing:

- ``off``: dropout 0 (no key);
- ``threefry``: today's engine, dropout 0.05: ``jax.random.bernoulli`` masks, masked input saved;
- ``hash``: today's engine with its mask drawn by `lorax_jax.dropout.keep_mask` (plain autodiff:
  the masked input is still saved per target);
- ``hash+vjp``: ``bench/proposals/002-hash-dropout.diff`` (the dot rule calls
  `lorax_jax.dropout.dropout_einsum`: the mask is recomputed in the backward, nothing saved).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import optax

import lorax_jax
from bench.compare import load_proposal
from bench.measure import bench_args, round_robin
from lorax_jax import transform
from lorax_jax.dropout import keep_mask
from lorax_jax.files import write_text_atomic
from lorax_jax.models import gguf

RATE = 0.05


@contextlib.contextmanager
def hash_masks() -> Iterator[None]:
  """Today's engine with `keep_mask` in place of ``jax.random.bernoulli`` (while tracing)."""
  draw = jax.random.bernoulli

  def bernoulli(key: jax.Array, p: float, shape: tuple[int, ...]) -> jax.Array:
    return keep_mask(key, shape, 1.0 - p)

  jax.random.bernoulli = bernoulli
  try:
    yield
  finally:
    jax.random.bernoulli = draw


def train_step(engine: Any, model: Any, params: Any, cfg: lorax_jax.LoraConfig) -> Callable[..., Any]:
  """The main job's ``(lora, opt_state, params, tokens, rng) -> (lora, opt_state, loss)``, through
  ``engine``; the frozen ``params`` an argument (as in ``examples/finetune.py``), not a constant."""
  apply = engine.lora_transform(model.apply, params, cfg)
  optimizer = optax.adamw(1e-3)

  def loss_fn(lora, params, tokens, rng):
    logits = apply(params, lora, tokens[:, :-1], rng=rng).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  def step(lora, opt_state, params, tokens, rng):
    loss, grads = jax.value_and_grad(loss_fn)(lora, params, tokens, rng)
    updates, opt_state = optimizer.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss

  return step, optimizer


def main(argv: list[str] | None = None) -> None:
  args = bench_args(__doc__, 3, "timed steps per variant (a hint, not a claim)", argv)
  _, model, params, _ = gguf.load_smollm2()
  tokens = jax.random.randint(jax.random.key(1), (8, 65), 0, 32000)
  rng = jax.random.key(2)
  on = lorax_jax.LoraConfig(r=8, alpha=16, dropout=RATE, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
  lora = lorax_jax.init_lora(params, on, jax.random.key(0))
  lora = jax.tree.map(lambda x: x + 0.01, lora)  # b ≠ 0, so that every gradient is exercised
  proposal = load_proposal("002-hash-dropout")
  variants = {"off": (transform, None, contextlib.nullcontext), "threefry": (transform, rng, contextlib.nullcontext),
              "hash": (transform, rng, hash_masks), "hash+vjp": (proposal, rng, contextlib.nullcontext)}
  compiled, rows, losses = {}, {}, {}
  for name, (engine, key, patch) in variants.items():
    step, optimizer = train_step(engine, model, params, on)
    opt_state = optimizer.init(lora)
    with patch():
      c = jax.jit(step).lower(lora, opt_state, params, tokens, key).compile()
    cost, mem = c.cost_analysis(), c.memory_analysis()
    compiled[name] = (c, (lora, opt_state, params, tokens, key))
    rows[name] = {"temp_mb": mem.temp_size_in_bytes / 2**20, "bytes_gb": cost["bytes accessed"] / 1e9,
                  "gflops": cost["flops"] / 1e9}
    losses[name] = float(c(*compiled[name][1])[2])
    print(name, rows[name], file=sys.stderr, flush=True)
  steps = {name: lambda c=c, a=a: jax.block_until_ready(c(*a)) for name, (c, a) in compiled.items()}
  times = {name: [wall for wall, _ in t] for name, t in round_robin(steps, args.reps, warmup=0).items()}
  for name, row in rows.items():
    row |= {"temp_x": row["temp_mb"] / rows["off"]["temp_mb"], "bytes_x": row["bytes_gb"] / rows["off"]["bytes_gb"],
        "median_s_hint": statistics.median(times[name]), "loss": losses[name]}
  text = json.dumps({"shape": "SmolLM2-135M, 8x64 tokens, r=8, q/k/v/o x 30 layers, dropout 0.05",
                     "rate": RATE, "reps": args.reps, "variants": rows}, indent=1)
  print(text)
  if args.out:
    write_text_atomic(args.out, text + "\n")


if __name__ == "__main__":
  main()
