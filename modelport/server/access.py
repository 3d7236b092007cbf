"""Who may reach the models over HTTP, with ``--keys`` (``tenants.py``): an ASGI middleware.

Every request that names a model (``/v2/models/...``, ``/v1/models/...``) or asks for inference
(``POST /``) needs a tenant's key: 401 without a valid one, 403 for a model outside the tenant's
list (before routing, so a 403 says nothing about whether the model exists). Health checks, server
metadata, metrics, the demo page and the repository API (its own admin token) stay as they are.
The request's tenant and priority class are left in its state; its quota is taken where the
request starts (``http.start``), before its body is read.
"""

from __future__ import annotations

import re

from modelport.engine import priority
from modelport.errors import BadInput, ModelportError
from modelport.server.http import error_response

PRIORITY_HEADER = "x-modelport-priority"  # lowers the request's class below its tenant's
_PRIORITY_HEADER = PRIORITY_HEADER.encode()
_MODEL_PATH = re.compile(r"^/v[12]/models/([^/:]+)")
_DEFAULT = "<the default model>"  # what POST / names; a model name can never be this string


class Access:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        keyed, model = _about(scope) if scope["type"] == "http" else (False, None)
        if keyed:
            tenants = scope["app"].state.tenants
            authorization = asked = None
            for name, value in scope["headers"]:  # the two headers it reads, without decoding the rest
                if name == b"authorization":
                    authorization = value.decode("latin-1")
                elif name == _PRIORITY_HEADER:
                    asked = value.decode("latin-1")
            try:
                ceiling = priority.Priority.NORMAL  # without tenants a request may still lower itself
                if tenants is not None:
                    tenant = tenants.identify(authorization)
                    scope.setdefault("state", {})["tenant"] = tenant  # its 403s and 429s are counted too
                    if model is _DEFAULT:  # POST /: the default model, looked up only when it matters
                        model = _default_model(scope)
                    if model is not None:
                        tenants.check_model(tenant, model)
                    ceiling = tenant.priority
                if asked is not None or ceiling is not priority.Priority.NORMAL:  # normal is every task's default
                    priority.set_current(requested(ceiling, asked))
            except ModelportError as exc:
                await error_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def visible(request, name: str) -> bool:
    """Whether a listing (``GET /``, ``/v2/models/stats``) shows model ``name`` to this caller: with
    --keys, only the models of the caller's tenant."""
    tenant = request.scope.get("state", {}).get("tenant")
    return tenant is None or tenant.may_use(name)


def requested(ceiling: priority.Priority, asked: str | None) -> priority.Priority:
    """The class a request asks for (header, gRPC metadata or ZeroMQ field), within its ceiling."""
    try:
        return priority.lowered(ceiling, asked)
    except ValueError:
        raise BadInput(f"priority must be one of {', '.join(p.value for p in priority.Priority)}, "
                       f"not {asked[:40]!r}") from None


def _default_model(scope) -> str:
    try:
        return scope["app"].state.models.default(routed=False).name
    except ModelportError:
        return ""  # no model loaded yet: a key is still needed, the answer is the usual one


def _about(scope) -> tuple[bool, str | None]:
    """Whether a request needs a key, and the model it names: inference and model endpoints name
    one; listings of models need a key and show only the tenant's; health checks, server
    metadata, metrics, the demo page and the repository API (its own token) need none."""
    path, method = scope["path"], scope["method"]
    if path == "/":
        if method == "POST":
            return True, _DEFAULT
        accept = dict(scope["headers"]).get(b"accept", b"")
        return b"text/html" not in accept, None  # the page is static; its JSON twin lists the models
    if path == "/v2/models/stats":
        return True, None
    found = _MODEL_PATH.match(path)
    return (True, found.group(1)) if found else (False, None)
