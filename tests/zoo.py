"""A zoo of small models, each with the config that adapts it (shared by the tests)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import lorax_jax as lj


@dataclasses.dataclass
class Case:
  name: str
  apply_fn: Callable[..., Any]
  params: Any
  inputs: tuple[Any, ...]
  cfg: lj.LoraConfig


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(32, name="fc1")(x))
    x = nn.gelu(nn.Dense(32, name="fc2")(x))
    return nn.Dense(5, name="head")(x)


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), name="conv1")(x))
    x = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2), padding="VALID", name="conv2")(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(3, name="head")(x)


class EmbedLM(nn.Module):
  """Embedding, a hidden Dense, and a tied LM head (``embed.attend``) plus an untied one."""

  vocab: int = 50

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(self.vocab, 16, name="embed")
    h = jnp.tanh(nn.Dense(16, name="hidden")(embed(ids)))
    return embed.attend(h) + nn.Dense(self.vocab, name="lm_head")(h)


class Block(nn.Module):
  d: int
  heads: int

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln1")(x)
    x = x + nn.MultiHeadDotProductAttention(self.heads, name="attn")(h, h, mask=nn.make_causal_mask(h[..., 0]))
    h = nn.LayerNorm(name="ln2")(x)
    return x + nn.Dense(self.d, name="fc2")(nn.gelu(nn.Dense(4 * self.d, name="fc1")(h)))


class MHATransformer(nn.Module):
  d: int = 32
  heads: int = 4
  depth: int = 2
  vocab: int = 40

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(self.vocab, self.d, name="embed")(ids)
    for i in range(self.depth):
      x = Block(self.d, self.heads, name=f"block_{i}")(x)
    return nn.Dense(self.vocab, name="lm_head")(nn.LayerNorm(name="ln_f")(x))


class ScanBlock(nn.Module):
  """A pre-LN block with fused-free q/k/v Dense projections, as one `nn.scan` step."""

  d: int
  heads: int

  @nn.compact
  def __call__(self, x, _):
    b, t, d = x.shape
    h = nn.LayerNorm(name="ln1")(x)
    q, k, v = (nn.Dense(d, name=n)(h).reshape(b, t, self.heads, -1) for n in ("query", "key", "value"))
    att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
    att = jnp.where(jnp.tril(jnp.ones((t, t), bool)), att, -1e9)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(att, -1), v).reshape(b, t, d)
    x = x + nn.Dense(d, name="out")(o)
    h = nn.LayerNorm(name="ln2")(x)
    return x + nn.Dense(d, name="fc2")(nn.gelu(nn.Dense(4 * d, name="fc1")(h))), None


class ScanTransformer(nn.Module):
  """Blocks stacked with `nn.scan` and wrapped in `nn.remat`: kernels ``[depth, in, out]``."""

  d: int = 32
  heads: int = 4
  depth: int = 3
  vocab: int = 40

  @nn.compact
  def __call__(self, ids, offset=None):
    x = nn.Embed(self.vocab, self.d, name="embed")(ids)
    if offset is not None:  # lets a test differentiate w.r.t. the first activation
      x = x + offset
    blocks = nn.scan(nn.remat(ScanBlock), variable_axes={"params": 0}, split_rngs={"params": True},
                     length=self.depth)
    x, _ = blocks(self.d, self.heads, name="blocks")(x, None)
    return nn.Dense(self.vocab, name="lm_head")(nn.LayerNorm(name="ln_f")(x))


def einsum_attention(params: dict, x: jax.Array) -> jax.Array:
  """Multi-head attention written with `jnp.einsum` on raw params ``wq, wk, wv: [d, h, k]``, ``wo: [h, k, d]``."""
  q = jnp.einsum("btd,dhk->bthk", x, params["wq"])
  k = jnp.einsum("btd,dhk->bthk", x, params["wk"])
  v = jnp.einsum("btd,dhk->bthk", x, params["wv"])
  att = jax.nn.softmax(jnp.einsum("bqhk,bshk->bhqs", q, k) / jnp.sqrt(q.shape[-1]), -1)
  return jnp.einsum("bhqs,bshk,hkd->bqd", att, v, params["wo"])


class NNXModel(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.q_proj = nnx.Linear(12, 12, rngs=rngs)
    self.v_proj = nnx.Linear(12, 12, rngs=rngs)
    self.out = nnx.Linear(12, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.tanh(self.q_proj(x)) * self.v_proj(x))


def torch_style_mlp(params: dict, x: jax.Array) -> jax.Array:
  """Kernels stored ``[out, in]`` (PyTorch-ported weights) and used as ``x @ W.T``."""
  h = jnp.tanh(x @ params["fc1"]["weight"].T + params["fc1"]["bias"])
  return h @ params["fc2"]["weight"].T


def fused_qkv_attention(params: dict, x: jax.Array) -> jax.Array:
  """One fused ``[d, 3d]`` QKV kernel cut with `jnp.split`, and a gate-up MLP kernel cut the same way."""
  wq, wk, wv = jnp.split(params["qkv"]["kernel"], 3, axis=1)
  q, k, v = x @ wq, x @ wk, x @ wv
  att = jax.nn.softmax(jnp.einsum("bqd,bkd->bqk", q, k) / jnp.sqrt(q.shape[-1]), -1)
  h = x + jnp.einsum("bqk,bkd->bqd", att, v) @ params["out"]["kernel"]
  gate, up = jnp.split(params["gate_up"]["kernel"], 2, axis=1)
  return h + (jax.nn.silu(h @ gate) * (h @ up)) @ params["down"]["kernel"]


def mup_scaled(params: dict, x: jax.Array) -> jax.Array:
  """muP-style scaling: kernels multiplied by a scalar, by a per-output vector, divided by a
  per-input vector, and negated before their use."""
  d_in = params["fc1"]["kernel"].shape[0]
  w1 = params["fc1"]["kernel"] * (1.0 / jnp.sqrt(d_in)) * params["fc1"]["gain"]
  h = jnp.tanh(x @ w1)
  w2 = -(params["fc2"]["kernel"] / params["fc2"]["norm"][:, None])
  return h @ w2


def moe_layer(params: dict, x: jax.Array) -> jax.Array:
  """A top-1 mixture of experts: tokens sorted by expert, experts ``[E, in, out]`` via `lax.ragged_dot`."""
  n_experts = params["experts"]["w_in"].shape[0]
  expert = jnp.argmax(x @ params["router"], axis=-1)
  order = jnp.argsort(expert)
  groups = jnp.bincount(expert, length=n_experts).astype(jnp.int32)
  xs = x[order]
  h = jax.nn.gelu(jax.lax.ragged_dot(xs, params["experts"]["w_in"], groups))
  y = jax.lax.ragged_dot(h, params["experts"]["w_out"], groups)
  return jnp.zeros_like(y).at[order].set(y)


def dense_moe_layer(params: dict, x: jax.Array) -> jax.Array:
  """A top-2 mixture of experts in the dense-dispatch form (GShard's einsums; Mixtral written without
  a sort): every expert ``[E, in, out]`` on every token, the outputs weighed by the gates."""
  logits = x @ params["router"]
  top, idx = jax.lax.top_k(logits, 2)
  gates = jnp.sum(jax.nn.one_hot(idx, logits.shape[-1]) * jax.nn.softmax(top)[..., None], axis=-2)
  h = jax.nn.gelu(jnp.einsum("btd,edh->bteh", x, params["experts"]["w_in"]))
  return jnp.einsum("bteh,ehd,bte->btd", h, params["experts"]["w_out"], gates)


class LSTM(nn.Module):
  """`nn.OptimizedLSTMCell` (its gate kernels concatenated before one dot) under `nn.RNN`."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="head")(nn.RNN(nn.OptimizedLSTMCell(8), name="rnn")(x)[:, -1])


def _linen(name: str, model: nn.Module, x: Any, cfg: lj.LoraConfig) -> Case:
  params = model.init(jax.random.key(0), x)
  return Case(name, model.apply, params, (x,), cfg)


def cases() -> list[Case]:
  key = jax.random.key(42)
  ids = jax.random.randint(key, (2, 7), 0, 40)
  zoo = [
      _linen("mlp", MLP(), jax.random.normal(key, (4, 10)), lj.LoraConfig(r=3, alpha=6, targets="all-linear")),
      _linen("cnn", CNN(), jax.random.normal(key, (2, 9, 9, 3)),
             lj.LoraConfig(r=2, alpha=4, targets=["conv1", "conv2", "head"])),
      _linen("embed_lm", EmbedLM(), jax.random.randint(key, (3, 5), 0, 50),
             lj.LoraConfig(r=4, alpha=4, targets=["embed", "hidden", "lm_head"])),
      _linen("mha_transformer", MHATransformer(), ids,
             lj.LoraConfig(r=4, alpha=8, targets=["query", "key", "value", "out", "fc1", "fc2"])),
      _linen("scan_remat_transformer", ScanTransformer(), ids,
             lj.LoraConfig(r=4, alpha=8, targets="all-linear", kernel_axes={"params/blocks/.*": (1, 1)})),
  ]
  d, h, k = 16, 4, 4
  ks = jax.random.split(key, 4)
  raw = {n: jax.random.normal(kk, (d, h, k)) / 4 for n, kk in zip(("wq", "wk", "wv"), ks)}
  raw["wo"] = jax.random.normal(ks[3], (h, k, d)) / 4
  zoo.append(Case("einsum_attention", einsum_attention, raw, (jax.random.normal(key, (2, 6, d)),),
                  lj.LoraConfig(r=2, alpha=2, targets=["wq", "wk", "wv", "wo"])))
  ks = jax.random.split(key, 12)
  torch_params = {"fc1": {"weight": jax.random.normal(ks[0], (24, 10)) / 3, "bias": jnp.zeros(24)},
                  "fc2": {"weight": jax.random.normal(ks[1], (6, 24)) / 5}}
  zoo.append(Case("torch_style_mlp", torch_style_mlp, torch_params, (jax.random.normal(key, (4, 10)),),
                  lj.LoraConfig(r=2, alpha=4, targets="all-linear")))
  d = 16
  fused = {"qkv": {"kernel": jax.random.normal(ks[2], (d, 3 * d)) / 8},  # activations of order 1
           "out": {"kernel": jax.random.normal(ks[3], (d, d)) / 8},
           "gate_up": {"kernel": jax.random.normal(ks[4], (d, 4 * d)) / 8},
           "down": {"kernel": jax.random.normal(ks[5], (2 * d, d)) / 8}}
  zoo.append(Case("fused_qkv_attention", fused_qkv_attention, fused, (jax.random.normal(key, (2, 5, d)),),
                  lj.LoraConfig(r=2, alpha=4, targets="all-linear")))
  mup = {"fc1": {"kernel": jax.random.normal(ks[6], (12, 20)), "gain": 1 + jax.random.uniform(ks[7], (20,))},
         "fc2": {"kernel": jax.random.normal(ks[8], (20, 4)) / 3, "norm": 1 + jax.random.uniform(ks[9], (20,))}}
  zoo.append(Case("mup_scaled", mup_scaled, mup, (jax.random.normal(key, (3, 12)),),
                  lj.LoraConfig(r=2, alpha=4, targets="all-linear")))
  e, f = 4, 24
  moe = {"router": jax.random.normal(ks[10], (d, e)),
         "experts": {"w_in": jax.random.normal(ks[11], (e, d, f)) / 4,
                     "w_out": jax.random.normal(ks[0], (e, f, d)) / 5}}
  zoo.append(Case("moe_ragged_dot", moe_layer, moe, (jax.random.normal(key, (20, d)),),
                  lj.LoraConfig(r=2, alpha=4, targets=["experts/w_in", "experts/w_out"],
                                kernel_axes={"experts/.*": "sio"})))
  zoo.append(_linen("optimized_lstm", LSTM(), jax.random.normal(key, (2, 5, 4)),
                    lj.LoraConfig(r=2, alpha=4, targets="all-linear")))
  graphdef, state = nnx.split(NNXModel(nnx.Rngs(0)))
  zoo.append(Case("nnx", lambda s, x: nnx.merge(graphdef, s)(x), state,
                  (jax.random.normal(key, (5, 12)),), lj.LoraConfig(r=2, alpha=4)))
  return zoo


def random_lora(case: Case, seed: int = 1, scale: float = 0.3) -> Any:
  """Factors with random non-zero ``a`` and ``b``."""
  return random_factors(case.params, case.cfg, seed, scale)


def random_factors(params: Any, cfg: lj.LoraConfig, seed: int = 1, scale: float = 0.3) -> Any:
  """Factors with random non-zero ``a`` and ``b``, in the layout `init_lora` returns."""
  lora = lj.init_lora(params, cfg, jax.random.key(seed))
  leaves, tree = jax.tree_util.tree_flatten(lora)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def close(x: Any, y: Any, tol: float = 1e-5) -> None:
  """Assert two trees equal within ``tol``, relative to the larger magnitude (and absolute below 1):
  leaf by leaf, same shapes, ``|a - b| <= tol * max(1, max|b|)``, a per-leaf atol that chex's
  elementwise rtol/atol cannot express; chex walks the trees, checks that their structures match
  and names the leaf that differs."""
  def message(a: Any, b: Any) -> str:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
      return f"shapes differ: {a.shape} and {b.shape}"
    try:
      np.testing.assert_allclose(a, b, rtol=0, atol=tol * max(1.0, float(np.abs(b).max())))
    except AssertionError as e:
      return str(e)
    return ""

  chex.assert_trees_all_equal_comparator(lambda a, b: not message(a, b), message, x, y)
