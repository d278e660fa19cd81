"""PEFT LoRA adapters on disk: ``adapter_config.json`` + ``adapter_model.safetensors``.

The files are the ones PEFT's ``save_pretrained`` writes and ``PeftModel.from_pretrained``
reads. Each adapted module ``<m>`` (named as in `lorax_jax.io.modules`) holds

    base_model.model.<m>.lora_A.weight   [r, in]          (conv: [r, cin, kh, kw])
    base_model.model.<m>.lora_B.weight   [out, r]         (conv: [cout, r, 1, 1])
    base_model.model.<m>.lora_embedding_A  [r, vocab]     (embeddings)
    base_model.model.<m>.lora_embedding_B  [d, r]
    base_model.model.<m>.lora_magnitude_vector  [out]  (DoRA, ``use_dora``; conv: [1, cout, 1, 1])

and PEFT's update ``W_torch + s · B @ A`` with ``s = lora_alpha / r`` (``/ sqrt(r)`` with
``use_rslora``), ``r`` and ``lora_alpha`` overridden per module by ``rank_pattern`` /
``alpha_pattern``. That is lorax_jax's ``W + s · aᵀ b`` (layouts in `lorax_jax.io.factors`).
Beside an adapted embedding PEFT may also save the whole base table
(``<m>.base_layer.weight``); loading checks that it equals the table in ``params``.

An adapter directory is one unit: `save_adapter` replaces it whole and atomically
(`lorax_jax.files.write_dir_atomic`), `load_adapter` reads both files through one handle on
the directory, so it sees one complete version even while other processes save. A save refuses
a directory holding anything but those two files (`lorax_jax.files.check_destination`: PEFT's
``README.md`` too, which lorax_jax did not write); a load reads only regular files, the config
at most `MAX_CONFIG_BYTES`.

``modules_to_save`` copies (`lorax_jax.io.saved`) are saved under their own tensor names, and a
stacked kernel's layers as one module each (`lorax_jax.io.stacked`).

Stacked MoE experts and MoE routers (path-map kinds ``"experts"``, ``"router"``) are PEFT's
``target_parameters``: listed there by their full names, their factors (`lorax_jax.io.factors`)
under the owning module's name, nested as PEFT nests its ``ParamWrapper``\\ s
(`lorax_jax.io.modules.wrapper_names`); PEFT refuses dropout, DoRA and ``lora_bias`` on them, and
so does `save_adapter`.

A PEFT adapter of an embedding that the model ties to its output head
(``tie_word_embeddings``) adapts the token lookup only; `load_adapter` limits such a target
to that use (``target_uses``) and `save_adapter` refuses one adapted at all uses.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from lorax_jax import pathmap
from lorax_jax.config import BASE_CHANGING_INITS, LoraConfig
from lorax_jax.files import MAX_CONFIG_BYTES, open_regular, read_limited, text_writer, write_dir_atomic
from lorax_jax.init import init_lora_and_base, on_original_base
from lorax_jax.io.factors import (check_shape, factors_from_torch, factors_to_torch, lora_bias_shape, magnitude_shape,
                                  torch_shapes)
from lorax_jax.io.modules import (PARAMETER_KINDS, Module, align_names, by_name, by_target, exact_config, exact_regex,
                                  layout_hint, modules, parts_by_module, wrapper_names)
from lorax_jax.io.peft_config import lookup, matches, read_config, warn_unmatched
from lorax_jax.io.saved import PREFIX, saved_keys, saved_tensors, saved_tree, token_keys, token_tensors
from lorax_jax.io.stacked import fill_layers, module_factors, module_target, stacked_fields
from lorax_jax.io.tensors import FLOAT_DTYPES, TensorInfo, pickle_refusal, read_header, read_tensors, safetensors_writer
from lorax_jax.lora_tree import SAVED_KEY, TOKENS_KEY, Lora, check_saved, target_factors
from lorax_jax.pathmap import PathMap
from lorax_jax.paths import Path, get_path, path_str, set_path
from lorax_jax.qarray import leaves_with_paths
from lorax_jax.sharding import host_arrays, lora_shardings, on_process_zero, place_host_arrays
from lorax_jax.targets import Target, find_targets

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_NAMES = ("adapter_model.bin", "adapter_model.pt")
LOOKUP_ONLY = ("lookup",)
READ_ATTEMPTS = 20
_BASE_COPY = re.compile(r"base_model\.model\.(?P<module>.+)\.base_layer\.weight")
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.(?P<part>lora_[AB]\.weight|lora_B\.bias|lora_embedding_[AB]"
                  r"|lora_magnitude_vector)")
MAGNITUDE = "lora_magnitude_vector"


def save_adapter(directory: str, lora: Lora, cfg: LoraConfig, params: Any,
                 path_map: PathMap | None = None, base_model_name_or_path: str | None = None,
                 task_type: str | None = None, initial: Lora | None = None) -> None:
  """Write ``lora`` as a PEFT adapter: ``directory`` becomes exactly its two files.

  Factors keep their dtype. ``target_modules`` lists every adapted module by its full name,
  and ``rank_pattern`` / ``alpha_pattern`` hold every per-target rank and alpha that differs
  from ``cfg.r`` / ``cfg.alpha`` (keys are escaped full names), so PEFT and `load_adapter`
  rebuild exactly the same targets. ``task_type`` (``"CAUSAL_LM"``, ...) picks the
  ``PeftModel`` class PEFT loads it into. ``modules_to_save`` copies in ``lora`` are written as
  PEFT writes them; a kernel of a stacked path-map rule is written as one module per adapted layer
  (``layers_to_transform``), so the file names only those layers.

  The save is atomic for the pair: both files are written and fsynced in a fresh sibling
  directory that then takes ``directory``'s place in one step, so a crash, a signal, a
  concurrent save or a concurrent `load_adapter` sees the old adapter or the new one, never
  a mix. Files get ``open``'s permissions under the umask.

  ``init_lora_weights`` is ``cfg.init`` in PEFT's spelling (``true`` for ``"kaiming"``). A PiSSA
  or OLoRA adapter applies to the residual base: saved as it is, PEFT re-derives that base from
  the original one when it loads it (as `load_adapter` does). With ``initial`` (the factors
  `init_lora_and_base` returned, ``params`` the *original* base) it is saved converted instead,
  as PEFT's ``path_initial_model_for_weight_conversion`` does: a plain LoRA of rank ``2r`` on
  the original base (`lorax_jax.init.on_original_base`), ``init_lora_weights: true``.

  Sharded trees are saved as they are: each factor is gathered to the host once
  (`lorax_jax.sharding.host_arrays`), so the file holds the bytes an unsharded save writes. Under
  ``jax.distributed`` every process calls ``save_adapter`` with the same arguments (the gather is
  collective); process 0 alone writes ``directory`` (on a file system the others see, to read it
  back) and every process returns once it is written (`lorax_jax.sharding.on_process_zero`).

  Args:
    directory: the adapter directory, created or replaced whole.
    lora: the LoRA tree (with ``modules_to_save`` copies if ``cfg`` has any).
    cfg: its config.
    params: the params tree ``lora`` is for (the original base with ``initial``).
    path_map: the model's `PathMap`, so that modules get PEFT's names; None: Flax paths joined
      with ``.`` (an adapter for lorax_jax itself).
    base_model_name_or_path: written to the config, for PEFT's ``from_pretrained``.
    task_type: PEFT's ``task_type``, e.g. ``"CAUSAL_LM"``.
    initial: the factors `init_lora_and_base` returned, to save a PiSSA/OLoRA adapter
      converted for the original base.

  Raises:
    RuntimeError: under ``jax.distributed``, in processes other than 0, when process 0 failed
      to write (process 0 raises its own error).
    ValueError: a target without a module name; a ``directory`` that
      `lorax_jax.files.check_destination` refuses (``""``, the working or home directory, a
      directory holding anything but an adapter's two files: it is replaced whole); a
      ``"pissa_niter_K"`` adapter without ``initial``; an embedding the params tie to the output head,
      adapted at every use (PEFT adapts only its lookup: set ``target_uses``), or a
      ``modules_to_save`` copy of such an embedding.

  >>> import os, tempfile, jax, jax.numpy as jnp, lorax_jax
  >>> params = {"dense": {"kernel": jnp.zeros((4, 3))}}
  >>> cfg = lorax_jax.LoraConfig(r=2, targets=["dense"])
  >>> directory = os.path.join(tempfile.mkdtemp(), "adapter")
  >>> lorax_jax.save_adapter(directory, lorax_jax.init_lora(params, cfg, jax.random.key(0)), cfg, params)
  >>> sorted(os.listdir(directory))
  ['adapter_config.json', 'adapter_model.safetensors']
  """
  lora, initial = host_arrays((lora, initial))  # sharded: each factor gathered once
  if initial is not None:
    lora, cfg = on_original_base(params, lora, initial, cfg)
  elif cfg.changes_base and cfg.init not in BASE_CHANGING_INITS:
    raise ValueError(f"save_adapter: init={cfg.init!r} draws a random sketch that no loader can re-derive, so "
                     "the adapter must be saved converted for the original base: pass initial=<the factors "
                     "init_lora_and_base returned>")
  targets = find_targets(params, cfg)
  mods = by_target(modules(params, path_map), targets)  # a stacked kernel: one module per adapted layer
  names = {path: ms[0] for path, ms in mods.items()}
  _check_tied(targets, names, cfg, _ties(params, path_map))
  tensors, saved_modules = saved_tensors(lora, cfg, params, path_map, [m.name for ms in mods.values() for m in ms])
  _check_tied_saved(saved_modules or [], _ties(params, path_map), directory)
  token_values, token_indices = token_tensors(lora, cfg, params, path_map)
  tensors |= token_values
  check_parameter_options(targets, mods, cfg, "save_adapter")
  parameters = [m for ms in mods.values() for m in ms if m.kind in PARAMETER_KINDS]
  wrapped = wrapper_names(parameters, path_map) if parameters else {}
  for t, a, b in target_factors(targets, lora):
    for m in mods[t.path]:
      t_m, a_m, b_m = module_factors(t, a, b, m)
      key_a, key_b = _keys(m, wrapped.get(m.name))
      tensors[key_a], tensors[key_b] = factors_to_torch(a_m, b_m, t_m, m.kind)
      if t.dora:
        mag = np.asarray(get_path(lora, t.path)["m"])
        tensors[_magnitude_key(key_a)] = (mag if m.layer is None else mag[m.layer]).reshape(
            magnitude_shape(t_m, m.kind))
      if t.lora_bias:
        _check_bias_module(m, "save")
        tensors[_bias_key(key_b)] = np.asarray(get_path(lora, t.path)["bias"]).reshape(lora_bias_shape(t_m, m.kind))
  config = {
      "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
      "r": cfg.r, "lora_alpha": _number(cfg.alpha), "lora_dropout": cfg.dropout,
      "use_rslora": cfg.use_rslora,
      "target_modules": sorted(m.name for ms in mods.values() for m in ms if m.kind not in PARAMETER_KINDS),
      "target_parameters": sorted(wrapped) or None,
      "rank_pattern": {re.escape(m.name): t.rank for t in targets.values() if t.rank != cfg.r for m in mods[t.path]},
      "alpha_pattern": {re.escape(m.name): _number(t.alpha)
                        for t in targets.values() if t.alpha != cfg.alpha for m in mods[t.path]},
      "bias": cfg.bias, "lora_bias": cfg.lora_bias,
      "fan_in_fan_out": any(m.kind == "conv1d" for ms in mods.values() for m in ms),  # GPT-2's Conv1D [in, out]
      "use_dora": cfg.use_dora, "modules_to_save": saved_modules, "trainable_token_indices": token_indices,
      "layers_to_transform": None, "layers_pattern": None, "layer_replication": None,
      "init_lora_weights": True if cfg.init == "kaiming" else cfg.init, "inference_mode": True, "revision": None,
  }
  files = {WEIGHTS_NAME: safetensors_writer(tensors), CONFIG_NAME: text_writer(json.dumps(config, indent=2))}
  on_process_zero(lambda: write_dir_atomic(directory, files), f"the adapter {directory}")


def check_parameter_options(targets: Mapping[Path, Target], mods: Mapping[Path, Sequence[Module]], cfg: LoraConfig,
                            who: str) -> None:
  """A ValueError naming the first target saved as a PEFT parameter (``target_parameters``: a router,
  experts) when ``cfg`` asks for dropout, DoRA or ``lora_bias``, which PEFT refuses there.
  ``mods``: `by_target`'s modules of each target. `lorax_jax.apps.finetune` calls it before training."""
  for t in targets.values():
    for m in mods[t.path]:
      if m.kind in PARAMETER_KINDS and (cfg.dropout or t.dora or t.lora_bias):
        raise ValueError(f"{who}: LoRA target {path_str(t.path)} is the parameter {m.name} (PEFT's "
                         "target_parameters), on which PEFT refuses lora_dropout, use_dora and lora_bias; train "
                         "it without them")


def load_adapter(directory: str, params: Any, path_map: PathMap | None = None,
                 param_dtype: Any = None, kernel_axes: Mapping[str, tuple[int, int]] | None = None,
                 shardings: Any = None) -> tuple[Lora, LoraConfig]:
  """A PEFT adapter directory as ``(lora, cfg)`` for ``params``.

  The safetensors keys say which modules are adapted; the config gives each its rank and
  alpha. The returned ``cfg`` targets exactly those paths (one regex of escaped paths) with
  per-target ``rank_pattern`` / ``alpha_pattern``, ``dropout = lora_dropout`` and
  ``use_rslora``; factors are cast to ``param_dtype`` (float32 by default). Pass the
  ``kernel_axes`` the adapter was trained with if it used any. An adapted embedding that
  ``path_map`` says the params tie to the output head gets ``target_uses`` ``("lookup",)``,
  as in PEFT. Tensors of the config's ``modules_to_save`` modules become the lora tree's
  ``"modules_to_save"`` copies (and ``cfg.modules_to_save``). Per-layer modules of a stacked
  path-map rule fill their slices of the stacked factors (zeros elsewhere; ``cfg`` gets
  ``layers_to_transform`` and, unless given, ``kernel_axes`` with the layers first).
  An adapter PEFT saved unconverted with ``init_lora_weights`` ``"pissa"`` or
  ``"olora"`` applies to a residual base, which PEFT re-derives from the base it loads it on;
  here the same initial factors ``A₀, B₀`` are re-derived from ``params`` (the original base)
  and the adapter is returned converted, a plain LoRA of rank ``2r`` on ``params`` itself
  (`lorax_jax.init.on_original_base`: ``W + s·(A⊗B - A₀⊗B₀)``, PEFT's model). Module names
  saved for the model without (or with) its task wrapper's prefix
  (a bare ``BertModel``'s ``encoder.…`` for ``bert.encoder.…``) are recognised.

  Each factor is placed straight onto its sharding from the file's host array, every device
  receiving only its slice (``jax.make_array_from_callback``; never a whole copy on one device):
  ``shardings`` when given, else the rule of `lorax_jax.lora_shardings` for ``params`` (sharded
  like each kernel if ``params`` are placed, the default device if not). Under
  ``jax.distributed`` every process reads the file and places its own devices' slices.

  Everything is checked before a tensor is read: the config's fields (types, ranges, safe
  patterns), and the safetensors header (each key once, a float dtype, the shape the target
  needs); the directory is read through one handle, so a concurrent save is seen whole or
  not at all.

  Args:
    directory: the adapter directory (the one holding ``adapter_config.json``; a named PEFT
      adapter is in a subfolder ``<directory>/<name>``).
    params: the params tree to load it for.
    path_map: the model's `PathMap` (PEFT's module names); None: Flax paths joined with ``.``.
    param_dtype: the factors' dtype (default float32).
    kernel_axes: the ``LoraConfig.kernel_axes`` the adapter was trained with, if any.
    shardings: where to place the factors: a tree of ``jax.sharding.Sharding``\\ s with the
      loaded tree's structure (`lorax_jax.lora_shardings`' result for these ``params``), or one
      ``Sharding`` for every factor; None: `lorax_jax.lora_shardings` of ``params``.

  Returns:
    ``(lora, cfg)``, ready for `lora_transform`, `merge` or training on.

  Raises:
    FileNotFoundError: no ``adapter_config.json`` (naming the subfolders that hold one) or
      ``adapter_model.safetensors``.
    ValueError: a pickled ``adapter_model.bin``; an unreadable file; a malformed config field,
      ``peft_type`` other than ``LORA``, an ``init_lora_weights`` whose base change cannot be
      re-derived (CorDA, LoftQ, ...) or an option lorax_jax cannot honour (each named); a
      missing, unexpected, non-float or mis-shaped key (each named); stacked kernels adapted
      at different layers, or at layers and outside them, or with different ranks per layer;
      a ``modules_to_save`` copy or LoRA factors of an output head that ``params`` tie to the
      embedding (no head leaf), or a ``modules_to_save`` copy of such an embedding; ``shardings``
      that do not fit the loaded tree or cannot hold a factor (each named).

  >>> import os, tempfile, jax, jax.numpy as jnp, lorax_jax
  >>> params = {"dense": {"kernel": jnp.zeros((4, 3))}}
  >>> cfg = lorax_jax.LoraConfig(r=2, targets=["dense"])
  >>> lora = lorax_jax.init_lora(params, cfg, jax.random.key(0))
  >>> directory = os.path.join(tempfile.mkdtemp(), "adapter")
  >>> lorax_jax.save_adapter(directory, lora, cfg, params)
  >>> back, back_cfg = lorax_jax.load_adapter(directory, params)
  >>> jax.tree.map(jnp.shape, back), back_cfg.r
  ({'dense': {'kernel': {'a': (2, 4), 'b': (2, 3)}}}, 2)
  >>> all(bool((x == y).all()) for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(lora)))
  True
  """
  for pickled in PICKLED_NAMES:
    if (os.path.isfile(os.path.join(directory, pickled))
        and not os.path.isfile(os.path.join(directory, WEIGHTS_NAME))):
      raise ValueError(pickle_refusal(os.path.join(directory, pickled)))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}: not a PEFT adapter directory")
  for _ in range(READ_ATTEMPTS):
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK)
    try:
      lora, cfg = _load(dir_fd, directory, params, path_map, param_dtype, kernel_axes)
      break
    except FileNotFoundError:
      if os.path.samestat(os.fstat(dir_fd), os.stat(directory)):
        raise
      # a concurrent save replaced the directory while it was read: read the new one
    finally:
      os.close(dir_fd)
  else:
    raise OSError(f"{directory} was replaced {READ_ATTEMPTS} times while being read; retry when no "
                  "process is saving to it")
  rule = lora_shardings(params, cfg) if shardings is None else shardings
  return place_host_arrays(lora, rule, f"load_adapter({directory!r})"), cfg


def _load(dir_fd: int, directory: str, params: Any, path_map: PathMap | None, param_dtype: Any,
          kernel_axes: Mapping[str, tuple[int, int]] | None) -> tuple[Lora, LoraConfig]:
  config_path, weights_path = (os.path.join(directory, n) for n in (CONFIG_NAME, WEIGHTS_NAME))
  try:
    config_file = _open(dir_fd, directory, CONFIG_NAME, ": not a PEFT adapter directory")
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e}{_subfolder_hint(directory)}") from None
  with config_file:
    config = read_config(read_limited(config_file, config_path, MAX_CONFIG_BYTES, "PEFT adapter config"),
                         config_path)
  with _open(dir_fd, directory, WEIGHTS_NAME) as weights_file:
    all_infos = read_header(weights_file, weights_path)
    saved, biases = saved_keys(all_infos, config, params, path_map, weights_path)  # modules_to_save, bias
    _check_tied_saved({k.removeprefix(PREFIX).rpartition(".")[0] for k in saved}, _ties(params, path_map),
                      weights_path)
    tokens = token_keys(all_infos, config, params, path_map, weights_path)
    infos = {k: v for k, v in all_infos.items() if k not in saved and k not in biases and k not in tokens}
    _check_tied_head(infos, config, _ties(params, path_map), path_map, weights_path)
    mods = modules(params, path_map)
    wrapped = _parameter_modules(config, mods, path_map, config_path)
    infos = _parameter_keys(infos, wrapped)
    pairs, copies, to_file = _pairs(infos, weights_path, mods)
    if not pairs:
      raise ValueError(f"{weights_path} holds no LoRA factors")
    selected = {to_file(m.name) for m in mods if _peft_targets(config, to_file(m.name))} | set(wrapped)
    if not selected and _checkable(config):
      raise ValueError(f"{config_path}: target_modules {config['target_modules']!r} (exclude_modules "
                       f"{config.get('exclude_modules')!r}) selects no module of these params; PEFT refuses "
                       "this adapter (NoMatchingPeftModuleError: target modules not found in the base model). "
                       "Load it onto the model it was trained for, or fix target_modules")
    missing = selected - {to_file(m.name) for m, _, _ in pairs}
    if missing:
      raise ValueError(f"{weights_path} is missing the factors of {', '.join(sorted(missing))} "
                       f"(target_modules {config['target_modules']!r} selects them)")
    # Patterns name modules in the file's layout.
    ranks, alphas = {}, {}
    for m, _, _ in pairs:
      r = lookup(config.get("rank_pattern"), to_file(m.name), config["r"])
      alpha = lookup(config.get("alpha_pattern"), to_file(m.name), config["lora_alpha"])
      if ranks.setdefault(m.path, r) != r or alphas.setdefault(m.path, alpha) != alpha:
        raise ValueError(f"{weights_path}: the layers of the stacked kernel {path_str(m.path)} differ in rank or "
                         "alpha; its factors hold one rank and alpha for every layer")
    warn_unmatched(config, [to_file(m.name) for m, _, _ in pairs], config_path)
    kernel_axes = {**{re.escape(path_str(m.path)): "sio" for m, _, _ in pairs if m.kind == "experts"},
                   **dict(kernel_axes or {})}  # experts [E, in, out]
    stacked = stacked_fields(pairs, {p: np.shape(x) for p, x in leaves_with_paths(params)},
                             kernel_axes, weights_path)
    ties = _ties(params, path_map)
    uses = {re.escape(path_str(m.path)): LOOKUP_ONLY for m, _, _ in pairs if m.name in ties}
    dtype = jnp.dtype(param_dtype or jnp.float32)
    cfg = exact_config(ranks, alphas, config["r"], config["lora_alpha"], param_dtype=dtype,
                       dropout=float(config.get("lora_dropout") or 0.0),
                       use_rslora=bool(config.get("use_rslora")), use_dora=bool(config.get("use_dora")),
                       bias=config.get("bias") or "none", lora_bias=bool(config.get("lora_bias")),
                       trainable_token_indices={exact_regex([p]): idx for p, idx in tokens.values()},
                       **{"kernel_axes": dict(kernel_axes or {}), **stacked},
                       **({"target_uses": uses} if uses else {}),
                       **({"modules_to_save": [exact_regex([p for p, _ in saved.values()])]} if saved else {}))
    targets = find_targets(params, cfg)
    for m, key_a, key_b in pairs:
      t_m = module_target(targets[m.path], m)
      want_a, want_b = torch_shapes(t_m, m.kind)
      check_shape(infos[key_a].shape, want_a, f"{weights_path}: {key_a}", t_m)
      check_shape(infos[key_b].shape, want_b, f"{weights_path}: {key_b}", t_m)
    mags = _check_magnitudes(infos, pairs, targets, cfg.use_dora, weights_path)
    lora_biases = _check_lora_biases(infos, pairs, targets, cfg.lora_bias, weights_path)
    _check_base_copies(weights_file, infos, copies, weights_path, params)
    tensors = read_tensors(weights_file, infos, [k for _, key_a, key_b in pairs for k in (key_a, key_b)]
                           + list(mags.values()) + list(lora_biases.values()))
    trained = {**saved, **biases}
    saved_values = read_tensors(weights_file, all_infos, list(trained) + list(tokens))
  lora: Lora = {SAVED_KEY: saved_tree(saved_values, trained, params)} if trained else {}
  for key, (path, _) in tokens.items():
    leaf = get_path(params, path)
    set_path(lora.setdefault(TOKENS_KEY, {}), path, jnp.asarray(saved_values[key].astype(np.dtype(leaf.dtype))))
  layers: dict[Path, list[tuple[Module, np.ndarray, np.ndarray]]] = {}
  for m, key_a, key_b in pairs:
    a, b = factors_from_torch(tensors[key_a], tensors[key_b], module_target(targets[m.path], m), m.kind)
    layers.setdefault(m.path, []).append((m, a, b))
  for path, parts in layers.items():  # a stacked kernel: its layers' factors, zeros elsewhere
    a, b = fill_layers(targets[path], parts, dtype) if parts[0][0].layer is not None else parts[0][1:]
    node = {"a": np.asarray(a, dtype), "b": np.asarray(b, dtype)}
    if path in mags:
      node["m"] = np.asarray(tensors[mags[path]].reshape(targets[path].m_shape), dtype)
    if path in lora_biases:
      node["bias"] = np.asarray(tensors[lora_biases[path]].reshape(targets[path].m_shape), dtype)
    set_path(lora, path, node)
  _check_trained(params, cfg, lora, weights_path)
  init = config.get("init_lora_weights", True)
  if init in BASE_CHANGING_INITS:
    initial = host_arrays(init_lora_and_base(params, cfg.replace(init=init), jax.random.key(0))[0])
    lora, cfg = on_original_base(params, lora, initial, cfg)
    return host_arrays(lora), cfg
  return lora, cfg


def _check_trained(params: Any, cfg: LoraConfig, lora: Lora, where: str) -> None:
  """The file holds exactly the leaves ``cfg`` trains in full (``modules_to_save``, ``bias``).

  Raises:
    ValueError: naming ``where`` and the leaves missing from it (a ``bias="all"`` adapter for a model
      with more biases than these params, say).
  """
  try:
    check_saved(params, cfg, lora)
  except ValueError as e:
    raise ValueError(f"{where}: {e} (the adapter's modules_to_save and bias={cfg.bias!r} train these "
                     "leaves of the params; load it onto the model it was trained for)") from None


def _magnitude_key(key_a: str) -> str:
  """The key of DoRA's magnitude beside the factor key ``key_a`` (PEFT's ``<m>.lora_magnitude_vector``)."""
  return f"{key_a.rsplit('.lora_', 1)[0]}.{MAGNITUDE}"


def _bias_key(key_b: str) -> str:
  """The key of ``lora_B``'s bias beside the factor key ``key_b`` (PEFT's ``<m>.lora_B.bias``)."""
  return key_b.removesuffix(".weight") + ".bias"


def _check_bias_module(m: Module, doing: str) -> None:
  if m.layer is not None or m.kind == "embedding":
    what = "an embedding (PEFT refuses lora_bias there)" if m.kind == "embedding" else "a layer of a stacked kernel"
    raise ValueError(f"{doing}: lora_bias on module {m.name}, {what}, is not supported; with a stacked kernel, "
                     "load onto params with one leaf per layer")


def _check_lora_biases(infos: Mapping[str, TensorInfo], pairs: list[PairKeys], targets: Mapping[Path, Target],
                       lora_bias: bool, path: str) -> dict[Path, str]:
  """``{target path: lora_B bias key}``: each adapted module has one (float, PEFT's shape) exactly when
  the config says ``lora_bias``; otherwise a ValueError naming the keys."""
  present = _check_module_keys(infos, pairs, targets, {m.path: _bias_key(key_b) for m, _, key_b in pairs},
                               lora_bias, "lora_bias", "lora_B biases", lora_bias_shape, path)
  for m, _, _ in pairs if lora_bias else ():
    _check_bias_module(m, path)
  return present


def _check_magnitudes(infos: Mapping[str, TensorInfo], pairs: list[PairKeys], targets: Mapping[Path, Target],
                      use_dora: bool, path: str) -> dict[Path, str]:
  """``{target path: magnitude key}``: each adapted module has one (float, PEFT's shape) exactly
  when the config says ``use_dora``; otherwise a ValueError naming the keys."""
  layered = sorted(m.name for m, _, _ in pairs if m.layer is not None)
  if use_dora and layered:
    raise ValueError(f"{path}: a DoRA adapter of per-layer modules of a stacked kernel ({', '.join(layered[:3])}) "
                     "does not load yet; load it onto params with one leaf per layer")
  return _check_module_keys(infos, pairs, targets, {m.path: _magnitude_key(key_a) for m, key_a, _ in pairs},
                            use_dora, "use_dora", "DoRA magnitudes", magnitude_shape, path)


def _check_module_keys(infos: Mapping[str, TensorInfo], pairs: list[PairKeys], targets: Mapping[Path, Target],
                       keys: Mapping[Path, str], enabled: bool, option: str, what: str,
                       shape: Callable[[Target, str], tuple[int, ...]], path: str) -> dict[Path, str]:
  """``{target path: key}`` of ``keys`` (one per adapted module) present in ``infos``: all of them,
  float, of ``shape(target, kind)``, when the config's ``option`` is on; none when it is off.

  Raises:
    ValueError: naming the keys present against the config, missing, or of the wrong dtype or shape.
  """
  present = {p: k for p, k in keys.items() if k in infos}
  if not enabled:
    if present:
      raise ValueError(f"{path} holds {what} ({', '.join(sorted(present.values())[:3])}) but its "
                       f"adapter_config.json has {option} false: fix the config")
    return {}
  missing = sorted(k for p, k in keys.items() if p not in present)
  if missing:
    raise ValueError(f"{path} is missing keys {', '.join(missing)} (the config has {option} true)")
  for m, _, _ in pairs:
    key = present[m.path]
    if infos[key].dtype not in FLOAT_DTYPES:
      raise ValueError(f"{path}: {key} must be floating point ({', '.join(FLOAT_DTYPES)}), not {infos[key].dtype}")
    check_shape(infos[key].shape, shape(targets[m.path], m.kind), f"{path}: {key}", targets[m.path])
  return present


def _open(dir_fd: int, directory: str, name: str, why: str = "") -> BinaryIO:
  try:
    return open_regular(name, dir_fd, os.path.join(directory, name))
  except FileNotFoundError:
    raise FileNotFoundError(f"{directory} has no {name}{why}") from None


def _ties(params: Any, path_map: PathMap | None) -> dict[str, str]:
  """``{embedding module name: head name}`` of the embeddings ``params`` tie to an output head."""
  if path_map is None:
    return {}
  ties = path_map.tied_embeddings(path_str(p) for p, _ in leaves_with_paths(params))
  return {embedding.removesuffix(".weight"): head for embedding, head in ties.items()}


def _check_tied(targets: Mapping[Path, Target], names: Mapping[Path, Module], cfg: LoraConfig,
                ties: Mapping[str, str]) -> None:
  """A tied embedding must be adapted at its lookup only (what PEFT computes)."""
  uses = getattr(cfg, "target_uses", None) or {}
  for path in targets:
    name = names[path].name
    if name in ties and not any(re.fullmatch(k, path_str(path)) and tuple(v) == LOOKUP_ONLY
                                for k, v in uses.items()):
      limited = targets[path].uses
      head = ties[name].removesuffix(".weight")
      if limited is None:
        what = (f"cfg adapts it at every use: the token lookup and the head {head} (the same table), "
                "while PEFT would apply the update at the lookup only")
      else:
        at_head = [u for u in limited if u != "lookup"]
        what = (f"cfg limits it to target_uses {tuple(limited)!r}"
                + (f", so the update reaches the head {head} ({'/'.join(at_head)} of the same table)" if at_head
                   else "") + (" and not the token lookup" if "lookup" not in limited else "")
                + ", while PEFT would apply it at the token lookup only")
      raise ValueError(
          f"LoRA target {path_str(path)} is the embedding {name}, which these params tie to the output head "
          f"{ties[name]} (there is no separate head leaf): {what}, so PEFT would load this adapter as a "
          f"different model. Train it with target_uses={{{re.escape(path_str(path))!r}: ('lookup',)}} in the "
          "LoraConfig (PEFT's tied embedding), or leave the embedding out of the targets; to adapt the head "
          "alone, untie it (give the params their own head leaf, the embedding's table) and target that leaf")


def _check_tied_saved(saved_modules: Iterable[str], ties: Mapping[str, str], where: str) -> None:
  """A ``modules_to_save`` copy of a tied embedding is refused: PEFT feeds its copy to the token
  lookup only (the head keeps the original table), while a copy here replaces the leaf at every use.

  Raises:
    ValueError: a saved module the params tie to the output head.
  """
  for name in sorted(set(saved_modules) & set(ties)):
    raise ValueError(
        f"{where}: modules_to_save holds {name}, an embedding these params tie to the output head "
        f"{ties[name]}. PEFT trains its copy at the token lookup only and keeps the original at the head; "
        "lorax_jax would use the copy at both, so the logits would differ. Untie the head (give the params "
        "their own head leaf) or adapt the embedding with LoRA (target_uses lookup) instead")


def _check_tied_head(infos: Mapping[str, TensorInfo], config: Mapping[str, Any], ties: Mapping[str, str],
                     path_map: PathMap | None, where: str) -> None:
  """A file naming the output head of params that tie it to the embedding (no head leaf here).

  Raises:
    ValueError: a ``modules_to_save`` copy or LoRA factors of the tied head, saying which
      embedding it is tied to and how to load the adapter (untie the head).
  """
  for embedding, head_weight in sorted(ties.items()):
    head = head_weight.removesuffix(".weight")
    keys = [k for k in infos if k.removeprefix(PREFIX) == head_weight
            or k.removeprefix(PREFIX).startswith(head + ".lora_")]
    if not keys:
      continue
    flax = path_map.to_flax(head_weight) if path_map is not None else None
    untie = (f"untie the head: give the params their own head leaf {flax[0] if flax else head_weight} holding "
             f"the embedding's table ({'transposed, ' if flax and flax[1] == 'linear' else ''}as the path map "
             "lays it out), as the model has with tie_word_embeddings=False, and load again")
    if any(k.removeprefix(PREFIX) == head_weight for k in keys):
      raise ValueError(
          f"{where}: modules_to_save {config.get('modules_to_save')!r} saves the output head {head} "
          f"({', '.join(sorted(keys))}), but these params tie the head to the embedding {embedding} "
          f"(tie_word_embeddings: there is no {head} leaf, the head reuses {embedding}'s table). PEFT trains a "
          f"copy of {head} used at the head only. To load it, {untie}; to train the shared table instead, "
          f"adapt {embedding} (a LoRA target with target_uses ('lookup',), as PEFT does), or untie and save {head}")
    raise ValueError(
        f"{where} has LoRA factors of the output head {head} ({', '.join(sorted(keys))}), but these params tie "
        f"the head to the embedding {embedding} (tie_word_embeddings: there is no {head} leaf, the head "
        f"reuses {embedding}'s table). PEFT adapts {head} as its own module, the update at the head only (the "
        f"token lookup stays as it is); lorax_jax adapts leaves, so to load it {untie}. An adapter of "
        f"{embedding} itself loads onto tied params (limited to the token lookup, as in PEFT)")


def _subfolder_hint(directory: str) -> str:
  """``"; did you mean <directory>/<name>?"`` for the subfolders of ``directory`` holding an
  adapter (PEFT's ``save_pretrained`` writes an adapter not named ``"default"``, and each of
  ``selected_adapters``, to ``<directory>/<name>``); ``""`` if none."""
  try:
    names = sorted(e.name for e in os.scandir(directory)
                   if e.is_dir() and os.path.isfile(os.path.join(directory, e.name, CONFIG_NAME)))
  except OSError:
    return ""
  if not names:
    return ""
  found = " or ".join(os.path.join(directory, n) for n in names)
  return (f"; its subfolder{'s' if len(names) > 1 else ''} {', '.join(names)} hold{'' if len(names) > 1 else 's'} "
          f"an adapter (PEFT saves a named adapter to <directory>/<name>): did you mean {found}?")


PairKeys = tuple[Module, str, str]


def _pairs(infos: Mapping[str, TensorInfo], path: str, mods: list[Module]
           ) -> tuple[list[PairKeys], dict[str, Module], Callable[[str], str]]:
  """``([(module, key_A, key_B)], {base copy key: module}, to_file)`` from the header's keys
  alone (``to_file`` as in `align_names`); unexpected, missing or non-float keys are errors
  naming them."""
  parts, others = parts_by_module(infos, _KEY)
  copy_names: dict[str, str] = {}
  unexpected = []
  for key in others:
    if match := _BASE_COPY.fullmatch(key):
      copy_names[key] = match["module"]
    else:
      unexpected.append(key)
  aligned, to_file = align_names([*parts, *copy_names.values()], mods)
  found, unknown = by_name(mods, {aligned[n] for n in parts})
  copies = {key: found[aligned[n]] for key, n in copy_names.items() if aligned[n] in found}
  unexpected += [key for key, n in copy_names.items() if aligned[n] not in found]
  unexpected += [key for name, p in parts.items() if aligned[name] in unknown for key in p.values()]
  missing, pairs = [], []
  for name, p in parts.items():
    if aligned[name] not in found:
      continue
    m = found[aligned[name]]
    want = _keys(m, name)
    unexpected += [key for key in p.values() if key not in (*want, _magnitude_key(want[0]), _bias_key(want[1]))]
    missing += [key for key in want if key not in p.values()]
    pairs.append((m, *want))
  if unexpected:
    hint = f"; {layout_hint([aligned[n] for n in parts if aligned[n] in unknown], mods)}" if unknown else ""
    raise ValueError(f"{path} has unexpected keys (no such LoRA module for these params): "
                     f"{', '.join(sorted(unexpected))}{hint}")
  if missing:
    raise ValueError(f"{path} is missing keys {', '.join(missing)}")
  not_float = [f"{key} ({infos[key].dtype})" for _, *keys in pairs for key in keys
               if infos[key].dtype not in FLOAT_DTYPES]
  if not_float:
    raise ValueError(f"{path}: LoRA factors must be floating point ({', '.join(FLOAT_DTYPES)}), not "
                     f"{', '.join(not_float)}")
  return pairs, copies, to_file


def _check_base_copies(f: Any, infos: Mapping[str, TensorInfo], copies: Mapping[str, Module], path: str,
                       params: Any) -> None:
  """Each copy of a base weight PEFT saved beside an adapted embedding must equal the one in
  ``params`` (shape checked from the header before its data is read)."""
  for key, m in copies.items():
    current = pathmap.to_torch(host_arrays(get_path(params, m.path)), m.kind)
    same = (infos[key].shape == current.shape and infos[key].dtype in FLOAT_DTYPES
            and _same(read_tensors(f, infos, [key])[key], current))
    if not same:
      raise ValueError(f"{path}: {key} is a copy of the base weight {m.name} that differs from the one in "
                       "params (the adapter was trained on resized or modified weights): put it in "
                       "params first")


def _same(x: np.ndarray, y: np.ndarray) -> bool:
  """Equal values, compared in the less precise of the two dtypes."""
  dtype = max(x.dtype, y.dtype, key=lambda d: ml_dtypes.finfo(d).eps)
  return bool(np.array_equal(x.astype(dtype), y.astype(dtype)))


def _parameter_modules(config: Mapping[str, Any], mods: list[Module], path_map: PathMap | None,
                       where: str) -> dict[str, str]:
  """``{parameter module name: its name in the file}`` (`wrapper_names`) of the modules the config's
  ``target_parameters`` select as PEFT does (the name, or a ``.``-suffix of it), and of the routers
  whose module ``target_modules`` selects (``mlp.gate``: PEFT reads them as ``target_parameters``
  ``gate.weight``, its conversion of adapters from transformers 4, where the router was an ``nn.Linear``).

  Raises:
    ValueError: ``target_parameters`` selects no parameter of these params (PEFT refuses it too).
  """
  names = config.get("target_parameters")
  selected = [m for m in mods if m.kind in PARAMETER_KINDS and (
      matches(names, m.name) or (m.kind == "router" and _peft_targets(config, m.name.removesuffix(".weight"))))]
  if names and not selected:
    raise ValueError(f"{where}: target_parameters {names!r} selects no parameter of these params (PEFT refuses "
                     "this adapter: no parameter was matched); load it onto the model it was trained for")
  return wrapper_names(selected, path_map) if selected else {}


def _parameter_keys(infos: Mapping[str, TensorInfo], wrapped: Mapping[str, str]) -> dict[str, TensorInfo]:
  """``infos`` with the factor keys of parameter modules renamed from the file's wrapper names to
  `_keys` of the parameters (``wrapped``: `_parameter_modules`)."""
  by_file = {v: k for k, v in wrapped.items()}
  out = {}
  for key, info in infos.items():
    match = _KEY.fullmatch(key)
    name = by_file.get(match["module"]) if match else None
    out[key if name is None else f"{PREFIX}{name}.{match['part']}"] = info
  return out


def _keys(m: Module, name: str | None = None) -> tuple[str, str]:
  """The keys of ``m``'s factors, under the module name ``name`` of the file (default ``m.name``)."""
  name = m.name if name is None else name
  if m.kind == "embedding":
    return f"{PREFIX}{name}.lora_embedding_A", f"{PREFIX}{name}.lora_embedding_B"
  return f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"


def _peft_targets(config: Mapping[str, Any], name: str) -> bool:
  """Whether PEFT's ``target_modules`` / ``exclude_modules`` select module ``name``.

  False when the selection depends on the torch model (``all-linear``, layer filters):
  then the file's keys alone say what is adapted.
  """
  if not _checkable(config) or matches(config.get("exclude_modules"), name):
    return False
  return matches(config["target_modules"], name)


def _checkable(config: Mapping[str, Any]) -> bool:
  """Whether ``target_modules`` selects modules by name alone (not ``all-linear``, PEFT's per-model
  default or a layer filter)."""
  return (config.get("target_modules") not in (None, "all-linear")
          and config.get("layers_to_transform") is None)


def _number(x: float) -> int | float:
  """``x`` as an int when integral, so the JSON reads like PEFT's."""
  return int(x) if float(x).is_integer() else float(x)
