"""Cluster members: who the workers are, as they publish themselves in etcd (a public contract).

Key layout: one key per worker, bound to that worker's lease (etcd's convention for service
endpoints)::

    modelport/<cluster>/members/<member id>   ->  JSON, schema 1 (``Member.to_json``)

``etcd://127.0.0.1:2379/prod`` names etcd's client endpoint and the cluster ``prod``. The value::

    {"schema": 1,
     "id": "host-12481",                          # stable for the worker process's life
     "http": "http://127.0.0.1:12481",            # how to reach it over HTTP
     "zmq": "tcp://127.0.0.1:12491" | null,       # and over ZeroMQ, if enabled
     "grpc": "127.0.0.1:8001" | null,              # and over gRPC, if enabled (absent before this field existed)
     "state": "ready" | "draining",               # draining: finishing, send nothing new
     "models": {"flowers": {"versions": ["6", "7"], "labels": {"canary": "7"}}},   # READY only
     "started": 1764100000.0,                     # Unix time the worker started serving
     "pid": 4242, "host": "gpu-box-3"}

No load: the value changes only when what the worker is changes (addresses, models, state);
its load travels with its answers (``protocol/load.py``). Readers must ignore fields they do not
know (values written before issue 27 carry a ``load`` field); a value that is not this shape is skipped (and
logged), never trusted. The ``Directory`` follows the members: list once, then watch from the
listed revision; when the watch breaks, list again and replace everything (etcd's own
``naming/endpoints`` pattern).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Callable
from urllib.parse import urlsplit

from modelport.cluster.etcd import Etcd, EtcdUnavailable
from modelport.errors import BadInput

logger = logging.getLogger("modelport.cluster")

SCHEMA = 1
READY, DRAINING = "ready", "draining"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


@dataclass(frozen=True)
class ClusterURL:
    host: str
    port: int
    name: str

    @classmethod
    def parse(cls, url: str) -> "ClusterURL":
        """``etcd://HOST:PORT/CLUSTER`` (port 2379 if left out)."""
        parts = urlsplit(url)
        name = parts.path.strip("/")
        try:
            port = parts.port or 2379
        except ValueError:
            port = -1
        if parts.scheme != "etcd" or not parts.hostname or port <= 0 or not _NAME.fullmatch(name):
            raise BadInput(f"invalid cluster URL {url!r}: expected etcd://HOST:PORT/NAME, NAME of letters, digits, "
                           f"'.', '_' and '-' (for example etcd://127.0.0.1:2379/prod)")
        return cls(parts.hostname, port, name)

    @property
    def prefix(self) -> str:
        return f"modelport/{self.name}/members/"

    def key(self, member_id: str) -> str:
        return self.prefix + member_id

    def etcd(self) -> Etcd:
        return Etcd(self.host, self.port)

    def __str__(self) -> str:
        return f"etcd://{self.host}:{self.port}/{self.name}"


@dataclass(frozen=True)
class Member:
    id: str
    http: str
    zmq: str | None = None
    state: str = READY
    models: dict[str, dict] = field(default_factory=dict)
    started: float = 0.0
    pid: int = 0
    host: str = ""
    grpc: str | None = None  # host:port of its gRPC server (the Open Inference Protocol), if enabled

    def to_json(self) -> bytes:
        return json.dumps({"schema": SCHEMA, **asdict(self)}, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "Member":
        """Parse a member key; ``ValueError`` for anything that is not a schema-1 member."""
        try:
            value = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(value, dict) or value.get("schema") != SCHEMA:
            raise ValueError("not a modelport member (schema 1)")
        member_id, http, zmq, state = value.get("id"), value.get("http"), value.get("zmq"), value.get("state")
        if not isinstance(member_id, str) or not _NAME.fullmatch(member_id):
            raise ValueError(f"bad id {member_id!r}")
        if not isinstance(http, str) or urlsplit(http).scheme != "http" or not _port_of(http):
            raise ValueError(f"bad http address {http!r}")
        if zmq is not None and (not isinstance(zmq, str) or not zmq.startswith("tcp://")):
            raise ValueError(f"bad zmq address {zmq!r}")
        grpc = value.get("grpc")
        if grpc is not None and (not isinstance(grpc, str) or not _port_of(f"http://{grpc}")):
            raise ValueError(f"bad grpc address {grpc!r}")
        if state not in (READY, DRAINING):
            raise ValueError(f"bad state {state!r}")
        models = value.get("models", {})
        if not isinstance(models, dict) or not all(isinstance(m, dict) for m in models.values()):
            raise ValueError("bad models")
        started, pid, host = value.get("started", 0.0), value.get("pid", 0), value.get("host", "")
        if not isinstance(started, (int, float)) or not isinstance(pid, int) or not isinstance(host, str):
            raise ValueError("bad started, pid or host")
        return cls(member_id, http, zmq, state, models, float(started), pid, host, grpc)

    @property
    def http_host(self) -> str:
        return urlsplit(self.http).hostname or ""

    @property
    def http_port(self) -> int:
        return _port_of(self.http)


def _port_of(url: str) -> int:
    try:
        return urlsplit(url).port or 0
    except ValueError:
        return 0


class Directory:
    """The live set of members under one cluster, kept in step with etcd.

    ``members`` is replaced on every change (readers never see a half-applied update).
    ``on_change(members)`` runs after each change and after each full re-list. While etcd is
    unreachable the last known members are kept, and it retries with capped backoff.
    """

    def __init__(self, cluster: ClusterURL, *, on_change: Callable[[dict[str, Member]], None] | None = None,
                 max_backoff_s: float = 2.0) -> None:
        self.cluster = cluster
        self.members: dict[str, Member] = {}
        self.synced = asyncio.Event()  # set after the first successful list
        self.connected = False
        self._on_change = on_change
        self._max_backoff_s = max_backoff_s
        self._skipped: set[str] = set()  # keys holding values that are not members (logged once)
        self._etcd = cluster.etcd()

    async def run(self) -> None:
        """Follow the members until cancelled."""
        backoff = 0.1
        while True:
            try:
                values, revision = await self._etcd.list(self.cluster.prefix)
                self._replace(values)
                if not self.connected:
                    logger.info("directory %s: %d member(s)", self.cluster, len(self.members))
                self.connected = True
                backoff = 0.1
                async for change in self._etcd.watch(self.cluster.prefix, revision + 1):
                    self._apply(change)
            except EtcdUnavailable as exc:
                if self.connected:
                    logger.warning("directory %s: %s; keeping the last %d member(s), retrying",
                                   self.cluster, exc.message, len(self.members))
                self.connected = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff_s)

    async def close(self) -> None:
        await self._etcd.close()

    def _replace(self, values: dict[str, bytes]) -> None:
        members = {}
        for key, raw in values.items():
            member = self._parse(key, raw)
            if member is not None:
                members[member.id] = member
        self.members = members
        self.synced.set()
        self._changed()

    def _apply(self, change) -> None:
        members = dict(self.members)
        member_id = change.key[len(self.cluster.prefix):]
        if change.value is None:
            members.pop(member_id, None)
            self._skipped.discard(change.key)
        else:
            member = self._parse(change.key, change.value)
            if member is None:
                members.pop(member_id, None)
            else:
                members[member.id] = member
        self.members = members
        self._changed()

    def _parse(self, key: str, raw: bytes) -> Member | None:
        try:
            member = Member.from_json(raw)
            if key != self.cluster.key(member.id):
                raise ValueError(f"its id {member.id!r} does not match the key")
        except ValueError as exc:
            if key not in self._skipped:
                logger.warning("directory: skipping %s: %s", key, exc)
                self._skipped.add(key)
            return None
        self._skipped.discard(key)
        return member

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.members)


def age_s(member: Member) -> float:
    return max(0.0, time.time() - member.started) if member.started else 0.0
