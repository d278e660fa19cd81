"""A readable Flax GPT-2 (learned positions, LayerNorm, GELU with tanh, fused ``c_attn``) with the
KV cache and calling convention of `lorax_jax.models.llama.Llama`, so `lorax_jax.models.generate`
runs it.

Module names mirror transformers' ``GPT2LMHeadModel`` (``transformer.h.3.attn.c_attn``), so
`GPT2_PATH_MAP` is one-to-one. transformers' ``Conv1D`` stores its weight ``[in, out]``, the
layout of a Flax ``Dense`` kernel: the map's kind ``"conv1d"`` keeps it as stored, and a LoRA on
it has a linear layer's factors (``lora_A [r, in]``, ``lora_B [out, r]``: PEFT's
``fan_in_fan_out=True`` adapters). ``c_attn`` is one ``[D, 3D]`` kernel split into q, k, v
after the matmul, so an adapter on it is one LoRA on the fused kernel, as in PEFT.

One block: ``x + c_proj(attn(ln_1(x)))``, then ``x + mlp(ln_2(x))`` with ``mlp(x) =
c_proj(gelu_tanh(c_fc(x)))``; the input is ``wte(tokens) + wpe(positions)``, the output
``ln_f`` then the head, tied to ``wte`` unless ``tie_word_embeddings`` is False. Positions index
a learned table of ``n_positions`` rows: a position beyond it is clamped by JAX's gather (keep
prompt plus generation within ``n_positions``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax.models import hf
from lorax_jax.models.llama import Cache, attend, cache_inputs, empty_cache
from lorax_jax.pathmap import PathMap

ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # transformers' names of GELU with the tanh approximation
_FIELDS = frozenset({  # the config.json fields GPT2Config reads
    "model_type", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "layer_norm_epsilon",
    "activation_function", "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "tie_word_embeddings",
    "add_cross_attention"})
_NEUTRAL = frozenset({  # GPT-2's fields that change no logits of GPT2LMHeadModel
    "attn_pdrop", "n_ctx",  # a dropout; n_ctx: old configs' copy of n_positions, unread by transformers
    "reorder_and_upcast_attn",  # the same scores, computed in float32 (as here)
    "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
    "summary_first_dropout",  # GPT2DoubleHeadsModel's head
    "task_specific_params"})  # generation defaults


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """The hyper-parameters of a GPT-2; field names are those of transformers' ``config.json``.

  ``n_inner``: the MLP's width (``4 · n_embd`` in ``config.json``'s ``null``).
  ``scale_attn_weights``: scores scaled by ``1 / sqrt(head_dim)``; ``scale_attn_by_inverse_layer_idx``:
  layer ``i``'s also by ``1 / (i + 1)``.
  """

  vocab_size: int
  n_positions: int
  n_embd: int
  n_layer: int
  n_head: int
  n_inner: int
  layer_norm_epsilon: float = 1e-5
  activation_function: str = "gelu_new"
  scale_attn_weights: bool = True
  scale_attn_by_inverse_layer_idx: bool = False
  tie_word_embeddings: bool = True

  def __post_init__(self):
    if self.n_embd % self.n_head:
      raise ValueError(f"GPT2Config: n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
    if self.activation_function not in ACTIVATIONS:
      raise ValueError(f"GPT2Config: activation_function={self.activation_function!r} is not implemented; "
                       f"only {', '.join(map(repr, ACTIVATIONS))} (GELU, tanh approximation) are")

  @property
  def head_dim(self) -> int:
    """Each head's width, ``n_embd / n_head``."""
    return self.n_embd // self.n_head

  def scale(self, layer: int) -> float:
    """Layer ``layer``'s factor on the attention scores."""
    scale = 1 / np.sqrt(self.head_dim) if self.scale_attn_weights else 1.0
    return scale / (layer + 1) if self.scale_attn_by_inverse_layer_idx else scale

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> GPT2Config:
    """From a transformers ``config.json`` dict of ``model_type`` ``"gpt2"``; a field neither read
    here nor one that leaves the logits alone is an error naming it, as is cross-attention.

    Raises:
      ValueError: another ``model_type``, an unknown field, ``add_cross_attention``, a missing size.
    """
    if config.get("model_type", "gpt2") != "gpt2":
      raise ValueError(f"config.json has model_type={config['model_type']!r}, not 'gpt2'")
    unknown = sorted(config.keys() - _FIELDS - _NEUTRAL - hf.NEUTRAL_FIELDS)
    if unknown:
      fields = ", ".join(f"{k}={config[k]!r}" for k in unknown)
      raise ValueError(f"config.json of a 'gpt2' model has {fields}, which this model does not implement")
    if config.get("add_cross_attention", False):
      raise ValueError("config.json has add_cross_attention=True (an encoder-decoder's GPT-2); only the "
                       "decoder-only GPT2LMHeadModel is implemented")
    missing = [k for k in ("vocab_size", "n_embd", "n_layer", "n_head") if k not in config]
    if missing:
      raise ValueError(f"config.json lacks {', '.join(missing)}")
    return cls(
        vocab_size=config["vocab_size"], n_positions=config.get("n_positions", 1024), n_embd=config["n_embd"],
        n_layer=config["n_layer"], n_head=config["n_head"], n_inner=config.get("n_inner") or 4 * config["n_embd"],
        **{k: config[k] for k in ("layer_norm_epsilon", "activation_function", "scale_attn_weights",
                                  "scale_attn_by_inverse_layer_idx", "tie_word_embeddings") if k in config})

  def to_hf(self) -> dict[str, Any]:
    """A ``config.json`` dict that ``GPT2LMHeadModel`` loads (`from_hf`'s inverse)."""
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], **dataclasses.asdict(self)}


def _dense(features: int, dtype: Any, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, name=name)


def _layer_norm(config: GPT2Config, dtype: Any, name: str | None = None) -> nn.LayerNorm:
  # use_fast_variance=False: mean((x - mean)²), as torch computes it
  return nn.LayerNorm(config.layer_norm_epsilon, dtype=dtype, use_fast_variance=False, name=name)


class Attention(nn.Module):
  """``c_proj(attend(q, k, v))`` with ``[q, k, v] = c_attn(x)``, one fused kernel; ``layer`` is the
  block's index (for the scores' scale, `GPT2Config.scale`)."""

  config: GPT2Config
  layer: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array, index: jax.Array, cache: Cache | None
               ) -> tuple[jax.Array, Cache | None]:
    c = self.config
    b, l, d = x.shape
    qkv = _dense(3 * d, self.dtype, "c_attn")(x)
    q, k, v = (y.reshape(b, l, c.n_head, c.head_dim) for y in jnp.split(qkv, 3, axis=-1))
    h, cache = attend(q, k, v, key_mask, index, cache, c.scale(self.layer))
    return _dense(d, self.dtype, "c_proj")(h.astype(x.dtype)), cache


class MLP(nn.Module):
  """``c_proj(gelu_tanh(c_fc(x)))``."""

  config: GPT2Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.gelu(_dense(self.config.n_inner, self.dtype, "c_fc")(x), approximate=True)
    return _dense(x.shape[-1], self.dtype, "c_proj")(h)


class Block(nn.Module):
  """One GPT-2 block (the module docstring); ``layer`` is its index."""

  config: GPT2Config
  layer: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array, index: jax.Array, cache: Cache | None
               ) -> tuple[jax.Array, Cache | None]:
    c = self.config
    h, cache = Attention(c, self.layer, self.dtype, name="attn")(
        _layer_norm(c, self.dtype, "ln_1")(x), key_mask, index, cache)
    x = x + h
    return x + MLP(c, self.dtype, name="mlp")(_layer_norm(c, self.dtype, "ln_2")(x)), cache


class GPT2Model(nn.Module):
  """``wte`` and ``wpe``, ``n_layer`` blocks (``h_{i}``) and ``ln_f``; transformers' ``GPT2Model``."""

  config: GPT2Config
  dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    init = nn.initializers.normal(0.02)
    self.wte = nn.Embed(c.vocab_size, c.n_embd, dtype=self.dtype, embedding_init=init)
    self.wpe = nn.Embed(c.n_positions, c.n_embd, dtype=self.dtype, embedding_init=init)
    self.h = [Block(c, i, self.dtype) for i in range(c.n_layer)]
    self.ln_f = _layer_norm(c, self.dtype)

  def __call__(self, tokens: jax.Array, positions: jax.Array, key_mask: jax.Array, index: jax.Array,
               cache: Cache | None) -> tuple[jax.Array, Cache]:
    x = self.wte(tokens) + self.wpe(positions)
    out = {}
    for i, block in enumerate(self.h):
      x, out[f"layers_{i}"] = block(x, key_mask, index, None if cache is None else cache[f"layers_{i}"])
    return self.ln_f(x), out


class GPT2(nn.Module):
  """GPT-2 language model (``GPT2LMHeadModel``) with `lorax_jax.models.llama.Llama`'s convention::

      logits = model.apply(params, tokens)                            # [B, L] -> [B, L, V]
      logits, cache = model.apply(params, tokens, positions, mask, cache=model.init_cache(B, S))
  """

  config: GPT2Config
  dtype: Any = jnp.float32

  def setup(self):
    self.transformer = GPT2Model(self.config, self.dtype)
    if not self.config.tie_word_embeddings:
      self.lm_head = nn.Dense(self.config.vocab_size, use_bias=False, dtype=self.dtype)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, mask: jax.Array | None = None,
               cache: Cache | None = None) -> jax.Array | tuple[jax.Array, Cache]:
    """Logits ``[B, L, V]`` for ``tokens [B, L]``, and the new cache given one.

    Args:
      tokens: token ids.
      positions: ``[B, L]`` rows of ``wpe``; default ``index + arange(L)`` (``index`` = 0 without a cache).
      mask: ``[B, L]``, False for padding tokens no other token may attend to; default all True.
      cache: from `init_cache` or a previous call; the tokens are appended at its ``index``.
    """
    positions, key_mask, index = cache_inputs(tokens, positions, mask, cache)
    h, layers = self.transformer(tokens, positions, key_mask, index, cache)
    logits = self.transformer.wte.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)
    return logits if cache is None else (logits, {"index": index + tokens.shape[1], "mask": key_mask, **layers})

  def init_cache(self, batch: int, length: int, dtype: Any = None) -> Cache:
    """An empty cache of ``length`` slots for ``batch`` sequences (`lorax_jax.models.llama.empty_cache`)."""
    c = self.config
    return empty_cache(batch, length, c.n_layer, c.n_head, c.head_dim, dtype or self.dtype)


def _path_map() -> PathMap:
  layer, hf_layer = "params/transformer/h_{i}/", "transformer.h.{i}."
  rules = [("params/transformer/wte/embedding", "transformer.wte.weight", "embedding"),
           ("params/transformer/wpe/embedding", "transformer.wpe.weight", "embedding")]
  for module in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
    name = module.replace("/", ".")
    rules += [(f"{layer}{module}/kernel", f"{hf_layer}{name}.weight", "conv1d"),
              (f"{layer}{module}/bias", f"{hf_layer}{name}.bias", "param")]
  for flax, name in (f"{layer}ln_1", f"{hf_layer}ln_1"), (f"{layer}ln_2", f"{hf_layer}ln_2"), (
      "params/transformer/ln_f", "transformer.ln_f"):
    rules += [(f"{flax}/scale", f"{name}.weight", "param"), (f"{flax}/bias", f"{name}.bias", "param")]
  rules.append(("params/lm_head/kernel", "lm_head.weight", "linear"))
  return PathMap(tuple(rules), ties=(("lm_head.weight", "transformer.wte.weight"),))


GPT2_PATH_MAP: PathMap = _path_map()
"""Flax `GPT2` param paths <-> transformers' ``GPT2LMHeadModel`` tensor names; the blocks' kernels
are of kind ``"conv1d"`` (``Conv1D``'s ``[in, out]``), the head is tied to ``wte`` by default."""


def hf_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
  """The transformers tensor names and shapes of a ``GPT2LMHeadModel`` with this config."""
  c, d = config, config.n_embd
  shapes = {"transformer.wte.weight": (c.vocab_size, d), "transformer.wpe.weight": (c.n_positions, d),
            "transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)}
  if not c.tie_word_embeddings:
    shapes["lm_head.weight"] = (c.vocab_size, d)
  for i in range(c.n_layer):
    for name, (n_in, n_out) in {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, c.n_inner),
                                "mlp.c_proj": (c.n_inner, d)}.items():
      shapes.update({f"transformer.h.{i}.{name}.weight": (n_in, n_out), f"transformer.h.{i}.{name}.bias": (n_out,)})
    for norm in ("ln_1", "ln_2"):
      shapes.update({f"transformer.h.{i}.{norm}.weight": (d,), f"transformer.h.{i}.{norm}.bias": (d,)})
  return shapes


_BUFFERS = (".attn.bias", ".attn.masked_bias")  # old checkpoints' causal-mask buffers, not weights


def gpt2_from_tensors(config: GPT2Config, tensors: Mapping[str, np.ndarray],
                      dtype: Any = jnp.float32) -> tuple[GPT2, dict[str, Any]]:
  """`GPT2` and its params from transformers tensors, checked name by name and shape by shape.

  A ``GPT2Model`` checkpoint (OpenAI's ``gpt2``: names without ``transformer.``) is read as the
  ``GPT2LMHeadModel`` transformers builds from it; the causal-mask buffers of old checkpoints
  are skipped.

  Args:
    config: the model's config.
    tensors: the checkpoint's tensors by name (torch layout).
    dtype: the computation dtype.

  Raises:
    ValueError: a missing, unexpected or mis-shaped tensor (the message names it).
  """
  if not any(k.startswith("transformer.") for k in tensors):
    tensors = {f"transformer.{k}": v for k, v in tensors.items()}
  ignored = _BUFFERS + (("lm_head.weight",) if config.tie_word_embeddings else ())
  tensors = {k: v for k, v in tensors.items() if not k.endswith(ignored)}
  hf.check_tensors(hf_shapes(config), tensors)
  return GPT2(config, dtype), jax.tree.map(jnp.asarray, hf.params_from_tensors(tensors, GPT2_PATH_MAP))


def load_gpt2(directory: str, dtype: Any = jnp.float32) -> tuple[GPT2Config, GPT2, dict[str, Any]]:
  """``(config, model, params)`` from a transformers GPT-2 checkpoint directory.

  Args:
    directory: holds ``config.json`` and ``*.safetensors``.
    dtype: the computation dtype.

  Raises:
    ValueError: what `GPT2Config.from_hf` and `gpt2_from_tensors` refuse.
  """
  config = GPT2Config.from_hf(hf.read_config(directory))
  model, params = gpt2_from_tensors(config, hf.read_tensors(directory), dtype)
  return config, model, params


def save_gpt2(directory: str, params: Any, config: GPT2Config,
              files: Mapping[str, Callable[[str], object]] | None = None) -> None:
  """Write params (merge a LoRA first) as a checkpoint that ``GPT2LMHeadModel.from_pretrained``
  loads, with ``files`` beside it, as one unit (`lorax_jax.models.hf.save_hf_checkpoint`).

  Args:
    directory: where to write (refused as `lorax_jax.files.check_destination` refuses).
    params: `GPT2`'s params.
    config: their config.
    files: name -> ``write(path)`` of other files (a tokenizer).
  """
  hf.save_hf_checkpoint(directory, params, config.to_hf(), GPT2_PATH_MAP, files)
