"""The article's API: ``curl -XPOST localhost:12480 -F "data=@image.jpg"`` -> ``[[label, score], ...]``."""

from __future__ import annotations

from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from modelport import untrusted
from modelport.errors import BadInput, ModelportError
from modelport.server.http import begin, deadline, json_response, unless_disconnected

FIELD = "data"


async def predict(request: Request) -> Response:
    state = request.app.state
    k = _top_k(request)
    # Refuse an overloaded or unknown model before parsing the upload: under overload, parsing
    # bodies that will be refused anyway would eat the CPU the accepted requests need.
    # Not a routing decision: a canary's pick is made once, below (see kserve.infer).
    _pick(state.models, request, routed=False).batcher.check()
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):  # case-insensitive
        raise BadInput(f"expected a multipart form (Content-Type: multipart/form-data) with a file field {FIELD!r}",
                       input_name=FIELD)
    try:
        form = await request.form(max_files=1, max_fields=8)
    except Exception as exc:  # python-multipart raises several types for malformed bodies
        if isinstance(exc, (ModelportError, ClientDisconnect)):  # the body limit, or the client left
            raise
        raise BadInput(f"expected a multipart form with a file field {FIELD!r}: {exc}", input_name=FIELD) from None
    try:
        upload = form.get(FIELD)
        if upload is None:
            raise BadInput(f"missing form field {FIELD!r} (send the image as -F \"{FIELD}=@image.jpg\")",
                           input_name=FIELD)
        data = await upload.read() if isinstance(upload, UploadFile) else upload.encode()
    finally:
        await form.close()
    # The version is picked again once the upload has arrived (see kserve.infer).
    service = _pick(state.models, request)
    timing = begin(request, service)
    (predictions,) = await unless_disconnected(request, service.classify(
        [data], k=k, deadline=deadline(request, state.config, timing), timing=timing, input_name=FIELD))
    return json_response([[p.label, p.score] for p in predictions])


def _pick(models, request: Request, *, routed: bool = True):
    params = request.query_params
    if "model" in params:
        return models.get(params["model"], params.get("version"), routed=routed)
    return models.default(routed=routed)


def _top_k(request: Request) -> int | None:
    return untrusted.optional_integer(request.query_params.get("k"), "k", minimum=1)
