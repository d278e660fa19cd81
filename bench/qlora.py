"""QLoRA on SmolLM2-135M: the main job's LoRA train step on float32, bfloat16, int8, nf4 and GGUF bases.

    python -m bench.qlora [--no-time] [--no-qwix] [--remat both|off|on]

Each base is one params tree; the quantized ones hold `QArray` leaves (``int8`` per output
channel and ``nf4`` blocks of 64 from `lorax_jax.quantize` of the float32 load; ``gguf``
the file's own Q4_1 projection and Q8_0 embedding blocks) and go through
``lora_transform(model.apply, params, cfg)`` as they are: each quantized kernel is dequantized at
its use, again in the backward pass. The step is the main job's (``lorax-jax finetune``
defaults: q/k/v/o targets, r 8, batch 8 x 64 tokens, dropout, clipped AdamW, the shared chat
prompt run once and the LM head only at the trained positions), the decoder layers as the main job
runs them (``scan_layers``: one scan over the layers stored stacked, `finetune.training_layout`),
without and with ``remat`` (each layer a ``jax.checkpoint``, as QLoRA runs with gradient
checkpointing; on XLA's CPU backend it saves memory only in the scan); each base's ratios are to
the float32 step with the same ``remat``. Per step: the compiled ``memory_analysis()`` (argument bytes: params + LoRA +
optimizer state + batch; temporary bytes), ``cost_analysis()`` FLOPs, and the median step time
after a warm-up (on an idle machine only). Qwix's ``LoraProvider(weight_qtype="nf4")`` on the same
model, targets, batch, options and ``remat`` is the last row (it quantizes the float32 weights
inside the step; its layers unrolled, since Qwix intercepts module calls, which the scan's
layer applied by hand does not make).
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
from bench.main import chat_batch, finetune_max_targets
from lorax_jax import qarray as Q
from lorax_jax.apps import finetune
from lorax_jax.models.causal_lm import causal_lm_loss_sums, max_targets_per_batch


def main_job_batch(vocab: int, s: finetune.Settings) -> tuple[Any, ...]:
  """``(tokens, weights, prefix_len, max_targets)``: a chat batch of the main job's shape (SmolLM2's
  prompt, answers of 4 to 30 tokens) and its work options: the shared prompt (``share_prompt``) and
  the LM head only at trained positions, ``max_targets`` from the fortunes data
  (``loss_positions_only``; `bench.main.finetune_max_targets`)."""
  tokens, weights, prefix_len = chat_batch(vocab, s.batch_size, s.seq_len)
  max_targets = max(finetune_max_targets(s.batch_size) or 0, max_targets_per_batch(weights, s.batch_size))
  return jnp.asarray(tokens), jnp.asarray(weights), prefix_len, max_targets


def main_job_step(model: Any, params: Any, s: finetune.Settings, batch: tuple[Any, ...], remat: bool
                  ) -> tuple[Callable[..., Any], tuple[Any, ...]]:
  """The main job's jitted train step (`finetune.make_steps` with its work options) on ``params``
  (float, or holding `QArray`\\ s), the layers scanned over their stacked params
  (`finetune.training_layout`), each a ``jax.checkpoint`` with ``remat``; and its arguments."""
  tokens, weights, prefix_len, max_targets = batch
  cfg = finetune.lora_config(s)
  lora = lj.init_lora(params, cfg, jax.random.key(s.seed))
  optimizer = finetune.make_optimizer(s)
  model, params, lora, cfg = finetune.training_layout(True, model.clone(remat=remat), params, lora, cfg)
  lora_apply = lj.lora_transform(model.apply, params, cfg)
  train_step, _ = finetune.make_steps(lora_apply, optimizer, prefix_len, max_targets)
  return train_step, (lora, optimizer.init(lora), params, tokens, weights, jax.random.key(2))


def compiled_memory(step: Callable[..., Any], args: tuple[Any, ...]) -> dict[str, int]:
  """XLA's compiled argument and temporary bytes and FLOPs of ``step(*args)`` (deterministic)."""
  compiled = step.lower(*args).compile()
  stats = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"argument": stats.argument_size_in_bytes, "temp": stats.temp_size_in_bytes,
          "flops": float(cost.get("flops", 0.0)), "compiled": compiled}


def qwix_step(model: Any, s: finetune.Settings, batch: tuple[Any, ...], remat: bool
              ) -> tuple[Callable[..., Any], tuple[Any, ...]]:
  """Qwix's nf4 QLoRA (``LoraProvider(weight_qtype="nf4")``) in the main job's step: its targets,
  rank, dropout, optimizer, batch and work options (`causal_lm_loss_sums` runs the Qwix model), the
  same ``remat``. Its frozen argument is the nf4 tree its own ``init`` makes (Qwix refuses float
  params in a quantized model): the formats and shapes of SmolLM2's, random values, which is all
  memory and time depend on."""
  import qwix
  tokens, weights, prefix_len, max_targets = batch
  names = "|".join(finetune.settings.lora_targets(s.targets))
  provider = qwix.LoraProvider(module_path=f".*({names})", rank=s.r, alpha=float(s.alpha), dropout=s.dropout,
                               weight_qtype="nf4")
  qmodel = qwix.apply_lora_to_model(model.clone(scan_layers=False, remat=remat), provider,
                                    methods=("__call__", "hidden", "logits"))  # what the loss calls
  variables = qmodel.init(jax.random.key(0), tokens[:, :-1])
  lora = {"params": _lora_part(variables["params"], True)}
  frozen = {"params": _lora_part(variables["params"], False)}
  optimizer = finetune.make_optimizer(s)

  def qwix_apply(params, lo, *args, rng=None, **kwargs):
    return qmodel.apply(_merge_trees(params, lo), *args, rngs=None if rng is None else {"dropout": rng}, **kwargs)

  def loss_fn(lo, params, tokens, weights, rng):
    total, count = causal_lm_loss_sums(qwix_apply, params, lo, tokens, weights, rng, prefix_len=prefix_len,
                                       max_targets=max_targets)
    return total / jnp.maximum(count, 1.0)

  def step(lora, opt_state, params, tokens, weights, rng):
    loss, grads = jax.value_and_grad(loss_fn)(lora, params, tokens, weights, rng)
    updates, opt_state = optimizer.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss
  return jax.jit(step, donate_argnums=(0, 1)), (lora, optimizer.init(lora), frozen, tokens, weights,
                                                jax.random.key(2))


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
  parser.add_argument("--remat", choices=("both", "off", "on"), default="both",
                      help="the layers as jax.checkpoints (gradient checkpointing), without, or both")
  args = parser.parse_args()
  from lorax_jax.models.gguf import load_smollm2

  s, _ = finetune.parse_args([])
  _, model, params, _ = load_smollm2()
  _, _, gguf_params, _ = load_smollm2(quantized=True)
  batch = main_job_batch(model.config.vocab_size, s)
  print(f"SmolLM2-135M, the main job's step: LoRA r={s.r} on {', '.join(s.targets)}, batch "
        f"{s.batch_size}x{s.seq_len} (shared prompt of {batch[2]} tokens, LM head at {batch[3]} positions), "
        "dropout, clipped AdamW; layers scanned over their stacked params", flush=True)
  tables = {}
  for remat in {"both": (False, True), "off": (False,), "on": (True,)}[args.remat]:
    rows = tables[remat] = []
    for name, base in bases(params, gguf_params).items():
      rows.append(measure(name, *main_job_step(model, base, s, batch, remat), not args.no_time))
      print(f"remat={remat}", rows[-1], flush=True)
    if not args.no_qwix:
      try:
        rows.append(measure("qwix-nf4", *qwix_step(model, s, batch, remat), not args.no_time))
      except Exception as e:  # report and keep the table
        print(f"qwix nf4 (remat={remat}): {type(e).__name__}: {e}")
  for remat, rows in tables.items():
    ref = rows[0]
    print(f"\nremat={remat}: ratios to the float32 step with remat={remat}")
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
