"""Issue 19: never delete what the library did not create, never hang or exhaust memory on a file,
refuse what PEFT refuses, and name the mistake.

Before: ``save_adapter("", ...)`` replaced the working directory with the adapter (every other
file in it deleted); ``merge --out ""`` wrote over ``./config.json``; an ``adapter_config.json``
linked to ``/dev/urandom`` grew the process to 23.6 GB; a FIFO ``adapter_model.safetensors``
blocked ``load_adapter`` forever.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import stat
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorax_jax
from lorax_jax import cli
from lorax_jax.files import check_destination, write_dir_atomic
from lorax_jax.io import load_adapter, save_adapter
from lorax_jax.models import gguf
from lorax_jax.models.llama import Llama, LlamaConfig, save_llama
from test_io import CONFIG, NET_MAP, WEIGHTS, make_cfg, random_lora
from test_io import params  # noqa: F401  (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree_snapshot(root) -> dict[str, tuple]:
  """Every entry under ``root`` (not following links): kind, mode and content or link target."""
  out = {}
  for directory, dirs, files in os.walk(root):
    for name in dirs + files:
      path = os.path.join(directory, name)
      st_ = os.lstat(path)
      if stat.S_ISLNK(st_.st_mode):
        out[os.path.relpath(path, root)] = ("link", os.readlink(path))
      elif stat.S_ISDIR(st_.st_mode):
        out[os.path.relpath(path, root)] = ("dir", st_.st_mode)
      else:
        out[os.path.relpath(path, root)] = ("file", st_.st_mode, pathlib.Path(path).read_bytes())
  return out


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
  """``tmp_path`` holding a working directory, a home and a folder of user files, and a link to
  that folder; the process runs in the working directory with HOME pointing at the fake home."""
  for folder in ("work", "home", "mine"):
    (tmp_path / folder / "sub").mkdir(parents=True)
    (tmp_path / folder / "notes.txt").write_text(f"the user's notes in {folder}")
    (tmp_path / folder / "sub" / "data.bin").write_bytes(bytes(range(256)))
    (tmp_path / folder / "sub" / "data.bin").chmod(0o600)
    (tmp_path / folder / CONFIG).write_text('{"owner": "the user"}')  # a name the library writes too
  (tmp_path / "link").symlink_to(tmp_path / "mine")
  monkeypatch.chdir(tmp_path / "work")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  return tmp_path


def hostile_destinations(root) -> list:
  return ["", ".", "./", pathlib.Path(""), str(root / "home"), str(root / "link"), str(root / "mine"),
          str(root / "mine" / "sub" / "..")]


DESTINATION_ERROR = (r"path is empty|is the working directory|is the home directory"
                     r"|holds .*which lorax_jax did not write")


@pytest.fixture(scope="module")
def tiny_llama_params():
  config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=4)
  return config, Llama(config).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))


def library_writers(params, tiny_llama_params):
  cfg = make_cfg()
  lora = random_lora(params, cfg)
  config, llama_params = tiny_llama_params
  return {
      "save_adapter": lambda d: save_adapter(d, lora, cfg, params, NET_MAP),
      "save_llama": lambda d: save_llama(d, llama_params, config),
      "write_dir_atomic": lambda d: write_dir_atomic(d, {"x.txt": lambda p: pathlib.Path(p).write_text("x")}),
  }


@pytest.mark.parametrize("writer", ["save_adapter", "save_llama", "write_dir_atomic"])
def test_library_writers_refuse_user_folders(sandbox, params, tiny_llama_params, writer):
  write = library_writers(params, tiny_llama_params)[writer]
  before = tree_snapshot(sandbox)
  for destination in hostile_destinations(sandbox):
    with pytest.raises(ValueError, match=DESTINATION_ERROR):
      write(destination)
    assert tree_snapshot(sandbox) == before, f"{writer}({destination!r}) changed the user's files"
  write("out")  # the control: a new directory of its own
  write("out")  # and again over its own earlier version
  assert tree_snapshot(sandbox)["work/out"][0] == "dir"


def cli_fails(argv, capsys) -> str:
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  return err


def test_merge_refuses_user_folders_before_loading(sandbox, capsys, monkeypatch):
  from lorax_jax.apps import finetune
  monkeypatch.setattr(finetune, "load_model", lambda *a: pytest.fail("the model loaded before the check"))
  before = tree_snapshot(sandbox)
  for destination in map(str, hostile_destinations(sandbox)):
    err = cli_fails(["merge", "--adapter", "adapter", "--out", destination], capsys)
    assert re.search(DESTINATION_ERROR, err), err
  assert tree_snapshot(sandbox) == before


def test_finetune_refuses_user_folders_before_training(sandbox, capsys, tiny_llama, monkeypatch):
  monkeypatch.setattr(lorax_jax, "init_lora_and_base", lambda *a: pytest.fail("training started before the check"))
  model, _, text = tiny_llama
  before = tree_snapshot(sandbox)
  for destination in map(str, hostile_destinations(sandbox)):
    err = cli_fails(["finetune", "--model", model, "--data", text, "--format", "text", "--out_dir", destination,
                     "--batch_size", "4", "--seq_len", "24", "--max_chars", "0", "--eval_examples", "8"], capsys)
    assert re.search(DESTINATION_ERROR, err), err
  assert tree_snapshot(sandbox) == before


def test_gguf_cache_never_deletes_a_folder_it_did_not_write(smollm2, tmp_path):
  """Before: a cache entry's name taken by a folder without tokenizer_config.json was rmtree'd."""
  path = gguf.smollm2_path()
  entry = tmp_path / f"{os.path.splitext(os.path.basename(path))[0]}-{_digest(path)}"
  entry.mkdir()
  (entry / "model.safetensors").write_text("the user's, not a conversion")
  (entry / "thesis.tex").write_text("irreplaceable")
  before = tree_snapshot(tmp_path)
  with pytest.raises(ValueError, match="holds thesis.tex, which lorax_jax did not write"):
    gguf.load_gguf(path, cache=str(tmp_path))
  assert tree_snapshot(tmp_path) == before
  with pytest.raises(ValueError, match="cache is an empty path"):
    gguf.load_gguf(path, cache="")


def _digest(path: str) -> str:
  import hashlib
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()[:20]


def test_a_file_that_appears_during_a_save_is_kept(tmp_path):
  """The old version swapped out is emptied by name: a file put into the destination after the
  check (a race) is left in the hidden sibling and named in a warning, never deleted."""
  target = tmp_path / "adapter"
  write_dir_atomic(str(target), {"a.txt": lambda p: pathlib.Path(p).write_text("1")})

  def racing_writer(p):
    (target / "late.txt").write_text("the user's")
    pathlib.Path(p).write_text("2")

  with pytest.warns(UserWarning, match="late.txt, which appeared during the save"):
    write_dir_atomic(str(target), {"a.txt": racing_writer})
  assert (target / "a.txt").read_text() == "2"
  (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(".adapter.tmp-")]
  assert [p.name for p in left.iterdir()] == ["late.txt"]


# Path strings built from components that stay inside the sandbox (the working directory is three
# levels deep, so at most three ".." reach its top).
COMPONENTS = st.sampled_from(["", ".", "..", "a", "b", "mine", "link", "sub", "work", "notes.txt", CONFIG])
PATHS = st.lists(COMPONENTS, min_size=0, max_size=3).map("/".join) | st.lists(COMPONENTS, max_size=3).map(
    lambda parts: "/".join(parts) + "/")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=PATHS)
def test_no_save_changes_a_file_it_did_not_write(tmp_path, monkeypatch, params, path):
  root = tmp_path / "box"
  if not root.exists():
    deep = root / "d1" / "d2" / "work"
    (deep / "sub").mkdir(parents=True)
    (root / "mine").mkdir()
    for folder in (deep, root / "mine", root / "d1"):
      (folder / "notes.txt").write_text(f"notes in {folder.name}")
      (folder / CONFIG).write_text("the user's own config")
    (deep / "link").symlink_to(root / "mine")
    (root / "home").mkdir()
  monkeypatch.chdir(root / "d1" / "d2" / "work")
  monkeypatch.setenv("HOME", str(root / "home"))
  user = {k: v for k, v in tree_snapshot(root).items() if v[0] != "dir"}
  cfg = make_cfg()
  try:
    save_adapter(path, random_lora(params, cfg), cfg, params, NET_MAP)
  except (ValueError, OSError):  # refused, or a path through a file ("notes.txt/a")
    pass
  after = tree_snapshot(root)
  for name, entry in user.items():
    written = os.path.basename(name) in (CONFIG, WEIGHTS) and _library_dir(root / os.path.dirname(name))
    assert written or after.get(name) == entry, f"save_adapter({path!r}) changed or removed {name}"


def _library_dir(directory) -> bool:
  """A directory holding an adapter's two files only: what save_adapter wrote."""
  return sorted(os.listdir(directory)) == sorted([CONFIG, WEIGHTS])


# ---- readers: regular files only, bounded ---------------------------------------------------------

HOSTILE_LOADS = """
import json, os, resource, signal, socket, sys, time
sys.setrecursionlimit(10000)
import jax, jax.numpy as jnp, numpy as np, yaml
from lorax_jax.io import load_adapter, load_kohya
from lorax_jax.apps import finetune, settings
from lorax_jax.models import gguf, hf, tokenizer
from test_io import Net, NET_MAP
params = Net().init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 6, 6, 3)))
saved, work = sys.argv[1], sys.argv[2]
os.chdir(work)  # socket paths are short relative names
load_adapter(saved, params, NET_MAP)  # warm: imports and traces done

def place(path, kind):
  if kind == "fifo":
    os.mkfifo(path)
  elif kind == "socket":
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    keep.append(s)
  elif kind == "sparse":
    with open(path, "wb") as f:
      f.truncate(2 * 2**30)
  else:
    os.symlink(kind, path)

def adapter_with(name, kind, i):
  d = f"a{i}"
  os.mkdir(d)
  for f in ("adapter_config.json", "adapter_model.safetensors"):
    if f == name:
      place(os.path.join(d, f), kind)
    else:
      os.symlink(os.path.join(saved, f), os.path.join(d, f))
  return d

def in_dir(name, kind, i):
  d = f"m{i}"
  os.mkdir(d)
  place(os.path.join(d, name), kind)
  return d

def alone(kind, i):
  place(f"f{i}", kind)
  return f"f{i}"

READERS = {
  "adapter_config": lambda k, i: load_adapter(adapter_with("adapter_config.json", k, i), params, NET_MAP),
  "adapter_weights": lambda k, i: load_adapter(adapter_with("adapter_model.safetensors", k, i), params, NET_MAP),
  "kohya": lambda k, i: load_kohya(alone(k, i), params, NET_MAP),
  "config.json": lambda k, i: hf.read_config(in_dir("config.json", k, i)),
  "tokenizer.json": lambda k, i: tokenizer.load_tokenizer(in_dir("tokenizer.json", k, i)),
  "data": lambda k, i: finetune.read_items(alone(k, i)),
  "settings": lambda k, i: settings.read_yaml(alone(k, i)),
  "checkpoint": lambda k, i: finetune.read_checkpoint(alone(k, i), None),
  "gguf": lambda k, i: gguf.read_gguf(alone(k, i)),
}
keep = []
def hung(*args):
  raise TimeoutError("hung")

signal.signal(signal.SIGALRM, hung)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
i = 0
for reader, call in READERS.items():
  for kind in ("fifo", "/dev/zero", "/dev/urandom", "socket", "sparse"):
    i += 1
    t = time.perf_counter()
    signal.alarm(20)
    try:
      call(kind, i)
      error = None
    except Exception as e:
      error = f"{type(e).__name__}: {e}"
    signal.alarm(0)
    print(json.dumps({"reader": reader, "kind": kind, "seconds": time.perf_counter() - t, "error": error}))
print(json.dumps({"growth_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}))
"""

EXPECTED = {"fifo": "is a FIFO (named pipe), not a regular file", "/dev/zero": "is a character device",
            "/dev/urandom": "is a character device", "socket": "is a socket, not a regular file"}


def run_python(code: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, capture_output=True,
                        timeout=600, **kwargs)


def test_readers_refuse_fifos_devices_sockets_and_huge_files_at_once(params, tmp_path):
  saved = tmp_path / "saved"
  cfg = make_cfg()
  save_adapter(str(saved), random_lora(params, cfg), cfg, params, NET_MAP)
  (tmp_path / "work").mkdir()
  out = run_python(HOSTILE_LOADS, str(saved), str(tmp_path / "work"), text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  *cases, total = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert len(cases) == 45
  for case in cases:
    print(case)
    assert case["error"] is not None, case
    assert "hung" not in case["error"] and case["seconds"] < 5, case
    assert "ValueError" in case["error"] or "SettingsError" in case["error"], case
    if case["kind"] in EXPECTED:
      assert EXPECTED[case["kind"]] in case["error"], case
    elif case["reader"] in ("adapter_config", "config.json", "tokenizer.json", "data", "settings"):
      assert "has 2,147,483,648 bytes, more than" in case["error"], case  # refused from its size
  assert total["growth_kb"] < 50 * 1024, f"peak memory grew by {total['growth_kb'] / 1024:.0f} MB"


def test_prompts_on_stdin_are_bounded():
  """Before: ``lorax-jax generate < /dev/zero`` read stdin without end."""
  with open("/dev/zero", "rb") as zero:
    out = run_python("import sys; from lorax_jax import cli; sys.exit(cli.main(['generate']))", stdin=zero,
                     text=True)
  assert out.returncode == 2 and "error: stdin holds more than" in out.stderr, out.stderr[-2000:]


# ---- what PEFT refuses, and the errors that name the mistake --------------------------------------

def edit_config(directory, **fields) -> None:
  path = directory / CONFIG
  path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize("fields, refused", [
    ({"target_modules": ["nope_proj"]}, True),
    ({"target_modules": "model\\.layers\\.\\d+\\.nope_proj"}, True),
    ({"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]}, True),
    ({"target_modules": ["q_proj", "nope_proj"]}, False),  # PEFT adapts what matches
    ({"target_modules": "all-linear"}, False),
])
def test_target_modules_matching_nothing_is_refused_as_peft_does(tmp_path, params, fields, refused):
  cfg = make_cfg()
  save_adapter(str(tmp_path), random_lora(params, cfg), cfg, params, NET_MAP)
  edit_config(tmp_path, **fields)
  if refused:
    with pytest.raises(ValueError, match=r"target_modules .* selects no module of these params; PEFT refuses "
                                         r"this adapter \(NoMatchingPeftModuleError"):
      load_adapter(str(tmp_path), params, NET_MAP)
  else:
    load_adapter(str(tmp_path), params, NET_MAP)
  peft_refuses = _peft_refuses(fields)
  if peft_refuses is not None:
    assert peft_refuses == refused


def _peft_refuses(fields) -> bool | None:
  """Whether PEFT's ``inject_adapter_in_model`` refuses these fields on the torch twin of ``Net``
  (None without torch and PEFT)."""
  try:
    import peft
    import torch
  except ImportError:
    return None
  if fields["target_modules"] == "all-linear":
    return None  # PEFT resolves it for transformers models only

  class Layer(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.q_proj, self.v_proj, self.o_proj = (torch.nn.Linear(8, 8) for _ in range(3))

  class Model(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.embed_tokens = torch.nn.Embedding(16, 8)
      self.layers = torch.nn.ModuleList([Layer(), Layer()])

  class Twin(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.model = Model()
      self.conv_in = torch.nn.Conv2d(3, 4, 3)

  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      peft.inject_adapter_in_model(peft.LoraConfig(r=2, **fields), Twin())
  except peft.utils.error.NoMatchingPeftModuleError:
    return True
  return False


def test_unmatched_pattern_keys_warn(tmp_path, params):
  with pytest.warns(UserWarning, match=r"LoraConfig.rank_pattern keys \['q_projj'\] match no LoRA target"):
    lorax_jax.find_targets(params, lorax_jax.LoraConfig(targets=["q_proj"], rank_pattern={"q_projj": 4}))
  with pytest.warns(UserWarning, match=r"LoraConfig.alpha_pattern keys \['conv'\] match no LoRA target"):
    lorax_jax.find_targets(params, lorax_jax.LoraConfig(targets=["q_proj"], alpha_pattern={"conv": 4.0}))
  cfg = make_cfg()
  save_adapter(str(tmp_path), random_lora(params, cfg), cfg, params, NET_MAP)
  edit_config(tmp_path, rank_pattern={**json.loads((tmp_path / CONFIG).read_text())["rank_pattern"], "qq_proj": 4})
  with pytest.warns(UserWarning, match=r"rank_pattern keys \['qq_proj'\] match no adapted module and are ignored"):
    load_adapter(str(tmp_path), params, NET_MAP)
  with warnings.catch_warnings():  # the control: every key matches
    warnings.simplefilter("error")
    lorax_jax.find_targets(params, make_cfg())


@pytest.mark.parametrize("call, message", [
    (lambda p, l, c: lorax_jax.split_params(["abcdefgh"], c), r"tree must be a mapping \(.*\), got list"),
    (lambda p, l, c: lorax_jax.split_params(p, l), r"cfg must be a LoraConfig, got dict"),
    (lambda p, l, c: lorax_jax.split_params({"params": {"q": {"kernel": jnp.zeros((2, 2)), "lora": ["abcdefgh"]}}}, c),
     r"params/q/lora must be a mapping"),
    (lambda p, l, c: lorax_jax.join_params(p, "abcdefgh"), r"lora must be a mapping \(the LoRA tree .*\), got str"),
])
def test_tree_arguments_that_are_not_mappings_are_named(params, call, message):
  cfg = lorax_jax.LoraConfig(targets=["q_proj"])
  with pytest.raises(TypeError, match=message):
    call(params, lorax_jax.init_lora(params, cfg, jax.random.key(0)), cfg)


@pytest.mark.parametrize("rng", [0, np.zeros(3, np.float32), "seed", jax.random.split(jax.random.key(0), 2)])
def test_rng_that_is_not_a_key_is_named(rng):
  from test_io import Block
  x = jnp.ones((1, 8))
  params = Block().init(jax.random.key(0), x)
  cfg = lorax_jax.LoraConfig(targets=["q_proj"], dropout=0.1)
  lora = lorax_jax.init_lora(params, cfg, jax.random.key(0))
  apply = lorax_jax.lora_transform(Block().apply, params, cfg)
  with pytest.raises(TypeError, match=r"rng must be a jax.random.key \(e.g. jax.random.key\(0\)"):
    apply(params, lora, x, rng=rng)
  for key in (jax.random.key(1), jax.random.PRNGKey(1), None):  # the controls
    apply(params, lora, x, rng=key)


def test_check_destination_returns_the_resolved_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "real").mkdir()
  (tmp_path / "ln").symlink_to(tmp_path / "real")
  assert check_destination("ln/adapter", [CONFIG]) == str(tmp_path / "real" / "adapter")
  (tmp_path / "real" / "adapter").mkdir()
  (tmp_path / "real" / "adapter" / f".tmp-{'0' * 16}-{CONFIG}").write_text("a crashed write's leftover")
  assert check_destination("ln/adapter", [CONFIG]) == str(tmp_path / "real" / "adapter")
  (tmp_path / "real" / "adapter" / "sub").mkdir()
  with pytest.raises(ValueError, match="holds sub, which lorax_jax did not write"):
    check_destination("ln/adapter", [CONFIG])
  with pytest.raises(ValueError, match="is a folder holding the working directory"):
    check_destination("/", [CONFIG])
  with pytest.raises(TypeError, match="must be a str or os.PathLike, got int"):
    check_destination(3, [CONFIG])
