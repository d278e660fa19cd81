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

With ``adapter_ids`` (a mixed batch of a stacked tree, `lorax_jax.stack_adapters`) the sums are per
adapter: ``total[j] = Σ_{b: ids[b]=j} Σ_t w[b,t+1] · CE(...)`` and ``count[j]`` likewise, so
``Σ_j total[j] / count[j]`` is the sum of each adapter's own mean loss and adapter ``j``'s gradient
is exactly that of its own examples' mean (rows of id -1, the base model, count nowhere).

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

from lorax_jax.lora_tree import SCALE


def causal_lm_loss_sums(lora_apply: Callable[..., Any], params: Any, lora: Any, tokens: jax.Array,
                        weights: jax.Array, rng: jax.Array | None = None, *, prefix_len: int = 0,
                        max_targets: int | None = None, adapter_ids: jax.Array | None = None
                        ) -> tuple[jax.Array, jax.Array]:
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
    adapter_ids: int ``[B]``: ``lora`` is a stacked tree of ``k`` adapters and row ``b`` runs
      through adapter ``ids[b]`` (-1: the base model); the sums are then per adapter.

  Returns:
    Float32 ``(Σ w · CE, Σ w)``: scalars, or ``[k]`` per adapter with ``adapter_ids``; NaN (with
    NaN gradients) if the batch breaks the preconditions of ``prefix_len`` or ``max_targets``.

  Raises:
    ValueError: ``prefix_len`` not in ``[0, L)`` or ``max_targets`` not positive; ``adapter_ids``
      with ``prefix_len`` (a prefix run once cannot go through each row's adapter) or with a
      ``lora`` that is not a stacked tree.

  >>> import jax, jax.numpy as jnp, lorax_jax
  >>> from lorax_jax.models.llama import Llama, LlamaConfig
  >>> model = Llama(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
  ...                           num_attention_heads=2, num_key_value_heads=1, head_dim=8))
  >>> tokens = jnp.arange(12).reshape(2, 6) % 32
  >>> params = model.init(jax.random.key(0), tokens)
  >>> cfg = lorax_jax.LoraConfig(r=2, targets=["q_proj", "v_proj"])
  >>> lora = lorax_jax.init_lora(params, cfg, jax.random.key(1))
  >>> stacked, stacked_cfg = lorax_jax.stack_adapters(params, [(lora, cfg)] * 3)
  >>> apply = lorax_jax.lora_transform(model.apply, params, stacked_cfg)
  >>> total, count = causal_lm_loss_sums(apply, params, stacked, tokens, jnp.ones((2, 6)),
  ...                                    adapter_ids=jnp.array([2, 0]))
  >>> count.tolist()  # five targets in each row: row 0's under adapter 2, row 1's under adapter 0
  [5.0, 0.0, 5.0]
  """
  length = tokens.shape[1] - 1
  if not 0 <= prefix_len < length:
    raise ValueError(f"causal_lm_loss_sums: prefix_len={prefix_len} must be in [0, {length}) for "
                     f"tokens of shape {tokens.shape}")
  if max_targets is not None and max_targets <= 0:
    raise ValueError(f"causal_lm_loss_sums: max_targets={max_targets} must be positive (or None)")
  if adapter_ids is None:
    return lora_apply(params, lora, tokens, weights, rng=rng, method=_loss_sums, prefix_len=prefix_len,
                      max_targets=max_targets)
  if prefix_len:
    raise ValueError(f"causal_lm_loss_sums: prefix_len={prefix_len} runs the shared prefix once, so it cannot go "
                     "through each row's adapter: pass prefix_len=0 with adapter_ids")
  scales = [x for kp, x in jax.tree_util.tree_leaves_with_path(lora)
            if getattr(kp[-1], "key", None) == SCALE and np.ndim(x) == 1]
  if not scales:
    raise ValueError("causal_lm_loss_sums: adapter_ids selects adapters of a stacked tree "
                     "(lorax_jax.stack_adapters); this lora is one adapter")
  return lora_apply(params, lora, tokens, weights, rng=rng, adapter_ids=adapter_ids, method=_loss_sums,
                    prefix_len=0, max_targets=max_targets, groups=(adapter_ids, np.shape(scales[0])[0]))


def max_targets_per_batch(weights: np.ndarray, batch_size: int) -> int:
  """The most non-zero target weights any ``batch_size`` rows of ``weights [N, L + 1]`` hold
  (``weights[:, 0]`` is no target): a ``max_targets`` that fits every batch of the data."""
  counts = np.sort(np.count_nonzero(np.asarray(weights)[:, 1:], axis=1))[::-1]
  return max(1, int(counts[:batch_size].sum()))


def _loss_sums(model: Any, tokens: jax.Array, weights: jax.Array, *, prefix_len: int,
               max_targets: int | None, groups: tuple[jax.Array, int] | None = None
               ) -> tuple[jax.Array, jax.Array]:
  """`causal_lm_loss_sums` inside ``model.apply`` (``method=``), so one trace holds the whole loss.
  ``groups``: ``(ids [B], k)``, the sums per group ``0 … k-1`` of rows (other ids counted nowhere)."""
  inputs, targets, w = tokens[:, :-1], tokens[:, 1:], weights[:, 1:].astype(jnp.float32)
  bad = jnp.zeros((), bool)
  if prefix_len:
    p = prefix_len
    h = model.after_prefix(inputs[:1, :p], inputs[:, p:])
    bad |= jnp.any(inputs[:, :p] != inputs[:1, :p]) | jnp.any(w[:, :p] != 0)
    targets, w = targets[:, p:], w[:, p:]
  else:
    h, _ = model.hidden(inputs)
  rows = jnp.broadcast_to(jnp.arange(w.shape[0])[:, None], w.shape)  # each position's row
  if max_targets is not None:
    flat = (w != 0).reshape(-1)
    (idx,) = jnp.nonzero(flat, size=max_targets, fill_value=0)
    bad |= jnp.sum(flat) > max_targets
    valid = jnp.arange(max_targets) < jnp.sum(flat)
    h = h.reshape(-1, h.shape[-1])[idx]
    targets, w = targets.reshape(-1)[idx], jnp.where(valid, w.reshape(-1)[idx], 0.0)
    rows = rows.reshape(-1)[idx]
  logits = model.logits(h).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  nan_if_bad = jnp.where(bad, jnp.nan, 1.0)
  if groups is None:
    return jnp.sum(ce * w) * nan_if_bad, jnp.sum(w)
  ids, k = groups
  group = jnp.asarray(ids)[rows].reshape(-1)  # ids outside 0 … k-1 (the base model's -1) are dropped
  per_group = lambda x: jax.ops.segment_sum(x.reshape(-1), group, num_segments=k)
  return per_group(ce * w) * nan_if_bad, per_group(w)
