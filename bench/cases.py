"""The benchmark cases: which model, batch, LoRA config and variants each one measures."""

from __future__ import annotations

import dataclasses

import jax

import lorax_jax
from bench.models import Gpt, GptConfig, nnx_gpt, smollm2
from bench.variants import INFER, TRAIN, Setup, nonzero_lora

SWEEP = ("lower_bound", "factored", "factored_dropout", "nnx_lora", "qwix_lora", "qwix_lora_dropout")


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  model: str  # "gpt" or "smollm2"
  d: int = 512
  layers: int = 6
  r: int = 8
  batch: int = 2
  seq: int = 128
  variants: tuple[str, ...] = TRAIN + INFER
  note: str = ""


def cases(quick: bool) -> list[Case]:
  if quick:
    return [Case("gpt-d256-l2-r8", "gpt", d=256, layers=2, batch=2, seq=64)]
  main = [Case("gpt-d512-r8", "gpt")]
  ranks = [Case(f"gpt-d512-r{r}", "gpt", r=r, variants=SWEEP) for r in (1, 4, 16, 64)]
  widths = [Case(f"gpt-d{d}-r8", "gpt", d=d, variants=SWEEP) for d in (256, 1024)]
  smol = [Case("smollm2-135m-qv-r8", "smollm2", r=8, batch=1, seq=256,
               variants=("lower_bound", "factored", "factored_dropout", "qwix_lora", "qwix_lora_dropout", "full",
                         "base_fwd", "factored_fwd", "merged_fwd"))]
  return main + ranks + widths + smol


def setup(case: Case) -> tuple[Setup, str]:
  """The model, weights (random, seeded), LoRA factors (``b`` non-zero) and batch of ``case``."""
  k_param, k_lora, k_b, k_ids = jax.random.split(jax.random.key(0), 4)
  if case.model == "gpt":
    c = GptConfig(d=case.d, layers=case.layers, heads=max(1, case.d // 64), seq=case.seq)
    model, params, vocab = Gpt(c), None, c.vocab
    cfg = lorax_jax.LoraConfig(r=case.r, alpha=2 * case.r, targets="all-linear")
    source = f"random weights, vocab {c.vocab}, {c.heads} heads"
  elif case.model == "smollm2":
    model, params, vocab, source = _smollm2()
    cfg = lorax_jax.LoraConfig(r=case.r, alpha=2 * case.r, target_key=False)
  else:
    raise ValueError(f"unknown model {case.model!r}")
  ids = jax.random.randint(k_ids, (case.batch, case.seq), 0, vocab)
  if params is None:
    params = jax.jit(model.init)(k_param, ids)
  lora = nonzero_lora(lorax_jax.init_lora(params, cfg, k_lora), k_b)
  twin = None
  if case.model == "gpt":
    scales = {"/".join(t.path[1:-1]): t.scale for t in lorax_jax.find_targets(params, cfg).values()}
    twin = lambda: nnx_gpt(c, params, lora, scales)
  return Setup(model, params, cfg, lora, ids, twin), source


def _smollm2():
  """SmolLM2-135M-Instruct (`bench.models.smollm2`): ``(model, params, vocab, description)``."""
  config, model, params, source = smollm2()
  return model, params, config.vocab_size, source
