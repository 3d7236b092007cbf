"""Running the server under uvicorn, with modelport's shutdown order.

SIGTERM or SIGINT: report not ready -> stop accepting -> finish in-flight requests (at most
``exit_timeout_s``) -> drain batchers -> unload -> exit 0. A second signal forces exit.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import uvicorn

from modelport.server.app import create_app
from modelport.server.config import ServerConfig
from modelport.server.protocol import protocol_class


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame) -> None:
        # Readiness goes false at once, so a balancer stops sending before the listener closes.
        self._app.state.ready = False
        if self.should_exit:
            # The second signal, of either kind: leave now. A runtime call stuck in native code
            # would otherwise hold the interpreter's exit (it joins worker threads).
            logging.getLogger("modelport.server").warning("second signal: forced exit")
            os._exit(1)
        else:
            self.should_exit = True


def serve(bundles: dict[str, Path] | Callable[[], dict[str, Path]] | None, config: ServerConfig, *,
          repository: Path | None = None, watch: bool = True) -> None:
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    server.run()
    if getattr(app.state, "load_failed", False):
        raise SystemExit(2)

