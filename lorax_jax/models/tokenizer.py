"""`Tokenizer`: a ``tokenizers.Tokenizer`` with its special ids and chat template.

Built from GGUF metadata (`lorax_jax.models.gguf`) or from a Hugging Face directory's
``tokenizer.json`` + ``tokenizer_config.json`` (`load_tokenizer`). The chat template is
the model's own Jinja template, rendered in a sandbox the way transformers renders it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence

import tokenizers

from lorax_jax.files import text_writer
from lorax_jax.models.hf import read_json, read_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what `tokenizer_files` writes


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


def tokenizer_files(tokenizer: Tokenizer) -> dict[str, Callable[[str], None]]:
  """``{name: write(path)}`` of ``tokenizer.json`` and ``tokenizer_config.json`` (special tokens and
  chat template), which `load_tokenizer` and transformers' ``AutoTokenizer`` read."""
  special = {name: tokenizer.backend.id_to_token(i) for name, i in
             (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id),
              ("pad_token", tokenizer.pad_id)) if i is not None}
  config = {**special, "chat_template": tokenizer.chat_template, "tokenizer_class": "PreTrainedTokenizerFast"}
  backend, config_name = TOKENIZER_FILES
  return {backend: tokenizer.backend.save, config_name: text_writer(json.dumps(config, indent=2))}


def _raise(message: str) -> None:
  raise ValueError(f"chat template: {message}")


def load_tokenizer(directory: str) -> Tokenizer:
  """The tokenizer of a Hugging Face model directory (``tokenizer.json``, ``tokenizer_config.json``).

  Raises:
    FileNotFoundError: no ``tokenizer.json``.
    ValueError: a file that is not a regular file, is too large or does not parse
      (`lorax_jax.models.hf.read_tokenizer`, `lorax_jax.models.hf.read_json`).
  """
  backend = read_tokenizer(directory)
  config_name = TOKENIZER_FILES[1]
  config = read_json(directory, config_name) if os.path.lexists(os.path.join(directory, config_name)) else {}

  def special(name: str) -> int | None:
    token = config.get(name)
    token = token.get("content") if isinstance(token, dict) else token
    return None if token is None else backend.token_to_id(token)

  return Tokenizer(backend, special("bos_token"), special("eos_token"), special("pad_token"),
                   config.get("chat_template"))
