"""The ASGI application: routes of every protocol over one set of loaded models."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from modelport.errors import ModelportError, Unavailable
from modelport.imaging import lower_priority
from modelport.model import Model
from modelport.server import kserve, tfserving, upload
from modelport.server.config import ServerConfig
from modelport.server.http import ClientGone, error_response, internal_error
from modelport.server.limits import BodyLimit
from modelport.server.metrics import CONTENT_TYPE, Metrics
from modelport.server.observe import Observe
from modelport.service import ModelService, ModelSet

logger = logging.getLogger("modelport.server")


async def metrics_endpoint(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


async def _modelport_error(request: Request, exc: ModelportError) -> Response:
    return error_response(exc)


async def _client_gone(request: Request, exc: ClientGone) -> Response:
    return Response(status_code=499)  # nobody reads it; logged in metrics as 499, nginx's "client closed"


def create_app(bundles: dict[str, Path] | Callable[[], dict[str, Path]], config: ServerConfig) -> Starlette:
    """``bundles``: model name -> version directory, or a function that finds them (run at start-up,
    off the event loop, so that building the default model does not delay the health endpoints)."""
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        decode_pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="decode",
                                         initializer=lower_priority)
        loading = asyncio.get_running_loop().create_task(_load(app, bundles, config, decode_pool, metrics))
        rpc = None
        if config.zmq_port is not None:
            from modelport.rpc import RpcServer

            rpc = RpcServer(lambda: app.state.models, address=f"tcp://{config.host}:{config.zmq_port}",
                            max_body_bytes=config.max_body_bytes, timeout_ms=config.timeout_ms, metrics=metrics)
            rpc.start()
            logger.info("ZeroMQ on %s", rpc.address)
        try:
            yield
        finally:
            # Shutdown order: not ready -> (uvicorn has stopped accepting and finished in-flight
            # HTTP requests) -> ZeroMQ stops taking requests and finishes its own -> drain every
            # batcher -> unload models.
            app.state.ready = False
            if rpc is not None:
                await rpc.close(config.exit_timeout_s)
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await loading
            for service in app.state.models:
                await service.close()
            decode_pool.shutdown(wait=True)

    routes = [Route("/", upload.predict, methods=["POST"]),
              Route("/metrics", metrics_endpoint),
              *kserve.routes(), *tfserving.routes()]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(Observe, metrics=metrics), Middleware(BodyLimit, max_body_bytes=config.max_body_bytes)],
        exception_handlers={ModelportError: _modelport_error, ClientGone: _client_gone, Exception: internal_error},
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.metrics = metrics
    app.state.models = _Loading()
    app.state.ready = False
    return app


async def _load(app: Starlette, bundles, config: ServerConfig, decode_pool, metrics: Metrics) -> None:
    loop = asyncio.get_running_loop()
    try:
        found = bundles if isinstance(bundles, dict) else await loop.run_in_executor(None, bundles)
        models = ModelSet()
        for name, path in found.items():
            model = await loop.run_in_executor(None, lambda: Model.load(path, name=name, threads=config.runtime_threads))
            serving = model.bundle.serving
            overrides = {k: v for k, v in vars(config.batching).items() if v is not None}
            service = ModelService(model, decode_pool=decode_pool, serving=replace(serving, **overrides),
                                   max_pixels=config.max_pixels, observer=metrics)
            service.start()
            metrics.queue_depth.labels(service.name).set_function(lambda b=service.batcher: b.queued)
            models.add(service)
            logger.info("loaded %s version %s from %s", service.name, service.version, path)
    except Exception as exc:
        if isinstance(exc, ModelportError):
            logger.error("cannot start: %s", exc.message)
        else:
            logger.exception("loading models failed")
        app.state.load_failed = True
        if stop := getattr(app.state, "stop", None):
            stop()
        return
    app.state.models = models
    app.state.ready = True
    logger.info("ready: %d model(s)", len(models))


class _Loading(ModelSet):
    """Stands in for the models while they load: every model request gets 503 + Retry-After."""

    def get(self, name, version=None):
        raise Unavailable("models are still loading", retry_after_s=1)

    def default(self):
        raise Unavailable("models are still loading", retry_after_s=1)
