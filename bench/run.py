"""Run the benchmark suite: ``python -m bench.run [--quick] [--out DIR] [--only CASE ...]``.

Writes ``results.json`` and PNG plots to ``--out`` (default ``bench/results``) and the
report to ``BENCHMARKS.md`` (``--md``). Every case compiles its variants, checks that all
LoRA variants compute the same loss and gradients (and factored ≡ merged forward), then
times them interleaved round-robin.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from typing import Any

import jax
import numpy as np

import lorax_jax
from bench import cases as cases_lib
from bench import report
from bench.measure import compile_variant, summarize, time_interleaved
from bench.variants import build
from lorax_jax.files import write_text_atomic


SHARED = ("lower_bound", "full", "base_fwd")  # independent of the rank: compiled once per model


def run_case(case: cases_lib.Case, reps: int, warmup: int, cache: dict[Any, Any]) -> dict[str, Any]:
  setup, source = cases_lib.setup(case)
  variants = build(setup, case.variants)
  model_key = (case.model, case.d, case.layers, case.batch, case.seq)
  compiled = []
  for v in variants:
    key = (model_key, v.name)
    c = cache.get(key) or compile_variant(v)
    if v.name in SHARED:
      cache[key] = c
    compiled.append(c)
  outs = {c.name: c.run(*c.args) for c in compiled}
  checks = _checks(variants, outs)
  times = time_interleaved(compiled, reps=reps, warmup=warmup)
  rows = {}
  for c in compiled:
    rows[c.name] = {"flops": c.flops, "bytes_accessed": c.bytes_accessed, "temp_bytes": c.temp_bytes,
                    "arg_bytes": c.arg_bytes, "out_bytes": c.out_bytes, "compile_s": c.compile_s,
                    **summarize(times[c.name])}
  result = {"case": case.__dict__, "model": source, "variants": rows, "checks": checks,
            "lora_params": lorax_jax.lora_count(setup.params, setup.cfg),
            "params": lorax_jax.count(setup.params)}
  result["extras"] = _extras(setup) if case.variants[0] == "lower_bound" and "full" in case.variants else {}
  return result


def _checks(variants, outs) -> dict[str, float]:
  """Relative differences to lorax_jax factored: loss, gradients (lorax layout), forward."""
  checks = {}
  if "factored" in outs:
    loss = float(outs["factored"][0])
    grads = next(v for v in variants if v.name == "factored").grads_to_lorax(outs["factored"][1])
    for v in variants:
      if v.grads_to_lorax is None or v.name == "factored":
        continue
      g = v.grads_to_lorax(outs[v.name][1])
      checks[f"{v.name}.loss"] = abs(float(outs[v.name][0]) - loss) / abs(loss)
      checks[f"{v.name}.grad"] = max(float(np.max(np.abs(g[k] - grads[k])) / np.max(np.abs(grads[k])))
                                     for k in grads)
  if "factored_fwd" in outs and "merged_fwd" in outs:
    a, b = np.asarray(outs["factored_fwd"]), np.asarray(outs["merged_fwd"])
    checks["factored_fwd.vs_merged"] = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
  return checks


def _extras(setup) -> dict[str, float]:
  """Seconds to merge (jitted, after warm-up) and to save and load the adapter."""
  merge = jax.jit(lambda p, lo: lorax_jax.merge(p, lo, setup.cfg))
  jax.block_until_ready(merge(setup.params, setup.lora))
  t = []
  for _ in range(5):
    t0 = time.perf_counter()
    jax.block_until_ready(merge(setup.params, setup.lora))
    t.append(time.perf_counter() - t0)
  out = {"merge_s": float(np.median(t))}
  io = _adapter_io()
  if io is not None:
    save, load = io
    with tempfile.TemporaryDirectory() as d:
      t0 = time.perf_counter()
      save(d, setup.lora, setup.cfg, setup.params)
      out["save_s"] = time.perf_counter() - t0
      t0 = time.perf_counter()
      jax.block_until_ready(load(d, setup.params))
      out["load_s"] = time.perf_counter() - t0
  return out


def _adapter_io():
  """``(save(dir, lora, cfg, params), load(dir, params) -> lora)`` from lorax_jax.io, if it has landed."""
  try:
    from lorax_jax.io import load_adapter, save_adapter
  except ImportError:
    return None
  return (lambda d, lora, cfg, params: save_adapter(d, lora, cfg, params),
          lambda d, params: load_adapter(d, params)[0])


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="a small subset (CI), under 2 minutes")
  p.add_argument("--out", default=os.path.join("bench", "results"), help="folder for JSON and plots")
  p.add_argument("--md", default="BENCHMARKS.md", help="the report to write")
  p.add_argument("--only", nargs="*", help="run only these case names")
  p.add_argument("--reps", type=int, help="timed rounds (default 7; 3 with --quick)")
  p.add_argument("--render", metavar="JSON", help="only rewrite --md from an earlier results JSON")
  args = p.parse_args(argv)
  if args.render:
    with open(args.render) as f:
      saved = json.load(f)
    pngs = report.plots(saved["results"], os.path.dirname(args.render), _tag(saved["meta"]))
    write_text_atomic(args.md, report.markdown(saved["meta"], saved["results"], pngs,
                                               os.path.dirname(os.path.abspath(args.md)),
                                               os.path.dirname(args.render), _tag(saved["meta"])))
    return
  t0 = time.perf_counter()
  todo = [c for c in cases_lib.cases(args.quick) if not args.only or c.name in args.only]
  reps = args.reps or (3 if args.quick else 7)
  meta = {"jax": jax.__version__, "backend": jax.default_backend(),
          "device": str(jax.devices()[0].device_kind), "cpus": os.cpu_count(),
          "machine": platform.machine(), "quick": args.quick, "date": time.strftime("%Y-%m-%d")}
  json_path = os.path.join(args.out, f"results-{_tag(meta)}.json")
  results, cache = [], {}
  for case in todo:
    print(f"[bench] {case.name} ...", flush=True)
    results.append(run_case(case, reps=reps, warmup=1 if args.quick else 2, cache=cache))
    print(report.case_line(results[-1]), flush=True)
    meta["total_s"] = time.perf_counter() - t0
    write_text_atomic(json_path, json.dumps({"meta": meta, "results": results}, indent=1))
  plots = report.plots(results, args.out, _tag(meta))
  write_text_atomic(args.md, report.markdown(meta, results, plots, os.path.dirname(os.path.abspath(args.md)),
                                             args.out, _tag(meta)))
  print(f"[bench] wrote {args.md} and {args.out} in {meta['total_s']:.0f}s", flush=True)


def _tag(meta: dict[str, Any]) -> str:
  return f"{meta['backend']}{'-quick' if meta['quick'] else ''}"


if __name__ == "__main__":
  main()
