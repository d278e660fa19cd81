"""LoraConfig validation and targeting."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_jax as lj
import zoo


def _params():
  return zoo.MHATransformer().init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def test_lorax_defaults():
  cfg = lj.LoraConfig()
  assert (cfg.r, cfg.alpha, cfg.dropout, cfg.dropout_seed, cfg.param_dtype) == (1, 2, 0.0, None, jnp.float32)
  assert cfg.target_query and cfg.target_key and cfg.target_value and cfg.target_fn is None
  assert cfg.scale(4, 8) == 2.0 and cfg.replace(use_rslora=True).scale(4, 8) == 4.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "r must be a positive int"),
    (dict(r=-2), "r must be a positive int"),
    (dict(r=2.5), "r must be a positive int"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
    (dict(alpha=float("nan")), "alpha must be a finite number"),
    (dict(param_dtype=jnp.int32), "param_dtype must be a float dtype"),
    (dict(init="orthogonal"), "init must be one of"),
    (dict(targets="(unclosed"), "invalid regex"),
    (dict(rank_pattern={"q": 0}), r"rank_pattern\['q'\] must be a positive int"),
    (dict(kernel_axes={"x": (1, 0)}), "kernel_axes"),
    (dict(target_query=False, target_key=False, target_value=False), "targets nothing"),
])
def test_invalid_config_raises(kwargs, message):
  with pytest.raises(ValueError, match=message):
    lj.LoraConfig(**kwargs)


def test_config_matching_nothing_lists_available_paths():
  with pytest.raises(ValueError, match=r"matches no parameter; available kernels: .*params/block_0/attn/key/kernel, "):
    lj.find_targets(_params(), lj.LoraConfig(targets=["no_such_layer"]))


def test_query_key_value_switches():
  params = _params()
  names = lambda cfg: sorted(t.name for t in lj.find_targets(params, cfg).values())
  assert names(lj.LoraConfig(target_query=False, target_key=False)) == [
      "params/block_0/attn/value/kernel", "params/block_1/attn/value/kernel"]
  assert len(names(lj.LoraConfig())) == 6
  # Short names count only inside attention modules; the same names elsewhere do not.
  raw = {"attn": {"q": {"kernel": np.zeros((4, 4))}, "k": {"kernel": np.zeros((4, 4))}},
         "mlp": {"q": {"kernel": np.zeros((4, 4))}}}
  found = lj.find_targets(raw, lj.LoraConfig(target_value=False))
  assert sorted(lj.targets.path_str(p) for p in found) == ["attn/k/kernel", "attn/q/kernel"]


def test_peft_style_targets_exclude_and_patterns():
  params = _params()
  cfg = lj.LoraConfig(r=4, alpha=8, targets="all-linear", exclude=["fc2"],
                      rank_pattern={"block_1/attn/query": 2}, alpha_pattern={r".*fc1/kernel": 1.0})
  found = {t.name: t for t in lj.find_targets(params, cfg).values()}
  assert "params/lm_head/kernel" not in found and not any("fc2" in n for n in found)
  assert "params/embed/embedding" not in found
  assert found["params/block_1/attn/query/kernel"].rank == 2
  assert found["params/block_0/attn/query/kernel"].rank == 4
  assert found["params/block_0/fc1/kernel"].scale == 1.0 / 4
  regex = lj.find_targets(params, lj.LoraConfig(targets=r"params/block_0/.*/kernel"))
  assert all(p[1] == "block_0" for p in regex) and len(regex) == 6


def test_target_fn_is_lorax_node_predicate():
  params = _params()
  seen = []

  def target_fn(path, leaf):
    seen.append(path)
    return path[-2] == "out" and leaf.ndim == 3
  found = lj.find_targets(params, lj.LoraConfig(target_fn=target_fn))
  assert [t.name for t in found.values()] == ["params/block_0/attn/out/kernel", "params/block_1/attn/out/kernel"]
  assert ("params", "embed", "embedding") in seen


def test_axes_of_multi_axis_kernels():
  found = {t.name: t for t in lj.find_targets(_params(), lj.LoraConfig(r=2, targets=["query", "out"])).values()}
  q, o = found["params/block_0/attn/query/kernel"], found["params/block_0/attn/out/kernel"]
  assert (q.in_shape, q.out_shape, q.a_shape, q.b_shape) == ((32,), (4, 8), (2, 32), (2, 4, 8))
  assert (o.in_shape, o.out_shape, o.a_shape, o.b_shape) == ((4, 8), (32,), (2, 4, 8), (2, 32))


def test_non_float_or_vector_target_is_rejected():
  with pytest.raises(ValueError, match="must be a float kernel of rank >= 2"):
    lj.find_targets({"scale": np.ones(4)}, lj.LoraConfig(targets=["scale"]))


def test_summary_counts():
  params = _params()
  cfg = lj.LoraConfig(r=2)
  text = lj.summary(params, cfg)
  trainable = lj.lora_count(params, cfg)
  assert trainable == 6 * (2 * 32 + 2 * 32)
  assert f"trainable params: {trainable:,}" in text and "params/block_1/attn/key/kernel" in text
  assert f"all params: {lj.count(params) + trainable:,}" in text
