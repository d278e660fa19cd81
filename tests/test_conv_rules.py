"""Grouped and depthwise convolutions (``feature_group_count > 1``) factored exactly, and the cost
rule that merges a use where a training step is cheaper merged, reported in ``fallbacks``.

The reference never calls lorax_jax: `zoo_frameworks.hand_merge` forms ``W + s · Σ_r a ⊗ b``.
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import lorax_jax as lj
import zoo
import zoo_frameworks as zf


class LinenGrouped2D(nn.Module):
  """A grouped conv (4 → 6 channels in 2 groups, stride 2) and a depthwise one with a channel
  multiplier of 2 (6 → 12 in 6 groups, dilation 2, explicit asymmetric padding)."""

  @nn.compact
  def __call__(self, x):                                                # [b, 9, 9, 4]
    x = jnp.tanh(nn.Conv(6, (3, 3), strides=(2, 2), feature_group_count=2, padding="SAME", name="grouped")(x))
    return nn.Conv(12, (2, 3), kernel_dilation=(2, 1), feature_group_count=6, padding=((1, 2), (0, 1)),
                   name="depthwise")(x)


class LinenGrouped1D(nn.Module):
  """1-D: a grouped conv (6 → 9 in 3 groups, stride 2, dilation 2) and a depthwise one (9 → 9)."""

  @nn.compact
  def __call__(self, x):                                                # [b, 13, 6]
    x = jnp.tanh(nn.Conv(9, (3,), strides=2, kernel_dilation=2, feature_group_count=3, padding="CAUSAL",
                         name="grouped")(x))
    return nn.Conv(9, (3,), feature_group_count=9, padding="SAME", name="depthwise")(x)


class EqxGrouped(eqx.Module):
  """Equinox ``Conv2d(groups=2)`` (weight ``[out, in/groups, kh, kw]``) and a depthwise ``Conv1d``."""

  conv2d: eqx.nn.Conv2d
  conv1d: eqx.nn.Conv1d

  def __init__(self, key: jax.Array):
    k1, k2 = jax.random.split(key)
    self.conv2d = eqx.nn.Conv2d(4, 6, 3, stride=2, dilation=2, padding=1, groups=2, key=k1)
    self.conv1d = eqx.nn.Conv1d(6, 6, 3, padding=((2, 0),), groups=6, key=k2)

  def __call__(self, x):                                                # [4, 11, 11]
    h = jnp.tanh(self.conv2d(x))                                        # [6, 5, 5]
    return self.conv1d(h.reshape(6, 25))


def _cases() -> list[zf.Case]:
  ks = jax.random.split(jax.random.key(5), 3)
  return [
      zf._linen("linen_grouped_2d", LinenGrouped2D(), jax.random.normal(ks[0], (2, 9, 9, 4)),
                dict(targets=["grouped", "depthwise"]), {"grouped|depthwise": "iiio"}),
      zf._linen("linen_grouped_1d", LinenGrouped1D(), jax.random.normal(ks[1], (2, 13, 6)),
                dict(targets=["grouped", "depthwise"]), {"grouped|depthwise": "iio"}),
      zf.equinox_case("equinox_groups", EqxGrouped(jax.random.key(0)), jax.random.normal(ks[2], (2, 4, 11, 11)),
                      dict(targets=[r"conv\dd/weight"], kernel_axes={"conv2d/weight": "oiii", "conv1d/weight": "oii"}),
                      {"conv2d": "oiii", "conv1d": "oii"}),
  ]


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_grouped_and_depthwise_convs_factored_exactly(case):
  """``strict=True`` (every use factored, no cost merges): outputs and LoRA gradients within 1e-5
  of the hand-merged model, nothing merged."""
  zf.check_against_hand_merge(case, case.cfg, zoo.random_factors(case.params, case.cfg))


def _train_cost(r: int, kernel_size: int, use_flops: int, branch_flops: int) -> tuple[int, int]:
  """docs/engine.md's cost rule, written out here: (factored, merged) FLOPs of a training step's
  LoRA part at one use."""
  return 3 * branch_flops, use_flops + 6 * r * kernel_size


def test_cost_rule_merges_where_cheaper_and_reports_it():
  """A depthwise conv (16 channels, 3×3, 64 positions, r 2) and a tiny Dense whose rank is its
  smaller dimension are cheaper merged: merged, listed in ``fallbacks`` with both costs, and
  equal to the hand-merged model; ``strict=True`` keeps them factored, with the same numbers."""
  def model(p, x):
    h = lax_conv(x, p["dw"])
    return h.reshape(x.shape[0], -1, 16) @ p["fc"]

  def lax_conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=16)
  ks = jax.random.split(jax.random.key(0), 3)
  params = {"dw": jax.random.normal(ks[0], (3, 3, 1, 16)) / 3, "fc": jax.random.normal(ks[1], (16, 2)) / 4}
  x = jax.random.normal(ks[2], (1, 8, 8, 16))
  case = zf.Case("cost", model, params, (x,), dict(targets=["dw", "fc"]), {"dw": "iiio", "fc": "io"})
  lora = zoo.random_factors(params, case.cfg)
  apply = lj.lora_transform(model, params, case.cfg)
  with pytest.warns(UserWarning, match="merged: cheaper"):
    got = apply(params, lora, x)
  zoo.close(got, model(zf.hand_merge(case, lora), x))
  zoo.close(jax.grad(lambda l: zf.sin_loss(apply(params, l, x)))(lora),
            jax.grad(lambda l: zf.sin_loss(model(zf.hand_merge(case, l), x)))(lora))
  r, positions = zf.R, 64
  conv = _train_cost(r, 9 * 16, 2 * positions * 16 * 9, 2 * positions * r * (16 * 9 + 16))
  dense = _train_cost(r, 16 * 2, 2 * positions * 16 * 2, 2 * positions * r * (16 + 2))
  assert conv[1] < conv[0] and dense[1] < dense[0]
  assert apply.fallbacks == {
      ("dw", f"conv_general_dilated, merged: cheaper (factored {conv[0]} FLOPs > merged {conv[1]})"),
      ("fc", f"dot_general, merged: cheaper (factored {dense[0]} FLOPs > merged {dense[1]})")}
  zf.check_against_hand_merge(case, case.cfg, lora)  # strict: factored, the same numbers
  # Where the branch is cheaper, nothing is merged: the same Dense with 256 inputs and r = 2.
  wide = {"w": jax.random.normal(ks[0], (256, 64)) / 16}
  cfg = lj.LoraConfig(r=2, targets=["w"])
  dense_apply = lj.lora_transform(lambda p, x: x @ p["w"], wide, cfg)
  dense_apply(wide, zoo.random_factors(wide, cfg), jnp.ones((64, 256)))
  assert dense_apply.fallbacks == set()


def test_cost_rule_never_merges_under_dropout():
  """The merged kernel cannot drop out the branch's input: with dropout and a key, factored."""
  params = {"fc": jax.random.normal(jax.random.key(0), (16, 2)) / 4}
  cfg = lj.LoraConfig(r=2, alpha=3.0, targets=["fc"], dropout=0.5)
  x = jnp.ones((64, 16))
  apply = lj.lora_transform(lambda p, x: x @ p["fc"], params, cfg)
  lora = zoo.random_factors(params, cfg)
  apply(params, lora, x, rng=jax.random.key(1))
  assert apply.fallbacks == set()
  with pytest.warns(UserWarning, match="merged: cheaper"):
    apply(params, lora, x)  # no key, no dropout (warned): the cost rule merges
  assert {what.split(",")[0] for _, what in apply.fallbacks} == {"dot_general"}
