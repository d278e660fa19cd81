"""Reading and writing one ``.safetensors`` file, strictly and without pickle."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of the file, by name, in its stored dtype (bfloat16 as ``ml_dtypes.bfloat16``).

  Raises:
    FileNotFoundError: no such file.
    ValueError: a pickled checkpoint (refused), or a truncated or corrupt file (both name it).
  """
  if path.endswith(PICKLE_SUFFIXES):
    raise ValueError(pickle_refusal(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such file: {path}")
  try:
    return load_file(path)
  except (SafetensorError, OSError, ValueError) as e:
    raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def safetensors_writer(tensors: Mapping[str, np.ndarray]) -> Callable[[str], None]:
  """A ``write(path)`` for `lorax_jax.files.write_atomic` that saves ``tensors`` with the
  ``format: pt`` metadata torch loaders expect."""
  arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  return lambda path: save_file(arrays, path, metadata={"format": "pt"})


def pickle_refusal(path: str) -> str:
  """Why a pickled torch file is refused, and how to convert it."""
  return (
      f"{path} is a pickled torch file; lorax_jax never unpickles (loading a pickle runs arbitrary "
      "code). Convert it once in PyTorch: load it there (for a PEFT adapter, "
      "PeftModel.from_pretrained(...)) and save it with safetensors "
      "(model.save_pretrained(dir, safe_serialization=True), or "
      "safetensors.torch.save_file(torch.load(path), 'adapter_model.safetensors')).")
