"""Generate with a PEFT adapter, factored and merged, against the base model.

    python examples/generate.py runs/example/adapter "Tell me a fortune." [--model DIR]

The adapter folder is any PEFT LoRA adapter of the model (one saved by ``examples/finetune_llm.py``,
by ``lorax-jax finetune``, or by PEFT itself). Greedy decoding, so the factored adapter (applied
through `lorax_jax.lora_transform` at every step) and the merged weights (``W + s·A·B`` formed once)
print the same answer.
"""

from __future__ import annotations

import argparse

import lorax_jax
from lorax_jax.models.generate import generate
from lorax_jax.models.gguf import load_smollm2
from lorax_jax.models.llama import LLAMA_PATH_MAP, load_llama
from lorax_jax.models.tokenizer import load_tokenizer


def main(argv: list[str] | None = None) -> dict[str, str]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("adapter", help="a PEFT adapter folder")
  p.add_argument("prompts", nargs="+", help="user messages, one chat each")
  p.add_argument("--model", default="smollm2", help="smollm2, or a Hugging Face Llama checkpoint directory")
  p.add_argument("--max_new_tokens", type=int, default=40)
  args = p.parse_args(argv)

  if args.model == "smollm2":
    _, model, params, tokenizer = load_smollm2()
  else:
    _, model, params = load_llama(args.model)
    tokenizer = load_tokenizer(args.model)
  lora, cfg = lorax_jax.load_adapter(args.adapter, params, LLAMA_PATH_MAP)
  prompts = [tokenizer.chat(text) for text in args.prompts]
  stop = [t for t in {tokenizer.eos_id, tokenizer.backend.token_to_id("<|im_end|>")} if t is not None]
  run = lambda **kw: [tokenizer.decode(ids) for ids in generate(
      model, params, prompts, max_new_tokens=args.max_new_tokens, stop_tokens=stop, **kw)]
  out = {"base": run(), "adapter": run(lora=lora, cfg=cfg), "merged": run(lora=lora, cfg=cfg, merged=True)}
  for i, text in enumerate(args.prompts):
    print(f"> {text}")
    for name, answers in out.items():
      print(f"  {name:8s} {answers[i]}")
  return out


if __name__ == "__main__":
  main()
