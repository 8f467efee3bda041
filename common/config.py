"""Config dataclasses <-> YAML + CLI overrides.

Every entry point has one dataclass at the top of its file. A YAML file is an instance of that dataclass (same keys);
`--field value` flags override any field. Unknown keys or flags are errors, values are checked against the field
type, fields marked required must be given, and the dataclass's `validate()` raises for invalid combinations:
nothing is silently rewritten (docs/PITFALLS.md#silent-rewrites).

    @dataclass
    class MyConfig:
        lr: float = cfg(1e-5, "peak learning rate")
        train_files: list[str] = cfg([], "data files", required=True)
        def validate(self): ...

    config = parse_config(MyConfig, sys.argv[1:])
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file, flag or combination of settings is invalid; the message says what to change.
    Entry points print it as one paragraph `config error: ...` and exit with status 2."""


class InputError(ValueError):
    """A data file is missing, empty, unreadable or holds records a trainer cannot use; the message starts with the
    file (and line or record: `FILE:LINE: ...`). Entry points print `input error: ...` and exit with status 2."""


def cfg(default: Any, help: str, required: bool = False) -> Any:
    """A dataclass field with a default and a one-line help text (shown by `--help`). `required`: the default is
    the empty value ("", [] or None) and a config must give it (build_config lists every missing one at once)."""
    meta = {"help": help, "required": required}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is None and hasattr(tp, "__name__"):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _parse_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
        return False
    raise ConfigError(f"{where}: expected a bool (true/false), got {value!r}")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert `value` (a YAML value or a CLI string) to the field type `tp`; raise ConfigError naming `where`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X] / X | None
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise ConfigError(f"{where}: unsupported union type {tp}")
        return coerce(value, inner[0], where)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("[]()").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}: {value!r}")
            return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return origin(coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is bool:
        return _parse_bool(value, where)
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected {tp.__name__}, got bool {value!r}")
        try:
            out = tp(value) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(out, float) and not out.is_integer():
            raise ConfigError(f"{where}: expected int, got {value!r}")
        if not isinstance(out, (int, float)):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return tp(out)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {tp}")


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def config_help(cls: type) -> str:
    """One line per field: name, type, default and help text."""
    lines = [f"{cls.__name__} options (YAML keys or --flags):"]
    for name, (f, tp) in _fields(cls).items():
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.metadata.get("required") or no_default:
            given = "REQUIRED"
        else:
            given = f"default {f.default if f.default is not dataclasses.MISSING else f.default_factory()!r}"
        lines.append(f"  --{name} ({_type_name(tp)}, {given}): {f.metadata.get('help', '')}")
    return "\n".join(lines)


def missing_required(cls: type, values: dict) -> list[str]:
    """'--name (help)' of every required field that `values` leaves out or empty."""
    out = []
    for name, (f, _) in _fields(cls).items():
        if f.metadata.get("required") and values.get(name) in (None, "", [], ()):
            out.append(f"--{name} ({f.metadata.get('help', '')})")
    return out


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing file or a non-mapping is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:  # yaml's own text spans several lines: keep the line and the problem
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{where}: invalid YAML: {what}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def _split_flags(argv: list[str]) -> list[tuple[str, str]]:
    """['--a', '1', '--b=2'] -> [('a', '1'), ('b', '2')]; a flag without a value is an error."""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options are --name value")
        if "=" in arg:
            name, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"flag {arg} needs a value")
            name, value = arg[2:], argv[i + 1]
            i += 2
        pairs.append((name.replace("-", "_"), value))
    return pairs


def build_config(cls: type, values: dict, source: str = "values") -> Any:
    """Make `cls(**values)` with type checking; unknown keys are a ConfigError naming the key and `source`."""
    fields = _fields(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown key {key!r} for {cls.__name__}; known keys: {sorted(fields)}")
        kwargs[key] = coerce(value, fields[key][1], f"{source}: {key}")
    missing = missing_required(cls, kwargs)
    if missing:
        raise ConfigError(f"missing required field{'s' * (len(missing) > 1)}: {'; '.join(missing)}. Give "
                          f"{'them' if len(missing) > 1 else 'it'} as --name value or as keys of a --config YAML "
                          f"file; --help lists every field")
    try:
        config = cls(**kwargs)
    except TypeError as e:  # a required field without a value
        raise ConfigError(f"{source}: {e}") from None
    if hasattr(config, "validate"):
        config.validate()
    return config


def parse_config(cls: type, argv: list[str] | None = None) -> Any:
    """`--config file.yaml` first, then `--field value` overrides, then `validate()`. `--help` prints the fields.

    A list field takes comma-separated values (`--files a,b`) or the flag repeated (`--files a --files b`); a flag
    replaces the YAML value rather than extending it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(config_help(cls))
        raise SystemExit(0)
    values: dict[str, Any] = {}
    pairs = _split_flags(argv)
    sources = {}
    for name, value in pairs:
        if name == "config":
            for key, v in load_yaml(value).items():
                values[key], sources[key] = v, value
    fields = _fields(cls)
    for name, value in pairs:
        if name == "config":
            continue
        if name not in fields:
            raise ConfigError(f"unknown flag --{name} for {cls.__name__}; run with --help to list the options")
        if typing.get_origin(fields[name][1]) is list and sources.get(name) == f"--{name}":
            values[name] = f"{values[name]},{value}"  # a list flag given several times collects its values
        else:
            values[name], sources[name] = value, f"--{name}"
    kwargs = {}
    for key, value in values.items():
        src = sources[key]
        if key not in fields:
            raise ConfigError(f"{src}: unknown key {key!r} for {cls.__name__}; known keys: {sorted(fields)}")
        kwargs[key] = coerce(value, fields[key][1], f"{src}: {key}")
    return build_config(cls, kwargs, source="config")


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically), so a run records exactly what it used."""
    from common.atomic import atomic_write_text

    data = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def error_text(e: ConfigError | InputError) -> str:
    """The one paragraph an entry point prints for a user mistake."""
    return f"{'input' if isinstance(e, InputError) else 'config'} error: {e}"


@contextlib.contextmanager
def user_errors() -> typing.Iterator[None]:
    """For entry points that do not go through common.run.run_main: a ConfigError or InputError becomes its one
    paragraph on stderr (`config error: ...` / `input error: ...`) and exit status 2, never a traceback."""
    try:
        yield
    except (ConfigError, InputError) as e:
        print(error_text(e), file=sys.stderr, flush=True)
        raise SystemExit(2) from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error style: a usage mistake is one `config error: ...` paragraph (naming the
    flag and pointing at --help) and exit status 2, instead of argparse's usage block."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"config error: {message}; run `{self.prog} --help` for the options", file=sys.stderr, flush=True)
        raise SystemExit(2)
