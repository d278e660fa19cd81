"""Where a `lorax_jax.models.llama.Llama` lives on a device mesh: a table of logical axis names per
param and a table of rules from logical axes to mesh axes, as MaxText shards its models.

Every param has one logical name per axis (`LLAMA_LOGICAL_AXES`, matched on the param's path):

    ==========================================  ===========================  ==========================
    param (``params/model/layers_i/…``)          shape                         logical axes
    ==========================================  ===========================  ==========================
    ``embed_tokens/embedding``                   ``[vocab, hidden]``           ``vocab, embed``
    ``self_attn/q_proj/kernel``                  ``[hidden, heads·head_dim]``  ``embed, heads``
    ``self_attn/k_proj|v_proj/kernel``           ``[hidden, kv·head_dim]``     ``embed, kv_heads``
    ``self_attn/o_proj/kernel``                  ``[heads·head_dim, hidden]``  ``heads, embed``
    ``mlp/gate_proj|up_proj/kernel``             ``[hidden, intermediate]``    ``embed, mlp``
    ``mlp/down_proj/kernel``                     ``[intermediate, hidden]``    ``mlp, embed``
    ``lm_head/kernel``                           ``[hidden, vocab]``           ``embed, vocab``
    a projection's bias                          its kernel's output axis      (the same name)
    every norm's ``weight``                      ``[hidden]`` or ``[head_dim]``  ``norm``
    ==========================================  ===========================  ==========================

Layers stacked for ``scan_layers`` (`lorax_jax.models.llama.stack_layers`: ``params/model/layers/…``)
have a leading axis named ``layers``. `LOGICAL_AXIS_RULES` then maps names to the axes of a mesh
``data × fsdp × tensor`` (`MESH_AXES`):

    =========  ====================  =================================================================
    name       mesh axes             why
    =========  ====================  =================================================================
    batch      ``data``, ``fsdp``    the examples of a batch (data parallelism, and FSDP's batch)
    embed      ``fsdp``              FSDP: each device stores a slice of every weight's hidden axis
    heads      ``tensor``            Megatron tensor parallelism: attention heads,
    kv_heads   ``tensor``            … key/value heads,
    mlp        ``tensor``            … the MLP's intermediate units,
    vocab      ``tensor``            … and the vocabulary
    layers     (none)                every device holds every layer (no pipeline)
    norm       (none)                small: replicated
    =========  ====================  =================================================================

A mesh axis the mesh lacks (a mesh ``data=8``) is dropped from the rule. An axis whose size the
mesh axes do not divide (a vocabulary of 259 over ``tensor=2``; for a quantized kernel, the
blocked axis into whole blocks) stays whole, and `llama_shardings` names it in its notes: the
result is the same, only less of that param is split.

The LoRA factors of a sharded kernel follow it (`lorax_jax.lora_shardings`: ``a`` the kernel's
input-axis entries, ``b`` its output-axis entries, the rank replicated).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lorax_jax.models.llama import STACKED
from lorax_jax.paths import path_str, tree_path
from lorax_jax.qarray import is_quantized

MESH_AXES = ("data", "fsdp", "tensor")
"""The mesh axes `LOGICAL_AXIS_RULES` names, in the order `make_mesh` lays devices out."""

LOGICAL_AXIS_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("vocab", ("tensor",)),
    ("layers", ()),
    ("norm", ()),
)
"""Logical axis name -> the mesh axes it is split over (the module's second table)."""

_LAYER = r"params/model/layers(?:_\d+)?/"
LLAMA_LOGICAL_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"params/model/embed_tokens/embedding", ("vocab", "embed")),
    (_LAYER + r"self_attn/q_proj/kernel", ("embed", "heads")),
    (_LAYER + r"self_attn/(?:k_proj|v_proj)/kernel", ("embed", "kv_heads")),
    (_LAYER + r"self_attn/o_proj/kernel", ("heads", "embed")),
    (_LAYER + r"self_attn/q_proj/bias", ("heads",)),
    (_LAYER + r"self_attn/(?:k_proj|v_proj)/bias", ("kv_heads",)),
    (_LAYER + r"self_attn/o_proj/bias", ("embed",)),
    (_LAYER + r"mlp/(?:gate_proj|up_proj)/kernel", ("embed", "mlp")),
    (_LAYER + r"mlp/down_proj/kernel", ("mlp", "embed")),
    (_LAYER + r"mlp/(?:gate_proj|up_proj)/bias", ("mlp",)),
    (_LAYER + r"mlp/down_proj/bias", ("embed",)),
    (_LAYER + r"(?:input_layernorm|post_attention_layernorm|self_attn/q_norm|self_attn/k_norm)/weight", ("norm",)),
    (r"params/model/norm/weight", ("norm",)),
    (r"params/lm_head/kernel", ("embed", "vocab")),
)
"""Param path (a regex, full-matched) -> the logical name of each of its axes (the module's first table)."""


def parse_mesh(text: str) -> dict[str, int]:
  """The mesh a ``--mesh`` setting spells: ``"data=2,fsdp=2,tensor=2"`` -> ``{"data": 2, ...}``.

  Args:
    text: comma-separated ``axis=size`` of `MESH_AXES`, each at most once, sizes positive.

  Returns:
    The axis sizes in `MESH_AXES` order.

  Raises:
    ValueError: a part that is not ``axis=size``, an unknown or repeated axis, a size that is not
      a positive integer.

  >>> parse_mesh("tensor=2, data=4")
  {'data': 4, 'tensor': 2}
  """
  sizes = {}
  for part in text.split(","):
    axis, equals, size = (x.strip() for x in part.partition("="))
    if not equals or axis not in MESH_AXES or axis in sizes or not size.isdigit() or int(size) < 1:
      raise ValueError(f"mesh {text!r}: {part.strip()!r} is not axis=size with a positive size, each axis of "
                       f"{', '.join(MESH_AXES)} at most once (e.g. data=2,fsdp=2,tensor=2)")
    sizes[axis] = int(size)
  return {a: sizes[a] for a in MESH_AXES if a in sizes}


def make_mesh(text: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `jax.sharding.Mesh` of all ``devices`` (default: every device of every process) with the
  axes ``text`` names (`parse_mesh`), laid out for the hardware by ``mesh_utils.create_device_mesh``.

  Args:
    text: the mesh, e.g. ``"data=2,fsdp=2,tensor=2"``.
    devices: the devices; their number must be the product of the sizes.

  Returns:
    The mesh.

  Raises:
    ValueError: a bad ``text`` (`parse_mesh`); sizes whose product is not the number of devices.

  >>> make_mesh("data=1", jax.devices()[:1]).shape
  OrderedDict([('data', 1)])
  """
  from jax.experimental import mesh_utils

  sizes = parse_mesh(text)
  devices = list(jax.devices() if devices is None else devices)
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f"mesh {text!r} has {math.prod(sizes.values())} places for {len(devices)} devices: make the "
                     f"sizes multiply to {len(devices)} (on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N "
                     "gives N devices)")
  grid = mesh_utils.create_device_mesh(tuple(sizes.values()), devices, allow_split_physical_axes=True)
  return Mesh(grid, tuple(sizes))


def logical_axes(path: str, ndim: int) -> tuple[str, ...]:
  """The logical names of the axes of the Llama param at ``path`` (`LLAMA_LOGICAL_AXES`; a stacked
  layer's param gets ``layers`` first).

  Args:
    path: the param's ``/``-joined path (``params/model/layers_0/mlp/up_proj/kernel``).
    ndim: its number of axes.

  Returns:
    One name per axis.

  Raises:
    ValueError: no rule matches ``path``, or the rule's names do not fit ``ndim`` axes.

  >>> logical_axes("params/model/layers/mlp/down_proj/kernel", 3)
  ('layers', 'mlp', 'embed')
  """
  for pattern, names in LLAMA_LOGICAL_AXES:
    if re.fullmatch(pattern, path):
      names = (("layers",) if f"/{STACKED}/" in path else ()) + names
      if len(names) != ndim:
        raise ValueError(f"Llama param {path} has {ndim} axes, the sharding table names {len(names)}: {names}")
      return names
  raise ValueError(f"Llama param {path} has no row in lorax_jax.models.llama_sharding.LLAMA_LOGICAL_AXES: "
                   "add one naming its axes")


def mesh_axes(name: str, mesh: Mesh) -> tuple[str, ...]:
  """The axes of ``mesh`` that logical axis ``name`` is split over (`LOGICAL_AXIS_RULES`, keeping the
  mesh's axes only).

  Raises:
    ValueError: ``name`` has no rule.

  >>> mesh_axes("batch", make_mesh("data=1", jax.devices()[:1]))
  ('data',)
  """
  rules = dict(LOGICAL_AXIS_RULES)
  if name not in rules:
    raise ValueError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES (rules: {', '.join(rules)})")
  return tuple(a for a in rules[name] if a in mesh.shape)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Arrays whose leading axis is the batch: split over the ``batch`` rule's mesh axes.

  >>> batch_sharding(make_mesh("data=1", jax.devices()[:1])).spec
  P('data',)
  """
  return NamedSharding(mesh, PartitionSpec(_entry(mesh_axes("batch", mesh))))


def _entry(axes: tuple[str, ...]) -> str | tuple[str, ...] | None:
  """A spec entry: None for no mesh axis, the name for one, the tuple for several."""
  return axes[0] if len(axes) == 1 else axes or None


def llama_shardings(params: Any, mesh: Mesh) -> tuple[Any, list[str]]:
  """``(shardings, notes)``: a ``NamedSharding`` per param of a Llama (per layer or stacked), by the
  module's two tables, and one note per axis that stays whole because its mesh axes do not divide it.

  Pass the shardings to `lorax_jax.shard_params` (a `lorax_jax.QArray` counts as one leaf: its float
  kernel's sharding, its blocked axis divided into whole blocks only).

  Args:
    params: the Llama's params (arrays, `lorax_jax.QArray`\\ s or ``jax.ShapeDtypeStruct``\\ s).
    mesh: a mesh over (some of) `MESH_AXES`.

  Returns:
    The tree of shardings (``params``' structure) and the notes.

  Raises:
    ValueError: a param without a row in `LLAMA_LOGICAL_AXES` (`logical_axes`).

  >>> import numpy as np
  >>> params = {"params": {"lm_head": {"kernel": np.zeros((8, 259), np.float32)}}}
  >>> shardings, notes = llama_shardings(params, make_mesh("fsdp=1,tensor=1", jax.devices()[:1]))
  >>> shardings["params"]["lm_head"]["kernel"].spec, notes
  (P('fsdp', 'tensor'), [])
  """
  notes = []

  def place(kp: tuple, leaf: Any) -> NamedSharding:
    path = path_str(tree_path(kp))
    entries = []
    for axis, name in enumerate(logical_axes(path, len(leaf.shape))):
      axes = mesh_axes(name, mesh)
      ways = math.prod(mesh.shape[a] for a in axes)
      unit = leaf.block_size if is_quantized(leaf) and axis == leaf.axis % leaf.ndim else 1
      if leaf.shape[axis] % (ways * unit):
        notes.append(f"{path} axis {axis} ({name}, size {leaf.shape[axis]}) is not split over {'×'.join(axes)}="
                     f"{ways}" + (f" in whole blocks of {unit}" if unit > 1 else "") + ": kept whole")
        axes = ()
      entries.append(_entry(axes))
    return NamedSharding(mesh, PartitionSpec(*entries))

  return jax.tree_util.tree_map_with_path(place, params, is_leaf=is_quantized), notes


def shard_llama(params: Any, mesh: Mesh) -> tuple[Any, list[str]]:
  """``(params, notes)``: ``params`` placed on ``mesh`` by `llama_shardings` (`lorax_jax.shard_params`).

  >>> import numpy as np
  >>> params = {"params": {"model": {"norm": {"weight": np.ones(4, np.float32)}}}}
  >>> placed, _ = shard_llama(params, make_mesh("fsdp=1", jax.devices()[:1]))
  >>> placed["params"]["model"]["norm"]["weight"].sharding.spec
  P(None,)
  """
  from lorax_jax.sharding import shard_params

  shardings, notes = llama_shardings(params, mesh)
  return shard_params(params, shardings), notes
