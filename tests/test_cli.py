"""The ``lorax-jax`` command: generate, merge and summary on a tiny random Llama, checked against
the library calls they stand for; every bad input one line on stderr and exit status 2."""

from __future__ import annotations

import io
import re
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorax_jax
from lorax_jax import cli
from lorax_jax.apps import finetune
from lorax_jax.models.generate import generate
from lorax_jax.models.llama import LLAMA_PATH_MAP, load_llama
from lorax_jax.models.tokenizer import load_tokenizer

pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
  """``(model_dir, adapter_dir, lora, cfg)``: an adapter with random (non-zero) factors on q and v."""
  model_dir = tiny_llama[0]
  _, _, params = load_llama(model_dir)
  cfg = lorax_jax.LoraConfig(r=2, alpha=4, target_key=False)
  lora = lorax_jax.init_lora(params, cfg, jax.random.key(0))
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(lora))))
  lora = jax.tree.map(lambda x: 0.5 * jax.random.normal(next(keys), x.shape), lora)
  directory = str(tmp_path_factory.mktemp("adapter") / "adapter")
  lorax_jax.save_adapter(directory, lora, cfg, params, LLAMA_PATH_MAP)
  return model_dir, directory, lora, cfg


def fails(argv, capsys) -> str:
  """The one stderr line of a failing ``lorax-jax ARGV``."""
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  return err


def test_usage_and_unknown_command(capsys):
  assert cli.main([]) == 2 and "lorax-jax finetune" in capsys.readouterr().out
  assert cli.main(["--help"]) == 0
  err = fails(["frobnicate"], capsys)
  assert "unknown command 'frobnicate'" in err and "finetune, generate, merge, summary" in err


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
    (["--temperature", "nan"], "--temperature must be >= 0, got nan"),
    (["--top-k", "0"], "--top-k must be a positive int or None, got 0"),
    (["--top-p", "2"], r"--top-p must be in \(0, 1\] or None, got 2.0"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 1, got -1"),
    (["--top-k", "many"], "argument --top-k: invalid int value: 'many'"),
    (["--compare"], "--compare needs --adapter"),
    (["--adapter", "a", "--adapter", "b", "--merged"], "--merged serves one adapter"),
    (["--adapter", "a", "--adapter", "b", "@3 hi"], "names adapter 3 but --adapter was given 2 time"),
])
def test_generate_checks_its_flags_before_loading(flags, message, capsys, monkeypatch):
  monkeypatch.setattr(finetune, "load_model", lambda *a: pytest.fail("the model loaded before the check"))
  assert re.search(message, fails(["generate", *flags, "hi"], capsys))


def test_generate_refuses_non_utf8_stdin(capsys, monkeypatch):
  monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait\n")))
  assert "stdin is not UTF-8 text (invalid continuation byte at byte 3)" in fails(["generate"], capsys)
  monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\n  \n")))
  assert "no prompts" in fails(["generate"], capsys)


def test_generate_with_an_adapter_is_the_library_call(adapter, capsys, monkeypatch):
  model_dir, directory, lora, cfg = adapter
  monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("the cat\na dog\n".encode())))
  assert cli.main(["generate", "--model", model_dir, "--adapter", directory, "--raw", "--max-new-tokens", "6"]) == 0
  out = capsys.readouterr().out
  _, model, params = load_llama(model_dir)
  tokenizer = load_tokenizer(model_dir)
  ids = generate(model, params, [tokenizer.encode("the cat"), tokenizer.encode("a dog")], max_new_tokens=6,
                 stop_tokens=finetune.stop_tokens(tokenizer), lora=lora, cfg=cfg)
  expected = [tokenizer.decode(i).strip() for i in ids]
  assert out == f"### the cat\n{expected[0]}\n\n### a dog\n{expected[1]}\n\n"


def test_generate_with_several_adapters_is_each_adapter_alone(adapter, capsys, tmp_path):
  """Two adapters of different ranks and alphas in one mixed batch (``@K`` routes a prompt; ``--compare``
  adds the base): each row's completion equals generating with that adapter alone (or none)."""
  model_dir, first, lora_1, cfg_1 = adapter
  _, model, params = load_llama(model_dir)
  cfg_2 = lorax_jax.LoraConfig(r=5, alpha=3, target_key=False)
  lora_2 = jax.tree.map(lambda x: 0.3 * jax.random.normal(jax.random.key(2), x.shape),
                        lorax_jax.init_lora(params, cfg_2, jax.random.key(0)))
  second = str(tmp_path / "second")
  lorax_jax.save_adapter(second, lora_2, cfg_2, params, LLAMA_PATH_MAP)
  assert cli.main(["generate", "--model", model_dir, "--adapter", first, "--adapter", second, "--compare", "--raw",
                   "--max-new-tokens", "6", "the cat", "@2 a dog"]) == 0
  out = capsys.readouterr().out
  tokenizer = load_tokenizer(model_dir)
  cat, dog = tokenizer.encode("the cat"), tokenizer.encode("a dog")

  def alone(prompts, lora=None, cfg=None) -> list[str]:
    ids = generate(model, params, prompts, max_new_tokens=6, stop_tokens=finetune.stop_tokens(tokenizer),
                   lora=lora, cfg=cfg)
    return [tokenizer.decode(i).strip() for i in ids]

  (base,), (one,), (two_cat, two_dog) = alone([cat]), alone([cat], lora_1, cfg_1), alone([cat, dog], lora_2, cfg_2)
  assert out == (f"### the cat [base]\n{base}\n\n### the cat [{first}]\n{one}\n\n"
                 f"### the cat [{second}]\n{two_cat}\n\n### a dog [{second}]\n{two_dog}\n\n")
  assert len({base, one, two_cat}) == 3  # the adapters matter


def test_generate_refuses_adapters_that_cannot_share_a_batch(adapter, capsys, tmp_path):
  model_dir, first, _, _ = adapter
  _, _, params = load_llama(model_dir)
  cfg = lorax_jax.LoraConfig(r=2, targets=["down_proj"])
  other = str(tmp_path / "other")
  lorax_jax.save_adapter(other, lorax_jax.init_lora(params, cfg, jax.random.key(0)), cfg, params, LLAMA_PATH_MAP)
  err = fails(["generate", "--model", model_dir, "--adapter", first, "--adapter", other, "hi"], capsys)
  assert f"--adapter {first}, {other} cannot share one batch" in err


def test_merge_writes_the_merged_model(adapter, capsys, tmp_path):
  model_dir, directory, lora, cfg = adapter
  out = str(tmp_path / "merged")
  assert cli.main(["merge", "--model", model_dir, "--adapter", directory, "--out", out]) == 0
  _, model, params = load_llama(model_dir)
  _, merged_model, merged = load_llama(out)
  tokens = jnp.array([[5, 60, 70, 80, 90, 100, 7]])
  factored = lorax_jax.lora_transform(model.apply, params, cfg)(params, lora, tokens)
  np.testing.assert_allclose(merged_model.apply(merged, tokens), factored, atol=1e-5)
  assert not np.allclose(model.apply(params, tokens), factored, atol=1e-2)  # the adapter matters
  assert os.path.isfile(os.path.join(out, "tokenizer.json"))
  assert f"--out {out} already exists" in fails(["merge", "--model", model_dir, "--adapter", directory,
                                                 "--out", out], capsys)
  assert "merge needs --adapter" in fails(["merge", "--out", str(tmp_path / "x")], capsys)


def test_summary_of_an_adapter_and_of_settings(adapter, capsys):
  model_dir, directory, lora, cfg = adapter
  assert cli.main(["summary", "--model", model_dir, "--adapter", directory]) == 0
  text = capsys.readouterr().out
  n = sum(x.size for x in jax.tree.leaves(lora))
  assert f"trainable params: {n:,}" in text and "q_proj" in text and "k_proj" not in text
  assert cli.main(["summary", "--model", model_dir, "--r", "3", "--targets", "[mlp/down_proj]"]) == 0
  text = capsys.readouterr().out
  _, _, params = load_llama(model_dir)
  downs = [x for p, x in jax.tree_util.tree_leaves_with_path(params) if "down_proj" in jax.tree_util.keystr(p)]
  assert len(downs) == 2 and f"trainable params: {sum(3 * sum(x.shape) for x in downs):,}" in text
  assert "LoraConfig: r must be an integer rank" in fails(["summary", "--r", "0"], capsys)


def test_python_dash_m_is_the_command(tmp_path):
  result = subprocess.run([sys.executable, "-m", "lorax_jax", "generate", "--top-p", "2", "hi"],
                          capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(lorax_jax.__file__))})
  assert result.returncode == 2 and result.stdout == ""
  assert result.stderr == "error: --top-p must be in (0, 1] or None, got 2.0\n"
