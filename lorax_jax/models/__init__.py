"""Reference Flax models (the Llama families, GPT-2, BERT) that load Hugging Face checkpoints, with
their path maps; `load_model` picks a causal LM's family from its ``config.json``.

They import the core; the core never imports them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from lorax_jax.models import gpt2, hf, llama
from lorax_jax.pathmap import PathMap

MODEL_TYPES: tuple[str, ...] = (*llama.FAMILIES, "gpt2")
"""The causal LMs' ``model_type``\\ s `load_model` reads: `lorax_jax.models.llama.FAMILIES`, then GPT-2."""

_ARCHITECTURES = {**{f.architecture: name for name, f in llama.FAMILIES.items()},
                  "GPT2LMHeadModel": "gpt2", "GPT2Model": "gpt2"}


def model_type(config: Mapping[str, Any]) -> str:
  """The family (one of `MODEL_TYPES`) of a ``config.json`` dict: its ``model_type``, else the one
  its ``architectures`` names.

  Args:
    config: the parsed ``config.json``.

  Raises:
    ValueError: an unknown ``model_type`` or architecture (named, with the supported ones), or neither.

  >>> model_type({"model_type": "qwen2"}), model_type({"architectures": ["GPT2LMHeadModel"]})
  ('qwen2', 'gpt2')
  """
  if "model_type" in config:
    if config["model_type"] not in MODEL_TYPES:
      raise ValueError(f"config.json has model_type={config['model_type']!r}; the supported causal LMs are "
                       f"{', '.join(map(repr, MODEL_TYPES))}")
    return config["model_type"]
  known = [_ARCHITECTURES[a] for a in config.get("architectures") or () if a in _ARCHITECTURES]
  if not known:
    raise ValueError(f"config.json has no model_type and architectures={config.get('architectures')!r} names "
                     f"none of {', '.join(sorted(_ARCHITECTURES))}")
  return known[0]


def load_model(directory: str, dtype: Any = jnp.float32) -> tuple[Any, Any, dict[str, Any]]:
  """``(config, model, params)`` of a Hugging Face causal-LM checkpoint directory, its family picked
  from ``config.json`` (`model_type`): `lorax_jax.models.llama.load_llama` for the Llama families
  (Llama, Qwen2/2.5, Qwen3, Mistral, Gemma 2/3, Phi-3, Mixtral), `lorax_jax.models.gpt2.load_gpt2` for GPT-2. Its
  adapters' path map is `path_map` of the config.

  Args:
    directory: holds ``config.json`` and ``*.safetensors``.
    dtype: the computation dtype.

  Raises:
    ValueError: an unknown ``model_type``, a ``config.json`` field the family does not implement,
      a missing, unexpected or mis-shaped tensor (each named).
  """
  config = {**hf.read_config(directory)}
  config["model_type"] = model_type(config)  # the family architectures named, where model_type is absent
  if config["model_type"] == "gpt2":
    parsed = gpt2.GPT2Config.from_hf(config)
    model, params = gpt2.gpt2_from_tensors(parsed, hf.read_tensors(directory), dtype)
  else:
    parsed = llama.LlamaConfig.from_hf(config)
    model, params = llama.llama_from_tensors(parsed, hf.read_tensors(directory), dtype)
  return parsed, model, params


def path_map(config: llama.LlamaConfig | gpt2.GPT2Config) -> PathMap:
  """The path map (Flax paths <-> Hugging Face names, for checkpoints and adapters) of a model's config.

  Args:
    config: what `load_model` returned first.

  >>> config = gpt2.GPT2Config(vocab_size=8, n_positions=8, n_embd=4, n_layer=1, n_head=1, n_inner=8)
  >>> path_map(config) is gpt2.GPT2_PATH_MAP
  True
  """
  return gpt2.GPT2_PATH_MAP if isinstance(config, gpt2.GPT2Config) else llama.LLAMA_PATH_MAP
