"""Running the server under uvicorn, with modelport's shutdown order.

SIGTERM or SIGINT: report not ready -> (in a cluster: publish "draining" and keep serving for
``drain_s``, so that balancers and clients stop sending first) -> stop accepting -> finish
in-flight requests (at most ``exit_timeout_s``) -> leave the cluster -> drain batchers -> unload
-> exit 0. A second signal forces exit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import replace
from pathlib import Path
from typing import Callable

import uvicorn

from modelport import telemetry
from modelport.errors import ModelportError
from modelport.server.app import create_app
from modelport.server.cluster import worker_id
from modelport.server.config import ServerConfig
from modelport.server.connections import protocol_class

logger = logging.getLogger("modelport.server")


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame) -> None:
        # Readiness goes false at once, so a balancer stops sending before the listener closes.
        self._app.state.ready = False
        if self.should_exit or self._draining is not None:
            # The second signal, of either kind: leave now. A runtime call stuck in native code
            # would otherwise hold the interpreter's exit (it joins worker threads).
            logger.warning("second signal: forced exit")
            os._exit(1)
        membership = getattr(self._app.state, "membership", None)
        if membership is None or not membership.registered.is_set():
            self.should_exit = True
            return
        # The handler may run in the middle of a loop callback: start draining from the loop.
        loop = asyncio.get_running_loop()
        self._draining = True
        loop.call_soon_threadsafe(lambda: setattr(self, "_draining", loop.create_task(self._drain(membership))))

    _draining = None

    async def _drain(self, membership) -> None:
        drain_s = self._app.state.config.drain_s
        await membership.drain()
        logger.info("draining: serving on for %.1f s while balancers and clients stop sending", drain_s)
        await asyncio.sleep(drain_s)
        self.should_exit = True


def serve(bundles: dict[str, Path] | Callable[[], dict[str, Path]] | None, config: ServerConfig, *,
          repository: Path | None = None, watch: bool = True) -> None:
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The listening socket is bound here, before anything else: with --port 0 the real port is
    # known at once, names the worker and is what the cluster is told.
    listener = _bind(config.host, config.port)
    port = listener.getsockname()[1]
    config = replace(config, port=port, worker_id=config.worker_id or worker_id(port))
    logger.info("listening on %s:%d as worker %s", config.host, port, config.worker_id)
    if telemetry.configure(config.otlp_endpoint, config.trace_sample, service=f"modelport {config.worker_id}"):
        logger.info("tracing to %s", config.otlp_endpoint or "OTEL_EXPORTER_OTLP_ENDPOINT")
    app = create_app(bundles, config, repository=repository, watch=watch)
    uv_config = uvicorn.Config(
        app, host=config.host, port=config.port, loop="uvloop", lifespan="on",
        http=protocol_class(config.read_timeout_s, config.write_timeout_s),
        log_level=config.log_level, access_log=False, timeout_graceful_shutdown=config.exit_timeout_s,
        timeout_keep_alive=5, server_header=False,
        proxy_headers=False,  # nothing to trust on loopback; a balancer in front brings its own
    )
    server = _Server(uv_config, app)
    app.state.stop = lambda: setattr(server, "should_exit", True)
    try:
        server.run(sockets=[listener])
    finally:
        telemetry.shutdown()  # the spans still buffered go out
    if getattr(app.state, "load_failed", False):
        raise SystemExit(2)



def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise ModelportError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return listener
