"""The main job on a mesh and on several processes (`lorax_jax.apps.finetune`, `lorax_jax.models.llama_sharding`).

The ``test_mesh_*`` tests need 8 devices: `test_eight_host_devices_in_a_subprocess` runs them in one
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (a mesh ``data × fsdp × tensor
= 2 × 2 × 2``). There, on conftest's tiny random Llama: ``lorax-jax finetune --mesh data=2,fsdp=2,tensor=2``
gives the single-device run's losses and adapter, and the compiled train step moves no LoRA factor
but for the gradient reduction over the batch axes, its collectives within the frozen step's bytes
plus rank-r traffic (read from the compiled HLO: `collectives`); an nf4 (``--quantize nf4``) and a
GGUF-blocked base get their blocks placed like their kernels, the single-device losses, and the
named error for a sharding that would cut a block. `test_two_processes_equal_one` runs
the job as two ``jax.distributed`` processes of 4 host devices each (gloo).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import shutil
import sys
from typing import Any

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import lorax_jax
from lorax_jax.apps import finetune
from lorax_jax.models import llama_sharding as LS
from lorax_jax import sharding as S
from lorax_jax.models.llama import load_llama, stack_layers
from lorax_jax.paths import get_path, path_str, set_path
from lorax_jax.qarray import leaves_with_paths

from test_quantize import gguf_llama
from test_sharded_io import free_port, run_together
from test_sharding import mesh_tests_in_a_subprocess

EIGHT = jax.device_count() >= 8
mesh_test = pytest.mark.skipif(not EIGHT, reason="needs 8 devices (test_eight_host_devices_in_a_subprocess runs it)")
MESH = "data=2,fsdp=2,tensor=2"
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def args(tiny, out_dir, *extra: str) -> list[str]:
  """A 10-step text fine-tune of the tiny Llama (rank 3: no other axis of the step has size 3)."""
  model, _, text = tiny
  return ["--model", model, "--data", text, "--format", "text", "--out_dir", str(out_dir), "--steps", "10",
          "--lr", "3e-2", "--batch_size", "8", "--seq_len", "16", "--warmup_steps", "1", "--max_chars", "0",
          "--eval_examples", "8", "--sample_prompts", "[the cat]", "--sample_tokens", "4", "--save_every", "5",
          "--dropout", "0.1", "--targets", "all-linear", "--r", "3", *extra]


def run(tiny, out_dir, *extra: str, resume: bool = False) -> dict:
  s, _ = finetune.parse_args(args(tiny, out_dir, *extra))
  model, params, tokenizer = finetune.load_model(s.model, s.dtype)
  return finetune.run(s, model, params, tokenizer, checkpoint=finetune.resume_point(s) if resume else None)


def losses(out_dir) -> list[float]:
  return [loss for _, loss in finetune.read_checkpoint(os.path.join(out_dir, finetune.CHECKPOINT), None).state["history"]]


def assert_same_adapter(dir_a, dir_b) -> None:
  a, b = (load_file(os.path.join(d, "adapter", "adapter_model.safetensors")) for d in (dir_a, dir_b))
  assert a.keys() == b.keys()
  for k in a:  # 10 Adam steps amplify float rounding in near-zero gradients
    np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-4 * np.abs(b[k]).max(), err_msg=k)


# ---------------------------------------------------------------------------------------
# The rule table and the mesh setting (no devices needed)


def test_every_llama_param_has_logical_axes_per_layer_and_stacked(tiny_llama):
  _, _, params = load_llama(tiny_llama[0])
  mesh = LS.make_mesh("fsdp=1,tensor=1", jax.devices()[:1])
  for tree in (params, stack_layers(params)):
    shardings, notes = LS.llama_shardings(tree, mesh)
    specs = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
    assert not notes and len(specs) == len(jax.tree.leaves(tree))
  assert specs["['params']['model']['layers']['self_attn']['o_proj']['kernel']"] == jax.P(None, "tensor", "fsdp")
  assert specs["['params']['model']['embed_tokens']['embedding']"] == jax.P("tensor", "fsdp")
  with pytest.raises(ValueError, match="params/model/extra/kernel has no row in .*LLAMA_LOGICAL_AXES"):
    LS.llama_shardings({"params": {"model": {"extra": {"kernel": np.zeros((2, 2))}}}}, mesh)


@pytest.mark.parametrize("text, message", [
    ("data=2,pipe=2", "'pipe=2' is not axis=size"),
    ("data=2,data=2", "'data=2' is not axis=size"),
    ("data=0", "'data=0' is not axis=size with a positive size"),
    ("data", "'data' is not axis=size"),
])
def test_bad_mesh_settings(text, message):
  with pytest.raises(finetune.settings.SettingsError, match=message):
    finetune.parse_args(["--mesh", text])


def test_sizes_must_match_the_devices(tiny_llama, tmp_path):
  with pytest.raises(ValueError, match=r"mesh 'data=3' has 3 places for 1 devices"):
    LS.make_mesh("data=3", jax.devices()[:1])
  s, _ = finetune.parse_args(args(tiny_llama, tmp_path, "--mesh", "data=1", "--batch_size", "7"))
  assert finetune.training_mesh(s).shape == {"data": 1}


def test_indivisible_axes_stay_whole_and_are_named():
  """259 rows over tensor=2 cannot split; nf4 blocks of 64 over fsdp=2 of 64 inputs would cut a block."""
  mesh = jax.sharding.AbstractMesh((2, 2), ("fsdp", "tensor"))  # specs only: no devices needed
  kernel = lorax_jax.quantize({"k": np.ones((64, 128), np.float32)}, "nf4", block_size=64, targets=["k"])["k"]
  params = {"params": {"lm_head": {"kernel": np.zeros((32, 259), np.float32)},
                       "model": {"layers_0": {"mlp": {"up_proj": {"kernel": kernel}}}}}}
  shardings, notes = LS.llama_shardings(params, mesh)
  assert shardings["params"]["lm_head"]["kernel"].spec == jax.P("fsdp", None)
  assert shardings["params"]["model"]["layers_0"]["mlp"]["up_proj"]["kernel"].spec == jax.P(None, "tensor")
  assert notes == [
      "params/lm_head/kernel axis 1 (vocab, size 259) is not split over tensor=2: kept whole",
      "params/model/layers_0/mlp/up_proj/kernel axis 0 (embed, size 64) is not split over fsdp=2 in whole "
      "blocks of 64: kept whole"]


# ---------------------------------------------------------------------------------------
# Collectives of a compiled step, read from its HLO text


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction: its opcode, the mesh axes its device groups span, the shapes it
  reads and writes, and its bytes (the larger of its operands' and its results', per device, times
  the trip counts of the loops around it)."""

  name: str
  opcode: str
  axes: frozenset[str]
  shapes: tuple[tuple[int, ...], ...]
  nbytes: int


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x.strip()]


def _iota(dims: list[int], perm: list[int] | None) -> np.ndarray:
  ids = np.arange(math.prod(dims)).reshape(dims)
  return ids.transpose(perm) if perm else ids


def device_groups(attrs: str, n: int) -> list[list[int]]:
  """The groups of device ids (positions in the mesh) of a collective's attribute text, in each
  format XLA prints: explicit ``{{0,1},{2,3}}``, iota ``[4,2]<=[2,2,2]T(1,0,2)``, mesh axes
  ``mesh['axis_0'=2,...], device_ids=(...) {'axis_1'}``, a permute's ``source_target_pairs``.

  Raises:
    ValueError: a format not understood (quoted).
  """
  m = re.search(r"source_target_pairs=\{((?:\{[0-9,]*\},?)*)\}", attrs)
  if m:
    return [p for p in (_ints(g) for g in re.findall(r"\{([0-9,]*)\}", m.group(1))) if p[0] != p[1]]
  m = re.search(r"replica_groups=\{((?:\{[0-9,]*\},?)*)\}", attrs)
  if m:
    return [_ints(g) for g in re.findall(r"\{([0-9,]*)\}", m.group(1))] or [list(range(n))]
  m = re.search(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", attrs)
  if m:
    return _iota(_ints(m.group(2)), m.group(3) and _ints(m.group(3))).reshape(_ints(m.group(1))).tolist()
  m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([0-9,]+)\](?:T\(([0-9,]+)\))?\))?"
                r"(?: \{([^}]*)\})?", attrs)
  if m:
    axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
    names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
    ids = (_iota(_ints(m.group(2)), m.group(3) and _ints(m.group(3))) if m.group(2)
           else np.arange(math.prod(sizes))).reshape(sizes)
    chosen = re.findall(r"'(\w+)'([^',]*)", m.group(4) or "")
    if m.group(4) is None or any(extra for _, extra in chosen):
      raise ValueError(f"device groups not understood: {m.group(0)!r}")
    spanned = [names.index(a) for a, _ in chosen]
    rest = [i for i in range(len(names)) if i not in spanned]
    return ids.transpose(rest + spanned).reshape(-1, math.prod(sizes[i] for i in spanned)).tolist()
  raise ValueError(f"device groups not understood in {attrs[:200]!r}")


def _multiplicity(mod: Any) -> dict[str, int]:
  """How often each computation reachable from the entry runs (a loop body: its known trip count)."""
  times: dict[str, int] = {}

  def visit(computation: str, k: int) -> None:
    times[computation] = times.get(computation, 0) + k
    for ins in mod.computations[computation]:
      if ins.opcode == "while":
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', ins.attrs)
        if trip is None:
          raise ValueError(f"%{ins.name}: a loop without a known trip count, so its collectives cannot be counted")
        visit(re.search(r"body=%([^\s,]+)", ins.attrs).group(1), k * int(trip.group(1)))
      elif ins.opcode in ("call", "conditional"):
        for callee in re.findall(r"(?:to_apply|branch_computations|calls)=\{?%([^\s,}]+)", ins.attrs):
          visit(callee, k)

  visit(mod.entry, 1)
  return times


def collectives(text: str, mesh: jax.sharding.Mesh) -> list[Collective]:
  """Every collective of ``compiled.as_text()`` (a ``*-start`` counted once), with the ``mesh`` axes
  its groups span (device id ``i`` is ``mesh.devices.flat[i]``)."""
  from bench.passes import DTYPE_BYTES, parse_hlo

  mod = parse_hlo(text)
  names, sizes = list(mesh.shape), list(mesh.shape.values())
  times = _multiplicity(mod)
  size = lambda shapes: sum(DTYPE_BYTES.get(t, 4) * math.prod(d) for t, d in shapes)
  out = []
  for computation, instrs in mod.computations.items():
    for ins in instrs:
      opcode = ins.opcode.removesuffix("-start")
      if opcode not in COLLECTIVES or computation not in times:
        continue
      coords = [np.unravel_index(g, sizes) for g in device_groups(ins.attrs, math.prod(sizes))]
      axes = frozenset(names[i] for c in coords for i in range(len(names)) if len(set(c[i])) > 1)
      operands = [s for o in ins.operands if o in mod.instrs for s in mod.instrs[o].shapes]
      out.append(Collective(ins.name, opcode, axes, tuple(d for _, d in ins.shapes + operands),
                            times[computation] * max(size(ins.shapes), size(operands))))
  return out


def factor_shapes(lora: Any, devices: int) -> set[tuple[int, ...]]:
  """Every shape a piece of a factor (or its gradient) can have in a step: the factor's, one
  layer's of a stacked factor, each axis divided by any number of devices dividing it, transposed."""
  out = set()
  for x in jax.tree.leaves(lora):
    for shape in (x.shape, x.shape[1:]):
      options = [[d // k for k in range(1, devices + 1) if devices % k == 0 and d % k == 0] for d in shape]
      for combo in itertools.product(*options):
        out.update(itertools.permutations(combo))
  return out


def check_factor_collectives(lora_hlo: str, frozen_hlo: str, mesh: jax.sharding.Mesh, lora: Any,
                             batch_axes: tuple[str, ...], allowance: int) -> dict[str, int]:
  """Assert: every collective that reads or writes a LoRA factor's shape is a reduction (all-reduce,
  reduce-scatter) over ``batch_axes`` only (the gradient's), there is one, the frozen step has none
  of those shapes (so the shapes are the factors'), and the step's collectives move at most the
  frozen step's bytes plus ``allowance``. An offending instruction is named. Returns the byte counts."""
  shapes = factor_shapes(lora, mesh.size)
  frozen, trained = collectives(frozen_hlo, mesh), collectives(lora_hlo, mesh)
  assert not [c.name for c in frozen if set(c.shapes) & shapes], "the factors' shapes are not unique to them"
  on_factors = [c for c in trained if set(c.shapes) & shapes]
  for c in on_factors:
    assert c.opcode in ("all-reduce", "reduce-scatter") and c.axes <= set(batch_axes), (
        f"%{c.name}: {c.opcode} over {sorted(c.axes)} moves a LoRA factor "
        f"{sorted(set(c.shapes) & shapes)}; only the gradient's reduction over {batch_axes} may")
  assert on_factors, "no gradient reduction of a factor was found"
  total = {"lora": sum(c.nbytes for c in trained), "frozen": sum(c.nbytes for c in frozen)}
  assert total["lora"] <= total["frozen"] + allowance, (total, allowance)
  return total


def test_device_groups_in_every_format():
  """Hand-computed groups of a 2 × 2 × 2 mesh (device id = 4·data + 2·fsdp + tensor)."""
  assert device_groups("replica_groups={{0,2},{1,3},{4,6},{5,7}}, use_global_device_ids=true", 8) == [
      [0, 2], [1, 3], [4, 6], [5, 7]]
  assert device_groups("replica_groups={}, to_apply=%add", 8) == [list(range(8))]
  assert device_groups("replica_groups=[4,2]<=[2,2,2]T(2,1,0), use", 8) == [[0, 4], [2, 6], [1, 5], [3, 7]]
  assert device_groups("replica_groups=[4,2]<=[8], use", 8) == [[0, 1], [2, 3], [4, 5], [6, 7]]
  assert device_groups("replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=2,'axis_3'=2] {'axis_2'}, use", 8) == [
      [0, 2], [1, 3], [4, 6], [5, 7]]
  assert device_groups("replica_groups=mesh['axis_0'=1,'axis_1'=2,'axis_2'=4], device_ids=([2,2,2]T(1,0,2)) "
                       "{'axis_1'}, use", 8) == [[0, 2], [1, 3], [4, 6], [5, 7]]
  assert device_groups("source_target_pairs={{0,0},{1,2},{2,1}}", 8) == [[1, 2], [2, 1]]
  with pytest.raises(ValueError, match="not understood"):
    device_groups("replica_groups=mesh['axis_0'=8] {'axis_0':(1)2}", 8)


# ---------------------------------------------------------------------------------------
# 8 devices


def test_eight_host_devices_in_a_subprocess():
  mesh_tests_in_a_subprocess(__file__, timeout=1800)


@mesh_test
def test_mesh_finetune_equals_the_single_device_run(tiny_llama, tmp_path):
  s, _ = finetune.parse_args(args(tiny_llama, tmp_path, "--mesh", MESH, "--batch_size", "6"))
  with pytest.raises(ValueError, match="batch_size=6 does not split over the mesh's 4 batch places"):
    finetune.training_mesh(s)
  one, mesh = run(tiny_llama, tmp_path / "one"), run(tiny_llama, tmp_path / "mesh", "--mesh", MESH)
  a, b = losses(tmp_path / "one"), losses(tmp_path / "mesh")
  assert len(a) == len(b) == 10
  np.testing.assert_allclose(b[0], a[0], rtol=1e-5)
  np.testing.assert_allclose(b, a, rtol=1e-4)
  np.testing.assert_allclose(mesh["eval_after"], one["eval_after"], rtol=1e-4)
  assert_same_adapter(tmp_path / "one", tmp_path / "mesh")


@mesh_test
def test_mesh_compiled_step_moves_factors_only_by_their_gradient_reduction(tiny_llama, tmp_path):
  """The main job's step under FSDP+TP, against the same step training the norm scales instead of
  LoRA factors (the frozen step: the same forward and backward through the base). Allowance: the
  factors' bytes plus, per adapted kernel and layer, a rank-r activation [tokens, r] in the forward
  and one in the backward (x·aᵀ reduced over a sharded input axis, and its gradient)."""
  s, _ = finetune.parse_args(args(tiny_llama, tmp_path, "--mesh", MESH))
  model, params, tokenizer = finetune.load_model(s.model, s.dtype)
  tasks = finetune.make_tasks(s, tokenizer)
  train = tasks[0].train
  cfg, optimizer, mesh = finetune.lora_config(s), finetune.make_optimizer(s), finetune.training_mesh(s)
  lora = lorax_jax.init_lora(params, cfg, jax.random.key(0))
  train_model, params, lora, train_cfg = finetune.training_layout(True, model, params, lora, cfg)
  params, lora, opt_state, placement = finetune.place(mesh, params, lora, train_cfg, optimizer)
  work = finetune.work_options(s, tokenizer, tasks)
  batch = finetune.put_batch(placement, *(x[:s.batch_size] for x in (train.tokens, train.weights)))
  step, _ = finetune.make_steps(lorax_jax.lora_transform(train_model.apply, params, train_cfg), optimizer, **work,
                                placement=placement)
  lora_hlo = step.lower(lora, opt_state, params, *batch, jax.random.key(1)).compile().as_text()

  norms = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)
           if "norm" in jax.tree_util.keystr(p)}

  def frozen_apply(params, norms, *args, rng=None, **kwargs):
    params = jax.tree_util.tree_map_with_path(lambda p, x: norms.get(jax.tree_util.keystr(p), x), params)
    return train_model.apply(params, *args, **kwargs)

  norm_shardings = {k: x.sharding for k, x in norms.items()}
  norm_state = optimizer.init(norms)
  frozen = dataclasses.replace(placement, lora=norm_shardings,
                               opt_state=finetune.state_shardings(norm_state, norm_shardings, mesh))
  norm_state = jax.device_put(norm_state, frozen.opt_state)
  frozen_step, _ = finetune.make_steps(frozen_apply, optimizer, **work, placement=frozen)
  frozen_hlo = frozen_step.lower(norms, norm_state, params, *batch, jax.random.key(1)).compile().as_text()

  uses = len(jax.tree.leaves(lora)) // 2 * model.config.num_hidden_layers
  allowance = sum(x.nbytes for x in jax.tree.leaves(lora)) + uses * 2 * s.batch_size * s.seq_len * s.r * 4
  total = check_factor_collectives(lora_hlo, frozen_hlo, mesh, lora, LS.mesh_axes("batch", mesh), allowance)
  print(f"collective bytes: LoRA step {total['lora']:,}, frozen step {total['frozen']:,}, allowance {allowance:,}")


@mesh_test
@pytest.mark.parametrize("fmt", ["nf4", "gguf"])
def test_mesh_quantized_base_blocks_are_placed_like_their_kernels(wide_llama, tmp_path, fmt):
  """A QLoRA base on the mesh: ``--quantize nf4`` (blocks of 64) and a GGUF-blocked base (gguf's own
  Q4_1 kernels, a Q8_0 embedding: what ``--quantize gguf`` loads from a file) go through the Llama
  table, whose blocked axes split into whole blocks or stay whole (said); each `QArray`'s stored
  arrays carry its kernel's spec, the run equals the single-device run, and an explicit sharding
  that would cut a block is the error naming the kernel, its axis and the block size."""
  def run_quantized(out_dir, *extra):
    s, _ = finetune.parse_args(args(wide_llama, out_dir, "--steps", "2", *extra))
    model, params, tokenizer = finetune.load_model(s.model, s.dtype, s.quantize)
    if fmt == "gguf":
      model, params, _ = gguf_llama(model.config)
    return finetune.run(s, model, params, tokenizer), params

  quantize = ("--quantize", "nf4") if fmt == "nf4" else ()
  one, params = run_quantized(tmp_path / "one", *quantize)
  run_quantized(tmp_path / "mesh", *quantize, "--mesh", MESH)
  a, b = losses(tmp_path / "one"), losses(tmp_path / "mesh")
  np.testing.assert_allclose(b[0], a[0], rtol=1e-5)
  np.testing.assert_allclose(b, a, rtol=1e-4)

  mesh = LS.make_mesh(MESH)
  shardings, notes = LS.llama_shardings(params, mesh)
  placed, _ = LS.shard_llama(params, mesh)
  quantized = {p: q for p, q in leaves_with_paths(params) if lorax_jax.is_quantized(q)}
  split = 0
  for path, q in quantized.items():
    want, got = get_path(shardings, path), get_path(placed, path)
    assert S.kernel_sharding(path_str(path), got) == want
    entries = (*want.spec, *(None,) * (q.ndim - len(want.spec)))
    axis = q.axis % q.ndim
    stored = jax.P(*entries[:axis], *entries[axis + 1:], entries[axis])
    assert got.data.sharding.is_equivalent_to(jax.NamedSharding(mesh, stored), q.data.ndim), path_str(path)
    np.testing.assert_array_equal(got.dequantize(), q.dequantize())
    split += entries[axis] is not None
  whole = [n for n in notes if "whole blocks" in n]
  assert split and (whole if fmt == "nf4" else not whole), notes  # nf4: 64 inputs over fsdp=2 stay whole
  assert all(f"blocks of {q.block_size}: kept whole" in n for n in whole)

  path, q = next((p, q) for p, q in quantized.items() if q.ndim == 2 and "q_proj" in path_str(p))
  cut = jax.tree.map(lambda x: x, shardings, is_leaf=lambda x: isinstance(x, jax.NamedSharding))
  set_path(cut, path, jax.NamedSharding(mesh, jax.P(("data", "fsdp", "tensor"))))  # its 64 inputs 8 ways
  with pytest.raises(ValueError, match=rf"{path_str(path)}: sharding axis 0 \(size 64\) 8 ways .* "
                                       rf"{q.fmt} blocks of {q.block_size} values"):
    lorax_jax.shard_params(params, cut)


# ---------------------------------------------------------------------------------------
# Two processes


def launch_two(tiny, out_dir, *extra: str) -> None:
  """``lorax-jax finetune`` as two ``jax.distributed`` processes on localhost, 4 host devices each
  (their logs in ``out_dir``'s parent, ``process0.log`` and ``process1.log``)."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  argv = [sys.executable, "-m", "lorax_jax", "finetune", *args(tiny, out_dir, "--mesh", MESH, *extra),
          "--coordinator", f"localhost:{free_port()}", "--num-processes", "2"]
  run_together([[*argv, "--process-id", str(i)] for i in range(2)], env, os.path.dirname(out_dir), timeout=600)


def test_two_processes_equal_one(tiny_llama, tmp_path):
  """Two processes train the same 10 steps as one process on one device, and save one adapter (that
  PEFT loads); a checkpoint the two wrote at step 5 resumes in one process and in two, to the same end."""
  run(tiny_llama, tmp_path / "one")
  launch_two(tiny_llama, tmp_path / "two")
  launch_two(tiny_llama, tmp_path / "stopped", "--stop_at", "5")
  shutil.copytree(tmp_path / "stopped", tmp_path / "resumed_in_one")
  run(tiny_llama, tmp_path / "resumed_in_one", resume=True)
  launch_two(tiny_llama, tmp_path / "stopped", "--resume")
  want = losses(tmp_path / "one")
  for name in ("two", "resumed_in_one", "stopped"):
    got = losses(tmp_path / name)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(got, want, rtol=1e-4, err_msg=name)
    assert_same_adapter(tmp_path / "one", tmp_path / name)
  assert sorted(os.listdir(tmp_path / "two")) == sorted([*finetune.OUTPUT_FILES, finetune.ADAPTER, finetune.CHECKPOINT])
  # One adapter, which PEFT loads: its logits are lorax_jax's with the same adapter.
  pytest.importorskip("peft")
  import peft
  from test_peft import LLAMA_TOKENS, TOL, max_diff, torch_llama, torch_logits

  _, model, params = load_llama(tiny_llama[0])
  lora, cfg = lorax_jax.load_adapter(str(tmp_path / "two" / "adapter"), params, finetune.LLAMA_PATH_MAP)
  torch_model = peft.PeftModel.from_pretrained(torch_llama(tiny_llama[0]), str(tmp_path / "two" / "adapter")).eval()
  got = lorax_jax.lora_transform(model.apply, params, cfg)(params, lora, np.asarray(LLAMA_TOKENS))
  assert max_diff(got, torch_logits(torch_model, LLAMA_TOKENS)) < TOL
