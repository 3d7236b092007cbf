"""What the management endpoints share: the bearer token, and the version manager they act on.

The model repository extension (``kserve.py``: index, load, unload) and rollouts (``rollouts.py``:
promote, abort) are the endpoints that change what a server serves.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request

from modelport.errors import BadInput, Forbidden, Unauthorized


def authorise(request: Request) -> None:
    """Refuse the request unless the server has an admin token and the request bears it."""
    check_token(request.app.state.config.admin_token, request.headers.get("authorization", ""))


def check_token(token: str | None, offered: str) -> None:
    """``offered``: an ``Authorization`` value (HTTP header, gRPC metadata), ``Bearer <token>``."""
    if token is None:
        raise Forbidden("the model repository API is off; start the server with --admin-token to enable it")
    scheme, _, value = offered.partition(" ")
    # Constant-time comparison: the time taken says nothing about how much of a guess was right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(), token.encode()):
        raise Unauthorized("missing or wrong bearer token")


def version_manager(request: Request):
    """What loads, unloads and rolls out versions; ``BadInput`` on a server of fixed bundles."""
    versions = request.app.state.versions
    if versions is None:
        raise BadInput("this server serves fixed bundles, not a repository: nothing to load or unload")
    return versions
