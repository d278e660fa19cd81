"""`combine` equals PEFT's ``add_weighted_adapter`` for every method, on `test_peft.TorchNet`
(embedding, linears, a 3×3 conv) with three adapters of different targets, ranks, alphas and
rsLoRA; the DARE methods with PEFT's masks replaced by the ones `combine` draws from its key."""

from __future__ import annotations

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorax_jax import LoraConfig, combine, delta, find_targets, init_lora, load_adapter, save_adapter
from lorax_jax.io.factors import factors_to_torch
from lorax_jax.models.hf import params_from_tensors
from lorax_jax.pathmap import to_torch
from lorax_jax.paths import path_str
from lorax_jax.qarray import leaves_with_paths
from test_io import NET_MAP, random_lora
from test_peft import TorchNet, randomize_lora, state, torch_net

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
merge_utils = pytest.importorskip("peft.utils.merge_utils")

WEIGHTS = [0.7, -0.4, 1.3]
# Different targets, ranks (rank_pattern), alphas (alpha_pattern) and rsLoRA: for "cat" and SVD.
MIXED = {
    "m0": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens", "conv_in"],
               rank_pattern={"conv_in": 2}),
    "m1": dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "o_proj", "embed_tokens"],
               alpha_pattern={"o_proj": 5}),
    "m2": dict(r=2, lora_alpha=6, target_modules=["v_proj", "q_proj"], rank_pattern={"layers.1.q_proj": 1}),
}
# One rank everywhere: the factor methods merge factors entry by entry.
SAME_RANK = {
    "s0": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "embed_tokens", "conv_in"]),
    "s1": dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "o_proj", "embed_tokens"],
               alpha_pattern={"o_proj": 5}),
    "s2": dict(r=2, lora_alpha=6, target_modules=["v_proj", "q_proj"]),
}
CASES = [
    ("linear", {}), ("cat", {}), ("svd", {}), ("svd", dict(svd_rank=2, svd_clamp=0.9)),
    ("ties", dict(density=0.5)), ("ties", dict(density=0.7, majority_sign_method="frequency")),
    ("ties_svd", dict(density=0.5)), ("magnitude_prune", dict(density=0.5)),
    ("magnitude_prune_svd", dict(density=0.6, svd_rank=2)),
    ("dare_linear", dict(density=0.5)), ("dare_ties", dict(density=0.6)),
    ("dare_linear_svd", dict(density=0.5)), ("dare_ties_svd", dict(density=0.5, majority_sign_method="frequency")),
]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
  """The torch PeftModel holding every adapter, the Flax params, and each adapter loaded here."""
  torch.manual_seed(0)
  weights = state(TorchNet().eval())
  specs = {**MIXED, **SAME_RANK}
  names = list(specs)
  model = peft.get_peft_model(torch_net(weights), peft.LoraConfig(**specs[names[0]]), adapter_name=names[0])
  for name in names[1:]:
    model.add_adapter(name, peft.LoraConfig(**specs[name]))
  randomize_lora(model)
  directory = str(tmp_path_factory.mktemp("adapters"))
  model.save_pretrained(directory)
  params = params_from_tensors(weights, NET_MAP)
  loaded = {name: load_adapter(os.path.join(directory, name), params, NET_MAP) for name in names}
  return model, params, loaded


def module_of(model, path):
  """The PEFT layer of a Flax path, and its layout kind."""
  name, kind = NET_MAP.to_hf(path_str(path))
  return model.base_model.model.get_submodule(name.removesuffix(".weight")), kind


def torch_deltas(params, lora, cfg):
  """`delta` of each target in torch's layout (``get_delta_weight``'s)."""
  return {p: to_torch(np.asarray(d), NET_MAP.to_hf(path_str(p))[1]) for p, d in delta(params, lora, cfg).items()}


def dare_masks(model, params, loaded, names, key, density, svd):
  """``[(PEFT's tensor, mask)]``: the mask `combine` draws for each tensor PEFT prunes at random
  (a factor, or an update for the SVD methods), in torch's layout (module docstring of combine)."""
  order = [p for p, _ in leaves_with_paths(params)]
  paths = sorted({p for n in names for p in find_targets(params, loaded[n][1])}, key=order.index)
  keys = jax.random.split(key, (len(paths), 2, len(names)))
  out = []
  for j, path in enumerate(paths):
    module, kind = module_of(model, path)
    for i, name in enumerate(names):
      targets = find_targets(params, loaded[name][1])
      if path not in targets:
        continue
      t = targets[path]
      if svd:
        mask = to_torch(np.asarray(jax.random.bernoulli(keys[j, 0, i], density, t.shape)), kind)
        out.append((module.get_delta_weight(name), mask))
        continue
      masks = (np.asarray(jax.random.bernoulli(keys[j, side, i], density, shape))
               for side, shape in ((0, t.a_shape), (1, t.b_shape)))
      factors = ((module.lora_embedding_A[name], module.lora_embedding_B[name]) if kind == "embedding"
                 else (module.lora_A[name].weight, module.lora_B[name].weight))
      out += zip(factors, factors_to_torch(*masks, t, kind))
  return [(x.detach().clone(), torch.from_numpy(np.ascontiguousarray(m)).to(x.dtype)) for x, m in out]


def signed_svd(svd):
  """torch's SVD with `combine`'s signs: the largest |entry| of each column of U positive."""
  def signed(x, *args, **kwargs):
    u, s, vh = svd(x, *args, **kwargs)
    peak = torch.gather(u, -2, u.abs().argmax(-2, keepdim=True))
    sign = torch.where(peak < 0, -1.0, 1.0).to(u.dtype)
    k = min(u.shape[-1], vh.shape[-2])
    return u * sign, s, torch.cat([vh[..., :k, :] * sign[..., :k].mT, vh[..., k:, :]], -2)
  return signed


@pytest.mark.parametrize("method, kwargs", CASES, ids=[f"{m}-{'-'.join(map(str, k.values()))}" for m, k in CASES])
def test_combine_equals_peft(adapters, monkeypatch, method, kwargs):
  model, params, loaded = adapters
  names = list(SAME_RANK if method in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune") else MIXED)
  key = jax.random.key(7) if method.startswith("dare") else None
  if key is not None:
    masks = dare_masks(model, params, loaded, names, key, kwargs["density"], method.endswith("svd"))

    def random_pruning(tensor, density, rescale):
      found = [m for x, m in masks if x.shape == tensor.shape and torch.equal(x, tensor)]
      assert len(found) == 1 and rescale
      return tensor * found[0] / density

    monkeypatch.setattr(merge_utils, "random_pruning", random_pruning)
  if "svd_clamp" in kwargs:  # the clamp depends on the singular vectors' signs: give torch's combine's.
    # (And on the vectors themselves: svd_rank=2 is at most every update's rank here, so none is arbitrary.)
    monkeypatch.setattr(torch.linalg, "svd", signed_svd(torch.linalg.svd))
  combined = "_".join(map(str, (method, *kwargs.values()))).replace(".", "p")
  model.add_weighted_adapter(names, WEIGHTS, combined, combination_type=method, **kwargs)
  lora, cfg = combine(params, [loaded[n][0] for n in names], [loaded[n][1] for n in names], WEIGHTS, method,
                      key=key, **kwargs)
  ours = torch_deltas(params, lora, cfg)
  adapted = {n for n, m in model.base_model.model.named_modules()
             if combined in getattr(m, "lora_A", {}) or combined in getattr(m, "lora_embedding_A", {})}
  assert {NET_MAP.to_hf(path_str(p))[0].removesuffix(".weight") for p in ours} == adapted
  for path, d in ours.items():
    module, _ = module_of(model, path)
    want = module.get_delta_weight(combined).detach().numpy()
    np.testing.assert_allclose(d, want, rtol=1e-4, atol=1e-5, err_msg=path_str(path))
    assert np.abs(want).max() > 1e-3
  assert all(t.scale == 1.0 for t in find_targets(params, cfg).values())


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_combined_adapter_saves_for_peft(adapters, tmp_path, method):
  """Saved with `save_adapter`, the combined adapter loads into PEFT as the same update."""
  model, params, loaded = adapters
  names = list(MIXED)
  lora, cfg = combine(params, [loaded[n][0] for n in names], [loaded[n][1] for n in names], WEIGHTS, method)
  save_adapter(str(tmp_path), lora, cfg, params, NET_MAP)
  model.load_adapter(str(tmp_path), adapter_name=f"saved-{method}")
  for path, d in torch_deltas(params, lora, cfg).items():
    module, _ = module_of(model, path)
    np.testing.assert_allclose(module.get_delta_weight(f"saved-{method}").detach().numpy(), d, rtol=1e-5, atol=1e-7)


# ---- without PEFT ---------------------------------------------------------------------------

STACKED = {"params": {"layers": {"attn": {"q_proj": {"kernel": jnp.ones((3, 6, 5))}}}}}
UNROLLED = {"params": {f"layers_{i}": {"attn": {"q_proj": {"kernel": jnp.ones((6, 5))}}} for i in range(3)}}


@pytest.mark.parametrize("method, kwargs", [
    ("linear", {}), ("cat", {}), ("svd", dict(svd_clamp=0.8)), ("ties", dict(density=0.4)),
    ("magnitude_prune_svd", dict(density=0.5, svd_rank=2)), ("ties_svd", dict(density=0.3)),
])
def test_stacked_kernel_combines_per_layer(method, kwargs):
  """A scanned kernel ``[layers, in, out]`` combines as its layers would one by one (PEFT's modules)."""
  cfgs = [LoraConfig(r=2, alpha=a, kernel_axes={"q_proj": "sio"}, use_rslora=rs) for a, rs in ((4, False), (3, True))]
  loras = [random_lora(STACKED, c, seed) for seed, c in enumerate(cfgs)]
  lora, cfg = combine(STACKED, loras, cfgs, [0.6, -1.2], method, **kwargs)
  got = delta(STACKED, lora, cfg)[("params", "layers", "attn", "q_proj", "kernel")]
  for i in range(3):
    layer = lambda tree: {k: v[i] for k, v in tree["params"]["layers"]["attn"]["q_proj"]["kernel"].items()}
    per = [{"params": {f"layers_{i}": {"attn": {"q_proj": {"kernel": layer(x)}}}}} for x in loras]
    flat = [c.replace(kernel_axes={}) for c in cfgs]
    params_i = {"params": {f"layers_{i}": UNROLLED["params"][f"layers_{i}"]}}
    lora_i, cfg_i = combine(params_i, per, flat, [0.6, -1.2], method, **kwargs)
    (want,) = delta(params_i, lora_i, cfg_i).values()
    np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)


def plain_pair(params):
  cfgs = [LoraConfig(r=2, alpha=4), LoraConfig(r=2, alpha=2, use_rslora=True)]
  return [random_lora(params, c, seed) for seed, c in enumerate(cfgs)], cfgs


SMALL = {"attn": {"query": {"kernel": jnp.ones((8, 6))}, "value": {"kernel": jnp.ones((8, 6))}}}


def test_dare_is_reproducible_and_unbiased():
  loras, cfgs = plain_pair(SMALL)
  run = lambda seed, density: combine(SMALL, loras, cfgs, [1.0, 0.5], "dare_linear_svd", density=density,
                                      key=jax.random.key(seed))[0]
  same = [jax.tree.leaves(run(0, 0.5)), jax.tree.leaves(run(0, 0.5)), jax.tree.leaves(run(1, 0.5))]
  chex.assert_trees_all_equal(same[0], same[1])
  assert not all(bool((x == y).all()) for x, y in zip(same[0], same[2]))
  full = combine(SMALL, loras, cfgs, [1.0, 0.5], "dare_linear", density=1.0, key=jax.random.key(0))[0]
  linear = combine(SMALL, loras, cfgs, [1.0, 0.5], "linear")[0]
  chex.assert_trees_all_equal(full, linear)
  # E[M / density] = 1: the mean of many DARE updates is the linear combination of the updates
  draws = [delta(SMALL, *combine(SMALL, loras, cfgs, [1.0, 0.5], "dare_linear_svd", density=0.5, svd_rank=6,
                                 key=jax.random.key(s))) for s in range(200)]
  mean = jax.tree.map(lambda *d: sum(d) / len(d), *draws)
  exact = jax.tree.map(lambda x, y: x + 0.5 * y, delta(SMALL, loras[0], cfgs[0]), delta(SMALL, loras[1], cfgs[1]))
  for p in exact:
    assert float(jnp.abs(mean[p] - exact[p]).max()) < 0.25 * float(jnp.abs(exact[p]).max())


def test_one_adapter_is_linear():
  loras, cfgs = plain_pair(SMALL)
  lora, cfg = combine(SMALL, loras[:1], cfgs[:1], [2.0], "ties_svd", density=0.1)
  for p, d in delta(SMALL, lora, cfg).items():
    np.testing.assert_allclose(d, 2.0 * delta(SMALL, loras[0], cfgs[0])[p], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change, match", [
    (dict(method="mean"), "method must be one of"),
    (dict(weights=[1.0]), "one weight per adapter"),
    (dict(weights=[1.0, float("nan")]), "finite"),
    (dict(method="ties"), "needs density"),
    (dict(method="dare_ties", density=0.0), r"needs density.*\(0, 1\]"),
    (dict(method="magnitude_prune", density=1.5), "needs density"),
    (dict(method="ties", density=0.5, majority_sign_method="mean"), "majority_sign_method"),
    (dict(method="svd", svd_rank=0), "svd_rank must be"),
    (dict(method="svd", svd_rank=7), "SVD rank 7 exceeds"),
    (dict(method="svd", svd_clamp=2.0), "svd_clamp"),
    (dict(cfgs=[LoraConfig(r=2, alpha=4), LoraConfig(r=3)]), "adapter 1: LoRA factor"),
])
def test_bad_arguments(change, match):
  loras, cfgs = plain_pair(SMALL)
  args = dict(loras=loras, cfgs=cfgs, weights=[1.0, 0.5], method="linear") | change
  with pytest.raises(ValueError, match=match):
    combine(SMALL, args["loras"], args["cfgs"], args["weights"], args["method"],
            **{k: v for k, v in change.items() if k not in ("loras", "cfgs", "weights", "method")})


def test_refusals():
  loras, cfgs = plain_pair(SMALL)
  with pytest.raises(TypeError, match="pass key="):
    combine(SMALL, loras, cfgs, [1.0, 1.0], "dare_linear", density=0.5)
  ranks = [LoraConfig(r=2), LoraConfig(r=3)]
  with pytest.raises(ValueError, match=r"query/kernel has ranks \[2, 3\].*use 'cat'"):
    combine(SMALL, [random_lora(SMALL, c) for c in ranks], ranks, [1.0, 1.0], "linear")
  big = [LoraConfig(r=4), LoraConfig(r=3)]
  with pytest.raises(ValueError, match="combined rank 7 at attn/query/kernel exceeds"):
    combine(SMALL, [random_lora(SMALL, c) for c in big], big, [1.0, 1.0], "cat")
  dora = [cfgs[0], cfgs[1].replace(use_dora=True)]
  with pytest.raises(ValueError, match="adapter 1 is DoRA"):
    combine(SMALL, [loras[0], init_lora(SMALL, dora[1], jax.random.key(0))], dora, [1.0, 1.0], "cat")
  axes = [cfgs[0], cfgs[1].replace(kernel_axes={"query": "oi"})]
  with pytest.raises(ValueError, match="adapter 1 reads attn/query/kernel with kernel_axes 'oi', adapter 0 with 'io'"):
    combine(SMALL, [loras[0], random_lora(SMALL, axes[1])], axes, [1.0, 1.0], "cat")
  pissa = [cfgs[0], cfgs[1].replace(init="pissa")]
  with pytest.raises(ValueError, match="adapter 1 has init='pissa'"):
    combine(SMALL, loras, pissa, [1.0, 1.0], "cat")
