"""The load a worker reports with every answer (in-band), on every protocol.

A worker's key in the member directory says what the worker *is*; how busy it is travels with
its answers instead, so that the directory's traffic does not grow with load (docs/cluster.md).
The form is ORCA's text header, as Envoy and vLLM write it, with two named metrics::

    endpoint-load-metrics: TEXT named_metrics.in_flight=3, named_metrics.queued=1

- HTTP: that response header, on every response (errors and health checks included).
- gRPC: the same key and value in the trailing metadata of every call.
- ZeroMQ: a ``load`` field in every reply, ``{"in_flight": 3, "queued": 1}``.

``in_flight`` counts the requests the worker holds (running or waiting) besides the one being
answered; ``queued``, those of them waiting in its batchers. Readers ignore metrics they do not know and
treat a report they cannot read as no report.
"""

from __future__ import annotations

from dataclasses import dataclass

HEADER = "endpoint-load-metrics"
_PREFIX = "TEXT "
_NAMES = {"named_metrics.in_flight": "in_flight", "named_metrics.queued": "queued"}


@dataclass(frozen=True)
class Load:
    in_flight: int = 0
    queued: int = 0

    def to_text(self) -> str:
        return f"{_PREFIX}named_metrics.in_flight={self.in_flight}, named_metrics.queued={self.queued}"

    def to_wire(self) -> dict[str, int]:
        return {"in_flight": self.in_flight, "queued": self.queued}


def from_text(text: str | None) -> Load | None:
    """The load in an ``endpoint-load-metrics`` value; None when there is none or it is not ours."""
    if not text or not text.startswith(_PREFIX) or len(text) > 1000:
        return None
    found: dict[str, int] = {}
    for item in text[len(_PREFIX):].split(","):
        name, _, value = item.strip().partition("=")
        if name in _NAMES:
            number = _count(value)
            if number is None:
                return None
            found[_NAMES[name]] = number
    return Load(**found) if found else None


def from_wire(value) -> Load | None:
    """The load in a ZeroMQ reply's ``load`` field; None when absent or malformed."""
    if not isinstance(value, dict):
        return None
    in_flight, queued = value.get("in_flight", 0), value.get("queued", 0)
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 10**9 for v in (in_flight, queued)):
        return None
    return Load(in_flight, queued)


def _count(text: str) -> int | None:
    try:
        number = float(text)  # ORCA's values are doubles: "3" and "3.0" alike
    except ValueError:
        return None
    return int(number) if 0 <= number < 1e9 else None
