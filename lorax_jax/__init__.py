"""lorax_jax: LoRA for any JAX/Flax model, as a pure function transform.

    cfg   = lorax_jax.LoraConfig(r=8, alpha=16, dropout=0.05, target_value=True)
    lora  = lorax_jax.init_lora(params, cfg, jax.random.key(0))
    apply = lorax_jax.lora_transform(model.apply, params, cfg)
    logits = apply(params, lora, batch, rng=key)   # differentiate w.r.t. `lora` only
"""

from lorax_jax.adapters import stack_adapters, swap_adapter, take_adapter, unstack_adapters
from lorax_jax.combine import combine
from lorax_jax.config import LoraConfig
from lorax_jax.lora_tree import check_lora
from lorax_jax.init import init_lora, init_lora_and_base, on_original_base
from lorax_jax.io import load_adapter, load_kohya, save_adapter
from lorax_jax.merge import delta, merge, unmerge
from lorax_jax.optim import loraplus, per_adapter
from lorax_jax.params import (count, filter_params, join_params, lora_count, size, split_params, summary,
                              trainable_mask)
from lorax_jax.pathmap import PathMap
from lorax_jax.qarray import QArray, dequantize, is_quantized, quantize
from lorax_jax.sharding import lora_shardings, shard_params
from lorax_jax.targets import Target, find_targets
from lorax_jax.transform import axes_from_use, find_linear, lora_transform

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "PathMap", "QArray", "Target", "axes_from_use", "check_lora", "combine", "count", "delta",
    "dequantize", "filter_params", "find_linear", "find_targets", "init_lora", "init_lora_and_base", "is_quantized", "join_params",
    "load_adapter", "load_kohya", "lora_count", "lora_shardings", "lora_transform", "loraplus", "merge",
    "on_original_base", "per_adapter", "save_adapter", "shard_params", "size", "split_params", "stack_adapters",
    "summary", "swap_adapter", "take_adapter", "trainable_mask", "unmerge", "unstack_adapters",
]
