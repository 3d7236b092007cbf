"""One look at the member directory, for scripts: ``modelport cluster ls`` and ``modelport resolve``."""

from __future__ import annotations

from modelport.cluster.discovery import Discovery
from modelport.cluster.members import ClusterURL, Member


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
    return sorted(candidates, key=lambda m: (m.total_load, m.id))
