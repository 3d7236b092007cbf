"""Client-side discovery against the HAProxy path, with the same workers, in one run.

    python benchmarks/discovery.py [--seconds 5] [--only-slow-worker | --only-stalls]

Fixed-cost model (a batch of one holds its worker for 20 ms without CPU; see balancer.py), so N
workers can give N times one worker's throughput on 2 cores. Figures, as ratios in the same run:

- throughput of the discovery client (`AsyncClient("etcd://...")`, 4 N requests in flight, over
  HTTP and over ZeroMQ) with N = 1, 2, 4, 8 workers / (N x the same client with one worker)
  (target >= 0.95), and over HTTP / the same client through `modelport balance` (target >= 1);
- p50, one request at a time, tiny model: discovery client / the same client through HAProxy
  (target < 1: one hop less);
- one worker of 4 stalling (SIGSTOP for 0.4 s every 2 s), 2 requests in flight: p99 with hedging
  ("p95") / p99 without (target <= 0.5), and the extra requests hedging sent (target <= 10 %);
- a registry change seen by the client: a new worker's first attempt after its key appears
  (target <= 1 s).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from balancer import BenchCluster, fixed_cost_bundle  # noqa: E402
from cluster import BalancerProcess, registry  # noqa: E402
from servers import Server, free_port, stop_all, wait_until  # noqa: E402

from modelport import AsyncClient  # noqa: E402
from modelport.server.cluster import worker_id  # noqa: E402

PIXELS = np.zeros((1, 8, 8, 3), np.uint8)
TENSOR = np.zeros((1, 3, 8, 8), np.float32)


async def closed_loop(url: str, concurrency: int, seconds: float, model: str = "fixed",
                      **options) -> tuple[float, list[float], AsyncClient]:
    latencies: list[float] = []
    async with AsyncClient(url, timeout_s=30, **options) as client:
        for _ in range(max(concurrency, 25)):  # warm: registry listed, connections open, latencies seen
            await client.infer(model, {"image": PIXELS})
        stop = time.monotonic() + seconds

        async def one() -> None:
            while time.monotonic() < stop:
                start = time.monotonic()
                await client.infer(model, {"image": PIXELS})
                latencies.append(time.monotonic() - start)

        start = time.monotonic()
        await asyncio.gather(*(one() for _ in range(concurrency)))
        return len(latencies) / (time.monotonic() - start), latencies, client


async def p50_one_at_a_time(url: str, count: int = 1500) -> float:
    async with AsyncClient(url, timeout_s=30) as client:
        for _ in range(50):
            await client.infer("tiny", {"image": TENSOR})
        times = []
        for _ in range(count):
            start = time.perf_counter()
            await client.infer("tiny", {"image": TENSOR})
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[int(0.99 * (len(ordered) - 1))]


def slow_worker_scenario(cluster: BenchCluster, seconds: float) -> None:
    """One worker of 2 whose model takes 10 x longer (200 ms), under enough load (8 in flight) that
    the fast one cannot take everything: power of two choices must send some requests to the slow
    one, and those make the tail that hedging (at the observed p95) can cut."""
    work, url = cluster.work, cluster.url
    fixed_cost_bundle(work / "slow-repo" / "fixed" / "1", seconds=0.2)
    cluster.grow_to(1)
    slow = Server(str(work / "slow-repo"), "--cluster", url, "--log-level", "warning", log=work / "slow.log",
                  zmq_port=free_port()).wait_ready()
    try:
        wait_until(lambda: worker_id(slow.port) in registry(url)[0], 30, what="slow worker registered")
        for in_flight in (2, 4, 8):
            _, plain, _ = asyncio.run(closed_loop(url, in_flight, seconds * 2))
            for hedge in ("p95", 50):
                _, hedged, client = asyncio.run(closed_loop(url, in_flight, seconds * 2, hedge_after_ms=hedge))
                extra = client.discovery.stats["hedges"] / client.discovery.stats["requests"]
                print(f"one worker of 2 ten times slower (200 ms), {in_flight} in flight: p99 "
                      f"{p99(hedged) * 1000:.1f} ms with hedging ({hedge}) / {p99(plain) * 1000:.1f} ms without = "
                      f"{p99(hedged) / p99(plain):.2f} (target <= 0.5); extra requests {extra:.1%} (target <= 10 %); "
                      f"hedges won {client.discovery.stats['hedges_won']}", flush=True)
    finally:
        slow.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5, help="per throughput level")
    parser.add_argument("--only-slow-worker", action="store_true", help="run only the slow-worker hedging scenario")
    parser.add_argument("--only-stalls", action="store_true", help="run only the stalling-worker hedging scenario")
    args = parser.parse_args()
    cluster = BenchCluster("discoverybench", zmq=True)
    fixed_cost_bundle(cluster.repo / "spiky" / "1", spike=0.03)
    work, url, workers = cluster.work, cluster.url, cluster.workers

    if args.only_slow_worker:
        try:
            slow_worker_scenario(cluster, args.seconds)
        finally:
            cluster.close()
        return
    balancer = BalancerProcess(url, work / "balancer.log")
    try:
        # -- throughput: discovery client against HAProxy, same workers ---------------------------------
        direct, zmq, proxied = {}, {}, {}
        for n in () if args.only_stalls else (1, 2, 4, 8):
            cluster.grow_to(n)
            wait_until(lambda: sum(v.startswith("UP") for v in balancer.servers().values()) == n, 30, what="UP")
            direct[n] = asyncio.run(closed_loop(url, 4 * n, args.seconds))[0]
            zmq[n] = asyncio.run(closed_loop(url, 4 * n, args.seconds, transport="zmq"))[0]
            proxied[n] = asyncio.run(closed_loop(balancer.url, 4 * n, args.seconds))[0]
            print(f"N={n}: discovery over HTTP {direct[n]:.0f} req/s = {direct[n] / (n * direct[1]):.2f} x N x one "
                  f"worker, over ZeroMQ {zmq[n]:.0f} req/s = {zmq[n] / (n * zmq[1]):.2f} x (target >= 0.95); "
                  f"HTTP discovery / HAProxy path ({proxied[n]:.0f} req/s) = {direct[n] / proxied[n]:.2f} "
                  f"(target >= 1)", flush=True)

        # -- latency, one request at a time ------------------------------------------------------------
        pairs = []
        for _ in range(0 if args.only_stalls else 3):
            d = asyncio.run(p50_one_at_a_time(url))
            p = asyncio.run(p50_one_at_a_time(balancer.url))
            pairs.append((d / p, d, p))
        if pairs:
            ratio, d, p = sorted(pairs)[1]
            print(f"p50 one at a time: discovery {d * 1000:.3f} ms / HAProxy path {p * 1000:.3f} ms = {ratio:.2f} "
                  f"(target < 1; median of 3 pairs)", flush=True)

        # -- hedging: one worker of 4 stalls now and then (SIGSTOP 0.4 s every 2 s) ---------------------
        stop_all(workers[4:])
        del workers[4:]
        cluster.grow_to(4)
        staller = workers[3]
        stalling = threading.Event()

        def stall() -> None:
            while not stalling.wait(1.6):
                staller.proc.send_signal(signal.SIGSTOP)
                time.sleep(0.4)
                staller.proc.send_signal(signal.SIGCONT)

        def with_stalls(**options):
            stalling.clear()
            thread = threading.Thread(target=stall, daemon=True)
            thread.start()
            try:
                return asyncio.run(closed_loop(url, 2, args.seconds * 2, **options))
            finally:
                stalling.set()
                thread.join()
                staller.proc.send_signal(signal.SIGCONT)

        def report(what: str, plain: list[float], hedged: list[float], client) -> None:
            extra = client.discovery.stats["hedges"] / client.discovery.stats["requests"]
            print(f"{what}: p99 {p99(hedged) * 1000:.1f} ms with hedging (p95) / {p99(plain) * 1000:.1f} ms without "
                  f"= {p99(hedged) / p99(plain):.2f} (target <= 0.5); extra requests {extra:.1%} (target <= 10 %); "
                  f"hedges won {client.discovery.stats['hedges_won']}", flush=True)

        _, plain, _ = with_stalls()
        _, hedged, client = with_stalls(hedge_after_ms="p95")
        report("one worker of 4 stalling", plain, hedged, client)
        _, plain, _ = asyncio.run(closed_loop(url, 2, args.seconds * 2, model="spiky"))
        _, hedged, client = asyncio.run(closed_loop(url, 2, args.seconds * 2, model="spiky", hedge_after_ms="p95"))
        report("every worker: 3 % of requests 10x slower", plain, hedged, client)
        if args.only_stalls:
            return

        # -- a registry change seen by the client ---------------------------------------------------------
        async def join_time() -> float:
            async with AsyncClient(url, timeout_s=30) as client:
                stop = asyncio.Event()

                async def load() -> None:
                    while not stop.is_set():
                        await client.infer("fixed", {"image": PIXELS})

                tasks = [asyncio.ensure_future(load()) for _ in range(8)]
                new = cluster.start_worker()
                new_id = worker_id(new.port)
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, lambda: wait_until(lambda: new_id in registry(url)[0], 60,
                                                                    every_s=0.005, what="registered"))
                registered = time.monotonic()
                while client.discovery.attempts[new_id] == 0:
                    await asyncio.sleep(0.002)
                took = time.monotonic() - registered
                stop.set()
                await asyncio.gather(*tasks)
                return took

        took = asyncio.run(join_time())
        print(f"a new worker's first request from the client after its key appeared: {took:.3f} s = "
              f"{took:.2f} x the 1 s target", flush=True)
    finally:
        balancer.stop()
        cluster.close()


if __name__ == "__main__":
    main()
