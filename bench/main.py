"""The main job's training step, lorax_jax against PEFT + torch: ``python -m bench.main``.

The shape of ``make finetune``: SmolLM2-135M-Instruct in float32, batch 8 x 64 tokens of chat
examples (one prompt, answers of 4 to 30 tokens, right padding), LoRA r=8, alpha 16 on
q/k/v/o of all 30 layers, AdamW after clipping the gradient norm to 1, LoRA dropout 0.05 and 0.
PEFT runs transformers' ``LlamaForCausalLM`` holding the same weights (and, for the check, the
same LoRA factors) with ``torch.set_num_threads(cpu_count)``. One step = forward, backward,
clipping and the optimizer update, on the same tokens and weights. The variants run
interleaved round-robin (the order rotates every round); the table gives the median of
``--reps`` rounds after ``--warmup`` rounds, and tokens/s = batch x 64 / median step.

lorax_jax rows: "plain" does PEFT's work (logits at every position); "+prompt" runs the shared
chat prompt once per batch (``prefix_len``), "+targets" the LM head only at trained positions
(``max_targets``): `lorax_jax.models.causal_lm.causal_lm_loss_sums`; "+scan" the layers as one
``lax.scan`` (``Llama(scan_layers=True)`` on the layers stored stacked); "options" is all three,
as ``lorax-jax finetune`` runs
with ``--share_prompt``, ``--loss_positions_only`` and ``--scan_layers`` on, with ``max_targets``
taken from its data (the fortunes through SmolLM2's tokenizer). XLA's
compiled FLOPs, bytes accessed and temp memory of each JAX step are printed too (deterministic,
unlike the times; a scanned step's FLOPs count its loop body once), and the dropout ratio: the
step with dropout 0.05 over the same step with dropout 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax_jax
from bench.measure import compile_variant
from bench.models import SMOLLM2_CHAT_PROMPT, smollm2
from bench.variants import Variant, nonzero_lora
from lorax_jax.files import write_text_atomic
from lorax_jax.models.causal_lm import causal_lm_loss_sums, max_targets_per_batch
from lorax_jax.models.llama import stack_layers

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
LR, CLIP = 2e-3, 1.0


@dataclasses.dataclass
class Step:
  """One timed variant: ``run()`` does a whole step and blocks until it is done."""

  name: str
  run: Callable[[], Any]
  cost: dict[str, float] = dataclasses.field(default_factory=dict)


def chat_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
  """``(tokens [batch, seq + 1], weights, prefix_len)``: SmolLM2's chat prompt, then answers of 4 to
  30 random tokens (weight 1), then padding (weight 0), as ``lorax_jax.apps.finetune`` builds them."""
  prefix = SMOLLM2_CHAT_PROMPT
  rng = np.random.default_rng(seed)
  tokens = np.zeros((batch, seq + 1), np.int32)
  weights = np.zeros((batch, seq + 1), np.float32)
  for b, n in enumerate(np.linspace(4, min(30, seq + 1 - len(prefix)), batch).astype(int)):
    tokens[b, :len(prefix)] = prefix
    tokens[b, len(prefix):len(prefix) + n] = rng.integers(100, vocab, n)
    weights[b, len(prefix):len(prefix) + n] = 1.0
  return tokens, weights, len(prefix) - 1


def finetune_max_targets(batch: int) -> int | None:
  """``make finetune``'s ``max_targets`` at this batch size, from its data (`finetune.work_options`);
  None where the SmolLM2 package or the fortunes are missing."""
  from lorax_jax.apps import finetune
  from lorax_jax.models.gguf import load_smollm2

  try:
    s, _ = finetune.parse_args(["--batch_size", str(batch)])
    *_, tokenizer = load_smollm2()
    tasks = finetune.make_tasks(s, tokenizer)
  except (ImportError, OSError):
    return None
  return finetune.work_options(s, tokenizer, tasks)["max_targets"]


def main_job_config(dropout: float = 0.0) -> lorax_jax.LoraConfig:
  """The main job's adapter: r=8, alpha 16 on `TARGETS`, LoRA dropout ``dropout``."""
  return lorax_jax.LoraConfig(r=8, alpha=16, dropout=dropout, targets=list(TARGETS))


def jax_step(model: Any, params: Any, lora: Any, tokens: np.ndarray, weights: np.ndarray, dropout: float,
             prefix_len: int, max_targets: int | None, scan_layers: bool = False, *,
             cfg: lorax_jax.LoraConfig | None = None, adapter_ids: np.ndarray | None = None
             ) -> tuple[Variant, Callable[..., Any]]:
  """The finetune train step as a `Variant`, and ``loss(lora)`` (no dropout) for the check
  (``loss(lora, grad=True)``: ``(loss, gradient)``, the gradient in the training layout).

  With ``scan_layers`` the layers' params and factors are stored stacked, as finetune trains them
  (`lorax_jax.apps.finetune.training_layout`); ``loss`` takes the per-layer factors either way.
  ``cfg`` (default `main_job_config`) is the adapter's config, its dropout replaced by ``dropout``.
  With ``adapter_ids`` (int ``[batch]``), ``lora`` is a stacked tree (`lorax_jax.stack_adapters`,
  ``cfg`` the config it returned) and the step is a mixed batch: example ``n`` through adapter
  ``adapter_ids[n]``, the optimizer (clipping included) per adapter (`lorax_jax.per_adapter`); the
  ids are an argument of the step, not a constant of it."""
  from lorax_jax.apps.finetune import training_layout

  cfg = (cfg or main_job_config()).replace(dropout=dropout)
  model, params, lora, cfg = training_layout(scan_layers, model, params, lora, cfg)
  lora_apply = lorax_jax.lora_transform(model.apply, params, cfg)
  opt = optax.chain(optax.clip_by_global_norm(CLIP), optax.adamw(LR, weight_decay=0.0))
  if adapter_ids is not None:
    opt = lorax_jax.per_adapter(opt)

  def loss_fn(lo, params, tokens, weights, rng, ids):
    apply = lora_apply if ids is None else functools.partial(lora_apply, adapter_ids=ids)
    total, count = causal_lm_loss_sums(apply, params, lo, tokens, weights, rng,
                                       prefix_len=prefix_len, max_targets=max_targets)
    return total / jnp.maximum(count, 1.0)

  def step(lo, opt_state, params, tokens, weights, rng, ids):
    loss, grads = jax.value_and_grad(loss_fn)(lo, params, tokens, weights, rng, ids)
    updates, opt_state = opt.update(grads, opt_state, lo)
    return optax.apply_updates(lo, updates), opt_state, loss

  ids = None if adapter_ids is None else jnp.asarray(adapter_ids, jnp.int32)
  args = (lora, opt.init(lora), params, jnp.asarray(tokens), jnp.asarray(weights), jax.random.key(1), ids)
  check = jax.jit(functools.partial(loss_fn, rng=None))
  check_grad = jax.jit(jax.value_and_grad(functools.partial(loss_fn, rng=None)))
  layout = stack_layers if scan_layers else (lambda tree: tree)

  def loss(lo: Any, grad: bool = False) -> Any:
    return (check_grad if grad else check)(layout(lo), params, args[3], args[4], ids=ids)
  return Variant("", step, args), loss


def peft_name(j: int) -> str:
  """PEFT's name of adapter ``j`` in `peft_model`: ``"default"``, then ``"adapter_1"``, ..."""
  return "default" if j == 0 else f"adapter_{j}"


def peft_model(config: Any, params: Any, adapters: Sequence[tuple[Any, lorax_jax.LoraConfig]], device: str) -> Any:
  """transformers' ``LlamaForCausalLM`` holding ``params``, with one PEFT LoRA adapter per
  ``(lora, cfg)`` of ``adapters`` (q/k/v/o targets; its ``r``, ``alpha`` and dropout), adapter ``j``
  named `peft_name` ``(j)`` and holding ``lora``'s factors (PEFT's ``lora_A = a``,
  ``lora_B = bᵀ``); the first is active, in train mode."""
  import peft
  import torch
  import transformers

  from lorax_jax.models.hf import tensors_from_params
  from lorax_jax.models.llama import LLAMA_PATH_MAP
  from lorax_jax.paths import path_str

  base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf()))
  state = {k: torch.tensor(np.asarray(v)) for k, v in tensors_from_params(params, LLAMA_PATH_MAP).items()}
  base.load_state_dict(state, strict=False)
  model = None
  for j, (lora, cfg) in enumerate(adapters):
    peft_cfg = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_rslora=cfg.use_rslora,
                               target_modules=list(TARGETS))
    if model is None:
      model = peft.get_peft_model(base, peft_cfg)
    else:
      model.add_adapter(peft_name(j), peft_cfg)
    factors = {path_str(tuple(k.key for k in p)): np.asarray(x)
               for p, x in jax.tree_util.tree_flatten_with_path(lora)[0]}
    with torch.no_grad():
      for name, module in model.named_modules():
        if hasattr(module, "lora_A") and peft_name(j) in getattr(module, "lora_A", {}):
          layer = name.split("layers.")[1].split(".")[0]
          ours = f"params/model/layers_{layer}/self_attn/{name.rsplit('.', 1)[1]}/kernel"
          module.lora_A[peft_name(j)].weight.copy_(torch.tensor(factors[f"{ours}/a"]))
          module.lora_B[peft_name(j)].weight.copy_(torch.tensor(factors[f"{ours}/b"]).T)
  model.set_adapter(peft_name(0))
  return model.to(device).train()


def peft_step(config: Any, params: Any, lora: Any, tokens: np.ndarray, weights: np.ndarray,
              dropout: float, device: str) -> tuple[Callable[[], Any], Callable[[], float]]:
  """``(step, loss)`` of PEFT on transformers' Llama holding ``params`` and the factors ``lora``
  of the main job's adapter (`peft_model`)."""
  import torch

  model = peft_model(config, params, [(lora, main_job_config(dropout))], device)
  trainable = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0)
  ids = torch.as_tensor(tokens[:, :-1], device=device)
  labels = torch.as_tensor(tokens[:, 1:], device=device).long()
  w = torch.as_tensor(weights[:, 1:], device=device)

  def loss():
    logits = model(input_ids=ids).logits.float()
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    return (ce * w.flatten()).sum() / w.sum().clamp(min=1.0)

  def step():
    opt.zero_grad(set_to_none=True)
    value = loss()
    value.backward()
    torch.nn.utils.clip_grad_norm_(trainable, CLIP)
    opt.step()
    if device == "cuda":
      torch.cuda.synchronize()
    return value

  def eval_loss() -> float:
    model.eval()
    with torch.no_grad():
      value = float(loss())
    model.train()
    return value

  return step, eval_loss


def time_steps(steps: list[Step], reps: int, warmup: int) -> dict[str, list[tuple[float, float]]]:
  """``(wall, cpu)`` seconds per step, round-robin with the order rotating every round."""
  times: dict[str, list[tuple[float, float]]] = {s.name: [] for s in steps}
  for rnd in range(warmup + reps):
    for j in range(len(steps)):
      s = steps[(j + rnd) % len(steps)]
      t0, c0 = time.perf_counter(), time.process_time()
      s.run()
      if rnd >= warmup:
        times[s.name].append((time.perf_counter() - t0, time.process_time() - c0))
  return times


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--reps", type=int, default=5, help="timed rounds (median reported)")
  p.add_argument("--warmup", type=int, default=2, help="untimed rounds after compilation")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=64)
  p.add_argument("--all", action="store_true", help="also each work-saving option alone")
  p.add_argument("--no-peft", action="store_true", help="skip the PEFT + torch rows")
  p.add_argument("--tiny", action="store_true", help="a two-layer Llama with random weights (a dry run)")
  p.add_argument("--out", default=os.path.join("bench", "results"), help="folder for main-<backend>.json")
  args = p.parse_args(argv)
  config, model, params, source = smollm2(args.tiny)
  print(f"[main] {source}", flush=True)
  tokens, weights, prefix_len = chat_batch(config.vocab_size, args.batch, args.seq)
  max_targets = max(0 if args.tiny else finetune_max_targets(args.batch) or 0,
                    max_targets_per_batch(weights, args.batch))
  lora = nonzero_lora(lorax_jax.init_lora(params, main_job_config(), jax.random.key(0)), jax.random.key(2))
  options = {"plain": (0, None, False), "options": (prefix_len, max_targets, True)}
  if args.all:
    options |= {"+prompt +targets": (prefix_len, max_targets, False), "+prompt": (prefix_len, None, False),
                "+targets": (0, max_targets, False), "+scan": (0, None, True)}
  steps, losses = [], {}
  for dropout in (0.05, 0.0):
    for label, (pl, mt, scan) in options.items():
      name = f"lorax_jax {label}, dropout {dropout:g}"
      variant, loss = jax_step(model, params, lora, tokens, weights, dropout, pl, mt, scan)
      variant.name = name
      c = compile_variant(variant)
      cost = {"flops": c.flops, "bytes_accessed": c.bytes_accessed, "temp_bytes": c.temp_bytes,
              "compile_s": c.compile_s}
      steps.append(Step(name, lambda c=c: jax.block_until_ready(c.run(*c.args)), cost))
      losses.setdefault(label, float(loss(lora)))
      print(f"[main] compiled {name}: {c.flops / 1e9:.1f} GFLOP, {c.bytes_accessed / 1e9:.2f} GB accessed, "
            f"temp {c.temp_bytes / 2**20:.0f} MiB, {c.compile_s:.1f} s", flush=True)
  device = "cpu"
  if not args.no_peft:
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    device = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
    for dropout in (0.05, 0.0):
      step, loss = peft_step(config, params, lora, tokens, weights, dropout, device)
      steps.append(Step(f"PEFT + torch, dropout {dropout:g}", step))
      losses.setdefault("peft", loss())
  reference = losses["plain"]
  checks = {k: abs(v - reference) / abs(reference) for k, v in losses.items()}
  print(f"[main] loss without dropout, relative to lorax_jax plain: {checks}", flush=True)
  if max(checks.values()) > 1e-4:
    raise RuntimeError(f"the variants do not compute the same loss: {losses}")
  times = time_steps(steps, args.reps, args.warmup)
  n_tokens = args.batch * args.seq
  rows = {}
  for s in steps:
    wall = statistics.median(w for w, _ in times[s.name])
    cpu = statistics.median(c for _, c in times[s.name])
    rows[s.name] = {"median_s": wall, "cpu_median_s": cpu, "tokens_per_s": n_tokens / wall,
                    "times_s": [w for w, _ in times[s.name]], **s.cost}
  meta = {"jax": jax.__version__, "backend": jax.default_backend(), "torch_device": device,
          "cpus": os.cpu_count(), "machine": platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "model": source,
          "batch": args.batch, "seq": args.seq, "prefix_len": prefix_len, "max_targets": max_targets,
          "targets_in_batch": int(np.count_nonzero(weights[:, 1:])), "reps": args.reps, "losses": losses}
  return report("main", args.out, meta, rows, table(meta, rows))


def report(name: str, out_dir: str, meta: dict[str, Any], rows: dict[str, Any], text: str) -> dict[str, Any]:
  """Print ``text`` (the run's table) and write ``{"meta", "rows"}`` to ``out_dir/<name>-<backend>.json``."""
  print(text, flush=True)
  os.makedirs(out_dir, exist_ok=True)
  write_text_atomic(os.path.join(out_dir, f"{name}-{meta['backend']}.json"),
                    json.dumps({"meta": meta, "rows": rows}, indent=1))
  return {"meta": meta, "rows": rows}


def table(meta: dict[str, Any], rows: dict[str, dict[str, Any]]) -> str:
  """The markdown table of one run; speed-ups against PEFT with the same dropout."""
  lines = [f"Main job, batch {meta['batch']} x {meta['seq']} tokens ({meta['targets_in_batch']} trained), "
           f"{meta['backend']} / torch on {meta['torch_device']}, {meta['cpus']} CPUs, median of {meta['reps']}:",
           "", "| step | train tokens/s | wall s | CPU s | vs PEFT | GFLOP | GB accessed | temp MiB | compile s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for name, r in rows.items():
    peft = rows.get(f"PEFT + torch, dropout {name.rsplit('dropout ', 1)[1]}")
    ratio = f"{r['tokens_per_s'] / peft['tokens_per_s']:.2f}x" if peft else ""
    cost = (f"{r['flops'] / 1e9:.0f} | {r['bytes_accessed'] / 1e9:.1f} | {r['temp_bytes'] / 2**20:.0f} | "
            f"{r['compile_s']:.0f}" if "flops" in r else " | | | ")
    lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['median_s']:.2f} | {r['cpu_median_s']:.2f} | "
                 f"{ratio} | {cost} |")
  lines += ["", "Dropout ratio (step with dropout 0.05 / the same step with dropout 0; target <= 1.10):", ""]
  for name, r in rows.items():
    off = rows.get(name.replace("dropout 0.05", "dropout 0"))
    if name.endswith("dropout 0.05") and off:
      lines.append(f"- {name.rsplit(',', 1)[0]}: {r['median_s'] / off['median_s']:.2f} "
                   f"(CPU {r['cpu_median_s'] / off['cpu_median_s']:.2f})")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
