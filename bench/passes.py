"""Where a LoRA train step's bytes go, pass by pass: ``python -m bench.passes [--case C] [--dropout P]``.

Compiles the train step of one `bench.cases` case (default ``gpt-d512-r8``) for the frozen lower
bound, lorax_jax factored, Flax NNX ``LoRALinear`` and Qwix (`bench.variants`), walks each compiled
HLO module's entry computation and charges every top-level instruction (fusion, dot, copy,
custom call) its bytes accessed, ``bytes(result) + Σ bytes(operand)``, and its dot FLOPs,
``2 · |result| · |contracted|``, to a *pass over a named tensor*:

- the frozen dots ``x·W`` (forward) and ``dx = dy·Wᵀ`` (backward), attention's batched dots;
- the six small-rank dots of every adapter, told apart by their shapes (rank ``r`` on the
  contracted axis, on an output axis, or both factors' gradients contracting the ``N`` tokens) and
  by JAX's metadata (``transpose(jvp(…))`` marks the backward): ``t = x·Aᵀ``, ``t·B``,
  ``dt = dy·Bᵀ``, ``dx += dt·A``, ``dA = dtᵀx``, ``dB = tᵀdy``;
- a small-rank dot's ``[N, ·]`` result read again by the elementwise fusion that adds it in
  (``y = x·W + s·t·B``, ``dx = dy·Wᵀ + s·dt·A``) is charged to that dot, as part of its pass;
- an instruction that only feeds small-rank dots (a masked or transposed copy of an adapted input)
  is charged as that dot's input; dropout's random bits, the optimizer's update, layout copies and
  the remaining elementwise and reduction fusions (norms, softmax, GELU, residuals) have rows of
  their own, per phase.

The attributed bytes sum to XLA's ``cost_analysis()["bytes accessed"]`` within `TOLERANCE` (checked
and printed). Every number is from the compiled program (deterministic); no timing.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import re
import sys
from typing import Any

import lorax_jax
from bench import cases as cases_lib
from bench.measure import compile_variant
from bench.variants import DROPOUT, Setup, build
from lorax_jax.paths import get_path

TOLERANCE = 0.05  # |attributed − XLA| / XLA bytes accessed
PEERS = ("lower_bound", "nnx_lora", "qwix_lora")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f16": 2, "bf16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
               "f64": 8, "s64": 8, "u64": 8, "token": 0}
FREE = ("parameter", "constant", "bitcast", "get-tuple-element", "tuple")  # no bytes of their own
LAYOUT = {"copy", "transpose", "bitcast", "reshape", "broadcast", "slice", "concatenate", "parameter", "constant",
          "get-tuple-element", "tuple", "iota"}
RANDOM = re.compile(r"threefry|random_bits|rng|random_fold_in|bernoulli|keep_mask|random_wrap")
SMALL_RANK = ("t = x·Aᵀ", "t·B", "dt = dy·Bᵀ", "dx += dt·A", "dA = dtᵀx", "dB = tᵀdy")

_SHAPE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_HEAD = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9-]*)\((.*?)\)(.*)$")


@dataclasses.dataclass
class Instr:
  name: str
  shapes: list[tuple[str, tuple[int, ...]]]
  opcode: str
  operands: list[str]
  args: str  # the text between the parentheses (a parameter's index)
  attrs: str

  @property
  def nbytes(self) -> int:
    return sum(DTYPE_BYTES.get(t, 4) * math.prod(d) for t, d in self.shapes)

  @property
  def dims(self) -> tuple[int, ...]:
    return self.shapes[0][1] if self.shapes else ()

  @property
  def op_name(self) -> str:
    m = re.search(r'op_name="([^"]*)"', self.attrs)
    return m.group(1) if m else ""

  def attr(self, key: str) -> tuple[int, ...]:
    m = re.search(key + r"=\{([0-9,]*)\}", self.attrs)
    return tuple(int(x) for x in m.group(1).split(",") if x) if m else ()


@dataclasses.dataclass
class Module:
  """A compiled HLO module's text, parsed: instructions by name (unique per module), every
  computation's instruction list and the entry computation's name."""

  instrs: dict[str, Instr]
  computations: dict[str, list[Instr]]
  entry: str


def parse_hlo(text: str) -> Module:
  """``compiled.as_text()`` into a `Module` (operands by name; shapes parsed from each result)."""
  instrs, comps, current, entry = {}, {}, None, ""
  for line in text.splitlines():
    head = _HEAD.match(line)
    if head and not line.startswith(" "):
      current = head.group(1)
      comps[current] = []
      if line.startswith("ENTRY"):
        entry = current
      continue
    m = _INSTR.match(line)
    if m is None or current is None:
      continue
    name, shape, opcode, operands, attrs = m.groups()
    shapes = [(t, tuple(int(x) for x in d.split(",") if x)) for t, d in _SHAPE.findall(shape)]
    ins = Instr(name, shapes, opcode, re.findall(r"%([^\s,()]+)", operands), operands, attrs)
    instrs[name] = ins
    comps[current].append(ins)
  if not entry:
    raise ValueError("no ENTRY computation in the HLO text: pass compiled.as_text()")
  return Module(instrs, comps, entry)


def _called(ins: Instr) -> str | None:
  m = re.search(r"(?:calls|body)=%([^\s,}]+)", ins.attrs)
  return m.group(1) if m else None


def _top_level(mod: Module, computation: str) -> list[Instr]:
  """The instructions of ``computation`` that access memory, with every ``call``, ``while`` and
  ``conditional`` replaced by the instructions of the computations it runs (as XLA's cost
  analysis counts them: a loop body once)."""
  out = []
  for ins in mod.computations[computation]:
    if ins.opcode in ("call", "while", "conditional"):
      for name in re.findall(r"(?:to_apply|body|condition|calls|branch_computations)=\{?([^}]*?)\}?(?:,|$)", ins.attrs):
        for callee in re.findall(r"%([^\s,{}]+)", name):
          out += _top_level(mod, callee)
    elif ins.opcode not in FREE:
      out.append(ins)
  return out


def _phase(ins: Instr) -> str:
  name = ins.op_name
  return "backward" if "transpose(" in name else "forward" if "jvp(" in name else "update"


@dataclasses.dataclass
class Dot:
  batch: int
  m: int  # lhs free size
  k: int  # contracted size
  n: int  # rhs free size
  lhs: int  # operand index (of the top-level instruction) holding the lhs, or -1
  rhs: int
  result: tuple[int, ...]

  @property
  def flops(self) -> float:
    return 2.0 * self.batch * self.m * self.k * self.n


def _dot_of(mod: Module, ins: Instr) -> Dot | None:
  """The dot computed by ``ins`` (a dot, or a fusion whose computation has one), with its sizes."""
  if ins.opcode == "dot":
    dot, params = ins, {o: i for i, o in enumerate(ins.operands)}
  else:
    body = mod.computations.get(_called(ins) or "", [])
    dots = [i for i in body if i.opcode == "dot"]
    if len(dots) != 1:
      return None
    dot = dots[0]
    params = {i.name: int(i.args) for i in body if i.opcode == "parameter"}
  lhs, rhs = (mod.instrs[o] for o in dot.operands[:2])
  lb, lc, rb = dot.attr("lhs_batch_dims"), dot.attr("lhs_contracting_dims"), dot.attr("rhs_batch_dims")
  rc = dot.attr("rhs_contracting_dims")
  size = lambda x, axes: math.prod(x.dims[a] for a in axes)
  free = lambda x, b, c: math.prod(s for a, s in enumerate(x.dims) if a not in b and a not in c)
  return Dot(size(lhs, lb), free(lhs, lb, lc), size(lhs, lc), free(rhs, rb, rc), _source(mod, params, lhs),
             _source(mod, params, rhs), dot.dims)


def _source(mod: Module, params: dict[str, int], x: Instr) -> int:
  """The fusion operand index that ``x`` (inside the fused computation) reads, through bitcasts,
  reshapes, copies and transposes; -1 if it is computed in the fusion."""
  while x.name not in params and x.opcode in LAYOUT and x.operands:
    x = mod.instrs[x.operands[0]]
  return params.get(x.name, -1)


def _labels(setup: Setup) -> tuple[dict[int, str], dict[int, str]]:
  """Adapted layers by input width and by output width (``"q_proj,k_proj,…"``)."""
  by_in, by_out = collections.defaultdict(set), collections.defaultdict(set)
  for t in lorax_jax.find_targets(setup.params, setup.cfg).values():
    kernel = get_path(setup.params, t.path)
    by_in[kernel.shape[0]].add(t.path[-2])
    by_out[kernel.shape[-1]].add(t.path[-2])
  return ({k: ",".join(sorted(v)) for k, v in by_in.items()}, {k: ",".join(sorted(v)) for k, v in by_out.items()})


@dataclasses.dataclass
class Pass:
  """One pass over one tensor, summed over the instructions that make it: MB accessed, dot MFLOP."""

  mb: float = 0.0
  mflop: float = 0.0
  count: int = 0


def attribute(mod: Module, setup: Setup) -> dict[tuple[str, str], Pass]:
  """Bytes accessed (MB) and dot MFLOP of every top-level instruction of ``mod``'s entry,
  keyed by ``(pass, tensor)``: see the module docstring for the passes."""
  r, tokens = setup.cfg.r, math.prod(setup.ids.shape)
  by_in, by_out = _labels(setup)
  entry = _top_level(mod, mod.entry)
  producer = {}
  for ins in mod.instrs.values():
    producer[ins.name] = producer.get(ins.operands[0], ins.name) if ins.opcode in ("bitcast", "get-tuple-element") \
        and ins.operands else ins.name
  category: dict[str, tuple[str, str]] = {}
  flops: dict[str, float] = {}

  def tensor(dims: tuple[int, ...], layers: str) -> str:
    return f"[{', '.join(map(str, dims))}]" + (f" ({layers})" if layers else "")

  def operand_dims(ins: Instr, i: int) -> tuple[int, ...]:
    return mod.instrs[ins.operands[i]].dims if 0 <= i < len(ins.operands) else ()

  for ins in entry:
    dot = _dot_of(mod, ins) if ins.opcode in ("dot", "fusion") else None
    phase = _phase(ins)
    if dot is None:
      continue
    flops[ins.name] = dot.flops
    if dot.batch > 1:
      category[ins.name] = (f"attention dots ({phase})", tensor(ins.dims, ""))
    elif dot.k == r:  # [N, r]·[r, out]
      category[ins.name] = ("t·B" if phase == "forward" else "dx += dt·A",
                            tensor(ins.dims, (by_out if phase == "forward" else by_in).get(ins.dims[-1], "")))
    elif r in (dot.m, dot.n) and dot.k == tokens:  # [r, N]·[N, width]: a factor's gradient
      big = dot.rhs if dot.m == r else dot.lhs
      src = mod.instrs[producer.get(ins.operands[big], ins.operands[big])] if big >= 0 else ins
      forward_input = _phase(src) != "backward"
      width = max(dot.m, dot.n)
      category[ins.name] = ("dA = dtᵀx" if forward_input else "dB = tᵀdy",
                            tensor((tokens, width), (by_in if forward_input else by_out).get(width, "")))
    elif r in (dot.m, dot.n):  # [N, width]·[width, r]
      category[ins.name] = ("t = x·Aᵀ" if phase == "forward" else "dt = dy·Bᵀ",
                            tensor((tokens, dot.k), (by_in if phase == "forward" else by_out).get(dot.k, "")))
    elif dot.k == tokens:
      category[ins.name] = ("dW = xᵀdy (frozen)", tensor(ins.dims, ""))
    else:
      category[ins.name] = ("x·W (frozen)" if phase == "forward" else "dx = dy·Wᵀ (frozen)",
                            tensor((tokens, dot.k), ""))
  consumers = collections.defaultdict(list)
  for ins in entry:
    for o in ins.operands:
      consumers[producer.get(o, o)].append(ins.name)
  for ins in entry:
    if ins.name in category:
      continue
    body = mod.computations.get(_called(ins) or "", [])
    ops = {i.opcode for i in body} | {ins.opcode}
    users = consumers.get(ins.name, [])
    phase = _phase(ins)
    random = any(RANDOM.search(i.op_name) for i in [ins, *body]) or any("rng" in op for op in ops)
    if users and all(category.get(u, ("",))[0] in SMALL_RANK for u in users):
      passes = sorted({category[u][0] for u in users}, key=SMALL_RANK.index)
      category[ins.name] = ("input of " + ", ".join(passes) + (" (dropout mask drawn here)" if random else ""),
                            category[users[0]][1])
    elif random:
      category[ins.name] = (f"dropout: random bits and masks ({phase})", "")
    elif phase == "update":
      category[ins.name] = ("optimizer update and step scalars", "")
    elif ops <= LAYOUT | {"fusion"}:
      category[ins.name] = (f"layout copies/transposes ({phase})", "")
    elif all(math.prod(d) <= tokens * r for _, d in ins.shapes) and max(ins.dims or (0,)) < tokens * r:
      category[ins.name] = (f"small [N, r] elementwise ({phase})", "")
    else:
      category[ins.name] = (f"other elementwise/reductions ({phase})", "norms, softmax, GELU, residuals")
  out: dict[tuple[str, str], Pass] = collections.defaultdict(Pass)
  for ins in entry:
    key = category[ins.name]
    p = out[key]
    p.count += 1
    p.mflop += flops.get(ins.name, 0.0) / 1e6
    p.mb += ins.nbytes / 1e6
    for o in ins.operands:
      src = category.get(producer.get(o, o))
      nbytes = mod.instrs[o].nbytes / 1e6
      if src and src[0] in SMALL_RANK and key[0] not in SMALL_RANK and not key[0].startswith("input of"):
        out[src].mb += nbytes  # a small-rank dot's result, read again where it is added in
      else:
        p.mb += nbytes
  return dict(out)


def analyse(case: cases_lib.Case, dropout: float, peers: tuple[str, ...] = PEERS) -> dict[str, dict[str, Any]]:
  """lorax_jax factored and ``peers`` (`PEERS`' names), compiled: their passes and XLA's totals.

  With ``dropout`` the lorax_jax and Qwix rows run with LoRA dropout ``bench.variants.DROPOUT``
  (NNX's ``LoRALinear`` has none, so its row stays without)."""
  setup, _ = cases_lib.setup(case)
  with_dropout = {"factored": "factored_dropout", "qwix_lora": "qwix_lora_dropout"} if dropout else {}
  names = tuple(with_dropout.get(n, n) for n in ("factored", *peers))
  out = {}
  for v in build(setup, names):
    c = compile_variant(v)
    mod = parse_hlo(c.run.as_text())
    out[v.name.removesuffix("_dropout")] = {"passes": attribute(mod, setup), "bytes": c.bytes_accessed,
                                           "flops": c.flops, "temp_mb": c.temp_bytes / 1e6}
  return out


def table(result: dict[str, dict[str, Any]]) -> str:
  """The markdown table of lorax_jax's passes and the differences to the peers (MB accessed)."""
  keys = sorted(set().union(*(r["passes"] for r in result.values())),
                key=lambda k: -abs(_mb(result, "factored", k) - _mb(result, "lower_bound", k)))
  peers = [p for p in PEERS if p in result]
  lines = ["| pass | tensor | MB | MFLOP | count | " + " | ".join(f"Δ MB vs {p}" for p in peers) + " |",
           "|---|---|---:|---:|---:|" + "---:|" * len(peers)]
  for k in keys:
    p = result["factored"]["passes"].get(k, Pass())
    diffs = " | ".join(f"{_mb(result, 'factored', k) - _mb(result, q, k):+.2f}" for q in peers)
    lines.append(f"| {k[0]} | {k[1]} | {p.mb:.2f} | {p.mflop:.1f} | {p.count} | {diffs} |")
  total = lambda n: sum(p.mb for p in result[n]["passes"].values())
  diffs = " | ".join(f"{total('factored') - total(q):+.2f}" for q in peers)
  lines.append(f"| **all passes** | | {total('factored'):.2f} | "
               f"{sum(p.mflop for p in result['factored']['passes'].values()):.1f} | "
               f"{sum(p.count for p in result['factored']['passes'].values())} | {diffs} |")
  return "\n".join(lines)


def totals(result: dict[str, dict[str, Any]]) -> str:
  """Per variant: attributed MB against XLA's bytes accessed, dot MFLOP against XLA's flops."""
  lines = ["| variant | attributed MB | XLA MB | attributed / XLA | dot MFLOP | XLA MFLOP | temp MB |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for name, r in result.items():
    mb = sum(p.mb for p in r["passes"].values())
    mflop = sum(p.mflop for p in r["passes"].values())
    lines.append(f"| {name} | {mb:.2f} | {r['bytes'] / 1e6:.2f} | {mb / (r['bytes'] / 1e6):.3f} | {mflop:.1f} | "
                 f"{r['flops'] / 1e6:.1f} | {r['temp_mb']:.1f} |")
  return "\n".join(lines)


def _mb(result: dict[str, dict[str, Any]], name: str, key: tuple[str, str]) -> float:
  return result[name]["passes"].get(key, Pass()).mb if name in result else 0.0


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--case", default="gpt-d512-r8", help="a bench.cases case name (NNX runs on the GPT cases only)")
  p.add_argument("--dropout", type=float, default=0.0, choices=(0.0, DROPOUT),
                 help=f"LoRA dropout of lorax_jax and Qwix: 0 or {DROPOUT} (bench.variants.DROPOUT)")
  args = p.parse_args(argv)
  found = [c for c in cases_lib.cases(quick=False) + cases_lib.cases(quick=True) if c.name == args.case]
  if not found:
    sys.exit(f"unknown case {args.case!r}: pick one of bench.cases.cases()")
  peers = PEERS if found[0].model == "gpt" else tuple(p for p in PEERS if p != "nnx_lora")  # NNX: a GPT twin only
  result = analyse(found[0], args.dropout, peers)
  print(f"## {args.case}, dropout {args.dropout}\n\n{table(result)}\n\n{totals(result)}")
  worst = max(abs(sum(q.mb for q in r["passes"].values()) / (r["bytes"] / 1e6) - 1) for r in result.values())
  if worst > TOLERANCE:
    sys.exit(f"attributed bytes differ from XLA's by {worst:.1%} (> {TOLERANCE:.0%}): the HLO walk missed something")


if __name__ == "__main__":
  main()
