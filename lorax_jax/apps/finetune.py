"""Fine-tune an LLM with LoRA on a CPU: SmolLM2-135M-Instruct learns to tell fortunes.

    lorax-jax finetune                              # the packaged configs/finetune.yaml
    lorax-jax finetune --steps 300 --r 16 --targets all-linear
    lorax-jax finetune --config pydoc               # packaged configs/pydoc.yaml (or a path), on top
    lorax-jax finetune --resume                     # go on from out_dir's checkpoint
    lorax-jax finetune --tasks 4                    # four adapters, one per fortunes topic, in one run

The base model is frozen; only the LoRA factors ``a``, ``b`` of the targeted projections
train (``W' = W + (alpha / r) aᵀ b``, through `lorax_jax.lora_transform`, never forming
``W'``). The loss is the mean next-token cross-entropy over the trained tokens: the
assistant's answer in the chat format, every token in the text format.

Written to ``out_dir``: ``adapter/`` (PEFT: ``PeftModel.from_pretrained`` loads it onto the
Hugging Face model), ``loss.png``, ``samples.txt`` (generations before and after),
``metrics.json``, ``settings.yaml`` and ``checkpoint/`` (Orbax: LoRA factors and optimizer state,
sharded as they train, with the step and history as JSON; no pickle). ``out_dir`` must be a directory of its own: a new one, or
one holding only these (`lorax_jax.files.check_destination`, before anything is computed). The
data order and dropout keys are pure functions of ``(seed, step)``, so a resumed run continues
exactly as an uninterrupted one would.

With ``tasks: N`` (``--tasks N``) one run trains ``N`` adapters over the one frozen base, adapter
``k`` on the fortunes topic ``task_topics[k]`` alone (`make_tasks`: its items split as a run with
``topics: [that topic]`` splits them). Every step's batch is the ``N`` tasks' batches of
``batch_size`` rows each, stacked (`lorax_jax.stack_adapters`) and run as one mixed batch
(``adapter_ids``); the loss is ``Σ_k mean_k``, each adapter's mean over its own targets
(`causal_lm_loss_sums` per adapter), so adapter ``k``'s gradient is exactly its own batch's, and
the optimizer is `lorax_jax.per_adapter`'s (clipping, Adam's moments and the schedule per
adapter). Adapter ``k`` therefore sees the data order, gradients and updates of a run on its topic
alone, up to dropout masks and float rounding. Written: ``adapters/<topic>/`` (one PEFT adapter
each) instead of ``adapter/``, and the held-out losses per topic.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import lorax_jax
from lorax_jax.apps import settings
from lorax_jax.apps.fortunes import fortune_items
from lorax_jax.files import MAX_TEXT_BYTES, check_destination, open_regular, read_regular, write_atomic, write_text_atomic
from lorax_jax.io.modules import by_target, modules
from lorax_jax.io.peft import check_parameter_options
from lorax_jax.models import hf, model_type
from lorax_jax.models.causal_lm import causal_lm_loss_sums, max_targets_per_batch
from lorax_jax.models.generate import generate
from lorax_jax.models.llama import FAMILIES, LLAMA_PATH_MAP, load_llama, stack_config, stack_layers, unstack_layers
from lorax_jax.models.llama_sharding import batch_sharding, make_mesh, mesh_axes, parse_mesh, shard_llama
from lorax_jax.models.tokenizer import Tokenizer, load_tokenizer

SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
CHECKPOINT = "checkpoint"  # an Orbax checkpoint directory
ADAPTER = "adapter"
ADAPTERS = "adapters"  # with tasks: adapters/<topic>/, one PEFT adapter per task
OUTPUT_FILES = ("loss.png", "samples.txt", "metrics.json", "settings.yaml")  # besides ADAPTER/ and CHECKPOINT/
# Settings that may differ between a checkpoint and the run resuming it.
RESUMABLE = ("out_dir", "stop_at", "save_every", "sample_prompts", "sample_tokens", "temperature", "mesh")


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything a run depends on; ``configs/finetune.yaml`` documents each key and sets its default."""

  model: str
  dtype: str
  quantize: str
  data: tuple[str, ...]
  topics: tuple[str, ...]
  format: str
  prompt: str
  max_chars: int
  eval_fraction: float
  eval_examples: int
  r: int
  alpha: float
  dropout: float
  dropout_seed: int
  targets: tuple[str, ...]
  init: str
  use_dora: bool
  lr: float
  loraplus_ratio: float
  warmup_steps: int
  min_lr_ratio: float
  weight_decay: float
  clip_norm: float
  steps: int
  batch_size: int
  seq_len: int
  seed: int
  out_dir: str
  save_every: int
  stop_at: int
  sample_prompts: tuple[str, ...]
  sample_tokens: int
  temperature: float
  share_prompt: bool
  loss_positions_only: bool
  scan_layers: bool
  remat: bool
  mesh: str
  tasks: int
  task_topics: tuple[str, ...]

  def __post_init__(self):
    settings.check([
        (self.dtype in ("float32", "bfloat16"), "setting dtype must be float32 or bfloat16"),
        (self.quantize in QUANTIZE, f"setting quantize must be one of {', '.join(QUANTIZE)}"),
        (self.quantize != "gguf" or self.model == "smollm2" or self.model.endswith(".gguf"),
         "setting quantize gguf keeps a GGUF file's blocks: the model must be smollm2 or a .gguf file"),
        (self.format in ("chat", "text"), "setting format must be chat or text"),
        (len(self.data) > 0, "setting data names no source: give fortunes, pydoc or a text file"),
        (0 < self.eval_fraction < 1, "setting eval_fraction must be in (0, 1)"),
        (self.eval_examples > 0, "setting eval_examples must be positive"),
        (self.lr > 0, "setting lr must be positive"),
        (self.loraplus_ratio >= 0, "setting loraplus_ratio must be >= 0 (0: plain AdamW, 16: LoRA+'s usual)"),
        (0 <= self.min_lr_ratio <= 1, "setting min_lr_ratio must be in [0, 1]"),
        (self.weight_decay >= 0, "setting weight_decay must be >= 0 (0 turns it off)"),
        (self.steps > 0, "setting steps must be positive"),
        (0 <= self.warmup_steps < self.steps, "setting warmup_steps must be in [0, steps)"),
        (0 <= self.stop_at <= self.steps, "setting stop_at must be in [0, steps]"),
        (self.batch_size > 0, "setting batch_size must be positive"),
        (self.seq_len >= 4, "setting seq_len must be at least 4"),
        (self.save_every > 0, "setting save_every must be positive"),
        (self.sample_tokens > 0, "setting sample_tokens must be positive"),
        (self.max_chars >= 0, "setting max_chars must be >= 0"),
        (self.clip_norm > 0, "setting clip_norm must be positive"),
        (self.temperature >= 0, "setting temperature must be >= 0 (0 is greedy)"),
        (self.tasks >= 0, "setting tasks must be >= 0 (0: one adapter on all the data)"),
        (self.tasks <= len(self.task_topics),
         f"setting tasks={self.tasks} needs as many task_topics; there are {len(self.task_topics)}: "
         "list more (--task_topics \"[art, food, ...]\")"),
        (len(set(self.task_topics[:self.tasks])) == self.tasks, "setting task_topics repeats a topic"),
        (not self.tasks or self.data == ("fortunes",),
         "setting tasks trains one adapter per fortunes topic: data must be [fortunes]"),
        (not self.tasks or not self.mesh,
         "setting tasks runs on one device: the stacked adapters have no mesh layout yet (drop --mesh)"),
    ])
    if self.mesh:
      parse_mesh(self.mesh)  # its ValueError names the problem
    lora_config(self)  # r, alpha, dropout, targets, init and use_dora are LoraConfig's to check


def _flags(parser: argparse.ArgumentParser) -> None:
  """The flags of a launch rather than of a run's settings: resuming, and the processes."""
  parser.add_argument("--resume", action="store_true", help="go on from the checkpoint in out_dir")
  parser.add_argument("--coordinator", metavar="HOST:PORT",
                      help="jax.distributed's coordinator (process 0's address; default $JAX_COORDINATOR_ADDRESS); "
                           "auto: detect the cluster (TPU pod, SLURM, Open MPI)")
  parser.add_argument("--num-processes", type=int, help="processes in all (default $JAX_NUM_PROCESSES)")
  parser.add_argument("--process-id", type=int, help="this process, 0..N-1 (default $JAX_PROCESS_ID)")


def parse_args(argv: Sequence[str] | None = None) -> tuple[Settings, bool]:
  """``(settings, resume)`` from the packaged finetune.yaml, ``--config`` and ``--key value`` flags
  (`lorax_jax.apps.settings.parse`)."""
  s, args = settings.parse(Settings, "finetune", argv, __doc__.split("\n")[0], _flags)
  return s, args.resume


def start_processes(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
  """Join ``jax.distributed`` when a coordinator is given (or ``$JAX_COORDINATOR_ADDRESS``, with
  ``$JAX_NUM_PROCESSES`` and ``$JAX_PROCESS_ID`` as the other two's defaults); ``"auto"`` lets JAX
  detect the cluster. CPU collectives go through gloo. Without a coordinator: one process, nothing done.

  Raises:
    ValueError: a process count or id missing where JAX cannot detect them, or out of range.
  """
  coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if coordinator is None:
    return
  env = lambda name: int(os.environ[name]) if os.environ.get(name, "").strip().isdigit() else None
  num_processes = num_processes if num_processes is not None else env("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else env("JAX_PROCESS_ID")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    if coordinator == "auto":
      jax.distributed.initialize()
    else:
      jax.distributed.initialize(coordinator, num_processes, process_id)
  except (ValueError, TypeError, RuntimeError) as e:
    raise ValueError(f"jax.distributed could not start ({' '.join(str(e).split())}): pass --coordinator HOST:PORT "
                     "--num-processes N --process-id I (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                     "JAX_PROCESS_ID) on every process") from None


def lora_config(s: Settings, model: Any = None, params: Any = None) -> lorax_jax.LoraConfig:
  """The `lorax_jax.LoraConfig` of the settings. ``targets: all-linear`` is PEFT's selection, decided by
  use when the ``model`` and its ``params`` are given (`lorax_jax.axes_from_use` on a token batch: every
  kernel the model multiplies as a linear layer's weight, but the head over the vocabulary; a Mixtral's
  router and experts too): the config then targets exactly those kernels, with their layouts. Without
  them (checking the settings) it stays `lorax_jax.find_targets`' name rule.

  Args:
    s: the settings.
    model, params: the Flax model (``model.apply(params, tokens)``) and its params, for ``all-linear``.

  >>> lora_config(parse_args(["--targets", "[q_proj, v_proj]", "--r", "4"])[0]).targets
  ('q_proj', 'v_proj')
  """
  cfg = lorax_jax.LoraConfig(r=s.r, alpha=s.alpha, dropout=s.dropout, targets=settings.lora_targets(s.targets),
                             init=s.init, use_dora=s.use_dora)
  if cfg.targets == "all-linear" and model is not None:
    cfg = lorax_jax.axes_from_use(model.apply, params, cfg, jax.ShapeDtypeStruct((1, 8), jnp.int32))
  return cfg


# ---------------------------------------------------------------------------------------
# Model


QUANTIZE = ("gguf", "nf4", "int8", "none")  # the `quantize` setting: how the frozen base is held


def load_model(name: str, dtype: str = "float32", quantize: str = "none") -> tuple[Any, Any, Tokenizer]:
  """``(model, params, tokenizer)`` of ``name``: "smollm2", a Hugging Face directory of a Llama-family
  model (`lorax_jax.models.llama.FAMILIES`: Llama, Qwen2/2.5, Qwen3, Mistral, Gemma 2/3, Phi-3) or a GGUF file.

  ``quantize``: ``"none"`` (float params), ``"gguf"`` (the GGUF file's quantized blocks kept as
  stored: `lorax_jax.models.gguf.load_gguf` with ``quantized=True``), ``"nf4"`` (blocks of 64) or
  ``"int8"`` (per output channel): `lorax_jax.quantize` of the projection kernels.
  """
  from lorax_jax.models import gguf

  if name == "smollm2":
    _, model, params, tokenizer = gguf.load_smollm2(dtype=jnp.dtype(dtype), quantized=quantize == "gguf")
  elif name.endswith(".gguf"):
    _, model, params, tokenizer = gguf.load_gguf(name, dtype=jnp.dtype(dtype), quantized=quantize == "gguf")
  elif os.path.isdir(name):
    family = "Llama-family"
    try:
      family = model_type(hf.read_config(name))
      if family in FAMILIES:
        _, model, params = load_llama(name, jnp.dtype(dtype))
        tokenizer = load_tokenizer(name)
    except (ValueError, KeyError, TypeError) as e:  # a broken config.json, tokenizer or checkpoint
      raise ValueError(f"model directory {name} is not a usable Hugging Face {family} checkpoint "
                       f"({' '.join(str(e).split())}): fix or replace its files") from None
    if family not in FAMILIES:
      raise ValueError(f"model directory {name} holds a {family!r} model; finetune runs the Llama families "
                       f"({', '.join(map(repr, FAMILIES))}): load others with lorax_jax.models.load_model")
  else:
    raise FileNotFoundError(f"model {name!r} is neither smollm2, a Hugging Face directory of a Llama-family "
                            f"model ({', '.join(map(repr, FAMILIES))}) nor a .gguf file")
  if quantize in ("nf4", "int8"):
    params = lorax_jax.quantize(params, quantize, block_size=64 if quantize == "nf4" else None)
  return model, params, tokenizer


def stop_tokens(tokenizer: Tokenizer) -> list[int]:
  """End of text, and ChatML's end of turn where the vocabulary has it."""
  ids = {tokenizer.eos_id, tokenizer.backend.token_to_id("<|im_end|>")}
  return sorted(i for i in ids if i is not None)


# ---------------------------------------------------------------------------------------
# Data


def read_items(path: str) -> list[str]:
  """A text file's items: its parts between lines holding only ``%`` or, when there are none,
  between blank lines. A directory's files are read in sorted order."""
  if os.path.isdir(path):
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if not f.startswith("."))
    if not files:
      raise ValueError(f"data directory {path} holds no files")
    return [item for f in files for item in read_items(f)]
  if not os.path.exists(path):
    raise FileNotFoundError(f"data {path!r} is neither fortunes, pydoc nor an existing file or directory")
  try:
    text = read_regular(path, MAX_TEXT_BYTES, "data file").decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"data file {path} is not UTF-8 text ({e.reason} at byte {e.start}): "
                     "give a text file, or convert it with iconv") from None
  if "\x00" in text:
    raise ValueError(f"data file {path} holds NUL bytes, so it is not text: give a text file")
  separator = r"^%[ \t]*$" if re.search(r"^%[ \t]*$", text, re.MULTILINE) else r"\n[ \t]*\n"
  items = [s.strip() for s in re.split(separator, text, flags=re.MULTILINE) if s.strip()]
  if not items:
    raise ValueError(f"data file {path} is empty: give it some text")
  return items


def load_items(s: Settings) -> list[str]:
  """The items of every source in ``s.data``, whitespace-tidied, deduplicated, in order."""
  items = []
  for source in s.data:
    if source == "fortunes":
      items += [t for v in fortune_items(list(s.topics) or None).values() for t in v]
    elif source == "pydoc":
      from pydoc_data.topics import topics
      items += [topics[k] for k in sorted(topics)]
    else:
      items += read_items(source)
  tidy = ("\n".join(" ".join(line.split()) for line in t.strip().splitlines()) for t in items)
  return [t for t in dict.fromkeys(tidy) if 0 < len(t) <= (s.max_chars or len(t))]


@dataclasses.dataclass(frozen=True)
class Examples:
  """Token rows ``[N, seq_len + 1]`` (the model reads ``[:, :-1]`` and predicts ``[:, 1:]``),
  ``weights`` of the same shape (1 where a token is a training target, else 0) and the
  ``lengths`` of the rows before padding."""

  tokens: np.ndarray
  weights: np.ndarray
  lengths: np.ndarray

  def __len__(self) -> int:
    return len(self.tokens)

  def take(self, rows: Any) -> Examples:
    return Examples(self.tokens[rows], self.weights[rows], self.lengths[rows])

  @staticmethod
  def concat(parts: Sequence[Examples]) -> Examples:
    return Examples(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("tokens", "weights", "lengths")))

  def padded(self, start: int, size: int) -> Examples:
    """Rows ``start … start + size - 1``, the missing ones weightless copies of row 0 (no target)."""
    rows = self.take(slice(start, start + size))
    pad = size - len(rows)
    blank = Examples(np.repeat(self.tokens[:1], pad, 0), np.zeros((pad, self.weights.shape[1]), np.float32),
                     np.zeros(pad, np.int64))
    return Examples.concat([rows, blank])


def chat_examples(items: Sequence[str], tokenizer: Tokenizer, prompt: str, seq_len: int) -> Examples:
  """One row per item: the chat ``user: prompt / assistant: item``, right-padded; only the answer
  (up to its end-of-turn token) is a target. Items that do not fit ``seq_len + 1`` tokens are skipped."""
  prefix = tokenizer.chat(prompt)
  stops = stop_tokens(tokenizer)
  rows = []
  for item in items:
    ids = tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": item}],
        add_generation_prompt=False))
    if ids[:len(prefix)] != prefix:
      raise ValueError("the chat template renders a conversation that does not start with its own prompt")
    ends = [i for i, t in enumerate(ids) if t in stops and i >= len(prefix)]
    ids = ids[:ends[0] + 1] if ends else ids
    if len(ids) <= seq_len + 1:
      rows.append((ids, len(prefix)))
  return _pad(rows, seq_len + 1, tokenizer.pad_id or 0)


def text_examples(items: Sequence[str], tokenizer: Tokenizer, seq_len: int) -> Examples:
  """The items joined by end-of-text tokens and cut into rows of ``seq_len + 1`` tokens
  (consecutive rows overlap by one token); every token is a target."""
  ids = [t for item in items for t in tokenizer.encode(item) + stop_tokens(tokenizer)[:1]]
  rows = [(ids[i:i + seq_len + 1], 0) for i in range(0, max(len(ids) - 1, 0), seq_len)]
  return _pad([r for r in rows if len(r[0]) > 1], seq_len + 1, tokenizer.pad_id or 0)


def _pad(rows: Sequence[tuple[list[int], int]], length: int, pad_id: int) -> Examples:
  """Rows ``(ids, first_target)`` right-padded to ``length``; weights 1 on ``ids[first_target:]``."""
  tokens = np.full((len(rows), length), pad_id, np.int32)
  weights = np.zeros((len(rows), length), np.float32)
  for i, (ids, start) in enumerate(rows):
    tokens[i, :len(ids)] = ids
    weights[i, max(start, 1):len(ids)] = 1.0
  return Examples(tokens, weights, np.array([len(ids) for ids, _ in rows], np.int64))


def make_examples(s: Settings, tokenizer: Tokenizer) -> tuple[Examples, Examples]:
  """``(train, held_out)``: the items are shuffled with ``seed`` and split by ``eval_fraction``
  before tokenizing, so no held-out text is trained on."""
  items = load_items(s)
  order = np.random.default_rng(s.seed).permutation(len(items))
  n_eval = max(1, round(s.eval_fraction * len(items)))
  splits = [[items[i] for i in part] for part in (order[n_eval:], order[:n_eval])]
  if s.format == "chat":
    train, held_out = (chat_examples(p, tokenizer, s.prompt, s.seq_len) for p in splits)
  else:
    train, held_out = (text_examples(p, tokenizer, s.seq_len) for p in splits)
  if len(train) < s.batch_size or len(held_out) == 0:
    topics = f" (topics {', '.join(s.topics)})" if "fortunes" in s.data and s.topics else ""
    raise ValueError(
        f"data {', '.join(s.data)}{topics} gives {len(train)} training and {len(held_out)} held-out examples "
        f"of at most {s.seq_len} tokens (from {len(items)} items of at most {s.max_chars or 'any'} "
        f"characters); need at least batch_size={s.batch_size} and 1: add data, raise seq_len or "
        "max_chars, or lower batch_size")
  return train, held_out


@dataclasses.dataclass(frozen=True)
class Task:
  """What one adapter trains on: its fortunes topic (None: the run's one adapter, on all of
  ``data``), its training examples and its held-out examples (at most ``eval_examples``)."""

  name: str | None
  train: Examples
  held_out: Examples


def make_tasks(s: Settings, tokenizer: Tokenizer) -> list[Task]:
  """The run's tasks: one on everything ``s`` reads, or with ``s.tasks = N`` one per topic of
  ``s.task_topics[:N]``, each split exactly as a run with ``topics: [that topic]`` splits it
  (`make_examples`), so its training order and held-out set are that run's."""
  if not s.tasks:
    return [Task(None, *_limited(s, make_examples(s, tokenizer)))]
  return [Task(topic, *_limited(s, make_examples(dataclasses.replace(s, topics=(topic,), tasks=0), tokenizer)))
          for topic in s.task_topics[:s.tasks]]


def _limited(s: Settings, split: tuple[Examples, Examples]) -> tuple[Examples, Examples]:
  train, held_out = split
  return train, held_out.take(slice(s.eval_examples))


def task_ids(tasks: Sequence[Task], rows: int) -> np.ndarray | None:
  """The adapter of each row of a batch made of ``rows`` rows of each task, in order (None: one
  adapter, a plain tree)."""
  return None if tasks[0].name is None else np.repeat(np.arange(len(tasks), dtype=np.int32), rows)


def step_batch(s: Settings, tasks: Sequence[Task], step: int) -> Examples:
  """Batch ``step``: each task's `batch_indices` ``(seed, step)`` rows, the tasks one after another."""
  return Examples.concat([t.train.take(batch_indices(len(t.train), s.batch_size, s.seed, step)) for t in tasks])


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """The rows of batch ``step``: epoch ``e`` visits the rows in ``permutation(seed, e)`` order, and
  batches run on across epoch boundaries. A pure function of ``(seed, step)``."""
  positions = step * batch_size + np.arange(batch_size)
  epochs, offsets = np.divmod(positions, n)
  perms = {e: np.random.default_rng([seed, e]).permutation(n) for e in set(epochs.tolist())}
  return np.array([perms[e][o] for e, o in zip(epochs.tolist(), offsets.tolist())])


# ---------------------------------------------------------------------------------------
# Training


def work_options(s: Settings, tokenizer: Tokenizer, tasks: Sequence[Task]) -> dict[str, Any]:
  """The `causal_lm_loss_sums` options the settings ask for, derived from the data.

  ``prefix_len`` (``share_prompt``, chat format only, one task: a prefix run once cannot go
  through several adapters): the chat prompt's length minus one, the input tokens every row
  shares. ``max_targets`` (``loss_positions_only``): the sum over tasks of the most trained tokens
  any ``batch_size`` rows of its training or held-out examples hold (`max_targets_per_batch`), so
  one compiled step serves every batch, training's and evaluation's.
  """
  shared = s.share_prompt and s.format == "chat" and not s.tasks
  prefix_len = len(tokenizer.chat(s.prompt)) - 1 if shared else 0
  max_targets = (sum(max(max_targets_per_batch(e.weights, s.batch_size) for e in (t.train, t.held_out))
                     for t in tasks) if s.loss_positions_only else None)
  return {"prefix_len": prefix_len, "max_targets": max_targets}


def make_optimizer(s: Settings) -> optax.GradientTransformation:
  """AdamW on a linear warmup to ``lr`` then a cosine decay to ``lr * min_lr_ratio`` at ``steps``,
  after clipping the gradient's global norm to ``clip_norm``; with ``loraplus_ratio > 0``, LoRA+
  (`lorax_jax.loraplus`: ``b``'s schedule ``loraplus_ratio ×`` ``a``'s). With ``tasks`` all of it
  per adapter of the stacked tree (`lorax_jax.per_adapter`)."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, s.lr, s.warmup_steps, s.steps, s.lr * s.min_lr_ratio)
  adamw = (lorax_jax.loraplus(optax.adamw, schedule, s.loraplus_ratio, weight_decay=s.weight_decay)
           if s.loraplus_ratio else optax.adamw(schedule, weight_decay=s.weight_decay))
  tx = optax.chain(optax.clip_by_global_norm(s.clip_norm), adamw)
  return lorax_jax.per_adapter(tx) if s.tasks else tx


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where training lives on a mesh: a ``Sharding`` tree for each argument of the train step.

  ``params`` by `lorax_jax.models.llama_sharding.llama_shardings`, ``lora`` by
  `lorax_jax.lora_shardings` (each factor like its kernel), ``opt_state`` like the factors
  (`state_shardings`), ``batch`` (token and weight rows) over the batch axes; scalars replicated.
  """

  mesh: Mesh
  params: Any
  lora: Any
  opt_state: Any
  batch: NamedSharding

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())


def state_shardings(state: Any, lora_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for an optimizer state of the factors: a leaf whose tree path ends with a factor's
  path (Adam's ``mu``, ``nu``; the longest such path) gets that factor's sharding; a scalar (a step
  count) is replicated.

  Raises:
    ValueError: an array leaf that mirrors no factor (named by its path).
  """
  by_path = {jax.tree_util.keystr(p): sh for p, sh in jax.tree_util.tree_flatten_with_path(lora_shardings)[0]}

  def one(kp: tuple, leaf: Any) -> NamedSharding:
    key = jax.tree_util.keystr(kp)
    found = [p for p in by_path if key.endswith(p)]
    if found:
      return by_path[max(found, key=len)]
    if np.ndim(leaf) == 0:
      return NamedSharding(mesh, PartitionSpec())
    raise ValueError(f"optimizer state {key} (shape {np.shape(leaf)}) mirrors no LoRA factor, so it has no "
                     "place on the mesh: an optimizer whose state is per factor (like AdamW's) is needed")

  return jax.tree_util.tree_map_with_path(one, state)


def place(mesh: Mesh, params: Any, lora: Any, cfg: lorax_jax.LoraConfig, optimizer: optax.GradientTransformation
          ) -> tuple[Any, Any, Any, Placement]:
  """``(params, lora, opt_state, placement)`` on ``mesh``: the base by the Llama table (each axis the
  mesh does not divide kept whole, and said), the factors by `lorax_jax.lora_shardings`, a fresh
  optimizer state like the factors."""
  params, notes = shard_llama(params, mesh)
  for note in notes:
    say(f"note: {note}")
  lora_sh = lorax_jax.lora_shardings(params, cfg)
  lora = jax.device_put(lora, lora_sh)
  opt_state = optimizer.init(lora)
  opt_sh = state_shardings(opt_state, lora_sh, mesh)
  placement = Placement(mesh, jax.tree.map(lambda x: x.sharding, params), lora_sh, opt_sh, batch_sharding(mesh))
  return params, lora, jax.device_put(opt_state, opt_sh), placement


def make_steps(lora_apply: Callable[..., Any], optimizer: optax.GradientTransformation,
               prefix_len: int = 0, max_targets: int | None = None,
               eval_apply: Callable[..., Any] | None = None, placement: Placement | None = None):
  """The jitted ``train_step(lora, opt_state, params, tokens, weights, rng, ids=None) -> (lora, opt_state,
  loss)`` and ``eval_sums(params, lora, tokens, weights, ids=None) -> (Σ w · CE, Σ w)``
  (`causal_lm_loss_sums` with ``prefix_len`` and ``max_targets``). With ``ids`` (a stacked tree, a
  mixed batch: each row's adapter) the sums and the losses are per adapter and the training
  objective is the sum of the adapters' mean losses. The frozen params are an argument: never
  differentiated, never baked into the compiled code. ``eval_apply`` (default ``lora_apply``)
  is the transform evaluation runs: `eval_transform`'s, so that evaluation, which has no dropout
  key by design, is not warned about one. With a ``placement`` both are jitted with its
  in and out shardings (the factors and optimizer state stay where they are; the loss replicated)."""
  def loss_sums(params, lora, tokens, weights, rng, ids, apply=lora_apply):
    return causal_lm_loss_sums(apply, params, lora, tokens, weights, rng, prefix_len=prefix_len,
                               max_targets=max_targets, adapter_ids=ids)

  def loss_fn(lora, params, tokens, weights, rng, ids):
    total, count = loss_sums(params, lora, tokens, weights, rng, ids)
    losses = total / jnp.maximum(count, 1.0)
    return jnp.sum(losses), losses

  def train_step(lora, opt_state, params, tokens, weights, rng, ids=None):
    (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(lora, params, tokens, weights, rng, ids)
    updates, opt_state = optimizer.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, losses

  def eval_sums(params, lora, tokens, weights, ids=None):
    return loss_sums(params, lora, tokens, weights, None, ids, eval_apply or lora_apply)

  if placement is None:
    return jax.jit(train_step, donate_argnums=(0, 1)), jax.jit(eval_sums)
  p, one = placement, placement.replicated
  return (jax.jit(train_step, donate_argnums=(0, 1), in_shardings=(p.lora, p.opt_state, p.params, p.batch, p.batch, one),
                  out_shardings=(p.lora, p.opt_state, one)),
          jax.jit(eval_sums, in_shardings=(p.params, p.lora, p.batch, p.batch), out_shardings=(one, one)))


def with_ids(ids: np.ndarray | None) -> dict[str, Any]:
  """The steps' keyword arguments for a batch's adapter ids (none for one adapter: the steps on a
  mesh take positional arguments only)."""
  return {} if ids is None else {"ids": ids}


def put_batch(placement: Placement | None, *rows: np.ndarray) -> tuple[Any, ...]:
  """Host rows (every process holds the whole batch) as arrays split over the mesh's batch axes;
  unchanged without a placement."""
  return rows if placement is None else tuple(jax.device_put(x, placement.batch) for x in rows)


def eval_transform(apply_fn: Callable[..., Any], params: Any, cfg: lorax_jax.LoraConfig) -> Callable[..., Any]:
  """The LoRA transform for evaluation: ``cfg`` without dropout (PEFT's ``model.eval()``)."""
  return lorax_jax.lora_transform(apply_fn, params, cfg.replace(dropout=0.0))


def training_layout(scan_layers: bool, model: Any, params: Any, lora: Any, cfg: lorax_jax.LoraConfig
                    ) -> tuple[Any, Any, Any, lorax_jax.LoraConfig]:
  """``(model, params, lora, cfg)`` as training runs them: with ``scan_layers`` the scanned model
  on the layers' params and factors stacked once, here (`stack_layers`: the same factors, so
  the jitted step does not stack them per call), and ``cfg`` with the
  stacked kernels' layouts (`stack_config`); else unchanged. `unstack_layers` gives
  back the per-layer trees that checkpoints, adapters and sampling use."""
  if not scan_layers:
    return model, params, lora, cfg
  return model.clone(scan_layers=True), stack_layers(params), stack_layers(lora), stack_config(cfg, params)


def evaluate(eval_sums: Callable[..., Any], params: Any, lora: Any, tasks: Sequence[Task],
             batch_size: int, placement: Placement | None = None) -> float | dict[str, float]:
  """Mean cross-entropy per target token over each task's held-out examples, through its adapter:
  a float for one adapter, ``{topic: loss}`` with tasks. Each batch holds ``batch_size`` rows of
  every task (a task's last ones padded with weightless rows, so one compilation serves every
  batch), on ``placement``'s batch sharding if given."""
  ids = task_ids(tasks, batch_size)
  sums = []
  for i in range(0, max(len(t.held_out) for t in tasks), batch_size):
    batch = Examples.concat([t.held_out.padded(i, batch_size) for t in tasks])
    sums.append(eval_sums(params, lora, *put_batch(placement, batch.tokens, batch.weights), **with_ids(ids)))
  total, count = np.sum(np.array(jax.device_get(sums), np.float64).reshape(len(sums), 2, -1), axis=0)
  return by_task(tasks, [float(t / c) for t, c in zip(total, count)])


def by_task(tasks: Sequence[Task], values: Sequence[Any]) -> Any:
  """``values[0]`` for one adapter, ``{topic: value}`` with tasks."""
  return values[0] if tasks[0].name is None else {t.name: v for t, v in zip(tasks, values)}


def sample(model: Any, params: Any, tokenizer: Tokenizer, s: Settings, lora: Any = None,
           cfg: lorax_jax.LoraConfig | None = None) -> list[str]:
  """Completions of ``s.sample_prompts`` (chat prompts in the chat format), the adapter merged once."""
  prompts = [tokenizer.chat(p) if s.format == "chat" else tokenizer.encode(p) for p in s.sample_prompts]
  if lora is None:  # the base model alone (merging an adapter dequantizes a quantized base)
    params = lorax_jax.dequantize(params)
  out = generate(model, params, prompts, max_new_tokens=s.sample_tokens, temperature=s.temperature,
                 stop_tokens=stop_tokens(tokenizer), rng=jax.random.key(s.seed), lora=lora, cfg=cfg,
                 merged=lora is not None)
  return [tokenizer.decode(ids).strip() for ids in out]


# ---------------------------------------------------------------------------------------
# Checkpoints: Orbax, each process writing its shards; the state as JSON beside them


def _flat(tree: Any) -> dict[str, Any]:
  """Leaves by their tree paths joined with ``.`` (``params.model.layers_0.self_attn.q_proj.kernel.a``)."""
  return {jax.tree_util.keystr(p, simple=True, separator="."): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _manager(path: str) -> Any:
  """The Orbax ``CheckpointManager`` of the checkpoint directory ``path``: one step kept (a new one
  is complete on disk before the old one is deleted), written synchronously."""
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False, create=True)
  handlers = {"lora": ocp.StandardCheckpointHandler(), "opt": ocp.StandardCheckpointHandler(),
              "state": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(os.path.abspath(path), options=options, item_handlers=handlers)


def save_checkpoint(path: str, lora: Any, opt_state: Any, state: dict[str, Any]) -> None:
  """LoRA factors and optimizer state leaves (named by their tree paths; each process writes the
  shards on its devices) plus ``state`` as JSON (written by process 0), as step ``state["step"]``
  of the Orbax checkpoint directory ``path``. A collective: every process calls it. Orbax writes a
  step into a temporary directory and renames it when every process is done, so a crash leaves
  the previous step."""
  import orbax.checkpoint as ocp

  with _manager(path) as manager:
    manager.save(state["step"], args=ocp.args.Composite(lora=ocp.args.StandardSave(_flat(lora)),
                                                        opt=ocp.args.StandardSave(_flat(opt_state)),
                                                        state=ocp.args.JsonSave(state)), force=True)


def _unusable(path: str, problem: str) -> ValueError:
  return ValueError(f"checkpoint {path} {problem}: delete it to start over, or pick another out_dir")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A checked checkpoint (`read_checkpoint`): its directory, step, state and the shape and dtype
  of every stored leaf (``infos["lora"]``, ``infos["opt"]``: path -> ``(shape, dtype)``)."""

  path: str
  step: int
  state: dict[str, Any]
  infos: dict[str, dict[str, tuple[tuple[int, ...], np.dtype]]]


def read_checkpoint(path: str, s: Settings | None) -> Checkpoint:
  """The checkpoint in directory ``path``, checked before anything else is loaded: its latest step
  reads, its state has a step (the data position: batch ``k`` is `batch_indices` ``(seed, k)``),
  the history and the settings, the step is within ``s.steps``, the settings other than those in
  RESUMABLE are ``s``'s (no check with ``s`` None), and Orbax's metadata gives every leaf's shape.

  Raises:
    FileNotFoundError: no checkpoint step in ``path``.
    ValueError: unreadable or truncated files; not a finetune checkpoint; a step outside
      ``1..s.steps``; settings that may not change on resume but did (each named).
  """
  import orbax.checkpoint as ocp

  _check_files(path)
  try:
    with _manager(path) as manager:
      step = manager.latest_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoint to resume at {path}: run without --resume first")
      state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.JsonRestore()))["state"]
      metadata = manager.item_metadata(step)
      infos = {k: {name: (tuple(m.shape), np.dtype(m.dtype)) for name, m in metadata[k].items()} for k in ("lora", "opt")}
  except FileNotFoundError:
    raise
  except Exception as e:  # Orbax and tensorstore raise many kinds on damaged files
    raise _unusable(path, f"is corrupt or truncated ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
  if state is not None and state.get("step") != step:
    raise _unusable(path, f"is corrupt: its directory is step {step}, its state says {state.get('step')!r}")
  if s is not None:
    _check_state(path, state, s)
  return Checkpoint(path, step, state, infos)


def _check_files(path: str) -> None:
  """A ValueError unless ``path`` is a directory whose files are all regular (checked without
  blocking, `lorax_jax.files.open_regular`: a FIFO or device planted in a checkpoint never hangs Orbax)."""
  if not os.path.isdir(path):
    with open_regular(path):  # names a FIFO, socket or device
      raise _unusable(path, "is a file, not a checkpoint directory")
  for root, _, files in os.walk(path):
    for name in files:
      with open_regular(os.path.join(root, name)):
        pass


def _check_state(path: str, state: Any, s: Settings) -> None:
  """A ValueError unless ``state`` is a finetune checkpoint's that a run of ``s`` may resume."""
  if (not isinstance(state, dict) or not isinstance(state.get("settings"), dict)
      or not isinstance(state.get("step"), int) or not isinstance(state.get("history"), list)):
    raise _unusable(path, "is not a lorax-jax finetune checkpoint (it has no step, history and settings)")
  if not 0 < state["step"] <= s.steps:
    raise _unusable(path, f"is at step {state['step']}, outside this run's 1..steps={s.steps}")
  for key, value in settings.as_dict(s).items():
    if key not in RESUMABLE and state["settings"].get(key) != value:
      raise ValueError(f"checkpoint {path} was made with {key}={state['settings'].get(key)!r}, not "
                       f"{value!r}: resume with the same settings (only {', '.join(RESUMABLE)} may "
                       "change), or pick another out_dir")


def restore(checkpoint: Checkpoint, lora: Any, opt_state: Any) -> tuple[Any, Any]:
  """``(lora, opt_state)`` read from ``checkpoint`` onto the shardings of ``lora`` and ``opt_state``,
  templates (fresh ones from ``init_lora`` and ``optimizer.init``, placed as training needs them)
  giving the trees' structure: each process reads the shards on its devices. Every stored leaf must
  match its template's shape and dtype (checked against the metadata first: Orbax would pad or cut)."""
  import orbax.checkpoint as ocp

  path, fix = checkpoint.path, "resume with the model and LoRA settings it was made with, or pick another out_dir"
  targets = {}
  for item, template in (("lora", lora), ("opt", opt_state)):
    stored, flat = dict(checkpoint.infos[item]), _flat(template)
    for key, like in flat.items():
      if key not in stored:
        raise ValueError(f"checkpoint {path} lacks {item}.{key}, which this model needs: {fix}")
      shape, dtype = stored.pop(key)
      if shape != like.shape or dtype != like.dtype:
        raise ValueError(f"checkpoint {path} was made for another model: {item}.{key} is {dtype}{list(shape)}, "
                         f"this model needs {like.dtype}{list(like.shape)}; {fix}")
    if stored:
      raise ValueError(f"checkpoint {path} has {', '.join(f'{item}.{k}' for k in sorted(stored))}, which this "
                       f"model lacks: {fix}")
    targets[item] = {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for k, x in flat.items()}
  try:
    with _manager(path) as manager:
      read = manager.restore(checkpoint.step, args=ocp.args.Composite(
          lora=ocp.args.StandardRestore(targets["lora"]), opt=ocp.args.StandardRestore(targets["opt"])))
  except Exception as e:
    raise _unusable(path, f"is corrupt or truncated ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
  rebuild = lambda template, values: jax.tree_util.tree_unflatten(jax.tree.structure(template),
                                                                  [values[k] for k in _flat(template)])
  return rebuild(lora, read["lora"]), rebuild(opt_state, read["opt"])


# ---------------------------------------------------------------------------------------
# Outputs (written by process 0 alone)


def primary() -> bool:
  """Whether this is the process that writes the outputs and prints (process 0; the only one
  without ``jax.distributed``)."""
  return jax.process_index() == 0


def say(text: str) -> None:
  """Print ``text`` from process 0 only."""
  if primary():
    print(text, flush=True)


def gathered(lora: Any) -> Any:
  """``lora`` as NumPy arrays, each whole on every process (``process_allgather`` of the shards:
  a collective, so every process calls it). Saving, sampling and the returned factors use it."""
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(lora, tiled=True)


def save_trained_adapter(directory: str, lora: Any, cfg: lorax_jax.LoraConfig, params: Any, initial: Any,
                         base_model_name: str | None) -> None:
  """The PEFT adapter of ``lora`` (`gathered`) for ``params``. Every process calls it (`save_adapter`
  writes from process 0 and returns in each once the adapter is on disk: a collective).
  ``initial``: PiSSA/OLoRA's starting factors (saved converted)."""
  lorax_jax.save_adapter(directory, lora, cfg, params, LLAMA_PATH_MAP, base_model_name_or_path=base_model_name,
                         task_type="CAUSAL_LM", initial=initial)


def plot_losses(path: str, history: Sequence[tuple[int, Any]], eval_points: Sequence[tuple[int, Any]]) -> None:
  """Training loss per step (and its running mean) with the held-out losses, as a PNG; with tasks
  (losses ``{topic: loss}``) one curve per adapter."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  named = lambda v: v if isinstance(v, dict) else {"": v}
  fig, ax = plt.subplots(figsize=(7, 4))
  for name in named(history[0][1]):
    steps = np.array([step for step, _ in history], np.float64)
    losses = np.array([named(v)[name] for _, v in history], np.float64)
    label = f" {name}" if name else ""
    line, = ax.plot(steps, losses, lw=0.8, alpha=0.5, label=f"train{label} (batch)")
    if len(losses) >= 10:
      k = 10
      ax.plot(steps[k - 1:], np.convolve(losses, np.ones(k) / k, "valid"), lw=2, color=line.get_color(),
              label=f"train{label} ({k}-step mean)")
    ax.plot([step for step, _ in eval_points], [named(v)[name] for _, v in eval_points], "o",
            color=line.get_color() if name else "k", label=f"held-out{label} (before, after)")
  ax.set(xlabel="step", ylabel="cross-entropy (nats / token)", title="LoRA fine-tune")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
  plt.close(fig)


def samples_text(prompts: Sequence[str], before: Sequence[str], after: Sequence[str] | dict[str, Sequence[str]]
                 ) -> str:
  """Each prompt's completion before and after training (after: by each adapter, with tasks)."""
  afters = {"after": after} if not isinstance(after, dict) else {f"after ({k})": v for k, v in after.items()}
  blocks = [f"### {p}\n--- before\n{b}\n" + "".join(f"--- {label}\n{a[i]}\n" for label, a in afters.items())
            for i, (p, b) in enumerate(zip(prompts, before))]
  return "\n".join(blocks)


# ---------------------------------------------------------------------------------------
# The run


def training_mesh(s: Settings) -> Mesh | None:
  """The mesh ``s.mesh`` spells over every device of every process (None: one device).

  Raises:
    ValueError: several processes without a mesh; sizes that do not multiply to the device count;
      a batch the batch axes do not divide.
  """
  if not s.mesh:
    if jax.process_count() > 1:
      raise ValueError(f"{jax.process_count()} processes need a mesh over their {jax.device_count()} devices: "
                       f"pass --mesh data={jax.device_count()} (or fsdp/tensor axes)")
    return None
  mesh = make_mesh(s.mesh)
  ways = math.prod(mesh.shape[a] for a in mesh_axes("batch", mesh))
  if s.batch_size % ways:
    raise ValueError(f"batch_size={s.batch_size} does not split over the mesh's {ways} batch places (data × fsdp of "
                     f"{s.mesh}): make it a multiple of {ways}")
  return mesh


def resume_point(s: Settings) -> Checkpoint:
  """The checked checkpoint of ``s.out_dir`` (`read_checkpoint`)."""
  path = os.path.join(s.out_dir, CHECKPOINT)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint to resume at {path}: run without --resume first")
  return read_checkpoint(path, s)


def run(s: Settings, model: Any, params: Any, tokenizer: Tokenizer, *,
        checkpoint: Checkpoint | None = None,
        base_model_name: str | None = None) -> dict[str, Any]:
  """Fine-tune ``model``'s LoRA as ``s`` says; write everything into ``s.out_dir``.

  ``checkpoint`` is `resume_point`'s, to go on from it. Returns the metrics (as in
  ``metrics.json``) plus ``"lora"``, the trained factors. With a PiSSA/OLoRA ``init`` the factors
  train on the residual base (`lorax_jax.init_lora_and_base`, re-derived on resume) and the
  adapter is saved converted for the original base (``save_adapter(..., initial=...)``).
  With ``s.mesh`` the base, factors, optimizer state and batches live on that mesh (`place`),
  over every device of every ``jax.distributed`` process; ``"lora"`` is then gathered to NumPy
  (`gathered`), and process 0 alone prints and writes the outputs.

  Raises:
    ValueError: unusable data or settings (a mesh that does not fit the devices or the batch); an ``out_dir`` that `lorax_jax.files.check_destination`
      refuses (``""``, the working or home directory, a directory holding files the run does not
      write), checked before any training or evaluation.
  """
  import yaml

  tasks = make_tasks(s, tokenizer)
  cfg = lora_config(s, model, params)
  targets = lorax_jax.find_targets(params, cfg)  # PEFT's refusals are said before training, not after
  check_parameter_options(targets, by_target(modules(params, LLAMA_PATH_MAP), targets), cfg, "finetune")
  out = check_destination(s.out_dir, OUTPUT_FILES, (ADAPTER, ADAPTERS, CHECKPOINT))
  mesh = training_mesh(s)
  key_init, key_dropout = jax.random.split(jax.random.key(s.seed))
  if s.dropout_seed:  # other masks, the same data and starting factors
    key_dropout = jax.random.fold_in(key_dropout, s.dropout_seed)
  original = params
  lora, params = lorax_jax.init_lora_and_base(params, cfg, key_init)
  initial = jax.tree.map(jnp.copy, lora) if cfg.changes_base else None  # train_step donates lora
  base = params  # per layer, on one device: sampling after training runs on it
  for t in tasks:
    say(f"{f'task {t.name}: ' if t.name else ''}{len(t.train)} training and {len(t.held_out)} held-out examples "
        f"of at most {s.seq_len} tokens")
  say(f"LoRA r={s.r} on {len(targets)} kernels: "
      f"{lorax_jax.lora_count(params, cfg):,} trainable parameters "
      f"({lorax_jax.lora_count(params, cfg) / lorax_jax.count(params):.3%} of the model)"
      + (f" per adapter, {len(tasks)} adapters in one mixed batch" if s.tasks else ""))
  if s.tasks and s.share_prompt and s.format == "chat":
    say("note: share_prompt is off with tasks (each row's prompt runs through its own adapter)")
  train_model, params, lora, train_cfg = training_layout(s.scan_layers, model.clone(remat=s.remat), params, lora,
                                                          cfg)
  one_cfg = train_cfg  # one adapter's config in the training layout
  if s.tasks:  # every adapter starts where a run on its topic alone starts
    lora, train_cfg = lorax_jax.stack_adapters(params, [(lora, one_cfg)] * len(tasks))
  optimizer = make_optimizer(s)
  placement = None
  if mesh is None:
    opt_state = optimizer.init(lora)
  else:
    params, lora, opt_state, placement = place(mesh, params, lora, train_cfg, optimizer)
    say(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices of {jax.process_count()} process(es)")
  lora_apply = lorax_jax.lora_transform(train_model.apply, params, train_cfg)
  train_step, eval_sums = make_steps(lora_apply, optimizer, **work_options(s, tokenizer, tasks),
                                     eval_apply=eval_transform(train_model.apply, params, train_cfg),
                                     placement=placement)
  ckpt = os.path.join(out, CHECKPOINT)

  if checkpoint is not None:
    state = dict(checkpoint.state)
    lora, opt_state = from_files(s, restore(checkpoint, *to_files(s, lora, opt_state)))
    if placement is not None:
      lora, opt_state = jax.device_put(lora, placement.lora), jax.device_put(opt_state, placement.opt_state)
    say(f"resuming {ckpt} at step {state['step']}")
  else:
    if os.path.isdir(ckpt):
      say(f"note: starting over in {out} (--resume would continue its checkpoint)")
    t = time.perf_counter()
    state = {"step": 0, "history": [], "train_seconds": 0.0, "train_tokens": 0,
             "eval_before": evaluate(eval_sums, params, lora, tasks, s.batch_size, placement)}
    t_eval = time.perf_counter()
    state["samples_before"] = sample(model, original, tokenizer, s)
    say(f"held-out loss before: {losses_text(state['eval_before'])} ({t_eval - t:.0f}s with compilation; "
        f"sampling {time.perf_counter() - t_eval:.0f}s)")
  state["settings"] = settings.as_dict(s)
  if primary():
    os.makedirs(out, exist_ok=True)
    write_text_atomic(os.path.join(out, "settings.yaml"), yaml.safe_dump(state["settings"], sort_keys=False))

  lora, opt_state, state = train_loop(s, tasks, params, lora, opt_state, state, train_step, key_dropout, ckpt,
                                      placement)
  adapters = lambda: [gathered(unstack_layers(one)) for one in  # per adapter, per layer, as NumPy
                      (lorax_jax.unstack_adapters(params, lora, [one_cfg] * len(tasks)) if s.tasks else [lora])]
  if state["step"] < s.steps:
    say(f"stopped at step {state['step']} of {s.steps}: --resume goes on")
    return {**state, "lora": by_task(tasks, adapters())}

  t = time.perf_counter()
  eval_after = evaluate(eval_sums, params, lora, tasks, s.batch_size, placement)
  trained = adapters()
  samples_after = by_task(tasks, [sample(model, base, tokenizer, s, one, cfg) for one in trained])
  say(f"evaluated and sampled in {time.perf_counter() - t:.0f}s")
  for task, one in zip(tasks, trained):
    directory = os.path.join(out, ADAPTERS, task.name) if task.name else os.path.join(out, ADAPTER)
    save_trained_adapter(directory, one, cfg, original, initial, base_model_name)
  text = samples_text(s.sample_prompts, state["samples_before"], samples_after)
  metrics = {"eval_before": state["eval_before"], "eval_after": eval_after, "steps": s.steps,
             "train_seconds": state["train_seconds"],
             "tokens_per_second": state["train_tokens"] / max(state["train_seconds"], 1e-9),
             "samples_before": state["samples_before"], "samples_after": samples_after}
  if primary():
    plot_losses(os.path.join(out, "loss.png"), state["history"], [(0, state["eval_before"]), (s.steps, eval_after)])
    write_text_atomic(os.path.join(out, "samples.txt"), text)
    write_text_atomic(os.path.join(out, "metrics.json"), json.dumps(metrics, indent=2))
  written = ", ".join(f"{ADAPTERS}/{t.name}/" for t in tasks) if s.tasks else f"{ADAPTER}/"
  say(f"\n{text}\nheld-out loss: {losses_text(state['eval_before'])} before, {losses_text(eval_after)} after "
      f"({metrics['tokens_per_second']:.0f} tokens/s)\nwrote {s.out_dir}/: {written}, loss.png, "
      "samples.txt, metrics.json, settings.yaml, checkpoint/")
  return {**metrics, "lora": by_task(tasks, trained)}


def losses_text(losses: float | dict[str, float]) -> str:
  """``3.1234``, or ``art 3.1234, food 3.4567`` with tasks."""
  return ", ".join(f"{k} {v:.4f}" for k, v in losses.items()) if isinstance(losses, dict) else f"{losses:.4f}"


def to_files(s: Settings, *trees: Any) -> tuple[Any, ...]:
  """The factors and optimizer state as the checkpoint holds them: per layer (``layers_0 …``,
  `unstack_layers`) for one adapter, whether or not the layers train scanned, so both read the same
  files; with tasks the stacked tree as it trains (its leading axis is the adapters'). `from_files`
  is the inverse."""
  return trees if s.tasks else tuple(unstack_layers(t) for t in trees)


def from_files(s: Settings, trees: tuple[Any, ...]) -> tuple[Any, ...]:
  """`to_files`' trees back in the training layout."""
  return tuple(stack_layers(t) for t in trees) if s.scan_layers and not s.tasks else trees


def train_loop(s: Settings, tasks: Sequence[Task], params: Any, lora: Any, opt_state: Any,
               state: dict[str, Any], train_step: Callable[..., Any], key_dropout: jax.Array,
               ckpt: str, placement: Placement | None = None) -> tuple[Any, Any, dict[str, Any]]:
  """Steps ``state["step"] .. stop``, a checkpoint every ``save_every`` steps and at the end.

  Batch ``k`` is `step_batch` ``(seed, k)`` (every process computes the whole batch and
  `put_batch` keeps its devices' rows) and its dropout key ``fold_in(key_dropout, k)``.
  Tokens per second count the non-padding tokens read, after the first (compiling) step.
  """
  from tqdm import tqdm

  stop = s.stop_at or s.steps
  state = dict(state)
  ids = task_ids(tasks, s.batch_size)
  bar = tqdm(range(state["step"], stop), initial=state["step"], total=s.steps, desc="train",
             dynamic_ncols=True, file=sys.stdout, disable=not primary())
  last, start = None, time.perf_counter()
  for step in bar:
    batch = step_batch(s, tasks, step)
    lora, opt_state, losses = train_step(lora, opt_state, params, *put_batch(placement, batch.tokens, batch.weights),
                                         jax.random.fold_in(key_dropout, step), **with_ids(ids))
    losses = np.atleast_1d(np.asarray(losses, np.float64))
    now = time.perf_counter()
    if last is not None:  # the first step of a process includes compilation
      state["train_seconds"] += now - last
      state["train_tokens"] += int(np.sum(batch.lengths - 1))
    else:
      bar.write(f"first step (with compilation): {now - start:.0f}s")
    last = now
    state["step"] = step + 1
    state["history"].append((step + 1, by_task(tasks, losses.tolist())))
    bar.set_postfix(loss=f"{losses.mean():.3f}", tok_s=f"{state['train_tokens'] / max(state['train_seconds'], 1e-9):.0f}")
    if state["step"] % s.save_every == 0 or state["step"] == stop:
      save_checkpoint(ckpt, *to_files(s, lora, opt_state), state)
  bar.close()
  return lora, opt_state, state


def main(argv: Sequence[str] | None = None) -> None:
  """``lorax-jax finetune``: settings, then the processes (`start_processes`), then the checkpoint
  (with ``--resume``), then the model, then the run."""
  s, args = settings.parse(Settings, "finetune", argv, __doc__.split("\n")[0], _flags)
  start_processes(args.coordinator, args.num_processes, args.process_id)
  checkpoint = resume_point(s) if args.resume else None
  t = time.perf_counter()
  model, params, tokenizer = load_model(s.model, s.dtype, s.quantize)
  say(f"loaded {s.model} in {time.perf_counter() - t:.0f}s")
  run(s, model, params, tokenizer, checkpoint=checkpoint,
      base_model_name=SMOLLM2_NAME if s.model == "smollm2" else s.model)
