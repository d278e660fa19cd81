"""QLoRA memory on SmolLM2-135M: a LoRA train step on float32, bfloat16, int8, nf4 and GGUF-Q4_1 bases.

    python -m bench.qlora [--batch 4] [--seq 128] [--rank 8] [--time] [--no-qwix]

Each base is one params tree; the quantized ones hold `QArray` leaves and run through
``dequantize_at_use(lora_transform(model.apply, abstract(qparams), cfg))``, so the packed
kernels are the step's arguments and each is dequantized at its use. The table gives XLA's
compiled ``memory_analysis()`` of ``step(lora, opt_state, params, ids) -> (loss, lora,
opt_state)`` (adam): argument bytes (params + LoRA + optimizer state + ids) and temporary
bytes, and the ratios to the float32 base. Qwix's ``LoraProvider(weight_qtype="nf4")`` on the
same model and batch is the last row (it quantizes the float32 weights inside the step).
``--time`` adds the median step time (meaningful on an idle machine only).
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
from lorax_jax.models.gguf import load_smollm2


def cross_entropy(logits: jax.Array, ids: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
  return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))


def lorax_step(model: Any, params: Any, cfg: lj.LoraConfig, opt: optax.GradientTransformation) -> Callable[..., Any]:
  """The adam step of lorax_jax's LoRA on ``params`` (float, or holding QArrays)."""
  apply = lj.lora_transform(model.apply, Q.abstract(params), cfg, strict=True)
  if any(Q.is_quantized(x) for x in jax.tree.leaves(params, is_leaf=Q.is_quantized)):
    apply = Q.dequantize_at_use(apply)

  def step(lora, opt_state, params, ids):
    loss, grads = jax.value_and_grad(lambda lo: cross_entropy(apply(params, lo, ids), ids))(lora)
    updates, opt_state = opt.update(grads, opt_state, lora)
    return loss, optax.apply_updates(lora, updates), opt_state
  return step


def qwix_step(model: Any, params: Any, cfg: lj.LoraConfig, opt: optax.GradientTransformation,
              ids: jax.Array) -> tuple[Callable[..., Any], Any]:
  """Qwix's nf4 QLoRA step (``LoraProvider(weight_qtype="nf4")``) and its LoRA params."""
  import qwix
  provider = qwix.LoraProvider(module_path=".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
                               rank=cfg.r, alpha=float(cfg.alpha), weight_qtype="nf4")
  qmodel = qwix.apply_lora_to_model(model, provider)
  variables = qmodel.init(jax.random.key(0), ids)
  lora = {"params": _lora_only(variables["params"])}

  def step(lora, opt_state, params, ids):
    def loss(lo):
      return cross_entropy(qmodel.apply(_merge_trees(params, lo), ids), ids)
    value, grads = jax.value_and_grad(loss)(lora)
    updates, opt_state = opt.update(grads, opt_state, lora)
    return value, optax.apply_updates(lora, updates), opt_state
  return step, lora


def _lora_only(tree: Any) -> Any:
  if not isinstance(tree, dict):
    return None
  out = {k: v if "lora" in k else _lora_only(v) for k, v in tree.items()}
  return {k: v for k, v in out.items() if v is not None and not (isinstance(v, dict) and not v)}


def _merge_trees(a: Any, b: Any) -> Any:
  if not isinstance(b, dict):
    return b
  return {**a, **{k: _merge_trees(a.get(k, {}), v) for k, v in b.items()}}


def measure(name: str, step: Callable[..., Any], args: tuple[Any, ...], timing: bool) -> dict[str, Any]:
  compiled = jax.jit(step).lower(*args).compile()
  stats = compiled.memory_analysis()
  row = {"base": name, "argument": stats.argument_size_in_bytes, "temp": stats.temp_size_in_bytes}
  if timing:
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(5):
      start = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times.append(time.perf_counter() - start)
    row["step_ms"] = 1e3 * float(np.median(times))
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--time", action="store_true", help="also time the steps (idle machine only)")
  parser.add_argument("--no-qwix", action="store_true")
  args = parser.parse_args()

  _, model, params, _ = load_smollm2()
  _, _, gguf_params, _ = load_smollm2(quantized=True)
  ids = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, 49152)
  cfg = lj.LoraConfig(r=args.rank, alpha=2.0 * args.rank, targets="all-linear")
  opt = optax.adam(1e-4)
  bases = {
      "float32": params,
      "bfloat16": jax.tree.map(lambda x: x.astype(jnp.bfloat16), params),
      "int8": Q.quantize(params, "int8", block_size=None),
      "nf4": Q.quantize(params, "nf4"),
      "gguf-Q4_1": gguf_params,
  }
  rows = []
  for name, base in bases.items():
    lora = lj.init_lora(Q.abstract(base), cfg, jax.random.key(1))
    rows.append(measure(name, lorax_step(model, base, cfg, opt), (lora, opt.init(lora), base, ids), args.time))
    print(rows[-1], flush=True)
  if not args.no_qwix:
    try:
      step, lora = qwix_step(model, params, cfg, opt, ids)
      rows.append(measure("qwix-nf4", step, (lora, opt.init(lora), params, ids), args.time))
    except Exception as e:  # report and keep the table
      print(f"qwix nf4: {type(e).__name__}: {e}")
  ref = rows[0]
  print(f"\nSmolLM2-135M LoRA r={args.rank} all-linear, batch {args.batch}x{args.seq}, adam")
  header = f"{'base':<11} {'argument MB':>12} {'temp MB':>9} {'arg+temp MB':>12} {'arg / f32':>10} {'(arg+temp) / f32':>17}"
  print(header + (f" {'step ms':>9}" if args.time else ""))
  for r in rows:
    total = r["argument"] + r["temp"]
    line = (f"{r['base']:<11} {r['argument'] / 1e6:>12.1f} {r['temp'] / 1e6:>9.1f} {total / 1e6:>12.1f} "
            f"{r['argument'] / ref['argument']:>10.3f} {total / (ref['argument'] + ref['temp']):>17.3f}")
    print(line + (f" {r['step_ms']:>9.1f}" if args.time else ""))


if __name__ == "__main__":
  main()
