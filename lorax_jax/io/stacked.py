"""Stacked (``nn.scan``) kernels in per-layer adapter files.

A path map's stacked rule (`lorax_jax.pathmap`) names layer ``i`` of a leaf ``[L, ...]`` as one
module (``model.layers.{i}.self_attn.q_proj``), so PEFT sees a scanned model's adapter as the
unrolled model's. Saving writes the modules of the adapted layers only (``Target.layers``);
loading fills those slices and leaves the others' factors at zero, limited by
``layers_to_transform``, so they stay zero through training.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lorax_jax.io.modules import Module
from lorax_jax.paths import Path, matches, path_str
from lorax_jax.targets import Target


def layer_target(t: Target) -> Target:
  """One layer of ``t``: its kernel without the first stack axis."""
  j = t.axes.index("s")
  return dataclasses.replace(t, shape=t.shape[:j] + t.shape[j + 1:], axes=t.axes[:j] + t.axes[j + 1:], layers=None)


def module_target(t: Target, m: Module) -> Target:
  """The target of module ``m`` of ``t``: ``t``, or the layer ``m.layer`` of it.

  Raises:
    ValueError: ``m`` is a layer of a stacked leaf whose layout has no stack axis.
  """
  if m.layer is None:
    return t
  _check_stacked(t, m)
  return layer_target(t)


def module_factors(t: Target, a: Any, b: Any, m: Module) -> tuple[Target, Any, Any]:
  """``(target, a, b)`` of module ``m`` of ``t``: all of it, or the slice of ``m.layer``."""
  t_m = module_target(t, m)
  return (t, a, b) if m.layer is None else (t_m, np.asarray(a)[m.layer], np.asarray(b)[m.layer])


def stacked_fields(pairs: Sequence[tuple[Module, str, str]], params_shapes: Mapping[Path, tuple[int, ...]],
                   kernel_axes: Mapping[str, Any], where: str) -> dict[str, Any]:
  """The `LoraConfig` fields that load per-layer modules into their stacked leaves:
  ``kernel_axes`` with the layers on the first axis (``"s" + "i"... + "o"``) where ``kernel_axes``
  has none, and ``layers_to_transform`` (the layers in the file) unless they are all there.
  Empty without stacked modules.

  Raises:
    ValueError: stacked leaves adapted at different layers, or a file that adapts a stacked
      leaf and a module outside any layer (one ``layers_to_transform`` cannot say both).
  """
  layers: dict[Path, set[int]] = {}
  for m, _, _ in pairs:
    if m.layer is not None:
      layers.setdefault(m.path, set()).add(m.layer)
  if not layers:
    return {}
  given = [re.escape(path_str(p)) for p in layers if any(matches(k, path_str(p)) for k in kernel_axes)]
  axes = {re.escape(path_str(p)): "s" + "i" * (len(params_shapes[p]) - 2) + "o"
          for p in layers if re.escape(path_str(p)) not in given}
  fields: dict[str, Any] = {"kernel_axes": {**axes, **kernel_axes}}
  if all(len(v) == params_shapes[p][0] for p, v in layers.items()):
    return fields  # every layer: nothing to limit
  sets = {tuple(sorted(v)) for v in layers.values()}
  if len(sets) > 1:
    detail = "; ".join(f"{path_str(p)}: {sorted(v)}" for p, v in layers.items())
    raise ValueError(f"{where} adapts different layers of the stacked kernels ({detail}); lorax_jax adapts one "
                     "set of layers (layers_to_transform) in every stacked kernel")
  others = sorted({m.name for m, _, _ in pairs if m.layer is None})
  if others:
    raise ValueError(f"{where} adapts layers of stacked kernels and also {', '.join(others[:3])}, outside the "
                     "layers; lorax_jax's layers_to_transform would drop those")
  return {**fields, "layers_to_transform": sets.pop()}


def fill_layers(t: Target, parts: Sequence[tuple[Module, Any, Any]], dtype: Any) -> tuple[np.ndarray, np.ndarray]:
  """Stacked ``(a, b)`` of ``t`` from per-layer ``(module, a, b)``: zeros outside those layers."""
  a, b = np.zeros(t.a_shape, dtype), np.zeros(t.b_shape, dtype)
  for m, a_layer, b_layer in parts:
    _check_stacked(t, m)
    a[m.layer], b[m.layer] = a_layer, b_layer
  return a, b


def _check_stacked(t: Target, m: Module) -> None:
  if not t.n_stack:
    raise ValueError(f"LoRA target {t.name} stacks layers on its first axis in the path map ({m.name} is layer "
                     f"{m.layer}), but its layout {t.axes!r} has no stack axis: set kernel_axes with 's' first")
