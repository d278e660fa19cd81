"""The applications behind the ``lorax-jax`` command (`lorax_jax.cli`): the settings layer, the
fine-tuning main job and its data. They use the library; the library never imports them."""
