"""Compile, read XLA's cost and memory analyses, and time variants interleaved round-robin."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence
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


def time_interleaved(compiled: Sequence[Compiled], reps: int = 7, warmup: int = 2
                     ) -> dict[str, list[tuple[float, float]]]:
  """``(wall, cpu)`` seconds per call of each variant: ``warmup`` untimed rounds, then ``reps``
  timed rounds, each running every variant once; the order rotates every round so no variant
  is always first after another. CPU time (all threads of this process) does not count time
  spent waiting for a core, so it is the steadier figure on a shared machine."""
  times: dict[str, list[tuple[float, float]]] = {c.name: [] for c in compiled}
  n = len(compiled)
  for rnd in range(warmup + reps):
    for j in range(n):
      c = compiled[(j + rnd) % n]
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(c.run(*c.args))
      if rnd >= warmup:
        times[c.name].append((time.perf_counter() - t0, time.process_time() - c0))
  return times


def summarize(times: list[tuple[float, float]]) -> dict[str, Any]:
  wall, cpu = [w for w, _ in times], [c for _, c in times]
  return {"median_s": statistics.median(wall), "min_s": min(wall), "max_s": max(wall), "n": len(wall),
          "cpu_median_s": statistics.median(cpu), "times_s": wall, "cpu_s": cpu}
