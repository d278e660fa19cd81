"""Sharded trees on disk and in `merge`: one device, 8 host devices, two ``jax.distributed`` processes.

The ``test_mesh_*`` tests need 8 devices: `test_eight_host_devices_in_a_subprocess` runs them in one
subprocess (`test_sharding.mesh_tests_in_a_subprocess`), on the zoo's models of `test_sharding`
placed FSDP+TP: saving a sharded tree writes the bytes an unsharded
save writes; loading with shardings places every factor exactly there, with the saved values;
merging keeps every kernel's sharding and equals the unsharded merge.

`test_two_processes_save_one_adapter_and_compute_the_gradient` runs this file as two worker
processes (``jax.distributed`` on localhost, gloo collectives, 2 host devices each, a 2 × 2 mesh
whose ``fsdp`` axis spans the processes): both save to one directory, process 0 alone writes and
both return once the adapter is there; PEFT loads it; the gradient, the loaded factors and the
merge across the two processes equal one process's.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding
from safetensors.numpy import load_file

import lorax_jax as lj
from lorax_jax import sharding as S
from lorax_jax.io import peft as peft_io

import two_process_worker as W
import zoo
from test_sharding import EIGHT, MODELS, _case, _mesh, _placed, mesh_tests_in_a_subprocess

mesh_test = pytest.mark.skipif(not EIGHT, reason="needs 8 devices (test_eight_host_devices_in_a_subprocess runs it)")


def test_eight_host_devices_in_a_subprocess():
  mesh_tests_in_a_subprocess(__file__)


def test_one_device_load_keeps_the_default_device_and_takes_given_shardings(tmp_path):
  params = {"dense": {"kernel": jnp.arange(12.0).reshape(4, 3)}}
  cfg = lj.LoraConfig(r=2, targets=["dense"])
  lora = zoo.random_factors(params, cfg)
  lj.save_adapter(str(tmp_path / "a"), lora, cfg, params)
  back, _ = lj.load_adapter(str(tmp_path / "a"), params)
  assert {x.sharding for x in jax.tree.leaves(back)} == {SingleDeviceSharding(jax.local_devices()[0])}
  one = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("fsdp",)), P())
  back, _ = lj.load_adapter(str(tmp_path / "a"), params, shardings=one)  # one sharding for every factor
  assert {x.sharding for x in jax.tree.leaves(back)} == {one}
  chex.assert_trees_all_equal(back, lora)
  with pytest.raises(ValueError, match=r"no sharding for dense/kernel/b; .*not a Sharding: dense/kernel/a \(str\)"):
    lj.load_adapter(str(tmp_path / "a"), params, shardings={"dense": {"kernel": {"a": "fsdp"}}})


# --- 8 devices ------------------------------------------------------------------------------------

@functools.cache
def _sharded(name: str) -> tuple[zoo.Case, Any, Any, Any]:
  """``(case, params, host factors, factors)`` with params and factors placed FSDP+TP: random
  non-zero factors (NumPy's), with ``modules_to_save`` copies of the MLP's head."""
  case = _case(name)
  if name == "mlp":
    case = zoo.Case(name, case.apply_fn, case.params, case.inputs, case.cfg.replace(modules_to_save=["head"]))
  params, _ = _placed(case, "fsdp_tp")
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(lambda: lj.init_lora(case.params, case.cfg, jax.random.key(0)))
  host = jax.tree.map(lambda x: (0.3 * rng.normal(size=x.shape)).astype(x.dtype), shapes)
  return case, params, host, jax.device_put(host, lj.lora_shardings(params, case.cfg))


def _files(directory: str) -> dict[str, bytes]:
  out = {}
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), "rb") as f:
      out[name] = f.read()
  return out


@mesh_test
@pytest.mark.parametrize("name", MODELS)
def test_mesh_save_of_a_sharded_tree_writes_the_unsharded_bytes(tmp_path, name):
  case, params, host, lora = _sharded(name)
  assert any(not isinstance(x.sharding, SingleDeviceSharding) and not x.sharding.is_fully_replicated
             for x in jax.tree.leaves(lora)), "no factor is sharded"
  lj.save_adapter(str(tmp_path / "sharded"), lora, case.cfg, params)
  lj.save_adapter(str(tmp_path / "unsharded"), host, case.cfg, case.params)
  sharded, unsharded = _files(str(tmp_path / "sharded")), _files(str(tmp_path / "unsharded"))
  assert sharded == unsharded
  tensors = load_file(str(tmp_path / "sharded" / peft_io.WEIGHTS_NAME))
  per_target = 3 if case.cfg.use_dora else 2
  assert len(tensors) == per_target * len(lj.find_targets(case.params, case.cfg)) + (2 if name == "mlp" else 0)


@mesh_test
@pytest.mark.parametrize("name", MODELS)
def test_mesh_load_places_each_factor_on_its_sharding(tmp_path, name):
  case, params, host, lora = _sharded(name)
  lj.save_adapter(str(tmp_path), lora, case.cfg, params)
  shardings = lj.lora_shardings(params, case.cfg)
  load = lambda **kw: lj.load_adapter(str(tmp_path), params, kernel_axes=case.cfg.kernel_axes, **kw)[0]
  back = load(shardings=shardings)
  assert jax.tree.map(lambda x: x.sharding, back) == shardings
  chex.assert_trees_all_equal(S.host_arrays(back), host)
  default = load()  # the rule from the placed params
  assert jax.tree.map(lambda x: x.sharding, default) == shardings
  replicated = NamedSharding(_mesh(), P())  # any sharding given, here one for all
  back = load(shardings=replicated)
  assert {x.sharding for x in jax.tree.leaves(back)} == {replicated}
  chex.assert_trees_all_equal(S.host_arrays(back), host)


@mesh_test
@pytest.mark.parametrize("name", MODELS)
def test_mesh_merge_keeps_every_kernels_sharding(name):
  case, params, host, lora = _sharded(name)
  kernels = lambda tree: jax.tree.map(lambda x: S.kernel_sharding("", x), tree, is_leaf=lj.is_quantized)
  merged = lj.merge(params, lora, case.cfg)
  assert kernels(merged) == kernels(params)
  chex.assert_trees_all_close(merged, lj.merge(case.params, host, case.cfg), rtol=1e-5, atol=1e-6)
  if case.cfg.modules_to_save:  # the trained copies, as placed in the LoRA tree
    assert merged["params"]["head"]["kernel"].sharding == lora["modules_to_save"]["params"]["head"]["kernel"].sharding
  if name == "nf4":
    requantized = lj.merge(params, lora, case.cfg, requantize=True)
    assert kernels(requantized) == kernels(params)
    chex.assert_trees_all_equal(S.host_arrays(requantized),
                                S.host_arrays(lj.merge(case.params, host, case.cfg, requantize=True)))
  if not case.cfg.use_dora:
    back = lj.unmerge(merged, lora, case.cfg)
    assert kernels(back) == kernels(params)


@mesh_test
def test_mesh_load_refuses_a_sharding_that_does_not_divide_its_factor(tmp_path):
  case, params, _, lora = _sharded("mlp")
  lj.save_adapter(str(tmp_path), lora, case.cfg, params)
  shardings = lj.lora_shardings(params, case.cfg)
  shardings["params"]["fc1"]["kernel"]["a"] = NamedSharding(_mesh(), P(("data", "fsdp", "tensor")))  # rank 3, 8 ways
  with pytest.raises(ValueError, match=r"params/fc1/kernel/a of shape \(3, 10\) cannot be placed on"):
    lj.load_adapter(str(tmp_path), params, shardings=shardings)


# --- two processes --------------------------------------------------------------------------------

def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_together(argvs: list[list[str]], env: dict[str, str], log_dir: str, timeout: float) -> list[str]:
  """Run the commands ``argvs`` at once (the processes of one ``jax.distributed`` job) and return
  their outputs; an assertion error with every log if one fails or they outlast ``timeout`` seconds
  (then all are ended: a failed process leaves the others waiting in a collective)."""
  logs = [os.path.join(log_dir, f"process{i}.log") for i in range(len(argvs))]
  procs = []
  for argv, path in zip(argvs, logs):
    with open(path, "w") as log:
      procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))
  deadline = time.monotonic() + timeout
  try:
    while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs) and time.monotonic() < deadline:
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  texts = [open(log).read() for log in logs]
  report = "\n".join(f"--- process {i}: exit {p.returncode} ---\n{t[-4000:]}" for i, (p, t) in enumerate(zip(procs, texts)))
  if time.monotonic() >= deadline:
    report = f"timed out after {timeout} s\n{report}"
  assert all(p.returncode == 0 for p in procs), report
  return texts


def _run_two_workers(out: str) -> list[dict[str, Any]]:
  """The two workers' JSON summaries (`run_together`)."""
  tests = os.path.dirname(os.path.abspath(__file__))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([os.path.dirname(tests), tests, os.environ.get("PYTHONPATH", "")])}
  port = free_port()
  texts = run_together([[sys.executable, W.__file__, str(i), str(port), out] for i in range(2)], env, out, W.TIMEOUT_S)
  return [json.loads(t.strip().splitlines()[-1]) for t in texts]


def test_two_processes_save_one_adapter_and_compute_the_gradient(tmp_path):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  summaries = _run_two_workers(str(tmp_path))
  adapter = str(tmp_path / "adapter")
  assert [(s["process"], s["writes"]) for s in summaries] == [(0, 1), (1, 0)]  # process 0 alone wrote
  assert all(s["visible"] == [peft_io.CONFIG_NAME, peft_io.WEIGHTS_NAME] for s in summaries)  # seen on return
  assert sorted(os.listdir(tmp_path)) == ["adapter", "process0.log", "process1.log", "results.safetensors"]

  params, lora, x, y = W.model()
  lj.save_adapter(str(tmp_path / "one"), lora, W.CFG, params, W.PATH_MAP)
  assert _files(adapter) == _files(str(tmp_path / "one"))  # the single-process adapter, byte for byte
  loss, grads = jax.jit(W.grad(params))(lora, params, x, y)
  merged = lj.merge(params, lora, W.CFG)
  results = load_file(str(tmp_path / "results.safetensors"))
  want = W.flat({"loss": loss, "grads": grads, "loaded": lora, "merged": merged})
  assert results.keys() == want.keys()
  for k in want:
    np.testing.assert_allclose(results[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)

  model = torch.nn.ModuleDict({"fc1": torch.nn.Linear(8, 16), "fc2": torch.nn.Linear(16, 4, bias=False)})
  with torch.no_grad():
    model.fc1.weight.copy_(torch.from_numpy(params["fc1"]["kernel"].T))
    model.fc1.bias.copy_(torch.from_numpy(params["fc1"]["bias"]))
    model.fc2.weight.copy_(torch.from_numpy(params["fc2"]["kernel"].T))
  peft_model = peft.PeftModel.from_pretrained(model, adapter).eval()
  with torch.no_grad():
    h = torch.from_numpy(x)
    got = peft_model.base_model.model.fc2(torch.tanh(peft_model.base_model.model.fc1(h))).numpy()
  np.testing.assert_allclose(got, lj.lora_transform(W.apply, params, W.CFG)(params, lora, x), rtol=1e-5,
                             atol=1e-6)
  assert np.abs(got - W.apply(params, x)).max() > 1e-2  # the adapter changes the outputs


