"""DoRA against LoRA, PEFT and lorax_jax on one CPU and one model: ``python -m bench.dora [--reps N]``.

The model is a random Llama shaped like the bench's GPT case (d 512, 6 layers, 8 heads, MLP 2048,
vocab 2048), batch 2 × 128 tokens, r=8, alpha 16, all linear layers. One train step (forward,
backward, AdamW on the adapter) per variant:

- PEFT (torch, ``transformers.LlamaForCausalLM``): ``LoraConfig`` with ``use_dora`` False / True,
  ``lora_dropout`` 0 and 0.05 (train mode);
- lorax_jax on the same weights (`lorax_jax.models.llama`), jitted, ``use_dora`` False / True,
  dropout 0 and 0.05, with XLA's compiled FLOPs and temp memory (deterministic).

Every step runs ``--reps`` times after two warm-ups, the variants interleaved round-robin; the table
gives the median wall time and each DoRA row's ratio to the LoRA row of its library and dropout.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import lorax_jax
from bench.measure import bench_args, round_robin
from lorax_jax.files import write_text_atomic
from lorax_jax.models.llama import load_llama

SHAPE = dict(vocab_size=2048, hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=256)
BATCH, SEQ, R, ALPHA, DROPOUT = 2, 128, 8, 16, 0.05


def torch_steps(directory: str, tokens: Any) -> dict[str, Callable[[], None]]:
  """PEFT train steps on the Llama in ``directory``: ``peft_lora``, ``peft_dora`` (and ``_dropout``)."""
  import peft
  import torch
  import transformers

  ids = torch.from_numpy(tokens)
  steps = {}
  for dora in (False, True):
    for dropout in (0.0, DROPOUT):
      model = transformers.LlamaForCausalLM.from_pretrained(directory)
      model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, use_dora=dora,
                                                         target_modules="all-linear")).train()
      opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

      def step(model=model, opt=opt):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
      steps[f"peft_{'dora' if dora else 'lora'}{'_dropout' if dropout else ''}"] = step
  return steps


def jax_steps(directory: str, tokens: Any) -> tuple[dict[str, Callable[[], None]], dict[str, dict[str, float]]]:
  """lorax_jax train steps on the same Llama, and their compiled FLOPs and temp memory."""
  _, model, params = load_llama(directory)
  ids = jnp.asarray(tokens)
  steps, costs = {}, {}
  for dora in (False, True):
    for dropout in (0.0, DROPOUT):
      cfg = lorax_jax.LoraConfig(r=R, alpha=ALPHA, dropout=dropout, targets="all-linear", use_dora=dora)
      apply = lorax_jax.lora_transform(model.apply, params, cfg, strict=True)
      lora = lorax_jax.init_lora(params, cfg, jax.random.key(0))
      opt = optax.adamw(1e-3)

      def step(lora, opt_state, params, ids, key, apply=apply, opt=opt):
        def loss_fn(lo):
          logits = apply(params, lo, ids[:, :-1], rng=key)
          return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
        loss, grads = jax.value_and_grad(loss_fn)(lora)
        updates, opt_state = opt.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss
      args = (lora, opt.init(lora), params, ids, jax.random.key(1))
      compiled = jax.jit(step).lower(*args).compile()
      name = f"lorax_{'dora' if dora else 'lora'}{'_dropout' if dropout else ''}"
      mem = compiled.memory_analysis()
      costs[name] = {"gflops": compiled.cost_analysis()["flops"] / 1e9, "temp_mb": mem.temp_size_in_bytes / 2**20}
      steps[name] = lambda compiled=compiled, args=args: jax.block_until_ready(compiled(*args))
  return steps, costs


def main(argv: list[str] | None = None) -> None:
  args = bench_args(__doc__, 10, "timed steps per variant", argv)
  import numpy as np
  import torch
  import transformers

  torch.manual_seed(0)
  tokens = np.random.default_rng(0).integers(0, SHAPE["vocab_size"], size=(BATCH, SEQ))
  with tempfile.TemporaryDirectory() as directory:
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).save_pretrained(directory)
    steps = torch_steps(directory, tokens)
    jsteps, costs = jax_steps(directory, tokens)
  steps |= jsteps
  times = {name: [wall for wall, _ in t] for name, t in round_robin(steps, args.reps, warmup=2).items()}
  names = list(steps)
  rows = {}
  for name in names:
    lora = name.replace("dora", "lora")
    rows[name] = {"median_s": statistics.median(times[name]),
                  "vs_lora": statistics.median(times[name]) / statistics.median(times[lora]), **costs.get(name, {})}
    if name in costs:
      rows[name]["flops_vs_lora"] = costs[name]["gflops"] / costs[lora]["gflops"]
  print(f"{'variant':<22} {'median s':>9} {'x LoRA':>7} {'GFLOPs':>8} {'FLOPs x LoRA':>13} {'temp MiB':>9}")
  for name, r in rows.items():
    print(f"{name:<22} {r['median_s']:>9.3f} {r['vs_lora']:>7.2f} {r.get('gflops', float('nan')):>8.2f} "
          f"{r.get('flops_vs_lora', float('nan')):>13.3f} {r.get('temp_mb', float('nan')):>9.1f}")
  text = json.dumps({"shape": SHAPE, "batch": BATCH, "seq": SEQ, "r": R, "reps": args.reps,
                     "torch_threads": torch.get_num_threads(), "variants": rows}, indent=1)
  print(text, file=sys.stderr)
  if args.out:
    write_text_atomic(args.out, text + "\n")


if __name__ == "__main__":
  main()
