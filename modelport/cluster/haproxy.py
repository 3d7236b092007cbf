"""HAProxy as the balancer: its configuration, its process, and its runtime API.

The rest of the code speaks of servers (add, drain, remove), not of socket commands. Servers are
added and removed at run time over the admin socket (no reload, no config rewrite); a server
added at run time starts in maintenance and inherits nothing from ``default-server``, so every
setting goes on the ``add server`` line (CLUSTER.md has the measured facts).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from modelport.errors import MissingExtra, ModelportError

logger = logging.getLogger("modelport.balancer")

BACKEND = "workers"
# Per server: health check of readiness every second, out after 2 failures, back after 1
# success; a refused connection takes it out at once (observe layer4); connections of a removed
# server are purged after 0.5 s, so that `del server` can succeed soon after.
SERVER_OPTIONS = ("check inter 1s fall 2 rise 1 observe layer4 error-limit 1 on-error mark-down "
                  "pool-purge-delay 500ms")

CONFIG = """\
global
{threads}    stats socket {admin} level admin
    pidfile {pidfile}
    maxconn {maxconn}
    # Retries replay the request from HAProxy's buffer: bodies up to this size can be retried
    # on another worker (two buffers per active connection).
    tune.bufsize {bufsize}

defaults
    mode http
    timeout connect 1s
    timeout client {client_timeout_s}s
    timeout server {server_timeout_s}s
    timeout http-request {client_timeout_s}s
    timeout http-keep-alive 10s
    timeout queue 10s
    # A request that could not reach a worker (refused, reset before an answer) goes to another.
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response junk-response
    option http-buffer-request

frontend modelport
    bind {host}:{port}
    default_backend {backend}

frontend stats
    bind {host}:{stats_port}
    http-request use-service prometheus-exporter if {{ path /metrics }}
    stats enable
    stats uri /
    stats refresh 5s

backend {backend}
    balance leastconn
    option httpchk GET /v2/health/ready
    http-check expect status 200
"""


@dataclass(frozen=True)
class Server:
    name: str
    address: str
    port: int
    operational: bool  # health checks pass
    admin_state: int  # HAProxy's bit field: 0 ready, 1/2/4/... maintenance or drain flags

    @property
    def draining(self) -> bool:
        return bool(self.admin_state & 0x18)  # SRV_ADMF_FDRAIN | SRV_ADMF_IDRAIN

    @property
    def in_maintenance(self) -> bool:
        return bool(self.admin_state & 0x67)  # forced, inherited, configured, resolver or name maintenance


class HAProxyError(ModelportError):
    kind = "balancer"


class RuntimeAPI:
    """Commands over HAProxy's admin socket: one connection per command."""

    def __init__(self, socket_path: str | Path, backend: str = BACKEND) -> None:
        self.socket_path = str(socket_path)
        self.backend = backend

    async def command(self, line: str, timeout_s: float = 5.0) -> str:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(self.socket_path), timeout_s)
        except (OSError, asyncio.TimeoutError) as exc:
            raise HAProxyError(f"HAProxy admin socket {self.socket_path}: {exc}") from None
        try:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            writer.write_eof()  # HAProxy answers once our side is closed
            return (await asyncio.wait_for(reader.read(), timeout_s)).decode(errors="replace").strip()
        except (OSError, asyncio.TimeoutError) as exc:
            raise HAProxyError(f"HAProxy command {line!r}: {exc}") from None
        finally:
            writer.close()

    async def servers(self) -> dict[str, Server]:
        text = await self.command(f"show servers state {self.backend}")
        servers = {}
        for row in text.splitlines():
            fields = row.split()
            if len(fields) < 19 or row.startswith("#") or fields[1] != self.backend:
                continue
            servers[fields[3]] = Server(fields[3], fields[4], int(fields[18]), fields[5] == "2", int(fields[6]))
        return servers

    async def add(self, name: str, address: str, port: int) -> None:
        answer = await self.command(f"add server {self.backend}/{name} {address}:{port} {SERVER_OPTIONS}")
        if "New server registered" not in answer:
            raise HAProxyError(f"add server {name}: {answer}")
        await self.command(f"enable health {self.backend}/{name}")
        await self.command(f"enable server {self.backend}/{name}")

    async def drain(self, name: str) -> None:
        await self.command(f"set server {self.backend}/{name} state drain")

    async def ready(self, name: str) -> None:
        await self.command(f"set server {self.backend}/{name} state ready")

    async def remove(self, name: str, timeout_s: float = 60.0) -> bool:
        """Maintenance, then delete once its connections are gone (HAProxy refuses before)."""
        await self.command(f"set server {self.backend}/{name} state maint")
        deadline = time.monotonic() + timeout_s
        while True:
            answer = await self.command(f"del server {self.backend}/{name}")
            if "Server deleted" in answer or "No such server" in answer:
                return True
            if time.monotonic() > deadline:
                logger.warning("server %s still has connections after %.0f s: left in maintenance", name, timeout_s)
                return False
            await asyncio.sleep(0.2)


@dataclass(frozen=True)
class HAProxyConfig:
    host: str
    port: int
    stats_port: int
    maxconn: int = 4096
    bufsize: int = 256 * 1024
    client_timeout_s: int = 60
    server_timeout_s: int = 60
    threads: int | None = None  # None: HAProxy's default, one per core


def _pool_options(binary: str) -> list[str]:
    """HAProxy's shared buffer cache, where this build has it (2.6+ built against glibc turns it off).

    Every retryable request takes a third buffer (the replay copy), so with 256 KB buffers a
    request needs 768 KB while each thread's own cache holds 512 KB: without the shared cache the
    rest goes back to malloc, which hands such blocks back to the kernel; measured, 17 page faults
    and ~0.08 ms of HAProxy CPU per request, and a balancer hop of 0.36 ms instead of 0.18 ms
    (docs/decisions.md). The shared cache keeps freed buffers for the next request.
    """
    try:
        help_text = subprocess.run([binary, "-dMhelp"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return []
    return ["-dMglobal"] if "no-global" in help_text.stdout + help_text.stderr else []


class HAProxyProcess:
    """The system's ``haproxy`` as our child, in master-worker mode, in the foreground."""

    def __init__(self, config: HAProxyConfig, directory: Path) -> None:
        self.config = config
        self.directory = directory
        self.admin_socket = directory / "admin.sock"
        self.config_file = directory / "haproxy.cfg"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
        if binary is None:
            raise MissingExtra("the balancer needs HAProxy 2.6+: apt-get install haproxy")
        c = self.config
        self.config_file.write_text(CONFIG.format(
            admin=self.admin_socket, pidfile=self.directory / "haproxy.pid", maxconn=c.maxconn, bufsize=c.bufsize,
            client_timeout_s=c.client_timeout_s, server_timeout_s=c.server_timeout_s, host=c.host, port=c.port,
            stats_port=c.stats_port, backend=BACKEND, threads=f"    nbthread {c.threads}\n" if c.threads else ""))
        check = subprocess.run([binary, "-c", "-q", "-f", str(self.config_file)], capture_output=True, text=True)
        if check.returncode != 0:
            raise HAProxyError(f"HAProxy refused its configuration: {check.stderr.strip() or check.stdout.strip()}")
        self.admin_socket.unlink(missing_ok=True)
        self.proc = subprocess.Popen([binary, "-W", "-db", *_pool_options(binary), "-f", str(self.config_file)],
                                     stdout=subprocess.DEVNULL,
                                     stderr=open(self.directory / "haproxy.log", "ab"), preexec_fn=_die_with_parent)
        logger.info("HAProxy %d started: traffic on %s:%d, stats on %s:%d", self.proc.pid, c.host, c.port, c.host,
                    c.stats_port)

    async def wait_ready(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        api = RuntimeAPI(self.admin_socket)
        while True:
            if self.proc.poll() is not None:
                log = (self.directory / "haproxy.log").read_text(errors="replace")[-2000:]
                raise HAProxyError(f"HAProxy exited with {self.proc.returncode}: {log}")
            try:
                await api.command("show info", timeout_s=1)
                return
            except HAProxyError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGUSR1)  # soft stop: finish what is in flight, then exit
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        logger.info("HAProxy stopped")


def _die_with_parent() -> None:
    # If the balancer is killed outright, its HAProxy goes too instead of serving a stale set.
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
