"""Engine rules for functions with a custom derivative (``jax.custom_jvp``, ``jax.custom_vjp``) that a
kernel passes through, and for embedding gathers from ``[embed, vocab]`` tables.

The reference never calls lorax_jax: `_hand_merged` forms ``W + s · aᵀ b`` (every kernel here is
``"io"``: ``a [r, in]``, ``b [r, out]``) and runs the model on it, its gradients taken through that
sum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lorax_jax as lj
import test_engine_cost as cost
import zoo

R, ALPHA = 2, 3.0
_close = zoo.close


def _hand_merged(params: dict, lora: dict) -> dict:
  """``params`` with each adapted kernel replaced by ``W + (ALPHA / R) · aᵀ b``."""
  return {k: w + ALPHA / R * lora[k]["a"].T @ lora[k]["b"] if k in lora else w for k, w in params.items()}


def _loss(y: jax.Array) -> jax.Array:
  return jnp.sum(jnp.sin(y))


def _factored_and_merged(f, params: dict, x: jax.Array, targets: list[str], **kw):
  """The factored transform, random non-zero factors, and the hand-merged model's outputs and LoRA
  gradients."""
  cfg = lj.LoraConfig(r=R, alpha=ALPHA, targets=targets, kernel_axes={t: "io" for t in targets})
  lora = zoo.random_factors(params, cfg)
  merged = lambda l: f(_hand_merged(params, l), x)
  want, grads = merged(lora), jax.grad(lambda l: _loss(merged(l)))(lora)
  assert not np.allclose(want, f(params, x), atol=1e-3)  # the update is not negligible
  return lj.lora_transform(f, params, cfg, **kw), lora, want, grads


def _check(f, params: dict, x: jax.Array, targets: list[str]) -> None:
  """Strict factored outputs and LoRA gradients equal the hand-merged model's (1e-5)."""
  factored, lora, want, grads = _factored_and_merged(f, params, x, targets, strict=True)
  _close(factored(params, lora, x), want)
  _close(jax.grad(lambda l: _loss(factored(params, l, x)))(lora), grads)
  assert factored.fallbacks == set()


def _params(*shapes: tuple[int, ...]) -> dict:
  keys = jax.random.split(jax.random.key(0), len(shapes))
  return {f"w{i}": jax.random.normal(k, s) / np.sqrt(s[0]) for i, (k, s) in enumerate(zip(keys, shapes))}


X = jax.random.normal(jax.random.key(9), (3, 4))


# --- custom derivatives ------------------------------------------------------------------


@jax.custom_jvp
def tanh_matmul(x, w):
  return jnp.tanh(x @ w)


@tanh_matmul.defjvp
def _tanh_matmul_jvp(primals, tangents):
  (x, w), (dx, dw) = primals, tangents
  y = jnp.tanh(x @ w)
  return y, (1 - y * y) * (dx @ w + x @ dw)


@jax.custom_vjp
def matmul(x, w):
  return x @ w


def _matmul_fwd(x, w):
  return x @ w, (x, w)


def _matmul_bwd(res, g):
  x, w = res
  return g @ w.T, x.T @ g


matmul.defvjp(_matmul_fwd, _matmul_bwd)


@jax.custom_jvp
def sin_matmul(x, w):
  return x @ jnp.sin(w)


@sin_matmul.defjvp
def _sin_matmul_jvp(primals, tangents):
  (x, w), (dx, dw) = primals, tangents
  return sin_matmul(x, w), dx @ jnp.sin(w) + x @ (jnp.cos(w) * dw)


def test_custom_jvp_matmul_is_factored():
  """A kernel used linearly inside a ``custom_jvp`` function (and a second one used after it)."""
  _check(lambda p, x: tanh_matmul(x, p["w0"]) @ p["w1"], _params((4, 5), (5, 3)), X, ["w0", "w1"])


def test_custom_vjp_matmul_is_factored():
  """A kernel used linearly inside a ``custom_vjp`` function, transposed on its way in (an
  ``[out, in]`` weight), under ``jit``."""
  params = _params((4, 5), (3, 5))
  f = jax.jit(lambda p, x: matmul(jnp.tanh(matmul(x, p["w0"])), p["w1"].T))
  _check(f, params, X, ["w0"])
  # The axes walk follows the kernels into the calls too: w1 is used as x @ W.T.
  cfg = lj.axes_from_use(f, params, lj.LoraConfig(r=R, targets=["w0", "w1"]), X)
  assert dict(cfg.kernel_axes) == {"w0": "io", "w1": "oi"}


@jax.custom_vjp
def sin_matmul_vjp(x, w):
  return x @ jnp.sin(w)


sin_matmul_vjp.defvjp(lambda x, w: (x @ jnp.sin(w), (x, w)),
                      lambda res, g: (g @ jnp.sin(res[1]).T, jnp.cos(res[1]) * (res[0].T @ g)))


@pytest.mark.parametrize("fn, call", [(sin_matmul, "custom_jvp_call sin_matmul"),
                                      (sin_matmul_vjp, "custom_vjp_call sin_matmul_vjp")], ids=["jvp", "vjp"])
def test_nonlinear_in_the_kernel_is_merged_and_reported(fn, call):
  """``sin(W)`` inside the body: the call runs on the merged kernel (the user's rule kept), reported
  by the function's name; the kernel used after it stays factored."""
  f = lambda p, x: fn(x, p["w0"]) @ p["w1"]
  params = _params((4, 5), (5, 3))
  factored, lora, want, grads = _factored_and_merged(f, params, X, ["w0", "w1"])
  with pytest.warns(UserWarning, match=f"w0 reaches `{call}"):
    _close(factored(params, lora, X), want)
  _close(jax.grad(lambda l: _loss(factored(params, l, X)))(lora), grads)
  # w1 (5 × 3 on 2 rows) may also be merged by the cost rule, cheaper at this toy size
  assert {f for f in factored.fallbacks if "merged: cheaper" not in f[1]} == {
      ("w0", f"{call} (its body applies sin to a kernel)")}
  strict = lj.lora_transform(f, params, factored.cfg, strict=True)
  with pytest.raises(NotImplementedError, match=f"w0 reaches `{call}"):
    strict(params, lora, X)


def test_factored_call_is_differentiated_from_its_body():
  """The documented choice: at a factored call the user's rule is not applied; JAX differentiates
  the body. A ``custom_vjp`` whose backward halves the gradients (not the body's derivative) gives
  the plain body's gradients, not the hand-merged decorated function's."""
  @jax.custom_vjp
  def halved_grad_matmul(x, w):
    return x @ w
  halved_grad_matmul.defvjp(_matmul_fwd, lambda res, g: jax.tree.map(lambda t: t / 2, _matmul_bwd(res, g)))

  params = _params((4, 5), (5, 3))
  f = lambda p, x: halved_grad_matmul(x, p["w0"]) @ p["w1"]
  factored, lora, want, halved = _factored_and_merged(f, params, X, ["w0", "w1"], strict=True)
  with pytest.warns(UserWarning, match="custom_vjp_call halved_grad_matmul is factored, and JAX differentiates its body"):
    _close(factored(params, lora, X), want)
  got = jax.grad(lambda l: _loss(factored(params, l, X)))(lora)
  plain = lambda p, x: x @ p["w0"] @ p["w1"]
  _close(got, jax.grad(lambda l: _loss(plain(_hand_merged(params, l), X)))(lora))
  assert not np.allclose(got["w0"]["a"], halved["w0"]["a"], atol=1e-3)


# --- gathers from [embed, vocab] tables ------------------------------------------------------

TABLE = {"w0": jax.random.normal(jax.random.key(1), (6, 10))}  # [embed, vocab]
IDS = jnp.array([[1, 2, 9], [0, 0, 5]])


def _penzai_style_lookup(p, ids):
  """penzai's lookup of an ``[embed, vocab]`` view: the vocabulary axis kept as a size-1 slice axis."""
  dn = lax.GatherDimensionNumbers(offset_dims=(0, 3), collapsed_slice_dims=(), start_index_map=(1,))
  out = lax.gather(p["w0"], ids[..., None], dn, slice_sizes=(p["w0"].shape[0], 1), mode="clip")
  return jnp.moveaxis(out[..., 0], 0, -1)


@pytest.mark.parametrize("lookup", [lambda p, ids: jnp.take(p["w0"], ids, axis=1),
                                    lambda p, ids: p["w0"][:, ids],
                                    _penzai_style_lookup], ids=["take_axis_1", "index_columns", "penzai_style"])
def test_embed_vocab_gather_is_factored(lookup):
  _check(lambda p, ids: jnp.tanh(lookup(p, ids)), TABLE, IDS, ["w0"])


def test_penzai_embedding_lookup_is_factored():
  """penzai's own `EmbeddingLookup`, through `pz.unbind_params`."""
  pz = pytest.importorskip("penzai.pz")
  table = pz.nn.EmbeddingTable.from_config("emb", jax.random.key(0), vocab_size=10, embedding_axes={"embedding": 6})
  graph, variables = pz.unbind_params(pz.nn.EmbeddingLookup(table))
  params = {"w0": variables[0].value.data_array}
  names = variables[0].value.named_axes

  def f(p, ids):
    value = pz.nx.NamedArray(named_axes=names, data_array=p["w0"])
    model = pz.bind_variables(graph, [pz.Parameter(value=value, label=variables[0].label)])
    return model(pz.nx.wrap(ids).tag("batch", "seq")).unwrap("batch", "seq", "embedding")
  _check(f, params, IDS, ["w0"])


def test_factored_steps_cost_no_more_than_merged():
  """Compiled FLOPs of a LoRA train step (gradient and Adam) through each new rule, at sizes where
  LoRA is used: at most the merged reference step's."""
  d, vocab = 256, 4096
  mlp = _params((d, d), (d, d))
  table = {"w0": jnp.zeros((64, vocab))}  # [embed, vocab]
  for f, params, x in [(lambda p, x: matmul(jnp.tanh(tanh_matmul(x, p["w0"])), p["w1"]), mlp, jnp.zeros((64, d))),
                       (lambda p, ids: jnp.take(p["w0"], ids, axis=1), table, jnp.zeros((8, 32), jnp.int32)),
                       (_penzai_style_lookup, table, jnp.zeros((8, 32), jnp.int32))]:
    cfg = lj.LoraConfig(r=8, targets=list(params))
    lora = lj.init_lora(params, cfg, jax.random.key(1))
    flops = {mode: cost._flops(cost._lora_step(lj.lora_transform(f, params, cfg, mode=mode, strict=True),
                                               cost._sin_loss), params, lora, cost.OPT.init(lora), x)
             for mode in ("factored", "reference")}
    assert flops["factored"] <= flops["reference"], flops
