"""Settings from a TOML file, ``LOADER_*`` environment variables and flags, in rising precedence.

Every `ServerConfig` field can come from any of the three; `resolve` returns the config and,
for `--print-config`, where each value came from. Unknown keys are errors that name the key
and suggest the closest valid one. How a value is read comes from the field itself (its type,
or the `parse` of its `setting`); `format_config` writes TOML that `--config` reads back.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from loader_client.contract.errors import ConfigError
from loader_client.env import CLIENT_VARIABLES

from .config import ServerConfig
from .data.file_access import os_error

__all__ = ["ENV_PREFIX", "PARSERS", "format_config", "resolve"]

ENV_PREFIX = "LOADER_"
#: LOADER_* variables that belong to the client side, not to the server (a batch job hands one
#: environment to its loader and trainer steps alike).
_CLIENT_ENV = CLIENT_VARIABLES


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"expected a whole number, got {value!r}")
    return int(value)


def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse_optional(value: Any) -> Any:
        return None if value is None or str(value).strip() in ("", "none", "None", "auto") else parse(value)

    return parse_optional


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _parser(hint: Any, metadata: Mapping[str, Any]) -> Callable[[Any], Any]:
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0] if len(args) == 1 else hint
    parse: Callable[[Any], Any] | None = metadata.get("parse")
    if parse is None:
        parse = _BY_TYPE.get(hint, _str)
    return _optional(parse) if optional else parse


_BY_TYPE: dict[Any, Callable[[Any], Any]] = {bool: _bool, int: _int, float: _float}


def _parsers() -> dict[str, Callable[[Any], Any]]:
    hints = typing.get_type_hints(ServerConfig)
    return {f.name: _parser(hints[f.name], f.metadata) for f in dataclasses.fields(ServerConfig)}


#: How each setting's value is read from a flag, a variable or the TOML file, by setting name.
PARSERS = _parsers()


def _unknown(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, PARSERS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(PARSERS))}"
    return ConfigError(f"unknown setting {key!r} in {where}{hint}")


def _convert(key: str, value: Any, where: str) -> Any:
    try:
        return PARSERS[key](value)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: `{key}` = {value!r} is not valid ({exc})") from None


def resolve(flags: Mapping[str, Any], config_file: str | None = None,
            environ: Mapping[str, str] | None = None) -> tuple[ServerConfig, dict[str, str]]:
    """Defaults < TOML file < environment < flags; returns the config and each value's source."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {f.name: "default" for f in dataclasses.fields(ServerConfig)}
    if config_file:
        try:
            with open(config_file, "rb") as f:
                table = tomllib.load(f)
        except OSError as exc:
            raise os_error(exc, "--config file", config_file) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"--config {config_file}: not valid TOML: {exc}") from None
        table = table.get("serve", table) if isinstance(table.get("serve"), dict) else table
        for raw_key, value in table.items():
            key = raw_key.replace("-", "_")
            if key not in PARSERS:
                raise _unknown(raw_key, f"--config {config_file}")
            values[key] = _convert(key, value, f"{config_file}: {raw_key}")
            sources[key] = f"file {config_file}"
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name in _CLIENT_ENV:
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key not in PARSERS:
            raise _unknown(key, f"environment variable {name}")
        values[key] = _convert(key, value, f"environment variable {name}")
        sources[key] = f"env {name}"
    for key, value in flags.items():
        values[key] = _convert(key, value, f"--{key.replace('_', '-')}")
        sources[key] = f"flag --{key.replace('_', '-')}"
    if "data" not in values:
        raise ConfigError("no data set: pass --data PATH, set LOADER_DATA, or put `data = ...` in --config")
    return ServerConfig(**values), sources


def format_config(config: ServerConfig, sources: Mapping[str, str]) -> str:
    """TOML that `--config` reads back unchanged: one ``key = value  # source`` line per setting.

    Settings without a value (None) are written as comments, since TOML has no null. A URL's
    userinfo or presigned signature is not written (`redaction.redact`): give those from the
    environment or the original file again.
    """
    from .redaction import redact

    lines = []
    for f in dataclasses.fields(ServerConfig):
        value = getattr(config, f.name)
        source = sources.get(f.name, "default")
        if value is None:
            lines.append(f"# {f.name} = (not set)  # {source}")
            continue
        if f.metadata.get("format"):
            value = f.metadata["format"](value)
        lines.append(f"{f.name} = {_toml(redact(value) if isinstance(value, str) else value)}  # {source}")
    return "\n".join(lines)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        escaped = "".join(
            {"\\": "\\\\", '"': '\\"'}.get(c, c) if ord(c) >= 0x20 and ord(c) != 0x7F else f"\\u{ord(c):04x}"
            for c in value
        )
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")
