"""The request span of the ZeroMQ and gRPC front-ends (HTTP's is in ``observe.py``): it continues
the caller's trace from the ``traceparent`` the request carries (a frame field, gRPC metadata)."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

from modelport import telemetry


def traced_request(service, protocol: str, carrier: Callable[[], Iterable[tuple]]):
    """``modelport.request {model}`` around one request, when this server traces (else nothing).
    ``carrier()`` gives the request's (key, value) pairs; it is only read when tracing is on."""
    if not telemetry.serving():
        return contextlib.nullcontext()
    fields = {k: v for k, v in carrier() if k in ("traceparent", "tracestate") and isinstance(v, str)}
    return telemetry.span(f"modelport.request {service.name}", kind="server", parent=telemetry.extract(fields),
                          attributes={"modelport.model": service.name, "modelport.version": str(service.version),
                                      "modelport.protocol": protocol})
