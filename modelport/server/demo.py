"""``GET /``: a page to try the models from a browser, or (for curl) a short JSON description.

The page is one file of HTML, CSS and JavaScript shipped in the package (no CDN, no build step).
It reads the models from this same ``GET /`` (as JSON) and sends images to the article's upload
API (``POST /``), showing the top labels, the version that answered and the Server-Timing split.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

import modelport
from modelport.lifecycle.states import State
from modelport.server.access import visible
from modelport.server.http import json_response


async def home(request: Request) -> Response:
    if "text/html" in request.headers.get("accept", ""):  # a browser
        return HTMLResponse(_page())
    return json_response(describe(request))


def describe(request: Request) -> dict:
    routing = request.app.state.models
    models: dict[str, dict] = {}
    for entry in routing.index():
        if entry["state"] != State.READY or not visible(request, entry["name"]):
            continue
        service = routing.get(entry["name"], entry["version"], routed=False)
        model = models.setdefault(entry["name"], {"name": entry["name"], "kind": _kind(service), "versions": [],
                                                  "labels": {}})
        model["versions"].append(entry["version"])
    for name, model in models.items():
        model["labels"] = {label: str(v) for label, v in routing.labels(name).items() if str(v) in model["versions"]}
    return {
        "name": "modelport", "version": modelport.__version__, "worker": request.app.state.config.worker_id,
        "ready": request.app.state.ready, "models": list(models.values()),
        "try": "curl -XPOST <this server> -F data=@image.jpg  (or open this address in a browser)",
        "endpoints": {"upload": "POST /?model=&version=&k=", "kserve_v2": "/v2/models/{model}/infer",
                      "tf_serving": "/v1/models/{model}:predict", "metrics": "/metrics"},
    }


def _kind(service) -> str:
    return "pipeline" if hasattr(service, "steps") else "model"


@lru_cache(maxsize=1)
def _page() -> str:
    return resources.files("modelport.server").joinpath("static/demo.html").read_text(encoding="utf-8")
