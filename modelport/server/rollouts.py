"""Rollouts over HTTP: their status for anyone, promote and abort for the token's holder.

    GET  /v2/models/{model}/rollout                       the latest rollout of the model here
    POST /v2/repository/models/{model}/rollout/promote    (bearer token, like load/unload)
    POST /v2/repository/models/{model}/rollout/abort
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from modelport.server.admin import authorise, version_manager
from modelport.server.http import json_response


async def status(request: Request) -> Response:
    return json_response(version_manager(request).rollout(request.path_params["model"]).status())


async def promote(request: Request) -> Response:
    authorise(request)
    return json_response(version_manager(request).promote(request.path_params["model"]).status())


async def abort(request: Request) -> Response:
    authorise(request)
    return json_response(version_manager(request).abort(request.path_params["model"]).status())


def routes() -> list[Route]:
    return [
        Route("/v2/models/{model}/rollout", status),
        Route("/v2/repository/models/{model:path}/rollout/promote", promote, methods=["POST"]),
        Route("/v2/repository/models/{model:path}/rollout/abort", abort, methods=["POST"]),
    ]
