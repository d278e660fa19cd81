"""Hugging Face checkpoint directories (``config.json`` + ``*.safetensors``) <-> Flax params.

Files are read as `lorax_jax.files` reads them (regular files only, ``config.json`` at most
`MAX_CONFIG_BYTES`, ``tokenizer.json`` at most `MAX_TEXT_BYTES`); a checkpoint is written as one
unit (`lorax_jax.files.write_dir_atomic`) into a directory of its own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from lorax_jax.files import MAX_CONFIG_BYTES, MAX_TEXT_BYTES, read_regular, text_writer, write_dir_atomic
from lorax_jax.io.tensors import PICKLE_SUFFIXES, pickle_refusal, read_safetensors, safetensors_writer
from lorax_jax.pathmap import PathMap, from_torch, to_torch
from lorax_jax.paths import path_str, set_path
from lorax_jax.qarray import leaves_with_paths

CHECKPOINT_FILES = ("model.safetensors", "config.json")  # what `write_checkpoint` writes besides its files
NEUTRAL_FIELDS = frozenset({  # config.json fields that change no model's logits (dropouts: training
    # only in transformers; these models have none, LoRA's is the engine's)
    "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "use_cache",
    "initializer_range", "attention_dropout", "resid_pdrop", "embd_pdrop", "bos_token_id", "eos_token_id",
    "pad_token_id", "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id",
    "problem_type", "tokenizer_class", "chunk_size_feed_forward", "is_encoder_decoder"})


def read_config(directory: str) -> dict[str, Any]:
  """``config.json`` of a checkpoint directory.

  Raises:
    FileNotFoundError: no ``config.json``.
    ValueError: not a regular file, larger than `MAX_CONFIG_BYTES`, or not JSON.
  """
  return read_json(directory, "config.json")


def read_json(directory: str, name: str) -> Any:
  """The JSON file ``name`` of a model directory (at most `MAX_CONFIG_BYTES`).

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a regular file, larger than `MAX_CONFIG_BYTES`, or not UTF-8 JSON.
  """
  return json.loads(read_regular(_existing(directory, name), MAX_CONFIG_BYTES, f"model's {name}").decode("utf-8"))


def read_tokenizer(directory: str) -> Any:
  """The ``tokenizers.Tokenizer`` of a model directory's ``tokenizer.json`` (at most `MAX_TEXT_BYTES`).

  Raises:
    FileNotFoundError: no ``tokenizer.json``.
    ValueError: not a regular file, larger than `MAX_TEXT_BYTES`, or not UTF-8.
  """
  from tokenizers import Tokenizer  # an optional dependency (the "llm" extra)

  path = _existing(directory, "tokenizer.json")
  return Tokenizer.from_str(read_regular(path, MAX_TEXT_BYTES, "tokenizer.json").decode("utf-8"))


def _existing(directory: str, name: str) -> str:
  path = os.path.join(directory, name)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} has no {name}: not a Hugging Face model directory")
  return path


def read_tensors(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of the directory's ``*.safetensors`` files, by name (float32 for floats)."""
  files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
  if not files:
    pickled = [f for f in os.listdir(directory) if f.endswith(PICKLE_SUFFIXES)]
    raise FileNotFoundError(pickle_refusal(os.path.join(directory, pickled[0])) if pickled
                            else f"{directory} has no *.safetensors weights")
  tensors: dict[str, np.ndarray] = {}
  for name in files:
    tensors.update(read_safetensors(os.path.join(directory, name)))
  return {k: v.astype(np.float32) if v.dtype.kind in "fV" else v  # "V": ml_dtypes bfloat16
          for k, v in tensors.items()}


def check_tensors(want: Mapping[str, tuple[int, ...]], tensors: Mapping[str, np.ndarray]) -> None:
  """ValueError naming the first missing, unexpected or mis-shaped checkpoint tensor.

  Args:
    want: every tensor name the config implies, with its torch-layout shape.
    tensors: the checkpoint's tensors by name.
  """
  for name in sorted(want.keys() - tensors.keys()):
    raise ValueError(f"checkpoint lacks {name}")
  for name in sorted(tensors.keys() - want.keys()):
    raise ValueError(f"checkpoint has unexpected tensor {name}")
  for name, shape in want.items():
    if tuple(tensors[name].shape) != shape:
      raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensors[name].shape)}, "
                       f"the config implies {shape}")


def params_from_tensors(tensors: Mapping[str, np.ndarray], path_map: PathMap,
                        ignore: tuple[str, ...] = ()) -> dict[str, Any]:
  """Nested Flax params from Hugging Face tensors; unmapped names are an error unless ignored."""
  params: dict[str, Any] = {}
  for name, x in tensors.items():
    mapped = path_map.to_flax(name)
    if mapped is None:
      if any(name.endswith(s) for s in ignore):
        continue
      raise ValueError(f"checkpoint tensor {name!r} has no Flax path in the path map")
    path, kind = mapped
    set_path(params, tuple(path.split("/")), from_torch(x, kind))
  return params


def tensors_from_params(params: Any, path_map: PathMap) -> dict[str, np.ndarray]:
  """Hugging Face tensors (torch layout) from Flax params; every leaf must be mapped."""
  out = {}
  for path, leaf in leaves_with_paths(params):
    mapped = path_map.to_hf(path_str(path))
    if mapped is None:
      raise ValueError(f"param {path_str(path)} has no Hugging Face name in the path map")
    name, kind = mapped
    out[name] = np.ascontiguousarray(to_torch(np.asarray(leaf, np.float32), kind))
  return out


def save_hf_checkpoint(directory: str, params: Any, config: Mapping[str, Any], path_map: PathMap,
                       files: Mapping[str, Callable[[str], object]] | None = None) -> None:
  """Write ``model.safetensors`` + ``config.json`` that transformers loads (`write_checkpoint`).

  Raises:
    ValueError: a leaf the path map does not name; a ``directory`` that
      `lorax_jax.files.check_destination` refuses.
  """
  write_checkpoint(directory, tensors_from_params(params, path_map), config, files)


def write_checkpoint(directory: str, tensors: Mapping[str, np.ndarray], config: Mapping[str, Any],
                     files: Mapping[str, Callable[[str], object]] | None = None) -> None:
  """Make ``directory`` hold exactly ``model.safetensors`` (``tensors``), ``config.json`` and
  ``files`` (name -> ``write(path)``, e.g. `lorax_jax.models.tokenizer.tokenizer_files`), as one
  unit (`lorax_jax.files.write_dir_atomic`).

  Raises:
    ValueError: a ``directory`` that `lorax_jax.files.check_destination` refuses (``""``, the
      working or home directory, a directory holding files other than these).
  """
  weights, config_name = CHECKPOINT_FILES
  write_dir_atomic(directory, {weights: safetensors_writer(tensors),
                               config_name: text_writer(json.dumps(dict(config), indent=2)), **(files or {})})
