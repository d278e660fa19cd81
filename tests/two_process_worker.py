"""One of the two ``jax.distributed`` processes of
`test_sharded_io.test_two_processes_save_one_adapter_and_compute_the_gradient`, and the model both
sides compute: ``python two_process_worker.py PROCESS_ID PORT OUT_DIR``.

Imports nothing that starts JAX's backend before ``jax.distributed.initialize``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors.numpy import save_file

import lorax_jax as lj
from lorax_jax import sharding as S
from lorax_jax.io import peft as peft_io

TIMEOUT_S = 240


PATH_MAP = lj.PathMap((("fc1/kernel", "fc1.weight", "linear"), ("fc1/bias", "fc1.bias", "param"),
                      ("fc2/kernel", "fc2.weight", "linear")))
CFG = lj.LoraConfig(r=2, alpha=4, targets=["fc1", "fc2"])


def model() -> tuple[dict[str, Any], dict[str, Any], np.ndarray, np.ndarray]:
  """``(params, lora, x, y)`` as NumPy arrays: ``tanh(x W1 + b1) W2`` (8 → 16 → 4), random
  non-zero factors, a batch of 4."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  params = {"fc1": {"kernel": normal(8, 16) / 3, "bias": normal(16) / 10}, "fc2": {"kernel": normal(16, 4) / 4}}
  lora = {"fc1": {"kernel": {"a": normal(2, 8) / 3, "b": normal(2, 16) / 3}},
          "fc2": {"kernel": {"a": normal(2, 16) / 3, "b": normal(2, 4) / 3}}}
  return params, lora, normal(4, 8), normal(4, 4)


def apply(params: Any, x: jax.Array) -> jax.Array:
  return jnp.tanh(x @ params["fc1"]["kernel"] + params["fc1"]["bias"]) @ params["fc2"]["kernel"]


def grad(params: Any) -> Any:
  """The jitted ``(loss, grads)`` of the factors (``mean((model(x) - y)²)``)."""
  lora_apply = lj.lora_transform(apply, params, CFG)
  return jax.value_and_grad(lambda lora, params, x, y: jnp.mean((lora_apply(params, lora, x) - y) ** 2))


def flat(tree: Any) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(kp): np.asarray(x) for kp, x in jax.tree_util.tree_leaves_with_path(tree)}


def worker(process_id: int, port: int, out: str) -> None:
  """One of the two processes: a step, a save to ``out/adapter``, a load and a merge on the global
  mesh; process 0 writes the results to ``out/results.safetensors``; a JSON summary line last."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id,
                             initialization_timeout=TIMEOUT_S // 2)
  assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
  devices = np.array(sorted(jax.devices(), key=lambda d: (d.process_index, d.id))).reshape(2, 2)
  mesh = Mesh(devices, ("fsdp", "tensor"))  # a row per process: fsdp spans the processes
  params, lora, x, y = model()
  kernel = NamedSharding(mesh, P("fsdp", "tensor"))
  placed = lj.shard_params(params, {"fc1": {"kernel": kernel, "bias": NamedSharding(mesh, P("tensor"))},
                                    "fc2": {"kernel": kernel}})
  shardings = lj.lora_shardings(placed, CFG)
  factors = jax.device_put(lora, shardings)
  assert not factors["fc1"]["kernel"]["a"].is_fully_addressable  # its shards live in both processes

  step = jax.jit(grad(params), out_shardings=(NamedSharding(mesh, P()), shardings))
  loss, grads = step(factors, placed, jax.device_put(x, NamedSharding(mesh, P("fsdp"))), y)
  assert jax.tree.map(lambda g: g.sharding, grads) == shardings

  writes = []
  write_dir_atomic = peft_io.write_dir_atomic

  def slow_write(directory: str, files: Any) -> None:  # a slow disk: the others must wait for it
    writes.append(directory)
    time.sleep(1.0)
    write_dir_atomic(directory, files)
  peft_io.write_dir_atomic = slow_write
  adapter = os.path.join(out, "adapter")
  lj.save_adapter(adapter, factors, CFG, placed, PATH_MAP)
  visible = sorted(os.listdir(adapter))  # as soon as save_adapter returns, in both processes
  loaded, _ = lj.load_adapter(adapter, placed, PATH_MAP)
  assert jax.tree.map(lambda f: f.sharding, loaded) == shardings
  merged = lj.merge(placed, factors, CFG)
  assert jax.tree.map(lambda w: w.sharding, merged) == jax.tree.map(lambda w: w.sharding, placed)

  results = flat(S.host_arrays({"loss": loss, "grads": grads, "loaded": loaded, "merged": merged}))
  S.on_process_zero(lambda: save_file(results, os.path.join(out, "results.safetensors")), "the results")
  print(json.dumps({"process": jax.process_index(), "writes": len(writes), "visible": visible}), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
