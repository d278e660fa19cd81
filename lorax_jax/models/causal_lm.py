"""The training loss of a causal LM, with options that skip work the loss does not need.

``causal_lm_loss_sums`` computes ``(Σ_{b,t} w[b,t+1] · CE(logits[b,t], tokens[b,t+1]), Σ w[b,1:])``,
the next-token cross-entropy weighted per target, for a model with ``hidden`` (final-norm
states), ``after_prefix`` (the same for rows continuing a shared prefix) and ``logits`` (the LM
head) methods, such as `lorax_jax.models.llama.Llama`.
Two options give the same numbers (to float rounding) with less work:

- ``max_targets=K``: the LM head and softmax run only on the (at most ``K``) positions whose
  target weight is non-zero, gathered across the batch before the head. The head of SmolLM2
  (``576 x 49,152``) is a fifth of the forward's FLOPs per position, and a chat fine-tune trains
  on the answer alone.
- ``prefix_len=P``: the first ``P`` input tokens are the same in every row (a chat prompt) and
  carry no loss; they run once, with batch 1, and in every layer their keys and values are
  broadcast to the rows (``model.after_prefix``: one pass over the layers, each layer's weights
  read once for prefix and rows). The backward sums the rows' gradients back through the broadcast.

Both preconditions are checked inside the computation: a batch that breaks one (rows whose first
``P`` tokens differ, a non-zero weight among the first ``P`` predictions, more than ``K`` targets)
gives a NaN loss and NaN gradients, never a quietly different number.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def causal_lm_loss_sums(lora_apply: Callable[..., Any], params: Any, lora: Any, tokens: jax.Array,
                        weights: jax.Array, rng: jax.Array | None = None, *, prefix_len: int = 0,
                        max_targets: int | None = None) -> tuple[jax.Array, jax.Array]:
  """``(Σ w · CE, Σ w)`` of next-token prediction, the model run by ``lora_apply`` once.

  Row ``b`` reads ``tokens[b, :-1]`` and predicts ``tokens[b, 1:]``; prediction ``t`` weighs
  ``weights[b, t + 1]``. The loss is ``Σ w / Σ w`` of the two sums.

  Args:
    lora_apply: ``lora_transform(model.apply, params, cfg)`` of a linen model with ``hidden``,
      ``after_prefix`` and ``logits`` methods (`Llama`); any ``lora_apply(params, lora, *args, rng=, method=, **kw)``.
    params, lora: the frozen params and the LoRA factors.
    tokens: ``[B, L + 1]`` int token ids.
    weights: ``[B, L + 1]`` float target weights (``weights[:, 0]`` is unused).
    rng: the LoRA dropout key, or None. With ``prefix_len`` the prefix runs once, so its
      positions share one dropout mask across the rows of a batch.
    prefix_len: ``P``: ``tokens[:, :P]`` are equal in every row and ``weights[:, 1:P + 1]`` are 0
      (for a chat example, ``P`` = the prompt's length minus one: its last token predicts the
      answer's first). 0 runs every row whole.
    max_targets: ``K``, at least the number of non-zero weights in any batch; the LM head then
      runs on ``K`` gathered positions instead of ``B · L``. None runs it everywhere.

  Returns:
    Float32 scalars ``(Σ w · CE, Σ w)``; NaN (with NaN gradients) if the batch breaks the
    preconditions of ``prefix_len`` or ``max_targets``.

  Raises:
    ValueError: ``prefix_len`` not in ``[0, L)`` or ``max_targets`` not positive.
  """
  length = tokens.shape[1] - 1
  if not 0 <= prefix_len < length:
    raise ValueError(f"causal_lm_loss_sums: prefix_len={prefix_len} must be in [0, {length}) for "
                     f"tokens of shape {tokens.shape}")
  if max_targets is not None and max_targets <= 0:
    raise ValueError(f"causal_lm_loss_sums: max_targets={max_targets} must be positive (or None)")
  return lora_apply(params, lora, tokens, weights, rng=rng, method=_loss_sums, prefix_len=prefix_len,
                    max_targets=max_targets)


def max_targets_per_batch(weights: np.ndarray, batch_size: int) -> int:
  """The most non-zero target weights any ``batch_size`` rows of ``weights [N, L + 1]`` hold
  (``weights[:, 0]`` is no target): a ``max_targets`` that fits every batch of the data."""
  counts = np.sort(np.count_nonzero(np.asarray(weights)[:, 1:], axis=1))[::-1]
  return max(1, int(counts[:batch_size].sum()))


def _loss_sums(model: Any, tokens: jax.Array, weights: jax.Array, *, prefix_len: int,
               max_targets: int | None) -> tuple[jax.Array, jax.Array]:
  """`causal_lm_loss_sums` inside ``model.apply`` (``method=``), so one trace holds the whole loss."""
  inputs, targets, w = tokens[:, :-1], tokens[:, 1:], weights[:, 1:].astype(jnp.float32)
  bad = jnp.zeros((), bool)
  if prefix_len:
    p = prefix_len
    h = model.after_prefix(inputs[:1, :p], inputs[:, p:])
    bad |= jnp.any(inputs[:, :p] != inputs[:1, :p]) | jnp.any(w[:, :p] != 0)
    targets, w = targets[:, p:], w[:, p:]
  else:
    h, _ = model.hidden(inputs)
  if max_targets is not None:
    flat = (w != 0).reshape(-1)
    (idx,) = jnp.nonzero(flat, size=max_targets, fill_value=0)
    bad |= jnp.sum(flat) > max_targets
    valid = jnp.arange(max_targets) < jnp.sum(flat)
    h = h.reshape(-1, h.shape[-1])[idx]
    targets, w = targets.reshape(-1)[idx], jnp.where(valid, w.reshape(-1)[idx], 0.0)
  logits = model.logits(h).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  total = jnp.sum(ce * w) * jnp.where(bad, jnp.nan, 1.0)
  return total, jnp.sum(w)
