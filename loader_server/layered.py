"""Settings from a TOML file, ``LOADER_*`` environment variables and flags, in rising precedence.

Every `ServerConfig` field can come from any of the three; `resolve` returns the config and,
for `--print-config`, where each value came from. Unknown keys are errors that name the key
and suggest the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

from loader_client.errors import ConfigError

from .config import ServerConfig, parse_max_bad, parse_size

__all__ = ["resolve", "ENV_PREFIX", "format_config"]

ENV_PREFIX = "LOADER_"
#: LOADER_* variables that belong to the client side, not to the server.
_CLIENT_ENV = {"LOADER_ENDPOINT"}


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _floats(value: Any) -> tuple[float, ...]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return tuple(float(v) for v in items)


def _size(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    return parse_size(str(value))


def _max_bad(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else parse_max_bad(str(value))


def _optional_int(value: Any) -> int | None:
    return None if value in (None, "", "none", "None", "auto") else int(value)


def _parsers() -> dict[str, Callable[[Any], Any]]:
    out: dict[str, Callable[[Any], Any]] = {}
    for f in dataclasses.fields(ServerConfig):
        kind = str(f.type)
        if f.name in ("sample_shape", "sample_dtype"):  # set from an array data set, not by users
            continue
        if f.name == "size":
            out[f.name] = _size
        elif f.name in ("mean", "std"):
            out[f.name] = _floats
        elif f.name == "max_bad":
            out[f.name] = _max_bad
        elif "int | None" in kind:
            out[f.name] = _optional_int
        elif kind == "bool":
            out[f.name] = _bool
        elif kind == "int":
            out[f.name] = int
        elif kind == "float":
            out[f.name] = float
        else:
            out[f.name] = str
    return out


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
            raise ConfigError(f"cannot read --config {config_file!r}: {exc.strerror}") from None
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
    """One `key = value  # source` line per setting, TOML-like, for --print-config."""
    lines = []
    for f in dataclasses.fields(ServerConfig):
        value = getattr(config, f.name)
        shown = list(value) if isinstance(value, tuple) else value
        lines.append(f"{f.name} = {shown!r}  # {sources.get(f.name, 'default')}")
    return "\n".join(lines)
