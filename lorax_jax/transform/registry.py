"""The engine's one rule registry: for each primitive, what the evaluator and the axes walk do.

A rule is registered once, beside its definition (``@rule("transpose", kind="layout",
walk=permuted_axes)``), as JAX registers batching and JVP rules; the evaluator (`core.evaluate`),
the quantized kernels' binding (`quantized.quantized_use`) and the axes walk (`core.Walk`) read
the same entry, and no primitive is named anywhere else.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, Literal

import jax.extend as jex

Kind = Literal["layout", "use", "nested"]
EvalRule = Callable[[jex.core.JaxprEqn, list[Any], Any], list[Any]]
WalkRule = Callable[[jex.core.JaxprEqn, list[Any], Any], list[Any] | None]
QuantizedRule = Callable[[jex.core.JaxprEqn, list[Any]], Any]
ObserveRule = Callable[[jex.core.JaxprEqn, list[Any], list[Any], Any], None]


@dataclasses.dataclass(frozen=True)
class Rule:
  """What the engine does with one primitive.

  ``kind`` says what the primitive is to a kernel: ``"layout"`` (the kernel is followed through it;
  a `QuantizedKernel` that is its only operand records it, to replay at the use), ``"use"`` (the
  kernel is consumed there: the low-rank branch is added) or ``"nested"`` (a nested computation
  the kernel is followed into; its ``eval`` also runs for a `QuantizedKernel` operand).
  ``eval(eqn, invals, ctx)`` runs when a `LoraKernel` is among the operands and returns the
  outputs; ``walk(eqn, ins, walk)`` is the same primitive in the axes walk: it maps the tracked
  operands' axes to the outputs' (None: nothing tracked leaves it) and notes roles at a use.
  ``quantized(eqn, invals)`` binds the primitive on a `QuantizedKernel` operand without
  dequantizing all of it (None where it cannot); ``observe(eqn, invals, outvals, ctx)`` sees the
  primitive run on plain arrays (what a later rule needs to know about its operands).
  """

  kind: Kind | None = None
  eval: EvalRule | None = None
  walk: WalkRule | None = None
  quantized: QuantizedRule | None = None
  observe: ObserveRule | None = None


NO_RULE = Rule()
RULES: dict[str, Rule] = {}


def register(name: str, **fields: Any) -> None:
  """Set ``fields`` of primitive ``name``'s `Rule`.

  Args:
    name: the primitive's name (``eqn.primitive.name``).
    **fields: `Rule` fields to set.

  Raises:
    ValueError: one of ``fields`` is already set for ``name`` (each is registered once).
  """
  old = RULES.get(name, NO_RULE)
  again = [f for f in fields if getattr(old, f) is not None]
  if again:
    raise ValueError(f"the {name} rule already has {', '.join(again)}")
  RULES[name] = dataclasses.replace(old, **fields)


def rule(*names: str, kind: Kind, walk: WalkRule) -> Callable[[EvalRule], EvalRule]:
  """Decorator: the decorated function is the ``eval`` rule of each primitive in ``names``, of
  ``kind``, with ``walk`` its rule in the axes walk.

  Args:
    *names: primitive names.
    kind: see `Rule`.
    walk: see `Rule`.

  Returns:
    The decorator, which returns the function unchanged.

  Raises:
    ValueError: a primitive in ``names`` already has an ``eval``, ``walk`` or ``kind``.
  """
  def decorate(fn: EvalRule) -> EvalRule:
    for name in names:
      register(name, kind=kind, eval=fn, walk=walk)
    return fn
  return decorate


@contextlib.contextmanager
def overridden(name: str, **fields: Any) -> Iterator[Rule]:
  """Within the block, primitive ``name``'s rule with ``fields`` replaced; the registry restored on
  exit (for tests and experiments: a `LoraApply` keeps what it compiled in the block).

  Args:
    name: the primitive's name.
    **fields: `Rule` fields to replace (None removes one).

  Yields:
    The rule in force within the block.
  """
  saved = dict(RULES)
  RULES[name] = dataclasses.replace(RULES.get(name, NO_RULE), **fields)
  try:
    yield RULES[name]
  finally:
    RULES.clear()
    RULES.update(saved)
