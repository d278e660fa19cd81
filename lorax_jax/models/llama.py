"""A readable Flax Llama (grouped-query attention, RoPE, RMSNorm, SwiGLU) with a KV cache, and the
Llama-shaped families that differ from it in a few options: Llama 3.x, Qwen2/2.5, Qwen3, Mistral,
Gemma 2, Gemma 3 (text), Phi-3, Mixtral.

Module names mirror Hugging Face's ``LlamaForCausalLM`` (and ``Qwen2ForCausalLM``,
``Qwen3ForCausalLM``, ``MistralForCausalLM``, ``Gemma2ForCausalLM``, ``Gemma3ForCausalLM``,
``Phi3ForCausalLM``, ``MixtralForCausalLM``, which share them), so `LLAMA_PATH_MAP` is a one-to-one table (``params/model/layers_3/self_attn/q_proj/kernel`` <->
``model.layers.3.self_attn.q_proj.weight``). Every projection is an ``nn.Dense`` with an
``[in, out]`` kernel, so LoRA sees plain ``dot_general``\\ s; what each family adds:

- Llama 3.x: ``rope_scaling`` of type ``llama3`` (`RopeScaling`); ``attention_bias`` (q/k/v/o
  biases) and ``mlp_bias`` (gate/up/down biases) where a Llama config asks for them.
- Qwen2/2.5: q/k/v biases, no o bias (transformers' ``Qwen2Attention``); per-layer sliding windows.
- Qwen3: an RMSNorm over ``head_dim`` of each query and key head (``q_norm``/``k_norm``) before RoPE,
  an explicit ``head_dim``, ``attention_bias``; per-layer sliding windows.
- Mistral: a sliding window on every layer.
- Gemma 2: RMSNorms scaling by ``1 + w``, the embedding times ``sqrt(hidden_size)``, sandwich
  norms (``post_attention_layernorm`` on the attention's output, ``pre_feedforward_layernorm`` /
  ``post_feedforward_layernorm`` around the MLP), GELU (tanh) in the MLP, scores scaled by
  ``query_pre_attn_scalar^-1/2`` and soft-capped (``c tanh(s / c)``), soft-capped logits, sliding
  windows on alternate layers.
- Gemma 3 (text, ``gemma3_text``): Gemma 2's block with Qwen3's q/k norms (``1 + w`` norms here),
  no soft caps by default, and two RoPEs: sliding layers turn by ``rope_local_base_freq``, full
  layers by ``rope_theta`` with ``rope_scaling``.
- Phi-3 (and Phi-4-mini): fused projections, one ``qkv_proj`` (kernel ``[D, (H + 2 H_kv) head_dim]``,
  split into q, k, v after the matmul) and one ``gate_up_proj`` (``[D, 2 I]``, gate first), so a
  PEFT adapter on ``qkv_proj`` is one LoRA on the fused kernel, as in PEFT; RoPE on the first
  ``partial_rotary_factor`` of each head; Mistral's sliding window.
- Mixtral: Mistral's attention, and in place of the MLP a sparse mixture of experts
  (`SparseMoeBlock`): a router ``mlp.gate``, top-``num_experts_per_tok`` of ``num_local_experts``
  SwiGLU experts whose kernels are stacked ``[E, in, out]`` (``mlp.experts.gate_up_proj``,
  ``mlp.experts.down_proj``: transformers' in-memory names, `fuse_experts`) and applied with
  ``lax.ragged_dot``, so a LoRA on them (PEFT's ``target_parameters``) is per expert.

Calling convention::

    logits = model.apply(params, tokens)                       # [B, L] -> [B, L, V]
    cache = model.init_cache(batch, length)
    logits, cache = model.apply(params, tokens, positions, mask, cache=cache)
    h, _ = model.apply(params, tokens, method=Llama.hidden)       # final-norm states [B, L, D]
    logits = model.apply(params, h, method=Llama.logits)        # the LM head alone

The cache is an explicit pytree of fixed-size arrays (``k``/``v`` per layer
``[B, S, n_kv, head_dim]``, a ``[B, S]`` mask of filled, non-padding slots and the
next free slot ``index``); a call writes its ``L`` tokens at slots
``index .. index + L - 1``. Query slot ``i`` attends to key slot ``j`` when
``j <= i`` and slot ``j`` holds a real token (and, in a sliding-window layer of window ``w``,
``i - j < w``). Shapes never change, so a jitted decode step compiles once per ``(B, S)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax.config import LoraConfig
from lorax_jax.models import hf
from lorax_jax.pathmap import PathMap
from lorax_jax.qarray import QArray, is_quantized
from lorax_jax.targets import find_targets

Cache = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class _Family:
  """What a ``model_type`` changes: its transformers class, the ``config.json`` fields it reads
  beyond `_COMMON_FIELDS`, and what its architecture fixes whatever the config says."""

  architecture: str
  fields: frozenset[str]
  qkv_bias: bool = False  # q/k/v biases always (Qwen2), not by attention_bias
  qk_norm: bool = False  # RMSNorm of each query and key head before RoPE (Qwen3)
  fused: bool = False  # one qkv_proj and one gate_up_proj kernel (Phi-3)
  gemma: bool = False  # (1 + w) norms, sqrt(D)-scaled embedding, sandwich norms (Gemma 2)
  activation: str = "silu"  # the MLP's, transformers' name (config.json's hidden_act / hidden_activation)
  defaults: tuple[tuple[str, Any], ...] = ()  # transformers' defaults of config.json fields that change the math
  window_pattern: int | None = None  # Gemma: without layer_types, layer i slides unless (i + 1) % pattern == 0
  moe: bool = False  # a sparse mixture of experts (`SparseMoeBlock`) in place of the MLP (Mixtral)


_QWEN_WINDOWS = frozenset({"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"})
_GEMMA_FIELDS = frozenset({
    "hidden_activation", "attention_bias", "query_pre_attn_scalar", "sliding_window", "layer_types",
    "attn_logit_softcapping", "final_logit_softcapping", "use_bidirectional_attention"})
_GEMMA_DEFAULTS = (("head_dim", 256), ("tie_word_embeddings", True), ("query_pre_attn_scalar", 256),
                   ("sliding_window", 4096))
FAMILIES: dict[str, _Family] = {
    # rope_interleaved and is_llama_config: SmolLM2's (nanotron's) fields, which transformers ignores.
    "llama": _Family("LlamaForCausalLM", frozenset({"attention_bias", "mlp_bias", "pretraining_tp",
                                                    "rope_interleaved", "is_llama_config"})),
    "qwen2": _Family("Qwen2ForCausalLM", _QWEN_WINDOWS, qkv_bias=True),
    "qwen3": _Family("Qwen3ForCausalLM", _QWEN_WINDOWS | {"attention_bias"}, qk_norm=True),
    "mistral": _Family("MistralForCausalLM", frozenset({"sliding_window"})),
    # original_max_position_embeddings: read by Phi-3's longrope RoPE only, which is refused.
    "gemma2": _Family("Gemma2ForCausalLM", _GEMMA_FIELDS, gemma=True, activation="gelu_pytorch_tanh",
                      window_pattern=2, defaults=_GEMMA_DEFAULTS + (("attn_logit_softcapping", 50.0),
                                                                    ("final_logit_softcapping", 30.0))),
    "gemma3_text": _Family("Gemma3ForCausalLM", _GEMMA_FIELDS | {
        "rope_local_base_freq", "_sliding_window_pattern", "sliding_window_pattern"}, gemma=True, qk_norm=True,
        activation="gelu_pytorch_tanh", window_pattern=6,
        defaults=_GEMMA_DEFAULTS + (("rope_theta", 1e6), ("rope_local_base_freq", 10000.0))),
    "phi3": _Family("Phi3ForCausalLM", frozenset({"sliding_window", "partial_rotary_factor",
                                                  "original_max_position_embeddings"}), fused=True),
    # router_jitter_noise: training only in transformers; output_router_logits, router_aux_loss_coef:
    # the load-balancing loss, not the logits.
    "mixtral": _Family("MixtralForCausalLM", frozenset({
        "sliding_window", "num_local_experts", "num_experts_per_tok", "router_jitter_noise", "output_router_logits",
        "router_aux_loss_coef"}), moe=True, defaults=(("rope_theta", 1e6), ("num_local_experts", 8),
                                                       ("num_experts_per_tok", 2))),
}
"""The ``model_type``\\ s `LlamaConfig` implements."""

_COMMON_FIELDS = frozenset({  # the config.json fields every family reads
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_theta",
    "rope_scaling", "rope_parameters", "tie_word_embeddings", "max_position_embeddings"})
_ONLY = {  # config.json field -> the only value this model implements (beside the family's activation)
    "rope_interleaved": False,
    "is_encoder_decoder": False,
}
FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"  # the values of layer_types


_ROPE_KEYS = {  # RoPE type -> the keys of its rope_scaling dict beside rope_type (type) and rope_theta
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _check_rope_type(rope_type: str) -> None:
  if rope_type not in _ROPE_KEYS:
    raise ValueError(f"RoPE scaling rope_type={rope_type!r} is not implemented; only "
                     f"{', '.join(map(repr, _ROPE_KEYS))} are")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE's frequencies rescaled for long contexts: ``rope_scaling`` (``rope_parameters``) of
  ``config.json`` with a ``rope_type`` other than ``"default"``.

  - ``"linear"``: ``f_k / factor`` (positions divided by ``factor``).
  - ``"llama3"``: transformers' ``_compute_llama3_parameters``. With ``L`` =
    ``original_max_position_embeddings`` and the wavelength ``λ_k = 2π / f_k``: ``f_k`` where
    ``λ_k < L / high_freq_factor``; ``f_k / factor`` where ``λ_k > L / low_freq_factor``; between
    them ``(1 - s) f_k / factor + s f_k`` with ``s = (L / λ_k - low_freq_factor) /
    (high_freq_factor - low_freq_factor)``.
  """

  rope_type: str
  factor: float
  low_freq_factor: float | None = None
  high_freq_factor: float | None = None
  original_max_position_embeddings: int | None = None

  def __post_init__(self):
    _check_rope_type(self.rope_type)
    for name in _ROPE_KEYS["llama3"]:
      value = getattr(self, name)
      if (value is None) == (name in _ROPE_KEYS[self.rope_type]):
        raise ValueError(f"RopeScaling {self.rope_type!r} " + (f"lacks {name}" if value is None
                                                               else f"takes no {name} (got {value!r})"))
    if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
      raise ValueError(f"RopeScaling 'llama3' needs high_freq_factor > low_freq_factor, got "
                       f"high_freq_factor={self.high_freq_factor!r}, low_freq_factor={self.low_freq_factor!r}")

  @classmethod
  def from_hf(cls, rope: Mapping[str, Any], max_position_embeddings: int) -> RopeScaling | None:
    """From ``rope_scaling`` or ``rope_parameters``; None for ``"default"`` (plain RoPE).

    A key that is not one of the type's is an error naming it. As in transformers, llama3's
    ``original_max_position_embeddings`` defaults to ``max_position_embeddings``.
    """
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    _check_rope_type(rope_type)
    unknown = sorted(rope.keys() - {"rope_type", "type", "rope_theta", *_ROPE_KEYS[rope_type]})
    if unknown:
      raise ValueError(f"config.json's RoPE parameters of type {rope_type!r} have "
                       f"{', '.join(f'{k}={rope[k]!r}' for k in unknown)}, which this model does not implement")
    if rope_type == "default":
      return None
    values = {k: rope.get(k) for k in _ROPE_KEYS[rope_type]}
    if rope_type == "llama3" and values["original_max_position_embeddings"] is None:
      values["original_max_position_embeddings"] = max_position_embeddings
    return cls(rope_type, **values)

  def to_hf(self) -> dict[str, Any]:
    """The ``rope_scaling`` dict of ``config.json``."""
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

  def scale(self, freqs: np.ndarray) -> np.ndarray:
    """The rescaled inverse frequencies ``f_k`` (float32, as transformers computes them)."""
    if self.rope_type == "linear":
      return freqs / np.float32(self.factor)
    old_context = self.original_max_position_embeddings
    low_wavelen, high_wavelen = old_context / self.low_freq_factor, old_context / self.high_freq_factor
    wavelen = 2 * math.pi / freqs
    low = np.where(wavelen > low_wavelen, freqs / self.factor, freqs)
    smooth = (old_context / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
    smoothed = (1 - smooth) * low / self.factor + smooth * low
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, low).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The hyper-parameters of a Llama-family model; field names are those of Hugging Face's
  ``config.json`` (``model_type`` one of `FAMILIES`).

  ``sliding_window``: how far back a sliding-window layer attends (query slot ``i`` sees key slot
  ``j`` when ``i - j < sliding_window``; None: no layer slides). ``layer_types``: which layers
  slide (`SLIDING_ATTENTION`) and which see everything (`FULL_ATTENTION`); None: every layer
  slides when ``sliding_window`` is set (Mistral's rule). ``partial_rotary_factor`` (Phi-3): the
  share of each head RoPE turns. ``query_pre_attn_scalar``, ``attn_logit_softcapping``,
  ``final_logit_softcapping`` (Gemma 2): the scores' scale ``query_pre_attn_scalar^-1/2``, the
  scores' and the logits' soft caps (`soft_cap`). ``rope_local_base_freq`` (Gemma 3): the
  sliding layers' RoPE base (no scaling), the full layers' being ``rope_theta`` and ``rope_scaling``.
  A field a family does not read keeps its default.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 2048
  model_type: str = "llama"
  rope_scaling: RopeScaling | None = None
  attention_bias: bool = False
  mlp_bias: bool = False
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None
  partial_rotary_factor: float = 1.0
  query_pre_attn_scalar: float | None = None
  attn_logit_softcapping: float | None = None
  final_logit_softcapping: float | None = None
  rope_local_base_freq: float | None = None
  num_local_experts: int | None = None
  num_experts_per_tok: int | None = None

  def __post_init__(self):
    if self.model_type not in FAMILIES:
      raise ValueError(f"LlamaConfig: model_type={self.model_type!r} is not implemented; only "
                       f"{', '.join(map(repr, FAMILIES))} are")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"LlamaConfig: num_attention_heads={self.num_attention_heads} is not a multiple "
                       f"of num_key_value_heads={self.num_key_value_heads}")
    if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2:
      raise ValueError(f"LlamaConfig: RoPE turns the first int(head_dim * partial_rotary_factor) = "
                       f"{self.rotary_dim} features of each head (head_dim={self.head_dim}, "
                       f"partial_rotary_factor={self.partial_rotary_factor}), which must be even and positive")
    defaults = {f.name: f.default for f in dataclasses.fields(self)}
    for name in ("attention_bias", "mlp_bias", "sliding_window", "layer_types", "partial_rotary_factor",
                 "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "rope_local_base_freq",
                 "num_local_experts", "num_experts_per_tok"):
      value = getattr(self, name)
      if value != defaults[name] and name not in FAMILIES[self.model_type].fields:
        raise ValueError(f"LlamaConfig: {name}={value!r} is not an option of model_type={self.model_type!r}")
    if self.sliding_window is not None and not (isinstance(self.sliding_window, int) and self.sliding_window > 0):
      raise ValueError(f"LlamaConfig: sliding_window={self.sliding_window!r} must be a positive int or None")
    if self.layer_types is not None:
      if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= {
          FULL_ATTENTION, SLIDING_ATTENTION}:
        raise ValueError(f"LlamaConfig: layer_types={self.layer_types!r} must give {FULL_ATTENTION!r} or "
                         f"{SLIDING_ATTENTION!r} for each of the {self.num_hidden_layers} layers")
      if SLIDING_ATTENTION in self.layer_types and self.sliding_window is None:
        raise ValueError(f"LlamaConfig: layer_types={self.layer_types!r} has {SLIDING_ATTENTION!r} "
                         "layers but sliding_window is None")
    if self.moe and not (isinstance(self.num_local_experts, int) and isinstance(self.num_experts_per_tok, int)
                         and 1 <= self.num_experts_per_tok <= self.num_local_experts):
      raise ValueError(f"LlamaConfig: a {self.model_type!r} model needs 1 <= num_experts_per_tok <= "
                       f"num_local_experts, got num_experts_per_tok={self.num_experts_per_tok!r}, "
                       f"num_local_experts={self.num_local_experts!r}")

  @property
  def qkv_bias(self) -> bool:
    """Whether q/k/v projections have biases: ``attention_bias``, or always in Qwen2."""
    return self.attention_bias or FAMILIES[self.model_type].qkv_bias

  @property
  def rotary_dim(self) -> int:
    """How many leading features of each query and key head RoPE turns (transformers' rule)."""
    return int(self.head_dim * self.partial_rotary_factor)

  @property
  def fused(self) -> bool:
    """Whether q/k/v are one ``qkv_proj`` and gate/up one ``gate_up_proj`` (Phi-3)."""
    return FAMILIES[self.model_type].fused

  @property
  def moe(self) -> bool:
    """Whether each layer's MLP is a sparse mixture of experts (`SparseMoeBlock`, Mixtral)."""
    return FAMILIES[self.model_type].moe

  @property
  def gemma(self) -> bool:
    """Gemma's ``(1 + w)`` norms, ``sqrt(hidden_size)``-scaled embedding and sandwich norms."""
    return FAMILIES[self.model_type].gemma

  @property
  def attention_scale(self) -> float:
    """The scores' factor: ``query_pre_attn_scalar^-1/2`` where set, else ``head_dim^-1/2``."""
    return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

  @property
  def qk_norm(self) -> bool:
    """Whether each query and key head is RMS-normalised over ``head_dim`` before RoPE (Qwen3)."""
    return FAMILIES[self.model_type].qk_norm

  def layer_window(self, i: int) -> int | None:
    """Layer ``i``'s sliding window, None when it attends to every earlier slot."""
    slides = self.layer_types is None or self.layer_types[i] == SLIDING_ATTENTION
    return self.sliding_window if slides else None

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> LlamaConfig:
    """From a Hugging Face ``config.json`` dict; options this model does not implement are errors.

    ``model_type`` defaults to ``"llama"``. A field that is neither read by the family
    (`FAMILIES`, `_COMMON_FIELDS`) nor one that leaves the logits alone (`hf.NEUTRAL_FIELDS`) is an
    error naming it, as is a value other than the one implemented (``hidden_act`` the family's:
    ``silu``, Gemma's ``gelu_pytorch_tanh``). A field absent from the config takes transformers'
    default for the family (Gemma 2's soft caps, window, ``head_dim``). Qwen's windows are
    transformers': with ``use_sliding_window``, layers ``i >= max_window_layers`` slide unless
    ``layer_types`` says which; Gemma's layers slide but every ``sliding_window_pattern``-th (2 in
    Gemma 2, 6 in Gemma 3) unless ``layer_types`` says which.
    """
    model_type = config.get("model_type", "llama")
    if model_type not in FAMILIES:
      raise ValueError(f"config.json has model_type={model_type!r}; only {', '.join(map(repr, FAMILIES))} "
                       "are supported")
    family = FAMILIES[model_type]
    config = {**dict(family.defaults), **config}
    unknown = sorted(config.keys() - _COMMON_FIELDS - hf.NEUTRAL_FIELDS - FAMILIES[model_type].fields)
    if unknown:
      fields = ", ".join(f"{k}={config[k]!r}" for k in unknown)
      raise ValueError(f"config.json of a {model_type!r} model has {fields}, which this model does not implement")
    only = {**_ONLY, "hidden_act": family.activation, "hidden_activation": family.activation}
    for key, supported in only.items():
      if config.get(key, supported) != supported:
        raise ValueError(f"config.json of a {model_type!r} model has {key}={config[key]!r}; only {supported!r} "
                         "is supported")
    if config.get("use_bidirectional_attention"):
      raise ValueError(f"config.json of a {model_type!r} model has use_bidirectional_attention="
                       f"{config['use_bidirectional_attention']!r} (an encoder); only causal attention is implemented")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in config]
    if missing:
      raise ValueError(f"config.json lacks {', '.join(missing)}")
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    local_theta = None
    if "rope_local_base_freq" in family.fields:  # Gemma 3: sliding layers' RoPE apart
      rope, local_theta = _local_rope(config, rope)
    partial = config.get("partial_rotary_factor", 1.0)  # top level (Phi-4-mini) or in the RoPE dict (Phi-3)
    if "partial_rotary_factor" in FAMILIES[model_type].fields:
      partial = rope.pop("partial_rotary_factor", partial)
    heads, layers = config["num_attention_heads"], config["num_hidden_layers"]
    max_positions = config.get("max_position_embeddings", 2048)
    sliding_window, layer_types = config.get("sliding_window"), None
    if "use_sliding_window" in FAMILIES[model_type].fields:  # Qwen
      sliding_window = sliding_window if config.get("use_sliding_window", False) else None
      layer_types = tuple(config.get("layer_types") or (
          SLIDING_ATTENTION if sliding_window is not None and i >= config.get("max_window_layers", 28)
          else FULL_ATTENTION for i in range(layers)))
    elif family.window_pattern:  # Gemma
      pattern = config.get("_sliding_window_pattern") or config.get("sliding_window_pattern") or family.window_pattern
      layer_types = tuple(config.get("layer_types") or (
          SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION for i in range(layers)))
    if layer_types is not None and (set(layer_types) == {SLIDING_ATTENTION} or (
        sliding_window is None and SLIDING_ATTENTION not in layer_types)):
      layer_types = None  # every layer alike: sliding_window alone says how
    return cls(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
        tie_word_embeddings=config.get("tie_word_embeddings", False),
        max_position_embeddings=max_positions, model_type=model_type,
        rope_scaling=RopeScaling.from_hf(rope, max_positions),
        attention_bias=config.get("attention_bias", False), mlp_bias=config.get("mlp_bias", False),
        sliding_window=sliding_window, layer_types=layer_types, partial_rotary_factor=partial,
        rope_local_base_freq=local_theta,
        num_local_experts=config.get("num_local_experts"), num_experts_per_tok=config.get("num_experts_per_tok"),
        **{k: config.get(k) for k in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping")})

  def to_hf(self) -> dict[str, Any]:
    """A ``config.json`` dict that transformers' class of this ``model_type`` loads (`from_hf`'s inverse)."""
    family = FAMILIES[self.model_type]
    # pad_token_id None: a padding row changes no logits, and Phi-3's default (32000) would lie
    # outside a smaller vocabulary, which transformers refuses.
    out = {"architectures": [family.architecture], "pad_token_id": None,
           **{k: family.activation for k in ("hidden_act", "hidden_activation") if k in _COMMON_FIELDS | family.fields},
           **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
              if f.name in _COMMON_FIELDS | family.fields},
           "rope_scaling": self.rope_scaling and self.rope_scaling.to_hf()}
    if "layer_types" in family.fields:  # every layer's type, as transformers writes them
      out["layer_types"] = [FULL_ATTENTION if self.layer_window(i) is None else SLIDING_ATTENTION
                            for i in range(self.num_hidden_layers)]
    if "use_sliding_window" in family.fields:  # Qwen
      out["use_sliding_window"] = self.sliding_window is not None
    return out


def _local_rope(config: Mapping[str, Any], rope: dict[str, Any]) -> tuple[dict[str, Any], float]:
  """Gemma 3's ``(full layers' RoPE dict, sliding layers' theta)`` from ``rope_parameters`` per
  layer type, or from ``rope_scaling``, ``rope_theta`` and ``rope_local_base_freq``."""
  if {"full_attention", "sliding_attention"} & rope.keys():
    unknown = sorted(rope.keys() - {"full_attention", "sliding_attention"})
    if unknown:
      raise ValueError(f"config.json's rope_parameters has {', '.join(unknown)} beside its layer types")
    local = dict(rope.get("sliding_attention") or {})
    rope = {"rope_theta": config["rope_theta"], **(rope.get("full_attention") or {})}
  else:
    local = {"rope_theta": config["rope_local_base_freq"]}
    rope = {"rope_theta": config["rope_theta"], **rope}
  rope_type = local.get("rope_type", local.get("type", "default"))
  if rope_type != "default" or local.keys() - {"rope_type", "type", "rope_theta"}:
    raise ValueError(f"config.json's sliding layers' RoPE {local!r} is not implemented; only a plain "
                     "rope_theta is")
  return rope, local.get("rope_theta", config["rope_local_base_freq"])


def rotate_half(x: jax.Array) -> jax.Array:
  """Hugging Face's RoPE convention: ``[x1, x2] -> [-x2, x1]`` over the last axis halves."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def rope(x: jax.Array, positions: jax.Array, theta: float, scaling: RopeScaling | None = None,
         rotary_dim: int | None = None) -> jax.Array:
  """Rotary embedding of ``x [B, L, H, D]`` at ``positions [B, L]``.

  ``x cos(p f) + rotate_half(x) sin(p f)`` with ``f_k = theta^(-2k/D)`` (``k < D/2``, rescaled by
  `RopeScaling.scale` when given) repeated over both halves. The ``f_k`` are constants computed
  in float32 as transformers computes them. With ``rotary_dim`` (partial RoPE) only the first
  ``rotary_dim`` features turn, ``D`` being ``rotary_dim``; the rest pass unchanged.
  """
  if rotary_dim is not None and rotary_dim < x.shape[-1]:
    return jnp.concatenate([rope(x[..., :rotary_dim], positions, theta, scaling), x[..., rotary_dim:]], axis=-1)
  d = x.shape[-1]
  freqs = 1.0 / np.float32(theta) ** (np.arange(0, d, 2).astype(np.float32) / np.float32(d))
  if scaling is not None:
    freqs = scaling.scale(freqs)
  angles = positions.astype(jnp.float32)[..., None] * freqs          # [B, L, D/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, L, 1, D]
  xf = x.astype(jnp.float32)
  return (xf * jnp.cos(angles) + rotate_half(xf) * jnp.sin(angles)).astype(x.dtype)


class RMSNorm(nn.Module):
  """``weight * x / sqrt(mean(x^2) + eps)``, computed in float32; with ``offset`` (Gemma)
  ``(1 + weight) * x / sqrt(mean(x^2) + eps)``, all in float32, ``weight`` starting at 0."""

  eps: float
  offset: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.zeros if self.offset else nn.initializers.ones
    weight = self.param("weight", init, (x.shape[-1],))
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    if self.offset:
      return (y * (1 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight * y.astype(x.dtype)


def _norm(config: LlamaConfig, name: str | None = None) -> RMSNorm:
  return RMSNorm(config.rms_norm_eps, config.gemma, name=name)


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
  """``cap · tanh(x / cap)`` (Gemma's soft-capping of scores and logits); ``x`` where ``cap`` is None."""
  return x if cap is None else cap * jnp.tanh(x / cap)


def _dense(features: int, dtype: Any, name: str, bias: bool = False) -> nn.Dense:
  return nn.Dense(features, use_bias=bias, dtype=dtype, name=name)


class Attention(nn.Module):
  """Grouped-query self-attention: query head ``h`` reads key/value head ``h // (H / H_kv)``.

  ``q = rope(q_norm(x Wq + bq))``, ``k = rope(k_norm(x Wk + bk))``, ``v = x Wv + bv``, ``out =
  softmax(q kᵀ / sqrt(head_dim) + mask) v Wo + bo``: biases where `LlamaConfig.qkv_bias` and
  ``attention_bias`` say, the per-head RMSNorms where `LlamaConfig.qk_norm` does. Fused
  (`LlamaConfig.fused`): ``[q, k, v] = x Wqkv``, one kernel split after the matmul.
  """

  config: LlamaConfig
  dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    if c.fused:
      self.qkv_proj = _dense(q + 2 * kv, self.dtype, "qkv_proj")
    else:
      self.q_proj = _dense(q, self.dtype, "q_proj", c.qkv_bias)
      self.k_proj = _dense(kv, self.dtype, "k_proj", c.qkv_bias)
      self.v_proj = _dense(kv, self.dtype, "v_proj", c.qkv_bias)
    self.o_proj = _dense(c.hidden_size, self.dtype, "o_proj", c.attention_bias)
    if c.qk_norm:
      self.q_norm, self.k_norm = _norm(c), _norm(c)

  def __call__(self, x: jax.Array, positions: jax.Array, key_mask: jax.Array, index: jax.Array,
               cache: Cache | None, window: int | jax.Array | None = None) -> tuple[jax.Array, Cache | None]:
    """``window``: query slot ``i`` sees key slot ``j`` only when ``i - j < window`` (None: no limit)."""
    c = self.config
    b, l, _ = x.shape
    q_size = c.num_attention_heads * c.head_dim
    if c.fused:
      q, k, v = jnp.split(self.qkv_proj(x), [q_size, q_size + c.num_key_value_heads * c.head_dim], axis=-1)
    else:
      q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    q = q.reshape(b, l, c.num_attention_heads, c.head_dim)
    k = k.reshape(b, l, c.num_key_value_heads, c.head_dim)
    v = v.reshape(b, l, c.num_key_value_heads, c.head_dim)
    if c.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = (self._rope(y, positions, window) for y in (q, k))
    out, cache = attend(q, k, v, key_mask, index, cache, c.attention_scale, window, c.attn_logit_softcapping)
    return self.o_proj(out.astype(x.dtype)), cache


  def _rope(self, y: jax.Array, positions: jax.Array, window: int | jax.Array | None) -> jax.Array:
    """The layer's RoPE: ``rope_local_base_freq`` without scaling in a sliding layer where the config
    has one (Gemma 3), else ``rope_theta`` and ``rope_scaling``. A scanned window (an array) is
    `NO_WINDOW` in full layers."""
    c = self.config
    full = rope(y, positions, c.rope_theta, c.rope_scaling, c.rotary_dim)
    if c.rope_local_base_freq is None or window is None:
      return full
    local = rope(y, positions, c.rope_local_base_freq, None, c.rotary_dim)
    return local if isinstance(window, int) else jnp.where(window < NO_WINDOW, local, full)


NO_WINDOW = int(np.iinfo(np.int32).max)
"""A full layer's window where the layers' windows are scanned data (`LlamaModel`)."""


def attend(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array, index: jax.Array,
           cache: Cache | None, scale: float, window: int | jax.Array | None = None,
           softcap: float | None = None) -> tuple[jax.Array, Cache | None]:
  """Causal grouped-query attention of the ``L`` new tokens, written at cache slots ``index ..
  index + L - 1``: ``softmax(soft_cap(scale · q kᵀ) + mask) v`` flattened to ``[B, L, H · head_dim]``, and
  the cache with ``k``, ``v`` written in (None without one).

  Args:
    q: queries ``[B, L, H, head_dim]``; head ``h`` reads key/value head ``h // (H / H_kv)``.
    k: keys ``[B, L, H_kv, head_dim]``.
    v: values ``[B, L, H_kv, head_dim]``.
    key_mask: ``[B, S]``, True on the slots holding real tokens (``S`` = ``L`` without a cache).
    index: the first new token's slot.
    cache: this layer's ``{"k", "v"}`` (``[B, S, H_kv, head_dim]``), or None.
    scale: the scores' factor (``1 / sqrt(head_dim)`` usually).
    window: query slot ``i`` sees key slot ``j`` only when ``i - j < window`` (None: no limit).
    softcap: the scores' soft cap (`soft_cap`; None: none).
  """
  b, l, heads, head_dim = q.shape
  if cache is not None:
    k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, index, 0, 0))
    v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, index, 0, 0))
    cache = {"k": k, "v": v}
  q = q.reshape(b, l, k.shape[2], heads // k.shape[2], head_dim)
  scores = soft_cap(jnp.einsum("blhgd,bshd->bhgls", q, k.astype(q.dtype)) * scale, softcap)
  back = (index + jnp.arange(l))[:, None] - jnp.arange(k.shape[1])[None, :]  # query slot - key slot
  causal = back >= 0 if window is None else (back >= 0) & (back < window)
  allowed = key_mask[:, None, None, None, :] & causal
  scores = jnp.where(allowed, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhgls,bshd->blhgd", probs, v).reshape(b, l, heads * head_dim), cache


class MLP(nn.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))`` (Gemma: GELU with tanh for silu), each projection with
  a bias where ``mlp_bias``; fused
  (`LlamaConfig.fused`): ``[gate, up] = x W_gate_up``, one kernel split after the matmul."""

  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    if c.fused:
      gate, up = jnp.split(_dense(2 * c.intermediate_size, self.dtype, "gate_up_proj")(x), 2, axis=-1)
    else:
      gate = _dense(c.intermediate_size, self.dtype, "gate_proj", c.mlp_bias)(x)
      up = _dense(c.intermediate_size, self.dtype, "up_proj", c.mlp_bias)(x)
    act = functools.partial(nn.gelu, approximate=True) if c.gemma else nn.silu
    return _dense(c.hidden_size, self.dtype, "down_proj", c.mlp_bias)(act(gate) * up)


class Experts(nn.Module):
  """A layer's experts, each a SwiGLU ``down_e(silu(gate_e(x)) * up_e(x))``, their kernels stacked:
  ``gate_up_proj [E, D, 2 I]`` (gate then up, split after the matmul) and ``down_proj [E, I, D]``
  (transformers' ``MixtralExperts``, ``[in, out]`` per expert).

  ``x [T, D]``, ``experts [T, k]`` and ``weights [T, k]``: token ``t`` goes to experts
  ``experts[t]``, its outputs summed with ``weights[t]``. The ``T k`` (token, expert) rows are sorted
  by expert and each kernel is one ``lax.ragged_dot`` over the groups, so a LoRA on a stacked kernel
  is factored by the engine's ``ragged_dot`` rule (per-expert factors, an ``"sio"`` layout).
  """

  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, experts: jax.Array, weights: jax.Array) -> jax.Array:
    c = self.config
    e, d, i = c.num_local_experts, c.hidden_size, c.intermediate_size
    init = nn.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=(0,))
    gate_up = jnp.asarray(self.param("gate_up_proj", init, (e, d, 2 * i)), self.dtype)
    down = jnp.asarray(self.param("down_proj", init, (e, i, d)), self.dtype)
    k = experts.shape[1]
    order = jnp.argsort(experts.reshape(-1), stable=True)  # the (token, expert) rows grouped by expert
    tokens = order // k
    sizes = jnp.bincount(experts.reshape(-1), length=e).astype(jnp.int32)
    gate, up = jnp.split(jax.lax.ragged_dot(x[tokens].astype(self.dtype), gate_up, sizes), 2, axis=-1)
    out = jax.lax.ragged_dot(nn.silu(gate) * up, down, sizes)
    out = out * weights.reshape(-1)[order][:, None].astype(out.dtype)
    return jnp.zeros(x.shape, out.dtype).at[tokens].add(out)


class SparseMoeBlock(nn.Module):
  """transformers' ``MixtralSparseMoeBlock``: the router ``gate`` (``[D, E]``, no bias) scores the
  experts, ``p = softmax(x W_gate)`` in float32; each token goes to its ``k`` =
  ``num_experts_per_tok`` most probable experts with weights ``p_top / Σ p_top`` (`Experts`)."""

  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    flat = x.reshape(-1, x.shape[-1])
    probs = jax.nn.softmax(_dense(c.num_local_experts, self.dtype, "gate")(flat).astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, c.num_experts_per_tok)
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Experts(c, self.dtype, name="experts")(flat, experts, weights).astype(x.dtype).reshape(x.shape)


def _mlp(config: LlamaConfig, dtype: Any) -> nn.Module:
  """The layer's ``mlp``: `SparseMoeBlock` in a mixture of experts, else `MLP`."""
  return (SparseMoeBlock if config.moe else MLP)(config, dtype, name="mlp")


class DecoderLayer(nn.Module):
  """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``. Gemma's sandwich: ``x +
  post_attention_layernorm(attn(input_layernorm(x)))``, then ``x +
  post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))``."""

  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, key_mask, index, cache, window=None):
    c = self.config
    h, cache = Attention(c, self.dtype, name="self_attn")(
        _norm(c, "input_layernorm")(x), positions, key_mask, index, cache, window)
    if c.gemma:
      x = x + _norm(c, "post_attention_layernorm")(h)
      return x + _norm(c, "post_feedforward_layernorm")(
          _mlp(c, self.dtype)(_norm(c, "pre_feedforward_layernorm")(x))), cache
    x = x + h
    return x + _mlp(c, self.dtype)(_norm(c, "post_attention_layernorm")(x)), cache


class LlamaModel(nn.Module):
  """Embedding, ``num_hidden_layers`` decoder layers (``layers_{i}``) and a final norm.

  With ``scan_layers`` the layers run as one ``jax.lax.scan`` over their params stored stacked:
  one subtree ``layers`` whose leaves have a leading axis of ``num_hidden_layers``
  (`stack_layers` of the per-layer tree that ``init`` and the loaders give), so XLA compiles one
  layer instead of ``num_hidden_layers`` copies and a jitted step takes the stacked weights as they
  are (no per-call stacking; the small cache stays per layer). Each iteration slices its layer
  out of the stack, which XLA's CPU backend does by copying the layer's weights: about 0.2 s of
  the main job's 2 s step, the price of compiling one layer (BENCHMARKS.md). With
  ``remat`` each layer is a ``jax.checkpoint``: the backward pass keeps only the layers' inputs
  and recomputes each layer's activations from its input (the same numbers, about one more
  forward pass of work, a fraction of the activation memory with ``scan_layers``; unrolled, XLA's
  CPU backend schedules the recomputation early and saves little).
  """

  config: LlamaConfig
  dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  def setup(self):
    c = self.config
    self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype,
                                 embedding_init=nn.initializers.normal(0.02))
    layer = nn.remat(DecoderLayer) if self.remat else DecoderLayer
    self.layers = [layer(c, self.dtype) for _ in range(c.num_hidden_layers)]
    self.norm = _norm(c)

  def embed(self, tokens: jax.Array) -> jax.Array:
    """``embed_tokens(tokens)``, times ``sqrt(hidden_size)`` (in the embedding's dtype) for Gemma."""
    x = self.embed_tokens(tokens)
    return x * jnp.asarray(self.config.hidden_size ** 0.5, x.dtype) if self.config.gemma else x

  def __call__(self, tokens, positions, key_mask, index, cache):
    def step(layer, x, layer_cache):  # one pass of x through a layer, its cache slot updated
      return layer(x, positions, key_mask, index, layer_cache)

    per_layer = None if cache is None else {k: v for k, v in cache.items() if k.startswith("layers_")}
    x, new_cache = self._layers(step, self.embed(tokens), per_layer)
    return self.norm(x), new_cache or {}

  def after_prefix(self, prefix: jax.Array, tokens: jax.Array) -> jax.Array:
    """Final-norm hidden states ``[B, R, D]`` of ``tokens [B, R]``, each row continuing ``prefix [1, P]``.

    What `Llama.hidden` gives for ``concat(prefix, tokens[b])`` at the rows' positions, with the
    prefix run once: in every layer the prefix's states (batch 1) come first, then its keys and
    values are broadcast to the rows, which attend to them and to their own earlier tokens. One
    pass over the layers (one scan with ``scan_layers``), so each layer's weights are read once.

    Raises:
      ValueError: ``prefix`` is not one row ``[1, P]`` or ``tokens`` not ``[B, R]``.
    """
    if prefix.ndim != 2 or prefix.shape[0] != 1 or tokens.ndim != 2:
      raise ValueError(f"after_prefix: expected prefix [1, P] and tokens [B, R], got shapes {prefix.shape} "
                       f"and {tokens.shape}")
    c = self.config
    (b, r), p = tokens.shape, prefix.shape[1]
    shape = (1, p + r, c.num_key_value_heads, c.head_dim)
    empty = {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}
    zero, start = jnp.asarray(0, jnp.int32), jnp.asarray(p, jnp.int32)
    prefix_positions, row_positions = jnp.arange(p)[None], jnp.broadcast_to(p + jnp.arange(r), (b, r))
    prefix_mask, row_mask = jnp.ones((1, p + r), bool), jnp.ones((b, p + r), bool)

    def step(layer, carry, _):
      xp, xr = carry
      xp, cache = layer(xp, prefix_positions, prefix_mask, zero, empty)
      cache = jax.tree.map(lambda x: jnp.broadcast_to(x, (b, *x.shape[1:])), cache)
      xr, _ = layer(xr, row_positions, row_mask, start, cache)
      return (xp, xr), None

    (_, x), _ = self._layers(step, (self.embed(prefix), self.embed(tokens)), None)
    return self.norm(x)

  def _layers(self, step, carry, cache):
    """``carry, out_i = step(layer_i, carry, cache_i)`` over the layers; ``(carry, {layers_i: out_i})``.

    ``layer_i(x, positions, key_mask, index, cache)`` is decoder layer ``i`` with its params and
    sliding window (`LlamaConfig.layer_window`). With ``scan_layers`` one scan over the stacked
    params (and ``cache``'s slots, stacked per call; the windows too where layers differ in them)."""
    if self.is_initializing():  # init creates the per-layer tree, scanned or not
      return self._unrolled(step, carry, cache)
    stacked = STACKED in self.variables["params"]
    if stacked != self.scan_layers:
      helper = "stack_layers" if self.scan_layers else "unstack_layers"
      raise ValueError(
          f"Llama(scan_layers={self.scan_layers}) got its layers' params "
          f"{'stacked (params/model/layers)' if stacked else 'per layer (params/model/layers_{i})'}: "
          f"convert them once with lorax_jax.models.llama.{helper}(params)")
    if not self.scan_layers:
      return self._unrolled(step, carry, cache)
    layer = DecoderLayer(self.config, self.dtype, parent=None)
    windows = [self.config.layer_window(i) for i in range(self.config.num_hidden_layers)]
    # One window for every layer stays static; else each layer's is scanned (no limit: int32's max).
    layer_windows = None if len(set(windows)) == 1 else jnp.asarray(
        [NO_WINDOW if w is None else w for w in windows], jnp.int32)

    def body(carry, slices):
      p, layer_cache, window = slices
      return step(functools.partial(layer.apply, {"params": p}, window=windows[0] if window is None else window),
                  carry, layer_cache)

    if self.remat:
      body = jax.checkpoint(body)
    carry, out = jax.lax.scan(body, carry, (self.variables["params"][STACKED],
                                            None if cache is None else stack_layers(cache)[STACKED],
                                            layer_windows))
    return carry, None if out is None else unstack_layers({STACKED: out})

  def _unrolled(self, step, carry, cache):
    out = {}
    for i, layer in enumerate(self.layers):
      name = f"layers_{i}"
      carry, out[name] = step(functools.partial(layer, window=self.config.layer_window(i)), carry,
                              None if cache is None else cache[name])
    return carry, out


class Llama(nn.Module):
  """Causal language model; ``__call__`` returns logits, or ``(logits, new_cache)`` given a cache.

  ``scan_layers`` and ``remat`` change how the layers run, not what they compute (see `LlamaModel`).
  """

  config: LlamaConfig
  dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  def setup(self):
    self.model = LlamaModel(self.config, self.dtype, self.scan_layers, self.remat)
    if not self.config.tie_word_embeddings:
      self.lm_head = _dense(self.config.vocab_size, self.dtype, "lm_head")

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, mask: jax.Array | None = None,
               cache: Cache | None = None) -> jax.Array | tuple[jax.Array, Cache]:
    """Logits ``[B, L, V]`` for ``tokens [B, L]``: ``logits(hidden(...))``; see `hidden` for the args."""
    h, new_cache = self.hidden(tokens, positions, mask, cache)
    logits = self.logits(h)
    return logits if cache is None else (logits, new_cache)

  def hidden(self, tokens: jax.Array, positions: jax.Array | None = None, mask: jax.Array | None = None,
             cache: Cache | None = None) -> tuple[jax.Array, Cache | None]:
    """The final-norm hidden states ``[B, L, D]`` of ``tokens [B, L]`` and the new cache (None without one).

    Args:
      tokens: token ids.
      positions: RoPE positions ``[B, L]``; default ``index + arange(L)`` (``index`` = 0 without a cache).
      mask: ``[B, L]``, False for padding tokens no other token may attend to; default all True.
      cache: from `init_cache` or a previous call; the tokens are appended at its ``index``.
    """
    positions, key_mask, index = cache_inputs(tokens, positions, mask, cache)
    h, layers = self.model(tokens, positions, key_mask, index, cache)
    return h, None if cache is None else {"index": index + tokens.shape[1], "mask": key_mask, **layers}

  def after_prefix(self, prefix: jax.Array, tokens: jax.Array) -> jax.Array:
    """``hidden(concat(prefix, row))`` at the rows' positions for every row of ``tokens [B, R]``,
    the shared ``prefix [1, P]`` run once: `LlamaModel.after_prefix`."""
    return self.model.after_prefix(prefix, tokens)

  def logits(self, h: jax.Array) -> jax.Array:
    """The LM head: ``h · Eᵀ`` with tied embeddings ``E``, else ``lm_head(h)``, soft-capped where
    ``final_logit_softcapping`` says (Gemma); ``[..., D] -> [..., V]``."""
    logits = self.model.embed_tokens.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)
    return soft_cap(logits, self.config.final_logit_softcapping)

  def init_cache(self, batch: int, length: int, dtype: Any = None) -> Cache:
    """An empty cache of ``length`` slots for ``batch`` sequences."""
    c = self.config
    return empty_cache(batch, length, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, dtype or self.dtype)


def cache_inputs(tokens: jax.Array, positions: jax.Array | None, mask: jax.Array | None, cache: Cache | None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(positions, key_mask, index)`` of a call on ``tokens [B, L]``: the positions (default
  ``index + arange(L)``), the ``[B, S]`` mask of the slots holding real tokens once these are
  written at ``index`` (the cache's next free slot, 0 without a cache), and ``index``.

  Args:
    tokens: token ids ``[B, L]``.
    positions: ``[B, L]`` or None.
    mask: ``[B, L]``, False for padding tokens no other token may attend to; None: all True.
    cache: from `empty_cache` or a previous call, or None.
  """
  b, l = tokens.shape
  index = jnp.asarray(0, jnp.int32) if cache is None else cache["index"]
  if positions is None:
    positions = jnp.broadcast_to(index + jnp.arange(l), (b, l))
  mask = jnp.ones((b, l), bool) if mask is None else mask.astype(bool)
  key_mask = mask if cache is None else jax.lax.dynamic_update_slice(cache["mask"], mask, (0, index))
  return positions, key_mask, index


def empty_cache(batch: int, length: int, layers: int, kv_heads: int, head_dim: int, dtype: Any) -> Cache:
  """A cache of ``length`` empty slots for ``batch`` sequences: ``k``/``v`` per layer (``layers_{i}``,
  ``[batch, length, kv_heads, head_dim]``), the ``[batch, length]`` mask of filled slots and ``index`` 0."""
  shape = (batch, length, kv_heads, head_dim)
  per_layer = {f"layers_{i}": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for i in range(layers)}
  return {"index": jnp.asarray(0, jnp.int32), "mask": jnp.zeros((batch, length), bool), **per_layer}


STACKED = "layers"
"""The key of the stacked layers' subtree (`stack_layers`), beside ``embed_tokens`` and ``norm``."""


def stack_layers(tree: Any) -> Any:
  """The tree with every run of ``layers_0 .. layers_{n-1}`` replaced by one subtree ``layers`` whose
  leaves are the layers' leaves stacked on a new leading axis: ``layers[k][i] = layers_i[k]``.

  What `Llama` with ``scan_layers`` takes (its LoRA config: `stack_config`). It works on any tree
  that mirrors the params: the params, a LoRA tree (the factors ``a [r, in]``, ``b [r, out]`` of
  layer ``i`` become slice ``i`` of ``a [n, r, in]``, ``b [n, r, out]``: the ``"sio"`` layout of a
  stacked kernel), an optimizer state, a cache. A quantized kernel (`lorax_jax.QArray`)
  stacks its stored arrays.
  One copy, made once, outside any jitted step. `unstack_layers` is its inverse.

  Raises:
    ValueError: the layer numbers are not ``0 .. n-1``, or the layers' trees, shapes or quantized
      formats differ (the message names the first such leaf).
  """
  return jax.tree.map(_stack_node, tree, is_leaf=_is_per_layer)


def unstack_layers(tree: Any) -> Any:
  """The per-layer tree (``layers_0 .. layers_{n-1}``) of `stack_layers`'s ``layers``: its inverse,
  for what reads the layers by name (adapter files, checkpoints, the unrolled model). The number
  of layers is the stacked leaves' leading size, shared by every ``layers`` subtree (one without
  arrays, like an optimizer's masked state, is repeated per layer).

  Raises:
    ValueError: the stacked leaves differ in leading size.
  """
  nodes = [node for node in jax.tree.leaves(tree, is_leaf=_is_stacked) if _is_stacked(node)]
  sizes = {x.shape[0] for node in nodes for x in jax.tree.leaves(node[STACKED], is_leaf=is_quantized)}
  if nodes and len(sizes) != 1:
    raise ValueError(f"unstack_layers: the stacked leaves have leading sizes {sorted(sizes)}, "
                     "not one layer count")
  return jax.tree.map(functools.partial(_unstack_node, n=min(sizes, default=0)), tree, is_leaf=_is_stacked)


def stack_config(cfg: LoraConfig, params: Any) -> LoraConfig:
  """``cfg`` for `stack_layers` of the per-layer ``params``: the same targets with the same rank,
  alpha and factors, named by their stacked paths.

  ``targets`` lists each target's exact path (so a rule that reads shapes, like ``all-linear``,
  cannot pick up a stacked norm), ``rank_pattern`` and ``alpha_pattern`` give each its ``r`` and
  ``alpha``, and ``kernel_axes`` its layout (`Target.axes`), a layer target's with the stack axis
  first (``"io"`` -> ``"sio"``).

  Raises:
    ValueError: ``cfg.layers_to_transform`` is set (some layers only: train them unrolled).
  """
  if cfg.layers_to_transform is not None:
    raise ValueError(f"stack_config: LoraConfig.layers_to_transform={cfg.layers_to_transform} adapts some "
                     "layers only, which stacked factors cannot hold: run without scan_layers")

  targets = {}  # stacked path (a regex matching it alone) -> its layout and one layer's target
  for path, t in find_targets(params, cfg).items():
    layered = any(_LAYER_KEY.fullmatch(k) for k in path)
    name = re.escape("/".join(STACKED if _LAYER_KEY.fullmatch(k) else k for k in path))
    targets[name] = ("s" if layered else "") + t.axes, t
  return cfg.replace(targets=list(targets), exclude=None,
                     rank_pattern={k: t.rank for k, (_, t) in targets.items()},
                     alpha_pattern={k: t.alpha for k, (_, t) in targets.items()},
                     kernel_axes={k: axes for k, (axes, _) in targets.items()})


_LAYER_KEY = re.compile(r"layers_\d+")


def _is_per_layer(node: Any) -> bool:
  return isinstance(node, Mapping) and any(isinstance(k, str) and _LAYER_KEY.fullmatch(k) for k in node)


def _is_stacked(node: Any) -> bool:
  return isinstance(node, Mapping) and isinstance(node.get(STACKED), Mapping)


def _stack_node(node: Any) -> Any:
  if not _is_per_layer(node):
    return node
  numbers = sorted(int(k[len("layers_"):]) for k in node if _LAYER_KEY.fullmatch(k))
  if numbers != list(range(len(numbers))):
    raise ValueError(f"stack_layers: layers {numbers} are not numbered 0..{len(numbers) - 1}")
  layers = [node[f"layers_{i}"] for i in numbers]
  structures = [jax.tree.structure(layer, is_leaf=is_quantized) for layer in layers]
  for i, structure in enumerate(structures):
    if structure != structures[0]:
      raise ValueError(f"stack_layers: layers_{i} holds {structure}, unlike layers_0's {structures[0]}")
  rest = {k: v for k, v in node.items() if not _LAYER_KEY.fullmatch(k)}
  stacked = jax.tree_util.tree_map_with_path(_stack_leaves, *layers, is_leaf=is_quantized)
  return {**rest, STACKED: stacked}


def _stack_leaves(path: Any, *xs: Any) -> Any:
  where = jax.tree_util.keystr(path)
  if is_quantized(xs[0]):
    meta = {(x.fmt, x.shape, x.dtype, x.block_size, x.axis) for x in xs}
    if len(meta) > 1:
      raise ValueError(f"stack_layers: the layers' quantized {where} differ in format or shape "
                       f"({sorted(map(str, meta))}); quantize them alike, or run without scan_layers")
    return QArray.stack(xs)
  shapes = {np.shape(x) for x in xs}
  if len(shapes) > 1:
    raise ValueError(f"stack_layers: the layers' {where} differ in shape ({sorted(shapes)})")
  return jnp.stack(xs)


def _unstack_node(node: Any, n: int) -> Any:
  if not _is_stacked(node):
    return node
  stacked = node[STACKED]
  layers = {f"layers_{i}": jax.tree.map(lambda x, i=i: _layer(x, i), stacked, is_leaf=is_quantized)
            for i in range(n)}
  return {**{k: v for k, v in node.items() if k != STACKED}, **layers}


def _layer(x: Any, i: int) -> Any:
  if not is_quantized(x):
    return x[i]
  return x.layer([None if getattr(x, n) is None else getattr(x, n)[i] for n in QArray.CHILDREN])


def _path_map() -> PathMap:
  layer = "params/model/layers_{i}/"
  hf_layer = "model.layers.{i}."
  rules = [("params/model/embed_tokens/embedding", "model.embed_tokens.weight", "embedding")]
  projections = [f"self_attn/{p}" for p in ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")]
  projections += [f"mlp/{p}" for p in ("gate_proj", "up_proj", "gate_up_proj", "down_proj")]
  for p in projections:
    hf_p = p.replace("/", ".")
    rules += [(f"{layer}{p}/kernel", f"{hf_layer}{hf_p}.weight", "linear"),
              (f"{layer}{p}/bias", f"{hf_layer}{hf_p}.bias", "param")]
  rules += [(f"{layer}{n}/weight", f"{hf_layer}{n.replace('/', '.')}.weight", "param")
            for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                      "post_feedforward_layernorm", "self_attn/q_norm", "self_attn/k_norm")]
  rules.append((f"{layer}mlp/gate/kernel", f"{hf_layer}mlp.gate.weight", "router"))  # a mixture's router
  rules += [(f"{layer}mlp/experts/{p}", f"{hf_layer}mlp.experts.{p}", "experts") for p in ("gate_up_proj", "down_proj")]
  rules += [("params/model/norm/weight", "model.norm.weight", "param"),
            ("params/lm_head/kernel", "lm_head.weight", "linear")]
  return PathMap(tuple(rules))


LLAMA_PATH_MAP: PathMap = _path_map()
"""Flax `Llama` param paths <-> Hugging Face tensor names of every family (`FAMILIES`): the
projections' kernels and biases (Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` too), the norms
(Qwen3's ``q_norm``/``k_norm``, Gemma's ``pre_feedforward_layernorm``/``post_feedforward_layernorm`` too),
Mixtral's router ``mlp.gate`` (kind ``"router"``: transformers' ``MixtralTopKRouter`` holds its weight as a bare
parameter, PEFT's ``target_parameters``) and stacked experts (transformers' in-memory names ``mlp.experts.gate_up_proj``
and ``mlp.experts.down_proj``, kind ``"experts"``; `fuse_experts` reads a checkpoint's per-expert tensors as them)."""


def hf_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """The Hugging Face tensor names and torch-layout shapes of a model with this config."""
  c = config
  q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
  shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
  if not c.tie_word_embeddings:
    shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
  for i in range(c.num_hidden_layers):
    layer = {"self_attn.o_proj": (c.hidden_size, q), "input_layernorm": (c.hidden_size,),
             "post_attention_layernorm": (c.hidden_size,)}
    if c.moe:
      e, i_size = c.num_local_experts, c.intermediate_size
      layer["mlp.gate"] = (e, c.hidden_size)
      shapes.update({f"model.layers.{i}.mlp.experts.gate_up_proj": (e, 2 * i_size, c.hidden_size),
                     f"model.layers.{i}.mlp.experts.down_proj": (e, c.hidden_size, i_size)})
    else:
      layer["mlp.down_proj"] = (c.hidden_size, c.intermediate_size)
    if c.fused:
      layer.update({"self_attn.qkv_proj": (q + 2 * kv, c.hidden_size),
                    "mlp.gate_up_proj": (2 * c.intermediate_size, c.hidden_size)})
    else:
      layer.update({"self_attn.q_proj": (q, c.hidden_size), "self_attn.k_proj": (kv, c.hidden_size),
                    "self_attn.v_proj": (kv, c.hidden_size)})
    if not (c.fused or c.moe):
      layer.update({"mlp.gate_proj": (c.intermediate_size, c.hidden_size),
                    "mlp.up_proj": (c.intermediate_size, c.hidden_size)})
    if c.qk_norm:
      layer.update({"self_attn.q_norm": (c.head_dim,), "self_attn.k_norm": (c.head_dim,)})
    if c.gemma:
      layer.update({"pre_feedforward_layernorm": (c.hidden_size,), "post_feedforward_layernorm": (c.hidden_size,)})
    biases = {}
    if c.qkv_bias:
      biases.update({"self_attn.q_proj": (q,), "self_attn.k_proj": (kv,), "self_attn.v_proj": (kv,)})
    if c.attention_bias:
      biases["self_attn.o_proj"] = (c.hidden_size,)
    if c.mlp_bias:
      biases.update({"mlp.gate_proj": (c.intermediate_size,), "mlp.up_proj": (c.intermediate_size,),
                     "mlp.down_proj": (c.hidden_size,)})
    shapes.update({f"model.layers.{i}.{name}.weight": shape for name, shape in layer.items()})
    shapes.update({f"model.layers.{i}.{name}.bias": shape for name, shape in biases.items()})
  return shapes


def llama_from_tensors(config: LlamaConfig, tensors: Mapping[str, np.ndarray],
                       dtype: Any = jnp.float32) -> tuple[Llama, dict[str, Any]]:
  """`Llama` and its params from Hugging Face tensors, checked name by name and shape by shape
  (a mixture of experts' per-expert tensors read as transformers reads them: `fuse_experts`)."""
  ignored = ("rotary_emb.inv_freq",) + (("lm_head.weight",) if config.tie_word_embeddings else ())
  tensors = {k: v for k, v in tensors.items() if not k.endswith(ignored)}
  if config.moe:
    tensors = fuse_experts(tensors, config.num_local_experts)
  hf.check_tensors(hf_shapes(config), tensors)
  params = hf.params_from_tensors(tensors, LLAMA_PATH_MAP)
  return Llama(config, dtype), jax.tree.map(jnp.asarray, params)


def load_llama(directory: str, dtype: Any = jnp.float32) -> tuple[LlamaConfig, Llama, dict[str, Any]]:
  """``(config, model, params)`` from a Hugging Face checkpoint directory of a `FAMILIES` model
  (Llama, Qwen2/2.5, Qwen3, Mistral, Gemma 2/3, Phi-3, Mixtral)."""
  config = LlamaConfig.from_hf(hf.read_config(directory))
  model, params = llama_from_tensors(config, hf.read_tensors(directory), dtype)
  return config, model, params


def save_llama(directory: str, params: Any, config: LlamaConfig,
               files: Mapping[str, Callable[[str], object]] | None = None) -> None:
  """Write params (merge a LoRA first) as a checkpoint that transformers' class of the config's
  family (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ...) ``from_pretrained`` loads, with ``files``
  beside it (`lorax_jax.models.tokenizer.tokenizer_files` for the tokenizer), as one unit.

  Raises:
    ValueError: a ``directory`` that `lorax_jax.files.check_destination` refuses (``""``, the working
      or home directory, a directory holding files other than a checkpoint's).
  """
  tensors = hf.tensors_from_params(params, LLAMA_PATH_MAP)
  if config.moe:
    tensors = split_experts(tensors)
  hf.write_checkpoint(directory, tensors, config.to_hf(), files)


_CHECKPOINT_EXPERT = re.compile(r"(model\.layers\.\d+)\.block_sparse_moe\.(?:experts\.(\d+)\.(w[123])|gate)\.weight")


def fuse_experts(tensors: Mapping[str, np.ndarray], num_experts: int) -> dict[str, np.ndarray]:
  """A Mixtral checkpoint's tensors under transformers' in-memory names (its conversion mapping):
  ``block_sparse_moe.gate`` is ``mlp.gate``; the experts' ``w1`` (gate) and ``w3`` (up) ``[I, D]``,
  stacked over the experts and concatenated, are ``mlp.experts.gate_up_proj [E, 2 I, D]``; the
  ``w2 [D, I]`` stacked are ``mlp.experts.down_proj [E, D, I]``. Other names pass unchanged (a
  checkpoint already in the fused layout too).

  Raises:
    ValueError: a layer lacking one of its experts' tensors, or holding an expert ``>= num_experts``.

  >>> w = {f"model.layers.0.block_sparse_moe.experts.{e}.{n}.weight": np.zeros((3, 2) if n == "w2" else (2, 3))
  ...      for e in range(4) for n in ("w1", "w2", "w3")}
  >>> {k: v.shape for k, v in fuse_experts(w, 4).items()}
  {'model.layers.0.mlp.experts.gate_up_proj': (4, 4, 3), 'model.layers.0.mlp.experts.down_proj': (4, 3, 2)}
  """
  out: dict[str, np.ndarray] = {}
  experts: dict[str, dict[tuple[str, int], np.ndarray]] = {}
  for name, x in tensors.items():
    m = _CHECKPOINT_EXPERT.fullmatch(name)
    if m is None:
      out[name] = x
    elif m.group(2) is None:
      out[f"{m.group(1)}.mlp.gate.weight"] = x
    else:
      experts.setdefault(m.group(1), {})[m.group(3), int(m.group(2))] = x
  for layer, found in experts.items():
    for w, e in sorted(found.keys() - {(w, e) for w in ("w1", "w2", "w3") for e in range(num_experts)}):
      raise ValueError(f"checkpoint has unexpected tensor {layer}.block_sparse_moe.experts.{e}.{w}.weight "
                       f"(the config has num_local_experts={num_experts})")

    def stacked(w: str, layer: str = layer, found: dict = found) -> np.ndarray:
      for e in range(num_experts):
        if (w, e) not in found:
          raise ValueError(f"checkpoint lacks {layer}.block_sparse_moe.experts.{e}.{w}.weight")
      return np.stack([found[w, e] for e in range(num_experts)])

    out[f"{layer}.mlp.experts.gate_up_proj"] = np.concatenate([stacked("w1"), stacked("w3")], axis=1)
    out[f"{layer}.mlp.experts.down_proj"] = stacked("w2")
  return out


def split_experts(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`fuse_experts`'s inverse: the per-expert ``block_sparse_moe`` tensors transformers writes.

  >>> t = split_experts({"model.layers.0.mlp.experts.gate_up_proj": np.zeros((4, 4, 3)),
  ...                    "model.layers.0.mlp.experts.down_proj": np.zeros((4, 3, 2))})
  >>> len(t), t["model.layers.0.block_sparse_moe.experts.3.w3.weight"].shape
  (12, (2, 3))
  """
  out = {}
  for name, x in tensors.items():
    layer, sep, rest = name.partition(".mlp.")
    if rest == "gate.weight":
      out[f"{layer}.block_sparse_moe.gate.weight"] = x
    elif rest in ("experts.gate_up_proj", "experts.down_proj"):
      parts = dict(zip(("w1", "w3"), np.split(x, 2, axis=1))) if rest.endswith("gate_up_proj") else {"w2": x}
      out.update({f"{layer}.block_sparse_moe.experts.{e}.{w}.weight": np.ascontiguousarray(t[e])
                  for w, t in parts.items() for e in range(len(t))})
    else:
      out[name] = x
  return out
