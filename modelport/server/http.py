"""What every HTTP endpoint shares: JSON bodies, deadlines, errors and the model headers."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Generic, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from modelport import untrusted
from modelport.errors import ModelportError
from modelport.server.config import ServerConfig
from modelport.engine.servable import Servable, Timing

logger = logging.getLogger("modelport.server")
T = TypeVar("T")

DEADLINE_HEADER = "x-request-timeout-ms"  # may only lower the server's default deadline


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(content, separators=(",", ":"), allow_nan=False).encode()
    return Response(body, status, headers=headers, media_type="application/json")


def error_response(exc: ModelportError) -> Response:
    return json_response(exc.body(), exc.status, exc.headers())


def internal_error(request: Request, exc: BaseException) -> Response:
    """A bug: the client gets a generic message and an id to quote; the log gets the traceback."""
    request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    logger.error("request %s %s %s failed", request_id, request.method, request.url.path, exc_info=exc)
    return json_response({"error": "internal error", "kind": "internal", "request_id": request_id}, 500)


def deadline(request: Request, config: ServerConfig, timing: Timing) -> float:
    timeout_ms = config.timeout_ms
    header = request.headers.get(DEADLINE_HEADER)
    if header is not None:
        timeout_ms = min(timeout_ms, untrusted.positive_number(header, DEADLINE_HEADER))
    return timing.arrived + timeout_ms / 1000


def begin(request: Request, service: Servable) -> Timing:
    """Mark the request as served by ``service``: the observing middleware reads this back."""
    timing = Timing()
    request.state.model = service.name
    request.state.version = service.version
    request.state.timing = timing
    return timing


@dataclass
class Started(Generic[T]):
    """A request past its start: the version that serves it, its body, its timing."""

    request: Request
    service: Servable
    body: T
    timing: Timing

    def deadline(self) -> float:
        # Computed when asked, not in start(): each protocol reads it where it always did, so a bad
        # X-Request-Timeout-Ms header and a bad body are reported in the same order as before.
        return deadline(self.request, self.request.app.state.config, self.timing)


async def start(request: Request, pick: Callable[..., Servable],
                read_body: Callable[[Request], Awaitable[T]]) -> Started[T]:
    """The start every inference endpoint shares: refuse early, read the body, pick the version.

    ``pick(routed=...)`` finds the model the request names; ``read_body`` reads (and may check)
    the body.
    """
    # Refuse an overloaded or unknown model before reading the body: under overload, reading and
    # parsing bodies that will be refused anyway would eat the CPU the accepted requests need.
    # Not a routing decision: a canary's pick is made once, below.
    tenant = request.scope.get("state", {}).get("tenant")
    if tenant is not None:  # the tenant's quota first: a tenant over it is refused without a look at the model
        request.state.grant = request.app.state.tenants.admit(tenant)
    pick(routed=False).admit()
    body = await read_body(request)
    # The version is picked after the body has arrived: a version switch during a slow upload
    # sends the request to the new version instead of failing it.
    service = pick(routed=True)
    return Started(request, service, body, begin(request, service))


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client goes away first.

    A cancelled request stays in the batcher's queue until its turn and is then skipped: a
    request nobody waits for is never computed. Call this after the body has been read.
    """
    current = asyncio.current_task()
    watcher = asyncio.ensure_future(_disconnected(request))
    watcher.add_done_callback(lambda w: None if w.cancelled() else current.cancel())
    try:
        return await work
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            raise ClientGone() from None
        raise
    finally:
        watcher.cancel()


class ClientGone(Exception):
    """The client disconnected; nobody will read the answer."""


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
