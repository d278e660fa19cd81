"""Hypothesis-generated kernel uses: the factored engine against hand-merged weights.

Each example draws a kernel with an axis split (``kernel_axes``: ``"s"`` stacked, ``"i"``
``a``-side, ``"o"`` ``b``-side), a chain of transformations before its use (reshape, slice or
`jnp.split` piece, self-concatenation, transpose, negation or scaling by a scalar) and a
`lax.dot_general` with random dimension numbers (batch and several contracting axes, the
kernel on either side). The reference applies the same function to ``W + s · Σ_r a ⊗ b``
formed by hand (`zoo_frameworks.delta`). Checked per example:

- outputs and LoRA gradients equal within 1e-5 (float32, relative to the larger magnitude);
- under ``strict=True`` nothing is merged, unless the contracted kernel axes span both factors
  (a use that the engine may merge and report);
- no value in the jaxpr of the factored gradient step is larger than ``|x| · max(1, r / min(dim))``,
  ``|out| · max(1, r / min(dim), r / |G's free axes|)`` (the branch's intermediate: the output's axes but those of
  the factor on the uncontracted side, plus the rank) or than the kernel or a factor (when the kernel is
  concatenated with itself, ``r`` doubled and the factors 4×: block factors, one block-diagonal).

Examples: hypothesis' profile (tests/conftest.py): 6 in `make test`, 60 in CI, derandomized (the
same ones on every run).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.extend as jex
import jax.numpy as jnp
from hypothesis import given
from hypothesis import strategies as st
from jax import lax

import lorax_jax as lj
import zoo
import zoo_frameworks as zf

R_MAX = 3


@dataclasses.dataclass(frozen=True)
class Use:
  """A kernel, the transformations before its use, and the `dot_general` that consumes it."""

  axes: str                               # the kernel's axis split, as `kernel_axes` takes it
  shape: tuple[int, ...]
  r: int
  reshape: tuple[int, ...] | None         # new shape (row-major), or None
  piece: tuple[str, int, int, int] | None  # ("slice", axis, start, limit) or ("split", axis, 2, index)
  concat_axis: int | None                  # concatenate the kernel with itself along this axis
  perm: tuple[int, ...]                    # transpose after the above
  scalar: str                              # "none", "neg", "mul" or "div"
  labels: tuple[str, ...]                  # the side of each axis of the transformed kernel
  x_shape: tuple[int, ...]
  kernel_lhs: bool
  dims: tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]]

  def kernel(self, w: jax.Array) -> jax.Array:
    """The transformed kernel, as the model computes it before the dot."""
    if self.reshape is not None:
      w = w.reshape(self.reshape)
    if self.piece is not None:
      kind, axis, p, q = self.piece
      w = lax.slice_in_dim(w, p, q, axis=axis) if kind == "slice" else jnp.split(w, p, axis=axis)[q]
    if self.concat_axis is not None:
      w = jnp.concatenate([w, w], axis=self.concat_axis)
    w = jnp.transpose(w, self.perm)
    if self.scalar == "neg":
      return -w
    if self.scalar == "mul":
      return 0.5 * w
    return w / 4.0 if self.scalar == "div" else w

  def apply(self, params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    w = self.kernel(params["kern"])
    return lax.dot_general(w, x, self.dims) if self.kernel_lhs else lax.dot_general(x, w, self.dims)

  @property
  def contracted_sides(self) -> set[str]:
    (lc, rc), _ = self.dims
    return {self.labels[i] for i in (lc if self.kernel_lhs else rc)}


@st.composite
def uses(draw: st.DrawFn) -> Use:
  nk = draw(st.integers(2, 4))
  n_stack = draw(st.integers(0, 1)) if nk >= 3 else 0
  sides = draw(st.lists(st.sampled_from("io"), min_size=nk - n_stack, max_size=nk - n_stack)
               .filter(lambda s: "i" in s and "o" in s))
  axes = "s" * n_stack + "".join(sides)
  shape = tuple(draw(st.sampled_from((2, 3, 4, 6))) for _ in range(nk))
  labels, dims = list(axes), list(shape)

  reshape = None
  kind = draw(st.sampled_from(("none", "merge", "split")))
  if kind == "merge":
    pairs = [j for j in range(nk - 1) if labels[j] == labels[j + 1] and labels[j] != "s"]
    if pairs:
      j = draw(st.sampled_from(pairs))
      dims[j:j + 2], labels[j:j + 2] = [dims[j] * dims[j + 1]], [labels[j]]
      reshape = tuple(dims)
  elif kind == "split":
    even = [j for j, n in enumerate(dims) if n in (4, 6) and labels[j] != "s"]
    if even:
      j = draw(st.sampled_from(even))
      first = draw(st.sampled_from([f for f in (2, 3) if dims[j] % f == 0]))
      dims[j:j + 1], labels[j:j + 1] = [first, dims[j] // first], [labels[j]] * 2
      reshape = tuple(dims)

  piece = None
  if draw(st.booleans()):
    j = draw(st.integers(0, len(dims) - 1))
    if dims[j] % 2 == 0 and draw(st.booleans()):
      index = draw(st.integers(0, 1))
      piece, dims[j] = ("split", j, 2, index), dims[j] // 2
    elif dims[j] >= 3:
      start = draw(st.integers(0, dims[j] - 2))
      limit = draw(st.integers(start + 2, dims[j]))
      piece, dims[j] = ("slice", j, start, limit), limit - start

  concat_axis = None
  if draw(st.integers(0, 3)) == 0:
    concat_axis = draw(st.integers(0, len(dims) - 1))
    dims[concat_axis] *= 2

  perm = tuple(draw(st.permutations(range(len(dims)))))
  dims, labels = [dims[p] for p in perm], [labels[p] for p in perm]
  scalar = draw(st.sampled_from(("none", "neg", "mul", "div")))

  # The use: each kernel axis is batch, contracted or free (stacked axes never contracted).
  roles = [draw(st.sampled_from(("batch", "free") if lab == "s" else ("batch", "contract", "free")))
           for lab in labels]
  if "contract" not in roles:
    j = draw(st.sampled_from([j for j, lab in enumerate(labels) if lab != "s"]))
    roles[j] = "contract"
  k_batch = [j for j, role in enumerate(roles) if role == "batch"]
  k_contract = [j for j, role in enumerate(roles) if role == "contract"]
  x_free = draw(st.lists(st.sampled_from((2, 3)), min_size=0, max_size=2))
  x_axes = [("b", j) for j in k_batch] + [("c", j) for j in k_contract] + [("f", n) for n in x_free]
  x_axes = draw(st.permutations(x_axes))
  x_shape = tuple(dims[j] if kind_ in "bc" else j for kind_, j in x_axes)
  x_batch = tuple(x_axes.index(("b", j)) for j in k_batch)
  x_contract = tuple(x_axes.index(("c", j)) for j in k_contract)
  kernel_lhs = draw(st.booleans())
  k_dims = ((tuple(k_contract), tuple(k_batch)))
  x_dims = (x_contract, x_batch)
  lhs, rhs = (k_dims, x_dims) if kernel_lhs else (x_dims, k_dims)
  dn = ((lhs[0], rhs[0]), (lhs[1], rhs[1]))
  r = draw(st.integers(1, min(R_MAX, min(shape) - 1)))  # low rank: r below every kernel axis (LoRA's regime)
  return Use(axes, shape, r, reshape, piece, concat_axis, perm, scalar,
             tuple(labels), x_shape, kernel_lhs, dn)


def _sizes(jaxpr: jex.core.Jaxpr) -> list[int]:
  """The size of every value computed in ``jaxpr`` and in the jaxprs nested in its equations."""
  out = []
  for eqn in jaxpr.eqns:
    out += [math.prod(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
    for p in eqn.params.values():
      for sub in p if isinstance(p, (tuple, list)) else (p,):
        if isinstance(sub, jex.core.ClosedJaxpr):
          out += _sizes(sub.jaxpr)
        elif isinstance(sub, jex.core.Jaxpr):
          out += _sizes(sub)
  return out


@given(use=uses(), seed=st.integers(0, 2**16))
def test_random_dot_general_uses(use: Use, seed: int):
  keys = jax.random.split(jax.random.key(seed), 4)
  params = {"kern": jax.random.normal(keys[0], use.shape) / 2}
  x = jax.random.normal(keys[1], use.x_shape)
  cfg = lj.LoraConfig(r=use.r, alpha=1.5 * use.r, targets=["kern"], kernel_axes={"kern": use.axes})
  a_shape, b_shape = zf.factor_shapes(use.shape, use.axes, use.r)
  lora = {"kern": {"a": 0.5 * jax.random.normal(keys[2], a_shape),
                   "b": 0.5 * jax.random.normal(keys[3], b_shape)}}
  assert jax.tree.map(jnp.shape, lj.init_lora(params, cfg, keys[0])) == jax.tree.map(jnp.shape, lora)

  def merged(lora):
    return use.apply({"kern": params["kern"] + zf.delta(lora["kern"]["a"], lora["kern"]["b"], use.axes, 1.5)}, x)

  loss = lambda apply: lambda l: jnp.sum(jnp.sin(apply(l)))
  spans_both = {"i", "o"} <= use.contracted_sides
  factored = lj.lora_transform(use.apply, params, cfg, strict=not spans_both)
  run = lambda l: factored(params, l, x)
  zoo.close(run(lora), merged(lora))
  zoo.close(jax.grad(loss(run))(lora), jax.grad(loss(merged))(lora))
  if spans_both and factored.fallbacks:
    return  # merged for this use, and reported
  assert factored.fallbacks == set()
  out_size = math.prod(jax.eval_shape(use.apply, params, x).shape)
  kernel_size = math.prod(jax.eval_shape(use.kernel, params["kern"]).shape)
  # A self-concatenation may double the rank: block factors, one side stacked, the other block-diagonal.
  blocks = 1 if use.concat_axis is None else 2
  k = max(1.0, blocks * use.r / min(use.shape))
  # The branch's intermediate (dropout(x)·F) carries the output's axes but the free axes of G (the
  # factor on the side not contracted) and adds the rank: |out| · r / |G's free axes|.
  kernel_shape = jax.eval_shape(use.kernel, params["kern"]).shape
  (lc, rc), (lb, rb) = use.dims
  k_used = (*lc, *lb) if use.kernel_lhs else (*rc, *rb)
  g_side = ({"i", "o"} - use.contracted_sides).pop()
  g_free = math.prod(n for j, (n, side) in enumerate(zip(kernel_shape, use.labels))
                     if side == g_side and j not in k_used)
  bound = max(x.size * k, out_size * max(k, blocks * use.r / g_free), params["kern"].size, kernel_size,
              blocks ** 2 * math.prod(a_shape), blocks ** 2 * math.prod(b_shape))
  step = jax.make_jaxpr(jax.value_and_grad(loss(run)))(lora)
  assert max(_sizes(step.jaxpr)) <= bound, (max(_sizes(step.jaxpr)), bound)
