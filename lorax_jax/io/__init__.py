"""Adapters on disk: PEFT (`save_adapter`, `load_adapter`) and Kohya (`load_kohya`) files."""

from lorax_jax.io.kohya import load_kohya
from lorax_jax.io.peft import load_adapter, save_adapter

__all__ = ["load_adapter", "load_kohya", "save_adapter"]
