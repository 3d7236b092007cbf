"""The few etcd v3 operations modelport uses, behind one small class.

Over ``aetcd`` (asyncio gRPC; chosen by measurement, see docs/decisions.md). The rest of the code
talks about members, not keys and leases: ``members.py`` and ``membership.py`` are the only users.
Every failure to reach etcd (down, frozen, restarting) is raised as ``EtcdUnavailable``; the next
call opens a fresh connection, so callers just retry with their own backoff.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator

from modelport.errors import MissingExtra, Unavailable


class EtcdUnavailable(Unavailable):
    kind = "registry_unavailable"


async def within(awaitable, seconds: float):
    """``awaitable``'s result, or ``asyncio.TimeoutError`` after ``seconds``, whatever it does.

    ``asyncio.wait_for`` waits for a timed-out (or cancelled) operation to finish cancelling, and a
    gRPC aio call or channel close may never do so (grpc/grpc#29560, #32005): a full test run
    hung for minutes in a client's close. Here a late operation is cancelled and left behind.
    """
    task = asyncio.ensure_future(awaitable)
    task.add_done_callback(_consume)
    try:
        done, _ = await asyncio.wait([task], timeout=seconds)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        raise asyncio.TimeoutError
    return task.result()


async def stop(task: asyncio.Task | None, seconds: float) -> None:
    """Cancel a task that may be inside an etcd call and wait for it at most ``seconds``: a watch
    read does not always notice the cancel until its channel is closed."""
    if task is not None:
        task.cancel()
        await asyncio.wait([task], timeout=seconds)


def _consume(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a late failure of an abandoned call is not worth a log line


@dataclass(frozen=True)
class Change:
    key: str
    value: bytes | None  # None: the key was deleted (or its lease expired)
    revision: int


def client_library():
    try:
        import aetcd
    except ImportError:
        raise MissingExtra("the cluster features need aetcd: pip install 'modelport[cluster]'") from None
    return aetcd


class Etcd:
    def __init__(self, host: str, port: int, *, timeout_s: float = 2.0) -> None:
        self.host, self.port = host, port
        self.timeout_s = timeout_s
        self._aetcd = client_library()
        self._client = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    async def list(self, prefix: str) -> tuple[dict[str, bytes], int]:
        """Every key under ``prefix`` with its value, and the store's revision at that moment."""
        result = await self._call(lambda c: c.get_prefix(prefix.encode()))
        return {kv.key.decode(errors="replace"): kv.value for kv in result}, result.header.revision

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> None:
        await self._call(lambda c: c.put(key.encode(), value, lease=lease))

    async def delete(self, key: str) -> None:
        await self._call(lambda c: c.delete(key.encode()))

    async def grant(self, ttl_s: int) -> int:
        lease = await self._call(lambda c: c.lease(ttl_s))
        return lease.id

    async def keepalive(self, lease: int) -> bool:
        """Refresh a lease once; False when etcd no longer knows it (it expired)."""
        reply = await self._call(lambda c: c.refresh_lease(lease))
        return reply is not None and reply.TTL > 0

    async def revoke(self, lease: int) -> None:
        await self._call(lambda c: c.revoke_lease(lease))

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[Change]:
        """Changes under ``prefix`` from ``start_revision`` on, until the watch breaks
        (``EtcdUnavailable``): then list again and watch from the new revision."""
        aetcd = self._aetcd
        watch = await self._call(lambda c: c.watch_prefix(prefix.encode(), start_revision=start_revision))
        try:
            async for event in watch:
                value = event.kv.value if event.kind == aetcd.EventKind.PUT else None
                yield Change(event.kv.key.decode(errors="replace"), value, event.kv.mod_revision)
        except aetcd.ClientError as exc:
            await self._reset()
            raise EtcdUnavailable(f"etcd at {self.endpoint}: watch broken: {type(exc).__name__}") from None
        finally:
            if self._client is not None:
                try:
                    await within(watch.cancel(), self.timeout_s)
                except Exception:  # the connection is already gone: nothing to cancel
                    pass
        await self._reset()
        raise EtcdUnavailable(f"etcd at {self.endpoint}: watch ended")

    async def close(self) -> None:
        await self._reset()

    async def _call(self, operation):
        aetcd = self._aetcd
        if self._client is None:
            self._client = aetcd.Client(host=self.host, port=self.port, timeout=self.timeout_s)
        try:
            # aetcd's own timeout covers each gRPC call; this one also covers connecting to an
            # etcd that accepts the connection but never answers (frozen).
            return await within(operation(self._client), self.timeout_s * 2)
        except (aetcd.ClientError, asyncio.TimeoutError, OSError) as exc:
            await self._reset()
            raise EtcdUnavailable(f"etcd at {self.endpoint} unreachable: {type(exc).__name__}") from None

    async def _reset(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await within(client.close(), self.timeout_s)
            except Exception:  # closing a broken channel: nothing more to do
                pass
