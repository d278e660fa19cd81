"""The frozen SmolLM2's own cost against torch's, per piece: ``python -m bench.frozen``.

Single-thread process CPU time (``time.process_time``, XLA with one intra-op thread, torch
with ``torch.set_num_threads(1)``), minimum of ``--reps`` calls after a warm-up: a proxy for the
cost of the work, far less sensitive to other jobs on the machine than wall time. Run it as
``XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" python -m bench.frozen``
(the script sets that flag itself when XLA_FLAGS is unset). Pieces at the main job's shape
(batch 8 x 64 tokens, SmolLM2-135M in float32): the whole forward, attention written out
(einsum + masked softmax, as `lorax_jax.models.llama.Attention`) against
``jax.nn.dot_product_attention`` and torch's ``scaled_dot_product_attention``, RoPE, RMSNorm, the
LM head, one 512 x 576 x 1536 matmul.
"""

from __future__ import annotations

import argparse
import os

if "XLA_FLAGS" not in os.environ:
  os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench.models import SMOLLM2_CONFIG
from lorax_jax.models.llama import Llama, RMSNorm, rope

B, L = 8, 64


def cpu_seconds(fn: Callable[[], Any], reps: int) -> float:
  """Minimum process CPU seconds of ``fn()`` over ``reps`` calls, after one warm-up call."""
  fn()
  best = float("inf")
  for _ in range(reps):
    t = time.process_time()
    fn()
    best = min(best, time.process_time() - t)
  return best


def jax_pieces() -> dict[str, Callable[[], Any]]:
  """The JAX pieces, jitted, each a thunk that blocks until its result is ready."""
  c = SMOLLM2_CONFIG
  model = Llama(c)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, c.vocab_size, (B, L)), jnp.int32)
  k = jax.random.split(jax.random.key(1), 4)
  q = jax.random.normal(k[0], (B, L, c.num_attention_heads, c.head_dim))
  kv = jax.random.normal(k[1], (B, L, c.num_key_value_heads, c.head_dim))
  x = jax.random.normal(k[2], (B, L, c.hidden_size))
  w = jax.random.normal(k[3], (c.hidden_size, c.intermediate_size))
  pos = jnp.broadcast_to(jnp.arange(L), (B, L))
  groups = c.num_attention_heads // c.num_key_value_heads

  def einsum_attention(q, k, v):
    qg = q.reshape(B, L, c.num_key_value_heads, groups, c.head_dim)
    s = jnp.einsum("blhgd,bshd->bhgls", qg, k) / np.sqrt(c.head_dim)
    s = jnp.where(jnp.tril(jnp.ones((L, L), bool)), s, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhgls,bshd->blhgd", jax.nn.softmax(s, axis=-1), v).reshape(B, L, -1)

  def sdpa(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(B, L, -1)

  norm = RMSNorm(c.rms_norm_eps)
  norm_params = norm.init(jax.random.key(0), x)
  embedding = params["params"]["model"]["embed_tokens"]["embedding"]
  run = lambda f, *a: (lambda: jax.block_until_ready(f(*a)))
  return {
      "forward": run(jax.jit(model.apply), params, tokens),
      "attention einsum+softmax": run(jax.jit(einsum_attention), q, kv, kv),
      "attention dot_product_attention": run(jax.jit(sdpa), q, kv, kv),
      "rope (q)": run(jax.jit(lambda q: rope(q, pos, c.rope_theta)), q),
      "rmsnorm": run(jax.jit(norm.apply), norm_params, x),
      "lm head": run(jax.jit(lambda x, e: x @ e.T), x, embedding),
      "matmul 512x576x1536": run(jax.jit(lambda x, w: x.reshape(-1, c.hidden_size) @ w), x, w),
  }


def torch_pieces() -> dict[str, Callable[[], Any]]:
  """The same pieces in torch (transformers' ``LlamaForCausalLM`` for the forward), no grad."""
  import torch
  import transformers

  torch.set_num_threads(1)
  c = SMOLLM2_CONFIG
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**c.to_hf())).eval()
  g = torch.Generator().manual_seed(0)
  tokens = torch.randint(0, c.vocab_size, (B, L), generator=g)
  q = torch.randn(B, c.num_attention_heads, L, c.head_dim, generator=g)
  kv = torch.randn(B, c.num_key_value_heads, L, c.head_dim, generator=g)
  x = torch.randn(B, L, c.hidden_size, generator=g)
  w = torch.randn(c.hidden_size, c.intermediate_size, generator=g)
  norm = model.model.norm
  emb = model.model.embed_tokens.weight
  sdpa = torch.nn.functional.scaled_dot_product_attention

  def no_grad(f, *a):
    def thunk():
      with torch.no_grad():
        return f(*a)
    return thunk

  return {
      "forward": no_grad(lambda t: model(input_ids=t).logits, tokens),
      "attention dot_product_attention": no_grad(lambda q, k: sdpa(q, k, k, is_causal=True, enable_gqa=True), q, kv),
      "rmsnorm": no_grad(norm, x),
      "lm head": no_grad(lambda x: x @ emb.T, x),
      "matmul 512x576x1536": no_grad(lambda x: x.reshape(-1, c.hidden_size) @ w, x),
  }


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--no-torch", action="store_true")
  args = p.parse_args(argv)
  rows = {name: {"jax": cpu_seconds(f, args.reps)} for name, f in jax_pieces().items()}
  if not args.no_torch:
    for name, f in torch_pieces().items():
      rows.setdefault(name, {})["torch"] = cpu_seconds(f, args.reps)
  print("| piece (batch 8 x 64, single thread) | JAX CPU ms | torch CPU ms | JAX / torch |")
  print("|---|---:|---:|---:|")
  for name, r in rows.items():
    j, t = r.get("jax"), r.get("torch")
    ratio = f"{j / t:.2f}" if j and t else ""
    print(f"| {name} | {j * 1e3:.1f} | {'' if t is None else f'{t * 1e3:.1f}'} | {ratio} |")
  return rows


if __name__ == "__main__":
  main()
