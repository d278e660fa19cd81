"""`LoraConfig`: every LoRA hyper-parameter, validated at construction.

The adapted kernel is ``W' = W + s · A ⊗ B`` with ``s = alpha / r`` (``alpha / sqrt(r)``
with ``use_rslora``). Lorax's fields keep their names and defaults; PEFT's targeting
options (``targets``, ``exclude``, ``rank_pattern``, ``alpha_pattern``) sit beside them.

A config is an immutable, hashable value: lists become tuples, mappings become `FrozenDict`,
numpy scalars become Python numbers, so equal configs hash equally and a config can be a
static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Generic, Literal, TypeVar

import jax.numpy as jnp
import numpy as np

TargetFn = Callable[[tuple[str, ...], Any], bool]
INIT_SCHEMES = ("kaiming", "gaussian", "orthogonal", "pissa", "olora")  # and "pissa_niter_<K>"
BASE_CHANGING_INITS = ("pissa", "olora")  # and "pissa_niter_<K>": their factors carry part of W
PISSA_NITER = re.compile(r"pissa_niter_(?P<niter>[0-9]+)")
BRANCH_DTYPES = ("factors", "kernel")
TARGET_USES = ("lookup", "matmul", "conv")
BIAS_MODES = ("none", "lora_only", "all")
MAX_RANK = 65536
SEED_RANGE = (-2**63, 2**63)  # what `jax.random.key` accepts

K = TypeVar("K")
V = TypeVar("V")


class FrozenDict(Mapping[K, V], Generic[K, V]):
  """An immutable, hashable, ordered mapping.

  Order is part of its value (a pattern mapping's first matching key wins), so two
  FrozenDicts, or a FrozenDict and a dict, are equal when they hold the same items in the same
  order.
  """

  __slots__ = ("_items", "_dict")

  def __init__(self, items: Mapping[K, V] | Sequence[tuple[K, V]] = ()):
    pairs = tuple(items.items()) if isinstance(items, Mapping) else tuple(items)
    object.__setattr__(self, "_dict", dict(pairs))
    object.__setattr__(self, "_items", tuple(self._dict.items()))

  def __getitem__(self, key: K) -> V:
    return self._dict[key]

  def __iter__(self) -> Iterator[K]:
    return iter(self._dict)

  def __len__(self) -> int:
    return len(self._items)

  def __hash__(self) -> int:
    return hash(self._items)

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, Mapping):
      return NotImplemented
    return self._items == tuple(other.items())

  def __setattr__(self, name: str, value: Any) -> None:
    raise AttributeError(f"FrozenDict is immutable: cannot set {name}")

  def __repr__(self) -> str:
    return f"FrozenDict({self._dict!r})"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """What to adapt and how.

  Attributes:
    r: rank of the update, an integer in ``[1, MAX_RANK]``.
    alpha: scale numerator; the update is scaled by ``alpha / r``. Finite and representable
      in ``param_dtype``.
    dropout: LoRA dropout rate on the branch input, in ``[0, 1)``.
    dropout_seed: seed of the default dropout key, used when a call passes no ``rng``
      while ``dropout > 0``. ``None`` means no dropout without an explicit key.
    param_dtype: float dtype of the factors ``a`` and ``b`` (stored as a ``numpy.dtype``).
    target_query, target_key, target_value: Lorax's switches; adapt the attention
      projections with the usual names (``query``, ``q_proj``, ``wq``, ``q`` inside an
      attention module, and the same for key and value).
    target_fn: Lorax's node predicate, ``target_fn(path, leaf) -> bool``. When given,
      it alone decides (``targets`` and the switches are ignored).
    targets: PEFT-style targets, used instead of the switches when given: a regex
      full-matched against the ``/``-joined path, a list of module-name suffixes
      (``["q_proj", "attn/out"]``, stored as a tuple), or ``"all-linear"`` (PEFT's: every linear
      layer but the output head; decided by use in `lorax_jax.axes_from_use`, by leaf names
      where the config is used without it).
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
    init: PEFT's ``init_lora_weights`` (``True`` is ``"kaiming"``): ``"kaiming"`` (PEFT's default:
      ``a ~ U(±1/sqrt(fan_in))``, ``b = 0``), ``"gaussian"`` (``a ~ N(0, 1/r²)``, ``b = 0``),
      ``"orthogonal"`` (even ``r``; ``A ⊗ B = 0`` from orthogonal halves), or the inits whose
      factors carry part of ``W`` and that need the residual base (`init_lora_and_base`):
      ``"pissa"`` (top-``r`` SVD), ``"pissa_niter_K"`` (randomized SVD, ``K`` power
      iterations) and ``"olora"`` (QR). The math is in `lorax_jax.init`.
    layers_to_transform: PEFT's layer filter, one layer index or a tuple of them (``None``: all
      layers). A target's layer is the index in its path after the layer-list module
      (``layers_3`` or ``layers/3``); a stacked (``nn.scan``) kernel without one has its layers
      on its first stack axis, and only the selected slices are adapted (the others' factors
      are held at zero). Targets without a layer are dropped, as in PEFT.
    layers_pattern: the name (a regex full-matching one path component) of the layer-list
      module, e.g. ``"layers"`` or ``"h"``; ``None``: the first indexed component. Only with
      ``layers_to_transform``.
    modules_to_save: PEFT's ``modules_to_save``: module-name suffixes or regexes (as in
      ``targets``) of modules trained in full, e.g. ``("classifier",)``. Every leaf under a
      matching module is copied into the LoRA tree (`lorax_jax.init.SAVED_KEY`) and used in
      place of the frozen one; such leaves are never LoRA targets.
    bias: PEFT's ``bias``: which frozen biases are trained in full beside the factors. ``"none"``;
      ``"lora_only"``: the ``bias`` leaf beside each target's kernel; ``"all"``: every leaf named
      ``bias``. Each is a trainable copy in the LoRA tree, held and used like a ``modules_to_save``
      leaf (`lorax_jax.init.SAVED_KEY`), saved under PEFT's key for it.
    lora_bias: PEFT's ``lora_bias``: ``lora_B`` has a bias ``c`` (the LoRA leaf ``"bias"``, shape
      `Target.m_shape`, initialised to zero), so the layer computes ``x·W + β + s·((dropout(x)·A)·B + c)``
      with ``β`` the frozen bias beside the kernel (which must exist, as in PEFT). ``s·c`` does not
      depend on ``x``, so it is added to ``β`` before the call (and by `merge`), PEFT's own merge.
    trainable_token_indices: PEFT's ``trainable_token_indices`` (dict form): embedding tables keyed like
      ``rank_pattern`` (``{"embed_tokens": (3, 7)}``), each with the token rows trained in full. The
      LoRA tree holds the rows (`lorax_jax.lora_tree.TOKENS_KEY`, ``[n, *row]``, initialised to the
      table's), and the table is used with those rows replaced at every use, a tied output head too.
    use_dora: DoRA (PEFT's ``use_dora``): ``W' = m ⊙ (W + s·A⊗B) / ‖W + s·A⊗B‖``, the norm per
      output unit over the input axes (stacked axes apart) and detached from the gradient, with a
      trainable magnitude ``m`` per output unit (the LoRA leaf ``"m"``, initialised to ``‖W‖``).

  Raises:
    ValueError: naming the field, the bad value and what is expected, for every field.

  >>> import lorax_jax
  >>> cfg = lorax_jax.LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 4})
  >>> cfg.targets, cfg.scale(cfg.r, cfg.alpha), cfg.replace(use_rslora=True).scale(16, 16)
  (('q_proj', 'v_proj'), 2.0, 4.0)
  >>> lorax_jax.LoraConfig(r=0)
  Traceback (most recent call last):
  ...
  ValueError: LoraConfig: r must be an integer rank in [1, ...], got 0
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
  targets: str | tuple[str, ...] | None = None
  exclude: str | tuple[str, ...] | None = None
  rank_pattern: Mapping[str, int] = FrozenDict()
  alpha_pattern: Mapping[str, float] = FrozenDict()
  kernel_axes: Mapping[str, str | tuple[int, int]] = FrozenDict()
  target_uses: Mapping[str, tuple[str, ...]] = FrozenDict()
  use_rslora: bool = False
  init: str = "kaiming"
  branch_dtype: Literal["factors", "kernel"] = "factors"
  shared_dropout: bool = False
  layers_to_transform: int | tuple[int, ...] | None = None
  layers_pattern: str | tuple[str, ...] | None = None
  modules_to_save: tuple[str, ...] | None = None
  use_dora: bool = False
  bias: Literal["none", "lora_only", "all"] = "none"
  lora_bias: bool = False
  trainable_token_indices: Mapping[str, tuple[int, ...]] = FrozenDict()

  def __post_init__(self):
    dtype = _float_dtype(self.param_dtype)
    alpha_limit = float(jnp.finfo(dtype).max)
    normal = {
        "r": _rank("r", self.r),
        "alpha": _alpha("alpha", self.alpha, alpha_limit),
        "dropout": _number("dropout", self.dropout),
        "dropout_seed": None if self.dropout_seed is None else _integer("dropout_seed", self.dropout_seed),
        "param_dtype": dtype,
        "targets": _patterns("targets", self.targets),
        "exclude": _patterns("exclude", self.exclude),
        "rank_pattern": _mapping("rank_pattern", self.rank_pattern, _rank),
        "alpha_pattern": _mapping("alpha_pattern", self.alpha_pattern,
                                  lambda name, v: _alpha(name, v, alpha_limit)),
        "kernel_axes": _mapping("kernel_axes", self.kernel_axes, _axes),
        "target_uses": _mapping("target_uses", self.target_uses, _uses),
        "trainable_token_indices": _mapping("trainable_token_indices", self.trainable_token_indices, _indices),
        "layers_to_transform": _layers(self.layers_to_transform),
        "layers_pattern": _patterns("layers_pattern", self.layers_pattern),
        "modules_to_save": _patterns("modules_to_save", self.modules_to_save),
    }
    normal |= {name: _bool(name, getattr(self, name))
               for name in ("target_query", "target_key", "target_value", "use_rslora", "shared_dropout",
                                                   "use_dora", "lora_bias")}
    for name, value in normal.items():
      object.__setattr__(self, name, value)
    if not 0.0 <= self.dropout < 1.0:
      _fail("dropout", self.dropout, "a rate in [0, 1)")
    if self.dropout_seed is not None and not SEED_RANGE[0] <= self.dropout_seed < SEED_RANGE[1]:
      _fail("dropout_seed", self.dropout_seed, "an int64 seed in [-2**63, 2**63), or None")
    if not (isinstance(self.init, str) and PISSA_NITER.fullmatch(self.init)):
      _choice("init", self.init, (*INIT_SCHEMES, "pissa_niter_<K>"))
    _choice("branch_dtype", self.branch_dtype, BRANCH_DTYPES)
    _choice("bias", self.bias, BIAS_MODES)
    if self.lora_bias and self.use_dora:
      _fail("lora_bias", self.lora_bias, "False with use_dora (lorax_jax does not implement DoRA with lora_B's bias)")
    if self.target_fn is not None:
      _check_target_fn(self.target_fn)
    if self.layers_pattern is not None and self.layers_to_transform is None:
      _fail("layers_pattern", self.layers_pattern, "None unless layers_to_transform is set (as in PEFT)")
    if isinstance(self.modules_to_save, str):
      object.__setattr__(self, "modules_to_save", (self.modules_to_save,))
    if (self.target_fn is None and self.targets is None
        and not (self.target_query or self.target_key or self.target_value)):
      raise ValueError("LoraConfig targets nothing: set target_query/key/value, targets or target_fn")

  def replace(self, **changes: Any) -> LoraConfig:
    """A copy with ``changes`` applied (and validated)."""
    return dataclasses.replace(self, **changes)

  @property
  def changes_base(self) -> bool:
    """Whether ``init`` is PiSSA or OLoRA: the initial factors hold part of ``W``, so the model
    trains on the residual base ``W - s · A₀ ⊗ B₀`` (`lorax_jax.init_lora_and_base`)."""
    return self.init in BASE_CHANGING_INITS or PISSA_NITER.fullmatch(self.init) is not None

  def scale(self, r: int, alpha: float) -> float:
    """The factor ``s`` multiplying ``A ⊗ B`` for a target of rank ``r``."""
    return float(alpha) / (float(np.sqrt(r)) if self.use_rslora else float(r))


def _fail(name: str, value: Any, expected: str) -> None:
  raise ValueError(f"LoraConfig: {name} must be {expected}, got {value!r}")


def _is_int(value: Any) -> bool:
  return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, (bool, np.bool_))


def _integer(name: str, value: Any) -> int:
  if not _is_int(value):
    _fail(name, value, "an integer")
  return int(value)


def _number(name: str, value: Any) -> float:
  if not (_is_int(value) or isinstance(value, (numbers.Real, np.floating))) or isinstance(value, (bool, np.bool_)):
    _fail(name, value, "a number")
  return float(value)


def _bool(name: str, value: Any) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    _fail(name, value, "True or False")
  return bool(value)


def _rank(name: str, value: Any) -> int:
  if not _is_int(value) or not 1 <= value <= MAX_RANK:
    _fail(name, value, f"an integer rank in [1, {MAX_RANK}]")
  return int(value)


def _alpha(name: str, value: Any, limit: float) -> float:
  alpha = _number(name, value)
  if not math.isfinite(alpha) or abs(alpha) > limit:
    _fail(name, value, f"a finite number within the factor dtype's range (|alpha| <= {limit:g})")
  return alpha


def _float_dtype(value: Any) -> np.dtype:
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    _fail("param_dtype", value, "a float dtype (float32, bfloat16, float16, ...)")
  return dtype


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  if not isinstance(value, str) or value not in choices:
    _fail(name, value, f"one of {choices}")


def _regex(name: str, pattern: Any) -> str:
  if not isinstance(pattern, str) or not pattern:
    _fail(name, pattern, "a non-empty regex or module-name string")
  try:
    re.compile(pattern)
  except re.error as e:
    raise ValueError(f"LoraConfig: {name} has an invalid regex {pattern!r}: {e}") from None
  return pattern


def _patterns(name: str, value: Any) -> str | tuple[str, ...] | None:
  """None, one regex, or a tuple of regexes / name suffixes."""
  if value is None or isinstance(value, str):
    return None if value is None else _regex(name, value)
  if not isinstance(value, (Sequence, set, frozenset)) or isinstance(value, (bytes, bytearray)):
    _fail(name, value, "a regex string or a list of module names")
  return tuple(_regex(f"{name}[{i}]", p) for i, p in enumerate(value))


def _mapping(name: str, value: Any, check: Callable[[str, Any], Any]) -> FrozenDict:
  """``value`` as a FrozenDict of regex keys to values checked by ``check(field, value)``."""
  if not isinstance(value, Mapping):
    _fail(name, value, "a mapping {regex or module name: value} ({} for none)")
  return FrozenDict({_regex(f"{name} key", k): check(f"{name}[{k!r}]", v) for k, v in value.items()})


def _layers(value: Any) -> int | tuple[int, ...] | None:
  """None, one layer index, or a tuple of distinct indices (a list becomes a tuple)."""
  if value is None or _is_int(value):
    if value is not None and value < 0:
      _fail("layers_to_transform", value, "a layer index >= 0, a list of them, or None")
    return None if value is None else int(value)
  if (not isinstance(value, (Sequence, set, frozenset)) or isinstance(value, (str, bytes)) or not value
      or not all(_is_int(v) and v >= 0 for v in value) or len(set(value)) != len(value)):
    _fail("layers_to_transform", value, "a layer index >= 0, a non-empty list of distinct ones, or None")
  return tuple(int(v) for v in value)


def _axes(name: str, value: Any) -> str | tuple[int, int]:
  if isinstance(value, str):
    if not value or set(value) - set("sio") or "i" not in value or "o" not in value:
      _fail(name, value, "a string of the letters s, i, o with at least one i and one o")
    return value
  if (not isinstance(value, (tuple, list)) or len(value) != 2 or not all(map(_is_int, value))
      or value[0] < 0 or value[1] < 1):
    _fail(name, value, "(n_stack >= 0, n_in >= 1) or a string of the letters s, i, o")
  return int(value[0]), int(value[1])


def _uses(name: str, value: Any) -> tuple[str, ...]:
  if (not isinstance(value, (tuple, list)) or not value or len(set(value)) != len(value)
      or not all(isinstance(u, str) and u in TARGET_USES for u in value)):
    _fail(name, value, f"a non-empty tuple of distinct uses from {TARGET_USES}")
  return tuple(value)


def _indices(name: str, value: Any) -> tuple[int, ...]:
  if (not isinstance(value, (tuple, list)) or not value or len(set(value)) != len(value)
      or not all(_is_int(i) and i >= 0 for i in value)):
    _fail(name, value, "a non-empty tuple of distinct token indices >= 0")
  return tuple(int(i) for i in value)


def _check_target_fn(fn: Any) -> None:
  if not callable(fn):
    _fail("target_fn", fn, "a callable target_fn(path, leaf) -> bool")
  try:
    signature = inspect.signature(fn)
  except (TypeError, ValueError):  # builtins without a signature: trust them
    return
  try:
    signature.bind(("params", "kernel"), None)
  except TypeError:
    _fail("target_fn", fn, f"a callable of two arguments (path, leaf), not {signature}")
