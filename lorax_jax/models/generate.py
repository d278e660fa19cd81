"""Batched text generation with a fixed-size KV cache: greedy, temperature, top-k, top-p.

    completions = generate(model, params, [prompt_ids, ...], max_new_tokens=64,
                           temperature=0.7, top_p=0.9, stop_tokens=[eos], rng=key,
                           lora=lora, cfg=cfg)             # factored LoRA; merged=True merges once
    generate(model, params, prompts, max_new_tokens=64,
             lora=stacked, cfg=stacked_cfg, adapter_ids=[0, 2, -1])   # each prompt its own adapter

Prompts are left-padded to a common length (rounded up to a multiple of 16), their
positions count real tokens only, and padding is masked out of attention. One jitted
prefill fills the cache; one jitted decode step then appends a token per call. Shapes
never change between steps, so the decode step compiles once per
``(batch, cache length, sampling settings)``; the cache length defaults to
``prompt + max_new_tokens`` rounded up to a multiple of 64 so that nearby lengths
share the compiled step.

The model is any Flax module with the `lorax_jax.models.llama.Llama` convention:
``apply(params, tokens, positions, mask, cache) -> (logits, cache)`` and
``init_cache(batch, length)``.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax.config import LoraConfig
from lorax_jax.lora_tree import SCALE
from lorax_jax.merge import merge
from lorax_jax.qarray import leaves_with_paths
from lorax_jax.transform import lora_transform

PROMPT_MULTIPLE = 16
CACHE_MULTIPLE = 64
_MAX_COMPILED = 8


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is drawn: ``temperature == 0`` is greedy (argmax)."""

  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
    if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
      raise ValueError(f"top_k must be a positive int or None, got {self.top_k!r}")
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
  """``logits / temperature`` with tokens outside the top-k and outside the top-p nucleus at -inf.

  The nucleus is the smallest set of most likely tokens whose probabilities sum to at least
  ``top_p``: token ``i`` (in descending order) stays when the mass before it is ``< top_p``.
  """
  logits = logits.astype(jnp.float32) / sampling.temperature
  if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p is not None and sampling.top_p < 1:
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_before < sampling.top_p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(ordered, kept - 1, axis=-1)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """Next tokens ``[B]`` from last-position logits ``[B, V]``."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Steps:
  """The two jitted functions of one (model, adapter config, sampling)."""

  prefill: Callable[..., Any]
  decode: Callable[..., Any]


_COMPILED: collections.OrderedDict[tuple, _Steps] = collections.OrderedDict()


def _steps(model: Any, params: Any, cfg: LoraConfig | None, sampling: Sampling) -> _Steps:
  """Jitted prefill/decode for this model, factored adapter config (or None) and sampling; reused across calls."""
  key = (model, cfg, sampling)  # LoraConfig is an immutable, hashable value
  if key in _COMPILED:
    _COMPILED.move_to_end(key)
    return _COMPILED[key]
  if cfg is None:
    def apply(params, lora, ids, *args):
      del lora, ids
      return model.apply(params, *args)
  else:  # inference: no LoRA dropout, whatever the training config said
    lora_apply = lora_transform(model.apply, params, cfg.replace(dropout=0.0, dropout_seed=None))

    def apply(params, lora, ids, *args):
      return lora_apply(params, lora, *args, **({} if ids is None else {"adapter_ids": ids}))

  def prefill(params, lora, ids, tokens, positions, mask, cache, key):
    logits, cache = apply(params, lora, ids, tokens, positions, mask, cache)
    return sample(logits[:, -1], key, sampling), cache

  def decode(params, lora, ids, token, position, cache, key):
    logits, cache = apply(params, lora, ids, token[:, None], position[:, None], None, cache)
    return sample(logits[:, -1], key, sampling), cache

  steps = _Steps(jax.jit(prefill), jax.jit(decode, donate_argnames="cache"))
  _COMPILED[key] = steps
  while len(_COMPILED) > _MAX_COMPILED:
    _COMPILED.popitem(last=False)
  return steps


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def pad_prompts(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded ``tokens [B, length]`` and their ``mask`` (True on real tokens)."""
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), bool)
  for i, p in enumerate(prompts):
    tokens[i, length - len(p):] = p
    mask[i, length - len(p):] = True
  return tokens, mask


def generate(model: Any, params: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             stop_tokens: Sequence[int] = (), rng: jax.Array | None = None, lora: Any = None,
             cfg: LoraConfig | None = None, merged: bool = False,
             cache_length: int | None = None, adapter_ids: Sequence[int] | None = None) -> list[list[int]]:
  """Continue each prompt (a list of token ids); returns the new tokens of each.

  A row stops after its first token in ``stop_tokens`` (which is included) or after
  ``max_new_tokens``. With ``lora`` (and its ``cfg``) the adapter is applied factored
  through `lora_transform`, or merged into the weights once when ``merged=True``.
  With ``adapter_ids`` (one per prompt, -1 the base model) ``lora`` is a stacked tree
  (`lorax_jax.stack_adapters`, ``cfg`` the config it returned) and every prefill and decode
  step runs each row through its own adapter (a mixed batch: docs/many-adapters.md).
  ``rng`` drives sampling (default ``jax.random.key(0)``); greedy decoding ignores it.

  Raises:
    ValueError: bad lengths or settings; ``adapter_ids`` without a stacked ``lora``, with
      ``merged=True`` (one merged weight cannot serve several adapters), or not one per prompt.
  """
  sampling = Sampling(temperature, top_k, top_p)
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("generate needs at least one prompt, each with at least one token")
  if (lora is None) != (cfg is None):
    raise ValueError("pass both lora and cfg (the adapter's LoraConfig), or neither")
  if adapter_ids is not None:
    if lora is None or merged:
      raise ValueError("adapter_ids selects adapters of a stacked lora (lorax_jax.stack_adapters) run factored: "
                       "pass lora= and cfg=, and not merged=True")
    if len(adapter_ids) != len(prompts):
      raise ValueError(f"adapter_ids has {len(adapter_ids)} entries for {len(prompts)} prompts: one per prompt")
    count = next((np.shape(x)[0] for path, x in leaves_with_paths(lora) if path[-1:] == (SCALE,)), None)
    if count is None:
      raise ValueError("adapter_ids selects adapters of a stacked lora (lorax_jax.stack_adapters); this one is plain")
    bad = sorted({int(j) for j in adapter_ids if not -1 <= int(j) < count})
    if bad:
      raise ValueError(f"adapter_ids {bad[:5]} are out of range for {count} stacked adapters "
                       f"(0 … {count - 1}, -1 the base)")
    adapter_ids = jnp.asarray(adapter_ids, jnp.int32)
  if lora is not None and merged:
    params, lora, cfg = merge(params, lora, cfg), None, None
  prompt_length = _round_up(max(len(p) for p in prompts), PROMPT_MULTIPLE)
  needed = prompt_length + max_new_tokens - 1
  cache_length = cache_length or _round_up(needed, CACHE_MULTIPLE)
  if cache_length < needed:
    raise ValueError(f"cache_length={cache_length} is too small: the padded prompt ({prompt_length}) "
                     f"plus max_new_tokens ({max_new_tokens}) needs {needed} slots")
  steps = _steps(model, params, cfg, sampling)
  tokens, mask = pad_prompts(prompts, prompt_length)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  next_position = jnp.asarray([len(p) for p in prompts], jnp.int32)
  keys = jax.random.split(jax.random.key(0) if rng is None else rng, max_new_tokens)
  stop = jnp.asarray(list(stop_tokens) or [-1], jnp.int32)

  cache = model.init_cache(len(prompts), cache_length)
  token, cache = steps.prefill(params, lora, adapter_ids, tokens, positions, mask, cache, keys[0])
  out, done = [token], jnp.isin(token, stop)
  for i in range(1, max_new_tokens):
    if bool(done.all()):
      break
    token, cache = steps.decode(params, lora, adapter_ids, token, next_position, cache, keys[i])
    next_position = next_position + 1
    out.append(token)
    done = done | jnp.isin(token, stop)
  return [_until_stop(row, stop_tokens) for row in np.stack(out, axis=1).tolist()]


def _until_stop(row: list[int], stop_tokens: Sequence[int]) -> list[int]:
  for i, t in enumerate(row):
    if t in stop_tokens:
      return row[:i + 1]
  return row
