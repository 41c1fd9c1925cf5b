"""What the commands share: flags built from the settings, their help, `serve`'s flags alone, OpenCV.

Below both the ``loader-server`` command line (cli.py) and the tools it runs (check.py,
cache_build.py, and loader_bench, which the command line loads by name): they all build their
flags here, so none of them imports another's module for them.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

from loader_client.contract.errors import ConfigError

from .config import ServerConfig

__all__ = ["HelpFormatter", "add_serve_arguments", "add_setting_arguments", "explicit_serve_flags", "require_opencv",
           "serve_parser"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each setting's default as its definition says (`shown_default` on the action).

    A flag that sets a boolean shows whether it is in effect by default (``on``/``off``), never
    the value of the setting it changes.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        shown = getattr(action, "shown_default", None)
        if shown is None:
            return super()._get_help_string(action)
        text = (action.help or "").replace("%", "%%")
        return f"{text} (default: {shown.replace('%', '%%')})" if shown else text


def add_setting_arguments(p: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    """One flag per ServerConfig setting in `names` (default: all), built from the field's definition."""
    fields = {f.name: f for f in dataclasses.fields(ServerConfig)}
    for name in fields if names is None else names:
        f = fields[name]
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None  # required: from the flag, the file or the environment
        if meta.get("flags"):  # booleans: each flag sets one value
            group = p.add_mutually_exclusive_group() if len(meta["flags"]) > 1 else p
            for flag, (value, text) in meta["flags"].items():
                action = group.add_argument(flag, dest=name, action="store_const", const=value, default=default,
                                            help=text)
                action.shown_default = "on" if value == default else "off"  # type: ignore[attr-defined]
            continue
        shown = meta.get("shown")
        if shown is None:
            shown = "" if default is None else str(default)
        action = p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=default, choices=meta.get("choices"),
                                metavar=meta.get("metavar"), help=meta["help"])
        action.shown_default = shown  # type: ignore[attr-defined]


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of every server setting; each can also come from --config or LOADER_<NAME>."""
    action = p.add_argument("--config", default=None, metavar="FILE",
                            help="TOML file of settings (keys as the flags, e.g. batch_size = 64); "
                                 "LOADER_<NAME> variables override it, flags override both")
    action.shown_default = ""  # type: ignore[attr-defined]
    action = p.add_argument("--print-config", action="store_true",
                            help="check the settings and the data set, print them as TOML (each with where it "
                                 "came from; --config reads it back), then exit")
    action.shown_default = "off"  # type: ignore[attr-defined]
    add_setting_arguments(p)


def serve_parser(prog: str = "loader-server serve") -> argparse.ArgumentParser:
    """The parser of `serve`'s flags alone (the ``serve`` command of the command line has the same)."""
    parser = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter,
                                     description="Serve batches of a data set until SIGINT or SIGTERM.")
    add_serve_arguments(parser)
    return parser


def explicit_serve_flags(argv: Sequence[str]) -> dict[str, Any]:
    """The settings given in `argv` (`serve`'s flags) themselves, so that file and environment can fill the rest."""
    from .layered import PARSERS

    parser = serve_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return {k: v for k, v in vars(parser.parse_args(argv)).items() if k in PARSERS}


def require_opencv(command: str) -> None:
    """Exit 2 with what to install when OpenCV (the server's decoder) cannot be imported.

    `serve`, `check` and `demo` import it here, in the process that forks the workers, as they
    always have: forked workers then start with the decoder already loaded.
    """
    try:
        import cv2  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"`loader-server {command}` decodes images with OpenCV, which cannot be imported here ({exc}): "
            "install the server with `python3 -m pip install \"loader-service[server]\"` (it adds "
            "opencv-python-headless), or `python3 -m pip install opencv-python` if you want the desktop build; "
            "never both"
        ) from None
