"""The example scripts a user copies run end to end on a tiny random Llama (no download)."""

from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example(name: str):
  spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_finetune_then_generate(tiny_llama, tmp_path, capsys):
  pytest.importorskip("tokenizers")
  if not os.path.isfile("/usr/share/games/fortunes/science"):
    pytest.skip("needs Debian's fortunes (scripts/setup.sh installs them)")
  model_dir, _, _ = tiny_llama
  out = tmp_path / "run"
  losses = _example("finetune_llm").main(["--model", model_dir, "--steps", "12", "--batch", "4", "--seq", "320",
                                          "--lr", "1e-2", "--out", str(out)])
  assert losses["after"] < losses["before"], losses  # it learns the held-out fortunes' style
  assert sorted(os.listdir(out / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
  answers = _example("generate").main([str(out / "adapter"), "Tell me a fortune.", "--model", model_dir,
                                       "--max_new_tokens", "8"])
  # Greedy decoding: the factored adapter and the merged weights give the same tokens.
  assert answers["adapter"] == answers["merged"]
  assert "held-out loss" in capsys.readouterr().out
