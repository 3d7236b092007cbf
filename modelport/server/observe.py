"""Per-request metrics and headers (ASGI middleware): status, latency, model, Server-Timing."""

from __future__ import annotations

import contextlib
import time

from modelport import telemetry
from modelport.protocol.load import HEADER, Load
from modelport.server.metrics import Metrics

_LOAD_HEADER = HEADER.encode()


def _protocol(path: str) -> str:
    if path.startswith("/v2"):
        return "kserve"
    if path.startswith("/v1"):
        return "tfserving"
    if path == "/":
        return "upload"
    return "other"


def _inference(scope) -> bool:
    """Requests that get a span: inference, not health checks, metadata or scrapes."""
    path = scope["path"]
    return scope["method"] == "POST" and (path == "/" or path.startswith(("/v2/models/", "/v1/models/")))


def _describe(span, model: str | None, version, status: int) -> None:
    """The request span's name and attributes, once the request knows its model (docs/tracing.md)."""
    if model is not None:
        span.update_name(f"modelport.request {model}")
        span.set_attribute("modelport.model", model)
        span.set_attribute("modelport.version", str(version))
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        telemetry.fail(span, f"HTTP {status}")


def load_now(state, answering: int) -> Load:
    """What this worker reports with an answer (protocol/load.py): inference requests in flight on
    every protocol besides the ``answering`` one(s), and those of them queued in its batchers."""
    in_flight = state.metrics.in_flight_now() - answering
    return Load(max(0, in_flight), sum(s.queued for s in state.models.services()))


class Observe:
    def __init__(self, app, metrics: Metrics, worker_id: str) -> None:
        self.app = app
        self.metrics = metrics
        self.worker = (b"x-modelport-worker", worker_id.encode())  # every response names its server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        state = scope.setdefault("state", {})
        status = 500

        async def observed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                load = load_now(scope["app"].state, answering=int(counted))
                extra = [self.worker, (_LOAD_HEADER, load.to_text().encode())]
                if "model" in state:
                    extra += [(b"x-model-name", state["model"].encode()),
                              (b"x-model-version", str(state["version"]).encode())]
                if "timing" in state:
                    timing = state["timing"]
                    extra.append((b"server-timing", timing.server_timing().encode()))
                    if timing.answered_by:  # a cascade: the step that answered, per image
                        extra.append((b"x-modelport-answered-by", ",".join(timing.answered_by).encode()))
                message = dict(message, headers=list(message.get("headers", [])) + extra)
            await send(message)

        counted = _inference(scope)  # the load a worker reports: model requests, not checks or scrapes
        if counted:
            self.metrics.in_flight.inc()
        traced = contextlib.nullcontext()
        if counted and telemetry.serving():
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            traced = telemetry.span("modelport.request", kind="server", parent=telemetry.extract(headers),
                                    attributes={"modelport.protocol": _protocol(scope["path"])})
        with traced as span:
            try:
                await self.app(scope, receive, observed_send)
            finally:
                if counted:
                    self.metrics.in_flight.dec()
                if "grant" in state:  # the tenant's request in flight is over
                    state["grant"].release()
                if "tenant" in state:
                    self.metrics.observe_tenant(state["tenant"].name, state.get("model", "-"), status)
                    if span is not None:
                        span.set_attribute("modelport.tenant", state["tenant"].name)
                model = state.get("model")
                if model is not None:  # only model requests: health checks and metrics scrapes are noise
                    self.metrics.observe_request(model, state["version"], _protocol(scope["path"]), status,
                                                 time.monotonic() - start)
                if span is not None:
                    _describe(span, model, state.get("version"), status)
