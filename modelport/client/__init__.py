"""One client for both transports: ``Client("zmq://host:12490")`` or ``Client("http://host:12480")``,
or for a whole cluster: ``Client("etcd://host:2379/prod")`` finds the workers in the member directory and
calls them directly (``modelport/cluster/discovery.py``: choice of worker, failover, hedging).

    from modelport import Client
    with Client("zmq://127.0.0.1:12490") as c:
        c.classify("cat.jpg", top_k=5)                    # -> [Prediction(label, index, score), ...]
        c.infer("efficientnet-lite0", {"image": array})   # -> {"probabilities": array, "features": array}

    async with AsyncClient("zmq://127.0.0.1:12490") as c:  # many requests in flight on one socket
        await asyncio.gather(*(c.classify(p) for p in paths))

Server errors come back as the ``modelport.errors`` classes (``BadInput``, ``NotFound``,
``Overloaded`` with ``retry_after_s``, ``DeadlineExceeded``, ...); a reply that does not arrive in
``timeout_s`` raises ``ClientTimeout``; no connection over HTTP (nothing listens there, or it went away
mid-request) raises ``ServerUnreachable``. Both transports reconnect by themselves after a server
restart (ZeroMQ's DEALER reconnects; the HTTP clients open a new connection).
"""

from __future__ import annotations

from modelport.client.aio import AsyncClient
from modelport.client.common import DEFAULT_MODEL, ClientTimeout, ServerUnreachable
from modelport.client.sync import Client

__all__ = ["AsyncClient", "Client", "ClientTimeout", "DEFAULT_MODEL", "ServerUnreachable"]
