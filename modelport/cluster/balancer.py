"""``modelport balance``: HAProxy in front of the cluster, following the member directory.

The member directory (``Directory``) is mirrored into HAProxy's backend with the runtime API: a new
member is added and enabled; a ``draining`` member is set to drain (no new requests, in-flight
ones finish); a member that left is put in maintenance and deleted once its connections are
gone. Every pass compares what etcd says with what HAProxy reports (``show servers state``), so
the same code handles a change, a reconnection to etcd (full re-list) and a restarted HAProxy
(empty backend). Every change is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from modelport.cluster.haproxy import HAProxyError, HAProxyProcess, RuntimeAPI, Server
from modelport.cluster.members import DRAINING, ClusterURL, Directory, Member

logger = logging.getLogger("modelport.balancer")


class Balancer:
    def __init__(self, cluster: ClusterURL, api: RuntimeAPI, haproxy: HAProxyProcess | None = None) -> None:
        self.cluster = cluster
        self.api = api
        self.haproxy = haproxy  # ours to start, watch and restart; None: the operator's HAProxy
        self.directory = Directory(cluster, on_change=lambda members: self._dirty.set())
        self._dirty = asyncio.Event()
        self._removing: dict[str, asyncio.Task] = {}
        self._addresses: dict[str, str] = {}  # host name -> IP, resolved once per name

    async def run(self) -> None:
        if self.haproxy is not None:
            self.haproxy.start()
            await self.haproxy.wait_ready()
        tasks = [asyncio.create_task(self.directory.run(), name="directory"),
                 asyncio.create_task(self._reconcile_forever(), name="reconcile")]
        if self.haproxy is not None:
            tasks.append(asyncio.create_task(self._supervise(), name="supervise"))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in [*tasks, *self._removing.values()]:
                task.cancel()
            await self.directory.close()  # closing the channel also ends a watch read the cancel missed
            await asyncio.wait([*tasks, *self._removing.values()], timeout=5)
            if self.haproxy is not None:
                self.haproxy.stop()

    async def _reconcile_forever(self) -> None:
        await self.directory.synced.wait()
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self.reconcile(self.directory.members)
            except HAProxyError as exc:
                logger.warning("HAProxy not reachable (%s); retrying", exc.message)
                await asyncio.sleep(0.5)
                self._dirty.set()

    async def reconcile(self, members: dict[str, Member]) -> None:
        actual = await self.api.servers()
        wanted = {}
        for member in members.values():
            address = await self._resolve(member.http_host)
            if address is not None:
                wanted[member.id] = (address, member.http_port, member.state)
        for name, (address, port, state) in wanted.items():
            if name in self._removing:
                continue  # re-added once its removal has finished
            server = actual.get(name)
            if server is not None and (server.address, server.port) != (address, port):
                logger.info("worker %s moved to %s:%d: replacing its server", name, address, port)
                self._remove(name)
                continue
            if server is None:
                await self.api.add(name, address, port)
                logger.info("added worker %s at %s:%d", name, address, port)
                server = Server(name, address, port, False, 0)
            if state == DRAINING and not server.draining:
                await self.api.drain(name)
                logger.info("draining worker %s (it announced it is stopping)", name)
            elif state != DRAINING and (server.draining or server.in_maintenance):
                await self.api.ready(name)
                logger.info("worker %s ready again", name)
        for name in actual.keys() - wanted.keys():
            if name not in self._removing:
                logger.info("worker %s left the member directory: removing its server", name)
                self._remove(name)

    def _remove(self, name: str) -> None:
        async def remove() -> None:
            try:
                if await self.api.remove(name):
                    logger.info("removed worker %s", name)
            except HAProxyError as exc:
                logger.warning("removing worker %s: %s", name, exc.message)
            finally:
                self._removing.pop(name, None)
                self._dirty.set()  # it may be back in the member directory by now

        self._removing[name] = asyncio.create_task(remove(), name=f"remove-{name}")

    async def _resolve(self, host: str) -> str | None:
        """Runtime-added HAProxy servers take IP addresses only."""
        if host not in self._addresses:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
            except OSError as exc:
                logger.warning("cannot resolve worker host %r: %s; skipped", host, exc)
                return None
            infos.sort(key=lambda info: info[0] != socket.AF_INET)  # IPv4 first
            self._addresses[host] = infos[0][4][0]
        return self._addresses[host]

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if not self.haproxy.alive():
                logger.error("HAProxy exited with %s: restarting it", self.haproxy.proc.returncode)
                for task in self._removing.values():
                    task.cancel()
                self._removing.clear()
                with contextlib.suppress(HAProxyError):
                    self.haproxy.start()
                    await self.haproxy.wait_ready()
                self._dirty.set()
