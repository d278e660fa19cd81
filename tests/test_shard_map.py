"""The engine's ``shard_map`` rule: a kernel passed into a ``jax.shard_map`` body enters with its
factors sharded like it (docs/engine.md#nested-rules).

The ``test_mesh_*`` tests need several devices: `test_eight_host_devices_in_a_subprocess` runs them
in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (a mesh of 4 along
``x``). Each model is a ``shard_map`` body doing (a) data parallelism (batch split, kernel
replicated), (b) tensor parallelism with a column-split kernel, (c) a row-split kernel whose
partial products the body ``psum``\\ s, (d) an expert-parallel MoE (experts split over devices,
tokens exchanged by ``all_to_all``); for each, the factored engine's outputs and LoRA gradients
equal the merged reference's (1e-5) with no fallback, its compiled forward has the frozen model's
collectives and no other (DoRA: and the norm's reduction of a kernel split over its inputs, once a
call, outside the body), and the gradients come back with the factors' shardings
(`lorax_jax.lora_shardings` of the placed kernels).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import lorax_jax as lj
from test_sharding import mesh_tests_in_a_subprocess

import zoo

N = 4  # devices along the mapped axis
mesh_test = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (the subprocess test runs it)")


def test_eight_host_devices_in_a_subprocess():
  mesh_tests_in_a_subprocess(__file__)


def test_mixed_batch_into_a_mapped_body_is_refused():
  mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
  model = lambda p, x: jax.shard_map(lambda w, x: x @ w, mesh=mesh, in_specs=(P(), P("x")), out_specs=P("x"))(p["w"], x)
  params = {"w": jnp.ones((4, 3))}
  lora = lj.init_lora(params, lj.LoraConfig(r=2, targets=["w"]), jax.random.key(0))
  stacked, cfg = lj.stack_adapters(params, [lora, lora], [lj.LoraConfig(r=2, targets=["w"])] * 2)
  apply = lj.lora_transform(model, params, cfg)
  with pytest.raises(ValueError, match=r"kernel w reaches `shard_map`: its adapter ids index the whole batch"):
    apply(params, stacked, jnp.ones((2, 4)), adapter_ids=jnp.array([0, 1]))


def test_the_walk_follows_a_kernel_into_a_mapped_body():
  mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
  body = lambda w, x: jnp.einsum("etd,edf->etf", x, w)
  model = lambda p, x: jax.shard_map(body, mesh=mesh, in_specs=(P("x"), P("x")), out_specs=P("x"))(p["experts"], x)
  cfg = lj.axes_from_use(model, {"experts": jnp.zeros((2, 6, 5))}, lj.LoraConfig(r=2, targets=["experts"]),
                         jnp.zeros((2, 3, 6)))
  assert dict(cfg.kernel_axes) == {"experts": "sio"}


def test_quantized_kernels_enter_a_mapped_body_dequantized():
  """An nf4 target and an nf4 kernel that is not one, passed into a body: QLoRA's merged reference."""
  mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
  body = lambda w, v, x: jax.lax.psum((x @ w) @ v, "x")
  model = lambda p, x: jax.shard_map(body, mesh=mesh, in_specs=(P(None, "x"), P("x", None), P()), out_specs=P())(
      p["w"], p["v"], x)
  params = {"w": jax.random.normal(jax.random.key(0), (16, 8)), "v": jax.random.normal(jax.random.key(1), (8, 16))}
  quantized = lj.quantize(params, "nf4", block_size=8, targets=["w", "v"])
  cfg = lj.LoraConfig(r=2, targets=["w"])
  lora = zoo.random_factors(quantized, cfg)
  apply = lj.lora_transform(model, quantized, cfg, strict=True)
  x = jax.random.normal(jax.random.key(2), (3, 16))
  want = model(lj.merge(lj.dequantize(quantized), lora, cfg), x)
  np.testing.assert_allclose(apply(quantized, lora, x), want, rtol=1e-5, atol=1e-5)


# --- several devices ------------------------------------------------------------------------------

def _mesh() -> Mesh:
  return Mesh(np.array(jax.devices()[:N]), ("x",))


def _data_parallel(mesh: Mesh) -> Callable[..., jax.Array]:
  def body(w1, w2, x):
    return jnp.tanh(x @ w1) @ w2
  return lambda p, x: jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P("x")), out_specs=P("x"))(
      p["fc1"], p["fc2"], x)


def _column_split(mesh: Mesh) -> Callable[..., jax.Array]:
  def body(w, x):
    return jax.nn.gelu(x @ w)
  return lambda p, x: jax.shard_map(body, mesh=mesh, in_specs=(P(None, "x"), P()), out_specs=P(None, "x"))(p["up"], x)


def _row_split(mesh: Mesh) -> Callable[..., jax.Array]:
  """Megatron's MLP: ``up`` split by columns, ``down`` by rows, the partial products ``psum``\\ med."""
  def body(up, down, x):
    return jax.lax.psum(jnp.tanh(x @ up) @ down, "x")
  return lambda p, x: jax.shard_map(body, mesh=mesh, in_specs=(P(None, "x"), P("x", None), P()), out_specs=P())(
      p["up"], p["down"], x)


def _moe(mesh: Mesh) -> Callable[..., jax.Array]:
  """Top-1 experts, ``E`` split over the devices: each device routes its tokens (the router
  replicated), sends each expert's tokens to its device (``all_to_all``), runs its experts
  ``[E/N, d, f]``, ``[E/N, f, d]``, and brings the results back."""
  def body(router, w_in, w_out, x):
    t, e = x.shape[0], router.shape[1]
    choice = jnp.argmax(x @ router, axis=-1)
    dispatch = jax.nn.one_hot(choice, e)[:, :, None] * jnp.eye(t)[:, None, :]  # [t, E, slot]
    xs = jnp.einsum("td,tes->esd", x, dispatch)  # [E, slots, d]
    xs = jax.lax.all_to_all(xs, "x", 0, 1, tiled=True)  # [E/N, N·slots, d]: this device's experts
    ys = jnp.einsum("esf,efd->esd", jax.nn.relu(jnp.einsum("esd,edf->esf", xs, w_in)), w_out)
    ys = jax.lax.all_to_all(ys, "x", 1, 0, tiled=True)  # [E, slots, d] again
    return jnp.einsum("esd,tes->td", ys, dispatch)
  return lambda p, x: jax.shard_map(body, mesh=mesh, in_specs=(P(), P("x"), P("x"), P("x")), out_specs=P("x"))(
      p["router"], p["w_in"], p["w_out"], x)


def _case(name: str, dora: bool = False) -> tuple[Callable[..., jax.Array], dict[str, Any], dict[str, P], jax.Array,
                                                  lj.LoraConfig]:
  """``(model, params, kernel specs, x, cfg)`` of case ``name``."""
  ks = iter(jax.random.split(jax.random.key(0), 6))
  w = lambda *shape: jax.random.normal(next(ks), shape) / np.sqrt(shape[-2])
  mesh = _mesh()
  if name == "data_parallel":
    params, specs, x = {"fc1": w(6, 8), "fc2": w(8, 3)}, {"fc1": P(), "fc2": P()}, jax.random.normal(next(ks), (8, 6))
  elif name == "column_split":
    params, specs, x = {"up": w(6, 8)}, {"up": P(None, "x")}, jax.random.normal(next(ks), (5, 6))
  elif name == "row_split":
    params, specs = {"up": w(6, 8), "down": w(8, 6)}, {"up": P(None, "x"), "down": P("x", None)}
    x = jax.random.normal(next(ks), (5, 6))
  else:
    params = {"router": w(6, N * 2), "w_in": w(N * 2, 6, 8), "w_out": w(N * 2, 8, 6)}
    specs, x = {"router": P(), "w_in": P("x"), "w_out": P("x")}, jax.random.normal(next(ks), (N * 3, 6))
  model = {"data_parallel": _data_parallel, "column_split": _column_split, "row_split": _row_split, "moe": _moe}[name](mesh)
  targets = [k for k in params if k != "router"]
  cfg = lj.axes_from_use(model, params, lj.LoraConfig(r=2, alpha=4, targets=targets, use_dora=dora), x)
  placed = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
  return model, placed, specs, x, cfg


@mesh_test
@pytest.mark.parametrize("name, dora", [("data_parallel", False), ("column_split", False), ("column_split", True),
                                        ("row_split", False), ("row_split", True), ("moe", False)])
def test_mesh_factored_equals_merged_in_a_mapped_body(name, dora):
  model, params, specs, x, cfg = _case(name, dora)
  shardings = lj.lora_shardings(params, cfg)
  lora = jax.device_put(zoo.random_factors(params, cfg), shardings)
  apply = lj.lora_transform(model, params, cfg, strict=True)  # every use factored (no cost-rule merge either)
  reference = lj.lora_transform(model, params, cfg, mode="reference")
  loss = lambda f: jax.jit(jax.value_and_grad(lambda l: jnp.mean(f(params, l, x) ** 2)))
  value, grads = loss(apply)(lora)
  want_value, want_grads = loss(reference)(lora)
  assert apply.fallbacks == set()
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  chex.assert_trees_all_close(grads, want_grads, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(apply(params, lora, x), reference(params, lora, x), rtol=1e-5, atol=1e-5)
  got, want = _collectives(lambda l: apply(params, l, x), lora), _collectives(lambda p: model(p, x), params)
  assert {k: n for k, n in got.items() if k[1]} == {k: n for k, n in want.items() if k[1]}  # the body's own only
  assert got == want or dora, got  # DoRA: the norm of a kernel split over its inputs, reduced once outside the body
  same = jax.tree.map(lambda g, s: g.sharding.is_equivalent_to(s, g.ndim), grads, shardings)
  assert all(jax.tree.leaves(same)), (jax.tree.map(lambda g: g.sharding.spec, grads), shardings)
  split = {"column_split": {"up": ("a", "b")}, "row_split": {"up": ("a", "b"), "down": ("b", "a")},
           "moe": {"w_in": ("", "ab"), "w_out": ("", "ab")}}.get(name, {})
  for target, (whole, cut) in split.items():  # column split: b split, a whole; row split: a split; experts: both
    for f in "ab":
      spec = shardings[target][f].spec
      assert spec == (P("x", None, None) if target.startswith("w_") else P(None, "x") if f in cut else P(None, None)), (
          target, f, spec)


def _collectives(f: Callable[..., Any], *xs: Any) -> collections.Counter:
  """The collectives of ``f``'s compiled program, counted by kind and by whether they are in the
  ``shard_map`` body (read from their op names)."""
  text = jax.jit(f).lower(*xs).compile().as_text()
  found = re.findall(r"\b(all-reduce|all-gather|all-to-all|reduce-scatter|collective-permute)(?:-start)?\("
                     r"[^\n]*?op_name=\"([^\"]*)\"", text)
  return collections.Counter((kind, "shard_map" in name) for kind, name in found)


@mesh_test
def test_mesh_dropout_masks_differ_between_devices():
  """With a key, each device draws its own masks: equal rows on every device come out different."""
  model, params, _, _, cfg = _case("data_parallel")
  cfg = cfg.replace(dropout=0.5)
  apply = lj.lora_transform(model, params, cfg)
  lora = zoo.random_factors(params, cfg, scale=1.0)
  y = apply(params, lora, jnp.ones((N, 6)), rng=jax.random.key(3))
  assert len({tuple(np.round(np.asarray(row), 5)) for row in y}) == N
  grads = jax.grad(lambda l: jnp.sum(apply(params, l, jnp.ones((N, 6)), rng=jax.random.key(3))))(lora)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
