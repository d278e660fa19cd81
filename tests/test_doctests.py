"""The public API's docstrings: every example runs, and every public name has one.

Each module of `lorax_jax` with ``>>>`` examples is run by `doctest` (jax/flax/numpy only; no
example needs torch). Every function or class in ``lorax_jax.__all__`` has a docstring with an
example, and every function taking parameters documents them under ``Args:``.
"""

import doctest
import importlib
import inspect
import pathlib

import pytest

import lorax_jax

# The modules defining the public API (each must have examples) and the others doctest may run.
PUBLIC_MODULES = [
    "lorax_jax.adapters", "lorax_jax.combine", "lorax_jax.config", "lorax_jax.init", "lorax_jax.io.kohya",
    "lorax_jax.io.peft", "lorax_jax.merge", "lorax_jax.optim", "lorax_jax.params", "lorax_jax.pathmap",
    "lorax_jax.lora_tree", "lorax_jax.qarray", "lorax_jax.sharding", "lorax_jax.targets",
    "lorax_jax.transform.apply", "lorax_jax.transform.axes",
]


def _modules_with_examples() -> list[str]:
  """Every module of the package whose source has a ``>>>`` line (read from disk, not imported),
  and the public-API modules."""
  root = pathlib.Path(lorax_jax.__file__).parent
  names = set(PUBLIC_MODULES)
  for file in root.rglob("*.py"):
    if ">>>" in file.read_text(encoding="utf-8"):
      parts = file.relative_to(root.parent).with_suffix("").parts
      names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
  return sorted(names)


@pytest.mark.parametrize("name", _modules_with_examples())
def test_doctests(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
  assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed (output above)"
  if name in PUBLIC_MODULES:
    assert result.attempted > 0, f"{name} defines public API but has no >>> example"


def test_every_public_name_is_documented():
  offenders = []
  for name in lorax_jax.__all__:
    obj = getattr(lorax_jax, name)
    if not (inspect.isfunction(obj) or inspect.isclass(obj)):
      continue
    doc = inspect.getdoc(obj) or ""
    missing = [] if ">>>" in doc else [">>> example"]
    if inspect.isfunction(obj) and inspect.signature(obj).parameters and "Args:" not in doc:
      missing.append("Args:")
    if missing:
      offenders.append(f"{name} ({', '.join(missing)})")
  assert not offenders, "public names missing docs: " + "; ".join(offenders)
