"""loader_server: reads a data set index and serves decoded image batches to loader clients.

The public names are loaded on first use (PEP 562), so ``import loader_server.config`` (or
``loader-server health``) does not load the server, its workers' pipeline and OpenCV.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import ServerConfig
    from .data.datasets import load_dataset
    from .data.index import DatasetIndex, load_index
    from .server import Server

__all__ = ["DatasetIndex", "Server", "ServerConfig", "load_dataset", "load_index"]

#: The module each public name comes from, imported when the name is first asked for.
_HOMES = {"DatasetIndex": ".data.index", "Server": ".server", "ServerConfig": ".config",
          "load_dataset": ".data.datasets", "load_index": ".data.index"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
