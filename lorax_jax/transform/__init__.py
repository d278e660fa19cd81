"""`lora_transform`: the factored LoRA engine, a small package around one rule registry.

``lora_transform(apply_fn, params, cfg)`` returns ``lora_apply(params, lora, *args, rng=None,
**kwargs)``, which computes ``apply_fn(params, *args, **kwargs)`` as if every targeted
kernel were ``W' = W + s · A ⊗ B``, without ever forming ``W'``:

1. Trace ``apply_fn`` to a jaxpr, inside a ``jax.jit`` cached per argument structure
   (Python scalars among the arguments are static).
2. Evaluate the jaxpr equation by equation. A targeted kernel enters as a `LoraKernel`:
   the frozen ``w`` with its factors ``a``, ``b`` and a record of which of the kernel's
   current axes belong to ``a`` (input), to ``b`` (output) or to both (stacked layers, experts);
   the layout is the target's ``kernel_axes`` (`axes_from_use` reads it off the uses).
   The jaxpr's inputs are the array leaves only; call-time params must have the tree, shapes and
   dtypes the transform was built for.
3. Followed on the factors (lazily where possible): float casts of >= 16 bits (any other cast is
   merged for that use), transposes, reshapes, ``slice``/``dynamic_slice``, ``split`` (a fused
   QKV or gate-up kernel: each piece carries its slice of the factor owning the split axis),
   ``concatenate`` of kernels (``nn.OptimizedLSTMCell``: one kernel with factors block-diagonal
   over the summed rank), ``neg`` (the scale negated), ``mul``/``div`` by a scalar or an array
   varying along one side's axes (muP, per-channel gains: that side's factor scaled, as
   `merge` would).
4. Where the kernel is consumed, the low-rank branch is added, in the factors' dtype by default
   (``LoraConfig.branch_dtype``), honouring the use's ``precision``, ``preferred_element_type``
   and ``out_sharding``:
   ``dot_general(x, W) + s · (dropout(x) · F) · G`` where ``F`` is the factor owning the kernel
   axes ``x`` contracts (``a`` for ``x @ W``, ``b`` for a tied LM head ``h @ E.T`` or ``x @ W.T``
   with ``W`` stored ``[out, in]``), so no intermediate is larger than ``x``'s free axes times
   ``r``; a dot contracting axes of both factors is merged for that use. ``ragged_dot`` with an
   expert stack ``[E, in, out]``: two ragged dots with the same group sizes. For
   ``conv_general_dilated`` ``A`` is a conv with the layer's window into ``r`` channels and
   ``B`` a 1×1 conv (grouped: ``A`` repeated per group, ``B``'s columns per group); for an
   embedding ``gather`` (``[vocab, embed]`` or ``[embed, vocab]``, the rows collapsed or kept as
   size-1 axes) the rows of the factor owning the indexed axes are gathered, then multiplied by
   the other. A target limited by
   ``LoraConfig.target_uses`` gets no branch at its other uses (PEFT's tied embedding).
   DoRA (``LoraConfig.use_dora``) is a per-output scale on the same uses: ``g ⊙ (x·W + branch)``
   with ``g = m / ‖W + s · A ⊗ B‖`` computed once per call from ``A·W`` and ``A·Aᵀ``
   (`dora.dora_scale`); a use contracting the output axes (a tied head), a ``ragged_dot``, an
   ``[out, in]`` embedding lookup or a concatenation is merged for that use.
5. Nested ``jit`` is inlined; so is a ``jax.custom_jvp``/``jax.custom_vjp`` function whose body
   uses each kernel passed to it only through the rules above (JAX then differentiates the
   factored body, not the user's rule, and says so in a warning; any other body is bound on the
   merged kernels, the rule kept, and reported by the function's name); ``remat``/``checkpoint``
   (its policy kept), ``scan`` (stacked kernels are sliced with their factors), ``cond`` and
   ``while`` are re-emitted through ``jax.checkpoint`` and ``jax.lax``, so outer ``jit``, ``grad``,
   ``vmap`` and shardings compose.
   ``shard_map`` is re-emitted through ``jax.shard_map``, a kernel entering the mapped body with
   its factors sharded like it (``a`` by its input axes' entries, ``b`` by its output axes', the
   rank whole): ``(W + s·a⊗b)_d = W_d + s·a_d⊗b_d``, so the body's own collectives (a ``psum`` of a
   row-split kernel's partial products) carry the branch too.
6. A kernel that reaches any other operation is merged for that use only
   (``W + s · A ⊗ B``), and listed in ``lora_apply.fallbacks``; ``strict=True`` raises instead.
   So is a use where a training step is cheaper merged, by one cost rule from static shapes
   (`core.Context.cheaper_merged`: factored ``3 · branch`` FLOPs against ``use + 6·r·|W|``),
   except with ``strict=True``, in a mixed batch, for a quantized kernel or under dropout. A
   kernel a ``scan`` reads unchanged is costed over its iterations (`core.Context.loop_invariants`:
   ``length · 3 · branch`` against ``length · use + 6·r·|W|``) and merged once before the loop.
7. A quantized kernel (a `lorax_jax.QArray` leaf, targeted or not) is traced as its
   float array and enters as a `QuantizedKernel`: its layout equations (casts, transposes,
   reshapes, slices, splits) are recorded, not run, and at each use it is dequantized inside a
   custom VJP that dequantizes it again in the backward pass, so no float copy of it is a
   residual (QLoRA: ``y = x·deq(Q) + s·(x·A)·B``). An embedding lookup of a table blocked along
   its features gathers the rows' blocks and dequantizes only those (and a product with a
   table over 4 MiB in float along its rows, the tied head, runs over chunks of its rows); scan slices the stored
   blocks of a stacked kernel.

8. A mixed batch (``lora_apply(params, stacked, x, adapter_ids=ids)``, a tree of
   `lorax_jax.stack_adapters`): each kernel enters with its adapters' factors on a leading axis
   (each adapter's scale folded into its ``b``, a zero adapter for id -1) and the ids
   (`LoraKernel.ids`); layout and control rules move the factors' other axes as before, and a
   ``dot_general`` whose activation carries the batch on its leading, free axis gathers each
   example's factors (``(x_n · a[ids[n]]) · b[ids[n]]``). Any other use, or an activation without
   that axis, is a ValueError naming the kernel and the primitive.

The compiled programs are cached per argument structure and the type and value of each static
(non-array) argument, the least recently used of more than `CACHE_SIZE` evicted.

Dropout is applied to the branch input ``x`` with a key folded from ``rng``, the
target's index, its use and, inside loops, the iteration (with ``shared_dropout``: one key per
distinct input tensor, shared by the targets reading it). ``rng=None`` uses
``jax.random.key(cfg.dropout_seed)`` when ``cfg.dropout_seed`` is set, else no dropout (with a
one-time warning when ``cfg.dropout > 0``). Under ``jax.vmap`` a key shared by the batch gives
every example the same mask; to draw one mask per example, vmap over per-example keys
(``jax.vmap(lambda x, k: apply(params, lora, x, rng=k))(xs, jax.random.split(key, n))``).

`axes_from_use` traces a model abstractly and fills ``kernel_axes`` from each target's uses;
`find_linear` picks PEFT's ``all-linear`` leaves by the same walk.
The package: `registry` holds the one table of rules, keyed by primitive (`Rule`: what the
evaluator, the quantized kernels' binding and the axes walk do with it), each rule registered
beside its definition with `registry.rule`; `core` is the evaluator and the axes walk, both driven
by it, re-emitting each equation in its source context (the model's scope names stay in the
compiled program); the rules by concern: `layout` (3.), `contract` (4.), `control` (5.), `dora`,
`quantized` (7.); `kernels` the values in flight; `apply` `lora_transform`; `axes` `axes_from_use` and `find_linear`.
"""

# The rule modules register their rules on import.
from lorax_jax.transform import contract, control, layout, quantized  # noqa: F401
from lorax_jax.transform.apply import CACHE_SIZE, LoraApply, lora_transform
from lorax_jax.transform.axes import axes_from_use, find_linear
from lorax_jax.transform.kernels import LoraKernel, QuantizedKernel
from lorax_jax.transform.registry import RULES, Rule, overridden, register, rule

__all__ = ["CACHE_SIZE", "RULES", "LoraApply", "LoraKernel", "QuantizedKernel", "Rule", "axes_from_use",
           "find_linear", "lora_transform", "overridden", "register", "rule"]
