"""Compile cost of the main job's train step by depth and option: ``python -m bench.compile_time``.

SmolLM2-135M's shape with random weights and ``--layers`` decoder layers, batch 8 x 64 chat rows,
LoRA r=8 on q/k/v/o, dropout 0.05 (`bench.main.jax_step`). For each variant it prints the process
CPU seconds of lowering (lorax_jax's jaxpr interpretation included) and of XLA's compilation
(compilation runs on one thread, so CPU time moves less with the machine's load than wall
time), and the compiled FLOPs, bytes accessed and temp memory. A scanned step's FLOPs and bytes
count its loop body once.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp

import lorax_jax
from bench.main import TARGETS, chat_batch, jax_step
from bench.models import SMOLLM2_CONFIG
from bench.variants import nonzero_lora
from lorax_jax.models.causal_lm import max_targets_per_batch
from lorax_jax.models.llama import Llama


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, nargs="+", default=[2, 8])
  p.add_argument("--variants", nargs="+", default=["plain", "options", "plain+scan", "options+scan"])
  args = p.parse_args(argv)
  print("| layers | variant | lower CPU s | compile CPU s | GFLOP | GB accessed | temp MiB |")
  print("|---:|---|---:|---:|---:|---:|---:|")
  for layers in args.layers:
    config = dataclasses.replace(SMOLLM2_CONFIG, num_hidden_layers=layers)
    model = Llama(config)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    tokens, weights, prefix_len = chat_batch(config.vocab_size, 8, 64)
    cfg = lorax_jax.LoraConfig(r=8, alpha=16, targets=list(TARGETS))
    lora = nonzero_lora(lorax_jax.init_lora(params, cfg, jax.random.key(0)), jax.random.key(2))
    for name in args.variants:
      options = (prefix_len, max_targets_per_batch(weights, 8)) if name.startswith("options") else (0, None)
      variant, _ = jax_step(model, params, lora, tokens, weights, 0.05, *options, name.endswith("+scan"))
      t0 = time.process_time()
      lowered = jax.jit(variant.fn).lower(*variant.args)
      t1 = time.process_time()
      compiled = lowered.compile()
      t2 = time.process_time()
      cost, mem = compiled.cost_analysis(), compiled.memory_analysis()
      print(f"| {layers} | {name} | {t1 - t0:.1f} | {t2 - t1:.1f} | {cost['flops'] / 1e9:.1f} | "
            f"{cost['bytes accessed'] / 1e9:.2f} | {mem.temp_size_in_bytes / 2**20:.0f} |", flush=True)


if __name__ == "__main__":
  main()
