"""Which leaves of a params pytree are adapted, with what rank, alpha and axes.

A kernel ``W`` has one letter per axis (its *layout*, ``Target.axes``): ``"s"`` stacked
(``nn.scan`` layers, experts), ``"i"`` input (the ``a`` side), ``"o"`` output (the ``b`` side),
in any order (``"io"`` a Dense kernel, ``"oi"`` an ``[out, in]`` torch/Equinox weight, ``"sio"``
a scanned stack or an expert stack ``[E, in, out]``, ``"ioo"`` DenseGeneral q/k/v, ``"iiio"`` a conv
HWIO). With ``S``, ``I``, ``O`` the sizes of those axes in kernel order, the two factors are

    a: S + (r,) + I        b: S + (r,) + O        delta[k] = s · Σ_r a[S, r, I] · b[S, r, O]

so a Flax ``Dense`` kernel ``[in, out]`` gets ``a: [r, in]`` (PEFT's ``lora_A.weight``)
and ``b: [r, out]`` (PEFT's ``lora_B.weight`` transposed). Both layouts put the small
rank axis first, which is what XLA contracts fastest for the factor gradients
(``bench/`` measures it). An embedding table ``[vocab, features]`` has ``I = (vocab,)``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_jax.config import LoraConfig
from lorax_jax.paths import KERNEL_LEAVES, Path, matches, path_str
from lorax_jax.qarray import leaves_with_paths


QUERY_NAMES = ("query", "q_proj", "wq", "q", "to_q", "q_lin")
KEY_NAMES = ("key", "k_proj", "wk", "k", "to_k", "k_lin")
VALUE_NAMES = ("value", "v_proj", "wv", "v", "to_v", "v_lin")
SHORT_NAMES = ("q", "k", "v")  # only inside a module whose name says attention
OUT_NAMES = ("out", "o_proj", "out_proj", "wo", "o", "to_out", "c_proj", "out_lin")
HEAD_NAMES = ("lm_head", "head", "classifier", "score")


@dataclasses.dataclass(frozen=True)
class Target:
  """One adapted leaf: where it is and the shapes of its factors.

  Made by `find_targets`, never by hand. ``scale`` is ``alpha / r`` (``/ sqrt(r)`` with
  rsLoRA); ``axes`` has one letter per kernel axis (``"s"`` stacked, ``"i"`` input, ``"o"``
  output, `LoraConfig.kernel_axes`), from which ``a_shape`` ``[..., r, in]`` and ``b_shape``
  ``[..., r, out]`` follow.

  >>> import jax.numpy as jnp, lorax_jax
  >>> params = {"dense": {"kernel": jnp.zeros((4, 3))}}
  >>> t, = lorax_jax.find_targets(params, lorax_jax.LoraConfig(r=2, alpha=4, targets=["dense"])).values()
  >>> t.name, t.axes, t.scale, t.a_shape, t.b_shape
  ('dense/kernel', 'io', 2.0, (2, 4), (2, 3))
  """

  path: Path
  shape: tuple[int, ...]
  rank: int
  alpha: float
  scale: float
  axes: str
  uses: tuple[str, ...] | None = None  # `LoraConfig.target_uses`; None: every use
  layers: tuple[int, ...] | None = None  # adapted slices of the first stack axis; None: all
  dora: bool = False  # `LoraConfig.use_dora`: the factors come with a magnitude ``m``
  lora_bias: bool = False  # `LoraConfig.lora_bias`: ``lora_B``'s bias ``"bias"`` (shape `m_shape`)

  def _sizes(self, letter: str) -> tuple[int, ...]:
    return tuple(n for n, c in zip(self.shape, self.axes) if c == letter)

  @property
  def n_stack(self) -> int:
    return self.axes.count("s")

  @property
  def n_in(self) -> int:
    return self.axes.count("i")

  @property
  def stack_shape(self) -> tuple[int, ...]:
    return self._sizes("s")

  @property
  def in_shape(self) -> tuple[int, ...]:
    return self._sizes("i")

  @property
  def out_shape(self) -> tuple[int, ...]:
    return self._sizes("o")

  @property
  def a_shape(self) -> tuple[int, ...]:
    return (*self.stack_shape, self.rank, *self.in_shape)

  @property
  def b_shape(self) -> tuple[int, ...]:
    return (*self.stack_shape, self.rank, *self.out_shape)

  @property
  def m_shape(self) -> tuple[int, ...]:
    """DoRA's magnitude: one per output unit, ``S + O``."""
    return (*self.stack_shape, *self.out_shape)

  @property
  def bias_path(self) -> Path:
    """The frozen bias beside the kernel, which ``lora_B``'s bias (`LoraConfig.lora_bias`) adds to."""
    return (*self.path[:-1], "bias")

  @property
  def name(self) -> str:
    return path_str(self.path)

  def subscripts(self) -> tuple[str, str, str]:
    """einsum subscripts of ``a``, ``b`` and the kernel (the rank is ``"R"``)."""
    kernel = "".join(chr(ord("a") + j) for j in range(len(self.shape)))
    side = lambda c: "".join(k for k, x in zip(kernel, self.axes) if x == c)
    return side("s") + "R" + side("i"), side("s") + "R" + side("o"), kernel

  def delta(self, a: jax.Array, b: jax.Array) -> jax.Array:
    """``s · Σ_r a ⊗ b`` as a kernel-shaped array (float32 accumulation)."""
    return low_rank_update(self.subscripts(), *self.masked(a, b), self.scale)

  def masked(self, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(a, b)`` with the slices of the first stack axis outside ``layers`` set to zero.

    A select with a static mask of the layers: the unselected slices add nothing to ``A ⊗ B``
    and their gradients are exactly zero, whatever values the tree holds there.
    """
    if self.layers is None:
      return a, b
    mask = np.zeros(self.stack_shape[0], bool)
    mask[list(self.layers)] = True
    mask = mask.reshape(-1, *(1,) * (len(self.a_shape) - 1))
    return jnp.where(mask, a, jnp.zeros((), a.dtype)), jnp.where(mask, b, jnp.zeros((), b.dtype))

  def magnitude(self, w: jax.Array) -> jax.Array:
    """``‖W‖`` per output unit (over the input axes, ``S + O``): DoRA's initial ``m``."""
    a_sub, b_sub, k_sub = self.subscripts()
    w = jnp.asarray(w, accumulation_dtype(w))
    return jnp.sqrt(jnp.einsum(f"{k_sub},{k_sub}->{b_sub.replace('R', '')}", w, w))

  def dora_weight(self, w: jax.Array, a: jax.Array, b: jax.Array, m: jax.Array) -> jax.Array:
    """DoRA's ``W' = m ⊙ V / ‖V‖`` with ``V = W + s · a ⊗ b``, formed (float32 accumulation).

    The norm is per output unit over the input axes (`magnitude` of ``V``), as PEFT's
    ``get_weight_norm``, and detached from the gradient as PEFT's; ``m`` has shape `m_shape`.
    """
    v = jnp.asarray(w, accumulation_dtype(w, a, b)) + self.delta(a, b)
    _, b_sub, k_sub = self.subscripts()
    unit = b_sub.replace("R", "")
    g = m.astype(v.dtype) / jax.lax.stop_gradient(self.magnitude(v))
    return jnp.einsum(f"{k_sub},{unit}->{k_sub}", v, g)


def low_rank_update(subscripts: tuple[str, str, str], a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """``scale · Σ_r a ⊗ b`` accumulated in at least float32 (float64 factors stay float64), with
  ``subscripts`` the einsum subscripts of ``a``, ``b`` and the result (the kernel)."""
  a_sub, b_sub, k_sub = subscripts
  return scale * jnp.einsum(f"{a_sub},{b_sub}->{k_sub}", a, b, preferred_element_type=accumulation_dtype(a, b))


def accumulation_dtype(*xs: Any) -> Any:
  """The dtype a merge accumulates in: float32, or wider when an input is wider."""
  return jnp.promote_types(jnp.float32, jnp.result_type(*xs))


def find_targets(params: Any, cfg: LoraConfig, *, check_rank: bool = True) -> dict[Path, Target]:
  """The targets of ``cfg`` in ``params``, keyed by path, in tree order.

  A rank may exceed a kernel's input or output size (PEFT accepts it: ``ΔW = s·A⊗B`` is then of full
  rank at most, and the math holds), except with a PiSSA or OLoRA init, which takes ``r`` singular or
  QR directions of the kernel. ``check_rank=False`` skips that check (`axes_from_use` runs before the
  layouts are known).
  ``targets="all-linear"`` is decided here by names, the fallback where no apply function is at
  hand: every ``kernel`` or ``w`` of at least 2 axes and every 2-axis ``weight``, except in
  modules named as output heads (`HEAD_NAMES`). `axes_from_use` decides it by use instead
  (`find_linear`), which also finds kernels named otherwise (``gating_einsum``) and leaves out
  what is not a linear layer (a conv ``kernel``).

  Args:
    params: the params tree (arrays, `QArray`\\ s or ``jax.ShapeDtypeStruct``\\ s: only shapes
      and dtypes are read).
    cfg: what to adapt (`LoraConfig`'s ``target_fn``, ``targets`` or switches, ``exclude``,
      patterns, layers).
    check_rank: check that each rank fits its kernel (PiSSA and OLoRA inits only).

  Returns:
    ``{path: Target}``, ``path`` a tuple of strings.

  Raises:
    ValueError: nothing matched (the message lists a sample of the available paths),
      a matched leaf is not a float array of rank >= 2, its ``kernel_axes`` do not fit its
      shape, or (PiSSA, OLoRA) its rank ``r`` exceeds its input or output size.

  >>> import jax.numpy as jnp, lorax_jax
  >>> params = {"attn": {"query": {"kernel": jnp.zeros((8, 8))}, "out": {"kernel": jnp.zeros((8, 8))}},
  ...           "mlp": {"kernel": jnp.zeros((8, 16))}}
  >>> list(lorax_jax.find_targets(params, lorax_jax.LoraConfig()))  # Lorax's default: query, key, value
  [('attn', 'query', 'kernel')]
  >>> [t.name for t in lorax_jax.find_targets(params, lorax_jax.LoraConfig(targets="all-linear")).values()]
  ['attn/out/kernel', 'attn/query/kernel', 'mlp/kernel']
  """
  found: dict[Path, Target] = {}
  all_paths = []
  saved = saved_leaves(params, cfg)
  layered = cfg.layers_to_transform is not None
  layer_of = {path: _layer_index(path, cfg.layers_pattern) for path, _ in leaves_with_paths(params)} if layered else {}
  for path, leaf in leaves_with_paths(params):
    if np.ndim(leaf) >= 2:
      all_paths.append(path_str(path))
    if path in saved or not _is_target(path, leaf, cfg):
      continue
    shape = tuple(np.shape(leaf))
    if len(shape) < 2 or not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise ValueError(
          f"LoRA target {path_str(path)} must be a float kernel of rank >= 2, got "
          f"shape {shape} dtype {jnp.result_type(leaf)}")
    name = path_str(path)
    rank = int(_lookup(cfg.rank_pattern, name, cfg.r))
    alpha = float(_lookup(cfg.alpha_pattern, name, cfg.alpha))
    axes = layout(_lookup(cfg.kernel_axes, name, None) or _default_axes(path, shape), len(shape))
    if len(axes) != len(shape) or "i" not in axes or "o" not in axes:
      raise ValueError(
          f"LoRA target {name}: kernel_axes {axes!r} must give one of s/i/o per axis of shape "
          f"{shape}, with at least one 'i' and one 'o'")
    uses = _lookup(cfg.target_uses, name, None)
    t = Target(path, shape, rank, alpha, cfg.scale(rank, alpha), axes,
               None if uses is None else tuple(uses), dora=cfg.use_dora, lora_bias=cfg.lora_bias)
    if layered:
      t = _select_layers(t, layer_of[path], cfg)
      if t is None:
        continue
    if check_rank and cfg.changes_base and rank > min(math.prod(t.in_shape), math.prod(t.out_shape)):
      raise ValueError(
          f"LoRA target {name}: rank {rank} exceeds its input size {math.prod(t.in_shape)} or "
          f"output size {math.prod(t.out_shape)} (shape {shape}, axes {axes!r}), and init={cfg.init!r} takes "
          "that many singular or QR directions of the kernel; lower r or rank_pattern for it")
    found[path] = t
  if layered:
    _check_layers(found, layer_of, cfg)
  if cfg.lora_bias:
    _check_lora_bias(params, found)
  if not found:
    sample = ", ".join(all_paths[:12]) + (", ..." if len(all_paths) > 12 else "")
    raise ValueError(f"LoraConfig matches no parameter; available kernels: {sample or '(none)'}")
  _warn_unmatched_patterns(cfg, found)
  return found


def _check_lora_bias(params: Any, found: Mapping[Path, Target]) -> None:
  """Each target of a ``lora_bias`` config has a float bias of shape ``S + O`` beside its kernel
  (PEFT refuses ``lora_bias`` on a layer without a bias) and is adapted at every layer.

  Raises:
    ValueError: naming the target and what is wrong.
  """
  leaves = dict(leaves_with_paths(params))
  for t in found.values():
    bias = leaves.get(t.bias_path)
    if bias is None or tuple(np.shape(bias)) != t.m_shape or not jnp.issubdtype(jnp.result_type(bias), jnp.floating):
      got = "none" if bias is None else f"{tuple(np.shape(bias))} {jnp.result_type(bias)}"
      raise ValueError(f"LoraConfig.lora_bias: target {t.name} needs a float bias {path_str(t.bias_path)} of shape "
                       f"{t.m_shape} beside its kernel (lora_B's bias adds to it), got {got}; PEFT refuses "
                       "lora_bias on a layer without a bias too: leave such layers out of the targets")
    if t.layers is not None:
      raise ValueError(f"LoraConfig.lora_bias: target {t.name} is a stacked kernel adapted at some layers only "
                       "(layers_to_transform); lora_bias needs every layer of it")


def _warn_unmatched_patterns(cfg: LoraConfig, found: Mapping[Path, Target]) -> None:
  """Warn of ``rank_pattern`` / ``alpha_pattern`` keys that match no target: they are ignored
  (PEFT warns of the same), most likely a typo."""
  for field in ("rank_pattern", "alpha_pattern"):
    unmatched = [k for k in getattr(cfg, field) if not any(matches(k, path_str(p)) for p in found)]
    if unmatched:
      warnings.warn(f"LoraConfig.{field} keys {unmatched} match no LoRA target and are ignored (targets: "
                    f"{', '.join(path_str(p) for p in list(found)[:6])}{', ...' if len(found) > 6 else ''})",
                    stacklevel=3)


def saved_leaves(params: Any, cfg: LoraConfig) -> dict[Path, Any]:
  """The leaves of ``params`` trained in full, keyed by path in tree order: those under a module
  named by ``cfg.modules_to_save`` (a module matches as in `matches`: a regex full-matching its
  ``/``-joined path, or a name suffix of it; the leaf itself counts as a module) and the biases
  ``cfg.bias`` trains (`trained_biases`).

  Raises:
    ValueError: a name that matches no module (the message lists the top-level modules), or a
      matched leaf that is not a float array.
  """
  modules = module_leaves(params, cfg)
  if cfg.bias == "none":
    return modules
  biases = trained_biases(params, cfg)
  return {path: leaf for path, leaf in leaves_with_paths(params) if path in modules or path in biases}


def trained_biases(params: Any, cfg: LoraConfig) -> dict[Path, Any]:
  """The biases PEFT's ``bias`` option trains, keyed by path in tree order: for ``"all"`` every float
  leaf named ``bias`` (PEFT: every parameter ``bias`` or ``*.bias``), for ``"lora_only"`` the ``bias``
  leaf beside each target's kernel (PEFT: the bias of each adapted layer that has one), for
  ``"none"`` none."""
  if cfg.bias == "none":
    return {}
  if cfg.bias == "lora_only":
    wanted = {(*path[:-1], "bias") for path in find_targets(params, cfg.replace(bias="none"))}
  else:
    wanted = {path for path, _ in leaves_with_paths(params) if path[-1] == "bias"}
  return {path: leaf for path, leaf in leaves_with_paths(params)
          if path in wanted and hasattr(leaf, "shape") and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)}


def token_rows(params: Any, cfg: LoraConfig) -> dict[Path, tuple[int, ...]]:
  """``{table path: token indices}`` of ``cfg.trainable_token_indices``, in tree order: each key matches
  (as in ``rank_pattern``) float tables ``[vocab, *row]`` whose rows are indexed on the first axis.

  Raises:
    ValueError: a key matching no leaf, a table that is not a float array of rank >= 2, an index
      past its vocabulary, or a table that is also a LoRA target or a ``modules_to_save`` leaf.
  """
  if not cfg.trainable_token_indices:
    return {}
  found, used = {}, set()
  for path, leaf in leaves_with_paths(params):
    key = next((k for k in cfg.trainable_token_indices if matches(k, path_str(path))), None)
    if key is None:
      continue
    used.add(key)
    idx = cfg.trainable_token_indices[key]
    shape = tuple(np.shape(leaf))
    if len(shape) < 2 or not jnp.issubdtype(jnp.result_type(leaf), jnp.floating) or max(idx) >= shape[0]:
      raise ValueError(f"LoraConfig.trainable_token_indices {key!r}: {path_str(path)} must be a float table "
                       f"[vocab, ...] with every index below its vocabulary, got shape {shape} and indices {idx}")
    found[path] = idx
  unused = [k for k in cfg.trainable_token_indices if k not in used]
  if unused:
    raise ValueError(f"LoraConfig.trainable_token_indices {unused[0]!r} matches no leaf of the params")
  plain = cfg.replace(trainable_token_indices={})
  clash = [path_str(p) for p in found if p in saved_leaves(params, plain)]
  clash += [path_str(p) for p in found if p in find_targets(params, plain)] if not clash else []
  if clash:
    raise ValueError(f"LoraConfig.trainable_token_indices: {clash[0]} is also a LoRA target or trained in full "
                     "(modules_to_save); PEFT refuses both on one layer too: pick one")
  return found


def module_leaves(params: Any, cfg: LoraConfig) -> dict[Path, Any]:
  """The leaves of ``params`` under a module named by ``cfg.modules_to_save`` (see `saved_leaves`)."""
  if not cfg.modules_to_save:
    return {}
  found, used = {}, set()
  for path, leaf in leaves_with_paths(params):
    names = [n for n in cfg.modules_to_save if any(matches((n,), path_str(path[:k])) for k in range(1, len(path) + 1))]
    if not names:
      continue
    if not hasattr(leaf, "shape") or not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise ValueError(f"modules_to_save: leaf {path_str(path)} is not a float array "
                       f"({type(leaf).__name__}); it cannot be trained")
    used.update(names)
    found[path] = leaf
  unused = [n for n in cfg.modules_to_save if n not in used]
  if unused:
    modules = sorted({path_str(p[:2]) for p, _ in leaves_with_paths(params)})
    raise ValueError(f"LoraConfig.modules_to_save {unused[0]!r} matches no module; modules: "
                     f"{', '.join(modules[:12])}{', ...' if len(modules) > 12 else ''}")
  return found


_INDEXED = re.compile(r"(?P<name>.+)_(?P<index>\d+)")


def _layer_index(path: Path, patterns: str | tuple[str, ...] | None) -> tuple[int | None, bool]:
  """``(index, named)``: the layer index in ``path`` (PEFT's ``_get_layer_index`` on ``/`` paths),
  and whether a component names the layer list (``layers_pattern`` full-matches it).

  A layer is a component ``NAME_i`` (Flax's ``layers_3``) or ``NAME`` followed by ``i`` (an NNX
  list); ``NAME`` must full-match a pattern when there are patterns. The first one found counts
  (a layer's index, not an expert's inside it).
  """
  names = (patterns,) if isinstance(patterns, str) else patterns
  ok = lambda name: names is None or any(re.fullmatch(p, name) for p in names)
  for j, part in enumerate(path[:-1]):  # the leaf's own name is no layer
    if part.isdigit() and j > 0 and ok(path[j - 1]):
      return int(part), True
    m = _INDEXED.fullmatch(part)
    if m and ok(m["name"]):
      return int(m["index"]), True
  return None, names is not None and any(ok(part) for part in path)


def _select_layers(t: Target, layer: tuple[int | None, bool], cfg: LoraConfig) -> Target | None:
  """``t`` if its layer is selected, ``t`` limited to the selected stack slices if it is a stacked
  kernel without a layer index (its first stack axis is the layers), else None (not a target)."""
  wanted = _wanted_layers(cfg)
  index, named = layer
  if index is not None:
    return t if index in wanted else None
  if not t.n_stack or (cfg.layers_pattern is not None and not named):
    return None
  n = t.stack_shape[0]
  if max(wanted) >= n:
    raise ValueError(f"LoRA target {t.name} stacks {n} layers on its first stack axis (shape {t.shape}, axes "
                     f"{t.axes!r}); layers_to_transform {list(wanted)} asks for layer {max(wanted)}")
  if t.dora:
    raise ValueError(f"LoRA target {t.name}: use_dora with layers_to_transform on a stacked kernel is not "
                     "supported (the magnitudes of the other layers would train); adapt all its layers, "
                     "or unroll the layers")
  return dataclasses.replace(t, layers=tuple(sorted(wanted)))


def _wanted_layers(cfg: LoraConfig) -> tuple[int, ...]:
  """``cfg.layers_to_transform`` as a tuple."""
  layers = cfg.layers_to_transform
  return (layers,) if isinstance(layers, int) else layers


def _check_layers(found: Mapping[Path, Target], layer_of: Mapping[Path, tuple[int | None, bool]],
                  cfg: LoraConfig) -> None:
  """``layers_pattern`` must name a component of some path, and every selected layer index must
  exist among the paths' layers (the stacked ones are checked in `_select_layers`)."""
  if cfg.layers_pattern is not None and not any(named for _, named in layer_of.values()):
    raise ValueError(f"LoraConfig.layers_pattern {cfg.layers_pattern!r} matches no component of any path "
                     "(it names the layer list, e.g. 'layers' for params/model/layers_3/...)")
  wanted = _wanted_layers(cfg)
  present = {i for i, _ in layer_of.values() if i is not None}
  stacked = any(t.layers is not None for t in found.values())
  missing = sorted(set(wanted) - present)
  if missing and not stacked:
    raise ValueError(f"LoraConfig.layers_to_transform: layer {missing[0]} is out of range; the params' layers "
                     f"(layers_pattern {cfg.layers_pattern!r}) are {sorted(present)}")


def _lookup(pattern: Mapping[str, Any], name: str, default: Any) -> Any:
  for key, value in pattern.items():
    if matches(key, name):
      return value
  return default


def _module_name(path: Path) -> str:
  """The name of the module owning a leaf: ``(..., "q_proj", "kernel") -> "q_proj"``."""
  if len(path) >= 2 and path[-1] in KERNEL_LEAVES:
    return path[-2]
  return path[-1]


def _is_target(path: Path, leaf: Any, cfg: LoraConfig) -> bool:
  if not hasattr(leaf, "shape") and not isinstance(leaf, np.ndarray):
    return False
  name = path_str(path)
  if cfg.exclude is not None and matches(cfg.exclude, name):
    return False
  if cfg.target_fn is not None:
    return bool(cfg.target_fn(path, leaf))
  if cfg.targets == "all-linear":
    linear = ((path[-1] in ("kernel", "w") and np.ndim(leaf) >= 2)
              or (path[-1] == "weight" and np.ndim(leaf) == 2))
    return linear and _module_name(path) not in HEAD_NAMES
  if cfg.targets is not None:
    return matches(cfg.targets, name)
  if np.ndim(leaf) < 2:
    return False
  module = _module_name(path)
  in_attention = any(re.search("attn|attention", p, re.IGNORECASE) for p in path[:-2])
  wanted = [names for names, on in ((QUERY_NAMES, cfg.target_query), (KEY_NAMES, cfg.target_key),
                                    (VALUE_NAMES, cfg.target_value)) if on]
  return any(module in names and (module not in SHORT_NAMES or in_attention) for names in wanted)


def layout(axes: str | tuple[int, int], ndim: int) -> str:
  """A ``kernel_axes`` value as a layout string: ``(n_stack, n_in)`` is ``"s"*n_stack + "i"*n_in``
  followed by ``"o"`` for the remaining axes of an ``ndim``-axis kernel."""
  if isinstance(axes, str):
    return axes
  n_stack, n_in = axes
  return "s" * n_stack + "i" * n_in + "o" * (ndim - n_stack - n_in)


def _default_axes(path: Path, shape: tuple[int, ...]) -> str:
  """The layout guessed from the names; ``kernel_axes`` or `axes_from_use` override it.

  A two-axis leaf named ``weight`` is ``[out, in]`` (``"oi"``: PyTorch, Equinox ``Linear``);
  other two-axis kernels (Flax ``kernel``, Haiku ``w``) and embeddings are ``[in, out]``; a
  multi-axis attention projection (Flax ``DenseGeneral``) is ``[d, heads, head_dim]`` for q/k/v
  and ``[heads, head_dim, d]`` for the output; anything else (a conv ``HWIO``) has one output
  axis. Stacked (``nn.scan``) kernels need ``kernel_axes`` or `axes_from_use`.
  """
  module = _module_name(path)
  if len(shape) == 2 and path[-1] == "weight":
    return "oi"
  if len(shape) == 2 or path[-1] == "embedding" or module in QUERY_NAMES + KEY_NAMES + VALUE_NAMES:
    return "i" + "o" * (len(shape) - 1)
  return "i" * (len(shape) - 1) + "o"
