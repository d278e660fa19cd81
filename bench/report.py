"""BENCHMARKS.md and the PNG plots, from the suite's results."""

from __future__ import annotations

import os
from typing import Any

from bench.variants import INFER
from lorax_jax.files import write_text_atomic

ANALYSIS = os.path.join(os.path.dirname(__file__), "analysis.md")
PEERS = ("factored", "factored_dropout", "reference", "nnx_lora", "qwix_lora", "qwix_lora_dropout", "full", "dora",
         "dora_dropout")
LABELS = {"lower_bound": "frozen lower bound", "factored": "lorax_jax factored",
          "factored_dropout": "lorax_jax factored, dropout 0.05", "qwix_lora_dropout": "Qwix, dropout 0.05",
          "dora": "lorax_jax DoRA (factored)", "dora_dropout": "lorax_jax DoRA (factored), dropout 0.05",
          "reference": "lorax_jax reference (merged W')", "full": "full fine-tuning",
          "nnx_lora": "Flax NNX LoRALinear", "qwix_lora": "Qwix LoraProvider",
          "base_fwd": "forward: base model", "factored_fwd": "forward: lorax_jax factored",
          "merged_fwd": "forward: merged adapter"}


def _base(name: str) -> str:
  return "base_fwd" if name in INFER else "lower_bound"


def ratio(result: dict[str, Any], name: str, key: str) -> float | None:
  rows = result["variants"]
  base = rows.get(_base(name))
  if base is None or not base.get(key) or key not in rows[name]:
    return None
  return rows[name][key] / base[key]


def case_line(result: dict[str, Any]) -> str:
  parts = [f"{n}={ratio(result, n, 'median_s'):.2f}x" for n in result["variants"] if ratio(result, n, "median_s")]
  return f"  {result['case']['name']}: " + " ".join(parts)


def _fmt(x: float | None, spec: str = ".2f") -> str:
  return "–" if x is None else format(x, spec)


def case_table(result: dict[str, Any]) -> str:
  lines = ["| variant | GFLOPs | × | GB accessed | × | temp MB | × | args MB | compile s | "
           "median ms | × | min–max ms | CPU ms | × |", "|" + "---|" * 14]
  for name, v in result["variants"].items():
    r = lambda key: _fmt(ratio(result, name, key))
    lines.append(
        f"| {LABELS.get(name, name)} | {v['flops'] / 1e9:.2f} | {r('flops')} | "
        f"{v['bytes_accessed'] / 1e9:.2f} | {r('bytes_accessed')} | {v['temp_bytes'] / 2**20:.1f} | "
        f"{r('temp_bytes')} | {v['arg_bytes'] / 2**20:.1f} | {v['compile_s']:.1f} | "
        f"{v['median_s'] * 1e3:.0f} | {r('median_s')} | {v['min_s'] * 1e3:.0f}–{v['max_s'] * 1e3:.0f} | "
        f"{_fmt(v.get('cpu_median_s') and v['cpu_median_s'] * 1e3, '.0f')} | {r('cpu_median_s')} |")
  return "\n".join(lines)


def summary_table(results: list[dict[str, Any]]) -> str:
  names = [n for n in PEERS if any(n in r["variants"] for r in results)]
  lines = ["| case | " + " | ".join(LABELS[n] for n in names) + " | merged fwd / base fwd |",
           "|" + "---|" * (len(names) + 2)]
  for r in results:
    cells = [_fmt(ratio(r, n, "median_s")) + " (" + _fmt(ratio(r, n, "flops")) + ")" if n in r["variants"]
             else "–" for n in names]
    merged = _fmt(ratio(r, "merged_fwd", "median_s")) if "merged_fwd" in r["variants"] else "–"
    lines.append(f"| {r['case']['name']} | " + " | ".join(cells) + f" | {merged} |")
  return "\n".join(lines)


def plots(results: list[dict[str, Any]], out: str, tag: str) -> list[str]:
  """Wall-time ratio to the lower bound against rank and against width; PNG paths."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  made = []
  for axis, key in (("r", "rank r (d=512)"), ("d", "width d (r=8)")):
    other = "d" if axis == "r" else "r"
    fixed = 512 if axis == "r" else 8
    sweep = sorted((r for r in results if r["case"]["model"] == "gpt" and r["case"][other] == fixed
                    and r["case"]["layers"] == 6), key=lambda r: r["case"][axis])
    if len(sweep) < 2:
      continue
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("factored", "reference", "nnx_lora", "qwix_lora"):
      pts = [(r["case"][axis], ratio(r, name, "median_s")) for r in sweep if name in r["variants"]]
      if pts:
        ax.plot(*zip(*pts), marker="o", label=LABELS[name])
    ax.axhline(1.0, color="gray", lw=0.8, ls="--", label="frozen lower bound")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(key)
    ax.set_ylabel("train-step wall time / lower bound")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, f"ratio-vs-{axis}-{tag}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    made.append(path)
  return made


def describe(r: dict[str, Any]) -> str:
  """The case in a line: the model, its shape, the batch and the parameter counts."""
  c = r["case"]
  shape = f"d={c['d']}, {c['layers']} layers, " if c["model"] == "gpt" else ""  # others: the model names it
  return (f"{r['model']}; {shape}r={c['r']}, batch {c['batch']}×{c['seq']} tokens; "
          f"{r['params'] / 1e6:.1f} M params, {r['lora_params'] / 1e3:.1f} k LoRA params. {c['note']}").rstrip()


def case_markdown(meta: dict[str, Any], r: dict[str, Any], tag: str) -> str:
  """One case's page (``bench/results/<case>-<tag>.md``): its table, checks and adapter timings."""
  c = r["case"]
  out = [f"# Case {c['name']} ({meta['backend'].upper()})", "",
         f"One case of `python -m bench.run` ({meta['date']}, {meta['cpus']}-core {meta['backend'].upper()}, "
         f"jax {meta['jax']}; the suite took {meta['total_s']:.0f} s). The method, the columns and the analysis "
         f"are in [BENCHMARKS.md](../../BENCHMARKS.md); the raw numbers in [results-{tag}.json](results-{tag}.json).", "",
         describe(r), "", case_table(r), ""]
  checks = ", ".join(f"{k} {v:.1e}" for k, v in r["checks"].items())
  out += [f"Checks (relative difference to lorax_jax factored): {checks or '–'}.", ""]
  if r["extras"]:
    out += ["Adapter: " + ", ".join(f"{k.replace('_s', '')} {v * 1e3:.1f} ms" for k, v in r["extras"].items())
            + " (merge jitted, after warm-up).", ""]
  return "\n".join(out)


def markdown(meta: dict[str, Any], results: list[dict[str, Any]], pngs: list[str], root: str, out_dir: str,
             tag: str) -> str:
  """BENCHMARKS.md: `ANALYSIS` (the conclusions, the method and the analysis, kept by hand), then
  the summary of this run and a link per case; each case's page is written to ``out_dir``."""
  out = ["# Benchmarks", ""]
  if os.path.exists(ANALYSIS):
    with open(ANALYSIS, encoding="utf-8") as f:
      out += [f.read().strip(), ""]
  out += ["## Summary: train-step wall time / lower bound (FLOPs / lower bound)", "",
          f"{meta['backend']} ({meta['device']}), {meta['cpus']} CPUs, {meta['machine']}; jax {meta['jax']}; "
          f"{meta['date']}; suite took {meta['total_s']:.0f} s" + (" (quick subset)" if meta["quick"] else "") + ".",
          "", summary_table(results), ""]
  for png in pngs:
    out += [f"![{os.path.basename(png)}]({os.path.relpath(png, root)})", ""]
  out += ["## Cases", "", "Each case's table (every variant's compiled FLOPs, bytes accessed, temp and argument "
          "memory, compile time, wall and CPU time, the checks that all variants compute the same loss and "
          "gradients) is in its own file:", ""]
  for r in results:
    page = os.path.join(out_dir, f"{r['case']['name']}-{tag}.md")
    write_text_atomic(page, case_markdown(meta, r, tag) + "\n")
    out.append(f"- [{r['case']['name']}]({os.path.relpath(page, root)}): {describe(r)}")
  return "\n".join(out) + "\n"
