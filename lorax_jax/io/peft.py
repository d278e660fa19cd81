"""PEFT LoRA adapters on disk: ``adapter_config.json`` + ``adapter_model.safetensors``.

The files are the ones PEFT's ``save_pretrained`` writes and ``PeftModel.from_pretrained``
reads. Each adapted module ``<m>`` (named as in `lorax_jax.io.modules`) holds

    base_model.model.<m>.lora_A.weight   [r, in]          (conv: [r, cin, kh, kw])
    base_model.model.<m>.lora_B.weight   [out, r]         (conv: [cout, r, 1, 1])
    base_model.model.<m>.lora_embedding_A  [r, vocab]     (embeddings)
    base_model.model.<m>.lora_embedding_B  [d, r]

and PEFT's update ``W_torch + s · B @ A`` with ``s = lora_alpha / r`` (``/ sqrt(r)`` with
``use_rslora``), ``r`` and ``lora_alpha`` overridden per module by ``rank_pattern`` /
``alpha_pattern``. That is lorax_jax's ``W + s · aᵀ b`` (layouts in `lorax_jax.io.factors`).
Beside an adapted embedding PEFT may also save the whole base table
(``<m>.base_layer.weight``); loading checks that it equals the table in ``params``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from lorax_jax.config import LoraConfig
from lorax_jax.files import write_atomic, write_text_atomic
from lorax_jax.init import Lora, set_path, factors, get_path
from lorax_jax.io.factors import fit, from_torch, to_torch, torch_shapes
from lorax_jax.io.modules import Module, by_name, by_path, exact_config, modules
from lorax_jax.io.tensors import pickle_refusal, read_safetensors, safetensors_writer
from lorax_jax import pathmap
from lorax_jax.pathmap import PathMap
from lorax_jax.targets import find_targets

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_NAMES = ("adapter_model.bin", "adapter_model.pt")
PREFIX = "base_model.model."
_BASE_COPY = re.compile(r"base_model\.model\.(?P<module>.+)\.base_layer\.weight")
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.(?P<part>lora_[AB]\.weight|lora_embedding_[AB])")

# PEFT options that change what the adapter computes and that lorax_jax does not implement;
# each must be absent, null, false or empty.
UNSUPPORTED = ("use_dora", "fan_in_fan_out", "lora_bias", "modules_to_save", "layer_replication",
               "target_parameters", "trainable_token_indices", "use_qalora", "alora_invocation_tokens",
               "arrow_config", "use_bdlora", "monteclora_config", "kasa_config")


def save_adapter(directory: str, lora: Lora, cfg: LoraConfig, params: Any,
                 path_map: PathMap | None = None, base_model_name_or_path: str | None = None,
                 task_type: str | None = None) -> None:
  """Write ``lora`` as a PEFT adapter in ``directory`` (created if needed).

  Factors keep their dtype. ``target_modules`` lists every adapted module by its full name,
  and ``rank_pattern`` / ``alpha_pattern`` hold every per-target rank and alpha that differs
  from ``cfg.r`` / ``cfg.alpha`` (keys are escaped full names), so PEFT and `load_adapter`
  rebuild exactly the same targets. ``task_type`` (``"CAUSAL_LM"``, ...) picks the
  ``PeftModel`` class PEFT loads it into.

  Both files or neither: the weights are staged in a temporary file, the config is written
  atomically, then the weights are renamed into place. An exception at any point leaves the
  previous pair untouched; only a hard crash between the two renames can pair the new config
  with the old weights, which `load_adapter`'s shape checks then report.
  """
  targets = find_targets(params, cfg)
  names = by_path(modules(params, path_map), targets)
  tensors = {}
  for t, a, b in factors(targets, lora):
    key_a, key_b = _keys(names[t.path])
    tensors[key_a], tensors[key_b] = to_torch(a, b, t, names[t.path].kind)
  config = {
      "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
      "r": cfg.r, "lora_alpha": _number(cfg.alpha), "lora_dropout": cfg.dropout,
      "use_rslora": cfg.use_rslora, "target_modules": sorted(m.name for m in names.values()),
      "rank_pattern": {re.escape(names[t.path].name): t.rank for t in targets.values() if t.rank != cfg.r},
      "alpha_pattern": {re.escape(names[t.path].name): _number(t.alpha)
                        for t in targets.values() if t.alpha != cfg.alpha},
      "bias": "none", "fan_in_fan_out": False, "use_dora": False, "modules_to_save": None,
      "layers_to_transform": None, "layers_pattern": None, "layer_replication": None,
      "init_lora_weights": True, "inference_mode": True, "revision": None,
  }
  os.makedirs(directory, exist_ok=True)
  write_weights = safetensors_writer(tensors)

  def write_pair(tmp: str) -> None:
    write_weights(tmp)
    write_text_atomic(os.path.join(directory, CONFIG_NAME), json.dumps(config, indent=2))

  write_atomic(os.path.join(directory, WEIGHTS_NAME), write_pair)


def load_adapter(directory: str, params: Any, path_map: PathMap | None = None,
                 param_dtype: Any = None, kernel_axes: Mapping[str, tuple[int, int]] | None = None,
                 ) -> tuple[Lora, LoraConfig]:
  """A PEFT adapter directory as ``(lora, cfg)`` for ``params``.

  The safetensors keys say which modules are adapted; the config gives each its rank and
  alpha. The returned ``cfg`` targets exactly those paths (one regex of escaped paths) with
  per-target ``rank_pattern`` / ``alpha_pattern``, ``dropout = lora_dropout`` and
  ``use_rslora``; factors are cast to ``param_dtype`` (float32 by default). Pass the
  ``kernel_axes`` the adapter was trained with if it used any.

  Raises:
    FileNotFoundError: no ``adapter_config.json`` or ``adapter_model.safetensors``.
    ValueError: a pickled ``adapter_model.bin``; an unreadable file; ``peft_type`` other
      than ``LORA`` or an option lorax_jax cannot honour (each named); a missing,
      unexpected or mis-shaped key (each named).
  """
  config = _read_config(directory)
  weights_path = os.path.join(directory, WEIGHTS_NAME)
  tensors = read_safetensors(weights_path)
  mods = modules(params, path_map)
  pairs = _pairs(_drop_base_copies(tensors, weights_path, mods, params), weights_path, mods)
  if not pairs:
    raise ValueError(f"{weights_path} holds no LoRA factors")
  missing = {m.name for m in mods if _peft_targets(config, m.name)} - {m.name for m, _, _ in pairs}
  if missing:
    raise ValueError(f"{weights_path} is missing the factors of {', '.join(sorted(missing))} "
                     f"(target_modules {config['target_modules']!r} selects them)")
  ranks = {m.path: _peft_lookup(config.get("rank_pattern"), m.name, config["r"]) for m, _, _ in pairs}
  alphas = {m.path: _peft_lookup(config.get("alpha_pattern"), m.name, config["lora_alpha"])
            for m, _, _ in pairs}
  dtype = jnp.dtype(param_dtype or jnp.float32)
  cfg = exact_config(ranks, alphas, config["r"], config["lora_alpha"], param_dtype=dtype,
                     dropout=float(config.get("lora_dropout") or 0.0),
                     use_rslora=bool(config.get("use_rslora")), kernel_axes=dict(kernel_axes or {}))
  targets = find_targets(params, cfg)
  lora: Lora = {}
  for m, (key_a, A), (key_b, B) in pairs:
    t = targets[m.path]
    want_a, want_b = torch_shapes(t, m.kind)
    a, b = from_torch(fit(A, want_a, f"{weights_path}: {key_a}", t),
                      fit(B, want_b, f"{weights_path}: {key_b}", t), t, m.kind)
    set_path(lora, m.path, {"a": jnp.asarray(a, dtype), "b": jnp.asarray(b, dtype)})
  return lora, cfg


def _read_config(directory: str) -> dict[str, Any]:
  """``adapter_config.json``, checked for a LoRA that lorax_jax can run as PEFT does."""
  path = os.path.join(directory, CONFIG_NAME)
  for pickled in PICKLED_NAMES:
    if (os.path.isfile(os.path.join(directory, pickled))
        and not os.path.isfile(os.path.join(directory, WEIGHTS_NAME))):
      raise ValueError(pickle_refusal(os.path.join(directory, pickled)))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}: not a PEFT adapter directory")
  try:
    with open(path) as f:
      config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(config, dict) or config.get("peft_type") != "LORA":
    got = config.get("peft_type") if isinstance(config, dict) else config
    raise ValueError(f"{path}: peft_type is {got!r}; lorax_jax loads only LORA adapters")
  for key in ("r", "lora_alpha"):
    if key not in config:
      raise ValueError(f"{path} has no {key!r}")
  bad = [f"{k}={config[k]!r}" for k in UNSUPPORTED if config.get(k) not in (None, False, [], {}, "")]
  if config.get("bias", "none") != "none":
    bad.append(f"bias={config['bias']!r}")
  if bad:
    raise ValueError(f"{path} uses options lorax_jax cannot honour: {', '.join(bad)}")
  return config


def _drop_base_copies(tensors: Mapping[str, np.ndarray], path: str, mods: list[Module], params: Any
                      ) -> dict[str, np.ndarray]:
  """``tensors`` without the copies of base weights PEFT saves beside adapted embeddings
  (``<m>.base_layer.weight``), each checked to equal the weight in ``params``."""
  copies = {key: match["module"] for key in tensors if (match := _BASE_COPY.fullmatch(key))}
  found, _ = by_name(mods, set(copies.values()))
  for key, name in copies.items():
    if name in found:
      m = found[name]
      current = pathmap.to_torch(np.asarray(get_path(params, m.path)), m.kind)
      if not _same(tensors[key], current):
        raise ValueError(f"{path}: {key} is a copy of the base weight {name} that differs from the one in "
                         "params (the adapter was trained on resized or modified weights): put it in "
                         "params first")
  return {k: v for k, v in tensors.items() if copies.get(k) not in found}


def _same(x: np.ndarray, y: np.ndarray) -> bool:
  """Equal shapes and values, compared in the less precise of the two dtypes."""
  if x.shape != y.shape:
    return False
  dtype = max(x.dtype, y.dtype, key=lambda d: ml_dtypes.finfo(d).eps)
  return bool(np.array_equal(x.astype(dtype), y.astype(dtype)))


Pair = tuple[Module, tuple[str, np.ndarray], tuple[str, np.ndarray]]


def _pairs(tensors: Mapping[str, np.ndarray], path: str, mods: list[Module]) -> list[Pair]:
  """``(module, (key_A, A), (key_B, B))`` per adapted module; unexpected or missing keys are
  errors naming them."""
  parts: dict[str, dict[str, str]] = {}
  unexpected = []
  for key in tensors:
    match = _KEY.fullmatch(key)
    if match:
      parts.setdefault(match["module"], {})[match["part"]] = key
    else:
      unexpected.append(key)
  found, unknown = by_name(mods, parts)
  unexpected += [key for name in unknown for key in parts[name].values()]
  missing = []
  for name, m in found.items():
    want = _keys(m)
    unexpected += [key for key in parts[name].values() if key not in want]
    missing += [key for key in want if key not in parts[name].values()]
  if unexpected:
    raise ValueError(f"{path} has unexpected keys (no such LoRA module for these params): "
                     f"{', '.join(sorted(unexpected))}")
  if missing:
    raise ValueError(f"{path} is missing keys {', '.join(missing)}")
  return [(m, *((key, tensors[key]) for key in _keys(m))) for m in found.values()]


def _keys(m: Module) -> tuple[str, str]:
  if m.kind == "embedding":
    return f"{PREFIX}{m.name}.lora_embedding_A", f"{PREFIX}{m.name}.lora_embedding_B"
  return f"{PREFIX}{m.name}.lora_A.weight", f"{PREFIX}{m.name}.lora_B.weight"


def _peft_targets(config: Mapping[str, Any], name: str) -> bool:
  """Whether PEFT's ``target_modules`` / ``exclude_modules`` select module ``name``.

  False when the selection depends on the torch model (``all-linear``, layer filters):
  then the file's keys alone say what is adapted.
  """
  targets = config.get("target_modules")
  if (targets is None or targets == "all-linear" or config.get("layers_to_transform") is not None
      or _peft_matches(config.get("exclude_modules"), name)):
    return False
  return _peft_matches(targets, name)


def _peft_matches(patterns: str | list[str] | None, name: str) -> bool:
  if not patterns:
    return False
  if isinstance(patterns, str):
    return re.fullmatch(patterns, name) is not None
  return name in patterns or any(name.endswith("." + p) for p in patterns)


def _peft_lookup(pattern: Mapping[str, Any] | None, name: str, default: Any) -> Any:
  """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key matching a ``.``-suffix of ``name``."""
  for key, value in (pattern or {}).items():
    if re.match(rf"(.*\.)?({key})$", name):
      return value
  return default


def _number(x: float) -> int | float:
  """``x`` as an int when integral, so the JSON reads like PEFT's."""
  return int(x) if float(x).is_integer() else float(x)
