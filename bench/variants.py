"""The variants of one case: train steps and forward passes over the same weights.

Every train step is ``step(*state, ids) -> (loss, grads, *new_state)`` with optax adam;
the lower bound is ``(loss, dL/d delta)`` for an additive zero ``delta`` on the token
embedding's output (added by a linen method interceptor), weights closed over as constants, so XLA runs the forward and the
backward through every layer to the activations and computes no weight gradient at all.
Gradients are returned so the harness can check that every LoRA variant computes the same
ones (mapped to lorax_jax's layout: NNX stores ``lora_a = aᵀ``, ``lora_b = s·b``; Qwix
``kernel_lora_a = aᵀ``, ``kernel_lora_b = b`` with the same ``alpha / r``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax_jax
from lorax_jax.paths import get_path, path_str, set_path

TRAIN = ("lower_bound", "factored", "factored_dropout", "reference", "full", "nnx_lora", "qwix_lora",
         "qwix_lora_dropout", "dora", "dora_dropout")
DROPOUT = 0.05  # the ``*_dropout`` variants: LoRA dropout on every branch input, as PEFT's lora_dropout
INFER = ("base_fwd", "factored_fwd", "merged_fwd")


@dataclasses.dataclass
class Variant:
  """A function to jit and the arguments it runs on."""

  name: str
  fn: Callable[..., Any]
  args: tuple[Any, ...]
  grads_to_lorax: Callable[[Any], dict[str, np.ndarray]] | None = None  # train: grads in lorax layout


@dataclasses.dataclass
class Setup:
  """A model with weights, a LoRA config and factors, and a batch."""

  model: nn.Module
  params: Any
  cfg: lorax_jax.LoraConfig
  lora: Any
  ids: jax.Array
  nnx_model: Callable[[], Any] | None = None  # builds the NNX twin (GPT only)


def cross_entropy(logits: jax.Array, ids: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy."""
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def nonzero_lora(setup_lora: Any, key: jax.Array, std: float = 0.02) -> Any:
  """``b`` drawn at random so the adapter changes the loss (``init_lora`` starts it at 0)."""
  leaves, tree = jax.tree_util.tree_flatten_with_path(setup_lora)
  keys = jax.random.split(key, len(leaves))
  out = [std * jax.random.normal(k, x.shape, x.dtype) if p[-1].key == "b" else x
         for k, (p, x) in zip(keys, leaves)]
  return jax.tree_util.tree_unflatten(tree, out)


def _flat_lora(grads: Any) -> dict[str, np.ndarray]:
  return {path_str(tuple(k.key for k in p)): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(grads)[0]}


def _adam_step(loss_fn: Callable[[Any], jax.Array], opt: optax.GradientTransformation):
  def step(trainable, opt_state, *rest):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, *rest)
    updates, opt_state = opt.update(grads, opt_state, trainable)
    return loss, grads, optax.apply_updates(trainable, updates), opt_state
  return step


def build(setup: Setup, names: tuple[str, ...], apply_factored: Callable[..., Any] | None = None
          ) -> list[Variant]:
  """The variants ``names`` of ``setup``. ``apply_factored`` overrides lorax_jax's engine."""
  model, params, cfg, lora, ids = setup.model, setup.params, setup.cfg, setup.lora, setup.ids
  opt = optax.adam(1e-3)
  factored = apply_factored or lorax_jax.lora_transform(model.apply, params, cfg)
  reference = lorax_jax.lora_transform(model.apply, params, cfg, mode="reference")
  out = []
  for name in names:
    if name == "lower_bound":
      def lower(params, ids, delta):
        def loss_fn(dl):
          with nn.intercept_methods(_add_to_embedding(dl)):
            return cross_entropy(model.apply(params, ids), ids)
        return jax.value_and_grad(loss_fn)(delta)
      delta = jnp.zeros((*ids.shape, _width(params)), jnp.float32)
      out.append(Variant(name, lower, (params, ids, delta)))
    elif name in ("factored", "reference"):
      apply = factored if name == "factored" else reference
      step = _adam_step(lambda lo, p, x, apply=apply: cross_entropy(apply(p, lo, x), x), opt)
      out.append(Variant(name, step, (lora, opt.init(lora), params, ids), _flat_lora))
    elif name == "factored_dropout":
      apply = lorax_jax.lora_transform(model.apply, params, dataclasses.replace(cfg, dropout=DROPOUT))
      step = _adam_step(lambda lo, p, x, key, apply=apply: cross_entropy(apply(p, lo, x, rng=key), x), opt)
      out.append(Variant(name, step, (lora, opt.init(lora), params, ids, jax.random.key(1))))
    elif name in ("dora", "dora_dropout"):
      dropout = DROPOUT if name == "dora_dropout" else 0.0
      dora_cfg = dataclasses.replace(cfg, use_dora=True, dropout=dropout)
      apply = lorax_jax.lora_transform(model.apply, params, dora_cfg)
      dora = with_magnitudes(params, dora_cfg, lora)
      step = _adam_step(lambda lo, p, x, key, apply=apply: cross_entropy(apply(p, lo, x, rng=key), x), opt)
      out.append(Variant(name, step, (dora, opt.init(dora), params, ids, jax.random.key(1))))
    elif name == "full":
      step = _adam_step(lambda p, x: cross_entropy(model.apply(p, x), x), opt)
      out.append(Variant(name, step, (params, opt.init(params), ids)))
    elif name == "nnx_lora":
      out.append(_nnx_variant(setup, opt))
    elif name in ("qwix_lora", "qwix_lora_dropout"):
      out.append(_qwix_variant(setup, opt, DROPOUT if name.endswith("_dropout") else 0.0))
    elif name == "base_fwd":
      out.append(Variant(name, model.apply, (params, ids)))
    elif name == "factored_fwd":
      out.append(Variant(name, factored, (params, lora, ids)))
    elif name == "merged_fwd":
      out.append(Variant(name, model.apply, (lorax_jax.merge(params, lora, cfg), ids)))
    else:
      raise ValueError(f"unknown variant {name!r}")
  return out


def with_magnitudes(params: Any, cfg: lorax_jax.LoraConfig, lora: Any) -> Any:
  """``lora``'s factors plus DoRA's initial magnitudes ``m = ‖W‖`` (``init_lora``'s) for ``cfg``."""
  out = lorax_jax.init_lora(params, cfg, jax.random.key(0))
  for t in lorax_jax.find_targets(params, cfg).values():
    set_path(out, t.path, {**get_path(lora, t.path), "m": get_path(out, t.path)["m"]})
  return out


def _add_to_embedding(delta: jax.Array):
  """A linen interceptor adding ``delta`` to the token embedding: the output of every
  ``nn.Embed.__call__`` of ``delta``'s shape (position tables and ``attend`` are left alone)."""
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if (isinstance(context.module, nn.Embed) and context.method_name == "__call__"
        and out.shape == delta.shape):
      out = out + delta
    return out
  return interceptor


def _width(params: Any) -> int:
  """The embedding width: the last axis of the (first) ``embedding`` table."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return next(x.shape[-1] for p, x in leaves if getattr(p[-1], "key", None) == "embedding")


def _scales(setup: Setup) -> dict[str, float]:
  """``s`` of every target, keyed by its module path without ``params/`` and ``/kernel``."""
  return {"/".join(t.path[1:-1]): t.scale for t in lorax_jax.find_targets(setup.params, setup.cfg).values()}


def _nnx_variant(setup: Setup, opt: optax.GradientTransformation) -> Variant:
  from flax import nnx
  if setup.nnx_model is None:
    raise ValueError("nnx_lora needs an NNX twin of the model (GPT cases only)")
  graphdef, lora_state, rest = nnx.split(setup.nnx_model(), nnx.LoRAParam, ...)
  step = _adam_step(lambda lo, rest, x: cross_entropy(nnx.merge(graphdef, lo, rest)(x), x), opt)
  scales = _scales(setup)

  def to_lorax(grads):
    out = {}
    for p, g in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(grads))[0]:
      keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in p]  # blocks/i/name/lora/lora_a
      module = f"blocks_{keys[1]}/{keys[2]}"
      g = np.asarray(g)
      if keys[-1] == "lora_a":
        out[f"params/{module}/kernel/a"] = g.T
      else:
        out[f"params/{module}/kernel/b"] = g * scales[module]
    return out
  return Variant("nnx_lora", step, (lora_state, opt.init(lora_state), rest, setup.ids), to_lorax)


QWIX_SUFFIXES = ("_lora_a", "_lora_b")


def qwix_model(setup: Setup, dropout: float = 0.0) -> tuple[nn.Module, Any, Any]:
  """The Qwix-wrapped model (LoRA dropout ``dropout``), its frozen params and its LoRA params
  (lorax_jax's factors)."""
  import qwix
  targets = lorax_jax.find_targets(setup.params, setup.cfg)
  ranks = {t.rank for t in targets.values()}
  alphas = {t.alpha for t in targets.values()}
  if len(ranks) != 1 or len(alphas) != 1:
    raise ValueError("qwix_lora: one rank and alpha for every target")
  modules = sorted({"/".join(t.path[1:-1]) for t in targets.values()})
  provider = qwix.LoraProvider(module_path="|".join(re.escape(m) for m in modules),
                               rank=ranks.pop(), alpha=float(alphas.pop()), dropout=dropout)
  qmodel = qwix.apply_lora_to_model(setup.model, provider)
  lora = {}
  for t in targets.values():
    node = get_path(setup.lora, t.path)
    module = "/".join(t.path[1:-1])
    lora[f"{module}/kernel_lora_a"] = node["a"].T
    lora[f"{module}/kernel_lora_b"] = node["b"]
  return qmodel, setup.params, lora


def _qwix_params(params: Any, lora: dict[str, jax.Array]) -> Any:
  def put(tree, prefix):
    out = {k: put(v, f"{prefix}{k}/") if isinstance(v, dict) else v for k, v in tree.items()}
    for name, x in lora.items():
      module, _, leaf = name.rpartition("/")
      if f"{module}/" == prefix:
        out[leaf] = x
    return out
  return {"params": put(params["params"], "")}


def _qwix_variant(setup: Setup, opt: optax.GradientTransformation, dropout: float) -> Variant:
  qmodel, params, lora = qwix_model(setup, dropout)
  if dropout:  # masks differ from lorax_jax's: no gradient check
    loss = lambda lo, p, x, key: cross_entropy(qmodel.apply(_qwix_params(p, lo), x, rngs={"dropout": key}), x)
    return Variant("qwix_lora_dropout", _adam_step(loss, opt),
                   (lora, opt.init(lora), params, setup.ids, jax.random.key(1)))
  loss = lambda lo, p, x: cross_entropy(qmodel.apply(_qwix_params(p, lo), x), x)
  step = _adam_step(loss, opt)

  def to_lorax(grads):
    out = {}
    for name, g in grads.items():
      module, _, leaf = name.rpartition("/")
      g = np.asarray(g)
      out[f"params/{module}/kernel/{'a' if leaf.endswith('_a') else 'b'}"] = g.T if leaf.endswith("_a") else g
    return out
  return Variant("qwix_lora", step, (lora, opt.init(lora), params, setup.ids), to_lorax)
