"""Fine-tune an LLM with LoRA, written against lorax_jax's public API only.

    python examples/finetune_llm.py                      # SmolLM2-135M-Instruct on Debian's fortunes
    python examples/finetune_llm.py --model DIR --topic science --steps 100 --out runs/science

The model answers "Tell me a fortune." with a fortune from one topic file of Debian's ``fortunes``
(``apt-get install fortunes``); only the answer's tokens are trained. The script prints the
held-out loss before and after, saves a PEFT adapter (``OUT/adapter``: ``PeftModel.from_pretrained``
loads it onto ``HuggingFaceTB/SmolLM2-135M-Instruct``) and generates with it. `lorax-jax finetune`
is the full application (configs, checkpoints, resuming, the work-saving options); this is the
same recipe in a page.
"""

from __future__ import annotations

import argparse
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax_jax
from lorax_jax.models.generate import generate
from lorax_jax.models.gguf import load_smollm2
from lorax_jax.models.llama import LLAMA_PATH_MAP, load_llama
from lorax_jax.models.tokenizer import load_tokenizer

PROMPT = "Tell me a fortune."


def load(model: str):
  """``(model, params, tokenizer)``: SmolLM2 from its package, or a Hugging Face Llama directory."""
  if model == "smollm2":
    _, module, params, tokenizer = load_smollm2()
  else:
    _, module, params = load_llama(model)
    tokenizer = load_tokenizer(model)
  return module, params, tokenizer


def fortunes(topic: str, directory: str = "/usr/share/games/fortunes") -> list[str]:
  """The items of one fortunes file (separated by lines holding only ``%``)."""
  with open(os.path.join(directory, topic), encoding="utf-8", errors="replace") as f:
    return [" ".join(item.split()) for item in re.split(r"^%\s*$", f.read(), flags=re.M) if item.strip()]


def examples(items: list[str], tokenizer, seq: int) -> tuple[np.ndarray, np.ndarray]:
  """``(tokens [N, seq + 1], weights [N, seq + 1])``: the chat "user: PROMPT / assistant: item",
  right-padded; the weight is 1 on the answer's tokens (each predicted from the one before)."""
  prefix = tokenizer.chat(PROMPT)
  tokens, weights = [], []
  for item in items:
    ids = tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": item}], add_generation_prompt=False))
    if len(ids) <= seq + 1:
      pad = seq + 1 - len(ids)
      tokens.append(ids + [tokenizer.pad_id or 0] * pad)
      weights.append([0.0] * len(prefix) + [1.0] * (len(ids) - len(prefix)) + [0.0] * pad)
  if not tokens:
    raise ValueError(f"no example fits {seq} tokens: raise --seq")
  return np.array(tokens, np.int32), np.array(weights, np.float32)


def main(argv: list[str] | None = None) -> dict[str, float]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="smollm2", help="smollm2, or a Hugging Face Llama checkpoint directory")
  p.add_argument("--topic", default="science", help="a file of /usr/share/games/fortunes")
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=64)
  p.add_argument("--lr", type=float, default=2e-3)
  p.add_argument("--r", type=int, default=8)
  p.add_argument("--out", default=os.path.join("runs", "example"), help="a new folder for the adapter")
  args = p.parse_args(argv)

  model, params, tokenizer = load(args.model)
  tokens, weights = examples(fortunes(args.topic), tokenizer, args.seq)
  order = np.random.default_rng(0).permutation(len(tokens))
  held_out, train = order[:args.batch], order[args.batch:]
  print(f"{len(train)} training and {len(held_out)} held-out fortunes from {args.topic!r}")

  # LoRA on every attention and MLP projection; dropout on the factors' input while training.
  cfg = lorax_jax.LoraConfig(r=args.r, alpha=2 * args.r, dropout=0.05,
                             targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
  lora = lorax_jax.init_lora(params, cfg, jax.random.key(0))
  train_apply = lorax_jax.lora_transform(model.apply, params, cfg)
  eval_apply = lorax_jax.lora_transform(model.apply, params, cfg.replace(dropout=0.0))
  print(lorax_jax.summary(params, cfg).splitlines()[-1])

  def loss_fn(lora, params, tokens, weights, rng, apply=train_apply):
    """Mean cross-entropy of the weighted next tokens."""
    logits = apply(params, lora, tokens[:, :-1], rng=rng).astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return (nll * weights[:, 1:]).sum() / weights[:, 1:].sum()

  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(args.lr, weight_decay=0.01))
  opt_state = optimizer.init(lora)

  @jax.jit  # params is an argument: the frozen weights are not baked into the program
  def step(lora, opt_state, params, tokens, weights, rng):
    loss, grads = jax.value_and_grad(loss_fn)(lora, params, tokens, weights, rng)  # w.r.t. lora only
    updates, opt_state = optimizer.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss

  evaluate = jax.jit(lambda lora: loss_fn(lora, params, tokens[held_out], weights[held_out], None, eval_apply))
  before = float(evaluate(lora))
  rng = jax.random.key(1)
  for i in range(args.steps):
    rows = train[np.random.default_rng(i).choice(len(train), args.batch, replace=False)]
    lora, opt_state, loss = step(lora, opt_state, params, tokens[rows], weights[rows], jax.random.fold_in(rng, i))
    if i % 10 == 0 or i == args.steps - 1:
      print(f"step {i:4d}  train loss {float(loss):.4f}")
  after = float(evaluate(lora))
  print(f"held-out loss {before:.4f} -> {after:.4f}")

  # A PEFT adapter on disk (the folder must be new or an earlier adapter), loaded back, used to generate.
  adapter = os.path.join(args.out, "adapter")
  lorax_jax.save_adapter(adapter, lora, cfg, params, LLAMA_PATH_MAP)
  loaded, loaded_cfg = lorax_jax.load_adapter(adapter, params, LLAMA_PATH_MAP)
  stop = [t for t in {tokenizer.eos_id, tokenizer.backend.token_to_id("<|im_end|>")} if t is not None]
  (answer,) = generate(model, params, [tokenizer.chat(PROMPT)], max_new_tokens=40, stop_tokens=stop,
                       lora=loaded, cfg=loaded_cfg)
  print(f"saved {adapter}\n{PROMPT} {tokenizer.decode(answer)}")
  return {"before": before, "after": after}


if __name__ == "__main__":
  main()
