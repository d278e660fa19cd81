"""PEFT's ``modules_to_save`` on disk: whole trained copies of some frozen modules.

PEFT trains a ``modules_to_save`` module (a classification head, an embedding) in full and
saves each of its tensors under the module's own name, in torch's layout:

    base_model.model.<tensor name>        e.g. base_model.model.classifier.weight  [labels, d]
                                               base_model.model.classifier.bias    [labels]

(in memory PEFT calls them ``<module>.modules_to_save.default.<leaf>``) and lists the modules in
``adapter_config.json``'s ``modules_to_save``. PEFT wraps every module whose name ends with an
entry (``key.endswith(entry)``, plain string suffix), so an entry may name a parent module:
``["pooler"]`` on BERT wraps ``bert.pooler`` and saves ``bert.pooler.dense.weight`` and ``.bias``;
loading takes a tensor when any of its enclosing modules (`enclosing_modules`) ends with an entry. Here those copies are the LoRA tree's `SAVED_KEY` subtree
(`lorax_jax.init`); a tensor name is the path map's name of the leaf (without a map: the Flax
path joined with ``.``, layout unchanged).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from lorax_jax import pathmap
from lorax_jax.config import LoraConfig
from lorax_jax.io.tensors import FLOAT_DTYPES, TensorInfo
from lorax_jax.lora_tree import Lora, check_saved, check_tokens
from lorax_jax.pathmap import PathMap
from lorax_jax.paths import Path, get_path, path_str, set_path
from lorax_jax.qarray import leaves_with_paths
from lorax_jax.targets import module_leaves

PREFIX = "base_model.model."
BASE_LAYER = "base_layer."
TOKEN_DELTA = ".token_adapter.trainable_tokens_delta"


def leaf_names(params: Any, path_map: PathMap | None) -> dict[str, tuple[Path, str]]:
  """``{tensor name: (path, kind)}`` for every leaf of ``params`` the map names (every leaf
  without a map)."""
  out = {}
  for path, _ in leaves_with_paths(params):
    mapped = (".".join(path), "param") if path_map is None else path_map.to_hf(path_str(path))
    if mapped is not None:
      out[mapped[0]] = (path, mapped[1])
  return out


def saved_tensors(lora: Lora, cfg: LoraConfig, params: Any, path_map: PathMap | None,
                  adapted: Iterable[str] = ()) -> tuple[dict[str, np.ndarray], list[str] | None]:
  """``(tensors, modules)``: the trained copies in ``lora`` as PEFT saves them, and the module
  names for ``adapter_config.json``'s ``modules_to_save`` (None without any). A bias trained by
  ``cfg.bias`` outside those modules is saved under its own name, or ``<module>.base_layer.bias``
  for a module of ``adapted`` (the LoRA modules: PEFT's wrapper holds the layer as ``base_layer``).

  Raises:
    ValueError: a saved leaf the path map does not name, or a `check_saved` error.
  """
  copies = check_saved(params, cfg, lora)
  names = {path: (name, kind) for name, (path, kind) in leaf_names(params, path_map).items()}
  in_modules, adapted = module_leaves(params, cfg), set(adapted)
  tensors, modules = {}, set()
  for path, x in copies.items():
    if path not in names:
      raise ValueError(f"modules_to_save leaf {path_str(path)} has no Hugging Face name in the path map; "
                       "add a rule for it")
    name, kind = names[path]
    module, _, leaf = name.rpartition(".")
    if path in in_modules:
      modules.add(module or name)
    elif module in adapted:
      name = f"{module}.{BASE_LAYER}{leaf}"
    tensors[PREFIX + name] = np.ascontiguousarray(pathmap.to_torch(np.asarray(x), kind))
  return tensors, sorted(modules) or None


def saved_keys(infos: Mapping[str, TensorInfo], config: Mapping[str, Any], params: Any,
               path_map: PathMap | None, where: str) -> tuple[dict[str, tuple[Path, str]], dict[str, tuple[Path, str]]]:
  """``({key: (path, kind)} of the file's ``modules_to_save`` tensors, the same of its trained
  biases)``. A ``modules_to_save`` key is ``PREFIX + name`` with ``name`` a leaf of ``params``
  enclosed by a module ending with an entry of the config's ``modules_to_save`` (PEFT's test); with
  the config's ``bias`` ``"lora_only"`` or ``"all"``, a bias key is any other ``PREFIX + name`` or
  ``PREFIX + <module>.base_layer.bias`` naming a leaf ``bias`` of ``params``. Each is checked
  against its leaf before anything is read.

  Raises:
    ValueError: a non-float tensor, or one whose shape is not the leaf's in torch's layout.
  """
  entries = config.get("modules_to_save") or []
  biases = config.get("bias") not in (None, "none")
  table = leaf_names(params, path_map)
  shapes = {path: np.shape(x) for path, x in leaves_with_paths(params)}
  found: tuple[dict[str, tuple[Path, str]], dict[str, tuple[Path, str]]] = ({}, {})
  for key, info in infos.items():
    name = key.removeprefix(PREFIX)
    if not key.startswith(PREFIX):
      continue
    if name in table and any(m.endswith(e) for m in enclosing_modules(name) for e in entries):
      kept = found[0]
    else:
      name = name.replace(f".{BASE_LAYER}bias", ".bias") if name.endswith(f".{BASE_LAYER}bias") else name
      if not (biases and name in table and name.rpartition(".")[2] == "bias"):
        continue
      kept = found[1]
    path, kind = table[name]
    want = pathmap.torch_shape(shapes[path], kind)
    if info.dtype not in FLOAT_DTYPES or info.shape != want:
      raise ValueError(f"{where}: {key} is {info.dtype} {info.shape}; the trained leaf {path_str(path)} "
                       f"needs a float tensor of shape {want}")
    kept[key] = (path, kind)
  return found


def token_tensors(lora: Lora, cfg: LoraConfig, params: Any, path_map: PathMap | None
                  ) -> tuple[dict[str, np.ndarray], dict[str, list[int]] | None]:
  """``(tensors, indices)``: the trainable token rows in ``lora`` as PEFT saves them
  (``<module>.token_adapter.trainable_tokens_delta``, ``[n, *row]``) and ``adapter_config.json``'s
  ``trainable_token_indices`` (``{module: indices}``; None without any).

  Raises:
    ValueError: a table the path map does not name, or a `check_tokens` error.
  """
  names = {path: name for name, (path, _) in leaf_names(params, path_map).items()}
  tensors, indices = {}, {}
  for path, (idx, rows) in check_tokens(params, cfg, lora).items():
    if path not in names:
      raise ValueError(f"trainable_token_indices table {path_str(path)} has no Hugging Face name in the path map; "
                       "add a rule for it")
    module = names[path].removesuffix(".weight")
    tensors[f"{PREFIX}{module}{TOKEN_DELTA}"] = np.ascontiguousarray(np.asarray(rows))
    indices[module] = list(idx)
  return tensors, indices or None


def token_keys(infos: Mapping[str, TensorInfo], config: Mapping[str, Any], params: Any, path_map: PathMap | None,
               where: str) -> dict[str, tuple[Path, tuple[int, ...]]]:
  """``{key: (table path, indices)}`` of the file's trainable token rows, the indices from the config's
  ``trainable_token_indices`` (a list: the one table the file holds rows of; a dict: the entry its module
  name ends with, as PEFT matches it), each checked against its table before anything is read.

  Raises:
    ValueError: rows without indices in the config, or of a table that ``params`` lack, or of the wrong
      shape or dtype; indices in the config without rows in the file.
  """
  entries = config.get("trainable_token_indices")
  keys = [k for k in infos if k.startswith(PREFIX) and k.endswith(TOKEN_DELTA)]
  if not keys and not entries:
    return {}
  table = leaf_names(params, path_map)
  shapes = {path: np.shape(x) for path, x in leaves_with_paths(params)}
  if isinstance(entries, list) and len(keys) != 1:
    raise ValueError(f"{where}: trainable_token_indices is a list (the input embedding's) but the file holds the "
                     f"rows of {len(keys)} tables ({', '.join(keys) or 'none'})")
  found = {}
  for key in keys:
    module = key.removeprefix(PREFIX).removesuffix(TOKEN_DELTA)
    idx = entries if isinstance(entries, list) else next(
        (v for k, v in (entries or {}).items() if module.endswith(k)), None)
    if idx is None or f"{module}.weight" not in table:
      raise ValueError(f"{where}: {key} holds trainable token rows of {module}, which "
                       + ("the adapter config's trainable_token_indices does not name" if idx is None
                          else "these params have no table for (load it with the model's path map)"))
    path, _ = table[f"{module}.weight"]
    want = (len(idx), *shapes[path][1:])
    if infos[key].dtype not in FLOAT_DTYPES or infos[key].shape != want:
      raise ValueError(f"{where}: {key} is {infos[key].dtype} {infos[key].shape}; the {len(idx)} trainable tokens "
                       f"of {path_str(path)} need a float tensor of shape {want}")
    found[key] = (path, tuple(idx))
  if entries and not found:
    raise ValueError(f"{where}: the adapter config's trainable_token_indices {entries!r} has no rows in the file "
                     f"(no key ending in {TOKEN_DELTA})")
  return found


def enclosing_modules(name: str) -> list[str]:
  """The module names enclosing the tensor ``name``, innermost first, as PEFT's ``named_modules``
  lists them (``"bert.pooler.dense.weight"``: ``bert.pooler.dense``, ``bert.pooler``, ``bert``); a
  name without ``.`` is its own module."""
  parts = name.split(".")
  return [".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1)] or [name]


def saved_tree(tensors: Mapping[str, np.ndarray], keys: Mapping[str, tuple[Path, str]], params: Any
               ) -> dict[str, Any]:
  """The LoRA tree's `SAVED_KEY` subtree from the file's tensors, each in its leaf's layout and
  dtype (NumPy arrays, for `lorax_jax.sharding.place_host_arrays`)."""
  tree: dict[str, Any] = {}
  for key, (path, kind) in keys.items():
    leaf = get_path(params, path)
    set_path(tree, path, pathmap.from_torch(tensors[key], kind, np.shape(leaf)).astype(np.dtype(leaf.dtype)))
  return tree
