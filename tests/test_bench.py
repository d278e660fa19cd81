"""The benchmark suite's quick subset runs (CI runs it; no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_script_dry_run_on_the_cpu(tmp_path):
  """``bench/gpu.sh --dry-run``: the GPU machine's script, on the CPU at tiny sizes, so it cannot rot
  before a GPU is lent. Its main-job rows agree with PEFT's loss and its suite case with itself."""
  pytest.importorskip("qwix")
  pytest.importorskip("peft")
  env = {**os.environ, "PY": sys.executable, "RESULTS": str(tmp_path)}
  result = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  main = json.loads((tmp_path / "main-cpu.json").read_text())
  assert main["meta"]["backend"] == "cpu" and "tiny" in main["meta"]["model"]
  losses = main["meta"]["losses"]  # dropout 0: lorax_jax plain, with its options, and PEFT + torch
  assert set(losses) == {"plain", "options", "peft"}
  assert all(abs(v - losses["plain"]) <= 1e-4 * abs(losses["plain"]) for v in losses.values()), losses
  assert {"lorax_jax plain, dropout 0.05", "PEFT + torch, dropout 0.05"} <= set(main["rows"])
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
  # The report links the case's page, which holds one table row per variant, with its compiled FLOPs.
  (page,) = tmp_path.glob(f"{case['case']['name']}-*.md")
  assert f"]({page.name})" in (tmp_path / "BENCHMARKS-gpu.md").read_text()
  rows = {line.split(" | ")[0][2:]: line for line in page.read_text().splitlines() if line.startswith("| ")}
  assert f"| {variants['factored']['flops'] / 1e9:.2f} |" in rows["lorax_jax factored"]
  assert "Qwix, dropout 0.05" in rows


def test_passes_attribute_every_byte_and_name_the_small_rank_dots():
  """`bench.passes` on a tiny GPT: the bytes charged to passes add up to XLA's bytes accessed for
  both steps, and the small-rank dots it finds carry exactly the FLOPs of the six adapter dots
  of every target, counted by hand from the kernels' shapes (none in the lower bound)."""
  import lorax_jax
  from bench import passes
  from bench.cases import Case, setup

  case = Case("tiny", "gpt", d=128, layers=1, r=8, batch=1, seq=64)
  result = passes.analyse(case, dropout=0.0, peers=("lower_bound",))
  assert set(result) == {"lower_bound", "factored"}
  for name, r in result.items():
    attributed = sum(p.mb for p in r["passes"].values()) * 1e6
    assert abs(attributed - r["bytes"]) <= passes.TOLERANCE * r["bytes"], name
  s, _ = setup(case)
  n, rank = case.batch * case.seq, case.r
  kernels = [lorax_jax.paths.get_path(s.params, t.path).shape for t in lorax_jax.find_targets(s.params, s.cfg).values()]
  fan_in, fan_out = sum(k[0] for k in kernels), sum(k[1] for k in kernels)
  by_pass = lambda name, kind: {k: p for k, p in result[name]["passes"].items() if k[0] == kind}
  mflop = lambda name, kind: sum(p.mflop for p in by_pass(name, kind).values())
  expected = {"t = x·Aᵀ": fan_in, "dA = dtᵀx": fan_in, "t·B": fan_out, "dt = dy·Bᵀ": fan_out, "dB = tᵀdy": fan_out}
  for kind, width in expected.items():
    assert mflop("factored", kind) == pytest.approx(2 * n * rank * width / 1e6), kind
    assert sum(p.count for p in by_pass("factored", kind).values()) == len(kernels), kind
    assert not by_pass("lower_bound", kind)
  # dx += dt·A everywhere but the first block's q, k, v: their input is the embedding, which LoRA
  # does not differentiate (the lower bound does, through its delta on the embedding).
  first_qkv = 3 * case.d
  assert mflop("factored", "dx += dt·A") == pytest.approx(2 * n * rank * (fan_in - first_qkv) / 1e6)
  # lorax_jax's extra bytes over the lower bound include every small-rank dot's pass.
  extra = {k: p.mb - result["lower_bound"]["passes"].get(k, passes.Pass()).mb
           for k, p in result["factored"]["passes"].items() if k[0] in passes.SMALL_RANK}
  assert extra and all(v > 0 for v in extra.values())


def test_round_robin_rotates_the_order_and_times_every_call():
  from bench.measure import round_robin

  calls = []
  steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
  times = round_robin(steps, reps=4, warmup=2)
  assert len(calls) == 3 * 6 and {calls.count(n) for n in "abc"} == {6}
  rounds = [calls[i:i + 3] for i in range(0, len(calls), 3)]
  assert [r[0] for r in rounds] == ["a", "b", "c", "a", "b", "c"]  # each round starts one later
  assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
  assert {n: len(t) for n, t in times.items()} == {"a": 4, "b": 4, "c": 4}
  assert all(wall >= 0 and cpu >= 0 for t in times.values() for wall, cpu in t)


def test_every_lora_train_case_also_runs_with_dropout():
  from bench.cases import cases

  for case in cases(quick=False) + cases(quick=True):
    for name in ("factored", "qwix_lora", "dora"):
      if name in case.variants:
        assert f"{name}_dropout" in case.variants, (case.name, name)


def test_gpu_script_parses_and_calls_modules_that_exist():
  import importlib.util
  import re
  import shutil

  script = os.path.join(ROOT, "bench", "gpu.sh")
  if shutil.which("bash"):
    subprocess.run(["bash", "-n", script], check=True)
  with open(script) as f:
    text = f.read()
  modules = set(re.findall(r'"\$PY" -m (bench\.\w+)', text))
  assert {"bench.main", "bench.run"} <= modules
  assert all(importlib.util.find_spec(m) is not None for m in modules), modules
  # Nothing is fetched there: every pip call installs from carried wheels only.
  assert all("--no-index" in line for line in text.splitlines() if re.search(r"\bpip install\b", line)
             and not line.lstrip().startswith("#"))


def _toy_llama():
  """A one-layer Llama with a small vocabulary, its params, and a batch of 4 x 12 tokens."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from lorax_jax.models.llama import Llama, LlamaConfig

  config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16)
  model = Llama(config)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, config.vocab_size, (4, 13)).astype(np.int32)
  weights = (rng.random((4, 13)) < 0.7).astype(np.float32)
  return model, params, tokens, weights


def test_many_adapters_rows_compute_the_same_loss_and_gradient():
  """`bench.many_adapters` at a toy shape: the stacked one-adapter step (ids all 0) computes the plain
  step's loss, gradient and update; each mixed batch's loss is each adapter alone on its own rows;
  sort + ragged_dot gives the gather's branch and gradients."""
  import jax
  import numpy as np

  import lorax_jax
  from bench import many_adapters as ma
  from bench.main import main_job_config
  from bench.variants import nonzero_lora

  model, params, tokens, weights = _toy_llama()
  lora = nonzero_lora(lorax_jax.init_lora(params, main_job_config(), jax.random.key(0)), jax.random.key(2))
  checks = {}
  rows = ma.train_variants(model, params, lora, tokens, weights, checks, counts=(4,))
  assert [name.split(" (")[0] for name, _, _ in rows] == [
      "train, 1 adapter", "train, 1 adapter stacked", "train, 4 adapters stacked"]
  assert set(checks) == {"train 1 stacked: loss vs plain", "train 1 stacked: gradient vs plain",
                         "train 4 mixed: loss vs each adapter alone"}
  assert all(v < 1e-5 for v in checks.values()), checks
  # The timed steps themselves (dropout 0.05, the same key): one step of each from the same start.
  (_, plain, _), (_, one, _) = rows[:2]
  new_plain, _, loss_plain = jax.jit(plain.fn)(*plain.args)
  new_one, _, loss_one = jax.jit(one.fn)(*one.args)
  assert abs(float(loss_one) - float(loss_plain)) <= 1e-6 * abs(float(loss_plain))
  for got, want in zip(jax.tree.leaves(ma.adapter_factors(new_one, 0)), jax.tree.leaves(new_plain)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  for grad in (False, True):
    gather, grouped = (jax.jit(v.fn)(*v.args) for v in ma.branch_variants(4, 6, 32, 16, 3, grad))
    for got, want in zip(jax.tree.leaves(grouped), jax.tree.leaves(gather)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_many_adapters_script_end_to_end(tmp_path):
  """``python -m bench.many_adapters --tiny --quick``: every row of the table, its checks (PEFT's
  ``adapter_names`` logits included) within the script's tolerance, the stacked decodes' tokens
  those of the plain one, and compiled FLOPs for every JAX row."""
  pytest.importorskip("peft")
  from bench import many_adapters

  result = many_adapters.main(["--tiny", "--quick", "--out", str(tmp_path)])
  saved = json.loads((tmp_path / "many_adapters-cpu.json").read_text())
  assert saved["rows"].keys() == result["rows"].keys()
  rows, meta = saved["rows"], saved["meta"]
  assert {"train, 16 adapters stacked (ids n % 16)", "decode, 4 adapters stacked (ids n % 4)",
          "PEFT forward, 4 adapters (adapter_names, ids n % 4)"} <= set(rows)
  assert "forward 4 mixed: logits vs PEFT adapter_names" in meta["checks"]
  assert all(v <= many_adapters.tolerance(k) for k, v in meta["checks"].items()), meta["checks"]
  assert set(meta["decode_agreement"].values()) == {1.0}
  assert all(r["flops"] > 0 for name, r in rows.items() if not name.startswith(("PEFT", "decode")))
