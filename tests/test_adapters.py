"""Stacked adapters (`stack_adapters`, `unstack_adapters`, `swap_adapter`, `take_adapter`) and `per_adapter`."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lorax_jax import (LoraConfig, delta, find_targets, init_lora, load_adapter, lora_transform, per_adapter,
                       save_adapter, stack_adapters, swap_adapter, take_adapter, unstack_adapters)
from lorax_jax.paths import get_path, path_str
from test_io import NET_MAP, assert_tree_equal, random_lora

TARGETS = ["q_proj", "v_proj", "o_proj", "embed_tokens", "conv_in"]
# Different ranks and alphas per adapter and per target (patterns), one rsLoRA.
CFGS = [
    LoraConfig(r=4, alpha=8, targets=TARGETS, rank_pattern={"conv_in": 2}),
    LoraConfig(r=2, alpha=3, targets=TARGETS, use_rslora=True, alpha_pattern={"o_proj": 5}),
    LoraConfig(r=3, alpha=6, targets=TARGETS, rank_pattern={"layers_1/q_proj": 1}),
]
SCANNED = {"params": {"layers": {"attn": {"q_proj": {"kernel": jnp.ones((3, 6, 5))}}}}}  # nn.scan: [layers, in, out]
SCANNED_CFGS = [LoraConfig(r=r, alpha=a, kernel_axes={"q_proj": "sio"}) for r, a in ((1, 2), (4, 4))]


@pytest.fixture(scope="module")
def net_params():
  from test_io import Net
  return Net().init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 6, 6, 3)))


def cases(net_params):
  return [(net_params, CFGS), (SCANNED, SCANNED_CFGS)]


def check_stacked(params, stacked, cfg, loras, cfgs, max_rank=None):
  """The layout of the module docstring: padded rows zero, scales per adapter, each slice's
  update the adapter's own."""
  slice_targets = find_targets(params, cfg)
  for path, t in slice_targets.items():
    node = get_path(stacked, path)
    own = [find_targets(params, c)[path] for c in cfgs]
    want_rank = max(o.rank for o in own) if max_rank is None else min(max_rank, t.shape[t.axes.index("o")],
                                                                        int(np.prod(t.in_shape)))
    assert t.rank == want_rank and t.scale == 1.0
    assert node["a"].shape == (len(cfgs), *t.a_shape) and node["b"].shape == (len(cfgs), *t.b_shape)
    assert node["scale"].tolist() == [np.float32(o.scale) for o in own]
    for j, (o, lora) in enumerate(zip(own, loras)):
      for k in ("a", "b"):
        rows = np.moveaxis(np.asarray(node[k][j]), t.n_stack, 0)
        assert not rows[o.rank:].any(), (path_str(path), j, k)
      got = node["scale"][j] * t.delta(node["a"][j], node["b"][j])
      np.testing.assert_allclose(got, delta(params, lora, cfgs[j])[path], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("which", [0, 1], ids=["net", "scanned"])
@pytest.mark.parametrize("max_rank", [None, 4])
def test_stack_unstack_round_trip(net_params, which, max_rank):
  params, cfgs = cases(net_params)[which]
  loras = [random_lora(params, c, seed) for seed, c in enumerate(cfgs)]
  stacked, cfg = stack_adapters(params, loras, cfgs, max_rank=max_rank)
  check_stacked(params, stacked, cfg, loras, cfgs, max_rank)
  back = unstack_adapters(params, stacked, cfgs)
  for lora, b in zip(loras, back):
    assert_tree_equal(b, lora)  # bitwise


def test_dora_magnitudes_stack(net_params):
  cfgs = [c.replace(use_dora=True) for c in CFGS[:2]]
  loras = [random_lora(net_params, c, seed) for seed, c in enumerate(cfgs)]
  stacked, cfg = stack_adapters(net_params, loras, cfgs)
  assert cfg.use_dora
  for path, t in find_targets(net_params, cfg).items():
    assert get_path(stacked, path)["m"].shape == (2, *t.m_shape)
  for lora, b in zip(loras, unstack_adapters(net_params, stacked, cfgs)):
    assert_tree_equal(b, lora)


def test_pairs_in_and_adapters_out_through_peft_files(net_params, tmp_path):
  """`load_adapter`'s pairs stack as they are; each unstacked adapter saves as a PEFT adapter."""
  pairs = []
  for j, c in enumerate(CFGS):
    save_adapter(str(tmp_path / f"in{j}"), random_lora(net_params, c, j), c, net_params, NET_MAP)
    pairs.append(load_adapter(str(tmp_path / f"in{j}"), net_params, NET_MAP))
  stacked, _ = stack_adapters(net_params, pairs)
  cfgs = [c for _, c in pairs]
  for j, lora in enumerate(unstack_adapters(net_params, stacked, cfgs)):
    save_adapter(str(tmp_path / f"out{j}"), lora, cfgs[j], net_params, NET_MAP)
    again, cfg = load_adapter(str(tmp_path / f"out{j}"), net_params, NET_MAP)
    assert_tree_equal(again, pairs[j][0])
    assert cfg == cfgs[j]


def test_swap_adapter_keeps_the_compiled_step(net_params):
  loras = [random_lora(net_params, c, seed) for seed, c in enumerate(CFGS)]
  stacked, _ = stack_adapters(net_params, loras, CFGS, max_rank=4)
  before = jax.tree.map(np.array, stacked)
  traces = []

  @jax.jit
  def step(tree):
    traces.append(1)
    return sum(jnp.sum(x) for x in jax.tree.leaves(tree))

  step(stacked)
  new_cfg = LoraConfig(r=3, alpha=1.5, targets=TARGETS, use_rslora=True, rank_pattern={"embed_tokens": 4})
  new = random_lora(net_params, new_cfg, 9)
  swapped = swap_adapter(net_params, stacked, 1, new, new_cfg)
  step(swapped)
  assert len(traces) == 1
  assert jax.tree.map(lambda x: (x.shape, x.dtype), swapped) == jax.tree.map(lambda x: (x.shape, x.dtype), stacked)
  assert_tree_equal(stacked, before)  # the input is not mutated
  want, _ = stack_adapters(net_params, [loras[0], new, loras[2]], [CFGS[0], new_cfg, CFGS[2]], max_rank=4)
  assert_tree_equal(swapped, want)
  assert_tree_equal(unstack_adapters(net_params, swapped, [CFGS[0], new_cfg, CFGS[2]])[1], new)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_take_adapter_runs_each_adapter_as_alone(net_params, use_dora):
  """One compiled step with a traced index runs each adapter (patterns, rsLoRA, embedding, conv,
  DoRA) with its own outputs and gradients; an index out of range gives NaN, or an error."""
  from test_io import Net
  cfgs = [c.replace(use_dora=use_dora) for c in CFGS]
  loras = [jax.tree.map(lambda x: jnp.asarray(0.2 * np.asarray(x)), random_lora(net_params, c, seed))  # outputs ~1
           for seed, c in enumerate(cfgs)]
  stacked, cfg = stack_adapters(net_params, loras, cfgs, max_rank=5)
  args = (jnp.array([[1, 5, 7]]), jax.random.normal(jax.random.key(1), (1, 6, 6, 3)))
  loss = lambda apply, lora: sum(jnp.sum(jnp.sin(o)) for o in apply(net_params, lora, *args))
  apply = lora_transform(Net().apply, net_params, cfg)
  traces = []

  @jax.jit
  def step(stacked, i):
    traces.append(1)
    return jax.value_and_grad(lambda s: loss(apply, take_adapter(s, i)))(stacked)

  for j, (lora, c) in enumerate(zip(loras, cfgs)):
    value, grads = jax.tree.map(np.asarray, step(stacked, jnp.int32(j)))
    want, want_grads = jax.value_and_grad(lambda lo: loss(lora_transform(Net().apply, net_params, c), lo))(lora)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    for path, t in find_targets(net_params, c).items():
      node, own = get_path(grads, path), get_path(want_grads, path)
      assert not node["scale"].any() and not np.delete(node["a"], j, axis=0).any()  # no other adapter's
      for k in sorted(own):
        kept, padded = np.split(node[k][j], [t.rank], axis=t.n_stack) if k != "m" else (node[k][j], 0)
        np.testing.assert_allclose(kept, own[k], rtol=1e-4, atol=1e-5, err_msg=f"{t.name}/{k}")
        assert not np.any(padded), (t.name, k)
  assert len(traces) == 1
  assert np.isnan(step(stacked, jnp.int32(3))[0]) and np.isnan(step(stacked, jnp.int32(-1))[0])
  with pytest.raises(ValueError, match="take_adapter: adapter index 3 is out of range for a stacked tree of 3"):
    take_adapter(stacked, 3)
  with pytest.raises(ValueError, match="take_adapter: params/conv_in/kernel must be a stacked node"):
    conv = stacked["params"]["conv_in"]["kernel"]
    take_adapter({"params": {**stacked["params"], "conv_in": {"kernel": {"a": conv["a"], "b": conv["b"]}}}}, 0)


def test_swap_adapter_refusals(net_params):
  loras = [random_lora(net_params, c, seed) for seed, c in enumerate(CFGS[:2])]
  stacked, _ = stack_adapters(net_params, loras, CFGS[:2])
  big = CFGS[0].replace(r=5)
  with pytest.raises(ValueError, match="rank 5 at params/embed_tokens/embedding, above the stacked tree's padded rank 4"):
    swap_adapter(net_params, stacked, 0, random_lora(net_params, big), big)
  with pytest.raises(ValueError, match="adapter index 2 is out of range for a stacked tree of 2 adapters"):
    swap_adapter(net_params, stacked, 2, loras[0], CFGS[0])
  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), loras[0])
  with pytest.raises(ValueError, match="the new adapter's factor .* is bfloat16, the stacked tree's float32"):
    swap_adapter(net_params, stacked, 0, half, CFGS[0])
  fewer = CFGS[0].replace(targets=["q_proj"])
  with pytest.raises(ValueError, match="the stacked tree adapts params/conv_in/kernel, .*the new adapter does not"):
    swap_adapter(net_params, stacked, 0, random_lora(net_params, fewer), fewer)


def test_stack_refusals(net_params):
  loras = [random_lora(net_params, c, seed) for seed, c in enumerate(CFGS[:2])]

  def refused(match, loras=loras, cfgs=CFGS[:2], **kw):
    with pytest.raises(ValueError, match=match):
      stack_adapters(net_params, loras, cfgs, **kw)

  refused("no adapters to stack", [], [])
  refused("2 LoRA trees but 1 configs", cfgs=CFGS[:1])
  refused("loras must be .lora, cfg. pairs; item 1", [(loras[0], CFGS[0]), loras[1]], None)
  refused("adapter 0 has rank 2 at params/conv_in/kernel, above max_rank=1", max_rank=1)
  refused("max_rank must be a positive integer", max_rank=0)
  refused("adapter 1: LoRA factor .* has shape", cfgs=[CFGS[0], CFGS[0]])
  fewer = CFGS[1].replace(targets=["q_proj", "v_proj"])
  refused(r"adapters 1 and 0 target different kernels \(only adapter 0 targets .*o_proj",
          [loras[0], random_lora(net_params, fewer)], [CFGS[0], fewer])
  dora = CFGS[1].replace(use_dora=True)
  refused("adapter 1 is DoRA but adapter 0 is plain LoRA", [loras[0], random_lora(net_params, dora)], [CFGS[0], dora])
  oi = CFGS[1].replace(kernel_axes={"layers_0/q_proj": "oi"})
  refused("adapter 1 reads params/layers_0/q_proj/kernel with kernel_axes 'oi', adapter 0 with 'io'; adapters of one",
          [loras[0], random_lora(net_params, oi)], [CFGS[0], oi])
  refused("adapter 1 has dropout=0.1, adapter 0 0.0", cfgs=[CFGS[0], CFGS[1].replace(dropout=0.1)])
  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), loras[1])
  refused("adapter 1's factor .* is bfloat16, adapter 0's float32", [loras[0], half])
  refused("adapter 1 has init='pissa'", cfgs=[CFGS[0], CFGS[1].replace(init="pissa")])
  small = {"attn": {"query": {"kernel": jnp.ones((4, 4))}}, "head": {"kernel": jnp.ones((4, 2))}}
  cfgs = [LoraConfig(), LoraConfig(modules_to_save=["head"])]
  with pytest.raises(ValueError, match="adapter 1 holds modules_to_save copies"):
    stack_adapters(small, [init_lora(small, c, jax.random.key(0)) for c in cfgs], cfgs)


def test_unstack_refusals(net_params):
  loras = [random_lora(net_params, c, seed) for seed, c in enumerate(CFGS[:2])]
  stacked, _ = stack_adapters(net_params, loras, CFGS[:2])
  with pytest.raises(ValueError, match=r"scale of adapter 1 at .* is 2.12132, cfgs\[1\] gives 1.5"):
    unstack_adapters(net_params, stacked, [CFGS[0], CFGS[1].replace(use_rslora=False)])
  with pytest.raises(ValueError, match=r"adapter 1's .*/a is non-zero in the padded rows 1"):
    unstack_adapters(net_params, stacked, [CFGS[0], CFGS[1].replace(r=1, alpha=3 / np.sqrt(2))])
  with pytest.raises(ValueError, match=r"conv_in/kernel/a has shape \(2, 2, 3, 3, 3\), expected \(3, 2, 3, 3, 3\)"):
    unstack_adapters(net_params, stacked, CFGS)
  with pytest.raises(ValueError, match=r"cfgs\[0\] has rank 5 at .*, but the stacked tree's rank there is 4"):
    unstack_adapters(net_params, stacked, [CFGS[0].replace(r=5), CFGS[1]])


# ---- per_adapter ------------------------------------------------------------------------------

def tx():
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))


def test_per_adapter_equals_each_adapter_alone(net_params):
  """Several steps of clipped AdamW on the stacked tree equal the same steps on each adapter."""
  loras = [random_lora(net_params, c, seed) for seed, c in enumerate(CFGS)]
  stacked, _ = stack_adapters(net_params, loras, CFGS)
  opt = per_adapter(tx())
  state = opt.init(stacked)
  alone = [tx().init(lora) for lora in loras]

  @jax.jit
  def step(stacked, state, grads):
    updates, state = opt.update(grads, state, stacked)
    return optax.apply_updates(stacked, updates), state

  @jax.jit
  def step_alone(lora, state, grads):
    updates, state = tx().update(grads, state, lora)
    return optax.apply_updates(lora, updates), state

  for n in range(4):
    grads = [jax.tree.map(lambda x: (10.0 ** j) * x, random_lora(net_params, c, 100 * n + j))
             for j, c in enumerate(CFGS)]  # norms 1e0..1e2 apart: one global norm would couple them
    stacked, state = step(stacked, state, stack_adapters(net_params, grads, CFGS)[0])
    for j in range(3):
      loras[j], alone[j] = step_alone(loras[j], alone[j], grads[j])
  # unstack_adapters also checks that the scales did not move and the padded rows stayed zero
  chex.assert_trees_all_close(list(unstack_adapters(net_params, stacked, CFGS)), list(loras), rtol=1e-6, atol=1e-6)


def test_per_adapter_never_couples_adapters(net_params):
  loras = [random_lora(net_params, c, seed) for seed, c in enumerate(CFGS[:2])]
  stacked, _ = stack_adapters(net_params, loras, CFGS[:2])
  opt = per_adapter(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)))
  grad0 = random_lora(net_params, CFGS[0], 5)
  updates = {}
  for name, other in (("zero", jax.tree.map(jnp.zeros_like, loras[1])),
                      ("huge", jax.tree.map(lambda x: 1e6 * x, random_lora(net_params, CFGS[1], 6)))):
    grads, _ = stack_adapters(net_params, [grad0, other], CFGS[:2])
    updates[name], _ = opt.update(grads, opt.init(stacked), stacked)
  for path, t in find_targets(net_params, CFGS[0]).items():
    zero, huge = get_path(updates["zero"], path), get_path(updates["huge"], path)
    for k in ("a", "b"):
      assert bool((zero[k][0] == huge[k][0]).all())  # adapter 0 does not see adapter 1
      assert not bool(zero[k][1].any())  # a zero gradient from a fresh Adam state moves nothing
    assert not bool(zero["scale"].any()) and not bool(huge["scale"].any())
  state = opt.init(stacked)
  assert all(x.shape[0] == 2 for x in jax.tree.leaves(state))
  n_leaves = len(jax.tree.leaves(optax.adam(1e-2).init(loras[0])))
  assert len(jax.tree.leaves(state)) == n_leaves  # no state for the scales
