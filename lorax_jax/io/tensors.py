"""Reading and writing ``.safetensors`` files, strictly, header first and without pickle.

A safetensors file is ``[n: u64 little-endian][n bytes of JSON header][data]``; the header
maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into
the data section) plus an optional ``__metadata__`` of strings. `read_header` parses and
checks the header alone (every name once, known dtypes, non-negative integer shapes whose
byte size is the span of the offsets, spans that tile the data section exactly as the
format requires, within the file); callers check names, dtypes and shapes against what they
expect before `read_tensors` materialises anything.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from lorax_jax.files import open_regular

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One header entry: the tensor's safetensors dtype name, shape and byte span in the file."""

  dtype: str
  shape: tuple[int, ...]
  start: int  # absolute file offset
  end: int


def read_header(f: BinaryIO, path: str) -> dict[str, TensorInfo]:
  """The checked header of the open safetensors file ``f`` (named ``path`` in errors).

  Raises:
    ValueError: a truncated or corrupt file, a header naming a tensor twice, an unknown
      dtype, a shape or offsets that do not agree with the dtype and the file (each named).
  """
  bad = _bad(path)
  header, data_start, size = _header(f, path)
  header.pop("__metadata__", None)
  infos = {}
  for key, entry in header.items():
    infos[key] = _entry(key, entry, data_start, bad)
  spans = sorted((i.start, i.end) for i in infos.values())
  expect = data_start
  for start, end in spans:
    if start != expect:
      raise bad(f"tensor data spans overlap or leave a gap at byte {expect}")
    expect = end
  if expect != size:
    raise bad(f"tensor data ends at byte {expect} but the file has {size} bytes")
  return infos


def read_metadata(f: BinaryIO, path: str) -> dict[str, str]:
  """The header's ``__metadata__`` (a string-to-string map; empty without one) of the open
  safetensors file ``f`` (named ``path`` in errors).

  Raises:
    ValueError: a truncated or corrupt header, or metadata that is not an object of strings.
  """
  metadata = _header(f, path)[0].get("__metadata__", {})
  if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
    raise _bad(path)("__metadata__ is not an object of strings")
  return metadata


def read_tensors(f: BinaryIO, infos: Mapping[str, TensorInfo], keys: Iterable[str] | None = None
                 ) -> dict[str, np.ndarray]:
  """The tensors ``keys`` (default: all) of the open file ``f`` whose header is ``infos``."""
  out = {}
  for key in infos if keys is None else keys:
    info = infos[key]
    f.seek(info.start)
    data = f.read(info.end - info.start)
    out[key] = np.frombuffer(data, DTYPES[info.dtype]).reshape(info.shape).copy()
  return out


def open_safetensors(path: str) -> BinaryIO:
  """``path`` open for `read_header` / `read_tensors`.

  Raises:
    FileNotFoundError: no such file.
    ValueError: a pickled checkpoint (refused, with how to convert it); not a regular file
      (`lorax_jax.files.open_regular`).
  """
  if path.endswith(PICKLE_SUFFIXES):
    raise ValueError(pickle_refusal(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"no such file: {path}")
  return open_regular(path)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of the file, by name, in its stored dtype (bfloat16 as ``ml_dtypes.bfloat16``).

  Raises:
    FileNotFoundError: no such file.
    ValueError: a pickled checkpoint (refused), or a truncated or corrupt file (both name it).
  """
  with open_safetensors(path) as f:
    return read_tensors(f, read_header(f, path))


def safetensors_writer(tensors: Mapping[str, np.ndarray]) -> Callable[[str], None]:
  """A ``write(path)`` for `lorax_jax.files` that saves ``tensors`` with the ``format: pt``
  metadata torch loaders expect."""
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


def _bad(path: str) -> Callable[[str], ValueError]:
  return lambda why: ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {why}")


def _header(f: BinaryIO, path: str) -> tuple[dict[str, Any], int, int]:
  """``(header JSON object, data start, file size)`` of the open safetensors file ``f``, its length
  checked against the file and `MAX_HEADER_BYTES` before it is read."""
  bad = _bad(path)
  size = os.fstat(f.fileno()).st_size
  f.seek(0)
  head = f.read(8)
  if len(head) < 8:
    raise bad(f"{size} bytes, shorter than the 8-byte header length")
  (n,) = struct.unpack("<Q", head)
  if n > min(MAX_HEADER_BYTES, size - 8):
    raise bad(f"header length {n} exceeds the file ({size} bytes) or {MAX_HEADER_BYTES} bytes")
  try:
    header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_no_duplicates)
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
    raise bad(f"header is not valid JSON: {str(e)[:200]}") from None
  if not isinstance(header, dict):
    raise bad("header is not a JSON object")
  return header, 8 + n, size


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
  out = {}
  for key, value in pairs:
    if key in out:
      raise ValueError(f"the header names {key!r} twice")
    out[key] = value
  return out


def _entry(key: str, entry: object, data_start: int, bad: Callable[[str], ValueError]) -> TensorInfo:
  if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
    raise bad(f"{key}: entry {str(entry)[:100]} is not {{dtype, shape, data_offsets}}")
  dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
  if dtype not in DTYPES:
    raise bad(f"{key}: unknown dtype {dtype!r}")
  if not (isinstance(shape, list) and all(_is_index(n) for n in shape)):
    raise bad(f"{key}: shape {shape!r} is not a list of non-negative integers")
  if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_index(n) for n in offsets)):
    raise bad(f"{key}: data_offsets {offsets!r} is not [begin, end]")
  nbytes = math.prod(shape) * DTYPES[dtype].itemsize
  if offsets[1] - offsets[0] != nbytes:
    raise bad(f"{key}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, but a {dtype} "
              f"tensor of shape {shape} has {nbytes}")
  return TensorInfo(dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _is_index(n: object) -> bool:
  return isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**62
