"""The benchmark suite's quick subset runs (CI runs it; no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quick_benchmark_runs_and_all_lora_variants_agree(tmp_path):
  pytest.importorskip("qwix")
  md = tmp_path / "BENCHMARKS.md"
  result = subprocess.run(
      [sys.executable, "-m", "bench.run", "--quick", "--reps", "1", "--out", str(tmp_path), "--md", str(md)],
      cwd=ROOT, capture_output=True, text=True, timeout=1200)
  assert result.returncode == 0, result.stderr[-3000:]
  (saved,) = [json.loads(p.read_text()) for p in tmp_path.glob("results-*.json")]
  (case,) = saved["results"]
  variants = case["variants"]
  assert {"lower_bound", "factored", "factored_dropout", "reference", "full", "nnx_lora", "qwix_lora",
          "qwix_lora_dropout"} <= set(variants)
  # Every LoRA variant computes the same loss and gradients as lorax_jax factored.
  assert case["checks"] and all(v < 1e-4 for v in case["checks"].values()), case["checks"]
  # Compiled FLOPs are deterministic: factored adds little to the lower bound, merged adds a lot.
  flops = {name: v["flops"] for name, v in variants.items()}
  assert flops["factored"] < 1.1 * flops["lower_bound"] < flops["reference"]
  # Dropout draws masks: more work than without, never less.
  assert flops["factored_dropout"] > flops["factored"]
  # The report holds one table row per variant, with its compiled FLOPs.
  rows = {line.split(" | ")[0][2:]: line for line in md.read_text().splitlines() if line.startswith("| ")}
  assert f"| {variants['factored']['flops'] / 1e9:.2f} |" in rows["lorax_jax factored"]
  assert "Qwix, dropout 0.05" in rows
