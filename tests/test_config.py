"""LoraConfig validation and targeting."""

from __future__ import annotations

import functools
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


BAD_CONFIGS = [
    (dict(r=0), r"r must be an integer rank in \[1, 65536\], got 0"),
    (dict(r=-2), "r must be an integer rank"),
    (dict(r=2.5), "r must be an integer rank"),
    (dict(r=True), "r must be an integer rank"),
    (dict(r=10**9), r"r must be an integer rank in \[1, 65536\], got 1000000000"),
    (dict(dropout=1.0), r"dropout must be a rate in \[0, 1\)"),
    (dict(dropout=-0.1), r"dropout must be a rate in \[0, 1\)"),
    (dict(dropout="0.1"), "dropout must be a number, got '0.1'"),
    (dict(alpha=float("nan")), "alpha must be a finite number"),
    (dict(alpha="big"), "alpha must be a number, got 'big'"),
    (dict(alpha=1e39), r"alpha must be a finite number within the factor dtype's range \(\|alpha\| <= 3.40282e\+38\), got 1e\+39"),
    (dict(alpha=7e4, param_dtype="float16"), "alpha must be a finite number within the factor dtype's range"),
    (dict(alpha_pattern={"q": 1e39}), r"alpha_pattern\['q'\] must be a finite number"),
    (dict(dropout_seed=2**70), r"dropout_seed must be an int64 seed in \[-2\*\*63, 2\*\*63\)"),
    (dict(dropout_seed=1.5), "dropout_seed must be an integer"),
    (dict(param_dtype=jnp.int32), "param_dtype must be a float dtype"),
    (dict(param_dtype="notadtype"), "param_dtype must be a float dtype .*, got 'notadtype'"),
    (dict(init="corda"), r"init must be one of \('kaiming', 'gaussian', 'orthogonal', 'pissa', 'olora', 'pissa_niter_<K>'\), got 'corda'"),
    (dict(init="pissa_niter_"), "init must be one of"),
    (dict(init=True), "init must be one of"),
    (dict(branch_dtype="float32"), r"branch_dtype must be one of \('factors', 'kernel'\), got 'float32'"),
    (dict(use_rslora="false"), "use_rslora must be True or False, got 'false'"),
    (dict(target_query="no"), "target_query must be True or False, got 'no'"),
    (dict(shared_dropout=1), "shared_dropout must be True or False, got 1"),
    (dict(targets="(unclosed"), "invalid regex"),
    (dict(targets=5), "targets must be a regex string or a list of module names, got 5"),
    (dict(exclude=["ok", ""]), r"exclude\[1\] must be a non-empty regex"),
    (dict(rank_pattern=None), r"rank_pattern must be a mapping \{regex or module name: value\} \(\{\} for none\), got None"),
    (dict(alpha_pattern=["q"]), "alpha_pattern must be a mapping"),
    (dict(kernel_axes=[(1, 1)]), "kernel_axes must be a mapping"),
    (dict(rank_pattern={"q": 0}), r"rank_pattern\['q'\] must be an integer rank"),
    (dict(rank_pattern={"(": 2}), "rank_pattern key has an invalid regex"),
    (dict(kernel_axes={"x": (1, 0)}), r"kernel_axes\['x'\] must be \(n_stack >= 0, n_in >= 1\)"),
    (dict(kernel_axes={"x": (1, 1, 1)}), r"kernel_axes\['x'\] must be \(n_stack >= 0, n_in >= 1\)"),
    (dict(kernel_axes={"x": "sii"}), r"kernel_axes\['x'\] must be a string of the letters s, i, o with at least one i and one o"),
    (dict(kernel_axes={"x": "ixo"}), r"kernel_axes\['x'\] must be a string"),
    (dict(target_uses={"x": ()}), r"target_uses\['x'\] must be a non-empty tuple"),
    (dict(target_uses={"x": ("matmul", "gather")}), r"target_uses\['x'\] must be a non-empty tuple of distinct uses"),
    (dict(target_uses={"x": "matmul"}), r"target_uses\['x'\] must be a non-empty tuple"),
    (dict(target_fn=lambda path: True), r"target_fn must be a callable of two arguments \(path, leaf\), not \(path\)"),
    (dict(target_fn="q_proj"), "target_fn must be a callable"),
    (dict(target_query=False, target_key=False, target_value=False), "targets nothing"),
]


@pytest.mark.parametrize("kwargs, message", BAD_CONFIGS)
def test_invalid_config_raises(kwargs, message):
  with pytest.raises(ValueError, match=message):
    lj.LoraConfig(**kwargs)


def test_numpy_scalars_are_accepted_as_python_values():
  cfg = lj.LoraConfig(r=np.int32(4), alpha=np.float32(16), dropout=np.float32(0.1), dropout_seed=np.int64(0),
                      target_key=np.bool_(False), rank_pattern={"q": np.int64(2)},
                      alpha_pattern={"q": np.float64(3.0)}, kernel_axes={"q": (np.int8(0), np.int8(1))})
  assert (type(cfg.r), type(cfg.alpha), type(cfg.dropout), type(cfg.dropout_seed)) == (int, float, float, int)
  assert (cfg.r, cfg.alpha, cfg.dropout_seed, cfg.target_key) == (4, 16.0, 0, False)
  assert cfg.dropout == float(np.float32(0.1))
  assert type(cfg.rank_pattern["q"]) is int and type(cfg.alpha_pattern["q"]) is float
  assert cfg.kernel_axes["q"] == (0, 1) and type(cfg.kernel_axes["q"][0]) is int


def test_config_is_an_immutable_hashable_value():
  a = lj.LoraConfig(r=4, alpha=8, targets=["q", "v"], rank_pattern={"q": 2}, kernel_axes={"blocks/.*": (1, 1)},
                    target_uses={"embed": ["lookup"]})
  b = lj.LoraConfig(r=np.int64(4), alpha=8.0, targets=("q", "v"), rank_pattern=lj.config.FrozenDict({"q": 2}),
                    kernel_axes={"blocks/.*": [1, 1]}, target_uses={"embed": ("lookup",)}, param_dtype="float32")
  assert a == b and hash(a) == hash(b)
  assert a.targets == ("q", "v") and a.target_uses["embed"] == ("lookup",)
  assert a != a.replace(rank_pattern={"q": 3}) and a != a.replace(targets=("v", "q"))
  # Existing code reads the patterns as mappings; order is part of the value (first match wins).
  assert dict(a.rank_pattern.items()) == {"q": 2} and a.rank_pattern == {"q": 2}
  swapped = lj.LoraConfig(rank_pattern={"k": 1, "q": 2})
  assert swapped != lj.LoraConfig(rank_pattern={"q": 2, "k": 1})
  with pytest.raises(AttributeError):
    a.r = 8
  with pytest.raises(TypeError):
    a.rank_pattern["q"] = 8
  with pytest.raises(AttributeError):
    a.rank_pattern._dict = {}
  traces = []

  @functools.partial(jax.jit, static_argnames="cfg")
  def scaled(x, cfg):
    traces.append(cfg)
    return x * cfg.scale(cfg.r, cfg.alpha)

  assert float(scaled(jnp.float32(1), cfg=a)) == 2.0 and float(scaled(jnp.float32(1), cfg=b)) == 2.0
  assert len(traces) == 1  # b hit a's compilation: equal configs are one static argument
  assert float(scaled(jnp.float32(1), cfg=a.replace(alpha=16))) == 4.0 and len(traces) == 2


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
  assert sorted(lj.paths.path_str(p) for p in found) == ["attn/k/kernel", "attn/q/kernel"]


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
