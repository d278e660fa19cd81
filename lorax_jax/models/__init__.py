"""Reference Flax models (Llama, BERT) that load Hugging Face checkpoints, with their path maps.

They import the core; the core never imports them.
"""
