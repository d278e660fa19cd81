"""Where LoRA factors live on a mesh: each factor is sharded from its kernel.

A kernel of layout ``axes`` (`lorax_jax.targets`: ``s`` stacked, ``i`` input, ``o`` output) placed
by a ``NamedSharding`` with spec ``P(k_0, k_1, ...)`` (one entry per kernel axis, missing
trailing entries None) gives its factors the specs of the kernel axes they carry:

    =========  ==============  ==========================================================
    leaf       shape           spec
    =========  ==============  ==========================================================
    ``a``      S + (r,) + I    the kernel's entries of its ``s`` axes, None, of its ``i`` axes
    ``b``      S + (r,) + O    the kernel's entries of its ``s`` axes, None, of its ``o`` axes
    ``m``      S + O           (DoRA) the kernel's entries of its ``s`` axes, of its ``o`` axes
    saved      the leaf's      (``modules_to_save`` copies) the leaf's own sharding
    =========  ==============  ==========================================================

The rank axis is replicated (it is small, and every shard of ``x @ a`` needs all of it). So a
Dense ``[in, out]`` kernel on ``P("fsdp", "tensor")`` gets ``a: P(None, "fsdp")`` and
``b: P(None, "tensor")``; a torch ``[out, in]`` weight on the same spec ``a: P(None, "tensor")``,
``b: P(None, "fsdp")``; a scanned ``[L, in, out]`` kernel on ``P("stage", "fsdp", None)`` gets
``a: P("stage", None, "fsdp")``, ``b: P("stage", None, None)``. Every factor axis but the rank
has the size of the kernel axis it comes from, so a spec valid for the kernel is valid for it.

A quantized kernel (`lorax_jax.QArray`) is sharded through its stored arrays (`shard_quantized`);
its factors follow the same rule from the spec of the float kernel it stands for.

Kernels without a ``NamedSharding`` (NumPy arrays, arrays on one device, abstract arrays without
a sharding) are *unplaced*: when no target's kernel and no ``modules_to_save`` leaf is placed,
every factor sits on the default device (``SingleDeviceSharding``), as before sharding existed;
otherwise the factors of an unplaced kernel are replicated (``P()``) over the mesh of the first
placed one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from lorax_jax.config import LoraConfig
from lorax_jax.lora_tree import SAVED_KEY, TOKENS_KEY, Lora
from lorax_jax.paths import Path, path_str, set_path, tree_path
from lorax_jax.qarray import QArray, is_quantized, leaves_with_paths
from lorax_jax.targets import Target, find_targets, saved_leaves, token_rows


def factor_specs(t: Target, spec: PartitionSpec) -> dict[str, PartitionSpec]:
  """The specs of target ``t``'s factors for its kernel's ``spec`` (the module's table).

  Args:
    t: the target (its ``axes`` say which kernel axis is stacked, input or output).
    spec: the kernel's spec; missing trailing entries are None.

  Returns:
    ``{"a": ..., "b": ...}``, with ``"m"`` for DoRA and ``"bias"`` with ``lora_bias``.

  Raises:
    ValueError: ``spec`` has more entries than the kernel has axes.
  """
  entries = _entries(spec, len(t.shape), t.name)
  side = lambda c: tuple(e for e, x in zip(entries, t.axes) if x == c)
  specs = {"a": PartitionSpec(*side("s"), None, *side("i")), "b": PartitionSpec(*side("s"), None, *side("o"))}
  if t.dora:
    specs["m"] = PartitionSpec(*side("s"), *side("o"))
  if t.lora_bias:
    specs["bias"] = PartitionSpec(*side("s"), *side("o"))
  return specs


def lora_shardings(params: Any, cfg: LoraConfig) -> Lora:
  """The shardings of `lorax_jax.init_lora`'s result for ``params``: the module's rule.

  The tree has the structure of the LoRA tree (``{"a", "b"}`` per target, ``"m"`` with DoRA,
  the ``modules_to_save`` copies), a ``Sharding`` at every leaf: pass it as ``jax.jit``'s
  ``out_shardings`` for the gradients and trained factors (``jit`` does not infer them: the
  partitioner may give a gradient another spec than its factor's), to place optimizer state, or
  to restore a checkpoint.
  ``params`` may be abstract (``jax.ShapeDtypeStruct``\\ s with shardings): nothing is read.

  >>> import jax, numpy as np, lorax_jax as lj
  >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tensor"))
  >>> kernel = jax.device_put(np.ones((8, 16), np.float32), NamedSharding(mesh, P("fsdp", "tensor")))
  >>> params, cfg = {"q_proj": {"kernel": kernel}}, lj.LoraConfig(r=2)
  >>> shardings = lj.lora_shardings(params, cfg)["q_proj"]["kernel"]
  >>> shardings["a"].spec, shardings["b"].spec
  (P(None, 'fsdp'), P(None, 'tensor'))
  >>> lj.init_lora(params, cfg, jax.random.key(0))["q_proj"]["kernel"]["a"].sharding == shardings["a"]
  True

  Args:
    params: the params (any pytree; `lorax_jax.QArray` leaves allowed).
    cfg: the LoRA config.

  Returns:
    The tree of ``NamedSharding``\\ s, or of the default device's ``SingleDeviceSharding`` when
    nothing in ``params`` that LoRA reads is placed (the module docstring).

  Raises:
    ValueError: from `lorax_jax.find_targets`; a quantized kernel whose shards would cut its
      blocks.
  """
  return target_shardings(params, find_targets(params, cfg), saved_leaves(params, cfg), token_rows(params, cfg))


def target_shardings(params: Any, targets: Mapping[Path, Target], saved: Mapping[Path, Any],
                     tokens: Mapping[Path, Any] | None = None) -> Lora:
  """`lora_shardings` for the ``targets``, ``saved`` leaves and trainable-token ``tokens`` tables already
  found in ``params``."""
  leaves = dict(leaves_with_paths(params))
  placed = {path: kernel_sharding(path_str(path), leaves[path]) for path in (*targets, *saved)}
  mesh = next((s.mesh for s in placed.values() if s is not None), None)
  unplaced = SingleDeviceSharding(_default_device()) if mesh is None else NamedSharding(mesh, PartitionSpec())
  tree: Lora = {}
  for path, t in targets.items():
    s = placed[path]
    specs = factor_specs(t, PartitionSpec() if s is None else s.spec)
    set_path(tree, path, {k: unplaced if s is None else NamedSharding(s.mesh, spec) for k, spec in specs.items()})
  for path in saved:
    set_path(tree.setdefault(SAVED_KEY, {}), path, placed[path] or unplaced)
  for path in tokens or {}:  # a table's trained rows: its row axis replicated (a handful of rows)
    s = kernel_sharding(path_str(path), leaves[path])
    row_specs = None if s is None else _entries(s.spec, leaves[path].ndim, path_str(path))[1:]
    set_path(tree.setdefault(TOKENS_KEY, {}), path,
             unplaced if s is None else NamedSharding(s.mesh, PartitionSpec(None, *row_specs)))
  return tree


def kernel_sharding(name: str, leaf: Any) -> NamedSharding | None:
  """The ``NamedSharding`` of the float kernel ``leaf`` is (or stands for, if a `QArray`), or None
  if it is unplaced (the module docstring).

  Raises:
    ValueError: a `QArray` whose stored shards would cut its blocks (named ``name``).
  """
  if not is_quantized(leaf):
    return _named(leaf)
  stored = _named(leaf.data)
  if stored is None:
    return None
  entries = _entries(stored.spec, leaf.data.ndim, name)
  axis = leaf.axis % leaf.ndim
  sharding = NamedSharding(stored.mesh, PartitionSpec(*entries[:axis], entries[-1], *entries[axis:-1]))
  _check_blocks(name, leaf, sharding)
  return sharding


def shard_quantized(q: QArray, sharding: NamedSharding, *, name: str = "QArray") -> QArray:
  """``q`` placed as its float kernel would be on ``sharding``.

  The stored arrays are laid out ``[lead..., n]`` (the kernel's axes but the blocked one, then
  the blocked one: `lorax_jax.quantize`): ``data``, ``scale`` and ``zero`` get the kernel's spec
  entries in that order, double quantization's statistics are replicated. `kernel_sharding` of
  the result is ``sharding``.

  Args:
    q: the quantized kernel.
    sharding: a ``NamedSharding`` of the float kernel (one spec entry per logical axis).
    name: the kernel's name in errors (its path).

  Returns:
    A `QArray` with the same values, its arrays on ``sharding``'s mesh.

  Raises:
    ValueError: a shard of the blocked axis would not hold whole blocks.
  """
  _check_blocks(name, q, sharding)
  entries = _entries(sharding.spec, q.ndim, name)
  axis = q.axis % q.ndim
  stored = PartitionSpec(*entries[:axis], *entries[axis + 1:], entries[axis])
  blocked = ("data", "scale", "zero")
  children = [None if getattr(q, n) is None else
              jax.device_put(getattr(q, n), NamedSharding(sharding.mesh, stored if n in blocked else PartitionSpec()))
              for n in QArray.CHILDREN]
  return QArray.tree_unflatten(q.tree_flatten_with_keys()[1], children)


def shard_params(params: Any, shardings: Any) -> Any:
  """``params`` placed leaf by leaf on ``shardings`` (a tree of ``NamedSharding``\\ s matching
  ``params``, with a `QArray`'s the sharding of its float kernel: `shard_quantized`).

  Args:
    params: the params tree (float arrays and `QArray`\\ s).
    shardings: a tree of ``jax.sharding.NamedSharding``\\ s with ``params``' structure (a
      `QArray` counting as one leaf).

  Returns:
    ``params`` with every leaf on its sharding (a `QArray`'s children sharded to match).

  Raises:
    ValueError: from `shard_quantized`, naming the kernel's path.

  >>> import jax, numpy as np, lorax_jax
  >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tensor"))
  >>> params = {"q_proj": {"kernel": np.ones((8, 16), np.float32)}}
  >>> placed = lorax_jax.shard_params(params, {"q_proj": {"kernel": NamedSharding(mesh, P("fsdp", "tensor"))}})
  >>> placed["q_proj"]["kernel"].sharding.spec == P("fsdp", "tensor")
  True
  """
  def place(kp: tuple, leaf: Any, sharding: NamedSharding) -> Any:
    if is_quantized(leaf):
      return shard_quantized(leaf, sharding, name=path_str(tree_path(kp)))
    return jax.device_put(leaf, sharding)
  return jax.tree_util.tree_map_with_path(place, params, shardings, is_leaf=is_quantized)


def _named(x: Any) -> NamedSharding | None:
  """``x``'s ``NamedSharding``, or None."""
  s = getattr(x, "sharding", None)
  return s if isinstance(s, NamedSharding) else None


def _entries(spec: PartitionSpec, ndim: int, name: str) -> tuple[Any, ...]:
  """``spec``'s entries padded with None to ``ndim``."""
  if len(spec) > ndim:
    raise ValueError(f"{name}: sharding spec {spec} has {len(spec)} entries for {ndim} axes")
  return (*spec, *(None,) * (ndim - len(spec)))


def _check_blocks(name: str, q: QArray, sharding: NamedSharding) -> None:
  """A ``ValueError`` naming the kernel, its blocked axis and its block size unless every shard of
  that axis holds whole blocks."""
  axis = q.axis % q.ndim
  entry = _entries(sharding.spec, q.ndim, name)[axis]
  mesh_axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  ways = math.prod(sharding.mesh.shape[a] for a in mesh_axes)
  n = q.shape[axis]
  if n % (ways * q.block_size):
    raise ValueError(
        f"{name}: sharding axis {axis} (size {n}) {ways} ways over mesh axes {mesh_axes} would cut its "
        f"{q.fmt} blocks of {q.block_size} values (a shard would hold {n / ways:g} values); shard that "
        f"axis fewer ways, or quantize with a block size dividing {n // ways}")


def _default_device() -> jax.Device:
  """The device arrays are created on when nothing places them."""
  device = jax.config.jax_default_device
  if isinstance(device, str):
    return jax.local_devices(backend=device)[0]
  return device or jax.local_devices()[0]
