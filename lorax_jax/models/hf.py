"""Hugging Face checkpoint directories (``config.json`` + ``*.safetensors``) <-> Flax params."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from lorax_jax.files import write_atomic, write_text_atomic
from lorax_jax.io.tensors import PICKLE_SUFFIXES, pickle_refusal, read_safetensors, safetensors_writer
from lorax_jax.pathmap import PathMap, from_torch, to_torch
from lorax_jax.targets import leaves_with_paths, path_str, set_path


def read_config(directory: str) -> dict[str, Any]:
  """``config.json`` of a checkpoint directory."""
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory} has no config.json: not a Hugging Face checkpoint directory")
  with open(path) as f:
    return json.load(f)


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


def save_hf_checkpoint(directory: str, params: Any, config: Mapping[str, Any], path_map: PathMap) -> None:
  """Write ``model.safetensors`` + ``config.json`` that transformers loads."""
  tensors = tensors_from_params(params, path_map)
  write_atomic(os.path.join(directory, "model.safetensors"), safetensors_writer(tensors))
  write_text_atomic(os.path.join(directory, "config.json"), json.dumps(dict(config), indent=2))
