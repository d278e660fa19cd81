"""The package's layering: every import (top-level or inside a function) goes down the layer table,
so no two modules import each other, and the core never imports the models, apps or the CLI.

Read from the source with `ast`, not by importing: a circle that a lazy import hides today is
still a circle.
"""

from __future__ import annotations

import ast
import functools
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "lorax_jax"

# Lowest first. A module may import modules of its own layer or below, never above; within a layer
# the imports must not form a circle. A name ending in "." is a prefix (a subpackage).
LAYERS = [
    ("leaves", ["config", "files", "paths", "pathmap", "dropout", "io.tensors", "io.peft_config",
                "models.causal_lm", "apps.fortunes", "apps.settings"]),
    ("quantized kernels", ["qarray"]),
    ("targets", ["targets"]),
    ("the LoRA tree", ["lora_tree"]),
    ("merge and shardings", ["merge", "sharding"]),
    ("init and params", ["init", "params"]),
    ("engine", ["transform", "transform."]),
    ("adapters on disk", ["io", "io."]),
    ("many adapters", ["adapters", "combine", "optim"]),
    ("public API", [""]),
    ("models", ["models", "models."]),
    ("apps", ["apps", "apps."]),
    ("command line", ["cli", "__main__"]),
]


def _modules() -> dict[str, pathlib.Path]:
  """Dotted names relative to the package ("" the package itself) -> file."""
  out = {}
  for p in sorted(PACKAGE.rglob("*.py")):
    parts = list(p.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = p
  return out


MODULES = _modules()


def _imports(path: pathlib.Path) -> list[tuple[str, list[str], int]]:
  """``(module, imported names, line)`` of every ``lorax_jax`` import in the file, at any depth."""
  out = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "lorax_jax":
      module = node.module.removeprefix("lorax_jax").removeprefix(".")
      out.append((module, [a.name for a in node.names], node.lineno))
    elif isinstance(node, ast.Import):
      out += [(a.name.removeprefix("lorax_jax").removeprefix("."), [], node.lineno) for a in node.names
              if a.name.split(".")[0] == "lorax_jax"]
  return out


@functools.cache
def _edges() -> dict[str, set[str]]:
  """Module -> the package modules it imports (``from lorax_jax.io import peft`` imports ``io.peft``)."""
  graph: dict[str, set[str]] = {}
  for name, path in MODULES.items():
    deps = set()
    for module, names, _ in _imports(path):
      subs = [f"{module}.{n}".lstrip(".") for n in names if f"{module}.{n}".lstrip(".") in MODULES]
      deps.update(subs or [module])
    deps.discard(name)
    graph[name] = deps
  return graph


def _layer(module: str) -> int:
  best = None
  for i, (_, names) in enumerate(LAYERS):
    for n in names:
      if module == n or (n.endswith(".") and module.startswith(n)):
        best = i
  if best is None:
    raise AssertionError(f"lorax_jax.{module} is in no layer of tests/test_imports.py's LAYERS: place it there")
  return best


def test_every_module_has_a_layer():
  assert len(MODULES) > 20
  for module in MODULES:
    _layer(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
  here = _layer(module)
  for dep in sorted(_edges()[module]):
    assert dep in MODULES, f"lorax_jax.{module} imports lorax_jax.{dep}, which does not exist"
    there = _layer(dep)
    assert there <= here, (f"lorax_jax.{module or '(package)'} ({LAYERS[here][0]}) imports lorax_jax.{dep} "
                           f"({LAYERS[there][0]}), a higher layer")


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import circle of ``graph`` (its modules in order, the first repeated at the end), or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done

  def visit(m: str, path: list[str]) -> list[str] | None:
    state[m] = 1
    for d in sorted(graph.get(m, ())):
      if state.get(d) == 1:
        return path[path.index(d):] + [d]
      if d not in state and (found := visit(d, path + [d])):
        return found
    state[m] = 2
    return None

  for m in sorted(graph):
    if m not in state and (found := visit(m, [m])):
      return found
  return None


def test_no_import_circle():
  circle = _circle(_edges())
  assert circle is None, "import circle: " + " -> ".join(f"lorax_jax.{c}" for c in circle)


def test_the_checks_see_a_circle_and_an_upward_import():
  assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert _circle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
  assert _layer("models.llama") > _layer("transform") > _layer("merge") > _layer("qarray") > _layer("paths")


def test_the_cli_imports_public_names_only():
  for module, names, line in _imports(MODULES["cli"]):
    private = [n for n in names if n.startswith("_")] + [p for p in module.split(".") if p.startswith("_")]
    assert not private, f"lorax_jax/cli.py:{line} imports private {private} from lorax_jax.{module}"
