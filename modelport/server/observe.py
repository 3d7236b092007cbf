"""Per-request metrics and headers (ASGI middleware): status, latency, model, Server-Timing."""

from __future__ import annotations

import time

from modelport.server.metrics import Metrics


def _protocol(path: str) -> str:
    if path.startswith("/v2"):
        return "kserve"
    if path.startswith("/v1"):
        return "tfserving"
    if path == "/":
        return "upload"
    return "other"


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
                extra = [self.worker]
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

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, observed_send)
        finally:
            self.metrics.in_flight.dec()
            model = state.get("model")
            if model is not None:  # only model requests: health checks and metrics scrapes are noise
                self.metrics.observe_request(model, state["version"], _protocol(scope["path"]), status,
                                             time.monotonic() - start)
