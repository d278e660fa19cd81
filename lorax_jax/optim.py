"""`loraplus`: LoRA+ (Hayou et al. 2024), a larger learning rate for ``b`` than for ``a``.

PEFT's ``create_loraplus_optimizer`` semantics on the LoRA tree: with ``η`` the learning rate,

    a (lora_A)                         η
    b (lora_B), and any other leaf     η · ratio    (PEFT's "groupB": lora_B and 1-D params)
    both factors of an embedding       lr_embedding (PEFT's default 1e-6)

one optimizer per group (`optax.multi_transform`), each with its own state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from lorax_jax.targets import tree_path

LearningRate = float | optax.Schedule


def loraplus(optimizer: Callable[..., optax.GradientTransformation], lr: LearningRate, ratio: float = 16.0,
             lr_embedding: LearningRate = 1e-6, **kwargs: Any) -> optax.GradientTransformation:
  """``optimizer`` over a LoRA tree with ``b``'s learning rate ``ratio ×`` that of ``a``.

  For a plain SGD step the update of ``b`` is ``-ratio · η · ∂L/∂b`` and that of ``a`` is
  ``-η · ∂L/∂a``; for Adam (whose first step is ``-η · sign(g)``) ``b`` moves ``ratio ×`` as far.
  Leaves are grouped by their path in the tree: ``…/a`` gets ``lr``, any other leaf (``b``, a
  DoRA magnitude ``m``) ``lr · ratio``, and both factors of an embedding target (a leaf
  named ``embedding``, as `init_lora` recognises one) get ``lr_embedding``, as PEFT's ``create_loraplus_optimizer`` does.

  Args:
    optimizer: an optax optimizer factory taking the learning rate first (``optax.adamw``,
      ``optax.sgd``; wrap other arguments with ``functools.partial`` or pass them as ``kwargs``).
    lr: ``a``'s learning rate, a float or an optax schedule (``b`` gets the schedule times
      ``ratio``).
    ratio: ``η_b / η_a`` (LoRA+'s ``λ``; 16 is the paper's and PEFT's usual choice).
    lr_embedding: the learning rate of embedding targets' factors (PEFT's
      ``loraplus_lr_embedding``).
    kwargs: passed to every ``optimizer(...)`` call (``weight_decay=0.0``, ...).

  Raises:
    ValueError: ``ratio`` is not a positive finite number.
  """
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < float("inf"):
    raise ValueError(f"loraplus: ratio must be a positive finite number (η_b / η_a, e.g. 16), got {ratio!r}")
  scaled = (lambda step: ratio * lr(step)) if callable(lr) else ratio * lr
  return optax.multi_transform(
      {"a": optimizer(lr, **kwargs), "b": optimizer(scaled, **kwargs),
       "embedding": optimizer(lr_embedding, **kwargs)},
      loraplus_labels)


def loraplus_labels(lora: Any) -> Any:
  """The LoRA+ group (``"a"``, ``"b"`` or ``"embedding"``) of every leaf of ``lora``."""
  def label(kp, _):
    path = tree_path(kp)
    return "embedding" if path[-2:-1] == ("embedding",) else "a" if path[-1] == "a" else "b"
  return jax.tree_util.tree_map_with_path(label, lora)
