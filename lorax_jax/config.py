"""`LoraConfig`: every LoRA hyper-parameter, validated at construction.

The adapted kernel is ``W' = W + s · A ⊗ B`` with ``s = alpha / r`` (``alpha / sqrt(r)``
with ``use_rslora``). Lorax's fields keep their names and defaults; PEFT's targeting
options (``targets``, ``exclude``, ``rank_pattern``, ``alpha_pattern``) sit beside them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

TargetFn = Callable[[tuple[str, ...], Any], bool]
INIT_SCHEMES = ("kaiming", "gaussian")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """What to adapt and how.

  Attributes:
    r: rank of the update (``r > 0``).
    alpha: scale numerator; the update is scaled by ``alpha / r``.
    dropout: LoRA dropout rate on the branch input, in ``[0, 1)``.
    dropout_seed: seed of the default dropout key, used when a call passes no ``rng``
      while ``dropout > 0``. ``None`` means no dropout without an explicit key.
    param_dtype: dtype of the factors ``a`` and ``b``.
    target_query, target_key, target_value: Lorax's switches; adapt the attention
      projections with the usual names (``query``, ``q_proj``, ``wq``, ``q`` inside an
      attention module, and the same for key and value).
    target_fn: Lorax's node predicate, ``target_fn(path, leaf) -> bool``. When given,
      it alone decides (``targets`` and the switches are ignored).
    targets: PEFT-style targets, used instead of the switches when given: a regex
      full-matched against the ``/``-joined path, a list of module-name suffixes
      (``["q_proj", "attn/out"]``), or ``"all-linear"`` (every kernel but output heads).
    exclude: regex or suffix list of paths never adapted.
    rank_pattern, alpha_pattern: per-target ``r`` and ``alpha`` overrides, keyed by a
      regex or name suffix (first match wins).
    kernel_axes: per-target layouts, keyed like ``rank_pattern``: a string with one letter
      per kernel axis, ``"s"`` stacked (``nn.scan`` layers, experts), ``"i"`` input (``a``
      side), ``"o"`` output (``b`` side), e.g. ``"oi"`` for an ``[out, in]`` weight, ``"sio"``
      for an expert stack ``[E, in, out]``; or ``(n_stack, n_in)``: the first ``n_stack`` axes
      stacked, the next ``n_in`` input, the rest output. `lorax_jax.axes_from_use` fills it
      from the kernels' uses.
    target_uses: per-target allowed uses, keyed like ``rank_pattern``: a tuple among
      ``"lookup"`` (gather), ``"matmul"`` (``dot_general``, ``ragged_dot``) and ``"conv"``; the
      target's other uses see the frozen ``W``. ``{"embed_tokens": ("lookup",)}`` is PEFT's
      tied embedding (adapted at the token lookup, not at the tied head); `merge` refuses it.
    branch_dtype: ``"factors"`` (PEFT's choice: the branch computes in the factors' dtype,
      its result cast to the layer's output dtype) or ``"kernel"`` (in the kernel's dtype as
      the model uses it: faster for a bf16 base on bf16 hardware, less precise).
    shared_dropout: targets reading the same input tensor share one dropout mask (one key per
      distinct input instead of one per target and use).
    use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA).
    init: ``"kaiming"`` (PEFT's default: ``a ~ U(±1/sqrt(fan_in))``, ``b = 0``) or
      ``"gaussian"`` (``a ~ N(0, 1/r²)``, ``b = 0``).
  """

  r: int = 1
  alpha: float = 2.0
  dropout: float = 0.0
  dropout_seed: int | None = None
  param_dtype: Any = jnp.float32
  target_query: bool = True
  target_key: bool = True
  target_value: bool = True
  target_fn: TargetFn | None = None
  targets: str | Sequence[str] | None = None
  exclude: str | Sequence[str] | None = None
  rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
  alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
  kernel_axes: Mapping[str, str | tuple[int, int]] = dataclasses.field(default_factory=dict)
  target_uses: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  branch_dtype: Literal["factors", "kernel"] = "factors"
  shared_dropout: bool = False
  use_rslora: bool = False
  init: Literal["kaiming", "gaussian"] = "kaiming"

  def __post_init__(self):
    _check_rank("r", self.r)
    for key, r in self.rank_pattern.items():
      _check_rank(f"rank_pattern[{key!r}]", r)
    for key, alpha in {"alpha": self.alpha, **self.alpha_pattern}.items():
      if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not np.isfinite(alpha):
        raise ValueError(f"LoraConfig: {key} must be a finite number, got {alpha!r}")
    if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoraConfig: dropout must be in [0, 1), got {self.dropout!r}")
    if self.dropout_seed is not None and not isinstance(self.dropout_seed, int):
      raise ValueError(f"LoraConfig: dropout_seed must be an int or None, got {self.dropout_seed!r}")
    if not jnp.issubdtype(jnp.dtype(self.param_dtype), jnp.floating):
      raise ValueError(f"LoraConfig: param_dtype must be a float dtype, got {self.param_dtype!r}")
    if self.init not in INIT_SCHEMES:
      raise ValueError(f"LoraConfig: init must be one of {INIT_SCHEMES}, got {self.init!r}")
    if self.target_fn is not None and not callable(self.target_fn):
      raise ValueError("LoraConfig: target_fn must be callable(path, leaf) -> bool")
    for name in ("targets", "exclude"):
      _check_patterns(name, getattr(self, name))
    for name in ("rank_pattern", "alpha_pattern", "kernel_axes", "target_uses"):
      _check_patterns(name, list(getattr(self, name)))
    for key, axes in self.kernel_axes.items():
      if isinstance(axes, str):
        if not axes or set(axes) - set("sio") or "i" not in axes or "o" not in axes:
          raise ValueError(f"LoraConfig: kernel_axes[{key!r}] must use the letters s/i/o with at "
                           f"least one 'i' and one 'o', got {axes!r}")
      elif (not isinstance(axes, (tuple, list)) or len(axes) != 2
            or not all(isinstance(n, int) and n >= 0 for n in axes) or axes[1] < 1):
        raise ValueError(f"LoraConfig: kernel_axes[{key!r}] must be a layout string like 'oi' or "
                         f"(n_stack >= 0, n_in >= 1), got {axes!r}")
    for key, uses in self.target_uses.items():
      if isinstance(uses, str) or not uses or set(uses) - {"lookup", "matmul", "conv"}:
        raise ValueError(f"LoraConfig: target_uses[{key!r}] must be a non-empty tuple among "
                         f"'lookup', 'matmul', 'conv', got {uses!r}")
    if self.branch_dtype not in ("factors", "kernel"):
      raise ValueError(f"LoraConfig: branch_dtype must be 'factors' or 'kernel', got {self.branch_dtype!r}")
    if (self.target_fn is None and self.targets is None
        and not (self.target_query or self.target_key or self.target_value)):
      raise ValueError("LoraConfig targets nothing: set target_query/key/value, targets or target_fn")

  def replace(self, **changes: Any) -> LoraConfig:
    """A copy with ``changes`` applied (and validated)."""
    return dataclasses.replace(self, **changes)

  def scale(self, r: int, alpha: float) -> float:
    """The factor ``s`` multiplying ``A ⊗ B`` for a target of rank ``r``."""
    return float(alpha) / (float(np.sqrt(r)) if self.use_rslora else float(r))


def _check_rank(name: str, r: Any) -> None:
  if not isinstance(r, (int, np.integer)) or isinstance(r, bool) or r <= 0:
    raise ValueError(f"LoraConfig: {name} must be a positive int, got {r!r}")


def _check_patterns(name: str, patterns: str | Sequence[str] | None) -> None:
  if patterns is None:
    return
  items = [patterns] if isinstance(patterns, str) else patterns
  if not isinstance(items, Sequence) or not all(isinstance(p, str) and p for p in items):
    raise ValueError(f"LoraConfig: {name} must be a regex or a list of names, got {patterns!r}")
  for p in items:
    try:
      re.compile(p)
    except re.error as e:
      raise ValueError(f"LoraConfig: {name} has an invalid regex {p!r}: {e}") from None
