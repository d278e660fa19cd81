"""The Flax BERT against transformers' torch BERT: same logits, same sentence embeddings."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorax_jax.models.bert import (BERT_PATH_MAP, BertConfig, BertForSequenceClassification, load_bert, load_tokenizer,
                                   minilm_directory, sentence_embedding)
from lorax_jax.models.hf import save_hf_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=32, type_vocab_size=2, num_labels=3,
             initializer_range=0.2)  # wide enough that gelu, softmax and masking matter


def _batch(vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Random ids, a mask with right padding of different lengths, and token types."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab, size=(3, 11)).astype(np.int32)
  lengths = np.array([11, 6, 2])
  mask = (np.arange(11)[None, :] < lengths[:, None]).astype(np.int32)
  types = (np.arange(11)[None, :] >= lengths[:, None] // 2).astype(np.int32)
  return ids * mask, mask, types


def _torch_classifier(directory: str, **overrides):
  torch.manual_seed(0)
  config = transformers.BertConfig(**SMALL, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                   **overrides)
  model = transformers.BertForSequenceClassification(config).eval()
  with torch.no_grad():  # non-trivial LayerNorm parameters and biases
    for name, p in model.named_parameters():
      if "LayerNorm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(directory, safe_serialization=True)
  return model


@pytest.mark.parametrize("hidden_act", ["gelu", "relu"])
def test_classifier_logits_match_torch(tmp_path, hidden_act):
  model = _torch_classifier(str(tmp_path), hidden_act=hidden_act)
  config, params = load_bert(str(tmp_path))
  assert config.num_labels == SMALL["num_labels"] and config.hidden_act == hidden_act
  ids, mask, types = _batch(SMALL["vocab_size"])
  ours = BertForSequenceClassification(config).apply(params, ids, mask, types)
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                   token_type_ids=torch.tensor(types, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)


def test_padding_does_not_change_unpadded_logits(tmp_path):
  _torch_classifier(str(tmp_path))
  config, params = load_bert(str(tmp_path))
  ids, mask, _ = _batch(SMALL["vocab_size"])
  model = BertForSequenceClassification(config)
  padded = model.apply(params, ids, mask)
  alone = model.apply(params, ids[1:2, :6], mask[1:2, :6])
  np.testing.assert_allclose(np.asarray(padded[1:2]), np.asarray(alone), atol=1e-5)


def test_save_hf_checkpoint_round_trips_through_transformers(tmp_path):
  model = _torch_classifier(str(tmp_path / "a"))
  config, params = load_bert(str(tmp_path / "a"))
  save_hf_checkpoint(str(tmp_path / "b"), params, config.to_hf(), BERT_PATH_MAP)
  reloaded = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "b")).eval()
  ids, mask, _ = _batch(SMALL["vocab_size"], seed=1)
  args = dict(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
  with torch.no_grad():
    np.testing.assert_allclose(reloaded(**args).logits.numpy(), model(**args).logits.numpy(), atol=1e-5)


def test_bert_model_checkpoint_gets_a_new_head(tmp_path):
  """A ``BertModel`` checkpoint (names without ``bert.``) loads, and needs a key for a new head."""
  _torch_classifier(str(tmp_path / "cls"))
  transformers.BertModel.from_pretrained(str(tmp_path / "cls")).save_pretrained(str(tmp_path / "enc"))
  with pytest.raises(ValueError, match="rng"):
    load_bert(str(tmp_path / "enc"), num_labels=5)
  config, params = load_bert(str(tmp_path / "enc"), num_labels=5, rng=jax.random.key(0))
  assert config.num_labels == 5 and params["params"]["classifier"]["kernel"].shape == (48, 5)
  _, full = load_bert(str(tmp_path / "cls"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params["params"]["bert"], full["params"]["bert"])
  with pytest.raises(ValueError, match="3 labels"):
    load_bert(str(tmp_path / "cls"), num_labels=5)


def test_unsupported_config_is_named(tmp_path):
  with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
    BertConfig.from_hf({"model_type": "bert", "position_embedding_type": "relative_key"})
  with pytest.raises(ValueError, match="hidden_act 'swish'"):
    BertConfig.from_hf({"hidden_act": "swish"})
  os.makedirs(tmp_path / "m")
  (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "roberta"}))
  with pytest.raises(ValueError, match="roberta"):
    load_bert(str(tmp_path / "m"))


def test_minilm_sentence_embedding_matches_torch():
  """all-MiniLM-L6-v2 from its package: mean-pooled, normalised embeddings as in torch."""
  pytest.importorskip("tokenizers")
  try:
    directory = minilm_directory()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  sentences = ["A journey of a thousand miles begins with a single step.",
               "Real programmers don't comment their code.", "Hi"]
  enc = load_tokenizer(directory, max_length=64).encode_batch(sentences)
  ids = np.array([e.ids for e in enc], np.int32)
  mask = np.array([e.attention_mask for e in enc], np.int32)
  assert mask[2].sum() < mask.shape[1]  # the batch is padded
  config, params = load_bert(directory)
  ours = np.asarray(sentence_embedding(config, params, jnp.asarray(ids), jnp.asarray(mask)))

  model = transformers.BertModel.from_pretrained(directory).eval()
  with torch.no_grad():
    h = model(input_ids=torch.tensor(ids, dtype=torch.long),
              attention_mask=torch.tensor(mask)).last_hidden_state
  m = torch.tensor(mask, dtype=h.dtype)[..., None]
  theirs = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1).numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
