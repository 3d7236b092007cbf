"""An HTTP error reply -> the ``modelport.errors`` class a ZeroMQ reply of the same kind gives.

Our servers send ``{"error": ..., "kind": ...}``; another V2 or TF Serving server sends no kind (or
no JSON at all), so the status picks the closest kind.
"""

from __future__ import annotations

import json
from typing import Mapping

from modelport.errors import ModelportError
from modelport.protocol import wire

# For servers that send no "kind" (another V2 or TF Serving server): the closest kind by status.
_KIND_BY_STATUS = {400: "bad_input", 404: "not_found", 413: "too_large", 429: "quota_exceeded", 503: "unavailable",
                   504: "deadline_exceeded"}


def error_from_http(status: int, body: bytes, headers: Mapping[str, str]) -> ModelportError:
    """An HTTP error reply -> the same exception class a ZeroMQ reply of that kind gives."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        parsed = {"error": body.decode(errors="replace") or f"HTTP {status}"}
    return wire.error_from_wire({"kind": parsed.get("kind", _KIND_BY_STATUS.get(status, "internal")),
                                 "message": parsed.get("error", ""), "input": parsed.get("input"),
                                 "retry_after_s": float(headers.get("retry-after", 1))})
