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


@pytest.mark.parametrize("pooling", ["mean", "pooler"])
def test_lora_step_trains_only_lora_and_head(pooling):
  """One LoRA step on a tiny random BERT: the encoder stays bit-identical, LoRA and head move,
  and the loss equals the merged model's."""
  config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=24, max_position_embeddings=16, num_labels=3,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  model = BertForSequenceClassification(config, pooling=pooling)
  ids = jax.random.randint(jax.random.key(1), (4, 9), 1, 50)
  mask = (jnp.arange(9)[None] < jnp.array([9, 5, 3, 7])[:, None]).astype(jnp.int32)
  labels = jnp.array([0, 1, 2, 1])
  params = jax.tree_util.tree_map(np.asarray, model.init(jax.random.key(0), ids, mask))
  s = dataclasses.replace(classify.load_settings([]), lora_r=2, lora_alpha=4.0, lora_targets=("all-linear",))
  trainable, frozen, logits_fn = classify.method_setup("lora", model, params, s, jax.random.key(2))
  assert set(trainable) == {"lora", "head"} and "classifier" not in trainable["lora"]["params"]
  before = jax.tree_util.tree_map(np.array, (trainable, frozen))

  step = classify.make_train_step(logits_fn, optax.sgd(0.5))
  new, _, loss = step(trainable, optax.sgd(0.5).init(trainable), frozen, ids, mask, labels)

  merged = lorax_jax.merge(classify.with_head(params["params"]["bert"], trainable["head"]),
                           trainable["lora"], classify.lora_config(s))
  ref = optax.softmax_cross_entropy_with_integer_labels(model.apply(merged, ids, mask), labels).mean()
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  jax.tree_util.tree_map(np.testing.assert_array_equal, frozen, before[1])  # encoder untouched
  for path, b in jax.tree_util.tree_leaves_with_path(before[0]["lora"]):
    if jax.tree_util.keystr(path).endswith("['b']"):  # b starts at zero; every b gets a gradient
      assert not np.array_equal(_get(new["lora"], path), b), jax.tree_util.keystr(path)
  assert not np.array_equal(new["head"]["kernel"], before[0]["head"]["kernel"])


def _get(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree
