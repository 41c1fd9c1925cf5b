"""Secrets out of what is shown: URLs in messages, log lines and ``--print-config``.

A URL may carry a password (``https://user:password@host/...``) or be presigned (its query
holds ``X-Amz-Signature``, ``X-Amz-Credential``, ``Signature``, ...): either is a credential
that must not reach a log collector or a trainer's terminal. `redact` is applied where text
leaves the server (the log formatters, the errors sent to clients, the command line's error
line, ``--print-config``) and where a data set names its samples and sources.
"""

from __future__ import annotations

import re

__all__ = ["redact"]


def redact(text: str) -> str:
    """`text` (a URL, or a message naming URLs) without secrets: a URL's userinfo (``user:password@``) and the
    query of a presigned URL (``X-Amz-Signature``, ``X-Amz-Credential``, ``Signature``, ...) are replaced."""
    return _URL.sub(_redact_url, text)


_URL = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)([^\s/?#'\"]*@)?([^\s?#'\"]*)(\?[^\s#'\"]*)?")
_SECRET_QUERY = re.compile(r"(?:^|[?&])(?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|"
                           r"awsaccesskeyid|sig|token|access_token)=", re.IGNORECASE)


def _redact_url(m: re.Match[str]) -> str:
    scheme, userinfo, rest, query = m.group(1), m.group(2), m.group(3), m.group(4)
    shown = scheme + ("***@" if userinfo else "") + rest
    if query:
        tail = query[len(query.rstrip(":,;.)")):]  # the message's punctuation after the URL stays
        shown += ("?<redacted>" + tail) if _SECRET_QUERY.search(query) else query
    return shown
