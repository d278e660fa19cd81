"""Measure a proposed engine change: ``python -m bench.compare NNN-name [--case CASE] [--reps N]``.

``bench/proposals/NNN-name.diff`` is applied (with ``patch``) to a temporary copy of
``lorax_jax/transform.py``; ``lorax_jax/`` is never touched. The proposal's factored train step runs interleaved with the current engine's,
the reference (merged) step and the lower bound on the same case; the output says whether
its loss and gradients equal the reference's and the wall-time ratios to the lower bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from types import ModuleType

from bench import cases as cases_lib
from bench.measure import compile_variant, summarize, time_interleaved
from bench.run import _checks
from bench.variants import build


def load_proposal(name: str) -> ModuleType:
  """``lorax_jax/transform.py`` with ``bench/proposals/{name}.diff`` applied, as a module."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  tmp = tempfile.mkdtemp(prefix="lorax-proposal-")
  target = os.path.join(tmp, "transform.py")
  shutil.copy(os.path.join(root, "lorax_jax", "transform.py"), target)
  subprocess.run(["patch", "-s", target, os.path.join(root, "bench", "proposals", f"{name}.diff")], check=True)
  spec = importlib.util.spec_from_file_location(f"proposal_{name.replace('-', '_')}", target)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("name", help="a proposal in bench/proposals, e.g. 001-shared-down-projection")
  p.add_argument("--case", default="gpt-d512-r8")
  p.add_argument("--reps", type=int, default=9)
  args = p.parse_args(argv)
  engine = load_proposal(args.name)
  case = next(c for c in cases_lib.cases(False) + cases_lib.cases(True) if c.name == args.case)
  setup, _ = cases_lib.setup(case)
  current = build(setup, ("lower_bound", "factored", "reference"))
  proposed = build(setup, ("factored",), engine.lora_transform(setup.model.apply, setup.params, setup.cfg))[0]
  proposed = dataclasses.replace(proposed, name=args.name)
  variants = [*current, proposed]
  compiled = [compile_variant(v) for v in variants]
  outs = {c.name: c.run(*c.args) for c in compiled}
  # _checks compares every variant to "factored": the proposal and reference against the current engine.
  checks = _checks(variants, outs)
  times = time_interleaved(compiled, reps=args.reps)
  lower = summarize(times["lower_bound"])
  rows = {}
  for c in compiled:
    row = summarize(times[c.name])
    rows[c.name] = {"flops_x": c.flops / compiled[0].flops, "bytes_x": c.bytes_accessed / compiled[0].bytes_accessed,
                    "temp_mb": c.temp_bytes / 2**20, "wall_x": row["median_s"] / lower["median_s"],
                    "min_wall_x": row["min_s"] / lower["min_s"], "cpu_x": row["cpu_median_s"] / lower["cpu_median_s"],
                    **{k: v for k, v in row.items() if not k.endswith("times_s") and k != "cpu_s"}}
  print(json.dumps({"case": args.case, "checks": checks, "variants": rows}, indent=1))


if __name__ == "__main__":
  main()
