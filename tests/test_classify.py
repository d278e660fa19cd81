"""examples/classify.py's pieces: the fortunes split, and a LoRA step that trains only LoRA + head."""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
pytest.importorskip("yaml")
import classify  # noqa: E402

import lorax_jax  # noqa: E402
from lorax_jax.apps import fortunes  # noqa: E402
from lorax_jax.lora_tree import SAVED_KEY  # noqa: E402
from lorax_jax.models.bert import BertConfig, BertForSequenceClassification  # noqa: E402

TOPICS = ("computers", "politics", "science")


@pytest.fixture(scope="module")
def items():
  try:
    return fortunes.fortune_items(TOPICS)
  except FileNotFoundError as e:
    pytest.skip(str(e))


def test_fortune_items_are_the_files_items(items):
  """Every item is a %-separated chunk of its file, in order, and nothing else."""
  for topic, got in items.items():
    with open(os.path.join(fortunes.FORTUNES_DIR, topic), encoding="utf-8", errors="replace") as f:
      chunks = [c.strip() for c in f.read().split("\n%\n")]
    assert got == [c.removesuffix("\n%").strip() for c in chunks if c.removesuffix("\n%").strip()]
    assert all(item and "\n%\n" not in item for item in got)


def test_missing_topic_says_what_to_do(tmp_path):
  with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
    fortunes.fortune_items(["no-such-topic"])
  with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
    fortunes.fortune_items(directory=str(tmp_path / "absent"))


def test_split_is_deterministic_balanced_and_disjoint(items):
  split = lambda seed: classify.topic_split(items, per_topic=50, test_fraction=0.2, max_chars=200, seed=seed)
  (train_x, train_y), (test_x, test_y) = split(0)
  assert split(0) == ((train_x, train_y), (test_x, test_y))
  assert split(1) != split(0)
  np.testing.assert_array_equal(np.bincount(train_y), [40] * len(TOPICS))
  np.testing.assert_array_equal(np.bincount(test_y), [10] * len(TOPICS))
  assert not set(train_x) & set(test_x)
  assert len(set(train_x)) == len(train_x) and len(set(test_x)) == len(test_x)
  assert max(map(len, train_x + test_x)) <= 200
  normalised = {t: {" ".join(s.split()) for s in v} for t, v in items.items()}
  for x, y in zip(train_x + test_x, train_y + test_y):
    assert x in normalised[TOPICS[y]]


def test_split_refuses_too_few_items(items):
  with pytest.raises(ValueError, match="fewer than per_topic"):
    classify.topic_split(items, per_topic=10_000, test_fraction=0.2, max_chars=200, seed=0)


def test_settings_reject_unknown_keys(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("epochs: 1\nlearning_rate: 0.1\n")
  with pytest.raises(ValueError, match="unknown setting learning_rate"):
    classify.load_settings(["--config", str(path)])
  path.write_text("epochs: 1\n")
  s = classify.load_settings(["--config", str(path), "--lora_r", "4", "--topics", "[law, food]"])
  assert (s.epochs, s.lora_r, s.topics) == (1, 4, ("law", "food"))


def test_settings_are_typed_like_finetunes():
  """`--lora_lr 3e-4` is a float (it used to stay the string '3e-4'), as `--lr 3e-4` is in finetune."""
  s = classify.load_settings(["--lora_lr", "3e-4", "--epochs", "2", "--lora_targets", "all-linear"])
  assert type(s.lora_lr) is float and s.lora_lr == 3e-4 and type(s.epochs) is int
  assert classify.lora_config(s).targets == "all-linear"
  with pytest.raises(ValueError, match="setting lora_lr must be a finite number, got 'inf'"):
    classify.load_settings(["--lora_lr", "inf"])
  with pytest.raises(ValueError, match="setting methods must be drawn from"):
    classify.load_settings(["--methods", "[head, magic]"])


def test_bad_settings_exit_2_with_one_line(capsys):
  with pytest.raises(SystemExit) as e:
    classify.main(["--epochs", "two"])
  assert e.value.code == 2 and capsys.readouterr().err == "error: setting epochs must be an integer, got 'two'\n"


def tiny_bert(pooling):
  """A tiny random BERT classifier, its params and a batch ``(ids, mask, labels)``."""
  config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=24, max_position_embeddings=16, num_labels=3,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  model = BertForSequenceClassification(config, pooling=pooling)
  ids = jax.random.randint(jax.random.key(1), (4, 9), 1, 50)
  mask = (jnp.arange(9)[None] < jnp.array([9, 5, 3, 7])[:, None]).astype(jnp.int32)
  params = jax.tree_util.tree_map(np.asarray, model.init(jax.random.key(0), ids, mask))
  return model, params, (ids, mask, jnp.array([0, 1, 2, 1]))


def lora_step(model, params, batch, **changes):
  """``(settings, trainable before, trainable after one SGD step, frozen, loss, logits_fn)``."""
  s = dataclasses.replace(classify.load_settings([]), lora_r=2, lora_alpha=4.0, lora_targets=("all-linear",),
                          **changes)
  trainable, frozen, logits_fn = classify.method_setup("lora", model, params, s, jax.random.key(2))
  before = jax.tree_util.tree_map(np.array, trainable)
  step = classify.make_train_step(logits_fn, optax.sgd(0.5))
  new, _, loss = step(trainable, optax.sgd(0.5).init(trainable), frozen, *batch)
  return s, before, new, frozen, loss, logits_fn


@pytest.mark.parametrize("pooling", ["mean", "pooler"])
def test_lora_step_trains_only_lora_and_head(pooling):
  """One LoRA step on a tiny random BERT: the encoder stays bit-identical, LoRA and the head (a
  ``modules_to_save`` copy) move, and the loss equals the merged model's."""
  model, params, (ids, mask, labels) = tiny_bert(pooling)
  frozen_before = jax.tree_util.tree_map(np.array, params)
  s, before, new, frozen, loss, _ = lora_step(model, params, (ids, mask, labels))
  assert set(before) == {"params", SAVED_KEY} and "classifier" not in before["params"]

  merged = lorax_jax.merge(params, before, classify.lora_config(s))
  ref = optax.softmax_cross_entropy_with_integer_labels(model.apply(merged, ids, mask), labels).mean()
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  jax.tree_util.tree_map(np.testing.assert_array_equal, frozen, frozen_before)  # encoder untouched
  for path, b in jax.tree_util.tree_leaves_with_path(before["params"]):
    if jax.tree_util.keystr(path).endswith("['b']"):  # b starts at zero; every b gets a gradient
      assert not np.array_equal(_get(new["params"], path), b), jax.tree_util.keystr(path)
  head = lambda t: t[SAVED_KEY]["params"]["classifier"]["kernel"]
  assert not np.array_equal(head(new), head(before))


def test_written_adapter_loads_in_peft_with_the_same_logits(tmp_path):
  """classify.save_lora writes the base checkpoint and a SEQ_CLS adapter (head in modules_to_save);
  PEFT's BertForSequenceClassification gives the trained model's logits."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  transformers = pytest.importorskip("transformers")
  model, params, batch = tiny_bert("pooler")
  s, _, new, frozen, _, logits_fn = lora_step(model, params, batch, pooling="pooler", adapter_dir=str(tmp_path))
  classify.save_lora(s.adapter_dir, model, params, new, s)
  base = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "base"))
  peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
  ids, mask, _ = (np.array(x) for x in batch)
  with torch.no_grad():
    want = peft_model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).logits
  got = logits_fn(new, frozen, *batch[:2])
  assert np.max(np.abs(np.asarray(got) - want.numpy())) < 1e-4
  assert np.max(np.abs(np.asarray(got) - np.asarray(model.apply(params, *batch[:2])))) > 1e-3  # it trained


def test_adapter_dir_needs_the_pooler_head():
  with pytest.raises(ValueError, match="adapter_dir needs pooling: pooler"):
    classify.load_settings(["--adapter_dir", "/tmp/x", "--pooling", "mean"])


def _get(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree
