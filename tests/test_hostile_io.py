"""Adapters on disk under hostile input and faults: crashes, concurrency, hostile headers and configs.

Every case here failed before the adapter directory became one unit and the loader checked
before it read (issue 9): each test says what it used to do.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lorax_jax import PathMap, find_targets
from lorax_jax.files import write_atomic, write_text_atomic
from lorax_jax.io import load_adapter, load_kohya, save_adapter
from test_io import CONFIG, NET_MAP, Q0_A, WEIGHTS, edit_weights, kohya_tensors, make_cfg, random_lora
from test_io import params, unet_params, UNET_MAP  # noqa: F401  (fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snapshot(directory) -> dict[str, bytes]:
  return {f: open(os.path.join(directory, f), "rb").read() for f in sorted(os.listdir(directory))}


def run_python(code: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
         "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, capture_output=True,
                        text=True, timeout=timeout)


# ---- one unit: crash at every step, concurrent writers and a reader ---------------------------

# A child that rewrites an adapter directory with the bytes of another one through the exact
# writer save_adapter uses, and SIGKILLs itself just before its k-th file-system operation
# (Python audit events: open, mkdir, rename, exchange, remove, ...). files.py is loaded
# alone (stdlib only) so that each of the many children starts in milliseconds.
KILL_AT = """
import importlib.util, os, signal, sys
spec = importlib.util.spec_from_file_location("files", sys.argv[1])
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
source, target, kill_at = sys.argv[2], sys.argv[3], int(sys.argv[4])
data = {f: open(os.path.join(source, f), "rb").read() for f in os.listdir(source)}
def writer(blob):
  def write(path):
    with open(path, "wb") as f:
      f.write(blob)
  return write
writers = {f: writer(blob) for f, blob in data.items()}
EVENTS = ("open", "os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.unlink", "shutil.rmtree",
          "lorax_jax.exchange", "os.symlink", "os.chmod")
count = 0
def hook(event, args):
  global count
  if event in EVENTS:
    if count == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)
    count += 1
sys.addaudithook(hook)
files.write_dir_atomic(target, writers)
"""


def test_sigkill_at_every_step_of_a_save(tmp_path, params):
  """Before: config and weights were renamed one after the other; a kill between them left the
  new config beside the old weights, and load_adapter took the pair."""
  old, new = tmp_path / "old", tmp_path / "new"
  cfg_old, cfg_new = make_cfg(), make_cfg(targets=["q_proj", "v_proj"])
  save_adapter(str(old), random_lora(params, cfg_old, seed=1), cfg_old, params, NET_MAP)
  save_adapter(str(new), random_lora(params, cfg_new, seed=2), cfg_new, params, NET_MAP)
  want_old, want_new = snapshot(old), snapshot(new)
  target = tmp_path / "work" / "adapter"
  files_py = os.path.join(ROOT, "lorax_jax", "files.py")
  outcomes = []
  for k in range(100):
    save_adapter(str(target), random_lora(params, cfg_old, seed=1), cfg_old, params, NET_MAP)
    assert snapshot(target) == want_old
    child = subprocess.run([sys.executable, "-c", KILL_AT, files_py, str(new), str(target), str(k)],
                           capture_output=True, timeout=60)
    now = snapshot(target)
    assert now in (want_old, want_new), f"killed at step {k}: a mixed directory"
    lora, cfg = load_adapter(str(target), params, NET_MAP)
    assert len(find_targets(params, cfg)) == (8 if now == want_old else 4)
    outcomes.append("old" if now == want_old else "new")
    if child.returncode == 0:
      break
    assert child.returncode == -signal.SIGKILL, child.stderr
  else:
    pytest.fail("the save never finished")
  assert k >= 8, f"only {k} steps seen: the audit hook missed the writer's operations"
  assert outcomes[-1] == "new" and outcomes[0] == "old"
  # The kill left at most hidden temporary siblings; never a file under the adapter's name.
  assert set(os.listdir(target)) == {CONFIG, WEIGHTS}


CONCURRENT = """
import os, sys, time
import numpy as np
import jax
import jax.numpy as jnp
from lorax_jax import LoraConfig, init_lora
from lorax_jax.io import load_adapter, save_adapter
from test_io import Net, NET_MAP
params = Net().init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 6, 6, 3)))
role, directory, rounds, sync = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
open(os.path.join(sync, role), "w").close()
while not {"writer1", "writer2", "reader"} - {role} <= set(os.listdir(sync)):  # start together
  time.sleep(0.01)
if role.startswith("writer"):
  i = int(role[-1])
  # Writer i: rank i, alpha i, every factor entry i: a mixed pair cannot pass the reader's check.
  cfg = LoraConfig(r=i, alpha=float(i), targets=["q_proj", "v_proj"])
  lora = jax.tree.map(lambda x: jnp.full(x.shape, float(i)), init_lora(params, cfg, jax.random.key(0)))
  n = 0
  while n < rounds or not os.path.exists(os.path.join(sync, "reader.done")):
    save_adapter(directory, lora, cfg, params, NET_MAP)
    n += 1
  print("saves", n)
else:
  seen = {}
  for _ in range(rounds):
    lora, cfg = load_adapter(directory, params, NET_MAP)
    values = {float(v) for leaf in jax.tree.leaves(lora) for v in np.unique(np.asarray(leaf))}
    assert values == {cfg.alpha} == {float(cfg.r)}, (values, cfg.alpha, cfg.r)
    seen[cfg.r] = seen.get(cfg.r, 0) + 1
  open(os.path.join(sync, "reader.done"), "w").close()
  print("loads by writer", seen)
"""


def test_two_writers_and_a_reader(tmp_path):
  """Before: two savers mixed the pair in a few percent of rounds, and a reader got a mismatched
  alpha and factors in about one load in ten. Writers save until the reader has loaded 200 times."""
  directory = str(tmp_path / "adapter")
  (tmp_path / "first").mkdir()  # one save first, alone: no one to wait for, nothing to outlast
  for name in ("writer2", "reader", "reader.done"):
    (tmp_path / "first" / name).touch()
  first = run_python(CONCURRENT, "writer1", directory, "1", str(tmp_path / "first"))
  assert first.returncode == 0, first.stderr
  (tmp_path / "sync").mkdir()
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(CONCURRENT), role, directory, "200",
                             str(tmp_path / "sync")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for role in ("writer1", "writer2", "reader")]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  print(*(out for out, _ in outs))
  assert set(os.listdir(directory)) == {CONFIG, WEIGHTS}


BETWEEN = """
import os, sys
import numpy as np
import jax
import jax.numpy as jnp
from lorax_jax import LoraConfig, init_lora
from lorax_jax.io import load_adapter, save_adapter
from test_io import Net, NET_MAP
params = Net().init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 6, 6, 3)))
directory = sys.argv[1]
io_dir = os.path.join(os.path.dirname(os.path.abspath(sys.argv[2])), "")

def adapter(i):  # rank i, alpha i, every factor entry i
  cfg = LoraConfig(r=i, alpha=float(i), targets=["q_proj", "v_proj"])
  return jax.tree.map(lambda x: jnp.full(x.shape, float(i)), init_lora(params, cfg, jax.random.key(0))), cfg

first, second = adapter(1), adapter(2)
state = {"at": None, "count": 0}

def profile(frame, event, arg):
  # The k-th call of a lorax_jax I/O function during load_adapter runs a whole save first.
  if state["at"] is not None and event == "call" and frame.f_code.co_filename.startswith(io_dir):
    if state["count"] == state["at"]:
      state["at"] = None
      save_adapter(directory, *second, params, NET_MAP)
    state["count"] += 1

k = 0
while True:
  save_adapter(directory, *first, params, NET_MAP)
  state.update(at=k, count=0)
  sys.setprofile(profile)
  try:
    lora, cfg = load_adapter(directory, params, NET_MAP)
  finally:
    sys.setprofile(None)
  fired, state["at"] = state["at"] is None, None
  values = {float(v) for leaf in jax.tree.leaves(lora) for v in np.unique(np.asarray(leaf))}
  assert values == {cfg.alpha} == {float(cfg.r)}, (k, values, cfg.alpha, cfg.r)
  if not fired:
    break
  k += 1
print("calls", k)
"""


def test_a_save_between_any_two_steps_of_a_load(tmp_path):
  """Deterministic reader/writer race: a whole save runs just before the k-th call of a lorax_jax
  I/O function inside load_adapter, for every k. Before: the config was read by name, then the
  weights by name, so a save in between paired the old config with the new factors."""
  import lorax_jax.io
  out = run_python(BETWEEN, str(tmp_path / "adapter"), lorax_jax.io.__file__)
  assert out.returncode == 0, out.stderr[-3000:]
  assert int(out.stdout.split("calls ")[1]) >= 10, out.stdout


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_permissions_follow_the_umask(tmp_path, params, umask):
  """Before: every file written through write_atomic was mode 0600 (mkstemp's)."""
  cfg = make_cfg()
  old = os.umask(umask)
  try:
    save_adapter(str(tmp_path / "a"), random_lora(params, cfg), cfg, params, NET_MAP)
    write_text_atomic(str(tmp_path / "t.txt"), "x")
    write_atomic(str(tmp_path / "b.bin"), lambda p: open(p, "wb").close())
  finally:
    os.umask(old)
  for f in (tmp_path / "a" / CONFIG, tmp_path / "a" / WEIGHTS, tmp_path / "t.txt", tmp_path / "b.bin"):
    assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
  assert (tmp_path / "a").stat().st_mode & 0o777 == 0o777 & ~umask


def test_save_refuses_to_replace_a_directory_with_other_files(tmp_path, params):
  cfg = make_cfg()
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match="holds notes.txt, which lorax_jax did not write"):
    save_adapter(str(tmp_path), random_lora(params, cfg), cfg, params, NET_MAP)
  assert (tmp_path / "notes.txt").read_text() == "mine"


# ---- a loader that checks before it reads ---------------------------------------------------

@pytest.fixture
def saved(tmp_path, params):
  cfg = make_cfg()
  save_adapter(str(tmp_path / "adapter"), random_lora(params, cfg), cfg, params, NET_MAP)
  return tmp_path / "adapter"


def write_raw_safetensors(path, header_json: str, data: bytes = b"", sparse_bytes: int = 0) -> None:
  """A safetensors file with a verbatim header (duplicate keys possible) and ``sparse_bytes`` of
  zeros after ``data`` that take no disk space."""
  blob = header_json.encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob + data)
    if sparse_bytes:
      f.truncate(8 + len(blob) + len(data) + sparse_bytes)


def header_entries(tensors: dict[str, np.ndarray]) -> tuple[list[str], bytes]:
  """Header entries (JSON text) and data of ``tensors`` (float32), laid out back to back."""
  entries, data = [], b""
  for k, v in tensors.items():
    blob = np.ascontiguousarray(v, np.float32).tobytes()
    entries.append(f'"{k}": {{"dtype": "F32", "shape": {list(v.shape)}, '
                   f'"data_offsets": [{len(data)}, {len(data) + len(blob)}]}}')
    data += blob
  return entries, data


PEAK = """
import resource, sys, time
import jax, jax.numpy as jnp
from lorax_jax.io import load_adapter
from test_io import Net, NET_MAP
params = Net().init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 6, 6, 3)))
load_adapter(sys.argv[1], params, NET_MAP)  # warm: every import and trace done
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
try:
  load_adapter(sys.argv[2], params, NET_MAP)
  print("LOADED")
except ValueError as e:
  print("REFUSED", str(e)[:300])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"PEAK_GROWTH_KB {after - before} SECONDS {time.perf_counter() - t:.3f}")
"""


def test_unexpected_1gib_tensor_refused_before_reading(saved, tmp_path):
  """Before: every tensor was read before the names were checked: 2.4 GB of RAM for a 4 KB file."""
  hostile = tmp_path / "hostile"
  hostile.mkdir()
  (hostile / CONFIG).write_bytes((saved / CONFIG).read_bytes())
  entries, data = header_entries(load_file(str(saved / WEIGHTS)))
  n = 2**28  # float32: 1 GiB
  key = "base_model.model.model.layers.0.q_proj.extra.weight"
  entries.append(f'"{key}": {{"dtype": "F32", "shape": [{n}], "data_offsets": [{len(data)}, {len(data) + 4 * n}]}}')
  write_raw_safetensors(hostile / WEIGHTS, "{" + ", ".join(entries) + "}", data, sparse_bytes=4 * n)
  assert os.stat(hostile / WEIGHTS).st_blocks * 512 < 2**20  # sparse: no space on disk
  out = run_python(PEAK, str(saved), str(hostile))
  assert out.returncode == 0, out.stderr[-3000:]
  print(out.stdout)
  assert f"REFUSED {hostile / WEIGHTS} has unexpected keys" in out.stdout and key in out.stdout
  growth_kb = int(out.stdout.split("PEAK_GROWTH_KB ")[1].split()[0])
  assert growth_kb < 200 * 1024, f"peak memory grew by {growth_kb / 1024:.0f} MB"


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.bool_, np.int32])
def test_integer_factors_refused(saved, params, dtype):
  """Before: int8, uint8 and bool factors loaded, cast to float32."""
  edit_weights(saved, lambda t: t.update({Q0_A: t[Q0_A].astype(dtype)}))
  with pytest.raises(ValueError, match=rf"must be floating point .*{Q0_A} \("):
    load_adapter(str(saved), params, NET_MAP)


def test_duplicate_header_key_refused(saved, params):
  """Before: a header naming a key twice loaded the later (int32) entry silently."""
  tensors = load_file(str(saved / WEIGHTS))
  entries, data = header_entries(tensors)
  dup = Q0_A
  shape = list(tensors[dup].shape)
  entries.append(f'"{dup}": {{"dtype": "I32", "shape": {shape}, '
                 f'"data_offsets": [{len(data)}, {len(data) + 4 * int(np.prod(shape))}]}}')
  write_raw_safetensors(saved / WEIGHTS, "{" + ", ".join(entries) + "}", data + bytes(4 * int(np.prod(shape))))
  with pytest.raises(ValueError, match=f"names '{dup}' twice"):
    load_adapter(str(saved), params, NET_MAP)


@pytest.mark.parametrize("header, match", [
    (lambda e, n: "{" + e + "}", None),  # the control: a well-formed file loads
    (lambda e, n: "[" + e + "]", "not valid JSON"),
    (lambda e, n: "{" + e.replace('"F32"', '"F99"', 1) + "}", "unknown dtype 'F99'"),
    (lambda e, n: "{" + e.replace('"shape": [', '"shape": [-1, ', 1) + "}", "not a list of non-negative"),
    (lambda e, n: "{" + e.replace('"data_offsets": [0, ', '"data_offsets": [4, ', 1) + "}", "data_offsets"),
    (lambda e, n: "{" + e + "}" + " " * n, "header length"),
])
def test_header_sanity(saved, params, header, match):
  entries, data = header_entries(load_file(str(saved / WEIGHTS)))
  text = header(", ".join(entries), len(data) + 100)
  blob = text.encode()
  with open(saved / WEIGHTS, "wb") as f:
    # a header length that overruns the file for the last case
    f.write(struct.pack("<Q", len(blob) if match != "header length" else len(blob) + len(data) + 1) + blob + data)
  if match is None:
    load_adapter(str(saved), params, NET_MAP)
  else:
    with pytest.raises(ValueError, match=match):
      load_adapter(str(saved), params, NET_MAP)


def edit_config_raw(directory, replace: str, by: str) -> None:
  text = (directory / CONFIG).read_text()
  assert replace in text
  (directory / CONFIG).write_text(text.replace(replace, by, 1))


@pytest.mark.parametrize("field, value, match", [
    ("r", '"abc"', "'r' is 'abc'; it must be a positive integer"),
    ("r", "null", "'r' is None; it must be a positive integer"),
    ("r", "1e400", "'r' is inf; it must be a positive integer"),
    ("r", "2.7", "'r' is 2.7; it must be a positive integer"),
    ("lora_alpha", '"big"', "'lora_alpha' is 'big'; it must be a finite number"),
    ("use_rslora", '"false"', "'use_rslora' is 'false'; it must be true or false"),
    ("rank_pattern", '"abc"', "'rank_pattern' is 'abc'; it must be an object"),
    ("rank_pattern", '{"q_proj": 2.5}', "'rank_pattern' is .*must be an object mapping module patterns to positive"),
    ("target_modules", "5", "'target_modules' is 5; it must be a string or a list"),
    ("rank_pattern", '{"(": 4}', "rank_pattern key '\\(' is not a valid regex"),
    ("lora_dropout", "1.5", "'lora_dropout' is 1.5"),
])
def test_config_fields_typed(saved, params, field, value, match):
  """Before: bare Python errors naming neither file nor field, or wrong values accepted
  (``use_rslora: "false"`` read as true, ``r: 2.7`` truncated to 2)."""
  config = json.loads((saved / CONFIG).read_text())
  config[field] = "PLACEHOLDER"
  (saved / CONFIG).write_text(json.dumps(config).replace('"PLACEHOLDER"', value))
  with pytest.raises(ValueError, match=match) as e:
    load_adapter(str(saved), params, NET_MAP)
  assert str(saved / CONFIG) in str(e.value)


def test_config_nested_too_deep(saved, params):
  """Before: RecursionError from the json module."""
  (saved / CONFIG).write_text("[" * 100_000 + "]" * 100_000)
  with pytest.raises(ValueError, match=f"{saved / CONFIG} is not valid JSON for an adapter config: nested"):
    load_adapter(str(saved), params, NET_MAP)


@pytest.mark.parametrize("pattern", ["(.*.*)*X", "(a|aa)+$", "(?:\\w+\\.?)*Z", ".*.*.*X"])
def test_catastrophic_patterns_refused(saved, params, pattern):
  """Before: ``{"rank_pattern": {"(.*.*)*X": 4}}`` ran > 25 s (exponential backtracking)."""
  config = json.loads((saved / CONFIG).read_text())
  config["rank_pattern"] = {pattern: 4, **config["rank_pattern"]}
  (saved / CONFIG).write_text(json.dumps(config))
  start = time.perf_counter()
  with pytest.raises(ValueError, match="rank_pattern key .* is refused: .* exponential time"):
    load_adapter(str(saved), params, NET_MAP)
  print(f"{pattern!r} refused in {time.perf_counter() - start:.3f} s")
  config["rank_pattern"] = {}
  config["target_modules"] = pattern
  (saved / CONFIG).write_text(json.dumps(config))
  if pattern != ".*.*.*X":  # three repeats are allowed in a full-matched target_modules
    with pytest.raises(ValueError, match="target_modules .* is refused"):
      load_adapter(str(saved), params, NET_MAP)


@pytest.mark.parametrize("pattern, rank", [
    ("q_proj", 4), ("layers\\.0\\.q_proj", 4), ("model.layers.0.q_proj", 4), (".*0\\.q_proj", 4),
    ("(q|v)_proj", 4), ("layers\\.\\d+\\.q_proj", 4), ("k_proj", None)])
def test_ordinary_patterns_keep_peft_semantics(saved, params, pattern, rank):
  """Ordinary keys still match as PEFT's ``re.match(rf"(.*\\.)?({key})$", name)``: the first
  matching key gives layer 0's q_proj its rank (then the file's shape decides)."""
  import re
  config = json.loads((saved / CONFIG).read_text())
  config["rank_pattern"] = {pattern: 4, **config["rank_pattern"]}
  (saved / CONFIG).write_text(json.dumps(config))
  peft_match = re.match(rf"(.*\.)?({pattern})$", "model.layers.0.q_proj") is not None
  assert peft_match == (rank is not None)
  if peft_match:
    with pytest.raises(ValueError, match=r"q_proj.lora_A.weight has shape \(2, 8\), expected \(4, 8\)"):
      load_adapter(str(saved), params, NET_MAP)
  else:
    load_adapter(str(saved), params, NET_MAP)


def test_unexpected_names_say_the_likely_cause(saved, params):
  with pytest.raises(ValueError, match="likely cause: the adapter was saved for another model or another layout"):
    load_adapter(str(saved), params)  # saved with HF names, loaded with Flax names


def test_prefixed_layout_is_recognised(saved, params):
  """A file whose every module name lacks (or has an extra) leading component loads (the bare
  ``BertModel`` layout; see test_peft for BERT itself)."""
  lora, cfg = load_adapter(str(saved), params, NET_MAP)
  stripped = PathMap(tuple((f, h.removeprefix("model."), k) for f, h, k in NET_MAP.rules))
  lora2, cfg2 = load_adapter(str(saved), params, stripped)
  assert cfg2 == cfg
  np.testing.assert_array_equal(lora2["params"]["layers_0"]["q_proj"]["kernel"]["a"],
                                lora["params"]["layers_0"]["q_proj"]["kernel"]["a"])


# ---- Kohya ------------------------------------------------------------------------------------

DOWN = "lora_unet_down_blocks_0_attentions_0_to_q.lora_down.weight"
ALPHA = "lora_unet_down_blocks_0_attentions_0_to_q.alpha"


@pytest.mark.parametrize("edit, kwargs, match", [
    (lambda t: t.update({ALPHA: np.array([1.0, 2.0], np.float32)}), {}, rf"each alpha one number; got {ALPHA}"),
    (lambda t: t.update({DOWN: np.array(1.0, np.float32)}), {}, rf"floating-point matrices .*{DOWN} \(F32, shape \[\]\)"),
    (lambda t: t.update({DOWN: t[DOWN].astype(np.int8)}), {}, rf"{DOWN} \(I8"),
    (lambda t: None, {"prefix_map": ["lora_unet_"]}, "prefix_map must map each Kohya prefix"),
    (lambda t: t.update({k.replace("lora_te_", "lora_te1_"): v for k, v in t.items() if k.startswith("lora_te_")}),
     {}, "one module under two prefixes: lora_te1_text_model_encoder_layers_0_self_attn_q_proj and lora_te_text"),
])
def test_kohya_hostile(tmp_path, unet_params, edit, kwargs, match):
  """Before: bare errors (IndexError, 'only size-1 arrays'), or, for one module under two
  prefixes, one factor set silently dropped."""
  tensors = kohya_tensors()
  edit(tensors)
  path = str(tmp_path / "lora.safetensors")
  save_file(tensors, path)
  with pytest.raises(ValueError, match=match):
    load_kohya(path, unet_params, UNET_MAP, **kwargs)
