"""merge / unmerge / delta and the frozen-trainable bookkeeping, against hand-written math."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_jax as lj
import zoo


def _case(name):
  return [c for c in zoo.cases() if c.name == name][0]


def test_delta_is_scaled_outer_product():
  case = _case("mlp")
  lora = zoo.random_lora(case)
  deltas = lj.delta(case.params, lora, case.cfg)
  for t in lj.find_targets(case.params, case.cfg).values():
    node = lora["params"][t.path[1]]["kernel"]
    a, b = np.asarray(node["a"], np.float64), np.asarray(node["b"], np.float64)
    want = t.scale * a.T @ b  # [in, r] @ [r, out], exact in float64
    # A float32 sum of r products and the scale: at most (r + 2) roundings of the magnitudes summed,
    # whatever order the BLAS kernel adds them in (an rtol alone fails where terms cancel).
    bound = (case.cfg.r + 2) * np.finfo(np.float32).eps * t.scale * (np.abs(a).T @ np.abs(b))
    assert np.all(np.abs(np.asarray(deltas[t.path], np.float64) - want) <= bound), t.path
    assert t.scale == case.cfg.alpha / case.cfg.r


def _hand_merged(w, node, scale):
  """``W + s · aᵀ b`` for a 2-axis ``[in, out]`` kernel, in float64 numpy."""
  return np.asarray(w, np.float64) + scale * np.asarray(node["a"], np.float64).T @ np.asarray(node["b"], np.float64)


def test_merge_then_unmerge_round_trips_and_matches_hand_written_weights():
  for case in zoo.cases():
    lora = zoo.random_lora(case)
    merged = lj.merge(case.params, lora, case.cfg)
    restored = lj.unmerge(merged, lora, case.cfg)
    for (path, w), (_, w2) in zip(lj.qarray.leaves_with_paths(case.params), lj.qarray.leaves_with_paths(restored)):
      np.testing.assert_allclose(w2, w, atol=1e-6 * max(1.0, float(np.abs(w).max())), err_msg=str(path))
  case = _case("mlp")
  lora = zoo.random_lora(case)
  merged = jax.jit(lambda p, l: lj.merge(p, l, case.cfg))(case.params, lora)
  np.testing.assert_array_equal(merged["params"]["head"]["kernel"], case.params["params"]["head"]["kernel"])  # not a target
  for name in ("fc1", "fc2"):
    want = _hand_merged(case.params["params"][name]["kernel"], lora["params"][name]["kernel"], case.cfg.alpha / case.cfg.r)
    np.testing.assert_allclose(merged["params"][name]["kernel"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(merged["params"][name]["bias"], case.params["params"][name]["bias"])


def test_merge_follows_general_layouts():
  """``"oi"`` (an ``[out, in]`` weight) and ``"sio"`` (an expert stack): ``W[o, i] += s · Σ_r a[r, i] b[r, o]``."""
  torch = _case("torch_style_mlp")
  lora = zoo.random_lora(torch)
  merged = lj.merge(torch.params, lora, torch.cfg)
  node = lora["fc1"]["weight"]
  want = _hand_merged(torch.params["fc1"]["weight"].T, node, 2.0).T
  np.testing.assert_allclose(merged["fc1"]["weight"], want, rtol=1e-5, atol=1e-5)
  moe = _case("moe_ragged_dot")
  lora = zoo.random_lora(moe)
  merged = lj.merge(moe.params, lora, moe.cfg)
  node = lora["experts"]["w_in"]
  for e in range(4):
    want = _hand_merged(moe.params["experts"]["w_in"][e], {"a": node["a"][e], "b": node["b"][e]}, 2.0)
    np.testing.assert_allclose(merged["experts"]["w_in"][e], want, rtol=1e-5, atol=1e-5)


def test_half_precision_merge_overflow_is_an_error():
  params = {"w": jnp.full((4, 4), 60000.0, jnp.float16)}
  cfg = lj.LoraConfig(r=1, alpha=1, targets=["w"])
  lora = {"w": {"a": jnp.ones((1, 4)) * 100, "b": jnp.ones((1, 4)) * 100}}
  with pytest.raises(ValueError, match="kernel w overflows float16 once merged"):
    lj.merge(params, lora, cfg)


def test_merge_keeps_kernel_dtype():
  params = {"q_proj": {"kernel": jnp.ones((4, 4), jnp.bfloat16)}}
  cfg = lj.LoraConfig(r=2)
  merged = lj.merge(params, jax.tree.map(lambda a: a + 1, lj.init_lora(params, cfg, jax.random.key(0))), cfg)
  assert merged["q_proj"]["kernel"].dtype == jnp.bfloat16


def test_bad_lora_trees_name_the_path_and_shapes():
  case = _case("mlp")
  lora = lj.init_lora(case.params, case.cfg, jax.random.key(0))
  apply = lj.lora_transform(case.apply_fn, case.params, case.cfg)
  missing = {"params": {"fc1": lora["params"]["fc1"]}}
  with pytest.raises(ValueError, match="missing the factors of params/fc2/kernel"):
    apply(case.params, missing, *case.inputs)
  extra = {"params": {**lora["params"], "head": lora["params"]["fc1"]}}
  with pytest.raises(ValueError, match="unexpected entry params/head/kernel"):
    lj.merge(case.params, extra, case.cfg)
  wrong = jax.tree.map(lambda x: x, lora)
  wrong["params"]["fc2"]["kernel"]["a"] = jnp.zeros((3, 7))
  with pytest.raises(ValueError, match=r"params/fc2/kernel/a has shape \(3, 7\), expected \(3, 32\) for kernel \(32, 32\)"):
    apply(case.params, wrong, *case.inputs)
  with pytest.raises(ValueError, match="must be {'a', 'b'}"):
    lj.check_lora(case.params, {"params": {"fc1": {"kernel": {"a": 1}}, "fc2": lora["params"]["fc2"]}}, case.cfg)


def test_init_factors_follow_peft():
  case = _case("embed_lm")
  lora = lj.init_lora(case.params, case.cfg.replace(r=8), jax.random.key(0))
  hidden = lora["params"]["hidden"]["kernel"]
  bound = 1 / np.sqrt(16)
  assert hidden["a"].shape == (8, 16) and np.all(np.abs(hidden["a"]) <= bound) and np.abs(hidden["a"]).max() > bound / 2
  np.testing.assert_array_equal(hidden["b"], 0)
  embed = lora["params"]["embed"]["embedding"]
  np.testing.assert_array_equal(embed["a"], 0)
  assert embed["b"].shape == (8, 16) and np.std(embed["b"]) > 0.5
  gauss = lj.init_lora(case.params, case.cfg.replace(r=8, init="gaussian"), jax.random.key(0))
  assert abs(float(np.std(gauss["params"]["hidden"]["kernel"]["a"])) - 1 / 8) < 0.03
  # One distinct key per target: no two targets share factors.
  keys = lj.init_lora(case.params, case.cfg.replace(targets=["hidden", "lm_head"]), jax.random.key(0))
  assert not np.allclose(keys["params"]["hidden"]["kernel"]["a"][:, :16],
                         keys["params"]["lm_head"]["kernel"]["a"][:, :16])
  half = lj.init_lora(case.params, case.cfg.replace(param_dtype=jnp.bfloat16), jax.random.key(0))
  assert {x.dtype for x in jax.tree.leaves(half)} == {jnp.dtype(jnp.bfloat16)}


def test_stacked_kernels_keep_their_layer_axes():
  case = _case("scan_remat_transformer")
  lora = lj.init_lora(case.params, case.cfg, jax.random.key(0))
  q = lora["params"]["blocks"]["query"]["kernel"]
  assert q["a"].shape == (3, 4, 32) and q["b"].shape == (3, 4, 32)


def test_split_join_mask_count_size():
  case = _case("mlp")
  lora = zoo.random_lora(case)
  combined = lj.join_params(case.params, lora)
  assert set(combined["params"]["fc1"]) == {"kernel", "bias", "lora"}
  assert set(combined["params"]["fc1"]["lora"]["kernel"]) == {"a", "b"}
  frozen, trainable = lj.split_params(combined, case.cfg)
  jax.tree.map(np.testing.assert_array_equal, frozen, jax.tree.map(np.asarray, case.params))
  jax.tree.map(np.testing.assert_array_equal, trainable, lora)
  frozen_mask, lora_mask = lj.trainable_mask(frozen, trainable)
  assert not any(jax.tree.leaves(frozen_mask)) and all(jax.tree.leaves(lora_mask))
  n = sum(int(np.size(x)) for x in jax.tree.leaves(lora))
  assert lj.count(lora) == n == lj.lora_count(case.params, case.cfg)
  assert lj.size(lora) == 4 * n
  kernels = lj.filter_params(case.params, lambda path, leaf: path[-1] == "kernel")
  assert set(kernels["params"]) == {"fc1", "fc2", "head"} and all(set(v) == {"kernel"} for v in kernels["params"].values())
  with pytest.raises(ValueError, match="missing the factors"):
    lj.split_params(case.params, case.cfg)
  combined["params"]["head"]["lora"] = {"scale": lora["params"]["fc1"]["kernel"]}
  with pytest.raises(ValueError, match="params/head/lora/scale adapts no kernel 'scale'"):
    lj.split_params(combined, case.cfg)
