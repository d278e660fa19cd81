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

Sharded trees on disk (`lorax_jax.save_adapter`, `lorax_jax.load_adapter`): `host_arrays` brings
a tree to the host, each array gathered once (one collective for every array spread over
processes under ``jax.distributed``); `on_process_zero` writes from process 0 alone, every process
returning once the write is done; `place_host_arrays` puts host arrays on their shardings, each
device receiving only its slice.

Kernels without a ``NamedSharding`` (NumPy arrays, arrays on one device, abstract arrays without
a sharding) are *unplaced*: when no target's kernel and no ``modules_to_save`` leaf is placed,
every factor sits on the default device (``SingleDeviceSharding``), as before sharding existed;
otherwise the factors of an unplaced kernel are replicated (``P()``) over the mesh of the first
placed one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

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


def host_arrays(tree: Any) -> Any:
  """``tree`` with every leaf a NumPy array holding its whole value, in every process.

  A ``jax.Array`` sharded over devices of this process is copied shard by shard; the arrays that
  span processes (``jax.distributed``: not fully addressable) are all-gathered in one collective,
  each once (a replicated one is read from a local copy). Collective when any array spans
  processes: every process must call it with the same tree.

  Args:
    tree: any pytree of arrays (`lorax_jax.QArray` leaves are trees of arrays too).

  Returns:
    ``tree`` with NumPy leaves.

  >>> import jax, numpy as np, lorax_jax.sharding as S
  >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  >>> mesh = Mesh(np.array(jax.devices()[:1]), ("fsdp",))
  >>> tree = {"a": jax.device_put(np.arange(6.0).reshape(2, 3), NamedSharding(mesh, P(None, "fsdp")))}
  >>> host = S.host_arrays(tree)
  >>> type(host["a"]).__name__, host["a"].tolist()
  ('ndarray', [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
  """
  leaves, treedef = jax.tree.flatten(tree)
  spread = [i for i, x in enumerate(leaves)
            if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated]
  if spread:
    replicated = [_replicated(leaves[i].sharding) for i in spread]
    gathered = jax.jit(lambda xs: xs, out_shardings=replicated)([leaves[i] for i in spread])
    for i, x in zip(spread, gathered):
      leaves[i] = x
  local = lambda x: x.addressable_data(0) if isinstance(x, jax.Array) and not x.is_fully_addressable else x
  return jax.tree.unflatten(treedef, [np.asarray(local(x)) for x in leaves])


def place_host_arrays(tree: Any, shardings: Any, what: str) -> Any:
  """The host arrays of ``tree`` placed on ``shardings``, each device given only its slice
  (``jax.make_array_from_callback``: no whole copy on any one device first). Under
  ``jax.distributed`` every process holds the whole ``tree`` and places its own devices' slices.

  Args:
    tree: a pytree of NumPy arrays.
    shardings: one ``jax.sharding.Sharding`` for every leaf, or a tree of them with ``tree``'s
      structure (`lora_shardings`' result for a LoRA tree).
    what: the caller, named in errors.

  Returns:
    ``tree`` with ``jax.Array`` leaves, each on its sharding.

  Raises:
    ValueError: ``shardings`` is not a tree of ``Sharding``\\ s with ``tree``'s leaves (naming the
      leaves that differ), or a sharding that cannot hold its leaf (naming it).

  >>> import jax, numpy as np, lorax_jax.sharding as S
  >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  >>> s = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("fsdp",)), P(None, "fsdp"))
  >>> placed = S.place_host_arrays({"a": np.ones((2, 4), np.float32)}, {"a": s}, "example")
  >>> placed["a"].sharding == s
  True
  """
  if isinstance(shardings, Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)
  got = dict(jax.tree_util.tree_leaves_with_path(shardings))
  want = dict(jax.tree_util.tree_leaves_with_path(tree))
  if set(got) != set(want) or not all(isinstance(s, Sharding) for s in got.values()):
    name = lambda kp: path_str(tree_path(kp))
    missing = sorted(name(kp) for kp in set(want) - set(got))
    extra = sorted(name(kp) for kp in set(got) - set(want))
    odd = sorted(f"{name(kp)} ({type(s).__name__})" for kp, s in got.items() if not isinstance(s, Sharding))
    raise ValueError(
        f"{what}: shardings must hold one jax.sharding.Sharding per leaf of the tree (lorax_jax.lora_shardings "
        f"gives them for a LoRA tree){'; no sharding for ' + ', '.join(missing[:5]) if missing else ''}"
        f"{'; no such leaf: ' + ', '.join(extra[:5]) if extra else ''}"
        f"{'; not a Sharding: ' + ', '.join(odd[:5]) if odd else ''}")

  def place(kp: tuple, x: np.ndarray) -> jax.Array:
    try:
      return jax.make_array_from_callback(x.shape, got[kp], lambda index: x[index])
    except ValueError as e:
      raise ValueError(f"{what}: {path_str(tree_path(kp))} of shape {x.shape} cannot be placed on {got[kp]}: "
                       f"{e}") from None
  return jax.tree_util.tree_map_with_path(place, tree)


def on_process_zero(write: Callable[[], None], what: str) -> None:
  """Run ``write`` in process 0 only; every process returns once it has finished.

  With one process this is ``write()``. Under ``jax.distributed`` process 0 writes and then
  broadcasts whether it succeeded (a collective: no process gets past it before process 0's
  ``write`` returned, so what it wrote is visible to all); process 0 raises its own error, the
  others a ``RuntimeError`` saying so. Every process must call it.

  Args:
    write: what process 0 does (writing a file).
    what: what is written, named in the other processes' error.

  Raises:
    Exception: ``write``'s error, in process 0.
    RuntimeError: in the other processes, when ``write`` failed in process 0.

  >>> import lorax_jax.sharding as S
  >>> S.on_process_zero(lambda: print("written once"), "a note")
  written once
  """
  if jax.process_count() == 1:
    write()
    return
  error = None
  if jax.process_index() == 0:
    try:
      write()
    except Exception as e:  # every process must reach the broadcast below, or the others would hang
      error = e
  ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
  if error is not None:
    raise error
  if not ok:
    raise RuntimeError(f"{what}: writing it failed in process 0 (its error is in that process's output)")


def _replicated(s: Sharding) -> Sharding:
  """A sharding holding a whole copy on each device of ``s``."""
  if isinstance(s, NamedSharding):
    return NamedSharding(s.mesh, PartitionSpec())
  return NamedSharding(jax.sharding.Mesh(np.array(sorted(s.device_set, key=lambda d: d.id)), ("all",)), PartitionSpec())


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
