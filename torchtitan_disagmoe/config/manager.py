"""Load a JobConfig from a TOML job file and ``--section.key value`` overrides.

Precedence: CLI > TOML > dataclass defaults (as in torchtitan). Unknown sections or keys,
values of the wrong type and bad TOML are errors that name the key.

Why not torchtitan's ConfigManager: it validates through tyro against torchtitan's own
JobConfig, which has many keys this project does not implement (tensor parallelism,
float8, ...). Accepting those and ignoring them silently would mislead users, so we keep
a small loader over our own dataclasses with the same TOML and CLI syntax.
"""

import difflib
import types
import typing
from dataclasses import fields, is_dataclass, replace
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from .job_config import JobConfig


class ConfigError(ValueError):
    """A configuration problem, raised before any process group exists."""


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"{hint} Known: {sorted(choices)}"


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _coerce_number(key: str, value: Any, cast: type, what: str, accept: tuple[type, ...]) -> Any:
    """``value`` (TOML number or CLI string) as ``cast``; booleans are never numbers."""
    if isinstance(value, accept) and not isinstance(value, bool):
        return cast(value)
    if isinstance(value, str):
        try:
            return cast(value)
        except ValueError:
            pass
    raise ConfigError(f"{key} expects {what}, got {value!r}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a TOML value or CLI string to the field type ``tp``; ConfigError if not possible."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in options:
                return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot parse {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key} = {value!r} is not valid; allowed values: {list(allowed)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key} expects true or false, got {value!r}")
    if tp is int:
        return _coerce_number(key, value, int, "an integer", accept=(int,))
    if tp is float:
        return _coerce_number(key, value, float, "a number", accept=(int, float))
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} expects a string, got {value!r}")
    if origin is list:  # TOML array, or "a,b" on the command line
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ConfigError(f"{key} expects a list, got {value!r}")
        (item_type,) = typing.get_args(tp)
        return [_coerce(key, item, item_type) for item in items]
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _build_section(section_name: str, cls, values: dict[str, Any]):
    types_by_key = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types_by_key:
            raise ConfigError(
                f"unknown key '{section_name}.{key}'." + _suggest(key, list(types_by_key)))
        kwargs[key] = _coerce(f"{section_name}.{key}", value, types_by_key[key])
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def parse_cli_overrides(args: list[str]) -> dict[str, dict[str, str]]:
    """Parse ``--section.key value`` / ``--section.key=value`` into {section: {key: value}}.

    A key given without a value is read as ``true`` (``--compile.enable``).
    """
    overrides: dict[str, dict[str, str]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(
                f"cannot parse argument {arg!r}; overrides look like --section.key value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
                i += 1
            else:
                value = "true"
        section, _, key = name.partition(".")
        overrides.setdefault(section, {})[key.replace("-", "_")] = value
        i += 1
    return overrides


def load_job_config(args: list[str]) -> JobConfig:
    """Build the JobConfig from CLI arguments (which may name ``--job.config_file``).

    Args:
        args: the command line after the program name.

    Returns:
        The resolved JobConfig; cross-section checks need the world size and run later
        in ``JobConfig.validate``.
    """
    overrides = parse_cli_overrides(args)
    config_file = overrides.get("job", {}).get("config_file")
    merged: dict[str, dict[str, Any]] = {}
    if config_file:
        try:
            with open(config_file, "rb") as f:
                toml_values = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"job.config_file: no such file {config_file!r}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"job.config_file {config_file!r} is not valid TOML: {e}") from None
        for section, values in toml_values.items():
            if not isinstance(values, dict):
                raise ConfigError(
                    f"{config_file}: top-level key {section!r} must be a [section] table")
            merged[section] = dict(values)
    for section, values in overrides.items():
        merged.setdefault(section, {}).update(values)

    sections = _field_types(JobConfig)
    built = {}
    for section, values in merged.items():
        if section not in sections:
            raise ConfigError(f"unknown section [{section}]." + _suggest(section, list(sections)))
        built[section] = _build_section(section, sections[section], values)
    config = JobConfig(**built)
    assert is_dataclass(config)
    return config


def config_to_dict(config) -> dict[str, Any]:
    """Nested plain dict of a JobConfig (for printing and checkpoint metadata)."""
    return {f.name: {g.name: getattr(getattr(config, f.name), g.name)
                     for g in fields(getattr(config, f.name))}
            for f in fields(config)}


def with_overrides(config: JobConfig, **sections: dict[str, Any]) -> JobConfig:
    """A copy of ``config`` with some keys replaced, e.g. ``training={"steps": 3}`` (tests)."""
    updates = {name: replace(getattr(config, name), **values) for name, values in sections.items()}
    return replace(config, **updates)
