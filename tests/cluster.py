"""Real etcd, real ``modelport balance`` (with its real HAProxy), and a bounded load through it."""

from __future__ import annotations

import asyncio
import csv
import io
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from modelport.cluster.etcd import Etcd
from modelport.cluster.members import ClusterURL, Member
from servers import free_port, wait_until

TTL_S = 3  # the lease TTL the cluster tests give their workers


class EtcdServer:
    """A single-node etcd on loopback ports chosen at run time; restartable on the same ports and data."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port, self.peer_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None

    def url(self, cluster: str) -> str:
        return f"etcd://127.0.0.1:{self.port}/{cluster}"

    def start(self) -> "EtcdServer":
        client, peer = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.peer_port}"
        self.proc = subprocess.Popen(
            ["etcd", "--name", "test", "--data-dir", str(self.directory / "data"),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"test={peer}", "--initial-cluster-state", "new"],
            stdout=open(self.directory / "etcd.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(client + "/health", timeout=0.5).json().get("health") == "true":
                    return self
            except (httpx.HTTPError, ValueError):
                pass
            if self.proc.poll() is not None:
                raise RuntimeError((self.directory / "etcd.log").read_text()[-2000:])
            time.sleep(0.05)
        raise TimeoutError("etcd did not become healthy")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def close(self) -> None:
        self.stop(signal.SIGKILL)
        shutil.rmtree(self.directory / "data", ignore_errors=True)


def registry(url: str) -> tuple[dict[str, Member], dict[str, bytes]]:
    """The cluster's members as etcd holds them now, and the raw values that are not members."""
    cluster = ClusterURL.parse(url)

    async def read():
        etcd = Etcd(cluster.host, cluster.port)
        try:
            return (await etcd.list(cluster.prefix))[0]
        finally:
            await etcd.close()

    members, other = {}, {}
    for key, raw in asyncio.run(read()).items():
        try:
            member = Member.from_json(raw)
            members[member.id] = member
        except ValueError:
            other[key] = raw
    return members, other


def put_raw(url: str, member_id: str, value: bytes) -> None:
    cluster = ClusterURL.parse(url)

    async def put():
        etcd = Etcd(cluster.host, cluster.port)
        try:
            await etcd.put(cluster.key(member_id), value)
        finally:
            await etcd.close()

    asyncio.run(put())


class BalancerProcess:
    """``modelport balance`` in its own process group, with its HAProxy child."""

    def __init__(self, cluster_url: str, log: Path, *extra: str) -> None:
        self.port, self.stats_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "modelport", "balance", "--cluster", cluster_url, "--port", str(self.port),
             "--stats-port", str(self.stats_port), *extra],
            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self._stats_up, 20, what="HAProxy stats page")

    def _stats_up(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"balancer exited: {self.log.read_text()[-3000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{self.stats_port}/;csv", timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return False

    def servers(self) -> dict[str, str]:
        """HAProxy's servers in the workers backend and their status (UP, DOWN, MAINT, DRAIN, ...)."""
        text = httpx.get(f"http://127.0.0.1:{self.stats_port}/;csv", timeout=2).text.lstrip("# ")
        return {row["svname"]: row["status"] for row in csv.DictReader(io.StringIO(text))
                if row["pxname"] == "workers" and row["svname"] not in ("BACKEND", "FRONTEND")}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def infer_body(seed: int) -> dict:
    tensor = np.random.default_rng(seed).normal(size=(1, 3, 8, 8)).astype(np.float32)
    return {"inputs": [{"name": "image", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": tensor.ravel().tolist()}]}


class Load:
    """Clients sending real inference requests through the balancer until stopped (at most
    ``max_s`` seconds): every status, error and answering worker is recorded."""

    def __init__(self, url: str, *, clients: int = 4, max_s: float = 120, timeout_s: float = 20) -> None:
        self.url = url
        self.results: list[tuple[float, int, str]] = []  # (time, status or 0 for a transport error, worker)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._deadline = time.monotonic() + max_s
        self._timeout_s = timeout_s
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]
        for thread in self._threads:
            thread.start()

    def _client(self, seed: int) -> None:
        body = infer_body(seed)
        with httpx.Client(base_url=self.url, timeout=self._timeout_s) as client:
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                try:
                    reply = client.post("/v2/models/tiny/infer", json=body)
                    self.results.append((time.monotonic(), reply.status_code,
                                         reply.headers.get("x-modelport-worker", "")))
                except httpx.HTTPError as exc:
                    self.results.append((time.monotonic(), 0, ""))
                    self.errors.append(repr(exc))
                time.sleep(0.005)

    def stop(self) -> "Load":
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        return self

    def failed(self) -> list[tuple[float, int, str]]:
        return [r for r in self.results if r[1] != 200]

    def workers_since(self, since: float) -> set[str]:
        return {w for t, status, w in self.results if t >= since and status == 200}


class DnsProcess:
    """``modelport dns`` for one cluster, on a free loopback UDP port."""

    def __init__(self, cluster_url: str, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "modelport", "dns", "--cluster", cluster_url,
                                      "--port", str(self.port)], stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_until(self._answers, 20, every_s=0.05, what="modelport dns answering")

    def _answers(self) -> bool:
        import dns.exception
        import dns.message
        import dns.query

        if self.proc.poll() is not None:
            raise RuntimeError(f"modelport dns exited: {self.log.read_text()[-2000:]}")
        try:
            dns.query.udp(dns.message.make_query("x.modelport.", "A"), "127.0.0.1", port=self.port, timeout=0.3)
            return True
        except dns.exception.Timeout:
            return False

    def srv(self, name: str) -> set[int]:
        """The ports in the SRV answer for ``name`` (empty for NXDOMAIN)."""
        import dns.message
        import dns.query
        import dns.rcode

        reply = dns.query.udp(dns.message.make_query(name, "SRV"), "127.0.0.1", port=self.port, timeout=2)
        if reply.rcode() == dns.rcode.NXDOMAIN:
            return set()
        return {rr.port for rrset in reply.answer for rr in rrset}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)


HAPROXY_WITH_DNS = """\
global
    maxconn 1000
    stats socket {directory}/admin.sock level admin
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response
resolvers modelport
    nameserver dns 127.0.0.1:{dns_port}
    accepted_payload_size 8192
    hold valid 1s
    hold obsolete 1s
    timeout resolve 500ms
    timeout retry 500ms
frontend fe
    bind 127.0.0.1:{port}
    default_backend workers
backend workers
    balance leastconn
    option httpchk GET /v2/health/ready
    server-template w 8 _modelport._tcp.{cluster}.modelport resolvers modelport init-addr none check inter 500ms
"""
