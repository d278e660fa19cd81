"""`axes_from_use`: each target's ``kernel_axes`` read off its uses by the axes walk (`core.Walk`)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax.config import LoraConfig
from lorax_jax.paths import matches
from lorax_jax.qarray import is_quantized, leaves_with_paths
from lorax_jax.targets import find_targets
from lorax_jax.transform.apply import interleave, is_array
from lorax_jax.transform.core import Walk

_ROLE_LETTER = {"stack": "s", "input": "i", "output": "o"}


def axes_from_use(apply_fn: Callable[..., Any], params: Any, cfg: LoraConfig, *args: Any,
                  **kwargs: Any) -> LoraConfig:
  """``cfg`` with ``kernel_axes`` filled for every target from how ``apply_fn`` uses it.

  Traces ``apply_fn(params, *args, **kwargs)`` abstractly (shapes only, no FLOPs) and follows each
  target through casts, transposes, reshapes, slices, splits, scalings, nested ``jit``/``remat``,
  ``scan`` (the scanned axis is stacked), ``cond`` and ``while`` to its uses, where each kernel
  axis gets a role: at ``dot_general`` contracted axes are input (``"i"``), batch axes stacked
  (``"s"``), free axes output (``"o"``); at ``ragged_dot`` the expert axis is stacked, the
  contracted input, the rest output; at a conv the output-feature axis is output, the others
  input; at an embedding ``gather`` the indexed axes are input, the gathered features output.
  Where a lookup and a matmul disagree (a tied embedding and its LM head) the lookup decides,
  as in PEFT. Axes of a target with no use seen keep their name-based default.

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
      and the uses); set its ``kernel_axes`` explicitly.
  """
  # Every candidate's axes, whatever its layer: the stack axes decide which layers a kernel holds.
  targets = find_targets(params, cfg.replace(layers_to_transform=None, layers_pattern=None), check_rank=False)
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
  for n, path in enumerate(targets):
    env[int(dyn_index[paths.index(path)])] = (n, tuple(frozenset([j]) for j in range(len(targets[path].shape))))
  roles: dict[int, dict[int, dict[str, str]]] = {n: {} for n in range(len(targets))}
  Walk(roles)(closed.jaxpr, env)
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
