"""OpenTelemetry tracing: W3C ``traceparent`` in and out, and spans, with the official SDK.

A server traces when ``serve --otlp-endpoint URL`` or the standard ``OTEL_EXPORTER_OTLP_ENDPOINT``
is set (``configure``): spans go to that OTLP/HTTP receiver in batches, sampled parent-based at
``--trace-sample`` (or as ``OTEL_TRACES_SAMPLER``/``_ARG`` say). Off, the request path makes no
span at all. The client uses whatever tracer provider its application set up (the global one):
its spans and the ``traceparent`` it sends continue the application's trace.

Span names and attributes are a contract: docs/tracing.md.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator, Mapping

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import Link, SpanKind, Status, StatusCode
except ImportError:  # the API is not installed: nothing is traced, nothing propagated
    trace = None

DEFAULT_SAMPLE = 0.01
_server_tracing = False  # configure() succeeded in this process
_provider = None


def configure(endpoint: str | None = None, sample: float | None = None, service: str = "modelport") -> bool:
    """Set up the SDK for this process when an endpoint is given or in the environment; True if on."""
    global _server_tracing, _provider
    env_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if endpoint is None and not env_endpoint:
        return False
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError:
        from modelport.errors import MissingExtra

        raise MissingExtra("tracing needs the tracing extra: pip install 'modelport[tracing]'") from None
    if "OTEL_TRACES_SAMPLER" in os.environ and sample is None:
        sampler = None  # the SDK reads OTEL_TRACES_SAMPLER and its argument itself
    else:
        sampler = ParentBased(TraceIdRatioBased(DEFAULT_SAMPLE if sample is None else sample))
    if endpoint is not None and not endpoint.rstrip("/").endswith("/v1/traces"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"  # a base URL, as OTEL_EXPORTER_OTLP_ENDPOINT is
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service)})
    _provider = TracerProvider(resource=resource, **({"sampler": sampler} if sampler is not None else {}))
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(_provider)
    _server_tracing = True
    return True


def shutdown() -> None:
    """Send what is buffered (at a server's exit)."""
    if _provider is not None:
        _provider.shutdown()


def serving() -> bool:
    """A server traces its requests only when configure() set tracing up."""
    return _server_tracing


def _tracer():
    return trace.get_tracer("modelport")


@contextlib.contextmanager
def span(name: str, *, kind: str = "internal", parent=None, links=(), attributes: Mapping | None = None,
         start_s: float | None = None) -> Iterator[object | None]:
    """A span as the current one for the block (None without the API). ``parent``: a context from
    ``extract``; ``links``: span contexts; ``start_s``: a ``time.monotonic()`` it began at."""
    if trace is None:
        yield None
        return
    kinds = {"internal": SpanKind.INTERNAL, "server": SpanKind.SERVER, "client": SpanKind.CLIENT}
    with _tracer().start_as_current_span(
            name, context=parent, kind=kinds[kind], links=[Link(c) for c in links if c is not None],
            attributes=dict(attributes or {}), start_time=None if start_s is None else _epoch_ns(start_s),
            record_exception=True, set_status_on_exception=True) as current:
        yield current


def interval(name: str, start_s: float, end_s: float, attributes: Mapping | None = None) -> None:
    """A span for a measured interval (``time.monotonic()`` ends), child of the current span
    (a traced server's engine only: elsewhere it returns at once)."""
    if not _server_tracing or not trace.get_current_span().is_recording():
        return
    done = _tracer().start_span(name, attributes=dict(attributes or {}), start_time=_epoch_ns(start_s))
    done.end(end_time=_epoch_ns(end_s))


@contextlib.contextmanager
def batch_span(name: str, requests: list, attributes: Mapping | None = None) -> Iterator[object | None]:
    """One span for a batch: in the trace of its first request, linked to every request in it."""
    requests = [r for r in requests if r is not None]
    if trace is None or not requests:
        yield None
        return
    parent = trace.set_span_in_context(trace.NonRecordingSpan(requests[0]))
    with span(name, parent=parent, links=requests, attributes=attributes) as current:
        yield current


def current_context():
    """The current span's context, to link a batch to its requests (None: a server not tracing)."""
    if not _server_tracing:
        return None
    context = trace.get_current_span().get_span_context()
    return context if context.is_valid else None


def extract(carrier: Mapping[str, str]):
    """The trace a request continues (its ``traceparent``), as a parent for ``span``."""
    return propagate.extract(carrier) if trace is not None else None


def inject(carrier: dict) -> dict:
    """Add the current trace's ``traceparent`` (and ``tracestate``) to outgoing headers or fields."""
    if trace is not None:
        propagate.inject(carrier)
    return carrier


def fail(current, message: str) -> None:
    """Mark a span as failed (an error answer, not an exception)."""
    if current is not None and trace is not None:
        current.set_status(Status(StatusCode.ERROR, message))


def _epoch_ns(monotonic_s: float) -> int:
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)
