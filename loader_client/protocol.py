"""The wire framing's public module path; it lives in `loader_client.contract.protocol`.

``loader_client.protocol.describe_arrays`` and ``build_arrays`` (see README, "Dependencies,
and why") keep working for users; the package's own code imports the contract.
"""

from __future__ import annotations

from .contract.protocol import (
    ALLOWED_DTYPES,
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    build_arrays,
    check_version,
    describe_arrays,
    pack,
    unpack,
)

__all__ = [
    "ALLOWED_DTYPES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_HEADER_BYTES",
    "PROTOCOL_VERSION",
    "build_arrays",
    "check_version",
    "describe_arrays",
    "pack",
    "unpack",
]
