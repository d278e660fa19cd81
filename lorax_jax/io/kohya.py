"""Kohya / diffusers LoRA files (``lora_unet_…``, ``lora_te_…``) as a LoRA tree and config.

A Kohya file names each module by its Hugging Face (diffusers / transformers) module name
with ``.`` replaced by ``_``, behind a prefix (``lora_unet_down_blocks_0_attentions_0_proj_in``),
and holds

    <module>.lora_down.weight   [r, in]    (conv: [r, cin, kh, kw])     = PEFT's lora_A
    <module>.lora_up.weight     [out, r]   (conv: [cout, r, 1, 1])      = PEFT's lora_B
    <module>.alpha              scalar     (absent: alpha = r)

for the update ``W_torch + alpha / r · up @ down``. Underscored names are not parsed back
(``proj_in`` has one too): the underscored form of every kernel the path map names is built
and looked up, and a name two kernels share is an error. This is the format of Lorax's
LCM-LoRA loader.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Mapping
from typing import Any, BinaryIO

import jax.numpy as jnp
import numpy as np

from lorax_jax.config import LoraConfig
from lorax_jax.io.factors import factors_from_torch, fit, torch_shapes
from lorax_jax.io.modules import Module, by_name, exact_config, modules, parts_by_module
from lorax_jax.io.tensors import FLOAT_DTYPES, TensorInfo, open_safetensors, read_header, read_tensors
from lorax_jax.lora_tree import Lora
from lorax_jax.pathmap import PathMap
from lorax_jax.paths import Path, set_path
from lorax_jax.targets import find_targets

# Kohya prefix -> the prefix of the Hugging Face module names it stands for.
DEFAULT_PREFIXES = {"lora_unet_": "", "lora_te_": "", "lora_te1_": "", "lora_te2_": ""}
_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)")


def load_kohya(path: str, params: Any, path_map: PathMap | None,
               prefix_map: Mapping[str, str | None] | None = None, param_dtype: Any = jnp.float32,
               ) -> tuple[Lora, LoraConfig]:
  """A Kohya LoRA ``.safetensors`` file as ``(lora, cfg)`` for ``params``.

  ``prefix_map`` maps each Kohya prefix to the prefix of the path map's Hugging Face names
  (default: all four to ``""``, for params of one model); a prefix mapped to ``None`` is
  skipped (``{"lora_unet_": "", "lora_te_": None}`` loads only the UNet part). Each
  module's rank comes from its tensors and its alpha from the file; ``cfg`` targets exactly
  those paths with per-target ``rank_pattern`` / ``alpha_pattern``, so
  ``merge(params, lora, cfg)`` is ``W + alpha / r · up @ down``.

  Names, dtypes and shapes are checked from the file's header before a tensor is read.

  Args:
    path: the ``.safetensors`` file.
    params: the params tree the LoRA is for.
    path_map: the model's `PathMap` (Kohya names are its Hugging Face module names with
      ``.`` replaced by ``_``, after the prefix); None: Flax paths joined with ``.``.
    prefix_map: Kohya prefix -> Hugging Face name prefix, or None to skip the prefix.
    param_dtype: the dtype of the returned factors.

  Returns:
    ``(lora, cfg)``, ready for `lora_transform` or `merge`.

  Raises:
    ValueError: an unreadable file; a ``prefix_map`` that is not a mapping of strings to
      strings or None; a key that is not a Kohya LoRA key or whose module is not in
      ``params``; a module without both factors, or named under two prefixes; factors that
      are not floating point or mis-shaped; an alpha that is not one finite number (each named).

  >>> import os, tempfile, jax, jax.numpy as jnp, numpy as np, lorax_jax
  >>> from safetensors.numpy import save_file
  >>> params = {"attn": {"q": {"kernel": jnp.zeros((6, 4))}}}
  >>> path_map = lorax_jax.PathMap((("attn/q/kernel", "attn.q.weight", "linear"),))
  >>> path = os.path.join(tempfile.mkdtemp(), "style.safetensors")
  >>> save_file({"lora_unet_attn_q.lora_down.weight": np.ones((2, 6), np.float32),
  ...            "lora_unet_attn_q.lora_up.weight": np.ones((4, 2), np.float32),
  ...            "lora_unet_attn_q.alpha": np.array(1.0, np.float32)}, path)
  >>> lora, cfg = lorax_jax.load_kohya(path, params, path_map)
  >>> jax.tree.map(jnp.shape, lora), cfg.r, cfg.alpha
  ({'attn': {'q': {'kernel': {'a': (2, 6), 'b': (2, 4)}}}}, 2, 1.0)
  >>> float(lorax_jax.merge(params, lora, cfg)["attn"]["q"]["kernel"][0, 0])  # alpha / r · up @ down
  1.0
  """
  prefixes = _prefixes(prefix_map)
  with open_safetensors(path) as f:
    infos = read_header(f, path)
    return _load(f, infos, path, params, path_map, prefixes, param_dtype)


def _load(f: BinaryIO, tensors: Mapping[str, TensorInfo], path: str, params: Any, path_map: PathMap | None,
          prefixes: Mapping[str, str | None], param_dtype: Any) -> tuple[Lora, LoraConfig]:
  aliases = [Module(kohya + m.name[len(hf):].replace(".", "_"), m.path, m.kind)
             for m in modules(params, path_map) if m.kind != "embedding"
             for kohya, hf in prefixes.items() if hf is not None and m.name.startswith(hf)]
  skipped = tuple(k for k, hf in prefixes.items() if hf is None)
  parts, unexpected = parts_by_module(tensors, _KEY)
  parts = {name: p for name, p in parts.items() if not (skipped and name.startswith(skipped))}
  found, unknown = by_name(aliases, parts)
  unexpected += [key for name in unknown for key in parts[name].values()]
  if unexpected:
    raise ValueError(f"{path} has keys that are not Kohya LoRA factors of these params: "
                     f"{', '.join(sorted(unexpected))}")
  missing = [f"{name}.{p}" for name in found for p in ("lora_down.weight", "lora_up.weight")
             if p not in parts[name]]
  if missing:
    raise ValueError(f"{path} is missing keys {', '.join(missing)}")
  if not found:
    raise ValueError(f"{path} holds no LoRA factors for these params")
  by_module: dict[Path, list[str]] = collections.defaultdict(list)
  for name, m in found.items():
    by_module[m.path].append(name)
  twice = [" and ".join(names) for names in by_module.values() if len(names) > 1]
  if twice:
    raise ValueError(f"{path} names one module under two prefixes: {'; '.join(twice)} (each a full set of "
                     "factors); keep one, or map the prefixes to different modules in prefix_map")
  factor_keys = [parts[n][p] for n in found for p in ("lora_down.weight", "lora_up.weight")]
  bad = [f"{k} ({tensors[k].dtype}, shape {list(tensors[k].shape)})" for k in factor_keys
         if tensors[k].dtype not in FLOAT_DTYPES or len(tensors[k].shape) < 2]
  bad += [f"{parts[n]['alpha']} (shape {list(tensors[parts[n]['alpha']].shape)})" for n in found
          if "alpha" in parts[n] and math.prod(tensors[parts[n]["alpha"]].shape) != 1]
  if bad:
    raise ValueError(f"{path}: factors must be floating-point matrices (2 or more axes) and each alpha one "
                     f"number; got {', '.join(bad)}")
  values = read_tensors(f, tensors, [*factor_keys, *(p["alpha"] for n, p in parts.items() if n in found
                                                     and "alpha" in p)])
  ranks = {m.path: int(tensors[parts[n]["lora_down.weight"]].shape[0]) for n, m in found.items()}
  alphas = {m.path: _alpha(values, parts[n]["alpha"], path) if "alpha" in parts[n] else ranks[m.path]
            for n, m in found.items()}
  cfg = exact_config(ranks, alphas, _most_common(ranks.values()), _most_common(alphas.values()),
                     param_dtype=param_dtype)
  targets = find_targets(params, cfg)
  lora: Lora = {}
  for name, m in found.items():
    t = targets[m.path]
    want_down, want_up = torch_shapes(t, m.kind)
    down, up = (values[parts[name][p]] for p in ("lora_down.weight", "lora_up.weight"))
    down = fit(down, want_down, f"{path}: {name}.lora_down.weight", t, unit_axes=True)
    up = fit(up, want_up, f"{path}: {name}.lora_up.weight", t, unit_axes=True)
    a, b = factors_from_torch(down, up, t, m.kind)
    set_path(lora, m.path, {"a": jnp.asarray(a, param_dtype), "b": jnp.asarray(b, param_dtype)})
  return lora, cfg


def _prefixes(prefix_map: Mapping[str, str | None] | None) -> dict[str, str | None]:
  if prefix_map is None:
    return dict(DEFAULT_PREFIXES)
  if not (isinstance(prefix_map, Mapping) and all(isinstance(k, str) for k in prefix_map)
          and all(v is None or isinstance(v, str) for v in prefix_map.values())):
    raise ValueError(f"prefix_map must map each Kohya prefix (a string) to a Hugging Face name prefix or "
                     f"None, like {DEFAULT_PREFIXES}; got {prefix_map!r:.200}")
  return dict(prefix_map)


def _alpha(values: Mapping[str, np.ndarray], key: str, path: str) -> float:
  alpha = float(values[key].reshape(()))
  if not math.isfinite(alpha):
    raise ValueError(f"{path}: {key} is {alpha}, not a finite number")
  return alpha


def _most_common(values: Any) -> Any:
  return collections.Counter(values).most_common(1)[0][0]
