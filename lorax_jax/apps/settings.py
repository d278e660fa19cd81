"""Settings of the applications: a typed, frozen dataclass filled from YAML files and flags.

A run's settings are, in order: the packaged defaults (``configs/NAME.yaml``, packaged as ``lorax_jax/apps/configs``),
then ``--config FILE`` (a path, or the name of a packaged config such as ``pydoc``), then
``--key value`` flags. Every value is converted to its field's type (``int``, ``float``,
``str``, ``bool`` or ``tuple[str, ...]``) the same way whether it came from YAML or a flag, so
``--lr 3e-4`` is the float ``0.0003`` in every application. Floats must be finite.

Every mistake is a `SettingsError` (a ValueError) whose message is one line naming the
setting or the file and what to do.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from lorax_jax.files import MAX_CONFIG_BYTES, read_regular

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
T = TypeVar("T")
STRINGS = tuple[str, ...]


class SettingsError(ValueError):
  """A bad setting, flag or config file."""


class Parser(argparse.ArgumentParser):
  """argparse that raises `SettingsError` instead of printing usage and exiting."""

  def error(self, message: str) -> typing.NoReturn:
    raise SettingsError(message)


def config_path(name: str) -> str:
  """``name`` if it exists (`read_yaml` then refuses what is not a regular file), else the packaged
  ``configs/NAME.yaml``; SettingsError if neither."""
  if os.path.exists(name):
    return name
  packaged = os.path.join(CONFIG_DIR, f"{name}.yaml")
  if os.path.isfile(packaged):
    return packaged
  names = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))
  raise SettingsError(f"config file {name} does not exist (packaged configs: {', '.join(names)})")


def read_yaml(path: str) -> dict[str, Any]:
  """The mapping of settings in YAML file ``path`` (a regular file of at most `MAX_CONFIG_BYTES`).

  Raises:
    ValueError: not a regular file, or too large (`lorax_jax.files.read_regular`).
    SettingsError: not UTF-8 or not a YAML mapping.
  """
  import yaml

  data = read_regular(path, MAX_CONFIG_BYTES, "settings file")
  try:
    values = yaml.safe_load(data.decode("utf-8"))
  except (UnicodeDecodeError, yaml.YAMLError) as e:
    problem = "is not UTF-8 text" if isinstance(e, UnicodeDecodeError) else "is not valid YAML"
    raise SettingsError(f"config file {path} {problem} ({' '.join(str(e).split())}): "
                        "fix it or pass another --config") from None
  if values is None:
    return {}
  if not isinstance(values, dict):
    raise SettingsError(f"config file {path} must hold a mapping of settings (key: value lines), "
                        f"not a {type(values).__name__}")
  return values


def coerce(key: str, value: Any, kind: Any) -> Any:
  """``value`` (parsed YAML or a flag's text) as ``kind``; SettingsError naming ``key`` otherwise.

  Strings become numbers (``"3e-4"``: YAML 1.1 reads it as a string), one string a one-item
  tuple, list items strings.
  """
  scalar = isinstance(value, (str, int, float)) and not isinstance(value, bool)
  if kind == STRINGS:
    items = [] if value is None else [value] if scalar else value
    if isinstance(items, list) and all(isinstance(v, (str, int, float)) for v in items):
      return tuple(str(v) for v in items)
  elif kind is str and scalar:
    return str(value)
  elif kind is bool:
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
      return value.lower() == "true"
  elif kind is float and scalar:
    try:
      number = float(value)
    except ValueError:
      number = math.nan
    if math.isfinite(number):
      return number
  elif kind is int and scalar and not isinstance(value, float):  # 2.5 is not an integer
    try:
      return int(value)
    except ValueError:
      pass
  name = {float: "a finite number", int: "an integer", str: "a string", bool: "true or false"}.get(
      kind, "a string or a list of strings")
  raise SettingsError(f"setting {key} must be {name}, got {value!r}")


def _from_flag(text: str, kind: Any) -> Any:
  """A flag's value: its text, or for a list the YAML list it spells (``"[q_proj, v_proj]"``)."""
  if kind == STRINGS and text.lstrip().startswith("["):
    import yaml

    try:
      return yaml.safe_load(text)
    except yaml.YAMLError:
      raise SettingsError(f"{text!r} is not a YAML list such as [q_proj, v_proj]") from None
  return text


def parse(cls: type[T], defaults: str, argv: Sequence[str] | None, description: str,
          add_flags: Callable[[argparse.ArgumentParser], None] = lambda parser: None,
          ) -> tuple[T, argparse.Namespace]:
  """``(settings, args)``: a ``cls`` from the packaged config ``defaults``, ``--config`` and flags.

  Args:
    cls: a dataclass whose fields are the settings; its ``__post_init__`` checks their values.
    defaults: the name of the packaged config holding every field's default.
    argv: the command line (``sys.argv[1:]`` when None).
    description: the ``--help`` text.
    add_flags: adds the application's own flags (``--resume``); they come back in ``args``.

  Raises:
    SettingsError: an unknown flag or setting, a missing or unreadable config file, a value
      of the wrong type, or one that ``cls`` refuses.
  """
  fields = typing.get_type_hints(cls)
  parser = Parser(description=description, allow_abbrev=False)
  parser.add_argument("--config", help=f"YAML file (or packaged config name) layered on top of {defaults}")
  add_flags(parser)
  for key, kind in fields.items():  # a true/false setting's flag alone means true (--use_dora)
    parser.add_argument(f"--{key}", default=None, metavar="VALUE",
                        **({"nargs": "?", "const": "true"} if kind is bool else {}))
  args, unknown = parser.parse_known_args(argv)
  if unknown:
    raise SettingsError(f"unknown setting {unknown[0]} (valid: {', '.join('--' + k for k in fields)})")
  values = {}
  for path in [config_path(defaults)] + ([config_path(args.config)] if args.config else []):
    layer = read_yaml(path)
    bad = sorted(set(layer) - set(fields))
    if bad:
      raise SettingsError(f"config file {path}: unknown setting {', '.join(map(str, bad))} "
                          f"(valid: {', '.join(fields)})")
    values |= layer
  values |= {k: _from_flag(v, fields[k]) for k, v in vars(args).items() if k in fields and v is not None}
  missing = [k for k in fields if k not in values]
  if missing:
    raise SettingsError(f"no value for setting {', '.join(missing)}: add it to the config file or pass --{missing[0]}")
  try:
    settings = cls(**{k: coerce(k, values[k], kind) for k, kind in fields.items()})
  except SettingsError:
    raise
  except ValueError as e:
    raise SettingsError(" ".join(str(e).split())) from None
  return settings, args


def check(rules: Sequence[tuple[bool, str]]) -> None:
  """SettingsError with the message of the first rule that does not hold."""
  for ok, message in rules:
    if not ok:
      raise SettingsError(message)


def as_dict(settings: Any) -> dict[str, Any]:
  """The settings as plain YAML/JSON values (tuples as lists)."""
  return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()}


def lora_targets(targets: STRINGS) -> str | tuple[str, ...]:
  """A ``targets`` setting as `LoraConfig` takes it: ``["all-linear"]`` is ``"all-linear"``, any
  other list a tuple of module names (or regexes)."""
  return "all-linear" if targets == ("all-linear",) else targets
