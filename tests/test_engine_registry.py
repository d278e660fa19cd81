"""The engine's one rule registry, and the source info its re-emitted equations keep."""

from __future__ import annotations

import inspect
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import lorax_jax as lj
from lorax_jax import transform
from lorax_jax.transform import core, quantized

import zoo


def _matches_reference(apply_fn, params, cfg, *inputs):
  """The factored engine (strict: no use merged) equals the merged reference, values and gradients."""
  lora = jax.tree.map(lambda a: a + 0.2, lj.init_lora(params, cfg, jax.random.key(1)))
  factored = lj.lora_transform(apply_fn, params, cfg, strict=True)
  reference = lj.lora_transform(apply_fn, params, cfg, mode="reference")
  zoo.close(factored(params, lora, *inputs), reference(params, lora, *inputs))
  loss = lambda apply: lambda l: jnp.sum(jnp.sin(apply(params, l, *inputs)))
  zoo.close(jax.grad(loss(factored))(lora), jax.grad(loss(reference))(lora))


# --- source info: the compiled program keeps the model's scope names ---------------------


class Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(x.shape[-1], name="q_proj")(x)


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return Attention(name="attn")(x), None


class Model(nn.Module):
  layers: int = 0  # 0: one block; else `nn.scan` over that many rematerialized blocks

  @nn.compact
  def __call__(self, x):
    if not self.layers:
      return Block(name="block")(x, None)[0]
    stack = nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers)
    return stack(name="block")(x, None)[0]


def _dot_scopes(text: str) -> list[str]:
  """The location name of every ``dot_general`` in a lowered module's text (``debug_info=True``):
  the op name the compiled program's metadata and profiles show."""
  names = dict(re.findall(r'^#loc(\d+) = loc\("([^"]*)"', text, re.M))
  return [names.get(n, "") for n in re.findall(r"stablehlo\.dot_general .* loc\(#loc(\d+)\)", text)]


@pytest.mark.parametrize("layers", [0, 3], ids=["dense", "scan_remat"])
def test_compiled_ops_keep_the_model_scope_names(layers):
  """The base dot and both dots of the LoRA branch carry the Dense's scope (``attn/q_proj``), as
  the base model's dot does: equations are re-emitted in their source context."""
  model, x = Model(layers), jnp.ones((2, 4))
  params = model.init(jax.random.key(0), x)
  cfg = lj.LoraConfig(r=2, targets=["q_proj"])
  lora = lj.init_lora(params, cfg, jax.random.key(1))
  apply = lj.lora_transform(model.apply, params, cfg, strict=True)  # factored at this toy size too
  scopes = _dot_scopes(jax.jit(apply).lower(params, lora, x).as_text(debug_info=True))
  (base,) = _dot_scopes(jax.jit(model.apply).lower(params, x).as_text(debug_info=True))
  assert base.endswith("block/attn/q_proj/dot_general")
  assert len(scopes) == 3 and base.endswith(scopes[0]), (base, scopes)  # up to the outer jit's name
  assert all("block/attn/q_proj/" in s for s in scopes[1:]), scopes


def test_an_inlined_jit_keeps_its_name():
  """A nested ``jit`` is evaluated inline, under ``jit(name)`` as JAX names it."""
  def apply_fn(params, x):
    @jax.jit
    def step(h):
      with jax.named_scope("inner"):
        return jnp.tanh(h @ params["w"])
    return step(x)
  params, x = {"w": jnp.ones((4, 4))}, jnp.ones((2, 4))
  cfg = lj.LoraConfig(r=2, targets=["w"])
  apply = lj.lora_transform(apply_fn, params, cfg)
  scopes = _dot_scopes(jax.jit(apply).lower(params, lj.init_lora(params, cfg, jax.random.key(1)), x)
                       .as_text(debug_info=True))
  assert len(scopes) == 3 and all(s.startswith("jit(step)/inner/") for s in scopes), scopes


# --- one registry: the evaluator and the walk read the same rules -----------------------


def test_every_rule_serves_both_interpreters():
  for name, rule in transform.RULES.items():
    assert rule.kind in ("layout", "use", "nested"), name
    assert rule.eval is not None and rule.walk is not None, name


def test_the_interpreters_name_no_primitive():
  """Which primitive gets which treatment is the registry's alone: no primitive is named in the
  evaluator, the walk or the quantized kernels' binding."""
  sources = inspect.getsource(core) + inspect.getsource(quantized.quantized_use)
  named = [name for name in transform.RULES if f'"{name}"' in sources]
  assert named == []


def test_a_rule_is_registered_once():
  with pytest.raises(ValueError, match="the dot_general rule already has eval"):
    transform.register("dot_general", eval=transform.RULES["dot_general"].eval)


def test_one_registration_changes_the_evaluator_and_the_walk():
  """``reduce_precision`` (no rule) ends the walk and is merged; registered as a copy, the walk
  finds the use behind it and the evaluator follows it. The registry is restored after."""
  params = {"w": jax.random.normal(jax.random.key(0), (4, 6))}  # stored [out, in]
  apply_fn = lambda p, x: x @ jax.lax.reduce_precision(p["w"], 8, 23).T
  x = jax.random.normal(jax.random.key(2), (3, 6))
  cfg = lj.LoraConfig(r=2, targets=["w"], kernel_axes={"w": "oi"})
  lora = lj.init_lora(params, cfg, jax.random.key(1))
  spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
  axes = lambda: lj.axes_from_use(apply_fn, params, cfg.replace(kernel_axes={}), spec).kernel_axes["w"]

  def fallbacks():
    apply = lj.lora_transform(apply_fn, params, cfg)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # a merged use warns; its report is `fallbacks`
      apply(params, lora, x)
    return apply.fallbacks

  assert axes() == "io" and fallbacks() == {("w", "reduce_precision")}  # "io": the name's default
  copy = transform.RULES["copy"]
  with transform.overridden("reduce_precision", kind="layout", eval=copy.eval, walk=copy.walk):
    assert axes() == "oi" and fallbacks() == set()
    _matches_reference(apply_fn, params, cfg, x)
  assert "reduce_precision" not in transform.RULES
  assert fallbacks() == {("w", "reduce_precision")}


# --- `rev`: a rule added in one place (`layout._rev_rule`) ------------------------------


@pytest.mark.parametrize("dims", [(0,), (1,), (0, 1)], ids=["output", "input", "both"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_reversed_kernel_is_followed_and_walked(dims, dora):
  """``jnp.flip(W)``: each factor reversed along the axes it owns (DoRA's ``g`` with ``b``), and
  `axes_from_use` sees the use behind the reversal."""
  params = {"w": jax.random.normal(jax.random.key(0), (4, 6))}  # stored [out, in]
  apply_fn = lambda p, x: x @ jnp.flip(p["w"], dims).T
  x = jax.random.normal(jax.random.key(2), (3, 6))
  cfg = lj.LoraConfig(r=2, targets=["w"], use_dora=dora, kernel_axes={"w": "oi"})
  _matches_reference(apply_fn, params, cfg, x)
  found = lj.axes_from_use(apply_fn, params, cfg.replace(kernel_axes={}), jax.ShapeDtypeStruct(x.shape, x.dtype))
  assert found.kernel_axes["w"] == "oi"


def test_reversed_stack_is_followed():
  """A stacked kernel reversed along its layers (both factors), then scanned."""
  params = {"w": jax.random.normal(jax.random.key(0), (3, 6, 4)) / 2}
  apply_fn = lambda p, x: jax.lax.scan(lambda h, w: (jnp.tanh(h @ w @ w.T), None), x, p["w"][::-1])[0]
  cfg = lj.LoraConfig(r=2, targets=["w"], kernel_axes={"w": "sio"})
  _matches_reference(apply_fn, params, cfg, jax.random.normal(jax.random.key(2), (5, 6)))
