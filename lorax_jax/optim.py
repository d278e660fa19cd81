"""Optimizers for LoRA trees: `loraplus`, and `per_adapter` for stacked trees.

`loraplus`: LoRA+ (Hayou et al. 2024), a larger learning rate for ``b`` than for ``a``.

PEFT's ``create_loraplus_optimizer`` semantics on the LoRA tree: with ``η`` the learning rate,

    a (lora_A)                         η
    b (lora_B), and any other leaf     η · ratio    (PEFT's "groupB": lora_B and 1-D params)
    both factors of an embedding       lr_embedding (PEFT's default 1e-6)

one optimizer per group (`optax.multi_transform`), each with its own state.

`per_adapter`: an optimizer mapped over the adapter axis of a stacked tree
(`lorax_jax.adapters`), so that no adapter's update depends on another's gradient or state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lorax_jax.adapters import SCALE
from lorax_jax.paths import tree_path

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

  Returns:
    An ``optax.multi_transform`` over the LoRA tree (its state holds one state per group).

  Raises:
    ValueError: ``ratio`` is not a positive finite number.

  >>> import jax, jax.numpy as jnp, optax, lorax_jax
  >>> lora = {"dense": {"kernel": {"a": jnp.ones((1, 4)), "b": jnp.zeros((1, 3))}}}
  >>> tx = lorax_jax.loraplus(optax.sgd, 0.1, ratio=4.0)
  >>> updates, _ = tx.update(jax.tree.map(jnp.ones_like, lora), tx.init(lora), lora)
  >>> jax.tree.map(lambda u: round(float(u[0, 0]), 4), updates)  # -η and -4η
  {'dense': {'kernel': {'a': -0.1, 'b': -0.4}}}
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


def per_adapter(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """``tx`` applied to each adapter of a stacked tree on its own (`jax.vmap` over the adapter axis).

  With ``g[j]``, ``p[j]`` adapter ``j``'s slice of the gradient and of the stacked tree
  (`lorax_jax.stack_adapters`), its update and state are exactly those of ``tx`` on that slice
  alone,

      (u[j], state[j]) = tx.update(g[j], state[j], p[j]),      state[j] = tx.init(p[j]) at first,

  so global-norm clipping (``‖g[j]‖``, not the norm over all adapters), Adam's moments and step
  count, and weight decay never couple adapters. An adapter whose gradient is zero gets ``tx``'s
  update of a zero gradient: zero for SGD and Adam from a fresh state, ``-η λ p[j]`` with AdamW's
  weight decay ``λ`` (as it would alone). Every ``scale`` leaf (the stacked tree's per-adapter
  scales) is a constant: its update is zero and ``tx`` keeps no state for it. Extra arguments of
  ``update`` (``value=`` for ``optax.contrib.reduce_on_plateau``, ...) reach every adapter as
  they are.

  Args:
    tx: any optax transformation of a single adapter's tree.

  Returns:
    The transformation of the stacked tree; its state holds ``tx``'s state with the adapter axis
    first on every leaf.

  >>> import jax, jax.numpy as jnp, optax, lorax_jax
  >>> stacked = {"q": {"kernel": {"a": jnp.ones((2, 1, 3)), "b": jnp.ones((2, 1, 3)),
  ...                             "scale": jnp.array([2.0, 1.0])}}}
  >>> tx = lorax_jax.per_adapter(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0)))
  >>> grads = jax.tree.map(lambda x: x * jnp.array([1.0, 100.0]).reshape(-1, *(1,) * (x.ndim - 1)), stacked)
  >>> updates, _ = tx.update(grads, tx.init(stacked), stacked)
  >>> [round(float(u), 4) for u in updates["q"]["kernel"]["a"][:, 0, 0]]  # each clipped to norm 1 alone
  [-0.4082, -0.4082]
  >>> updates["q"]["kernel"]["scale"].tolist()
  [0.0, 0.0]
  """
  tx = optax.with_extra_args_support(tx)

  def init(params: Any) -> Any:
    return jax.vmap(tx.init)(_without_scales(params))

  def update(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple[Any, Any]:
    step = lambda u, s, p: tx.update(u, s, p, **extra_args)
    new, state = jax.vmap(step)(_without_scales(updates), state, None if params is None else _without_scales(params))
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    new_leaves = jax.tree_util.tree_leaves(new, is_leaf=lambda x: x is None)
    return treedef.unflatten([jnp.zeros_like(u) if n is None else n for u, n in zip(leaves, new_leaves)]), state

  return optax.GradientTransformationExtraArgs(init, update)


def _without_scales(tree: Any) -> Any:
  """``tree`` with every ``scale`` leaf replaced by None (an empty subtree)."""
  return jax.tree_util.tree_map_with_path(lambda kp, x: None if tree_path(kp)[-1:] == (SCALE,) else x, tree)
