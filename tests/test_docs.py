"""The README's Python snippets run, in order, as one session (so they cannot rot), and
examples/quickstart.py trains, saves, loads and merges with the same logits three ways."""

from __future__ import annotations

import importlib.util
import os
import re
import runpy

import numpy as np
import pytest

from lorax_jax.models import gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_snippets() -> list[str]:
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    return re.findall(r"^```python\n(.*?)^```$", f.read(), re.DOTALL | re.MULTILINE)


def test_readme_snippets_run_in_order(tmp_path, monkeypatch):
  snippets = python_snippets()
  assert len(snippets) >= 4  # quick start, NNX, training loop, adapters on disk, ...
  monkeypatch.chdir(tmp_path)  # snippets may write files (out/adapter)
  session: dict = {"__name__": "readme"}
  for i, code in enumerate(snippets):
    exec(compile(code, f"README.md python snippet {i + 1}", "exec"), session)
  # What the snippets claim: training moved the factors, and the adapter saved and loaded.
  assert np.isfinite(float(session["loss"])) and (tmp_path / "out/adapter/adapter_config.json").is_file()
  assert any(np.any(np.asarray(b) != 0) for b in session["jax"].tree.leaves(session["lora"]))


def test_readme_keeps_its_two_commands():
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    text = f.read()
  assert re.search(r"^    make finetune +# the main job", text, re.MULTILINE)
  assert re.search(r"^    make test +# the test suite", text, re.MULTILINE)
  with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
    assert f.read().rstrip().endswith("make test-all")


def test_quickstart_agrees_three_ways(tmp_path, capsys):
  if importlib.util.find_spec(gguf.SMOLLM2_PACKAGE) is None:
    pytest.skip(f"needs the SmolLM2 package: {gguf.SMOLLM2_INSTALL}")
  path = os.path.join(ROOT, "examples", "quickstart.py")
  with open(path, encoding="utf-8") as f:
    assert len(f.read().splitlines()) < 100
  runpy.run_path(path)["main"](str(tmp_path / "adapter"))  # asserts the three outputs agree
  out = capsys.readouterr().out
  assert "same logits three ways" in out and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
