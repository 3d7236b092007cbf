"""One look at the member directory, for scripts: ``modelport cluster ls`` and ``modelport resolve``.

Who the workers are comes from etcd; how busy they are, from the workers themselves (the load
every answer carries, ``protocol/load.py``): the directory holds no load.
"""

from __future__ import annotations

import asyncio

import httpx

from modelport.cluster.discovery import Discovery
from modelport.cluster.members import ClusterURL, Member
from modelport.protocol.load import HEADER, Load, from_text


async def read_members(cluster: ClusterURL) -> tuple[list[Member], dict[str, str]]:
    """Every registered member, by key; and the keys whose value is no member, with the reason."""
    etcd = cluster.etcd()
    try:
        values, _ = await etcd.list(cluster.prefix)
    finally:
        await etcd.close()
    members, skipped = [], {}
    for key, raw in sorted(values.items()):
        try:
            members.append(Member.from_json(raw))
        except ValueError as exc:
            skipped[key] = str(exc)
    return members, skipped


async def find_workers(cluster: ClusterURL, model: str, version: str | None, transport: str) -> list[Member]:
    """The workers that serve MODEL (at VERSION, a number or label) now, least loaded first."""
    # never connects: it only lists the candidates a client would choose from
    discovery = Discovery(cluster, transport=transport, connect=lambda address: None, timeout_s=5)
    try:
        await discovery.start()
        candidates = discovery.candidates(model, version)
    finally:
        await discovery.close()
    loads = await ask_loads(candidates)
    return sorted(candidates, key=lambda m: (loads[m.id].in_flight if loads[m.id] else float("inf"), m.id))


async def ask_loads(members: list[Member], timeout_s: float = 1.0) -> dict[str, Load | None]:
    """Each worker's load, asked of the worker (its health check's answer carries it); None for a
    worker that did not answer within ``timeout_s`` or does not report one."""
    async with httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(max_connections=64)) as http:
        async def ask(member: Member) -> tuple[str, Load | None]:
            try:
                response = await http.get(member.http + "/v2/health/live")
            except httpx.HTTPError:
                return member.id, None
            return member.id, from_text(response.headers.get(HEADER))

        return dict(await asyncio.gather(*(ask(m) for m in members)))
