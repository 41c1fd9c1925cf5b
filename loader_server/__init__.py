"""loader_server: reads a data set index and serves decoded image batches to loader clients."""

from .config import ServerConfig
from .data.datasets import load_dataset
from .data.index import DatasetIndex, load_index
from .server import Server

__all__ = ["ServerConfig", "DatasetIndex", "load_index", "load_dataset", "Server"]
