r"""``adapter_config.json`` read with typed validation, and PEFT's module patterns matched safely.

Every field lorax_jax reads is checked for its JSON type and range; an error names the file
and the field. Patterns from the file (``target_modules`` / ``exclude_modules`` given as a
string, ``rank_pattern`` / ``alpha_pattern`` keys) are regexes in PEFT; Python's regex
engine backtracks, so a hostile pattern could take exponential time. Patterns are therefore
refused when they nest an unbounded repeat inside a repeated group (``(a+)*``, ``(.*.*)*``),
repeat an alternation (``(a|ab)*``), or hold more than `MAX_UNBOUNDED` unbounded repeats
(counting the ``(.*\.)?`` PEFT puts before a ``rank_pattern`` key); what is left matches
module names (tens of characters) in polynomial time of low degree.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from lorax_jax.config import BIAS_MODES

MAX_UNBOUNDED = 3
MAX_PATTERN_CHARS = 1000

# PEFT options that change what the adapter computes and that lorax_jax does not implement;
# each must be absent, null, false or empty. Those with a reason say why and what to do.
REFUSAL_REASONS = {
    "layer_replication": (
        "PEFT's layer_replication builds a deeper model than the checkpoint by repeating base layers (the "
        "repeats share their base weights, each has its own LoRA), so the adapter's module names index layers "
        "the checkpoint does not have; lorax_jax adapts the params tree it is given and never adds layers to "
        "a model. Merge it in PEFT (merge_and_unload) and save the deeper model, or build params with the "
        "replicated layers and load a copy of the adapter without that field"),
}
UNSUPPORTED = ("layer_replication", "use_qalora", "alora_invocation_tokens",
               "arrow_config", "use_bdlora", "monteclora_config", "kasa_config")
# init_lora_weights values that load: the plain ones apply to the base as it is; "pissa" and
# "olora" to a residual base re-derived from the original one (`load_adapter`). The others
# rewrite the base from data or randomness that cannot be re-derived (CorDA, LoRA-GA, LoftQ,
# "pissa_niter_K" with torch's unseeded sketch; MiCA is a variant).
LOADABLE_INITS = (True, False, "gaussian", "orthogonal", "eva", "pissa", "olora")
CONVERSION_RECIPE = (
    "PEFT rebuilds a modified base from such an adapter when it loads it, from data, quantisation or "
    "randomness that lorax_jax cannot re-derive (it re-derives PiSSA's and OLoRA's only). Convert it in PEFT to a plain LoRA of the original base: right after "
    "get_peft_model (before training) set peft_model.peft_config['default'].init_lora_weights = True, "
    "save_pretrained(initial_dir) and set it back; after training, save with "
    "peft_model.save_pretrained(out_dir, path_initial_model_for_weight_conversion=initial_dir) and load "
    "out_dir here")


def read_config(data: bytes, path: str) -> dict[str, Any]:
  """The validated ``adapter_config.json`` whose bytes are ``data`` (named ``path`` in errors).

  Raises:
    ValueError: invalid JSON (nesting too deep included), a field of the wrong type or out
      of range, a pattern that is not a valid or safe regex, an option lorax_jax cannot
      honour, an ``init_lora_weights`` whose base change cannot be re-derived (CorDA, LoftQ,
      LoRA-GA, MiCA, ``pissa_niter_K``; with PEFT's conversion recipe).
  """
  try:
    config = json.loads(data.decode("utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None
  except RecursionError:
    raise ValueError(f"{path} is not valid JSON for an adapter config: nested too deeply") from None
  if not isinstance(config, dict) or config.get("peft_type") != "LORA":
    got = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
    raise ValueError(f"{path}: peft_type is {got!r}; lorax_jax loads only LORA adapters")

  def field(name: str, ok: bool, want: str) -> None:
    if not ok:
      raise ValueError(f"{path}: field {name!r} is {_short(config.get(name))}; it must be {want}")

  for key in ("r", "lora_alpha"):
    if key not in config:
      raise ValueError(f"{path} has no field {key!r}")
  field("r", _is_int(config["r"]) and config["r"] >= 1, "a positive integer")
  field("lora_alpha", _is_number(config["lora_alpha"]), "a finite number")
  dropout = config.get("lora_dropout")
  field("lora_dropout", dropout is None or (_is_number(dropout) and 0 <= dropout < 1), "a number in [0, 1)")
  for key in ("use_rslora", "use_dora", "lora_bias", "fan_in_fan_out"):
    field(key, config.get(key) is None or isinstance(config[key], bool), "true or false")
  field("modules_to_save", config.get("modules_to_save") is None or _is_list(config["modules_to_save"], str),
        "a list of module names")
  for key in ("target_modules", "exclude_modules", "layers_pattern"):
    value = config.get(key)
    field(key, value is None or isinstance(value, str) or _is_list(value, str), "a string or a list of strings")
  field("target_parameters", config.get("target_parameters") is None or _is_list(config["target_parameters"], str),
        "a list of parameter names")
  tokens = config.get("trainable_token_indices")
  field("trainable_token_indices", tokens is None or _is_list(tokens, int) or (
      isinstance(tokens, dict) and all(_is_list(v, int) for v in tokens.values())),
        "a list of token indices or an object mapping module names to such lists")
  layers = config.get("layers_to_transform")
  field("layers_to_transform", layers is None or _is_int(layers) or _is_list(layers, int),
        "an integer or a list of integers")
  for key, check, want in (("rank_pattern", lambda v: _is_int(v) and v >= 1, "positive integers"),
                           ("alpha_pattern", _is_number, "finite numbers")):
    value = config.get(key)
    field(key, value is None or (isinstance(value, dict) and all(check(v) for v in value.values())),
          f"an object mapping module patterns to {want}")
    for pattern in value or {}:
      compile_pattern(pattern, f"{path}: {key} key", suffix=True)
  if isinstance(config.get("target_modules"), str):
    compile_pattern(config["target_modules"], f"{path}: target_modules")
  if isinstance(config.get("exclude_modules"), str):
    compile_pattern(config["exclude_modules"], f"{path}: exclude_modules")
  field("bias", config.get("bias", "none") in (None, *BIAS_MODES), f"one of {BIAS_MODES}")
  init = config.get("init_lora_weights", True)
  field("init_lora_weights", isinstance(init, (bool, str)), "true, false or a PEFT init name")
  if not any(init is v if isinstance(v, bool) else init == v for v in LOADABLE_INITS):
    raise ValueError(f"{path}: init_lora_weights={init!r} changes the base weights. {CONVERSION_RECIPE}")
  bad = [f"{k}={_short(config[k])}" for k in UNSUPPORTED if config.get(k) not in (None, False, [], {}, "")]
  for option, reason in REFUSAL_REASONS.items():
    if config.get(option) not in (None, False, [], {}, ""):
      raise ValueError(f"{path} uses {option}={_short(config[option])}, which lorax_jax refuses: {reason}")
  if bad:
    raise ValueError(f"{path} uses options lorax_jax cannot honour: {', '.join(bad)}")
  return config


def compile_pattern(pattern: str, where: str, suffix: bool = False) -> re.Pattern:
  """``pattern`` compiled, or a ValueError naming ``where`` when it is invalid or could backtrack
  catastrophically (see the module docstring). ``suffix``: it is a `lookup` key, matched behind
  PEFT's ``(.*\\.)?``, one more unbounded repeat."""
  if len(pattern) > MAX_PATTERN_CHARS:
    raise ValueError(f"{where} {pattern[:50]!r}... is longer than {MAX_PATTERN_CHARS} characters")
  try:
    compiled = re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{where} {pattern!r} is not a valid regex: {e}") from None
  risk = _backtracking_risk(pattern, MAX_UNBOUNDED - suffix)
  if risk:
    raise ValueError(f"{where} {pattern!r} is refused: {risk} can take exponential time to match; "
                     "name the modules literally or with a simpler pattern")
  return compiled


def matches(patterns: str | list[str] | None, name: str) -> bool:
  """PEFT's ``target_modules`` / ``exclude_modules`` test: a string full-matches ``name`` as a
  regex; a list holds ``name`` or a ``.``-suffix of it."""
  if not patterns:
    return False
  if isinstance(patterns, str):
    return re.fullmatch(patterns, name) is not None
  return name in patterns or any(name.endswith("." + p) for p in patterns)


def lookup(pattern: Mapping[str, Any] | None, name: str, default: Any) -> Any:
  """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key matching a ``.``-suffix of
  ``name`` (``re.match(rf"(.*\\.)?({key})$", name)``)."""
  for key, value in (pattern or {}).items():
    if re.match(rf"(.*\.)?({key})$", name):
      return value
  return default


def warn_unmatched(config: Mapping[str, Any], names: Iterable[str], path: str) -> None:
  """PEFT's warning for ``rank_pattern`` / ``alpha_pattern`` keys that match none of the adapted
  modules ``names`` (they are ignored: a typo, or an adapter for another model)."""
  names = list(names)
  for field in ("rank_pattern", "alpha_pattern"):
    unmatched = sorted(k for k in config.get(field) or {} if not any(lookup({k: 1}, n, None) for n in names))
    if unmatched:
      warnings.warn(f"{path}: {field} keys {unmatched} match no adapted module and are ignored", stacklevel=4)


def _backtracking_risk(pattern: str, max_unbounded: int) -> str | None:
  """Why ``pattern`` may backtrack catastrophically, or None (a conservative scan of its syntax)."""
  groups = [False]  # per open group: does it hold a repeat or an alternation?
  closed: bool | None = None  # the item just scanned was a group: did it hold one?
  unbounded, i = 0, 0
  while i < len(pattern):
    quantifier = _QUANTIFIER.match(pattern, i)
    if quantifier:
      text = quantifier.group()
      is_unbounded = text in ("*", "+") or text.endswith(",}")
      if closed and text != "?":
        return "a repeated group that itself repeats or alternates"
      unbounded += is_unbounded
      groups[-1] = True
      i = quantifier.end()
      i += i < len(pattern) and pattern[i] in "?+"  # lazy / possessive suffix
      closed = None
      continue
    c, closed = pattern[i], None
    if c == "\\":
      i += 2
    elif c == "[":
      j = i + 1 + (pattern[i + 1:i + 2] == "^")
      j += pattern[j:j + 1] == "]"
      while j < len(pattern) and pattern[j] != "]":
        j += 2 if pattern[j] == "\\" else 1
      i = j + 1
    elif c == "(":
      extension = _GROUP_EXTENSION.match(pattern, i + 1)
      if extension and extension.group().endswith(")"):  # (?i), (?P=name), (?#...): no group
        i = extension.end()
        continue
      groups.append(False)
      i = extension.end() if extension else i + 1
    elif c == ")":
      closed = groups.pop() if len(groups) > 1 else None
      groups[-1] = groups[-1] or bool(closed)
      i += 1
    else:
      groups[-1] = groups[-1] or c == "|"
      i += 1
  if unbounded > max_unbounded:
    return f"{unbounded} unbounded repeats (more than {max_unbounded})"
  return None


_QUANTIFIER = re.compile(r"\*|\+|\?|\{(\d+(,\d*)?|,\d+)\}")
_GROUP_EXTENSION = re.compile(r"\?(P<\w+>|P=\w+\)|<=|<!|[:=!>]|#[^)]*\)|[aiLmsux-]+[:)])")


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_list(x: Any, kind: type) -> bool:
  return isinstance(x, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in x)


def _short(x: Any) -> str:
  text = repr(x)
  return text if len(text) <= 80 else text[:77] + "..."
