"""A worker's membership: its key in the member directory, from serving to exit.

Once every model is loaded and warm, the worker writes its key (``members.py`` has the layout)
bound to a lease of ``ttl_s`` and refreshes the lease every ``ttl_s / 3``. The value is rewritten
only when what the worker is changes (addresses, models and versions, ready/draining), at most
once per ``refresh_s``: load travels with answers, not here, so at steady state a worker's only
etcd traffic is its lease keep-alive. If the worker
dies or freezes, the lease expires and etcd deletes the key. If etcd is unreachable, the worker
keeps serving and retries with capped backoff; when etcd answers again it registers anew (new
lease, same id, same key: no duplicate), and revokes the lease it held before, if etcd still
knows it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Callable

from modelport.cluster.etcd import EtcdUnavailable, stop, within
from modelport.cluster.members import DRAINING, ClusterURL, Member

logger = logging.getLogger("modelport.cluster")


class LeaseLost(EtcdUnavailable):
    """etcd forgot our lease (it expired while we could not refresh it)."""


class Membership:
    def __init__(self, cluster: ClusterURL, describe: Callable[[], Member], *, ttl_s: int = 3,
                 refresh_s: float = 1.0, max_backoff_s: float = 2.0) -> None:
        self.cluster = cluster
        self._describe = describe
        self.ttl_s = max(1, int(ttl_s))
        self._refresh_s = min(refresh_s, self.ttl_s / 3)
        self._max_backoff_s = max_backoff_s
        self._etcd = cluster.etcd()
        self._lease: int | None = None
        self._published: Member | None = None
        self._draining = False
        self._wake = asyncio.Event()
        self._drain_published = asyncio.Event()  # set once etcd holds our "draining" entry
        self.registered = asyncio.Event()  # set while our key is in etcd as far as we know
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="membership")

    async def drain(self, timeout_s: float = 2.0) -> None:
        """Publish ``draining`` now (best effort within ``timeout_s``): balancers and clients stop
        sending new work here, while the worker still serves what arrives."""
        self._draining = True
        self._wake.set()
        try:
            await asyncio.wait_for(self._drain_published.wait(), timeout_s)
        except asyncio.TimeoutError:
            logger.warning("could not publish 'draining' within %.1f s ((etcd unreachable?))", timeout_s)

    async def leave(self, timeout_s: float = 2.0) -> None:
        """Stop refreshing and revoke the lease: the key is gone at once."""
        await stop(self._task, timeout_s)
        if self._lease is not None:
            try:
                await within(self._etcd.revoke(self._lease), timeout_s)
                logger.info("left the cluster %s", self.cluster)
            except (EtcdUnavailable, asyncio.TimeoutError):
                logger.warning("could not revoke the lease; the key expires within %d s", self.ttl_s)
        self.registered.clear()
        await self._etcd.close()

    def member(self) -> Member:
        member = self._describe()
        return replace(member, state=DRAINING) if self._draining else member

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._register()
                backoff = 0.1
                await self._refresh_forever()
            except EtcdUnavailable as exc:
                if self.registered.is_set():
                    logger.warning("directory %s: %s; still serving, will register again", self.cluster, exc.message)
                self.registered.clear()
                self._published = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff_s)

    async def _register(self) -> None:
        old = self._lease
        lease = await self._etcd.grant(self.ttl_s)
        self._lease = lease
        member = self.member()
        await self._etcd.put(self.cluster.key(member.id), member.to_json(), lease=lease)
        self._published_now(member)
        self.registered.set()
        logger.info("registered in %s as %s (%s, lease %x, ttl %d s)", self.cluster, member.id, member.state,
                    lease, self.ttl_s)
        if old is not None:  # a lease from before an outage, if etcd still has it: it holds no key now
            try:
                await self._etcd.revoke(old)
            except EtcdUnavailable:
                pass

    async def _refresh_forever(self) -> None:
        keepalive_every = self.ttl_s / 3
        next_keepalive = time.monotonic() + keepalive_every
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, min(self._refresh_s,
                                                                       next_keepalive - time.monotonic())))
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            if time.monotonic() >= next_keepalive:
                if not await self._etcd.keepalive(self._lease):
                    raise LeaseLost("our lease expired")
                next_keepalive = time.monotonic() + keepalive_every
            member = self.member()
            if member != self._published:
                await self._etcd.put(self.cluster.key(member.id), member.to_json(), lease=self._lease)
                if member.state != self._published.state or member.models != self._published.models:
                    logger.info("directory entry now %s with %s", member.state, _models_text(member))
                self._published_now(member)

    def _published_now(self, member: Member) -> None:
        self._published = member
        if member.state == DRAINING:
            self._drain_published.set()


def _models_text(member: Member) -> str:
    return ", ".join(f"{name} {'/'.join(m.get('versions', []))}" for name, m in sorted(member.models.items())) or "no models"
