"""`PathMap`: a declarative table between Flax param paths and Hugging Face tensor names.

Each rule is ``(flax_pattern, hf_pattern, kind)``: ``{i}`` (or any ``{name}``) stands for
a run of digits that must agree on both sides, and ``kind`` says how the tensor is laid
out in torch:

- ``"linear"``: Flax ``[in..., out]`` kernel (leading axes flattened), torch ``nn.Linear``
  ``[out, in]`` weight.
- ``"conv"``: Flax ``HWIO`` kernel, torch ``OIHW`` weight.
- ``"conv1d"``: Flax ``[in, out]`` kernel, transformers' ``Conv1D`` ``[in, out]`` weight (GPT-2):
  the same layout; an adapter's factors are a linear layer's (PEFT's ``fan_in_fan_out``).
- ``"router"``: a ``"linear"`` layout (Flax ``[in, out]``, torch ``[out, in]``) that torch holds as
  a bare ``weight`` parameter of a module that is not an ``nn.Linear`` (transformers' MoE router,
  ``MixtralTopKRouter``'s ``mlp.gate.weight``): an adapter names it whole, as PEFT's
  ``target_parameters`` (``model.layers.0.mlp.gate.weight``), since PEFT wraps only ``nn.Linear``
  modules as ``target_modules``.
- ``"experts"``: Flax ``[E, in, out]`` stacked expert kernels (``lax.ragged_dot``), torch
  ``[E, out, in]`` (transformers' fused MoE experts, ``mlp.experts.gate_up_proj``): the last two
  axes swapped. Such a tensor has no ``.weight`` suffix: an adapter names it whole (PEFT's
  ``target_parameters``).
- ``"embedding"`` and ``"param"``: the same layout on both sides (a table, a bias, a norm scale).

A map for your own model is a list of such rules, for example::

    PathMap((("params/layers_{i}/attn/query/kernel", "model.layers.{i}.attn.q_proj.weight", "linear"),
             ("params/embed/embedding", "model.embed_tokens.weight", "embedding")))

A LoRA adapter names a target by its module, the tensor name without ``.weight``.

A *stacked* rule has one ``{field}`` on the Hugging Face side only: the Flax leaf stacks the
layers on its first axis (``nn.scan``), layer ``i`` being the tensor named with that ``i``::

    ("params/blocks/query/kernel", "model.layers.{i}.self_attn.q_proj.weight", "linear")

Such a leaf has no single Hugging Face name (`to_hf` and `to_flax` skip the rule);
`layer_names` gives one per layer, and an adapter names the layers' modules one by one.

``ties`` lists ``(head, embedding)`` Hugging Face names of an output head that transformers
ties to an input embedding (``tie_word_embeddings``); by default the causal-LM convention
``lm_head.weight`` / ``model.embed_tokens.weight``. A tie holds for a params tree that has
the embedding but no leaf for the head (`tied_embeddings`): the table is then used both at
the token lookup and as the head.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Literal

import numpy as np

Kind = Literal["linear", "conv", "conv1d", "router", "experts", "embedding", "param"]
KINDS = ("linear", "conv", "conv1d", "router", "experts", "embedding", "param")
LINEAR_KINDS = ("linear", "router")  # torch's [out, in]: the transpose of a Flax [in..., out] kernel


@dataclasses.dataclass(frozen=True)
class PathMap:
  """Rules ``(flax_pattern, hf_pattern, kind)``, tried in order (module docstring).

  Attributes:
    rules: the rules; ``kind`` one of `KINDS` (module docstring).
    ties: ``(head, embedding)`` Hugging Face names of tied weights (`tied_embeddings`).

  Raises:
    ValueError: a rule that is not a triple with a known kind, or whose sides' ``{fields}``
      differ (but for one on the Hugging Face side: a stacked rule).

  >>> import lorax_jax
  >>> m = lorax_jax.PathMap((("params/layers_{i}/attn/q/kernel", "model.layers.{i}.self_attn.q_proj.weight", "linear"),
  ...                        ("params/embed/embedding", "model.embed_tokens.weight", "embedding"),
  ...                        ("params/lm_head/kernel", "lm_head.weight", "linear")))
  >>> m.to_hf("params/layers_0/attn/q/kernel")
  ('model.layers.0.self_attn.q_proj.weight', 'linear')
  >>> m.to_flax("model.layers.3.self_attn.q_proj.weight")
  ('params/layers_3/attn/q/kernel', 'linear')
  >>> m.tied_embeddings(["params/embed/embedding"])  # no head leaf: the head is tied
  {'model.embed_tokens.weight': 'lm_head.weight'}
  """

  rules: tuple[tuple[str, str, str], ...]
  ties: tuple[tuple[str, str], ...] = (("lm_head.weight", "model.embed_tokens.weight"),)

  def __post_init__(self):
    for rule in self.rules:
      if len(rule) != 3 or rule[2] not in KINDS:
        raise ValueError(f"PathMap rule {rule!r} must be (flax_pattern, hf_pattern, kind in {KINDS})")
      flax, hf = set(_fields(rule[0])), set(_fields(rule[1]))
      if not flax <= hf or len(hf - flax) > 1:
        raise ValueError(f"PathMap rule {rule!r}: both sides must use the same {{fields}}, but for at most one "
                         "on the Hugging Face side only (the layer of a stacked leaf)")

  def to_hf(self, flax_path: str) -> tuple[str, str] | None:
    """``(hf tensor name, kind)`` for a ``/``-joined Flax path, or None if no rule maps it."""
    return self._convert(flax_path, 0, 1)

  def to_flax(self, hf_name: str) -> tuple[str, str] | None:
    """``(/-joined Flax path, kind)`` for a Hugging Face tensor name, or None."""
    return self._convert(hf_name, 1, 0)

  def tied_embeddings(self, flax_paths: Iterable[str]) -> dict[str, str]:
    """``{embedding HF name: head HF name}`` for each tie that holds for params with these
    ``/``-joined leaf paths (the embedding is a leaf, the head is mapped but not a leaf)."""
    present = set(flax_paths)
    out = {}
    for head, embedding in self.ties:
      head_path, embedding_path = self.to_flax(head), self.to_flax(embedding)
      if head_path and embedding_path and embedding_path[0] in present and head_path[0] not in present:
        out[embedding] = head
    return out

  def layer_names(self, flax_path: str, n_layers: int) -> tuple[list[str], str] | None:
    """``([hf name of layer 0, ..., of layer n_layers - 1], kind)`` for a leaf of a stacked
    rule (see the module docstring), or None."""
    for rule in self.rules:
      extra = set(_fields(rule[1])) - set(_fields(rule[0]))
      m = re.fullmatch(_regex(rule[0]), flax_path) if extra else None
      if m:
        (field,) = extra
        return [rule[1].format(**m.groupdict(), **{field: i}) for i in range(n_layers)], rule[2]
    return None

  def rule_index(self, hf_name: str) -> int | None:
    """The index of the rule mapping the Hugging Face name ``hf_name``, or None. PEFT nests the
    wrappers of one module's targeted parameters in the module's registration order, which a map
    lists its ``"experts"`` rules in.

    >>> import lorax_jax
    >>> m = lorax_jax.PathMap((("params/e/up", "experts.gate_up_proj", "experts"), ("params/e/down", "experts.down_proj", "experts")))
    >>> m.rule_index("experts.down_proj"), m.rule_index("experts.w1")
    (1, None)
    """
    for i, rule in enumerate(self.rules):
      if set(_fields(rule[0])) == set(_fields(rule[1])) and re.fullmatch(_regex(rule[1]), hf_name):
        return i
    return None

  def _convert(self, name: str, src: int, dst: int) -> tuple[str, str] | None:
    for rule in self.rules:
      if set(_fields(rule[0])) != set(_fields(rule[1])):
        continue  # a stacked rule: `layer_names`
      m = re.fullmatch(_regex(rule[src]), name)
      if m:
        return rule[dst].format(**m.groupdict()), rule[2]
    return None


def to_torch(x: np.ndarray, kind: str) -> np.ndarray:
  """A Flax-layout array in torch's layout (see the module docstring)."""
  x = np.asarray(x)
  if kind in LINEAR_KINDS:
    return x.reshape(-1, x.shape[-1]).T
  if kind == "conv":
    return x.transpose(3, 2, 0, 1)
  if kind == "experts":
    return np.swapaxes(x, -1, -2)
  return x


def torch_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
  """The shape `to_torch` gives an array of Flax shape ``shape``."""
  if kind in LINEAR_KINDS:
    return (shape[-1], int(np.prod(shape[:-1])))
  if kind == "conv":
    return tuple(shape[i] for i in (3, 2, 0, 1))
  if kind == "experts":
    return (*shape[:-2], shape[-1], shape[-2])
  return tuple(shape)


def from_torch(x: np.ndarray, kind: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
  """A torch-layout array in Flax's layout, reshaped to ``shape`` if given (inverse of `to_torch`)."""
  x = np.asarray(x)
  if kind in LINEAR_KINDS:
    x = x.T
  elif kind == "conv":
    x = x.transpose(2, 3, 1, 0)
  elif kind == "experts":
    x = np.swapaxes(x, -1, -2)
  return x if shape is None else x.reshape(shape)


def _fields(pattern: str) -> list[str]:
  return re.findall(r"\{(\w+)\}", pattern)


def _regex(pattern: str) -> str:
  parts = re.split(r"(\{\w+\})", pattern)
  return "".join(f"(?P<{p[1:-1]}>\\d+)" if re.fullmatch(r"\{\w+\}", p) else re.escape(p) for p in parts)
