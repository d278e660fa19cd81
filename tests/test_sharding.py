"""LoRA factors sharded from their kernels (`lorax_jax.sharding`).

The rule is checked literally on one layout of each kind (no devices needed). The ``test_mesh_*``
tests need 8 devices: `test_eight_host_devices_in_a_subprocess` runs them in one subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (a mesh ``data × fsdp × tensor = 2 × 2 × 2``).
There, for the zoo's Dense, torch ``[out, in]``, einsum (DenseGeneral) attention, scanned,
conv, embedding, DoRA and nf4 models under FSDP, TP and FSDP+TP specs: each factor's spec is
the rule's, `lora_shardings` is what `init_lora` returns, and a jitted grad step whose
``out_shardings`` are `lora_shardings` gives the single-device gradients.
"""

from __future__ import annotations

import doctest
import functools
import os
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

import lorax_jax as lj
from lorax_jax import sharding as S
from lorax_jax.paths import get_path, tree_path
from lorax_jax.targets import Target

import zoo

EIGHT = jax.device_count() >= 8
mesh_test = pytest.mark.skipif(not EIGHT, reason="needs 8 devices (test_eight_host_devices_in_a_subprocess runs it)")


def _target(shape: tuple[int, ...], axes: str, dora: bool = False) -> Target:
  return Target(("m", "kernel"), shape, 2, 4.0, 2.0, axes, dora=dora)


RULE = [  # layout, shape, kernel spec, a, b, DoRA's m
    ("io", (8, 16), P("fsdp", "tensor"), P(None, "fsdp"), P(None, "tensor"), P("tensor")),
    ("oi", (16, 8), P("tensor", "fsdp"), P(None, "fsdp"), P(None, "tensor"), P("tensor")),
    ("sio", (4, 8, 16), P("stage", "fsdp"), P("stage", None, "fsdp"), P("stage", None, None), P("stage", None)),
    ("ioo", (16, 4, 8), P(("data", "fsdp"), "tensor"), P(None, ("data", "fsdp")), P(None, "tensor", None),
     P("tensor", None)),
    ("iio", (4, 8, 16), P(None, "tensor", "fsdp"), P(None, None, "tensor"), P(None, "fsdp"), P("fsdp")),
    ("iiio", (3, 3, 8, 16), P(None, None, "fsdp", "tensor"), P(None, None, None, "fsdp"), P(None, "tensor"),
     P("tensor")),
    ("io", (50, 16), P("tensor", None), P(None, "tensor"), P(None, None), P(None)),  # embedding [vocab, embed]
]


@pytest.mark.parametrize("axes, shape, spec, a, b, m", RULE)
def test_rule_gives_each_factor_the_specs_of_its_kernel_axes(axes, shape, spec, a, b, m):
  assert S.factor_specs(_target(shape, axes), spec) == {"a": a, "b": b}
  assert S.factor_specs(_target(shape, axes, dora=True), spec) == {"a": a, "b": b, "m": m}


def test_rule_rejects_a_spec_longer_than_the_kernel():
  with pytest.raises(ValueError, match=r"m/kernel: sharding spec .* has 3 entries for 2 axes"):
    S.factor_specs(_target((8, 16), "io"), P("fsdp", None, "tensor"))


def test_unplaced_params_keep_factors_on_the_default_device():
  case = _case("dora")
  lora = lj.init_lora(case.params, case.cfg, jax.random.key(0))
  shardings = lj.lora_shardings(case.params, case.cfg)
  assert jax.tree.map(lambda x: x.sharding, lora) == shardings
  assert set(jax.tree.leaves(shardings)) == {SingleDeviceSharding(jax.local_devices()[0])}


def test_abstract_params_on_a_one_device_mesh():
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  params = {"fc": {"kernel": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(mesh, P("fsdp"))),
                   "bias": jax.ShapeDtypeStruct((4,), jnp.float32)}}
  shardings = lj.lora_shardings(params, lj.LoraConfig(targets=["fc"], use_dora=True, modules_to_save=["bias"]))
  assert jax.tree.map(lambda s: s.spec, shardings) == {
      "fc": {"kernel": {"a": P(None, "fsdp"), "b": P(None, None), "m": P(None)}},
      "modules_to_save": {"fc": {"bias": P()}}}  # an unplaced leaf beside placed ones: replicated on their mesh


def test_docstring_example():
  assert doctest.testmod(S).failed == 0


def test_eight_host_devices_in_a_subprocess():
  mesh_tests_in_a_subprocess(__file__)


def mesh_tests_in_a_subprocess(file: str, timeout: int = 1200) -> None:
  """Run the ``test_mesh_*`` tests of ``file`` with pytest in a subprocess on 8 host devices; all
  must pass (none skipped). Skips when this process has 8 devices already (they run here)."""
  if EIGHT:
    pytest.skip("already on 8 devices: the test_mesh_* tests run here")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  argv = [sys.executable, "-m", "pytest", file, "-q", "-p", "no:cacheprovider", "-k", "test_mesh_"]
  result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
  tail = result.stdout[-4000:] + result.stderr[-2000:]
  assert result.returncode == 0, tail
  assert re.search(r"\d+ passed", result.stdout) and "skipped" not in result.stdout, tail


# --- 8 devices ------------------------------------------------------------------------------------

MODELS = ("mlp", "torch_style_mlp", "einsum_attention", "scan", "cnn", "embed_lm", "dora", "nf4")
WAYS = {"data": 2, "fsdp": 2, "tensor": 2}


@functools.cache
def _case(name: str) -> zoo.Case:
  """Model ``name`` of the zoo's kinds: ``dora`` the MLP with DoRA, ``nf4`` the MLP on 16 features
  with nf4 kernels in blocks of 4 (double quantized), ``scan`` the scanned transformer with 2 layers."""
  key = jax.random.key(42)
  ks = jax.random.split(key, 4)
  linen = lambda model, x, cfg: zoo.Case(name, model.apply, model.init(key, x), (x,), cfg)
  if name in ("mlp", "dora"):
    return linen(zoo.MLP(), jax.random.normal(key, (4, 10)),
                 lj.LoraConfig(r=3, alpha=6, targets="all-linear", use_dora=name == "dora"))
  if name == "nf4":
    case = linen(zoo.MLP(), jax.random.normal(key, (4, 16)), lj.LoraConfig(r=2, alpha=4, targets="all-linear"))
    case.params = lj.quantize(case.params, "nf4", block_size=4, targets=["fc1", "fc2"], double_quant=True)
    return case
  if name == "scan":
    return linen(zoo.ScanTransformer(depth=2), jax.random.randint(key, (2, 7), 0, 40),
                 lj.LoraConfig(r=4, alpha=8, targets="all-linear", kernel_axes={"params/blocks/.*": "sio"}))
  if name == "cnn":  # not its head: see test_mesh_xla_strided_conv_kernel_gradient
    return linen(zoo.CNN(), jax.random.normal(key, (2, 9, 9, 3)), lj.LoraConfig(r=2, targets=["conv1", "conv2"]))
  if name == "embed_lm":
    return linen(zoo.EmbedLM(), jax.random.randint(key, (4, 5), 0, 50),
                 lj.LoraConfig(r=4, targets=["embed", "hidden", "lm_head"]))
  if name == "torch_style_mlp":  # [out, in] weights
    params = {"fc1": {"weight": jax.random.normal(ks[0], (24, 10)) / 3, "bias": jnp.zeros(24)},
              "fc2": {"weight": jax.random.normal(ks[1], (6, 24)) / 5}}
    return zoo.Case(name, zoo.torch_style_mlp, params, (jax.random.normal(key, (4, 10)),),
                    lj.LoraConfig(r=2, targets="all-linear"))
  params = {n: jax.random.normal(k, (16, 4, 4)) / 4 for n, k in zip(("wq", "wk", "wv"), ks)}  # einsum attention
  params["wo"] = jax.random.normal(ks[3], (4, 4, 16)) / 4
  return zoo.Case(name, zoo.einsum_attention, params, (jax.random.normal(key, (2, 6, 16)),),
                  lj.LoraConfig(r=2, targets=["wq", "wk", "wv", "wo"]))


def _mesh() -> Mesh:
  return Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))


def _kernel_spec(t: Target, strategy: str) -> P:
  """FSDP: the last input axis (a conv's channels) over (data, fsdp), or fsdp alone where 4 does not
  divide it. TP: the stack over data, the first output axis (attention's heads) over tensor.
  FSDP+TP: the three. An axis its mesh axes do not divide stays whole."""
  want = {"fsdp": {"i": [("data", "fsdp"), "fsdp"]}, "tp": {"s": ["data"], "o": ["tensor"]},
          "fsdp_tp": {"s": ["data"], "i": ["fsdp"], "o": ["tensor"]}}[strategy]
  ways = lambda entry: np.prod([WAYS[a] for a in ((entry,) if isinstance(entry, str) else entry)])
  entries = [None] * len(t.shape)
  for letter, choices in want.items():
    j = t.axes.rfind(letter) if letter == "i" else t.axes.find(letter)
    if j >= 0:
      entries[j] = next((e for e in choices if t.shape[j] % ways(e) == 0), None)
  return P(*entries)


def _placed(case: zoo.Case, strategy: str) -> tuple[Any, list[jax.Array]]:
  """``(params, inputs)`` on the mesh: targets by the strategy, other leaves replicated, inputs'
  batch over data."""
  mesh = _mesh()
  targets = lj.find_targets(case.params, case.cfg)
  specs = jax.tree_util.tree_map_with_path(
      lambda kp, x: NamedSharding(mesh, _kernel_spec(targets[tree_path(kp)], strategy)
                                  if tree_path(kp) in targets else P()),
      case.params, is_leaf=lj.is_quantized)
  batch = lambda x: jax.device_put(x, NamedSharding(mesh, P("data") if x.shape[0] % 2 == 0 else P()))
  return lj.shard_params(case.params, specs), [batch(x) for x in case.inputs]


def _loss(case: zoo.Case) -> Callable[..., tuple[jax.Array, Any]]:
  apply = lj.lora_transform(case.apply_fn, case.params, case.cfg)
  return jax.value_and_grad(lambda lora, params, *xs: jnp.mean(apply(params, lora, *xs) ** 2))


@functools.cache
def _single_device(name: str) -> tuple[Any, jax.Array, Any]:
  """``(lora, loss, grads)`` of ``name`` on one device, with random non-zero factors."""
  case = _case(name)
  lora = zoo.random_factors(case.params, case.cfg)
  return (lora, *jax.jit(_loss(case))(lora, case.params, *case.inputs))


@mesh_test
@pytest.mark.parametrize("strategy", ["fsdp", "tp", "fsdp_tp"])
@pytest.mark.parametrize("name", MODELS)
def test_mesh_factors_follow_kernels_and_grads_keep_their_shardings(name, strategy):
  case = _case(name)
  params, inputs = _placed(case, strategy)
  lora = lj.init_lora(params, case.cfg, jax.random.key(0))
  shardings = lj.lora_shardings(params, case.cfg)
  assert jax.tree.map(lambda x: x.sharding, lora) == shardings
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
  assert lj.lora_shardings(abstract, case.cfg) == shardings
  sharded = 0
  for path, t in lj.find_targets(case.params, case.cfg).items():
    spec = _kernel_spec(t, strategy)
    sharded += any(e is not None for e in spec)
    side = lambda c: [e for e, x in zip(spec, t.axes) if x == c]
    want = {"a": P(*side("s"), None, *side("i")), "b": P(*side("s"), None, *side("o")), "m": P(*side("s"), *side("o"))}
    for k, s in get_path(shardings, path).items():
      assert s.spec == want[k], (t.name, k, s.spec, want[k])
  assert sharded, "the strategy shards no kernel of this model"

  lora1, loss1, grads1 = _single_device(name)
  step = jax.jit(_loss(case), out_shardings=(NamedSharding(_mesh(), P()), shardings))
  loss, grads = step(jax.device_put(lora1, shardings), params, *inputs)
  assert jax.tree.map(lambda g: g.sharding, grads) == shardings
  np.testing.assert_allclose(loss, loss1, rtol=1e-5)
  chex.assert_trees_all_close(grads, grads1, rtol=1e-5, atol=1e-5)


@mesh_test
def test_mesh_unplaced_kernel_beside_placed_ones_gets_replicated_factors():
  case = _case("mlp")
  params, _ = _placed(case, "fsdp_tp")
  params["params"]["fc2"]["kernel"] = np.asarray(case.params["params"]["fc2"]["kernel"])
  lora = lj.init_lora(params, case.cfg, jax.random.key(0))
  assert lora["params"]["fc2"]["kernel"]["a"].sharding == NamedSharding(_mesh(), P())
  assert lora["params"]["fc1"]["kernel"]["a"].sharding.spec == P(None, "fsdp")


@mesh_test
def test_mesh_pissa_factors_residual_base_and_saved_copies_stay_placed():
  case = _case("mlp")
  params, _ = _placed(case, "fsdp_tp")
  cfg = case.cfg.replace(init="pissa", r=2, modules_to_save=["head"])
  lora, base = lj.init_lora_and_base(params, cfg, jax.random.key(0))
  assert jax.tree.map(lambda x: x.sharding, lora) == lj.lora_shardings(params, cfg)
  assert lora["params"]["fc1"]["kernel"]["a"].sharding.spec == P(None, "fsdp")
  assert jax.tree.map(lambda x: x.sharding, base) == jax.tree.map(lambda x: x.sharding, params)
  want = lj.init_lora_and_base(case.params, cfg, jax.random.key(0))
  chex.assert_trees_all_close((lora, base), want, rtol=1e-5, atol=1e-6)


@mesh_test
def test_mesh_quantized_shards_must_hold_whole_blocks():
  case = _case("nf4")  # fc1: [16, 32] in nf4 blocks of 4 along its 16 inputs
  mesh = _mesh()
  specs = jax.tree.map(lambda _: NamedSharding(mesh, P()), case.params, is_leaf=lj.is_quantized)
  specs["params"]["fc1"]["kernel"] = NamedSharding(mesh, P(("data", "fsdp", "tensor")))
  with pytest.raises(ValueError, match=r"params/fc1/kernel: sharding axis 0 \(size 16\) 8 ways .* nf4 blocks of 4"):
    lj.shard_params(case.params, specs)
  fsdp = NamedSharding(mesh, P(("data", "fsdp"), "tensor"))  # 4 values of the 16: one block a shard
  placed = S.shard_quantized(case.params["params"]["fc1"]["kernel"], fsdp)
  assert S.kernel_sharding("fc1", placed) == fsdp
  assert placed.data.sharding.spec == P("tensor", ("data", "fsdp")) and placed.scale_absmax.sharding.spec == P()
  np.testing.assert_array_equal(placed.dequantize(), case.params["params"]["fc1"]["kernel"].dequantize())
  q = jax.tree.map(lambda x: x, case.params["params"]["fc1"]["kernel"])  # a copy
  q.data = jax.device_put(q.data, NamedSharding(mesh, P(None, ("data", "fsdp", "tensor"))))  # [32, 8] bytes
  params = {"params": {**case.params["params"], "fc1": {"kernel": q, "bias": case.params["params"]["fc1"]["bias"]}}}
  with pytest.raises(ValueError, match=r"params/fc1/kernel: .*blocks of 4 values \(a shard would hold 2 values\)"):
    lj.lora_shardings(params, case.cfg)


@mesh_test
@pytest.mark.xfail(strict=True, reason="XLA's SPMD partitioner (jax 0.10.2, CPU; Shardy and GSPMD alike)")
def test_mesh_xla_strided_conv_kernel_gradient():
  """Not lorax_jax: a stride-2 conv whose flattened output meets a kernel sharded over (data, fsdp),
  the batch over data, gets 4x its kernel's gradient (so the CNN above adapts its convs only)."""
  mesh = _mesh()
  rng = np.random.default_rng(0)
  x, w, head = (rng.normal(size=s).astype(np.float32) for s in [(2, 9, 9, 8), (3, 3, 8, 8), (128, 3)])
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  grad = jax.jit(jax.grad(lambda w, head, x: jnp.mean((conv(x, w).reshape(2, -1) @ head) ** 2)))
  on = lambda y, *spec: jax.device_put(y, NamedSharding(mesh, P(*spec)))
  placed = grad(w, on(head, ("data", "fsdp")), on(x, "data"))
  np.testing.assert_allclose(placed, grad(w, head, x), rtol=1e-5, atol=1e-5)
