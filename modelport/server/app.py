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
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from modelport.errors import ModelportError
from modelport.engine.imaging import lower_priority
from modelport.memory import trim_when_idle
from modelport.engine.batching import Cores
from modelport.repository.bundle import Serving, load_bundle
from modelport.engine.model import Model
from modelport.server import demo, kserve, rollouts, tfserving, upload
from modelport.server.config import ServerConfig
from modelport.server.http import ClientGone, error_response, internal_error, json_response
from modelport.server.limits import BodyLimit
from modelport.server.metrics import CONTENT_TYPE, Metrics
from modelport.server.access import Access
from modelport.server.observe import Observe, load_now
from modelport.server.tenants import Tenants
from modelport.pipeline.config import PipelineConfig
from modelport.pipeline.service import PipelineService
from modelport.lifecycle.residency import Residency
from modelport.lifecycle.routing import RoutingTable
from modelport.lifecycle.states import State
from modelport.lifecycle.versions import VersionManager
from modelport.lifecycle.watcher import RepositoryWatcher
from modelport.engine.service import ModelService

logger = logging.getLogger("modelport.server")


async def metrics_endpoint(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


async def _modelport_error(request: Request, exc: ModelportError) -> Response:
    return error_response(exc)


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    # Starlette's own 404 (no such route) and 405, in the JSON error shape of every other error.
    # A path no route matches because it climbs out ("..") or hides a NUL is an attack on names,
    # answered as the bad input it is.
    segments = request.url.path.split("/")[1:-1]  # an empty one inside means "//": an absolute name
    if exc.status_code == 404 and (".." in segments or "" in segments or "\x00" in request.url.path):
        return json_response({"error": "invalid path: model names cannot be absolute or contain '..', '/' or NUL"}, 400)
    if exc.status_code == 404 and request.url.path.endswith("/") and request.url.path != "/":
        # Never a redirect to the path without the slash: a client that follows it re-sends a POST
        # as a GET, and an encoded slash ("0%2F") would be redirected to another resource.
        return json_response({"error": f"no endpoint at {request.url.path!r}: paths take no trailing slash, and "
                                       f"model names and versions cannot contain '/'"}, 404)
    return json_response({"error": exc.detail}, exc.status_code, exc.headers)


async def _client_gone(request: Request, exc: Exception) -> Response:
    if isinstance(exc, ClientDisconnect):  # left while sending its body: one line, not a traceback
        logger.info("client disconnected before its request body arrived: %s %s", request.method, request.url.path)
    return Response(status_code=499)  # nobody reads it; logged in metrics as 499, nginx's "client closed"


def _serving(app: Starlette) -> int:
    """The workers serving in this server's cluster (itself at least): what a tenant's quota is shared by."""
    if app.state.peers is None:
        return 1
    return max(1, sum(1 for m in app.state.peers.members.values() if m.state == "ready"))


def create_app(bundles: dict[str, Path] | Callable[[], dict[str, Path]] | None, config: ServerConfig, *,
               repository: Path | None = None, watch: bool = True) -> Starlette:
    """Serve fixed ``bundles`` (model name -> version directory, or a function that finds them,
    run at start-up off the event loop so that building the default model does not delay the
    health endpoints), or a ``repository`` directory kept in step by the version manager."""
    metrics = Metrics()
    routing = RoutingTable(observer=metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        decode_pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="decode",
                                         initializer=lower_priority)
        infer_pool = ThreadPoolExecutor(4, thread_name_prefix="infer")  # shared; one batch per model at a time
        cores = Cores()  # every model's batches: a full one runs alone among them all

        async def load(name: str, path: Path) -> ModelService:
            return await _load_service(name, path, config, decode_pool, infer_pool, metrics, cores)

        def load_pipeline(name: str, pipeline: PipelineConfig) -> PipelineService:
            return PipelineService(name, pipeline, routing, decode_pool=decode_pool, max_pixels=config.max_pixels,
                                   max_images=config.max_images_per_request, observer=metrics)

        if repository is not None:
            watcher = RepositoryWatcher(repository, settle_s=config.settle_s, poll_s=config.poll_s, watch=watch)
            residency = None
            if config.memory_budget_mb is not None:  # measured now: the server's base, before any model
                residency = Residency(int(config.memory_budget_mb * 2**20), routing, observer=metrics)
                metrics.follow_residency(residency)
            app.state.versions = VersionManager(watcher, routing, load, load_pipeline=load_pipeline, observer=metrics,
                                                residency=residency)
            loading = asyncio.get_running_loop().create_task(_follow_repository(app, app.state.versions))
        else:
            app.state.versions = None
            loading = asyncio.get_running_loop().create_task(_load_static(app, bundles, routing, load))
        trimming = asyncio.get_running_loop().create_task(trim_when_idle(
            lambda: not any(s.busy or s.queued for s in routing.services())))
        rpc = None
        if config.zmq_port is not None:
            from modelport.server.rpc import RpcServer

            port = config.zmq_port or "*"  # 0: any free port, advertised as the real one
            rpc = RpcServer(lambda: routing, address=f"tcp://{config.host}:{port}",
                            max_body_bytes=config.max_body_bytes, timeout_ms=config.timeout_ms, metrics=metrics,
                            load=lambda answering: load_now(app.state, answering), tenants=lambda: app.state.tenants)
            rpc.start()
            logger.info("ZeroMQ on %s", rpc.address)
        grpc_server = bound = None
        if config.grpc_port is not None:
            from modelport.server import grpc as grpc_front

            grpc_server, bound = await grpc_front.start(app.state, config.host, config.grpc_port, config.max_body_bytes)
            logger.info("gRPC on %s:%d", config.host, bound)
        app.state.membership = None
        if config.cluster is not None:
            from modelport.server.cluster import membership

            app.state.membership = membership(config, routing, rpc, bound)
            app.state.on_ready.append(app.state.membership.start)
            if app.state.tenants is not None:  # each worker enforces quota / the workers serving
                from modelport.cluster.members import ClusterURL, Directory

                app.state.peers = Directory(ClusterURL.parse(config.cluster))
                following = asyncio.get_running_loop().create_task(app.state.peers.run(), name="peers")
        try:
            yield
        finally:
            # Shutdown order: not ready -> (in a cluster: "draining" published, and served on
            # for drain_s so that balancers stop sending) -> (uvicorn has stopped accepting and
            # finished in-flight HTTP requests) -> ZeroMQ stops taking requests and finishes
            # its own -> leave the cluster (lease revoked: the key goes at once) -> stop
            # following the repository -> drain every batcher -> unload models.
            app.state.ready = False
            if grpc_server is not None:  # in-flight calls finish within the exit timeout
                await grpc_server.stop(config.exit_timeout_s)
            if rpc is not None:
                await rpc.close(config.exit_timeout_s)
            if app.state.membership is not None:
                await app.state.membership.leave()
            if app.state.peers is not None:
                following.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await following
                await app.state.peers.close()
            for task in (loading, trimming):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            for service in routing.services():
                await routing.retire(service.name, service.version)
            decode_pool.shutdown(wait=True)
            infer_pool.shutdown(wait=True)

    routes = [Route("/", upload.predict, methods=["POST"]), Route("/", demo.home, methods=["GET"]),
              Route("/metrics", metrics_endpoint),
              *kserve.routes(), *rollouts.routes(), *tfserving.routes()]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(Observe, metrics=metrics, worker_id=config.worker_id), Middleware(Access),
                    Middleware(BodyLimit, max_body_bytes=config.max_body_bytes)],
        exception_handlers={ModelportError: _modelport_error, ClientGone: _client_gone,
                            ClientDisconnect: _client_gone, HTTPException: _http_exception,
                            Exception: internal_error},
        lifespan=lifespan,
    )
    # A trailing slash (or an encoded one, "%2F", which arrives decoded) is answered 404 in our
    # error shape, never with Starlette's redirect (docs/decisions.md, "No redirects").
    app.router.redirect_slashes = False
    app.state.config = config
    app.state.metrics = metrics
    app.state.models = routing
    app.state.peers = None  # with --keys in a cluster: the member directory, for each tenant's share of its quota
    app.state.tenants = None if config.keys_file is None else Tenants(config.keys_file, share=lambda: _serving(app))
    app.state.ready = False
    app.state.on_ready = []  # called once every model is loaded and warm
    return app


def concurrent_batches(serving: Serving) -> int | None:
    """The setting, or None to let the model choose (``Model``); one batch at a time under a latency
    SLO unless set: the SLO planner predicts batches one after another (slo.py)."""
    if serving.concurrent_batches is None and serving.latency_slo_ms is not None:
        return 1
    return serving.concurrent_batches


async def _load_service(name: str, path: Path, config: ServerConfig, decode_pool, infer_pool,
                        metrics: Metrics, cores: Cores) -> ModelService:
    loop = asyncio.get_running_loop()
    bundle = await loop.run_in_executor(infer_pool, lambda: load_bundle(path, name=name))
    overrides = {k: v for k, v in vars(config.batching).items() if v is not None}
    batches = concurrent_batches(replace(bundle.serving, **overrides))
    model = await loop.run_in_executor(infer_pool, lambda: Model(
        bundle, threads=config.runtime_threads, device=config.device, concurrent_batches=batches,
        engine=config.engine, precision=config.precision))
    logger.info("model %s version %s runs on %s at %s: %s", name, bundle.version, model.engine, model.precision,
                model.precision_reason)
    service = ModelService(model, decode_pool=decode_pool, infer_pool=infer_pool,
                           serving=replace(model.bundle.serving, **overrides),
                           max_pixels=config.max_pixels, max_images=config.max_images_per_request,
                           observer=metrics, cores=cores)
    service.start()
    metrics.follow_batcher(service.name, service.version, service.batcher)
    return service


async def _load_static(app: Starlette, bundles, routing: RoutingTable, load) -> None:
    loop = asyncio.get_running_loop()
    try:
        found = bundles if isinstance(bundles, dict) else await loop.run_in_executor(None, bundles)
        for name, path in found.items():
            service = await load(name, path)
            routing.set_state(service.name, service.version, State.READY, service=service)
            logger.info("loaded %s version %s from %s", service.name, service.version, path)
    except Exception as exc:
        _start_failed(app, exc)
        return
    routing.ready = True
    _now_ready(app)
    logger.info("ready: %d model(s)", len(routing))


async def _follow_repository(app: Starlette, versions: VersionManager) -> None:
    try:
        await versions.load_initial()
    except Exception as exc:
        _start_failed(app, exc)
        return
    _now_ready(app)
    logger.info("ready: %d model version(s) from %s", len(versions.routing), versions.root)
    await versions.follow()


def _now_ready(app: Starlette) -> None:
    app.state.ready = True
    for hook in app.state.on_ready:
        hook()


def _start_failed(app: Starlette, exc: Exception) -> None:
    if isinstance(exc, ModelportError):
        logger.error("cannot start: %s", exc.message)
    else:
        logger.error("loading models failed", exc_info=exc)
    app.state.load_failed = True
    if stop := getattr(app.state, "stop", None):
        stop()
