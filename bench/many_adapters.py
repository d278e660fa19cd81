"""Many adapters in one batch at the main job's shape: ``python -m bench.many_adapters``.

Issue 21's cost rows, on one table, same CPU and batch (`bench.main`'s: SmolLM2-135M in float32,
batch 8 x 64 chat tokens, LoRA on q/k/v/o, LoRA dropout 0.05, AdamW after clipping to 1):

- train: the main job's step ("plain": one adapter, r=8 alpha 16, a plain tree) against the same
  step on a stacked tree (`lorax_jax.stack_adapters`, optimizer `lorax_jax.per_adapter`) of 1
  adapter with every id 0, of 4 and of 16 adapters of mixed ranks and alphas (`CFGS`: r 8/4/16/8,
  padded to 16), ids cycling over the batch (``n % k``: with 16 adapters and 8 examples, 8 are
  absent from the batch);
- decode: `lorax_jax.models.generate.generate`, greedy, 8 prompts, ``--new_tokens`` each, through
  one adapter and through 4 (ids cycling);
- forward: logits of the batch through one adapter and through 4 (ids cycling), lorax_jax and
  PEFT (transformers' ``LlamaForCausalLM`` with the same weights and the same 4 adapters;
  ``model(input_ids, adapter_names=[...])``, inference only in PEFT);
- implementation: one layer's LoRA branch (``x [8, 64, 576]`` through q_proj's factors of 4 and 16
  adapters at rank 16, forward and gradient): gathering each example's factors (``a[ids]``,
  ``b[ids]``, two batched einsums: sglang-jax's BGMV, what the engine does) against sorting the
  rows by adapter and two ``lax.ragged_dot`` (SkyRL's grouped matmul), then unsorting.

Every JAX row reports XLA's compiled FLOPs, bytes accessed and temp memory (deterministic) and the
median wall time of ``--reps`` interleaved rounds (`bench.measure.round_robin`); each ratio is to
the one-adapter row of its group. Checks, before any timing: the stacked 1-adapter step's loss and
gradient equal the plain step's; each mixed batch's loss equals the sum over its adapters of that
adapter alone on its own rows (unstacked, its own config); the stacked 1-adapter decode equals the
plain decode; PEFT's mixed-batch logits equal ours; both implementations give the same branch and
gradients.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lorax_jax
from bench.main import TARGETS, chat_batch, jax_step, main_job_config, peft_model, peft_name, report
from bench.measure import Compiled, compile_variant, round_robin
from bench.models import SMOLLM2_CHAT_PROMPT, smollm2
from bench.variants import Variant, nonzero_lora
from lorax_jax.lora_tree import SCALE
from lorax_jax.models.causal_lm import causal_lm_loss_sums
from lorax_jax.models.generate import generate

DROPOUT = 0.05  # the main job's
CFGS = (main_job_config(DROPOUT), lorax_jax.LoraConfig(r=4, alpha=8, dropout=DROPOUT, targets=list(TARGETS)),
        lorax_jax.LoraConfig(r=16, alpha=16, dropout=DROPOUT, targets=list(TARGETS)),
        lorax_jax.LoraConfig(r=8, alpha=32, dropout=DROPOUT, targets=list(TARGETS)))
"""Adapter ``j``'s config is ``CFGS[j % 4]``; adapter 0 is the main job's (and holds its factors)."""
COUNTS = (4, 16)  # the mixed batches' numbers of adapters


@dataclasses.dataclass
class Row:
  """One timed row: ``run()`` does the whole thing and blocks until it is done; ``group`` names the
  one-adapter row its ratios are to; ``tokens`` per run (decode: tokens/s)."""

  name: str
  group: str
  run: Callable[[], Any]
  cost: dict[str, float] = dataclasses.field(default_factory=dict)
  tokens: int = 0


def adapters(params: Any, lora: Any, k: int) -> list[tuple[Any, lorax_jax.LoraConfig]]:
  """``k`` adapters ``(lora_j, CFGS[j % 4])``: adapter 0 is ``lora``, the others random factors."""
  out = [(lora, CFGS[0])]
  for j in range(1, k):
    cfg = CFGS[j % len(CFGS)]
    out.append((nonzero_lora(lorax_jax.init_lora(params, cfg, jax.random.key(10 + j)), jax.random.key(50 + j)), cfg))
  return out


def cycling_ids(batch: int, k: int) -> np.ndarray:
  """Example ``n`` through adapter ``n % k``."""
  return (np.arange(batch) % k).astype(np.int32)


def timed(c: Compiled, name: str, group: str) -> Row:
  """A `Row` running the compiled ``c``, its compiled cost kept (and printed)."""
  cost = {"flops": c.flops, "bytes_accessed": c.bytes_accessed, "temp_bytes": c.temp_bytes, "compile_s": c.compile_s}
  print(f"[many] compiled {name}: {c.flops / 1e9:.2f} GFLOP, {c.bytes_accessed / 1e9:.3f} GB accessed, "
        f"temp {c.temp_bytes / 2**20:.0f} MiB, {c.compile_s:.1f} s", flush=True)
  return Row(name, group, lambda: jax.block_until_ready(c.run(*c.args)), cost)


def relative(got: Any, want: Any) -> float:
  """``max |got - want| / max |want|`` over all leaves of two trees of the same structure."""
  diff = max(float(jnp.max(jnp.abs(jnp.asarray(g, jnp.float32) - jnp.asarray(w, jnp.float32))))
             for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
  return diff / max(float(jnp.max(jnp.abs(jnp.asarray(w, jnp.float32)))) for w in jax.tree.leaves(want))


def alone_loss(model: Any, params: Any, pairs: list[tuple[Any, lorax_jax.LoraConfig]], ids: np.ndarray,
               tokens: np.ndarray, weights: np.ndarray) -> float:
  """The mixed batch's loss (no dropout) computed without it: each adapter alone (a plain tree, its
  own config) on the whole batch with the other examples' weights zeroed, the sums added."""
  sums = {}
  total = count = 0.0
  for j in sorted(set(ids.tolist())):
    lora, cfg = pairs[j]
    if cfg not in sums:
      apply = lorax_jax.lora_transform(model.apply, params, cfg.replace(dropout=0.0))
      sums[cfg] = jax.jit(functools.partial(causal_lm_loss_sums, apply))
    t, c = sums[cfg](params, lora, jnp.asarray(tokens), jnp.asarray(weights * (ids == j)[:, None]))
    total, count = total + float(t), count + float(c)
  return total / max(count, 1.0)


def adapter_factors(stacked: Any, j: int) -> Any:
  """Adapter ``j``'s slice of every factor of a stacked tree (or its gradient), ``scale`` left out."""
  if isinstance(stacked, dict) and SCALE in stacked:
    return {k: v[j] for k, v in stacked.items() if k != SCALE}
  return {k: adapter_factors(v, j) for k, v in stacked.items()}


def train_rows(model: Any, params: Any, lora: Any, tokens: np.ndarray, weights: np.ndarray,
               checks: dict[str, float]) -> list[Row]:
  """The training step: plain, then stacked trees of 1, 4 and 16 adapters (`train_variants`)."""
  variants = train_variants(model, params, lora, tokens, weights, checks)
  return [timed(compile_variant(variant), name, variants[0][0]) for name, variant, _ in variants]


def train_variants(model: Any, params: Any, lora: Any, tokens: np.ndarray, weights: np.ndarray,
                   checks: dict[str, float], counts: tuple[int, ...] = COUNTS
                   ) -> list[tuple[str, Variant, Callable[..., Any]]]:
  """``(name, step, loss)`` of each training row (plain, then stacked trees of 1 and of each of
  ``counts`` adapters), the checks (module docstring) written to ``checks``."""
  batch = tokens.shape[0]
  plain, plain_loss = jax_step(model, params, lora, tokens, weights, DROPOUT, 0, None)
  out = [("train, 1 adapter (plain tree)", plain, plain_loss)]
  want_loss, want_grad = plain_loss(lora, grad=True)
  for k in (1, *counts):
    pairs = adapters(params, lora, k)
    stacked, cfg = lorax_jax.stack_adapters(params, pairs)
    ids = cycling_ids(batch, k)
    variant, loss = jax_step(model, params, stacked, tokens, weights, DROPOUT, 0, None, cfg=cfg, adapter_ids=ids)
    name = f"train, {k} adapter{'s' * (k > 1)} stacked (ids {'all 0' if k == 1 else 'n % ' + str(k)})"
    if k == 1:
      got_loss, got_grad = loss(stacked, grad=True)
      checks["train 1 stacked: loss vs plain"] = relative(got_loss, want_loss)
      checks["train 1 stacked: gradient vs plain"] = relative(adapter_factors(got_grad, 0), want_grad)
    else:
      checks[f"train {k} mixed: loss vs each adapter alone"] = relative(
          loss(stacked), alone_loss(model, params, pairs, ids, tokens, weights))
    out.append((name, variant, loss))
  return out


def forward_rows(config: Any, model: Any, params: Any, lora: Any, tokens: np.ndarray, checks: dict[str, float],
                 peft: bool, device: str) -> list[Row]:
  """Logits of the batch through 1 adapter and through 4 (ids cycling): lorax_jax, and PEFT's
  ``adapter_names`` on the same weights and adapters when ``peft``."""
  batch = tokens.shape[0]
  pairs = adapters(params, lora, 4)
  stacked, cfg = lorax_jax.stack_adapters(params, pairs)
  ids = cycling_ids(batch, 4)
  inputs = jnp.asarray(tokens[:, :-1])
  one = lorax_jax.lora_transform(model.apply, params, CFGS[0].replace(dropout=0.0))
  many = lorax_jax.lora_transform(model.apply, params, cfg.replace(dropout=0.0))
  plain = compile_variant(Variant("forward", one, (params, lora, inputs)))
  mixed = compile_variant(Variant("forward", lambda p, s, x, i: many(p, s, x, adapter_ids=i),
                                  (params, stacked, inputs, jnp.asarray(ids))))
  rows = [timed(plain, "forward, 1 adapter (plain tree)", "forward, 1 adapter (plain tree)"),
          timed(mixed, "forward, 4 adapters stacked (ids n % 4)", "forward, 1 adapter (plain tree)")]
  if not peft:
    return rows
  import torch

  pm = peft_model(config, params, pairs, device).eval()
  x = torch.as_tensor(np.array(inputs), device=device)
  names = [peft_name(int(j)) for j in ids]

  def peft_forward(adapter_names: list[str] | None) -> Callable[[], Any]:
    def run():
      with torch.no_grad():
        logits = pm(input_ids=x, **({} if adapter_names is None else {"adapter_names": adapter_names})).logits
      if device == "cuda":
        torch.cuda.synchronize()
      return logits
    return run

  ours = mixed.run(*mixed.args)
  checks["forward 4 mixed: logits vs PEFT adapter_names"] = relative(
      peft_forward(names)().float().cpu().numpy(), ours)
  one_name = "PEFT forward, 1 adapter"
  return rows + [Row(one_name, one_name, peft_forward(None)),
                 Row("PEFT forward, 4 adapters (adapter_names, ids n % 4)", one_name, peft_forward(names))]


def decode_rows(model: Any, params: Any, lora: Any, vocab: int, batch: int, new_tokens: int,
                agreement: dict[str, float]) -> list[Row]:
  """`generate`, greedy, ``batch`` chat prompts of different lengths, ``new_tokens`` each: one
  adapter, a stacked tree of it (ids 0) and 4 adapters (ids cycling). Each runs once here (the
  compilation); ``agreement`` gets the fraction of tokens equal to the one-adapter decode's, for the
  stacked one and for the mixed batch's rows of adapter 0 (the same adapter)."""
  rng = np.random.default_rng(1)
  prompts = [[*SMOLLM2_CHAT_PROMPT, *rng.integers(100, vocab, 2 + 3 * n).tolist()] for n in range(batch)]
  pairs = adapters(params, lora, 4)
  one_name = "decode, 1 adapter (plain tree)"
  runs = {one_name: {"lora": lora, "cfg": CFGS[0]}}
  for k in (1, 4):
    stacked, cfg = lorax_jax.stack_adapters(params, pairs[:k])
    ids = cycling_ids(batch, k)
    runs[f"decode, {k} adapter{'s' * (k > 1)} stacked (ids {'all 0' if k == 1 else 'n % 4'})"] = {
        "lora": stacked, "cfg": cfg, "adapter_ids": ids.tolist()}
  call = {name: (lambda kw=kw: generate(model, params, prompts, max_new_tokens=new_tokens, **kw))
          for name, kw in runs.items()}
  out = {name: np.array(run()) for name, run in call.items()}
  plain = out[one_name]
  ones, mixed = list(out.values())[1:]
  agreement["decode 1 stacked: tokens equal to plain"] = float(np.mean(ones == plain))
  rows0 = cycling_ids(batch, 4) == 0
  agreement["decode 4 mixed: adapter 0's rows' tokens equal to plain"] = float(np.mean(mixed[rows0] == plain[rows0]))
  return [Row(name, one_name, run, tokens=batch * new_tokens) for name, run in call.items()]


def gather_branch(x: jax.Array, a: jax.Array, b: jax.Array, ids: jax.Array) -> jax.Array:
  """``(x_n · a[ids[n]]ᵀ) · b[ids[n]]`` for each example ``n``: the factors gathered per example
  (BGMV; the engine's `LoraKernel.per_example`). ``x [B, T, I]``, ``a [k, R, I]``, ``b [k, R, O]``."""
  t = jnp.einsum("bti,bri->btr", x, a[ids])
  return jnp.einsum("btr,bro->bto", t, b[ids])


def grouped_branch(x: jax.Array, a: jax.Array, b: jax.Array, ids: jax.Array) -> jax.Array:
  """`gather_branch` by grouping: the examples sorted by adapter, their rows through two
  ``lax.ragged_dot`` (group ``j``'s rows times ``a[j]ᵀ``, then ``b[j]``), then unsorted."""
  batch, seq, _ = x.shape
  order = jnp.argsort(ids)
  sizes = (jnp.bincount(ids, length=a.shape[0]) * seq).astype(jnp.int32)
  t = jax.lax.ragged_dot(x[order].reshape(batch * seq, -1), jnp.swapaxes(a, 1, 2), sizes)
  y = jax.lax.ragged_dot(t, b, sizes).reshape(batch, seq, -1)
  return y[jnp.argsort(order)]


BRANCHES = {"gather (BGMV einsum)": gather_branch, "sort + ragged_dot": grouped_branch}


def branch_variants(batch: int, seq: int, width: int, rank: int, k: int, grad: bool) -> list[Variant]:
  """One layer's LoRA branch, ``x [batch, seq, width]`` through ``k`` adapters of rank ``rank``
  (ids cycling), by each of `BRANCHES`: the branch, or with ``grad`` the gradient of
  ``<branch, ct>`` to ``x``, ``a`` and ``b`` (what the training step's backward computes)."""
  kx, ka, kb, kc = jax.random.split(jax.random.key(3), 4)
  x = jax.random.normal(kx, (batch, seq, width))
  a, b = (0.05 * jax.random.normal(key, (k, rank, width)) for key in (ka, kb))
  ids = jnp.asarray(cycling_ids(batch, k))
  out = []
  for name, fn in BRANCHES.items():
    if grad:
      ct = jax.random.normal(kc, (batch, seq, width))
      f = lambda x, a, b, ids, ct, fn=fn: jax.grad(lambda *v: jnp.vdot(fn(*v, ids), ct), argnums=(0, 1, 2))(x, a, b)
      out.append(Variant(name, f, (x, a, b, ids, ct)))
    else:
      out.append(Variant(name, fn, (x, a, b, ids)))
  return out


def branch_rows(batch: int, seq: int, width: int, rank: int, checks: dict[str, float]) -> list[Row]:
  """`branch_variants` at the training shape (forward and gradient) and at decode's (one token,
  forward), for 4 and 16 adapters; ratios to the gather row."""
  rows = []
  for k in COUNTS:
    for what, t, grad in (("train fwd", seq, False), ("train grad", seq, True), ("decode fwd", 1, False)):
      variants = branch_variants(batch, t, width, rank, k, grad)
      compiled = [compile_variant(v) for v in variants]
      ref = f"branch {what}, {k} adapters: {variants[0].name}"
      checks[f"branch {what}, {k} adapters: ragged_dot vs gather"] = relative(
          compiled[1].run(*compiled[1].args), compiled[0].run(*compiled[0].args))
      rows += [timed(c, f"branch {what}, {k} adapters: {v.name}", ref) for c, v in zip(compiled, variants)]
  return rows


TOLERANCE = 1e-4
PEFT_TOLERANCE = 1e-3  # PEFT's logits after 30 float32 layers in another framework: 8e-5 measured here


def tolerance(check: str) -> float:
  """The largest relative difference the check named ``check`` allows."""
  return PEFT_TOLERANCE if "PEFT" in check else TOLERANCE


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--reps", type=int, default=5, help="timed rounds (median reported)")
  p.add_argument("--warmup", type=int, default=2, help="untimed rounds after compilation")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=64)
  p.add_argument("--new_tokens", type=int, default=32, help="tokens each decode row generates per prompt")
  p.add_argument("--quick", action="store_true", help="a dry run: --reps 1 --warmup 0 --new_tokens 4")
  p.add_argument("--tiny", action="store_true", help="a two-layer Llama with random weights (bench.main's)")
  p.add_argument("--no-peft", action="store_true", help="skip the PEFT + torch rows")
  p.add_argument("--out", default=os.path.join("bench", "results"), help="folder for many_adapters-<backend>.json")
  args = p.parse_args(argv)
  if args.quick:
    args.reps, args.warmup, args.new_tokens = 1, 0, 4
  config, model, params, source = smollm2(args.tiny)
  print(f"[many] {source}", flush=True)
  tokens, weights, _ = chat_batch(config.vocab_size, args.batch, args.seq)
  lora = nonzero_lora(lorax_jax.init_lora(params, main_job_config(), jax.random.key(0)), jax.random.key(2))
  device = "cpu"
  if not args.no_peft:
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    device = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
  checks: dict[str, float] = {}
  agreement: dict[str, float] = {}
  q_proj = lorax_jax.find_targets(params, main_job_config())
  width = next(t.in_shape[0] for t in q_proj.values() if t.name.endswith("q_proj/kernel"))
  rows = (train_rows(model, params, lora, tokens, weights, checks)
          + forward_rows(config, model, params, lora, tokens, checks, not args.no_peft, device)
          + decode_rows(model, params, lora, config.vocab_size, args.batch, args.new_tokens, agreement)
          + branch_rows(args.batch, args.seq, width, max(c.r for c in CFGS), checks))
  print(f"[many] checks (relative differences): {checks}", flush=True)
  print(f"[many] decode agreement: {agreement}", flush=True)
  bad = {k: v for k, v in checks.items() if not v <= tolerance(k)}
  if bad:
    raise RuntimeError(f"rows that should compute the same thing differ by more than {TOLERANCE} "
                       f"({PEFT_TOLERANCE} against PEFT): {bad}")
  times = round_robin({r.name: r.run for r in rows}, args.reps, args.warmup)
  out = {}
  for r in rows:
    wall = statistics.median(w for w, _ in times[r.name])
    cpu = statistics.median(c for _, c in times[r.name])
    out[r.name] = {"reference": r.group, "median_s": wall, "cpu_median_s": cpu,
                   "times_s": [w for w, _ in times[r.name]], **r.cost,
                   **({"tokens_per_s": r.tokens / wall} if r.tokens else {})}
  meta = {"jax": jax.__version__, "backend": jax.default_backend(), "torch_device": device, "cpus": os.cpu_count(),
          "machine": platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "model": source,
          "batch": args.batch, "seq": args.seq, "new_tokens": args.new_tokens, "reps": args.reps,
          "warmup": args.warmup, "adapters": [f"r={c.r} alpha={c.alpha:g}" for c in CFGS], "checks": checks,
          "decode_agreement": agreement}
  return report("many_adapters", args.out, meta, out, table(meta, out))


def table(meta: dict[str, Any], rows: dict[str, dict[str, Any]]) -> str:
  """The markdown table of one run; each ratio is to the row's reference (its group's one-adapter
  row, or the gather row): wall time (decode: tokens/s) and compiled FLOPs."""
  lines = [f"Many adapters, batch {meta['batch']} x {meta['seq']} tokens, {meta['backend']} / torch on "
           f"{meta['torch_device']}, {meta['cpus']} CPUs, median of {meta['reps']} ({meta['model']}):", "",
           "| row | GFLOP | GB accessed | temp MiB | median ms | tokens/s | wall ratio | FLOP ratio |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for name, r in rows.items():
    ref = rows[r["reference"]]
    cost = (f"{r['flops'] / 1e9:.4g} | {r['bytes_accessed'] / 1e9:.4g} | {r['temp_bytes'] / 2**20:.1f}"
            if "flops" in r else " | | ")
    speed = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else ""
    wall = (f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x tok/s" if "tokens_per_s" in r
            else f"{r['median_s'] / ref['median_s']:.2f}")
    flops = f"{r['flops'] / ref['flops']:.3f}" if "flops" in r and ref.get("flops") else ""
    lines.append(f"| {name} | {cost} | {r['median_s'] * 1e3:.1f} | {speed} | {wall} | {flops} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
