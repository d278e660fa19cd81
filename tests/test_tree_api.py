"""Bad inputs to the tree API get an error that names them (issue: hostile input)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_jax as lj

PARAMS = {"proj": {"kernel": jnp.ones((4, 3))}}
CFG = lj.LoraConfig(r=2, targets=["proj"])


def _apply():
  return lj.lora_transform(lambda p, x: x @ p["proj"]["kernel"], PARAMS, CFG)


@pytest.mark.parametrize("rng", [0, None, np.zeros(3, np.uint32), jax.random.split(jax.random.key(0), 2)])
def test_init_lora_wants_one_key(rng):
  with pytest.raises(TypeError, match="init_lora: rng must be one PRNG key"):
    lj.init_lora(PARAMS, CFG, rng)


def test_init_lora_takes_typed_and_raw_keys():
  typed = lj.init_lora(PARAMS, CFG, jax.random.key(3))
  raw = lj.init_lora(PARAMS, CFG, jax.random.PRNGKey(3))
  np.testing.assert_array_equal(typed["proj"]["kernel"]["a"], raw["proj"]["kernel"]["a"])


def test_factors_as_python_lists_are_named():
  lora = {"proj": {"kernel": {"a": [[0.0] * 4] * 2, "b": [[0.0] * 3] * 2}}}
  with pytest.raises(TypeError, match="proj/kernel/a must be an array, got list"):
    _apply()(PARAMS, lora, jnp.ones((1, 4)))


def test_integer_factors_are_named():
  lora = {"proj": {"kernel": {"a": jnp.zeros((2, 4), jnp.int32), "b": jnp.zeros((2, 3))}}}
  with pytest.raises(ValueError, match="proj/kernel/a must be a float array"):
    _apply()(PARAMS, lora, jnp.ones((1, 4)))


def test_call_time_params_of_another_shape_are_named():
  lora = lj.init_lora(PARAMS, CFG, jax.random.key(0))
  with pytest.raises(ValueError, match=r"proj/kernel is \(5, 3\)"):
    _apply()({"proj": {"kernel": jnp.ones((5, 3))}}, lora, jnp.ones((1, 4)))
