"""Overload: the default model offered twice its capacity, open loop, for a bounded time.

    python benchmarks/overload.py [--seconds 60]

RELIABILITY.md: goodput stays near capacity, accepted requests keep a bounded p99, memory does
not grow, the queue never exceeds its bound, refusals are immediate 503s with Retry-After.
Capacity is measured first in the same run (closed loop, 32 in flight).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
import loadgen  # noqa: E402
from common import photo_files  # noqa: E402
from http_server import free_port, multipart, start_server  # noqa: E402
from repository import rss_mb  # noqa: E402

from modelport.packaged import default_model  # noqa: E402

QUEUE = 64


async def open_loop(port: int, requests: list[bytes], rate: float, seconds: float):
    """Send at a fixed rate whatever the answers do; each request on its own connection slot."""
    results: list[tuple[int, float]] = []
    pool: asyncio.Queue = asyncio.Queue()
    for _ in range(512):
        pool.put_nowait(None)

    async def one(raw: bytes) -> None:
        conn = await pool.get()
        try:
            if conn is None:
                conn = await asyncio.open_connection("127.0.0.1", port)
            reader, writer = conn
            start = time.perf_counter()
            writer.write(raw)
            status, _ = await loadgen._read_response(reader)
            results.append((status, time.perf_counter() - start))
        except (ConnectionError, asyncio.IncompleteReadError):
            conn = None
            results.append((0, 0.0))
        finally:
            pool.put_nowait(conn)

    tasks = []
    start = time.perf_counter()
    i = 0
    while (now := time.perf_counter()) - start < seconds:
        due = start + i / rate
        if due > now:
            await asyncio.sleep(due - now)
        tasks.append(asyncio.ensure_future(one(requests[i % len(requests)])))
        i += 1
    await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


def queue_depth(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("modelport_queue_depth{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    default_model.ensure_default_model()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        datas = [p.read_bytes() for p in photo_files(tmp / "photos")]
        raws = []
        for data in datas:
            body, content_type = multipart(data)
            raws.append(loadgen.request_bytes("POST", "/?k=1", body, {"Content-Type": content_type}))
        port = free_port()
        proc, _ = start_server(["--max-queue-size", str(QUEUE)], port, tmp / "server.log")
        url = f"http://127.0.0.1:{port}"
        capacity = loadgen.run(port, [(r, lambda b: True) for r in raws], concurrency=32, count=400).throughput
        rss_idle = rss_mb(proc.pid)
        # A first short overload grows the working set once (hundreds of connections, buffers,
        # allocator arenas); growth after that would be a leak.
        asyncio.run(open_loop(port, raws, 2 * capacity, 10))
        rss_before = rss_mb(proc.pid)

        depths = []
        stop = False

        def sample() -> None:
            while not stop:
                depths.append(queue_depth(url))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample)
        sampler.start()
        results, elapsed = asyncio.run(open_loop(port, raws, 2 * capacity, args.seconds))
        stop = True
        sampler.join()
        rss_after = rss_mb(proc.pid)
        proc.terminate()
        proc.wait(timeout=60)

    ok = [t for s, t in results if s == 200]
    refused = [t for s, t in results if s == 503]
    other = [s for s, _ in results if s not in (200, 503)]
    print(f"capacity (closed loop, 32 in flight) {capacity:.1f} img/s; offered {2 * capacity:.1f} req/s for "
          f"{args.seconds:.0f} s, queue bound {QUEUE}")
    print(f"goodput {len(ok) / elapsed:.1f} img/s = {len(ok) / elapsed / capacity:.2f} x capacity; "
          f"accepted p50 {statistics.median(ok) * 1000:.0f} ms, p99 {sorted(ok)[int(0.99 * len(ok))] * 1000:.0f} ms")
    print(f"refused {len(refused)} (503), answered in p50 {statistics.median(refused) * 1000:.1f} ms, "
          f"p99 {sorted(refused)[int(0.99 * len(refused))] * 1000:.1f} ms; other statuses: {sorted(set(other)) or 'none'}")
    print(f"queue depth: max {max(depths):.0f} of the bound {QUEUE}; server RSS {rss_idle:.0f} MB idle, "
          f"{rss_before:.0f} MB after a 10 s overload warm-up, {rss_after:.0f} MB after the {args.seconds:.0f} s run "
          f"({(rss_after / rss_before - 1) * 100:+.1f} %)")


if __name__ == "__main__":
    main()
