"""Models built from other frameworks' layers (linen, NNX, Equinox, Haiku, plain functions).

Each `Case` carries the config that adapts it and, independently of lorax_jax, the axis
split of every targeted kernel (``"s"`` stacked, ``"i"`` input / ``a``-side, ``"o"`` output /
``b``-side), from which `hand_merge` forms ``W + s · Σ_r a ⊗ b`` in the kernel's own layout.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

import lorax_jax as lj
import zoo

R, ALPHA = 2, 3.0


@dataclasses.dataclass
class Case:
  """A model to adapt: ``apply_fn(params, *inputs)``, its config, and each target's axes.

  ``axes`` maps a regex (searched in the ``/``-joined path) to the kernel's axis string;
  a 2-axis kernel not listed is ``"oi"`` when its leaf is named ``weight``, else ``"io"``.
  """

  name: str
  apply_fn: Callable[..., Any]
  params: Any
  inputs: tuple[Any, ...]
  config: Mapping[str, Any]
  axes: Mapping[str, str] = dataclasses.field(default_factory=dict)

  @property
  def cfg(self) -> lj.LoraConfig:
    """``LoraConfig(r=R, alpha=ALPHA, **config)``, built when a test asks (so a config the
    engine rejects fails that test, not the collection of all of them)."""
    return lj.LoraConfig(r=R, alpha=ALPHA, **self.config)


def key_name(key: Any) -> str:
  """One pytree key as the string lorax_jax uses in a LoRA tree (dict key, attribute, index)."""
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  return str(key)


def path_names(keys: tuple[Any, ...]) -> tuple[str, ...]:
  """A key path as strings; an NNX variable's trailing ``.value`` is not part of the name."""
  if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
    keys = keys[:-1]
  return tuple(key_name(k) for k in keys)


def lora_node(lora: Any, path: tuple[str, ...]) -> Mapping[str, jax.Array] | None:
  """The ``{"a", "b"}`` entry of ``lora`` at ``path``, or None when the leaf is not adapted."""
  node = lora
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      return None
    node = node[key]
  return node if isinstance(node, Mapping) and set(node) == {"a", "b"} else None


def axes_of(case: Case, path: tuple[str, ...], ndim: int) -> str:
  name = "/".join(path)
  for pattern, axes in case.axes.items():
    if re.search(pattern, name):
      return axes
  if ndim != 2:
    raise KeyError(f"case {case.name}: no axis string for the {ndim}-axis target {name}")
  return "oi" if path[-1] == "weight" else "io"


def factor_shapes(shape: tuple[int, ...], axes: str, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """``a: S + (r,) + I`` and ``b: S + (r,) + O``, each side's axes in kernel order."""
  side = lambda c: tuple(n for n, s in zip(shape, axes) if s == c)
  return (*side("s"), r, *side("i")), (*side("s"), r, *side("o"))


def delta(a: jax.Array, b: jax.Array, axes: str, scale: float) -> jax.Array:
  """``scale · Σ_r a ⊗ b`` laid out as the kernel whose axes are ``axes``."""
  letters = "abcdefghijklmnopq"[: len(axes)]
  pick = lambda c: "".join(l for l, s in zip(letters, axes) if s == c)
  spec = f"{pick('s')}z{pick('i')},{pick('s')}z{pick('o')}->{letters}"
  return scale * jnp.einsum(spec, a, b, precision=lax.Precision.HIGHEST)


def hand_merge(case: Case, lora: Any) -> Any:
  """``params`` with every adapted kernel replaced by ``W + (ALPHA / R) · Σ_r a ⊗ b``."""
  scale = ALPHA / R

  def update(keys, w):
    path = path_names(keys)
    node = lora_node(lora, path)
    if node is None:
      return w
    return w + delta(node["a"], node["b"], axes_of(case, path, np.ndim(w)), scale).astype(w.dtype)
  return jax.tree_util.tree_map_with_path(update, case.params)


def sin_loss(out: Any) -> jax.Array:
  """A scalar of every output leaf, nonlinear so that gradients see each output."""
  return sum(jnp.mean(jnp.sin(y)) for y in jax.tree.leaves(out))


def check_against_hand_merge(case: Case, cfg: lj.LoraConfig, lora: Any) -> None:
  """Strict factored outputs and LoRA gradients equal those of the hand-merged model (1e-5),
  and nothing was merged."""
  factored = lj.lora_transform(case.apply_fn, case.params, cfg, strict=True)
  merged = lambda l: case.apply_fn(hand_merge(case, l), *case.inputs)
  want = merged(lora)
  zoo.close(factored(case.params, lora, *case.inputs), want)
  # The update is not negligible: the adapted model differs from the base one.
  assert not np.allclose(np.asarray(jax.tree.leaves(want)[0]),
                         np.asarray(jax.tree.leaves(case.apply_fn(case.params, *case.inputs))[0]), atol=1e-3)
  zoo.close(jax.grad(lambda l: sin_loss(factored(case.params, l, *case.inputs)))(lora),
            jax.grad(lambda l: sin_loss(merged(l)))(lora))
  assert factored.fallbacks == set()


def adapted_paths(case: Case, lora: Any) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
  """``(path, kernel shape)`` of every leaf of the params that ``lora`` adapts."""
  flat = jax.tree_util.tree_flatten_with_path(case.params)[0]
  return [(path_names(k), np.shape(w)) for k, w in flat if lora_node(lora, path_names(k)) is not None]


# --- flax linen ----------------------------------------------------------------------------


class LinenLayers(nn.Module):
  """`nn.Dense`, `nn.DenseGeneral` (one input axis to two and two to one) and `nn.Einsum`."""

  @nn.compact
  def __call__(self, x):                                              # [b, t, 12]
    h = nn.DenseGeneral((3, 4), axis=-1, name="split_heads")(x)       # [12, 3, 4]
    h = jnp.tanh(nn.Einsum((3, 4, 10), "bthk,hkd->btd", name="einsum")(h))
    h = nn.DenseGeneral(6, axis=(-2, -1), name="merge")(h.reshape(*h.shape[:-1], 2, 5))  # [2, 5, 6]
    return nn.Dense(5, name="dense")(jax.nn.gelu(h))


class LinenConv(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3), strides=(2, 2), padding="SAME", name="strided")(x))
    x = nn.relu(nn.Conv(5, (3, 3), kernel_dilation=(2, 2), padding="VALID", name="dilated")(x))
    return x.mean(axis=(1, 2))


class LinenTiedLM(nn.Module):
  """`nn.Embed` looked up and used as the output head through ``attend``."""

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(30, 12, name="embed")
    h = jnp.tanh(nn.Dense(12, name="hidden")(embed(ids)))
    return embed.attend(h)


class LinenAttention(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.MultiHeadDotProductAttention(num_heads=3, qkv_features=12, name="attn")(x, x)


class LinenLSTM(nn.Module):
  """`nn.OptimizedLSTMCell` (its gate kernels concatenated) scanned over time by `nn.RNN`."""

  @nn.compact
  def __call__(self, x):
    return nn.RNN(nn.OptimizedLSTMCell(6), name="rnn")(x)


class ScanMLPBlock(nn.Module):
  d: int

  @nn.compact
  def __call__(self, x, _):
    return x + nn.Dense(self.d, name="fc2")(jax.nn.gelu(nn.Dense(2 * self.d, name="fc1")(x))), None


class LinenScan(nn.Module):
  """Blocks stacked by `nn.scan`: kernels ``[depth, in, out]``."""

  @nn.compact
  def __call__(self, x):
    blocks = nn.scan(ScanMLPBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return blocks(x.shape[-1], name="blocks")(x, None)[0]


def _linen(name: str, model: nn.Module, x: Any, config: dict[str, Any], axes=None) -> Case:
  return Case(name, model.apply, model.init(jax.random.key(0), x), (x,), config, axes or {})


# --- NNX ----------------------------------------------------------------------------------


class NNXTagger(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(20, 8, rngs=rngs)
    self.fc = nnx.Linear(8, 16, rngs=rngs)
    self.head = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, ids):
    return self.head(jax.nn.relu(self.fc(self.embed(ids))))


# --- Equinox ------------------------------------------------------------------------------


class EqxModel(eqx.Module):
  """A model called as ``model(x)`` on one example: a conv, an `eqx.nn.MLP` and a `Linear`."""

  conv: eqx.nn.Conv2d
  mlp: eqx.nn.MLP
  out: eqx.nn.Linear

  def __init__(self, key: jax.Array):
    k1, k2, k3 = jax.random.split(key, 3)
    self.conv = eqx.nn.Conv2d(3, 4, 3, stride=2, key=k1)
    self.mlp = eqx.nn.MLP(4 * 3 * 3, 6, 16, depth=2, key=k2)
    self.out = eqx.nn.Linear(6, 3, key=k3)

  def __call__(self, x):                                   # [3, 7, 7]
    h = jax.nn.relu(self.conv(x)).reshape(-1)            # [4 * 3 * 3]
    return self.out(jnp.tanh(self.mlp(h)))


def equinox_case(name: str, model: eqx.Module, x: jax.Array, config: dict[str, Any], axes=None) -> Case:
  """``params = eqx.partition(model, eqx.is_array)[0]``; the model is vmapped over the batch."""
  params, static = eqx.partition(model, eqx.is_array)
  return Case(name, lambda p, x: jax.vmap(eqx.combine(p, static))(x), params, (x,), config, axes or {})


# --- Haiku --------------------------------------------------------------------------------


def _haiku_forward(x):                                     # [b, 6, 6, 2]
  h = jax.nn.relu(hk.Conv2D(4, 3, name="conv")(x)).reshape(x.shape[0], 36, 4)
  h = hk.Linear(8, name="embed_in")(h)
  h = h + hk.MultiHeadAttention(num_heads=2, key_size=4, w_init=hk.initializers.VarianceScaling(1.0),
                                name="mha")(h, h, h)
  return hk.Linear(3, name="proj")(h.mean(axis=1))


# --- plain functions over dicts of arrays -------------------------------------------------


def ported_mlp(params: dict, x: jax.Array) -> jax.Array:
  """PyTorch-layout ``weight [out, in]`` used as ``x @ W.T``, and a tied autoencoder."""
  h = jnp.tanh(x @ params["fc"]["weight"].T + params["fc"]["bias"])
  code = jnp.tanh(h @ params["enc"])             # enc [16, 6]
  return h - code @ params["enc"].T                # the decoder is the encoder transposed


def fused_qkv_attention(params: dict, x: jax.Array) -> jax.Array:
  """One ``[d, 3d]`` kernel split into q, k, v with `jnp.split`, and a ``[d, d]`` output."""
  wq, wk, wv = jnp.split(params["qkv"], 3, axis=1)
  q, k, v = (jnp.einsum("btd,dhk->bthk", x, w.reshape(x.shape[-1], 2, -1)) for w in (wq, wk, wv))
  att = jax.nn.softmax(jnp.einsum("bqhk,bshk->bhqs", q, k) / jnp.sqrt(q.shape[-1]), axis=-1)
  o = jnp.einsum("bhqs,bshk->bqhk", att, v).reshape(x.shape)
  return o @ params["out"]


def moe_layer(params: dict, x: jax.Array) -> jax.Array:
  """Top-1 mixture of experts: tokens sorted by expert, experts ``[E, in, out]`` via `lax.ragged_dot`."""
  tokens = x.reshape(-1, x.shape[-1])
  logits = tokens @ params["router"]
  expert = jnp.argmax(logits, axis=-1)
  order = jnp.argsort(expert)
  sizes = jnp.bincount(expert, length=params["router"].shape[1]).astype(jnp.int32)
  grouped = tokens[order]
  h = jax.nn.gelu(lax.ragged_dot(grouped, params["up"], sizes))
  y = lax.ragged_dot(h, params["down"], sizes)
  gate = jax.nn.softmax(logits, axis=-1)[order, expert[order]]
  out = jnp.zeros_like(tokens).at[order].set(y * gate[:, None])
  return out.reshape(x.shape)


def _normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return jax.random.normal(key, shape) / math.sqrt(shape[-2] if len(shape) > 1 else 1)


def plain_params(key: jax.Array) -> dict[str, Any]:
  ks = jax.random.split(key, 8)
  return {
      "ported": {"fc": {"weight": _normal(ks[0], (16, 10)), "bias": jnp.zeros(16)},
                 "enc": _normal(ks[1], (16, 6))},
      "qkv": {"qkv": _normal(ks[2], (8, 24)), "out": _normal(ks[3], (8, 8))},
      "moe": {"router": _normal(ks[4], (8, 4)), "up": _normal(ks[5], (4, 8, 12)),
              "down": _normal(ks[6], (4, 12, 8))},
  }


def cases() -> list[Case]:
  key = jax.random.key(7)
  ks = jax.random.split(key, 8)
  ids = jax.random.randint(ks[0], (2, 5), 0, 20)
  all_linear = lambda **kw: dict(targets="all-linear", **kw)
  zoo = [
      _linen("linen_dense_general_einsum", LinenLayers(), jax.random.normal(ks[1], (2, 3, 12)),
             dict(targets=["split_heads", "einsum", "merge", "dense"],
                           kernel_axes={"split_heads": "ioo", "einsum": "iio", "merge": "iio"}),
             {"split_heads": "ioo", "einsum": "iio", "merge": "iio"}),
      _linen("linen_conv_stride_dilation", LinenConv(), jax.random.normal(ks[2], (2, 11, 11, 3)),
             dict(targets=["strided", "dilated"],
                           kernel_axes={"strided": "iiio", "dilated": "iiio"}),
             {"strided": "iiio", "dilated": "iiio"}),
      _linen("linen_embed_attend_tied", LinenTiedLM(), jax.random.randint(ks[3], (2, 6), 0, 30),
             dict(targets=["embed", "hidden"], target_uses={"embed": ("lookup", "matmul")})),
      _linen("linen_mha", LinenAttention(), jax.random.normal(ks[4], (2, 5, 12)),
             dict(targets=["query", "key", "value", "out"],
                           kernel_axes={r".*/(query|key|value)/kernel": "ioo", "out": "iio"}),
             {"query|key|value": "ioo", "attn/out": "iio"}),
      _linen("linen_optimized_lstm", LinenLSTM(), jax.random.normal(ks[5], (2, 4, 5)), all_linear()),
      _linen("linen_scan", LinenScan(), jax.random.normal(ks[6], (2, 3, 8)),
             all_linear(kernel_axes={"params/blocks/.*": "sio"}), {"blocks": "sio"}),
  ]
  graphdef, state = nnx.split(NNXTagger(nnx.Rngs(0)))
  zoo.append(Case("nnx_linear_embed", lambda s, ids: nnx.merge(graphdef, s)(ids), state, (ids,),
                  dict(targets=["embed", "fc", "head"])))
  zoo.append(equinox_case("equinox_model", EqxModel(ks[7]), jax.random.normal(ks[1], (2, 3, 7, 7)),
                          dict(targets=["conv", r"mlp/layers/\d+/weight", "out"],
                                        kernel_axes={"conv": "oiii"}),
                          {"conv": "oiii"}))
  haiku = hk.without_apply_rng(hk.transform(_haiku_forward))
  hx = jax.random.normal(ks[2], (2, 6, 6, 2))
  zoo.append(Case("haiku_transform", haiku.apply, haiku.init(jax.random.key(0), hx), (hx,),
                  dict(targets=r".*(conv|embed_in|query|key|value|linear|proj)/w",
                                kernel_axes={"conv": "iiio"}),
                  {"conv": "iiio"}))
  plain = plain_params(ks[3])
  zoo += [
      Case("plain_ported_and_tied_autoencoder", ported_mlp, plain["ported"],
           (jax.random.normal(ks[4], (3, 10)),), dict(targets=["fc", "enc"])),
      Case("plain_fused_qkv_split", fused_qkv_attention, plain["qkv"],
           (jax.random.normal(ks[5], (2, 4, 8)),), dict(targets=["qkv", "out"])),
      Case("plain_moe_ragged_dot", moe_layer, plain["moe"], (jax.random.normal(ks[6], (2, 9, 8)),),
           dict(targets=["up", "down"], kernel_axes={"up|down": "sio"}),
           {"up|down": "sio"}),
  ]
  return zoo
