"""The factored engine against the merged-weight reference, on the model zoo."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorax_jax as lj
from lorax_jax import transform
from lorax_jax.dropout import keep_mask
import zoo

CASES = zoo.cases()
IDS = [c.name for c in CASES]


def _loss(apply, case, lora, rng=None):
  return jnp.mean(jnp.sin(apply(case.params, lora, *case.inputs, rng=rng)))


_close = zoo.close


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_init_equals_base_exactly(case):
  lora = lj.init_lora(case.params, case.cfg, jax.random.key(3))
  apply = lj.lora_transform(case.apply_fn, case.params, case.cfg)
  # Op by op, the branch adds exactly zero (compiled, XLA may fuse the two programs differently).
  with jax.disable_jit():
    np.testing.assert_array_equal(apply(case.params, lora, *case.inputs), case.apply_fn(case.params, *case.inputs))
  _close(apply(case.params, lora, *case.inputs), jax.jit(case.apply_fn)(case.params, *case.inputs), tol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_factored_matches_reference(case):
  lora = zoo.random_lora(case)
  factored = lj.lora_transform(case.apply_fn, case.params, case.cfg, strict=True)
  reference = lj.lora_transform(case.apply_fn, case.params, case.cfg, mode="reference")
  _close(factored(case.params, lora, *case.inputs), reference(case.params, lora, *case.inputs))
  # The update is not negligible: the adapted model differs from the base one.
  assert not np.allclose(reference(case.params, lora, *case.inputs), case.apply_fn(case.params, *case.inputs),
                         atol=1e-3)
  g_factored = jax.grad(lambda l: _loss(factored, case, l))(lora)
  g_reference = jax.grad(lambda l: _loss(reference, case, l))(lora)
  _close(g_factored, g_reference)
  assert factored.fallbacks == set()


def test_unsupported_use_is_merged_and_reported():
  def apply_fn(params, x):
    w = params["wq"]
    return x @ w + jnp.sum(jnp.sin(w))  # sin(W) is not a matmul: merged for that use
  params = {"wq": jnp.ones((3, 3)) / 3}
  cfg = lj.LoraConfig(r=1, targets=["wq"])
  lora = jax.tree.map(lambda a: a + 0.5, lj.init_lora(params, cfg, jax.random.key(0)))
  x = jnp.arange(6.0).reshape(2, 3)
  apply = lj.lora_transform(apply_fn, params, cfg)
  with pytest.warns(UserWarning, match="wq reaches `sin`"):
    out = apply(params, lora, x)
  _close(out, lj.lora_transform(apply_fn, params, cfg, mode="reference")(params, lora, x))
  assert apply.fallbacks == {("wq", "sin")}
  with pytest.raises(NotImplementedError, match="wq reaches `sin`"):
    lj.lora_transform(apply_fn, params, cfg, strict=True)(params, lora, x)


def test_loops_and_branches():
  """A kernel used inside `while`, `cond` and a nested `jit`, and its use per dropout iteration."""
  def apply_fn(params, x, n):
    w = params["dense"]["kernel"]

    @jax.jit
    def step(h):
      return jnp.tanh(h @ w)
    h = jax.lax.fori_loop(0, n, lambda i, h: step(h), x)
    return jax.lax.cond(jnp.sum(h) > 0, lambda h: h @ w, lambda h: -(h @ w), h)
  params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (4, 4)) / 2}}
  cfg = lj.LoraConfig(r=2, targets=["dense"])
  lora = jax.tree.map(lambda a: a + 0.3, lj.init_lora(params, cfg, jax.random.key(1)))
  x = jax.random.normal(jax.random.key(2), (3, 4))
  n = jnp.asarray(3)  # traced: a real while loop
  factored = lj.lora_transform(apply_fn, params, cfg, strict=True)
  reference = lj.lora_transform(apply_fn, params, cfg, mode="reference")
  _close(factored(params, lora, x, n), reference(params, lora, x, n))
  tangent = jax.tree.map(jnp.ones_like, lora)  # reverse mode cannot cross a dynamic while loop
  _close(jax.jvp(lambda l: factored(params, l, x, n), (lora,), (tangent,))[1],
         jax.jvp(lambda l: reference(params, l, x, n), (lora,), (tangent,))[1])


def test_reshapes_and_transposes_are_followed():
  def apply_fn(params, x):
    w = params["proj"]["kernel"]                                              # [8, 6]
    w3 = w.reshape(2, 4, 6)                                                   # split the input axis
    y = jnp.einsum("bij,ijo->bo", x.reshape(-1, 2, 4), w3)
    return y + x @ w + (w.T @ x.T).T
  params = {"proj": {"kernel": jax.random.normal(jax.random.key(0), (8, 6))}}
  cfg = lj.LoraConfig(r=2, targets=["proj"])
  lora = jax.tree.map(lambda a: a + 0.1, lj.init_lora(params, cfg, jax.random.key(1)))
  x = jax.random.normal(jax.random.key(2), (5, 8))
  factored = lj.lora_transform(apply_fn, params, cfg, strict=True)
  reference = lj.lora_transform(apply_fn, params, cfg, mode="reference")
  _close(factored(params, lora, x), reference(params, lora, x))
  assert factored.fallbacks == set()


def _hand_branch(x, lora_node, scale):
  """``s · (x aᵀ) b`` in float32 numpy."""
  a, b = np.asarray(lora_node["a"], np.float32), np.asarray(lora_node["b"], np.float32)
  return scale * (np.asarray(x, np.float32) @ a.T) @ b


def test_float_casts_are_followed_exactly():
  """``W.astype(bf16).astype(f32)``: the frozen product sees the rounded W, the branch is exact f32."""
  params = {"proj": {"kernel": jax.random.normal(jax.random.key(0), (8, 6))}}
  cfg = lj.LoraConfig(r=2, alpha=3, targets=["proj"])
  lora = jax.tree.map(lambda a: a + 0.1, lj.init_lora(params, cfg, jax.random.key(1)))
  x = jax.random.normal(jax.random.key(2), (5, 8))
  apply = lj.lora_transform(lambda p, x: x @ p["proj"]["kernel"].astype(jnp.bfloat16).astype(jnp.float32),
                            params, cfg, strict=True)
  w = np.asarray(params["proj"]["kernel"].astype(jnp.bfloat16).astype(jnp.float32))
  want = np.asarray(x) @ w + _hand_branch(x, lora["proj"]["kernel"], 1.5)
  np.testing.assert_allclose(apply(params, lora, x), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.float8_e4m3fn])
def test_narrow_casts_are_merged_and_reported(dtype):
  """A cast to int8 or an 8-bit float would cast the factors too: merged for that use instead."""
  def apply_fn(p, x):
    return x @ p["w"].astype(dtype).astype(jnp.float32)
  params = {"w": 8 * jax.random.normal(jax.random.key(0), (6, 4))}
  cfg = lj.LoraConfig(r=2, alpha=2, targets=["w"])
  lora = jax.tree.map(lambda a: a + 0.3, lj.init_lora(params, cfg, jax.random.key(1)))
  x = jax.random.normal(jax.random.key(2), (3, 6))
  apply = lj.lora_transform(apply_fn, params, cfg)
  with pytest.warns(UserWarning, match=f"w reaches `a cast to {jnp.dtype(dtype).name}`"):
    out = apply(params, lora, x)
  _close(out, lj.lora_transform(apply_fn, params, cfg, mode="reference")(params, lora, x))
  assert apply.fallbacks == {("w", f"a cast to {jnp.dtype(dtype).name}")}
  with pytest.raises(NotImplementedError, match="a cast to"):
    lj.lora_transform(apply_fn, params, cfg, strict=True)(params, lora, x)


def test_non_array_leaves_in_params():
  """A Python float before the kernel in the params tree must not shift the kernel's position."""
  params = {"a_eps": 1e-3, "b_count": 3, "c_none": None, "w": jax.random.normal(jax.random.key(0), (5, 4))}
  cfg = lj.LoraConfig(r=2, alpha=2, targets=["w"])
  lora = jax.tree.map(lambda a: a + 0.2, lj.init_lora(params, cfg, jax.random.key(1)))
  x = jax.random.normal(jax.random.key(2), (3, 5))
  apply_fn = lambda p, x: (x @ p["w"]) * p["b_count"] + p["a_eps"]
  out = lj.lora_transform(apply_fn, params, cfg, strict=True)(params, lora, x)
  want = (np.asarray(x) @ np.asarray(params["w"]) + _hand_branch(x, lora["w"], 1.0)) * 3 + 1e-3
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_jit_cache_keys_static_type_and_is_bounded():
  params = {"w": jnp.eye(3)}
  cfg = lj.LoraConfig(r=1, targets=["w"])
  lora = lj.init_lora(params, cfg, jax.random.key(0))
  apply = lj.lora_transform(lambda p, x, flag: x @ p["w"] * (2.0 if flag is True else 3.0), params, cfg)
  x = jnp.ones((1, 3))
  np.testing.assert_array_equal(apply(params, lora, x, 1), 3.0)
  np.testing.assert_array_equal(apply(params, lora, x, True), 2.0)  # 1 == True, but not the same trace
  for n in range(transform.CACHE_SIZE + 8):
    apply(params, lora, x, n)
  assert len(apply._compiled) == transform.CACHE_SIZE


def test_call_time_params_are_checked_against_the_transform():
  case = CASES[IDS.index("mlp")]
  lora = lj.init_lora(case.params, case.cfg, jax.random.key(0))
  apply = lj.lora_transform(case.apply_fn, case.params, case.cfg)
  fewer = {"params": {k: v for k, v in case.params["params"].items() if k != "fc2"}}
  with pytest.raises(ValueError, match="missing .*params/fc2/kernel"):
    apply(fewer, lora, *case.inputs)
  wider = jax.tree.map(lambda x: x, case.params)
  wider["params"]["fc2"]["kernel"] = jnp.zeros((32, 33))
  with pytest.raises(ValueError, match=r"target params/fc2/kernel is \(32, 33\) float32"):
    apply(wider, lora, *case.inputs)
  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), case.params)
  with pytest.raises(ValueError, match="params/fc1/kernel is .* bfloat16"):
    apply(half, lora, *case.inputs)


def test_rank_above_kernel_size_only_refused_where_the_init_needs_it():
  """PEFT accepts r above a kernel's smaller size (tests/test_peft_options.py); PiSSA and OLoRA take r
  directions of the kernel, so they refuse it."""
  assert lj.find_targets({"w": jnp.zeros((4, 16))}, lj.LoraConfig(r=5, targets=["w"]))[("w",)].rank == 5
  with pytest.raises(ValueError, match="rank 5 exceeds its input size 4.*init='pissa'"):
    lj.find_targets({"w": jnp.zeros((4, 16))}, lj.LoraConfig(r=5, targets=["w"], init="pissa"))


def test_dropout_without_a_key_warns_once():
  case = CASES[IDS.index("mlp")]
  apply = lj.lora_transform(case.apply_fn, case.params, case.cfg.replace(dropout=0.1))
  lora = lj.init_lora(case.params, case.cfg, jax.random.key(0))
  with pytest.warns(UserWarning, match="dropout=0.1 but no key reaches the call"):
    apply(case.params, lora, *case.inputs)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    apply(case.params, lora, *case.inputs)


def test_dropout_masks_differ_per_example_under_vmap():
  """``vmap`` over per-example keys (``jax.random.split``) draws one mask per example."""
  params = {"w": jnp.zeros((16, 2))}
  cfg = lj.LoraConfig(r=1, alpha=1, dropout=0.5, targets=["w"])
  lora = {"w": {"a": jnp.ones((1, 16)), "b": jnp.ones((1, 2))}}
  apply = lj.lora_transform(lambda p, x: x @ p["w"], params, cfg)
  x = jnp.broadcast_to(2.0 ** jnp.arange(16), (6, 16))  # the branch's sum tells which inputs were kept
  keys = jax.random.split(jax.random.key(0), 6)
  per_example = jax.vmap(lambda x, k: apply(params, lora, x[None], rng=k)[0, 0])(x, keys)
  assert len(set(np.asarray(per_example).tolist())) == 6
  for i in range(6):
    np.testing.assert_array_equal(per_example[i], apply(params, lora, x[i:i + 1], rng=keys[i])[0, 0])
  shared = jax.vmap(lambda x: apply(params, lora, x[None], rng=keys[0])[0, 0])(x)
  assert len(set(np.asarray(shared).tolist())) == 1


@pytest.mark.parametrize("branch_dtype", ["factors", "kernel"])
def test_branch_dtype(branch_dtype):
  """bf16 base, f32 factors: the branch runs in f32 (PEFT) or, on request, in bf16."""
  w = jax.random.normal(jax.random.key(0), (32, 16)).astype(jnp.bfloat16)
  params = {"w": w}
  cfg = lj.LoraConfig(r=4, alpha=4, targets=["w"], branch_dtype=branch_dtype)
  lora = jax.tree.map(lambda a: a + 0.01 * jnp.arange(a.size).reshape(a.shape) / a.size,
                      lj.init_lora(params, cfg, jax.random.key(1)))
  x = jax.random.normal(jax.random.key(2), (8, 32)).astype(jnp.bfloat16)
  out = lj.lora_transform(lambda p, x: x @ p["w"], params, cfg, strict=True)(params, lora, x)
  assert out.dtype == jnp.bfloat16
  base = np.asarray((x @ w).astype(jnp.float32))
  exact = _hand_branch(x, lora["w"], 1.0)
  if branch_dtype == "factors":
    want = np.asarray(jnp.asarray(base + exact).astype(jnp.bfloat16).astype(jnp.float32))
    branch = np.asarray(out.astype(jnp.float32)) - base
    np.testing.assert_allclose(branch, exact, atol=np.abs(base).max() * 2 ** -8)
    np.testing.assert_allclose(out.astype(jnp.float32), want, atol=np.abs(base).max() * 2 ** -8)
  else:
    lo = {k: v.astype(jnp.bfloat16) for k, v in lora["w"].items()}
    t = (x @ lo["a"].T) * jnp.bfloat16(1.0)
    want = (x @ w) + (t @ lo["b"]).astype(jnp.bfloat16)
    np.testing.assert_array_equal(out, want)


def test_tied_embedding_lookup_only():
  """``target_uses={"embed": ("lookup",)}``: PEFT's tied embedding, adapted at the lookup only."""
  table = jax.random.normal(jax.random.key(0), (50, 8))
  params = {"embed": table}

  def apply_fn(p, ids):
    h = jnp.take(p["embed"], ids, axis=0)
    return jnp.tanh(h) @ p["embed"].T
  cfg = lj.LoraConfig(r=2, alpha=2, targets=["embed"], target_uses={"embed": ("lookup",)})
  lora = zoo.random_lora(zoo.Case("tied", apply_fn, params, (), cfg))
  ids = jnp.array([[1, 4, 49], [0, 7, 7]])
  out = lj.lora_transform(apply_fn, params, cfg, strict=True)(params, lora, ids)
  a, b = np.asarray(lora["embed"]["a"]), np.asarray(lora["embed"]["b"])
  adapted = np.asarray(table) + a.T @ b
  want = np.tanh(adapted[np.asarray(ids)]) @ np.asarray(table).T
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="cannot carry that update"):
    lj.merge(params, lora, cfg)
  merged = lj.merge(params, lora, cfg, all_uses=True)["embed"]
  np.testing.assert_allclose(merged, adapted, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["scan_remat_transformer", "torch_style_mlp", "moe_ragged_dot", "embed_lm",
                                  "cnn", "einsum_attention"])
def test_axes_from_use_recovers_the_layouts(name):
  """Without ``kernel_axes``, the uses give the zoo's layouts (``a`` always on the input side)."""
  case = CASES[IDS.index(name)]
  found = lj.axes_from_use(case.apply_fn, case.params, case.cfg.replace(kernel_axes={}), *case.inputs)
  want = {t.name: t.axes for t in lj.find_targets(case.params, case.cfg).values()}
  assert {t.name: t.axes for t in lj.find_targets(case.params, found).values()} == want
  assert {re.escape(n) for n in want} == set(found.kernel_axes)


def test_axes_from_use_reports_disagreeing_uses_and_keeps_explicit_axes():
  params = {"w": jnp.zeros((6, 4))}
  tied = lambda p, x: jnp.tanh(x @ p["w"]) @ p["w"].T  # tied autoencoder: 6 is input, then output
  cfg = lj.LoraConfig(r=2, targets=["w"])
  x = jax.ShapeDtypeStruct((3, 6), jnp.float32)
  with pytest.raises(ValueError, match=r"kernel w disagree on its axis 0 \(dot_general #0: input; dot_general #1: output\)"):
    lj.axes_from_use(tied, params, cfg, x)
  explicit = lj.axes_from_use(tied, params, cfg.replace(kernel_axes={"w": "io"}), x)
  assert lj.find_targets(params, explicit)[("w",)].axes == "io"
  torch_like = lj.axes_from_use(lambda p, x: x @ p["w"].T, params, cfg, jax.ShapeDtypeStruct((3, 4), jnp.float32))
  assert dict(torch_like.kernel_axes) == {"w": "oi"}


def test_kernel_used_on_its_output_side_stays_cheap():
  """Tied LM head (``h @ E.T``) and an ``[out, in]`` kernel used as ``x @ W.T``: the input meets
  the factor owning the contracted axes first, so a LoRA grad step costs at most 1.03× the frozen
  lower bound (forward + backward to the activations) instead of an outer product."""
  vocab, d, n = 2048, 512, 256  # the branch inherently adds about r/d of the head's FLOPs
  ks = jax.random.split(jax.random.key(0), 3)
  params = {"embed": jax.random.normal(ks[0], (vocab, d)) / 8,
            "proj": {"weight": jax.random.normal(ks[1], (d, d)) / 8}}
  ids = jax.random.randint(ks[2], (n,), 0, vocab)

  def model(p, ids, offset=0.0):
    h = jnp.take(p["embed"], ids, axis=0) + offset
    h = jnp.tanh(h @ p["proj"]["weight"].T)
    return h @ p["embed"].T

  def xent(logits):
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids).mean()
  cfg = lj.LoraConfig(r=4, alpha=8, targets=["embed", "proj"])
  lora = lj.init_lora(params, cfg, jax.random.key(1))
  flops = lambda f, *a: jax.jit(f).lower(*a).compile().cost_analysis()["flops"]
  apply = lj.lora_transform(model, params, cfg, strict=True)
  step = flops(jax.grad(lambda l: xent(apply(params, l, ids))), lora)
  bound = flops(jax.grad(lambda o: xent(model(params, ids, o))), jnp.zeros((n, d)))
  assert step <= 1.03 * bound, step / bound
  assert apply.fallbacks == set()


def test_composes_with_jit_grad_vmap():
  case = CASES[IDS.index("mha_transformer")]
  lora = zoo.random_lora(case)
  apply = lj.lora_transform(case.apply_fn, case.params, case.cfg)
  eager = apply(case.params, lora, *case.inputs)
  _close(jax.jit(apply)(case.params, lora, *case.inputs), eager)
  per_example = jax.vmap(lambda ids: apply(case.params, lora, ids[None])[0])(case.inputs[0])
  _close(per_example, eager)
  doubled = jax.tree.map(lambda a: 2 * a, lora)
  per_lora = jax.vmap(lambda l: apply(case.params, l, *case.inputs))(jax.tree.map(lambda a, b: jnp.stack([a, b]), lora, doubled))
  _close(per_lora[0], eager)
  _close(per_lora[1], apply(case.params, doubled, *case.inputs))
  grad = jax.jit(jax.grad(lambda l: _loss(apply, case, l)))(lora)
  _close(grad, jax.grad(lambda l: _loss(lj.lora_transform(case.apply_fn, case.params, case.cfg, mode="reference"),
                                          case, l))(lora))


def test_dropout_keys():
  case = CASES[IDS.index("mlp")]
  cfg = case.cfg.replace(dropout=0.5)
  lora = zoo.random_lora(case)
  apply = lj.lora_transform(case.apply_fn, case.params, cfg)
  run = lambda rng: np.asarray(apply(case.params, lora, *case.inputs, rng=rng))
  k1, k2 = jax.random.key(1), jax.random.key(2)
  np.testing.assert_array_equal(run(k1), run(k1))
  assert not np.allclose(run(k1), run(k2))
  no_dropout = np.asarray(lj.lora_transform(case.apply_fn, case.params, case.cfg)(case.params, lora, *case.inputs))
  np.testing.assert_array_equal(run(None), no_dropout)          # no key, no dropout_seed: deterministic
  rate_zero = lj.lora_transform(case.apply_fn, case.params, case.cfg.replace(dropout=0.0))
  np.testing.assert_array_equal(rate_zero(case.params, lora, *case.inputs, rng=k1), no_dropout)
  seeded = lj.lora_transform(case.apply_fn, case.params, cfg.replace(dropout_seed=7))
  np.testing.assert_array_equal(seeded(case.params, lora, *case.inputs), run(jax.random.key(7)))
  # Dropout acts on the branch input only: with b = 0 the output is the base model's.
  zero = lj.init_lora(case.params, cfg, jax.random.key(0))
  with jax.disable_jit():
    np.testing.assert_array_equal(apply(case.params, zero, *case.inputs, rng=k1), case.apply_fn(case.params, *case.inputs))


def test_dropout_matches_hand_written_branch():
  """One Dense layer: ``x W + s · (mask ⊙ x / (1-p)) Aᵀ B``, the mask `keep_mask` of the use's key."""
  params = {"v_proj": {"kernel": jax.random.normal(jax.random.key(0), (6, 4))}}
  cfg = lj.LoraConfig(r=2, alpha=3, dropout=0.25, targets=["v_proj"])
  lora = jax.tree.map(lambda a: a + 0.2, lj.init_lora(params, cfg, jax.random.key(1)))
  x = jax.random.normal(jax.random.key(2), (5, 6))
  out = lj.lora_transform(lambda p, x: x @ p["v_proj"]["kernel"], params, cfg)(params, lora, x, rng=jax.random.key(9))
  keep = np.asarray(keep_mask(jax.random.fold_in(jax.random.fold_in(jax.random.key(9), 0), 0), x.shape, 0.25))
  a, b = np.asarray(lora["v_proj"]["kernel"]["a"]), np.asarray(lora["v_proj"]["kernel"]["b"])
  x_np = np.asarray(x)
  want = x_np @ np.asarray(params["v_proj"]["kernel"]) + 1.5 * (np.where(keep, x_np / 0.75, 0) @ a.T) @ b
  np.testing.assert_allclose(out, want, atol=1e-5)


def test_shared_dropout_one_mask_per_input_tensor():
  """q, k, v read ``x``; o reads ``h``. With ``shared_dropout`` the three branches of ``x`` see one
  mask and ``h`` another; without it every use draws its own. Identical kernels and factors make
  equal outputs mean equal masks; each output also equals the hand-written branch of its mask."""
  w = np.asarray(jax.random.normal(jax.random.key(0), (6, 6)))
  params = {n: {"kernel": w} for n in ("q", "k", "v", "o")}
  x = np.asarray(jax.random.normal(jax.random.key(2), (5, 6)))
  h = np.tanh(x)

  def f(p, x):
    return [x @ p[n]["kernel"] for n in "qkv"] + [jnp.tanh(x) @ p["o"]["kernel"]]

  cfg = lj.LoraConfig(r=2, alpha=2, dropout=0.5, targets=["q", "k", "v", "o"])
  one = jax.tree.map(lambda t: t + 0.3, lj.init_lora({"q": params["q"]}, cfg, jax.random.key(1)))["q"]
  lora = {n: one for n in params}
  a, b = np.asarray(one["kernel"]["a"]), np.asarray(one["kernel"]["b"])
  rng = jax.random.key(9)

  def hand(inp, key):
    keep = np.asarray(keep_mask(key, inp.shape, 0.5))
    return inp @ w + (np.where(keep, inp / 0.5, 0) @ a.T) @ b

  shared = lj.lora_transform(f, params, cfg.replace(shared_dropout=True), strict=True)(params, lora, x, rng=rng)
  per_input = [jax.random.fold_in(jax.random.fold_in(rng, 2**32 - 1), i) for i in range(2)]
  chex.assert_trees_all_close(shared, [hand(inp, key) for inp, key in [(x, per_input[0])] * 3 + [(h, per_input[1])]],
                              rtol=1e-7, atol=1e-5)  # np.testing's default rtol
  own = lj.lora_transform(f, params, cfg, strict=True)(params, lora, x, rng=rng)
  index = {path[0]: i for i, path in enumerate(lj.find_targets(params, cfg))}  # the engine's target order
  chex.assert_trees_all_close(
      own, [hand(inp, jax.random.fold_in(jax.random.fold_in(rng, index[n]), 0)) for n, inp in zip("qkvo", [x, x, x, h])],
      rtol=1e-7, atol=1e-5)
  assert not np.allclose(own[0], own[1]) and not np.allclose(shared[0], shared[3] - (h - x) @ w)


def test_compiled_flops_near_lower_bound():
  """No materialisation: a LoRA train step costs at most 1.03x the frozen lower bound."""
  model = zoo.ScanTransformer(d=256, heads=4, depth=4, vocab=8192)
  ids = jnp.zeros((4, 64), jnp.int32)
  params = model.init(jax.random.key(0), ids)
  cfg = lj.LoraConfig(r=4, alpha=8, targets="all-linear", kernel_axes={"params/blocks/.*": (1, 1)})
  lora = lj.init_lora(params, cfg, jax.random.key(1))
  opt = optax.adam(1e-3)

  def xent(logits):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

  def lora_step(apply):
    def step(lora, opt_state):
      grads = jax.grad(lambda l: xent(apply(params, l, ids)))(lora)
      updates, opt_state = opt.update(grads, opt_state)
      return optax.apply_updates(lora, updates), opt_state
    return step

  def lower_bound(offset):  # forward, and backward to the activations only
    return jax.grad(lambda o: xent(model.apply(params, ids, offset=o)))(offset)

  def flops(fn, *args):
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]

  opt_state = opt.init(lora)
  bound = flops(lower_bound, jnp.zeros((4, 64, 256)))
  factored = flops(lora_step(lj.lora_transform(model.apply, params, cfg)), lora, opt_state)
  reference = flops(lora_step(lj.lora_transform(model.apply, params, cfg, mode="reference")), lora, opt_state)
  assert factored <= 1.03 * bound, (factored / bound)
  assert factored < reference, (factored, reference)


def test_training_learns_and_the_trained_adapter_merges():
  """Char-level LM on Python's own docs: only LoRA is trained, the loss falls clearly."""
  from pydoc_data.topics import topics
  text = np.frombuffer("".join(topics.values()).encode("ascii", "replace"), np.uint8) % 64
  model = zoo.MHATransformer(d=32, heads=4, depth=2, vocab=64)
  params = model.init(jax.random.key(0), jnp.zeros((1, 32), jnp.int32))
  cfg = lj.LoraConfig(r=8, alpha=16, targets=["query", "value", "fc1", "fc2", "lm_head"])
  lora = lj.init_lora(params, cfg, jax.random.key(1))
  apply = lj.lora_transform(model.apply, params, cfg)
  opt = optax.adam(1e-2)
  rng = np.random.default_rng(0)

  def loss_fn(lora, batch):
    logits = apply(params, lora, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

  @jax.jit
  def step(lora, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(lora, batch)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(lora, updates), opt_state, loss

  held_out = jnp.asarray(np.stack([text[i:i + 33] for i in range(0, 33 * 64, 33)]))
  before = float(loss_fn(lora, held_out))
  opt_state = opt.init(lora)
  for _ in range(150):
    starts = rng.integers(33 * 64, len(text) - 33, 16)
    lora, opt_state, _ = step(lora, opt_state, jnp.asarray(np.stack([text[s:s + 33] for s in starts])))
  after = float(loss_fn(lora, held_out))
  assert after < 0.8 * before, (before, after)
  reference = lj.lora_transform(model.apply, params, cfg, mode="reference")
  _close(apply(params, lora, held_out[:, :-1]), reference(params, lora, held_out[:, :-1]), tol=1e-4)


SHARDED = textwrap.dedent("""
  import os, sys
  import chex, jax, jax.numpy as jnp, numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  sys.path.insert(0, {tests!r})
  import lorax_jax as lj, zoo
  assert jax.device_count() == 8, jax.devices()
  case = [c for c in zoo.cases() if c.name == "mha_transformer"][0]
  lora = zoo.random_lora(case)
  apply = lj.lora_transform(case.apply_fn, case.params, case.cfg)
  single = np.asarray(jax.jit(apply)(case.params, lora, *case.inputs))
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
  def shard(path, x):  # kernels split over their last axis where it divides
    spec = P(*([None] * (x.ndim - 1)), "model") if x.ndim >= 2 and x.shape[-1] % 4 == 0 else P()
    return jax.device_put(x, NamedSharding(mesh, spec))
  params = jax.tree_util.tree_map_with_path(shard, case.params)
  ids = jax.device_put(case.inputs[0], NamedSharding(mesh, P("data")))
  out = jax.jit(apply)(params, lora, ids)
  assert len(out.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out), single, atol=1e-5)
  grads = jax.jit(jax.grad(lambda l: apply(params, l, ids).sum()))(lora)
  want = jax.grad(lambda l: apply(case.params, l, *case.inputs).sum())(lora)
  chex.assert_trees_all_close(grads, want, rtol=1e-7, atol=1e-4)  # np.testing's default rtol

  # Explicit sharding: the branch takes the use's `out_sharding`, so the adapted output has the
  # sharding the model asked for (data-sharded input, output asked replicated over "data").
  from jax.sharding import AxisType
  emesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  def f(params, x):
    h = jnp.einsum("bi,io->bo", x, params["w1"], out_sharding=P("data", None))
    return jnp.einsum("bi,io->bo", jnp.tanh(h), params["w2"], out_sharding=P(None, "model"))
  rng = np.random.default_rng(0)
  fp = {{"w1": rng.normal(size=(16, 32)).astype(np.float32), "w2": rng.normal(size=(32, 8)).astype(np.float32)}}
  cfg = lj.LoraConfig(r=2, targets=["w1", "w2"])
  flora = jax.tree.map(lambda t: t + 0.1, lj.init_lora(fp, cfg, jax.random.key(0)))
  fapply = lj.lora_transform(f, fp, cfg, strict=True)
  with jax.set_mesh(emesh):
    fp = {{"w1": jax.device_put(fp["w1"], NamedSharding(emesh, P("model", None))),
          "w2": jax.device_put(fp["w2"], NamedSharding(emesh, P(None, "model")))}}
    x = jax.device_put(rng.normal(size=(4, 16)).astype(np.float32), NamedSharding(emesh, P("data", None)))
    want = jax.jit(f)(lj.merge(fp, flora, cfg), x)
    out = jax.jit(fapply)(fp, flora, x)
    assert out.sharding.spec == want.sharding.spec == P(None, "model"), (out.sharding, want.sharding)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5)
  print("SHARDED OK")
""")


def test_sharded_params_on_eight_host_devices():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  script = SHARDED.format(tests=os.path.dirname(__file__))
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
  assert "SHARDED OK" in result.stdout, result.stderr[-3000:]


# --- chex variants: the engine's core paths, eager and under `jit` ---------------------------------


class EngineVariantsTest(chex.TestCase):
  """Factored against the merged-weight reference, outputs and gradients, each run eagerly and under
  ``jax.jit`` (chex's variants): a Dense MLP, a conv net, a scanned + remat stack, and DoRA."""

  def _factored_matches_reference(self, name, **replace):
    case = next(c for c in CASES if c.name == name)
    cfg = case.cfg.replace(**replace)
    lora = zoo.random_factors(case.params, cfg)
    factored = lj.lora_transform(case.apply_fn, case.params, cfg, strict=True)
    reference = lj.lora_transform(case.apply_fn, case.params, cfg, mode="reference")

    def out_and_grad(apply):
      def f(params, lora, *inputs):
        loss = lambda l: jnp.mean(jnp.sin(apply(params, l, *inputs)))
        return apply(params, lora, *inputs), jax.grad(loss)(lora)
      return self.variant(f)(case.params, lora, *case.inputs)

    got, want = out_and_grad(factored), out_and_grad(reference)
    chex.assert_tree_all_finite(got)
    _close(got, want)
    assert not np.allclose(want[0], case.apply_fn(case.params, *case.inputs), atol=1e-3)  # the update shows
    assert factored.fallbacks == set()

  @chex.variants(with_jit=True, without_jit=True)
  def test_dense_mlp(self):
    self._factored_matches_reference("mlp")

  @chex.variants(with_jit=True, without_jit=True)
  def test_conv(self):
    self._factored_matches_reference("cnn")

  @chex.variants(with_jit=True, without_jit=True)
  def test_scanned_stack(self):
    self._factored_matches_reference("scan_remat_transformer")

  @chex.variants(with_jit=True, without_jit=True)
  def test_dora(self):
    self._factored_matches_reference("mlp", use_dora=True)
