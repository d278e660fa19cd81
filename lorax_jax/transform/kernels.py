"""The values the engine carries in place of a kernel: `LoraKernel` (a targeted kernel with its
factors) and `QuantizedKernel` (a quantized kernel followed lazily to its uses)."""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from lorax_jax.qarray import QArray
from lorax_jax.targets import accumulation_dtype, low_rank_update

# Each axis of a kernel in flight is labelled ``(side, i)`` by where the factors hold it:
#   ("s", i): stack axis i, shared by a and b (axis i of both);
#   ("a", i): a's own axis i after the rank (an input axis: "i" in `Target.axes`);
#   ("b", i): b's own axis i after the rank (an output axis: "o" in `Target.axes`).
Label = tuple[str, int]
ADAPTER = "K"  # the einsum letter of a mixed batch's adapter axis (the batch, once gathered per example)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraKernel:
  """A targeted kernel in flight: ``w`` as the model sees it now, plus its factors.

  ``a`` has axes ``(stack..., r, a-axes...)`` and ``b`` ``(stack..., r, b-axes...)``; the
  kernel's current axis ``j`` is ``labels[j]``. The update is ``scale · Σ_r a ⊗ b``. Rules reach
  the frozen weight only as ``w``; ``uses`` is the target's `LoraConfig.target_uses` (None: all).
  A DoRA kernel also carries ``g = m / ‖W + s · a ⊗ b‖`` (`dora.dora_scale`), laid out like ``b`` with a
  rank of 1, and is ``g ⊙ (w + scale · Σ_r a ⊗ b)``: rules move ``g`` wherever they move ``b``.

  In a mixed batch (``lora_apply(..., adapter_ids=ids)``) ``ids`` holds each example's row of the
  factors, which then have one more, leading axis (``lead`` = 1): the adapters, each adapter's own
  scale folded into its ``b``, then a zero adapter (the base model's rows, ``g`` = 1) and a NaN one
  (an id out of range under ``jit``). Layout rules move the factors' other axes as before
  (`factor_axis`, `rank_axis` count the leading one); a use gathers each example's factors
  (`per_example`) and contracts them over the batch.

  Inside a loop's body, ``invariant`` numbers the kernels the loop reads unchanged (its constants)
  that this one is built from (a concatenation of several: all of them), for the loop's cost rule
  (`core.Context.loop_invariants`); empty elsewhere.
  """

  w: jax.Array | QuantizedKernel
  a: jax.Array
  b: jax.Array
  labels: tuple[Label, ...] = dataclasses.field(metadata=dict(static=True))
  index: int = dataclasses.field(metadata=dict(static=True))
  scale: float = dataclasses.field(metadata=dict(static=True))
  uses: tuple[str, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))
  g: jax.Array | None = None
  ids: jax.Array | None = None
  invariant: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))

  @property
  def n_stack(self) -> int:
    return sum(1 for side, _ in self.labels if side == "s")

  @property
  def lead(self) -> int:
    """The factors' leading axes before the stack: 1 (the adapters) in a mixed batch, else 0."""
    return 0 if self.ids is None else 1

  @property
  def rank_axis(self) -> int:
    """The rank's axis in ``a``, ``b`` and ``g``."""
    return self.lead + self.n_stack

  def subscripts(self) -> tuple[str, str, str]:
    """einsum subscripts of ``a``, ``b`` and the kernel (``r`` is ``"R"``; in a mixed batch the
    factors' leading axis is `ADAPTER`, which the kernel does not have)."""
    kernel = string.ascii_lowercase[: len(self.labels)]
    where = {label: kernel[j] for j, label in enumerate(self.labels)}
    stack = ADAPTER * self.lead + "".join(where["s", i] for i in range(self.n_stack))
    a = stack + "R" + "".join(where["a", i] for i in range(self.a.ndim - self.rank_axis - 1))
    b = stack + "R" + "".join(where["b", i] for i in range(self.b.ndim - self.rank_axis - 1))
    return a, b, kernel

  def factor_axis(self, label: Label) -> int:
    """The axis of ``a`` (for an ``"a"`` or ``"s"`` label) or ``b`` (``"b"``, ``"s"``) holding ``label``."""
    side, i = label
    return self.lead + i if side == "s" else self.rank_axis + 1 + i

  def merged(self) -> jax.Array:
    """``w + scale · a ⊗ b`` (DoRA: times ``g``) in the kernel's current layout and dtype."""
    _, b_sub, k_sub = subs = self.subscripts()
    d = low_rank_update(subs, self.a, self.b, self.scale)
    w = dequantized(self.w)
    v = w.astype(accumulation_dtype(w, d)) + d
    if self.g is not None:
      v = jnp.einsum(f"{k_sub},{b_sub}->{k_sub}", v, self.g.astype(v.dtype))
    return v.astype(w.dtype)

  def per_example(self) -> LoraKernel:
    """A mixed batch's kernel with each example's factors (and ``g``) gathered from the adapters:
    the leading axis is now the batch. Their gradients scatter back to each example's adapter,
    so an adapter no example uses gets exactly zero."""
    take = lambda x: jnp.take(x, self.ids, axis=0)
    return dataclasses.replace(self, a=take(self.a), b=take(self.b), g=on_g(self, take))

  def g_units(self) -> str:
    """The einsum letters of ``g`` without its rank axis (its stack and output axes)."""
    return self.subscripts()[1].replace("R", "")

  def with_w(self, w: jax.Array | QuantizedKernel, labels: tuple[Label, ...] | None = None) -> LoraKernel:
    return dataclasses.replace(self, w=w, labels=self.labels if labels is None else labels)

  def along(self, label: Label, fn: Callable[[jax.Array, int], jax.Array]) -> LoraKernel:
    """This kernel with ``fn(x, axis)`` applied to each factor holding the kernel axis ``label``
    (both for a stack axis; ``g`` with ``b``), ``axis`` where that factor holds it."""
    side, axis = label[0], self.factor_axis(label)
    return dataclasses.replace(self, a=fn(self.a, axis) if side in "sa" else self.a,
                               b=fn(self.b, axis) if side in "sb" else self.b,
                               g=fn(self.g, axis) if side in "sb" and self.g is not None else self.g)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class QuantizedKernel:
  """A quantized kernel in flight: the stored `QArray` ``q`` and the layout-only equations
  (casts, transposes, reshapes, slices, splits, negation) the model has applied to its float
  value so far, replayed on ``deq(q)`` at each use. ``shape`` and ``dtype`` are the float
  value's now. A targeted kernel's `LoraKernel.w` may be one."""

  q: QArray
  ops: tuple[tuple[Any, int], ...]  # (equation, which of its outputs)
  shape: tuple[int, ...]
  dtype: Any

  @classmethod
  def of(cls, q: QArray) -> QuantizedKernel:
    return cls(q, (), q.shape, q.dtype)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  def then(self, eqn: jex.core.JaxprEqn, out: int) -> QuantizedKernel:
    """This kernel after output ``out`` of the layout equation ``eqn``."""
    aval = eqn.outvars[out].aval
    return QuantizedKernel(self.q, (*self.ops, (eqn, out)), tuple(aval.shape), aval.dtype)

  def dequantize(self) -> jax.Array:
    """The float value the model sees: ``deq(q)`` with the pending equations applied."""
    w = self.q.dequantize()
    for eqn, out in self.ops:
      w = rebind(eqn, [w])[out]
    return w

  def tree_flatten(self):
    return (self.q,), (self.ops, self.shape, self.dtype)

  @classmethod
  def tree_unflatten(cls, aux: tuple, children: Sequence[Any]) -> QuantizedKernel:
    return cls(children[0], *aux)


def dequantized(x: Any) -> Any:
  """``x``'s float value if it is a `QuantizedKernel`, else ``x``."""
  return x.dequantize() if isinstance(x, QuantizedKernel) else x


def on_g(k: LoraKernel, fn: Callable[[jax.Array], jax.Array]) -> jax.Array | None:
  """``fn(k.g)`` for a DoRA kernel (``g`` moves with ``b``), None otherwise."""
  return None if k.g is None else fn(k.g)


def rebind(eqn: jex.core.JaxprEqn, invals: Sequence[Any], **params: Any) -> list[Any]:
  """``eqn``'s primitive on the plain arrays ``invals``, ``params`` overriding its own, in the
  equation's context (its compute type and the like)."""
  bind_params = eqn.primitive.get_bind_params({**eqn.params, **params})
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*invals, **bind_params)
  return list(out) if eqn.primitive.multiple_results else [out]
