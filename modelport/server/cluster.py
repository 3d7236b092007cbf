"""What this server tells the cluster about itself: its entry in the member directory, built from live state."""

from __future__ import annotations

import os
import socket
import time

from modelport.cluster.members import ClusterURL, Member
from modelport.cluster.membership import Membership
from modelport.lifecycle.routing import RoutingTable
from modelport.lifecycle.states import State
from modelport.server.config import ServerConfig


def membership(config: ServerConfig, routing: RoutingTable, rpc, grpc_port: int | None) -> Membership:
    cluster = ClusterURL.parse(config.cluster)
    host = advertised_host(config)
    http = f"http://{_bracket(host)}:{config.port}"
    zmq = f"tcp://{_bracket(host)}:{rpc.address.rsplit(':', 1)[1]}" if rpc is not None else None
    grpc = f"{_bracket(host)}:{grpc_port}" if grpc_port is not None else None
    started = time.time()

    def describe() -> Member:
        models: dict[str, dict] = {}
        for entry in routing.index():
            if entry["state"] == State.READY:
                models.setdefault(entry["name"], {"versions": [], "labels": {}})["versions"].append(entry["version"])
        for name, model in models.items():
            model["labels"] = {label: str(v) for label, v in routing.labels(name).items()
                               if str(v) in model["versions"]}
            rollout = routing.rollouts.get(name)
            if rollout is not None:  # each worker judges its own rollout: the directory shows each one's
                model["rollout"] = {"candidate": str(rollout.candidate.version),
                                    "serving": str(rollout.serving.version), "stage": rollout.stage}
        # No load here: it travels with every answer (protocol/load.py), so the key changes only
        # when what the worker is changes, and the directory's traffic does not grow with load.
        return Member(config.worker_id, http, zmq, models=models, started=started, pid=os.getpid(),
                      host=socket.gethostname(), grpc=grpc)

    return Membership(cluster, describe, ttl_s=config.lease_ttl_s)


def advertised_host(config: ServerConfig) -> str:
    if config.advertise:
        return config.advertise
    if config.host in ("0.0.0.0", "::", ""):  # bound everywhere: others know us by name
        return socket.gethostname()
    return config.host


def worker_id(port: int) -> str:
    """``<hostname>-<port>``: one per server process on a machine, readable in logs and tables."""
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname()).strip("-.") or "worker"
    return f"{name[:50]}-{port}"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
