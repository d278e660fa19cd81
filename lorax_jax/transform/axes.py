"""`axes_from_use`: each target's ``kernel_axes`` read off its uses by the axes walk (`core.Walk`)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax.config import LoraConfig
from lorax_jax.paths import Path, matches, path_str
from lorax_jax.qarray import is_quantized, leaves_with_paths
from lorax_jax.targets import find_targets
from lorax_jax.transform.apply import interleave, is_array
from lorax_jax.transform.core import Tracked, Walk

_ROLE_LETTER = {"stack": "s", "input": "i", "output": "o"}


def axes_from_use(apply_fn: Callable[..., Any], params: Any, cfg: LoraConfig, *args: Any,
                  **kwargs: Any) -> LoraConfig:
  """``cfg`` with ``kernel_axes`` filled for every target from how ``apply_fn`` uses it.

  Traces ``apply_fn(params, *args, **kwargs)`` abstractly (shapes only, no FLOPs) and follows each
  target through casts, transposes, reshapes, slices, splits, scalings, nested ``jit``/``remat``,
  functions with a custom derivative, ``scan`` (the scanned axis is stacked), ``cond`` and ``while`` to its uses, where each kernel
  axis gets a role: at ``dot_general`` contracted axes are input (``"i"``), batch axes stacked
  (``"s"``), free axes output (``"o"``); at ``ragged_dot`` the expert axis is stacked, the
  contracted input, the rest output; at a conv the output-feature axis is output, the others
  input; at an embedding ``gather`` the indexed axes are input, the gathered features output.
  Where a lookup and a matmul disagree (a tied embedding and its LM head) the lookup decides,
  as in PEFT. Axes of a target with no use seen keep their name-based default.

  ``LoraConfig(targets="all-linear")`` is decided here by use (`find_linear`: every leaf used
  as a linear layer's weight, but the output head), and the returned ``cfg`` targets exactly
  those paths (escaped); without ``axes_from_use`` it is the name rule of `find_targets`.

  >>> import jax, jax.numpy as jnp, lorax_jax
  >>> params = {"w": jnp.zeros((6, 4))}  # used as x @ W.T: a torch-style [out, in] weight
  >>> cfg = lorax_jax.axes_from_use(lambda p, x: x @ p["w"].T, params,
  ...                               lorax_jax.LoraConfig(r=2, targets=["w"]), jnp.zeros((3, 4)))
  >>> dict(cfg.kernel_axes)
  {'w': 'oi'}

  Args:
    apply_fn, params: as for `lora_transform`.
    cfg: the config; its explicit ``kernel_axes`` entries win over what the uses say.
    *args, **kwargs: example inputs (arrays or `jax.ShapeDtypeStruct`s).

  Returns:
    ``cfg`` with one ``kernel_axes`` entry per target, keyed by ``re.escape`` of its path.

  Raises:
    ValueError: two uses of a kernel give an axis different roles (the message names the kernel
      and the uses); set its ``kernel_axes`` explicitly. ``targets="all-linear"`` and no leaf is
      used as a linear layer.
  """
  if cfg.targets == "all-linear" and cfg.target_fn is None:
    linear = find_linear(apply_fn, params, *args, **kwargs)
    if not linear:
      raise ValueError("axes_from_use: LoraConfig(targets='all-linear') found no linear layer: apply_fn "
                       "multiplies no params leaf of >= 2 axes with an activation (dot_general, einsum, "
                       "ragged_dot); name the targets instead")
    cfg = cfg.replace(targets=[re.escape(path_str(path)) for path in linear])
  # Every candidate's axes, whatever its layer: the stack axes decide which layers a kernel holds.
  targets = find_targets(params, cfg.replace(layers_to_transform=None, layers_pattern=None), check_rank=False)
  roles = _walk(apply_fn, params, {path: t.shape for path, t in targets.items()}, args, kwargs).roles
  explicit = {re.escape(t.name): axes for t in targets.values()
              for pattern, axes in cfg.kernel_axes.items() if matches(pattern, t.name)}
  found = {}
  for n, t in enumerate(targets.values()):
    letters = list(t.axes)
    for j, by_use in ({} if re.escape(t.name) in explicit else roles[n]).items():
      kinds = set(by_use.values())
      lookup = {r for u, r in by_use.items() if u.startswith("gather")}
      if len(kinds) > 1 and len(lookup) == 1 and "stack" not in kinds:
        kinds = lookup
      if len(kinds) > 1:
        uses = "; ".join(f"{u}: {r}" for u, r in by_use.items())
        raise ValueError(f"axes_from_use: the uses of kernel {t.name} disagree on its axis {j} "
                         f"({uses}); set LoraConfig.kernel_axes for it")
      letters[j] = _ROLE_LETTER[kinds.pop()]
    found[re.escape(t.name)] = "".join(letters)
  filled = cfg.replace(kernel_axes={**found, **explicit, **cfg.kernel_axes})
  find_targets(params, filled)  # the rank check, now that the layouts are known
  return filled


def find_linear(apply_fn: Callable[..., Any], params: Any, *args: Any, **kwargs: Any) -> list[Path]:
  """The paths of the leaves ``apply_fn`` uses as linear layers, but the output head: PEFT's
  ``all-linear``, decided by use rather than by names.

  Traces ``apply_fn(params, *args, **kwargs)`` abstractly (shapes only) and follows every float
  leaf of at least two axes to its uses by the axes walk (through casts, transposes, reshapes,
  slices, scalings, nested ``jit``/``remat``, ``scan``, ``cond``, ``while``). A leaf is linear
  when some use contracts it against an activation with axes on both sides, ``y = x · W``: a
  ``dot_general`` (``@``, ``einsum``, ``Dense``, ``Einsum``) or ``ragged_dot`` with contracted and
  free kernel axes. Not linear: a leaf also looked up by a ``gather`` (an embedding, and so a
  head tied to it), a conv kernel, a norm scale or bias (one axis), a leaf never reached. The
  output head is left out as PEFT leaves out ``get_output_embeddings()``: the last linear use
  in trace order, when its output size equals the row count of the largest looked-up table
  (logits over the vocabulary; a head tied to the embedding is not linear already). A model without an embedding lookup (an MLP) keeps all its linears, as PEFT
  does for a plain ``nn.Module``; a classifier over labels is kept too, as PEFT keeps it without
  ``task_type="SEQ_CLS"`` (put it in ``LoraConfig.modules_to_save``, which PEFT does with it).

  >>> import jax.numpy as jnp, lorax_jax
  >>> params = {"embed": jnp.zeros((10, 4)), "norm": jnp.ones(4), "up": jnp.zeros((4, 8)),
  ...           "down": jnp.zeros((8, 4)), "head": jnp.zeros((4, 10))}
  >>> def apply_fn(p, ids):
  ...   h = p["embed"][ids] * p["norm"]
  ...   h = h + jnp.einsum("tf,fd->td", jnp.tanh(h @ p["up"]), p["down"])
  ...   return h @ p["head"]
  >>> lorax_jax.find_linear(apply_fn, params, jnp.zeros(3, jnp.int32))
  [('down',), ('up',)]

  Args:
    apply_fn: the model, ``apply_fn(params, *args, **kwargs)``.
    params: its params tree (arrays, `QArray`\\ s or ``jax.ShapeDtypeStruct``\\ s).
    *args, **kwargs: example inputs (arrays or `jax.ShapeDtypeStruct`\\ s).

  Returns:
    The linear leaves' paths, in tree order.
  """
  candidates = {path: tuple(np.shape(leaf)) for path, leaf in leaves_with_paths(params)
                if np.ndim(leaf) >= 2 and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)}
  walk = _walk(apply_fn, params, candidates, args, kwargs)
  looked_up = {n for n, use, _, _ in walk.uses if use == "gather"}
  vocab = max((size for n, use, size, _ in walk.uses if use == "gather"), default=None)
  linear = [(n, out) for n, use, size, out in walk.uses
            if use in ("dot_general", "ragged_dot") and size and out and n not in looked_up]
  heads = [n for n, out in linear[-1:] if out == vocab]
  kept = {n for n, _ in linear} - set(heads)
  return [path for n, path in enumerate(candidates) if n in kept]


class _UseWalk(Walk):
  """The axes walk, also listing each use in trace order as ``(target, use, input size, output
  size)``: the sizes are the products of the kernel axes the use makes input and output (0 when
  it makes none)."""

  def __init__(self, shapes: list[tuple[int, ...]]):
    super().__init__({n: {} for n in range(len(shapes))})
    self.shapes = shapes
    self.uses: list[tuple[int, str, int, int]] = []

  def note(self, x: Tracked, role_of: Callable[[int], str | None], use: str) -> None:
    super().note(x, role_of, use)
    n, axes = x
    sizes = {"input": [], "output": []}
    for pos, originals in enumerate(axes):
      sizes.get(role_of(pos), []).extend(self.shapes[n][j] for j in originals)
    self.uses.append((n, use, *(math.prod(s) if s else 0 for s in sizes.values())))


def _walk(apply_fn: Callable[..., Any], params: Any, kernels: Mapping[Path, tuple[int, ...]],
          args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> _UseWalk:
  """The axes walk of ``kernels`` (paths in ``params`` and their shapes, numbered in order) through
  ``apply_fn(params, *args, **kwargs)``, traced abstractly."""
  leaves, treedef = jax.tree_util.tree_flatten((params, args, kwargs), is_leaf=is_quantized)
  dynamic = [is_array(x) or isinstance(x, jax.ShapeDtypeStruct) for x in leaves]
  statics = [x for x, d in zip(leaves, dynamic) if not d]
  dyn = [jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x.dtype)) for x, d in zip(leaves, dynamic) if d]

  def fn(*dyn_leaves):
    p, a, kw = jax.tree_util.tree_unflatten(treedef, interleave(dynamic, dyn_leaves, statics))
    return apply_fn(p, *a, **kw)
  closed = jax.make_jaxpr(fn)(*dyn)
  dyn_index = np.cumsum(dynamic) - 1
  paths = [path for path, _ in leaves_with_paths(params)]
  env: list[Any] = [None] * len(dyn)
  for n, (path, shape) in enumerate(kernels.items()):
    env[int(dyn_index[paths.index(path)])] = (n, tuple(frozenset([j]) for j in range(len(shape))))
  walk = _UseWalk(list(kernels.values()))
  walk(closed.jaxpr, env)
  return walk
