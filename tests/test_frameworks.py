"""The engine on models written with other frameworks' layers, against hand-merged weights.

The reference never calls lorax_jax: `zoo_frameworks.hand_merge` forms ``W + s · Σ_r a ⊗ b``
in each kernel's own layout from the axis split the case states.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import lorax_jax as lj
import zoo
import zoo_frameworks as zf

CASES = zf.cases()
IDS = [c.name for c in CASES]


def _case(name: str) -> zf.Case:
  return next(c for c in CASES if c.name == name)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_factor_layout(case):
  """``a: S + (r,) + I`` and ``b: S + (r,) + O`` for every target, ``a`` the input side."""
  lora = lj.init_lora(case.params, case.cfg, jax.random.key(0))
  paths = zf.adapted_paths(case, lora)
  assert paths
  for path, shape in paths:
    node = zf.lora_node(lora, path)
    want = zf.factor_shapes(shape, zf.axes_of(case, path, len(shape)), case.cfg.r)
    assert (node["a"].shape, node["b"].shape) == want, "/".join(path)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_factored_matches_hand_merged(case):
  zf.check_against_hand_merge(case, case.cfg, zoo.random_factors(case.params, case.cfg))


def test_all_linear_finds_equinox_and_haiku_leaves():
  eqx_case, haiku_case = _case("equinox_model"), _case("haiku_transform")
  cfg = lj.LoraConfig(targets="all-linear")
  found = {"/".join(p) for p in lj.find_targets(eqx_case.params, cfg)}
  assert {"mlp/layers/0/weight", "mlp/layers/1/weight", "mlp/layers/2/weight", "out/weight"} <= found
  assert not any(p.endswith("bias") for p in found)
  found = {"/".join(p) for p in lj.find_targets(haiku_case.params, cfg)}
  assert {"embed_in/w", "mha/query/w", "mha/key/w", "mha/value/w", "mha/linear/w", "proj/w"} <= found
  assert not any(p.endswith("/b") for p in found)


def test_equinox_linear_weight_is_out_in_by_name():
  """An Equinox ``Linear.weight`` is ``[out, in]``; ``a`` is ``[r, in]`` like PEFT's ``lora_A``."""
  model = eqx.nn.Linear(5, 3, key=jax.random.key(0))
  params, _ = eqx.partition(model, eqx.is_array)
  lora = lj.init_lora(params, lj.LoraConfig(r=2, targets=["weight"]), jax.random.key(1))
  assert lora["weight"]["a"].shape == (2, 5)
  assert lora["weight"]["b"].shape == (2, 3)


def _axes_cases():
  """Kernels whose axes the names do not tell: each with its expected axis string per target."""
  key = jax.random.key(3)
  ks = jax.random.split(key, 4)
  w_t = {"w_t": jax.random.normal(ks[0], (7, 5)) / 3}     # [out, in], used as x @ W.T
  yield (zf.Case("transposed_use", lambda p, x: jnp.tanh(x @ p["w_t"].T), w_t,
                 (jax.random.normal(ks[1], (4, 5)),), dict(targets=["w_t"]),
                 {"w_t": "oi"}), {"w_t": (2, 5)})
  scan = _case("linen_scan")
  yield (zf.Case("scan_stack", scan.apply_fn, scan.params, scan.inputs,
                 dict(targets="all-linear"), scan.axes),
         {"params/blocks/fc1/kernel": (3, 2, 8), "params/blocks/fc2/kernel": (3, 2, 16)})
  moe = _case("plain_moe_ragged_dot")
  yield (zf.Case("expert_stack", moe.apply_fn, moe.params, moe.inputs,
                 dict(targets=["up", "down"]), moe.axes),
         {"up": (4, 2, 8), "down": (4, 2, 12)})
  layers = _case("linen_dense_general_einsum")
  yield (zf.Case("dense_general", layers.apply_fn, layers.params, layers.inputs,
                 dict(targets=["split_heads", "merge"]),
                 {"split_heads": "ioo", "merge": "iio"}),
         {"params/split_heads/kernel": (2, 12), "params/merge/kernel": (2, 2, 5)})
  eqx_model = eqx.nn.MLP(6, 3, 8, depth=1, key=ks[2])
  params, static = eqx.partition(eqx_model, eqx.is_array)
  yield (zf.Case("equinox_call", lambda p, x: jax.vmap(eqx.combine(p, static))(x), params,
                 (jax.random.normal(ks[3], (4, 6)),),
                 dict(targets=[r"layers/\d+/weight"])),
         {"layers/0/weight": (2, 6), "layers/1/weight": (2, 8)})


AXES_CASES = list(_axes_cases())


@pytest.mark.parametrize("case,a_shapes", AXES_CASES, ids=[c.name for c, _ in AXES_CASES])
def test_axes_from_use_makes_a_the_input_side(case, a_shapes):
  cfg = lj.axes_from_use(case.apply_fn, case.params, case.cfg, *case.inputs)
  assert isinstance(cfg, lj.LoraConfig)
  lora = lj.init_lora(case.params, cfg, jax.random.key(0))
  got = {"/".join(p): zf.lora_node(lora, p)["a"].shape for p, _ in zf.adapted_paths(case, lora)}
  assert got == a_shapes
  zf.check_against_hand_merge(case, cfg, zoo.random_factors(case.params, cfg))

