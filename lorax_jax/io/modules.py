"""Adapter module names <-> Flax paths, and a `LoraConfig` that targets exactly given paths.

Adapter files name each adapted layer by its *module*. With a `PathMap` that is the Hugging
Face tensor name minus ``.weight`` (``model.layers.3.self_attn.q_proj``), so the file is the
one PEFT reads and writes for the matching torch model. Without one it is the Flax path
joined with ``.``, minus a final kernel leaf (``params.layers_3.attn.query`` for
``params/layers_3/attn/query/kernel``); any model can then save and load its own adapters.
Names are looked up in a table built from every kernel of ``params``, never parsed, so keys
containing ``_`` round-trip; two paths with the same name (keys containing ``.``) are an
error naming both.

A leaf of a stacked path-map rule (`lorax_jax.pathmap`, ``nn.scan`` layers on its first axis) is
one module per layer (``Module.layer``); an adapter holds the modules of the adapted layers.

A leaf of path-map kind ``"experts"`` (stacked MoE experts ``[E, in, out]``, torch ``[E, out, in]``)
or ``"router"`` (a MoE router's ``[in, out]`` kernel, torch's bare ``[out, in]`` parameter of a module
that is not an ``nn.Linear``) is a *parameter module*, PEFT's ``target_parameters``: named by its
whole tensor name (``model.layers.0.mlp.experts.gate_up_proj``, ``model.layers.0.mlp.gate.weight``).
PEFT's file names it by the module owning the parameter instead, one ``base_layer.`` deeper per
later-registered targeted parameter of that module (`wrapper_names`).

Each module has a *kind*, which fixes the torch layout of its factors: the path map's kind,
or without a map ``"embedding"`` for an ``embedding`` leaf, ``"conv"`` for a 4-axis
``kernel`` (Flax ``nn.Conv``, ``HWIO``), ``"linear"`` for any other kernel.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from lorax_jax.config import LoraConfig
from lorax_jax.pathmap import PathMap
from lorax_jax.paths import KERNEL_LEAVES, Path, path_str
from lorax_jax.qarray import leaves_with_paths

ADAPTABLE_KINDS = ("linear", "conv", "conv1d", "embedding")
PARAMETER_KINDS = ("router", "experts")  # a module that is an nn.Parameter (PEFT's target_parameters)


@dataclasses.dataclass(frozen=True)
class Module:
  """A kernel an adapter can name: its module name, Flax path and layout kind."""

  name: str
  path: Path
  kind: str
  layer: int | None = None  # the slice of a stacked leaf's first axis


def modules(params: Any, path_map: PathMap | None = None) -> list[Module]:
  """Every kernel of ``params`` that an adapter file can name (see the module docstring)."""
  found = []
  for path, leaf in leaves_with_paths(params):
    if np.ndim(leaf) < 2 or not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      continue
    if path_map is None:
      found.append(Module(_flax_name(path), path, _flax_kind(path, np.ndim(leaf))))
      continue
    layers = path_map.layer_names(path_str(path), np.shape(leaf)[0])
    if layers is not None and layers[1] in ADAPTABLE_KINDS:
      found += [Module(name.removesuffix(".weight"), path, layers[1], i) for i, name in enumerate(layers[0])]
      continue
    mapped = path_map.to_hf(path_str(path))
    if mapped is not None and mapped[1] in ADAPTABLE_KINDS and mapped[0].endswith(".weight"):
      found.append(Module(mapped[0].removesuffix(".weight"), path, mapped[1]))
    elif mapped is not None and mapped[1] in PARAMETER_KINDS:
      found.append(Module(mapped[0], path, mapped[1]))
  return found


def wrapper_names(mods: Iterable[Module], path_map: PathMap) -> dict[str, str]:
  """``{parameter module name: the module name PEFT's file gives its factors}`` for the parameter
  modules ``mods`` that one adapter targets (PEFT's ``lora.ParamWrapper``).

  PEFT wraps the module owning a parameter (``...mlp.experts``) once per targeted parameter, in
  the module's registration order (the path map's rule order), each wrapper around the last; the
  factors of the ``j``-th of ``k`` live in the ``(k - 1 - j)``-th wrapper from the outside, under
  ``<owner>`` followed by ``base_layer.`` that many times.

  >>> from lorax_jax.models.llama import LLAMA_PATH_MAP
  >>> mods = [Module(f"model.layers.0.mlp.experts.{p}", (), "experts") for p in ("down_proj", "gate_up_proj")]
  >>> mods.append(Module("model.layers.0.mlp.gate.weight", (), "router"))
  >>> wrapper_names(mods, LLAMA_PATH_MAP)
  {'model.layers.0.mlp.experts.gate_up_proj': 'model.layers.0.mlp.experts.base_layer', 'model.layers.0.mlp.experts.down_proj': 'model.layers.0.mlp.experts', 'model.layers.0.mlp.gate.weight': 'model.layers.0.mlp.gate'}
  """
  owners: dict[str, list[str]] = {}
  for m in mods:
    owners.setdefault(m.name.rpartition(".")[0], []).append(m.name)
  out = {}
  for owner, names in owners.items():
    names = sorted(set(names), key=path_map.rule_index)
    out.update({name: owner + ".base_layer" * (len(names) - 1 - j) for j, name in enumerate(names)})
  return out


def by_target(mods: Iterable[Module], targets: Mapping[Path, Any]) -> dict[Path, list[Module]]:
  """The modules of each target (`lorax_jax.targets.Target`): its one module, or for a stacked
  leaf one per adapted layer (``Target.layers``, all by default); errors as in `by_path`."""
  mods = list(mods)
  single = by_path([m for m in mods if m.layer is None], [p for p in targets if not _stacked(mods, p)])
  out = {}
  for path, t in targets.items():
    if path in single:
      out[path] = [single[path]]
    else:
      out[path] = [m for m in mods if m.path == path and (t.layers is None or m.layer in t.layers)]
  return out


def _stacked(mods: list[Module], path: Path) -> bool:
  return any(m.path == path and m.layer is not None for m in mods)


def by_path(mods: Iterable[Module], paths: Iterable[Path]) -> dict[Path, Module]:
  """The module of each path; a path with no name, or a name shared with another path, is an error."""
  table = {m.path: m for m in mods}
  counts: dict[str, list[Module]] = {}
  for m in table.values():
    counts.setdefault(m.name, []).append(m)
  out = {}
  for path in paths:
    if path not in table:
      raise ValueError(f"LoRA target {path_str(path)} has no module name (not in the path map, or "
                       f"not a linear/conv/embedding kernel there)")
    out[path] = _unique(counts[table[path].name])
  return out


def by_name(mods: Iterable[Module], names: Iterable[str]) -> tuple[dict[str, Module], list[str]]:
  """``({name: module}, unknown names)``; a name shared by two paths is an error."""
  table: dict[str, list[Module]] = {}
  for m in mods:
    table.setdefault(m.name, []).append(m)
  found, unknown = {}, []
  for name in names:
    if name in table:
      found[name] = _unique(table[name])
    else:
      unknown.append(name)
  return found, unknown


def parts_by_module(keys: Iterable[str], key_pattern: re.Pattern[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
  """``({module name: {part: key}}, other keys)``: the tensor keys ``key_pattern`` full-matches,
  grouped by its ``module`` group and named by its ``part`` group, and the keys it does not match."""
  parts: dict[str, dict[str, str]] = {}
  others = []
  for key in keys:
    if match := key_pattern.fullmatch(key):
      parts.setdefault(match["module"], {})[match["part"]] = key
    else:
      others.append(key)
  return parts, others


def align_names(names: Iterable[str], mods: Iterable[Module]) -> tuple[dict[str, str], Callable[[str], str]]:
  """``({adapter module name: module name of mods}, to_file)``, ``to_file`` mapping a module
  name of ``mods`` to the adapter's layout.

  A file saved for another layout of the same model differs by one leading component on
  its names (a PEFT adapter of a bare ``BertModel`` says ``encoder.layer.0...`` where
  ``BertForSequenceClassification`` says ``bert.encoder.layer.0...``): when adding, or when
  removing, one such prefix on every name that is not already a module name makes every name
  known, that is done. Otherwise names map to themselves (the caller reports unknown ones).
  """
  names = list(names)
  known = {m.name for m in mods}
  unknown = [n for n in names if n not in known]
  heads = sorted({n.split(".")[0] + "." for n in [*known, *names] if "." in n})
  for head in heads if unknown else ():
    add = {n: head + n for n in unknown}
    if all(v in known for v in add.values()):
      return {n: add.get(n, n) for n in names}, lambda m: m.removeprefix(head)
    if all(n.startswith(head) and n.removeprefix(head) in known for n in unknown):
      return ({n: n.removeprefix(head) if n in unknown else n for n in names},
              lambda m: m if m in names else head + m)
  return {n: n for n in names}, lambda m: m


def layout_hint(unknown: Iterable[str], mods: Iterable[Module]) -> str:
  """The likely cause of adapter module names ``unknown`` that ``mods`` lack, with the fix."""
  example = sorted(unknown)[0]
  names = sorted(m.name for m in mods)
  sample = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
  return (f"likely cause: the adapter was saved for another model or another layout of it (it names "
          f"{example!r}; these params name their modules {sample}): load it with the path map of the "
          "model it was trained on (without a path map, names are Flax paths joined with '.')")


def exact_config(ranks: Mapping[Path, int], alphas: Mapping[Path, float], r: int, alpha: float,
                 **fields: Any) -> LoraConfig:
  """A `LoraConfig` that targets exactly ``ranks``' paths, each with its own rank and alpha.

  ``targets`` is one regex of the escaped paths; every rank other than ``r`` and alpha
  other than ``alpha`` goes to ``rank_pattern`` / ``alpha_pattern`` (one regex per value).
  """
  return LoraConfig(r=int(r), alpha=float(alpha), targets=exact_regex(ranks),
                    rank_pattern=_pattern(ranks, r, int), alpha_pattern=_pattern(alphas, alpha, float),
                    **fields)


def _pattern(values: Mapping[Path, Any], default: Any, cast: type) -> dict[str, Any]:
  groups: dict[Any, list[Path]] = {}
  for path, v in values.items():
    if v != default:
      groups.setdefault(cast(v), []).append(path)
  return {exact_regex(paths): v for v, paths in groups.items()}


def exact_regex(paths: Iterable[Path]) -> str:
  """A regex full-matching exactly these ``/``-joined paths (never a suffix of another)."""
  return "(?:" + "|".join(re.escape(path_str(p)) for p in paths) + ")"


def _unique(candidates: list[Module]) -> Module:
  if len(candidates) > 1:
    paths = " and ".join(path_str(m.path) for m in candidates)
    raise ValueError(f"adapter module name {candidates[0].name!r} is ambiguous: {paths} both have it "
                     "(rename a key that contains '.' or pass a path_map)")
  return candidates[0]


def _flax_name(path: Path) -> str:
  return ".".join(path[:-1] if len(path) > 1 and path[-1] in KERNEL_LEAVES else path)


def _flax_kind(path: Path, ndim: int) -> str:
  if path[-1] == "embedding":
    return "embedding"
  return "conv" if path[-1] == "kernel" and ndim == 4 else "linear"
