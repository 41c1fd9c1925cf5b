"""How an endpoint is written, for both ends: the hint for one given without its scheme.

The client checks the endpoints it is given (`loader_client.endpoints`), the server its ``bind``
(`loader_server.config`); both say the same thing about ``HOST:PORT`` written without ``tcp://``.
"""

from __future__ import annotations

import re

__all__ = ["missing_scheme_hint"]


def missing_scheme_hint(text: str) -> str:
    """`` (did you mean tcp://TEXT?)`` for a ``HOST:PORT`` given without its scheme, else empty."""
    return f" (did you mean tcp://{text}?)" if re.fullmatch(r"[^/]+:\d+", text) else ""
