"""Isolation between tenants under overload (issue 28): one tenant's flood costs another nothing.

    python benchmarks/tenants.py [--seconds 20]

One real server (``modelport serve --keys``) with the fixed-cost model (a request holds the model
20 ms, one at a time: a capacity C that does not depend on how busy the CPU is), two tenants:
A with a quota of 0.2 C requests/s, B without one. C is measured first, in the same run. Then,
open loop (requests sent on a clock, whatever the answers):

1. reference: B at 0.2 C beside A at its quota (0.2 C): B's p99;
2. flood: B at 0.2 C beside A at 3 C.

Figures, as ratios: B's p99 in the flood / in the reference (bar <= 1.5), B's failures (bar 0), A's
429s answered in < 20 ms at p99, A's admitted rate / its quota (bar 0.5-1.1), and anything else
that failed (bar 0).

``--cluster N``: then N workers in a cluster (real etcd), each enforcing its share of A's quota
(the quota / the workers it sees serving), and A sending at 3 x its quota through discovery
(``AsyncClient("etcd://...")``): the fleet's admitted rate / the quota (bar 0.9-1.1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from balancer import fixed_cost_bundle  # noqa: E402
from servers import Server  # noqa: E402

from modelport.server.tenants import digest_of  # noqa: E402

KEY_A, KEY_B = "mpk_bench-tenant-a-0123456789", "mpk_bench-tenant-b-0123456789"
BODY = json.dumps({"inputs": [{"name": "image", "shape": [1, 8, 8, 3], "datatype": "UINT8",
                               "data": [0] * 192}]}).encode()


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[int(0.99 * (len(ordered) - 1))] if ordered else float("nan")


async def send(session, url: str, key: str, results: list) -> None:
    start = time.monotonic()
    try:
        async with session.post(url, data=BODY, headers={"authorization": f"Bearer {key}"}) as response:
            await response.read()
            results.append((start, time.monotonic() - start, response.status))
    except Exception as exc:  # counted as a failure, never hidden
        results.append((start, time.monotonic() - start, type(exc).__name__))


async def open_loop(session, url: str, key: str, rate: float, seconds: float) -> list:
    """``rate`` requests a second for ``seconds``, each sent on its time whatever came back."""
    results: list = []
    tasks = []
    start = time.monotonic()
    for i in range(int(rate * seconds)):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(send(session, url, key, results)))
    await asyncio.gather(*tasks)
    return results


async def capacity(session, url: str, seconds: float = 5) -> float:
    done = 0
    stop = time.monotonic() + seconds

    async def loop() -> None:
        nonlocal done
        while time.monotonic() < stop:
            async with session.post(url, data=BODY, headers={"authorization": f"Bearer {KEY_B}"}) as response:
                await response.read()
                done += response.status == 200

    await asyncio.gather(*(loop() for _ in range(8)))
    return done / seconds


async def measure(url: str, seconds: float, c: float) -> dict:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        quota = 0.2 * c
        reference = await asyncio.gather(open_loop(session, url, KEY_B, 0.2 * c, seconds),
                                         open_loop(session, url, KEY_A, quota, seconds))
        await asyncio.sleep(2)
        flood = await asyncio.gather(open_loop(session, url, KEY_B, 0.2 * c, seconds),
                                     open_loop(session, url, KEY_A, 3 * c, seconds))
    return {"capacity": c, "quota": quota, "reference": reference, "flood": flood}


async def fleet_rate(url: str, quota: float, seconds: float) -> tuple[int, int, list[str]]:
    """A at 3 x its quota through discovery: (admitted, refused, other errors)."""
    import numpy as np

    from modelport import AsyncClient
    from modelport.errors import QuotaExceeded

    admitted = refused = 0
    errors: list[str] = []
    async with AsyncClient(url, model="fixed", api_key=KEY_A, timeout_s=30) as client:
        await client.discovery.start()
        start = time.monotonic()

        async def one() -> None:
            nonlocal admitted, refused
            try:
                await client.infer("fixed", {"image": np.zeros((1, 8, 8, 3), np.uint8)})
                admitted += 1
            except QuotaExceeded:
                refused += 1
            except Exception as exc:
                errors.append(type(exc).__name__)

        tasks = []
        for i in range(int(3 * quota * seconds)):
            delay = start + i / (3 * quota) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one()))
        await asyncio.gather(*tasks)
    return admitted, refused, errors


def cluster_run(workers: int, seconds: float, quota: float) -> None:
    from cluster import EtcdServer, registry
    from servers import stop_all, wait_until

    work = Path(tempfile.mkdtemp(prefix="modelport-tenants-cluster-"))
    (work / "etcd").mkdir()
    etcd = EtcdServer(work / "etcd").start()
    fixed_cost_bundle(work / "repo" / "fixed" / "1", 0.020)
    (work / "keys.toml").write_text(f'[tenants.a]\nkeys = ["{digest_of(KEY_A)}"]\nrequests_per_s = {quota}\n'
                                    f'burst = {max(1.0, quota / 4)}\n')
    url = etcd.url("tenants")
    servers = [Server(str(work / "repo"), "--keys", str(work / "keys.toml"), "--cluster", url, "--drain-s", "1",
                      "--log-level", "warning", log=work / f"w{i}.log") for i in range(workers)]
    try:
        for server in servers:
            server.wait_ready()
        wait_until(lambda: len(registry(url)[0]) == workers, 30, what="registered")
        time.sleep(2)  # each worker's directory sees the others
        admitted, refused, errors = asyncio.run(fleet_rate(url, quota, seconds))
    finally:
        stop_all(servers)
        etcd.close()
    ratio = admitted / seconds / quota
    print(f"\n{workers} workers, A's quota {quota:g} req/s shared among them, A at 3 x through discovery for {seconds:g} s: "
          f"admitted {admitted / seconds:.1f} req/s = {ratio:.2f} x the quota (bar 0.9-1.1: "
          f"{'met' if 0.9 <= ratio <= 1.1 else 'MISSED'}); {refused} refused 429, {len(errors)} other errors "
          f"{sorted(set(errors))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--cluster", type=int, default=0, help="also the fleet-wide quota with this many workers")
    parser.add_argument("--cluster-quota", type=float, default=30.0, help="A's quota in the cluster run, req/s")
    args = parser.parse_args()
    if args.cluster:
        cluster_run(args.cluster, args.seconds, args.cluster_quota)
        return
    work = Path(tempfile.mkdtemp(prefix="modelport-tenants-"))
    fixed_cost_bundle(work / "repo" / "fixed" / "1", 0.020)
    (work / "keys.toml").write_text(f'[tenants.a]\nkeys = ["{digest_of(KEY_A)}"]\n'
                                    f'[tenants.b]\nkeys = ["{digest_of(KEY_B)}"]\n')
    server = Server(str(work / "repo"), "--keys", str(work / "keys.toml"), "--log-level", "warning",
                    log=work / "server.log").wait_ready()
    url = server.url + "/v2/models/fixed/infer"
    try:
        async def run() -> dict:
            import aiohttp

            async with aiohttp.ClientSession() as session:
                for _ in range(20):
                    await send(session, url, KEY_B, [])
                c = await capacity(session, url)
            print(f"capacity C = {c:.1f} requests/s", flush=True)
            # A's quota, once C is known: the keys file is re-read on change (within a second).
            (work / "keys.toml").write_text(f'[tenants.a]\nkeys = ["{digest_of(KEY_A)}"]\n'
                                            f'requests_per_s = {0.2 * c:.3f}\nburst = {max(1.0, 0.05 * c):.3f}\n'
                                            f'[tenants.b]\nkeys = ["{digest_of(KEY_B)}"]\n')
            await asyncio.sleep(2)
            return await measure(url, args.seconds, c)

        figures = asyncio.run(run())
    finally:
        server.stop()
    report(figures, args.seconds)


def report(f: dict, seconds: float) -> None:
    cpu = " ".join(sorted(set(open("/proc/cpuinfo").read().split()) & {"avx2", "avx512_vnni", "amx_bf16"}))
    (b_ref, a_ref), (b_flood, a_flood) = f["reference"], f["flood"]
    b_ok_ref = [r[1] for r in b_ref if r[2] == 200]
    b_ok_flood = [r[1] for r in b_flood if r[2] == 200]
    b_failed = [r for r in b_ref + b_flood if r[2] != 200]
    a_refused = [r[1] for r in a_flood if r[2] == 429]
    a_admitted = [r for r in a_flood if r[2] == 200]
    other = [r for r in a_ref + a_flood if r[2] not in (200, 429)]
    ratio = p99(b_ok_flood) / p99(b_ok_ref)
    admitted = len(a_admitted) / seconds / f["quota"]
    print(f"\nCPU: 2 cores, {cpu}; capacity C {f['capacity']:.1f} req/s; A's quota {f['quota']:.1f} req/s; "
          f"{seconds:g} s per phase")
    print(f"B p99: flood {p99(b_ok_flood) * 1000:.1f} ms / reference {p99(b_ok_ref) * 1000:.1f} ms = {ratio:.2f} "
          f"(bar <= 1.5: {'met' if ratio <= 1.5 else 'MISSED'})")
    print(f"B failed: {len(b_failed)} of {len(b_ref) + len(b_flood)} (bar 0) {sorted({str(r[2]) for r in b_failed})}")
    print(f"A in the flood: {len(a_flood)} sent, {len(a_refused)} refused 429 (p99 {p99(a_refused) * 1000:.1f} ms, bar "
          f"< 20 ms: {'met' if p99(a_refused) < 0.020 else 'MISSED'}); admitted {len(a_admitted) / seconds:.1f} req/s = "
          f"{admitted:.2f} x its quota (bar 0.5-1.1: {'met' if 0.5 <= admitted <= 1.1 else 'MISSED'})")
    print(f"anything else failed: {len(other)} (bar 0) {sorted({str(r[2]) for r in other})}")


if __name__ == "__main__":
    main()
