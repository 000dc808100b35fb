"""Stage configs: one dataclass per stage, read from YAML and `--key value` overrides.

Every field is declared with `option(default, help, ...)`, with its range or choices; the CLI's
--help and the README's field tables are generated from those declarations, so they cannot drift.
Unknown keys, duplicate YAML keys, values of the wrong type (a float for an integer) or out of
range are errors that name the key, raised when the config is built, before anything loads; each
config then checks its own arithmetic.
"""
import dataclasses
import math
import types
import typing
from pathlib import Path

import yaml

from rlhf_fast.errors import ConfigError


def option(default, help: str, *, min=None, max=None, above=None, below=None, choices=None,
           before=dataclasses.MISSING):
    """A config field with its one-line documentation and the values it takes: min / max
    inclusive bounds, above / below exclusive ones, or a tuple of choices. before: the value that
    behaves as runs did before the option existed, where that is not its default (a checkpoint
    written then resumes only with that value; training.config.TrainConfig.settings_before_options)."""
    checks = {k: v for k, v in (("min", min), ("max", max), ("above", above), ("below", below),
                                ("choices", choices)) if v is not None}
    metadata = {"help": help, "checks": checks}
    if before is not dataclasses.MISSING:
        if choices is not None and before not in choices:
            raise ValueError(f"option before={before!r} is not one of its choices {choices}")
        metadata["before"] = before
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _check_value(name: str, kind, value, checks: dict) -> None:
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{name}: expected int, got {value!r}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    bounds = (("min", lambda v, b: v >= b, ">="), ("max", lambda v, b: v <= b, "<="),
              ("above", lambda v, b: v > b, ">"), ("below", lambda v, b: v < b, "<"))
    for key, ok, sign in bounds:
        if key in checks and not ok(value, checks[key]):
            raise ConfigError(f"{name}: must be {sign} {checks[key]}, got {value!r}")
    if "choices" in checks and value not in checks["choices"]:
        raise ConfigError(f"{name}: must be one of {list(checks['choices'])}, got {value!r}")


def check_fields(config) -> None:
    """Every field's type and declared range; stages call it first in __post_init__, so a config
    built from Python is checked like one read from YAML or the command line."""
    types_by_name = _field_types(type(config))
    for f in dataclasses.fields(config):
        _check_value(f.name, types_by_name[f.name], getattr(config, f.name), f.metadata.get("checks", {}))


def _field_types(cls) -> dict:
    return typing.get_type_hints(cls)


def _coerce(name: str, kind, value):
    """Turn a YAML value or a command-line string into the field's declared type."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(name, args[0], value)
    if origin is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, str):  # "a,b" or a YAML flow list "[a, b]"
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(name, item, v) for v in value]
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        if kind is int and isinstance(value, float):
            raise ConfigError(f"{name}: expected int, got {value!r} (a float)")
        try:
            number = float(value) if kind is float else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}") from None
        return number
    if kind is str:
        return str(value)
    return value


def build_config(cls, values: dict, *, source: str = "config"):
    """Instantiate `cls` from a mapping, naming unknown keys and ill-typed values."""
    types_by_name = _field_types(cls)
    unknown = sorted(set(values) - set(types_by_name))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown} for {cls.__name__}; "
                          f"known keys: {sorted(types_by_name)}")
    coerced = {k: _coerce(f"{source}: {k}", types_by_name[k], v) for k, v in values.items()}
    return cls(**coerced)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a mapping with the same key twice (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1} "
                                  f"(first at line {seen[key]})")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(path) -> dict:
    """A YAML mapping from `path`; a missing file, a syntax error or a duplicate key is a
    ConfigError naming the file (and the line)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 ({e})") from None
    try:
        loaded = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: invalid YAML ({problem})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return loaded


def load_config(cls, path=None, overrides: dict | None = None):
    """YAML file (optional) updated by overrides, as a `cls` instance."""
    values = {}
    if path is not None:
        values.update(read_yaml(path))
    values.update(overrides or {})
    return build_config(cls, values, source=str(path or "config"))


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def parse_overrides(args: list[str]) -> dict:
    """['--lr', '1e-4', '--lora_r=8'] -> {'lr': '1e-4', 'lora_r': '8'}; dashes become underscores."""
    overrides, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected --key value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"--{key} needs a value")
            value = args[i + 1]
            i += 1
        overrides[key.replace("-", "_")] = value
        i += 1
    return overrides


def describe(cls) -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) per field: the source of --help and the README tables."""
    rows = []
    types_by_name = _field_types(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = types_by_name[f.name]
        rows.append((f.name, getattr(kind, "__name__", str(kind)).replace("typing.", ""),
                     repr(default), f.metadata.get("help", "") + _range_text(f.metadata.get("checks", {}))))
    return rows


def _range_text(checks: dict) -> str:
    signs = {"min": ">=", "max": "<=", "above": ">", "below": "<"}
    parts = [f"{signs[k]} {v}" for k, v in checks.items() if k in signs]
    return f" ({', '.join(parts)})" if parts else ""


def markdown_table(cls) -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{n}` | {t} | `{d}` | {h} |" for n, t, d, h in describe(cls)]
    return "\n".join(lines)


def help_text(cls) -> str:
    width = max(len(n) for n, *_ in describe(cls)) + 2
    return "\n".join(f"  --{n:<{width}}{h} [{t}, default {d}]" for n, t, d, h in describe(cls))


def require(value: str, name: str, what: str) -> None:
    """A key that must be set (empty strings are the unset default)."""
    if not value:
        raise ConfigError(f"{name}: required; set it to {what}")


def check_divides(big: int, small: int, what: str) -> None:
    if small <= 0 or big % small:
        raise ConfigError(f"{what}: {big} is not a positive multiple of {small}")
