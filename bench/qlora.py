"""QLoRA on SmolLM2-135M: the main job's LoRA train step on float32, bfloat16, int8, nf4 and GGUF bases.

    python -m bench.qlora [--no-time] [--no-qwix]

Each base is one params tree; the quantized ones hold `QArray` leaves (``int8`` per output
channel and ``nf4`` blocks of 64 from `lorax_jax.quantize.quantize` of the float32 load; ``gguf``
the file's own Q4_1 projection and Q8_0 embedding blocks) and go through
``lora_transform(model.apply, params, cfg)`` as they are: each quantized kernel is dequantized at
its use, again in the backward pass. The step is the main job's (``lorax-jax finetune``
defaults: q/k/v/o targets, r 8, batch 8 x 64 tokens, dropout, clipped AdamW): its compiled
``memory_analysis()`` (argument bytes: params + LoRA + optimizer state + batch; temporary
bytes), ``cost_analysis()`` FLOPs, and the median step time after a warm-up (on an idle
machine only). Qwix's ``LoraProvider(weight_qtype="nf4")`` on the same model, targets and batch
is the last row (it quantizes the float32 weights inside the step).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax_jax as lj
from lorax_jax import quantize as Q
from lorax_jax.apps import finetune


def main_job_step(model: Any, params: Any, s: finetune.Settings) -> tuple[Callable[..., Any], tuple[Any, ...]]:
  """The main job's jitted train step on ``params`` (float, or holding `QArray`\\ s) and its arguments."""
  cfg = finetune.lora_config(s)
  lora = lj.init_lora(params, cfg, jax.random.key(s.seed))
  optimizer = finetune.make_optimizer(s)
  train_step, _ = finetune.make_steps(lj.lora_transform(model.apply, params, cfg), optimizer)
  tokens = jax.random.randint(jax.random.key(1), (s.batch_size, s.seq_len + 1), 0, model.config.vocab_size)
  weights = jnp.ones(tokens.shape, jnp.float32)
  return train_step, (lora, optimizer.init(lora), params, tokens, weights, jax.random.key(2))


def compiled_memory(step: Callable[..., Any], args: tuple[Any, ...]) -> dict[str, int]:
  """XLA's compiled argument and temporary bytes and FLOPs of ``step(*args)`` (deterministic)."""
  compiled = step.lower(*args).compile()
  stats = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"argument": stats.argument_size_in_bytes, "temp": stats.temp_size_in_bytes,
          "flops": float(cost.get("flops", 0.0)), "compiled": compiled}


def qwix_step(model: Any, params: Any, s: finetune.Settings,
              args: tuple[Any, ...]) -> tuple[Callable[..., Any], tuple[Any, ...]]:
  """Qwix's nf4 QLoRA (``LoraProvider(weight_qtype="nf4")``) with the main job's targets, rank,
  optimizer and batch. Its frozen argument is the nf4 tree its own ``init`` makes (Qwix refuses
  float params in a quantized model): the formats and shapes of SmolLM2's, random values, which
  is all memory and time depend on."""
  import qwix
  names = "|".join(finetune.settings.lora_targets(s.targets))
  provider = qwix.LoraProvider(module_path=f".*({names})", rank=s.r, alpha=float(s.alpha), weight_qtype="nf4")
  qmodel = qwix.apply_lora_to_model(model, provider)
  _, _, _, tokens, weights, rng = args
  variables = qmodel.init(jax.random.key(0), tokens[:, :-1])
  lora = {"params": _lora_part(variables["params"], True)}
  frozen = {"params": _lora_part(variables["params"], False)}
  optimizer = finetune.make_optimizer(s)

  def loss_fn(lo, params, tokens, weights):
    logits = qmodel.apply(_merge_trees(params, lo), tokens[:, :-1]).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return jnp.sum(ce * weights[:, 1:]) / jnp.maximum(jnp.sum(weights[:, 1:]), 1.0)

  def step(lora, opt_state, params, tokens, weights, rng):
    loss, grads = jax.value_and_grad(loss_fn)(lora, params, tokens, weights)
    updates, opt_state = optimizer.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss
  return jax.jit(step, donate_argnums=(0, 1)), (lora, optimizer.init(lora), frozen, tokens, weights, rng)


def _lora_part(tree: Any, lora: bool) -> Any:
  """The LoRA leaves of a Qwix params dict (``lora``), or the others."""
  if not isinstance(tree, dict):
    return None if lora else tree
  out = {k: (v if lora else None) if "lora" in k else _lora_part(v, lora) for k, v in tree.items()}
  return {k: v for k, v in out.items() if v is not None and not (isinstance(v, dict) and not v)}


def _merge_trees(a: Any, b: Any) -> Any:
  if not isinstance(b, dict):
    return b
  return {**a, **{k: _merge_trees(a.get(k, {}), v) for k, v in b.items()}}


def measure(name: str, step: Callable[..., Any], args: tuple[Any, ...], timing: bool) -> dict[str, Any]:
  """One table row: compiled memory and FLOPs, and the median of 5 step times after one warm-up."""
  row = {"base": name, **compiled_memory(step, args)}
  compiled = row.pop("compiled")
  if timing:
    fresh = lambda: jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, args[:2])
    jax.block_until_ready(compiled(*fresh(), *args[2:]))
    times = []
    for _ in range(5):
      donated = fresh()
      jax.block_until_ready(donated)
      start = time.perf_counter()
      jax.block_until_ready(compiled(*donated, *args[2:]))
      times.append(time.perf_counter() - start)
    row["step_ms"] = 1e3 * float(np.median(times))
  return row


def bases(params: Any, gguf_params: Any) -> dict[str, Any]:
  """The frozen bases compared: float32, bfloat16, int8 (per channel), nf4 (blocks of 64), GGUF."""
  return {"float32": params,
          "bfloat16": jax.tree.map(lambda x: x.astype(jnp.bfloat16), params),
          "int8": Q.quantize(params, "int8", block_size=None),
          "nf4": Q.quantize(params, "nf4"),
          "gguf": gguf_params}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--no-time", action="store_true", help="compiled numbers only")
  parser.add_argument("--no-qwix", action="store_true")
  args = parser.parse_args()
  from lorax_jax.models.gguf import load_smollm2

  s, _ = finetune.parse_args([])
  _, model, params, _ = load_smollm2()
  _, _, gguf_params, _ = load_smollm2(quantized=True)
  rows, float_args = [], None
  for name, base in bases(params, gguf_params).items():
    step, step_args = main_job_step(model, base, s)
    float_args = float_args or step_args
    rows.append(measure(name, step, step_args, not args.no_time))
    print(rows[-1], flush=True)
  if not args.no_qwix:
    try:
      rows.append(measure("qwix-nf4", *qwix_step(model, params, s, float_args), not args.no_time))
    except Exception as e:  # report and keep the table
      print(f"qwix nf4: {type(e).__name__}: {e}")
  ref = rows[0]
  print(f"\nSmolLM2-135M, the main job's step: LoRA r={s.r} on {', '.join(s.targets)}, "
        f"batch {s.batch_size}x{s.seq_len}, clipped AdamW")
  print(f"{'base':<9} {'argument MB':>12} {'temp MB':>8} {'arg+temp MB':>12} {'arg / f32':>10} "
        f"{'(arg+temp) / f32':>17} {'GFLOP':>7}" + ("" if args.no_time else f" {'step ms':>8} {'/ f32':>6}"))
  for r in rows:
    total = r["argument"] + r["temp"]
    line = (f"{r['base']:<9} {r['argument'] / 1e6:>12.1f} {r['temp'] / 1e6:>8.1f} {total / 1e6:>12.1f} "
            f"{r['argument'] / ref['argument']:>10.3f} {total / (ref['argument'] + ref['temp']):>17.3f} "
            f"{r['flops'] / 1e9:>7.2f}")
    if not args.no_time:
      line += f" {r['step_ms']:>8.1f} {r['step_ms'] / ref['step_ms']:>6.2f}"
    print(line)


if __name__ == "__main__":
  main()
