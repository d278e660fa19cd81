"""`Tokenizer`: a ``tokenizers.Tokenizer`` with its special ids and chat template.

Built from GGUF metadata (`lorax_jax.models.gguf`) or from a Hugging Face directory's
``tokenizer.json`` + ``tokenizer_config.json`` (`load_tokenizer`). The chat template is
the model's own Jinja template, rendered in a sandbox the way transformers renders it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import tokenizers


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """Text <-> token ids, plus the ids generation needs and the chat template."""

  backend: tokenizers.Tokenizer
  bos_id: int | None = None
  eos_id: int | None = None
  pad_id: int | None = None
  chat_template: str | None = None

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text``; special tokens written in the text (``<|im_start|>``) are recognised."""
    return self.backend.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """The text of ``ids``."""
    return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def token(self, text: str) -> int:
    """The id of a single token (a special token such as ``<|im_end|>``); KeyError if absent."""
    i = self.backend.token_to_id(text)
    if i is None:
      raise KeyError(f"{text!r} is not a token of this vocabulary")
    return i

  def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """The prompt text for ``messages`` (``[{"role": "user", "content": ...}, ...]``)."""
    if self.chat_template is None:
      raise ValueError("this tokenizer has no chat template; pass plain text prompts instead")
    try:
      import jinja2.ext
      from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
      raise ImportError("chat templates need jinja2: pip install 'lorax_jax[llm]'") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = _raise
    return env.from_string(self.chat_template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt,
        bos_token=self._text(self.bos_id), eos_token=self._text(self.eos_id))

  def chat(self, messages: Sequence[Mapping[str, str]] | str) -> list[int]:
    """Token ids of a chat prompt; a string is one user message."""
    if isinstance(messages, str):
      messages = [{"role": "user", "content": messages}]
    return self.encode(self.apply_chat_template(messages))

  def _text(self, i: int | None) -> str:
    return "" if i is None else self.backend.id_to_token(i)


def _raise(message: str) -> None:
  raise ValueError(f"chat template: {message}")


def load_tokenizer(directory: str) -> Tokenizer:
  """The tokenizer of a Hugging Face model directory (``tokenizer.json``, ``tokenizer_config.json``)."""
  path = os.path.join(directory, "tokenizer.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory} has no tokenizer.json")
  backend = tokenizers.Tokenizer.from_file(path)
  config: dict[str, Any] = {}
  config_path = os.path.join(directory, "tokenizer_config.json")
  if os.path.isfile(config_path):
    with open(config_path) as f:
      config = json.load(f)

  def special(name: str) -> int | None:
    token = config.get(name)
    token = token.get("content") if isinstance(token, dict) else token
    return None if token is None else backend.token_to_id(token)

  return Tokenizer(backend, special("bos_token"), special("eos_token"), special("pad_token"),
                   config.get("chat_template"))
