"""Error messages a new user meets with PEFT adapters of a tied-embedding model, or a named
adapter's folder: each names the cause and the fix (issue 20). A tiny Llama-shaped params tree
stands in for the model (no torch): with `LLAMA_PATH_MAP` and no ``lm_head`` leaf, the head is
tied to ``model.embed_tokens``."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from lorax_jax import LoraConfig, init_lora
from lorax_jax.io import load_adapter, save_adapter
from lorax_jax.models.llama import LLAMA_PATH_MAP

EMBED = "params/model/embed_tokens/embedding"


def llama_params(head: bool) -> dict:
  params = {"model": {"embed_tokens": {"embedding": jnp.ones((16, 8))},
                      "layers_0": {"self_attn": {"q_proj": {"kernel": jnp.ones((8, 8))}}}}}
  if head:
    params["lm_head"] = {"kernel": jnp.ones((8, 16))}
  return {"params": params}


def saved_untied(directory, cfg) -> str:
  """An adapter saved for the untied model (as PEFT saves one for a model with a head leaf)."""
  untied = llama_params(head=True)
  save_adapter(str(directory), init_lora(untied, cfg, jax.random.key(0)), cfg, untied, LLAMA_PATH_MAP)
  return str(directory)


def test_modules_to_save_of_a_tied_head(tmp_path):
  """Before: 'has unexpected keys (no such LoRA module for these params): base_model.model.lm_head.weight'."""
  directory = saved_untied(tmp_path / "a", LoraConfig(r=2, targets=["q_proj"], modules_to_save=["lm_head"]))
  with pytest.raises(ValueError) as e:
    load_adapter(directory, llama_params(head=False), LLAMA_PATH_MAP)
  message = str(e.value)
  assert "saves the output head lm_head" in message
  assert "tie the head to the embedding model.embed_tokens" in message
  assert "untie the head: give the params their own head leaf params/lm_head/kernel" in message
  assert "adapt model.embed_tokens" in message
  assert "unexpected keys" not in message
  load_adapter(directory, llama_params(head=True), LLAMA_PATH_MAP)  # the fix works


def test_lora_on_a_tied_head(tmp_path):
  """Before: 'unexpected keys ... likely cause: the adapter was saved for another model or another layout'."""
  directory = saved_untied(tmp_path / "a", LoraConfig(r=2, targets=["q_proj", "lm_head"]))
  with pytest.raises(ValueError) as e:
    load_adapter(directory, llama_params(head=False), LLAMA_PATH_MAP)
  message = str(e.value)
  assert "has LoRA factors of the output head lm_head" in message
  assert "tie the head to the embedding model.embed_tokens" in message
  assert "PEFT adapts lm_head as its own module, the update at the head only" in message
  assert "untie the head" in message
  assert "another model or another layout" not in message
  load_adapter(directory, llama_params(head=True), LLAMA_PATH_MAP)


@pytest.mark.parametrize("uses, says", [
    (("matmul",), "cfg limits it to target_uses ('matmul',), so the update reaches the head lm_head "
                  "(matmul of the same table) and not the token lookup"),
    (None, "cfg adapts it at every use: the token lookup and the head lm_head"),
])
def test_saving_a_tied_embedding_says_what_cfg_targets(tmp_path, uses, says):
  """Before, for a head-only adapter: 'cfg adapts it at every use, the head included'."""
  params = llama_params(head=False)
  cfg = LoraConfig(r=2, targets=["embed_tokens"], target_uses={EMBED: uses} if uses else {})
  with pytest.raises(ValueError) as e:
    save_adapter(str(tmp_path / "a"), init_lora(params, cfg, jax.random.key(0)), cfg, params, LLAMA_PATH_MAP)
  message = str(e.value)
  assert says in message
  assert "tie to the output head lm_head.weight" in message
  assert "target_uses={" in message and "('lookup',)" in message
  assert (uses is None) == ("head included" not in message and "every use" in message)
  assert not (tmp_path / "a").exists()


def test_named_adapter_folder_points_to_its_subfolders(tmp_path):
  """Before: '<top> has no adapter_config.json: not a PEFT adapter directory' and nothing more."""
  params = llama_params(head=False)
  cfg = LoraConfig(r=2, targets=["q_proj"])
  for name in ("mine", "other"):
    save_adapter(str(tmp_path / "top" / name), init_lora(params, cfg, jax.random.key(0)), cfg, params, LLAMA_PATH_MAP)
  (tmp_path / "top" / "logs").mkdir()
  top = str(tmp_path / "top")
  with pytest.raises(FileNotFoundError, match=re.escape(
      f"not a PEFT adapter directory; its subfolders mine, other hold an adapter (PEFT saves a named adapter "
      f"to <directory>/<name>): did you mean {top}/mine or {top}/other?")):
    load_adapter(top, params, LLAMA_PATH_MAP)
  with pytest.raises(FileNotFoundError, match=r"not a PEFT adapter directory$"):
    load_adapter(str(tmp_path / "top" / "logs"), params, LLAMA_PATH_MAP)
