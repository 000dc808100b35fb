"""Stage configs: one dataclass per stage, read from YAML and `--key value` overrides.

Every field is declared with `option(default, help)`; the CLI's --help and the README's field
tables are generated from those declarations, so they cannot drift. Unknown keys are an error
that names them, and each config checks its own arithmetic when it is built.
"""
import dataclasses
import types
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config that cannot run: unknown keys, a wrong type, inconsistent batch sizes."""


def option(default, help: str):
    """A config field with its one-line documentation."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


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
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
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


def load_config(cls, path=None, overrides: dict | None = None):
    """YAML file (optional) updated by overrides, as a `cls` instance."""
    values = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
        values.update(loaded)
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
                     repr(default), f.metadata.get("help", "")))
    return rows


def markdown_table(cls) -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{n}` | {t} | `{d}` | {h} |" for n, t, d, h in describe(cls)]
    return "\n".join(lines)


def help_text(cls) -> str:
    width = max(len(n) for n, *_ in describe(cls)) + 2
    return "\n".join(f"  --{n:<{width}}{h} [{t}, default {d}]" for n, t, d, h in describe(cls))


def check_divides(big: int, small: int, what: str) -> None:
    if small <= 0 or big % small:
        raise ConfigError(f"{what}: {big} is not a positive multiple of {small}")
