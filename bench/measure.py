"""Compile, read XLA's cost and memory analyses, and time variants interleaved round-robin."""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from bench.variants import Variant


@dataclasses.dataclass
class Compiled:
  name: str
  run: Any  # the compiled executable
  args: tuple[Any, ...]
  compile_s: float
  flops: float
  bytes_accessed: float
  temp_bytes: int
  arg_bytes: int
  out_bytes: int


def compile_variant(v: Variant) -> Compiled:
  """``jit(v.fn).lower(*v.args).compile()``, timed, with XLA's cost and memory analyses."""
  t0 = time.perf_counter()
  compiled = jax.jit(v.fn).lower(*v.args).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  if isinstance(cost, Sequence):  # older jax: one dict per computation
    cost = cost[0]
  mem = compiled.memory_analysis()
  return Compiled(v.name, compiled, v.args, compile_s, float(cost.get("flops", 0.0)),
                  float(cost.get("bytes accessed", 0.0)), int(mem.temp_size_in_bytes),
                  int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes))


def round_robin(steps: dict[str, Callable[[], Any]], reps: int, warmup: int) -> dict[str, list[tuple[float, float]]]:
  """``(wall, cpu)`` seconds of every call of each step: ``warmup`` untimed rounds, then ``reps``
  timed rounds, each calling every step once; the order rotates by one every round, so no step
  always runs right after the same other one. CPU time (all threads of this process) leaves out
  time spent waiting for a core, so it is the steadier figure on a shared machine."""
  names = list(steps)
  times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
  for rnd in range(warmup + reps):
    for j in range(len(names)):
      name = names[(j + rnd) % len(names)]
      t0, c0 = time.perf_counter(), time.process_time()
      steps[name]()
      if rnd >= warmup:
        times[name].append((time.perf_counter() - t0, time.process_time() - c0))
  return times


def time_interleaved(compiled: Sequence[Compiled], reps: int = 7, warmup: int = 2
                     ) -> dict[str, list[tuple[float, float]]]:
  """`round_robin` over compiled variants: ``(wall, cpu)`` seconds per call of each."""
  return round_robin({c.name: lambda c=c: jax.block_until_ready(c.run(*c.args)) for c in compiled}, reps, warmup)


def bench_args(doc: str, reps: int, reps_help: str, argv: list[str] | None) -> argparse.Namespace:
  """A bench's command line: ``--reps`` (default ``reps``) and ``--out`` (a JSON copy of the result);
  ``doc``'s first line is the description."""
  p = argparse.ArgumentParser(description=doc.splitlines()[0])
  p.add_argument("--reps", type=int, default=reps, help=reps_help)
  p.add_argument("--out", default=None, help="write the JSON result here too")
  return p.parse_args(argv)


def summarize(times: list[tuple[float, float]]) -> dict[str, Any]:
  wall, cpu = [w for w, _ in times], [c for _, c in times]
  return {"median_s": statistics.median(wall), "min_s": min(wall), "max_s": max(wall), "n": len(wall),
          "cpu_median_s": statistics.median(cpu), "times_s": wall, "cpu_s": cpu}
