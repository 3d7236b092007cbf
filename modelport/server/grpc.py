"""``serve --grpc-port N``: the Open Inference Protocol over gRPC, as Triton and KServe serve it
(``inference.GRPCInferenceService``), beside HTTP on the same models, queues and limits.

The messages and the service stubs are the ones ``tritonclient[grpc]`` generates from Triton's
``grpc_service.proto`` (``protocol/grpc.py``). A call's gRPC deadline becomes the request's deadline
(never later than the server's own); a call cancelled while its request is queued is never
computed. Errors are gRPC status codes (``protocol.grpc.STATUS_BY_KIND``) with the same message and
``kind`` as over HTTP in the trailing metadata, and ``retry-after`` for UNAVAILABLE. The repository
RPCs need the admin token as ``authorization: Bearer <token>`` metadata.
"""

from __future__ import annotations

import asyncio
import functools
from contextvars import ContextVar
import logging
import time

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError

import modelport
from modelport.engine import priority
from modelport.engine.priority import Priority
from modelport.engine.servable import Servable, Timing
from modelport.errors import BadInput, ModelportError
from modelport.lifecycle.states import State
from modelport.protocol import grpc as codec
from modelport.protocol import v2
from modelport.protocol.load import HEADER
from modelport.server import kserve
from modelport.server.access import requested
from modelport.server.admin import check_token
from modelport.server.grpc_call import Method
from modelport.server.grpc_transport import Connection
from modelport.server.observe import load_now
from modelport.server.tenants import Tenant
from modelport.server.tracing import traced_request

logger = logging.getLogger("modelport.server")
PRIORITY_METADATA = "modelport-priority"  # lowers a call's class below its tenant's
_caller: ContextVar[str | None] = ContextVar("modelport_grpc_tenant", default=None)  # this call's tenant, for metrics
STREAM_IN_FLIGHT = 64  # requests of one ModelStreamInfer being worked on at once


class _Malformed:
    """What a message that does not parse becomes: the handler answers INVALID_ARGUMENT."""
    model_name = model_version = id = name = version = ""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def _lenient(message_class):
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError:
            return _Malformed(message_class.DESCRIPTOR.full_name)
    return parse


def _check_parsed(request) -> None:
    if isinstance(request, _Malformed):
        raise BadInput(f"the message is not a valid {request.type_name}")


def _answers(method):
    """Errors -> gRPC status codes with the error's kind; a bug -> INTERNAL, logged. An inference
    call is counted in the request metrics (protocol "grpc"), by the HTTP status of its outcome."""
    @functools.wraps(method)
    async def wrapper(self, request, context):
        started, version, status = time.monotonic(), None, 500
        _caller.set(None)
        try:
            _check_parsed(request)
            response = await method(self, request, context)
            version, status = getattr(response, "model_version", None), 200
            context.set_trailing_metadata([self._load()])
            return response
        except ModelportError as exc:
            status = exc.status
            await _abort(context, exc, self._load())
        except asyncio.CancelledError:
            status = 499
            raise
        except Exception:
            logger.exception("gRPC %s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            # Only models it serves: a name from a request is no metric label (unbounded series).
            if method.__name__ == "ModelInfer":
                self._observe(request, version, status, started)
                if _caller.get() is not None:
                    model = request.model_name if version is not None else "-"
                    self._metrics.observe_tenant(_caller.get(), model, status)
    return wrapper


async def _abort(context, exc: ModelportError, load: tuple[str, str]) -> None:
    metadata = [("kind", exc.kind), load]
    if hasattr(exc, "retry_after_s"):
        metadata.append(("retry-after", str(max(1, round(exc.retry_after_s)))))
    context.set_trailing_metadata(metadata)
    await context.abort(getattr(grpc.StatusCode, codec.status_of(exc)), exc.message)


def servicer_class():
    messages, stubs = codec.messages()

    class InferenceServicer(stubs.GRPCInferenceServiceServicer):
        def __init__(self, state) -> None:
            self._state = state  # the Starlette app's state: config, routing table, version manager, metrics
            self._metrics = state.metrics

        @property
        def _routing(self):
            return self._state.models

        # -- health and metadata --------------------------------------------------------------------

        @_answers
        async def ServerLive(self, request, context):
            return messages.ServerLiveResponse(live=True)

        @_answers
        async def ServerReady(self, request, context):
            return messages.ServerReadyResponse(ready=bool(self._state.ready))

        @_answers
        async def ModelReady(self, request, context):
            self._access(context, request.name)
            self._service(request.name, request.version)  # NOT_FOUND for an unknown model or version
            return messages.ModelReadyResponse(ready=bool(self._state.ready))

        @_answers
        async def ServerMetadata(self, request, context):
            return messages.ServerMetadataResponse(name="modelport", version=modelport.__version__,
                                                   extensions=kserve.EXTENSIONS)

        @_answers
        async def ModelMetadata(self, request, context):
            self._access(context, request.name)
            described = kserve.metadata(self._routing, self._service(request.name, request.version))
            return json_format.ParseDict(described, messages.ModelMetadataResponse(), ignore_unknown_fields=True)

        @_answers
        async def ModelStatistics(self, request, context):
            tenant = self._access(context, request.name) if request.name else self._tenant(context)
            services = ([self._service(request.name, request.version)] if request.name else
                        [s for s in self._routing if tenant is None or tenant.may_use(s.name)])
            return json_format.ParseDict({"model_stats": [kserve.stats(s) for s in services]},
                                         messages.ModelStatisticsResponse(), ignore_unknown_fields=True)

        # -- inference ------------------------------------------------------------------------------

        @_answers
        async def ModelInfer(self, request, context):
            self._metrics.in_flight.inc()  # beside HTTP's: the load a worker reports
            try:
                return await self._infer(request, context)
            finally:
                self._metrics.in_flight.dec()

        async def ModelStreamInfer(self, request_iterator, context):
            """Each request runs as it arrives; answers go back as they are ready (out of order,
            matched by ``id``), errors as ``error_message`` without ending the stream."""
            answers: asyncio.Queue = asyncio.Queue()
            tasks: set[asyncio.Task] = set()
            # At most this many requests of one stream in the works: a client that sends without
            # reading its answers is slowed down, not buffered without end.
            room = asyncio.Semaphore(STREAM_IN_FLIGHT)

            async def one(request):
                self._metrics.in_flight.inc()
                started, version, status = time.monotonic(), None, 500
                try:
                    response = await self._infer(request, context)
                    version, status = response.model_version, 200
                    await answers.put(messages.ModelStreamInferResponse(infer_response=response))
                except Exception as exc:
                    if isinstance(exc, ModelportError):
                        message, status = exc.message, exc.status
                    else:
                        logger.exception("gRPC stream request failed")
                        message = "internal error"
                    # Answers come back out of order: an error names its request too.
                    await answers.put(messages.ModelStreamInferResponse(
                        error_message=message, infer_response=messages.ModelInferResponse(
                            model_name=request.model_name, model_version=request.model_version, id=request.id)))
                finally:
                    self._metrics.in_flight.dec()
                    self._observe(request, version, status, started)
                    room.release()

            async def read():
                try:
                    async for request in request_iterator:
                        await room.acquire()
                        task = asyncio.ensure_future(one(request))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                    await asyncio.gather(*list(tasks), return_exceptions=True)
                finally:  # the client's end of the stream, or a message that broke it: answer what came
                    await answers.put(None)

            reader = asyncio.ensure_future(read())
            try:
                while (answer := await answers.get()) is not None:
                    yield answer
            finally:
                reader.cancel()
                for task in list(tasks):
                    task.cancel()

        async def _infer(self, request, context):
            _check_parsed(request)
            routing = self._routing
            tenant = self._access(context, request.model_name)
            grant = self._state.tenants.admit(tenant) if tenant is not None else None  # the quota, before the model
            try:
                return await self._admitted(routing, request, context)
            finally:
                if grant is not None:
                    grant.release()

        async def _admitted(self, routing, request, context):
            # Refuse before decoding anything (as over HTTP), then pick routed: a canary's pick, once.
            routing.get(request.model_name, request.model_version or None, routed=False).admit()
            service = routing.get(request.model_name, request.model_version or None, routed=True)
            with traced_request(service, "grpc", lambda: context.invocation_metadata() or ()):
                return await self._infer_with(service, request, context.time_remaining())

        async def _infer_with(self, service: Servable, request, remaining_s: float | None):
            timing = Timing()
            timeout_s = self._state.config.timeout_ms / 1000
            deadline = timing.arrived + (min(timeout_s, remaining_s) if remaining_s is not None else timeout_s)
            entry, raw = codec.request_input(request)
            name, value = v2.decode_input(entry, raw, service.model.input, model=service.name,
                                          check_rows=service.check_rows)
            asked = codec.requested_outputs(request, service.output_names)
            service.resolve_outputs([n for n, _ in asked])
            outputs = await kserve.run(service, name, value, deadline, timing)
            answers = [(n, outputs[n] if k is None else kserve.classification(service, outputs[n], k)) for n, k in asked]
            return codec.response(service.name, service.version, answers, request_id=request.id,
                                  answered_by=",".join(timing.answered_by))

        def _tenant(self, context, metadata: dict | None = None) -> Tenant | None:
            """With --keys: the caller's tenant (``authorization: Bearer <key>`` metadata), or 401."""
            tenants = self._state.tenants
            if tenants is None:
                return None
            metadata = dict(context.invocation_metadata() or ()) if metadata is None else metadata
            tenant = tenants.identify(metadata.get("authorization"))
            _caller.set(tenant.name)
            return tenant

        def _access(self, context, model: str) -> Tenant | None:
            """The caller may use ``model`` (403 otherwise, whether or not it exists); the request's
            priority class: its tenant's, or lower (``modelport-priority`` metadata)."""
            metadata = dict(context.invocation_metadata() or ())
            tenant = self._tenant(context, metadata)
            if tenant is not None:
                self._state.tenants.check_model(tenant, model)
            asked = metadata.get(PRIORITY_METADATA)
            priority.set_current(requested(tenant.priority if tenant is not None else Priority.NORMAL, asked))
            return tenant

        def _load(self) -> tuple[str, str]:
            """The worker's load, as trailing metadata (protocol/load.py); this call is no longer
            counted in flight when it is read."""
            return HEADER, load_now(self._state, answering=0).to_text()

        def _observe(self, request, version: str | None, status: int, started: float) -> None:
            """Count an inference call in the request metrics, labelled only with what the server
            knows (a served model; the version that answered): never a value a caller made up."""
            if isinstance(request, _Malformed) or not self._routing.known(request.model_name):
                return
            self._metrics.observe_request(request.model_name, version or "-", "grpc", status,
                                          time.monotonic() - started)

        def _service(self, name: str, version: str) -> Servable:
            return self._routing.get(name, version or None, routed=False)

        # -- model repository (admin token) ---------------------------------------------------------

        @_answers
        async def RepositoryIndex(self, request, context):
            self._authorise(context)
            entries = [e for e in self._routing.index() if not request.ready or e["state"] == State.READY]
            return json_format.ParseDict({"models": [dict(e, state=str(e["state"])) for e in entries]},
                                         messages.RepositoryIndexResponse())

        @_answers
        async def RepositoryModelLoad(self, request, context):
            self._authorise(context)
            await self._manager().load_model(request.model_name)
            return messages.RepositoryModelLoadResponse()

        @_answers
        async def RepositoryModelUnload(self, request, context):
            self._authorise(context)
            await self._manager().unload_model(request.model_name)
            return messages.RepositoryModelUnloadResponse()

        def _authorise(self, context) -> None:
            offered = dict(context.invocation_metadata()).get("authorization", "")
            check_token(self._state.config.admin_token, offered)

        def _manager(self):
            if self._state.versions is None:
                raise BadInput("this server serves fixed bundles, not a repository: nothing to load or unload")
            return self._state.versions

    return InferenceServicer


async def start(state, host: str, port: int, max_message_bytes: int):
    """A gRPC server on the running event loop; returns it and the port it listens on."""
    messages, _ = codec.messages()
    servicer = servicer_class()(state)
    service = messages.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    methods = {f"/{service.full_name}/{m.name}": Method(
        getattr(servicer, m.name), _lenient(getattr(messages, m.input_type.name)),
        getattr(messages, m.output_type.name).SerializeToString, streaming=m.client_streaming) for m in service.methods}
    config = state.config
    server = GrpcServer(methods, max_message_bytes, config.read_timeout_s, config.write_timeout_s)
    return server, await server.start(host, port)


class GrpcServer:
    """The listening socket and its connections (``grpc_transport.Connection``); ``stop(grace_s)`` lets calls in flight finish."""

    def __init__(self, methods: dict[str, Method], max_message_bytes: int, read_timeout_s: float,
                 write_timeout_s: float) -> None:
        self.methods, self.max_message_bytes = methods, max_message_bytes
        self.read_timeout_s, self.write_timeout_s = read_timeout_s, write_timeout_s
        self.connections: set[Connection] = set()
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.get_running_loop().create_server(lambda: Connection(self), host, port)
        return self._server.sockets[0].getsockname()[1]

    async def stop(self, grace_s: float) -> None:
        # Stop accepting -> GOAWAY on every connection (calls in flight go on) -> wait for them,
        # at most grace_s -> close what is left.
        self._server.close()
        for connection in list(self.connections):
            connection.go_away()
        deadline = time.monotonic() + grace_s
        while self.connections and time.monotonic() < deadline:  # each closes once its calls are answered
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            connection.abort()
