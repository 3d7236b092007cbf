"""The article's API: ``curl -XPOST localhost:12480 -F "data=@image.jpg"`` -> ``[[label, score], ...]``."""

from __future__ import annotations

import functools

from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from modelport import untrusted
from modelport.errors import BadInput, ModelportError
from modelport.server.http import json_response, start, unless_disconnected

FIELD = "data"


async def predict(request: Request) -> Response:
    state = request.app.state
    k = _top_k(request)
    started = await start(request, functools.partial(_pick, state.models, request), _read_image)
    (predictions,) = await unless_disconnected(request, started.service.classify(
        [started.body], k=k, deadline=started.deadline(), timing=started.timing, input_name=FIELD))
    return json_response([[p.label, p.score] for p in predictions])


async def _read_image(request: Request) -> bytes:
    """The image in the form's field ``data``."""
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
        return await upload.read() if isinstance(upload, UploadFile) else upload.encode()
    finally:
        await form.close()


def _pick(models, request: Request, *, routed: bool = True):
    params = request.query_params
    if "model" in params:
        return models.get(params["model"], params.get("version"), routed=routed)
    return models.default(routed=routed)


def _top_k(request: Request) -> int | None:
    return untrusted.optional_integer(request.query_params.get("k"), "k", minimum=1)
