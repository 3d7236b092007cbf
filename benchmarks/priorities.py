"""Issue 28's figure for priority classes: the high class keeps its latency while the batch class
overloads the server twice over.

    python benchmarks/priorities.py [--seconds 8] [--slo-ms 100] [--cost "0.002 0.020"] [--json out.json]

One `modelport serve --latency-slo-ms` holds a Python model whose batches cost ``a * rows + b``
seconds (``tests/test_slo.py``'s cost model, max_batch_size 8). The load comes over HTTP from this
process (raw sockets, open loop, Poisson arrivals), each request carrying ``X-Modelport-Priority``:
1. capacity C: closed loop, 16 normal requests in flight (a refused one waits 5 ms and goes again);
2. high alone at 0.2 x C: its unloaded p99;
3. high at 0.2 x C and batch at 1.8 x C at once: high's p99 / its unloaded p99 (bar <= 2), high's
   success rate (bar >= 0.99), the batch class's answers and refusals.
Every figure is a ratio to something measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
import loadgen  # noqa: E402
from servers import Server  # noqa: E402
from test_slo import cost_bundle  # noqa: E402

PATH = "/v2/models/cost/infer"


def request(priority: str) -> bytes:
    pixels = np.full((8, 8, 3), 255, np.uint8)
    body = json.dumps({"inputs": [{"name": "image", "shape": [1, 8, 8, 3], "datatype": "UINT8",
                                   "data": pixels.ravel().tolist()}]}).encode()
    return loadgen.request_bytes("POST", PATH, body, {"Content-Type": "application/json",
                                                      "X-Modelport-Priority": priority})


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bool, bool]:
    """(status, whether it carried Retry-After, whether the server closes the connection) of one
    response. A request refused before its body was read is answered with the connection closed."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower().split("\r\n")
    length = next((int(line.split(":", 1)[1]) for line in head if line.startswith("content-length:")), 0)
    await reader.readexactly(length)
    return (int(head[0].split()[1]), any(line.startswith("retry-after:") for line in head),
            "connection: close" in head)


class Connections:
    """Keep-alive connections to the server, opened as needed and reused."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def send(self, raw: bytes) -> tuple[int, bool, float]:
        """(status, Retry-After given, seconds); status 0 for a broken connection. A kept-alive
        connection the server has closed meanwhile (idle timeout) is replaced once, as clients do."""
        start = time.perf_counter()
        reused = bool(self._idle)
        while True:
            reader, writer = self._idle.pop() if self._idle else await asyncio.open_connection("127.0.0.1", self.port)
            try:
                writer.write(raw)
                status, retry_after, closing = await _answer(reader)
                break
            except (ConnectionError, asyncio.IncompleteReadError):
                writer.close()
                if not reused:
                    return 0, False, time.perf_counter() - start
                reused = False
                self._idle.clear()  # as old as the one that failed, or older
        if closing:
            writer.close()
        else:
            self._idle.append((reader, writer))
        return status, retry_after, time.perf_counter() - start


async def closed_loop(connections: Connections, raw: bytes, in_flight: int, seconds: float) -> tuple[float, dict]:
    """Answers per second with ``in_flight`` requests always out, and the count of each status."""
    statuses: dict[int, int] = {}
    end = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < end:
            status, _, _ = await connections.send(raw)
            statuses[status] = statuses.get(status, 0) + 1
            if status != 200:
                await asyncio.sleep(0.005)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return statuses.get(200, 0) / (time.perf_counter() - start), statuses


async def open_loop(connections: Connections, rates: dict[str, float], seconds: float,
                    rng: np.random.Generator) -> dict[str, dict]:
    """Poisson arrivals of each class at its rate (per second), whatever the answers do."""
    arrivals = []
    for priority, rate in rates.items():
        times = np.cumsum(rng.exponential(1 / rate, int(rate * seconds * 1.5) + 10))
        arrivals += [(t, priority) for t in times[times < seconds]]
    arrivals.sort()
    raws = {priority: request(priority) for priority in rates}
    results = {priority: {"sent": 0, "latencies_s": [], "statuses": {}, "retry_after": 0} for priority in rates}

    async def one(priority: str) -> None:
        status, retry_after, seconds_taken = await connections.send(raws[priority])
        result = results[priority]
        result["statuses"][status] = result["statuses"].get(status, 0) + 1
        result["retry_after"] += retry_after
        if status == 200:
            result["latencies_s"].append(seconds_taken)

    tasks = []
    start = time.perf_counter()
    for due, priority in arrivals:
        delay = start + due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        results[priority]["sent"] += 1
        tasks.append(asyncio.ensure_future(one(priority)))
    await asyncio.gather(*tasks)
    return results


def p99(result: dict) -> float:
    return float(np.percentile(result["latencies_s"], 99))


async def measure(port: int, seconds: float) -> dict:
    connections = Connections(port)
    rng = np.random.default_rng(28)
    normal = request("normal")
    await closed_loop(connections, normal, 16, 1.0)  # warm-up: the cost line is learnt from real batches
    capacity, statuses = await closed_loop(connections, normal, 16, 3.0)
    print(f"capacity C (closed loop, 16 in flight) {capacity:.0f} req/s, statuses {statuses}", flush=True)
    alone = await open_loop(connections, {"high": 0.2 * capacity}, seconds, rng)
    print(f"high alone at 0.2 x C: p99 {p99(alone['high']) * 1000:.1f} ms, statuses {alone['high']['statuses']}",
          flush=True)
    loaded = await open_loop(connections, {"high": 0.2 * capacity, "batch": 1.8 * capacity}, seconds, rng)
    return {"capacity_per_s": capacity, "alone": alone, "loaded": loaded}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8, help="per open-loop phase")
    parser.add_argument("--slo-ms", type=float, default=100)
    parser.add_argument("--cost", default="0.002 0.020", help='"a b": a batch costs a * rows + b seconds')
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cost_bundle(tmp / "repo" / "cost" / "1", args.cost, max_batch_size=8, max_delay_ms=0)
        server = Server(str(tmp / "repo"), "--latency-slo-ms", f"{args.slo_ms:g}", "--log-level", "warning",
                        log=tmp / "server.log").wait_ready()
        try:
            figures = asyncio.run(measure(server.port, args.seconds))
        finally:
            server.stop()
    alone, high, batch = figures["alone"]["high"], figures["loaded"]["high"], figures["loaded"]["batch"]
    elapsed = args.seconds
    verdict = {
        "high_p99_over_unloaded_p99": p99(high) / p99(alone),  # bar <= 2
        "high_success_rate": len(high["latencies_s"]) / high["sent"],  # bar >= 0.99
        "high_p99_over_slo": p99(high) * 1000 / args.slo_ms,
        "batch_success_rate": len(batch["latencies_s"]) / batch["sent"],
        "goodput_over_c": (len(high["latencies_s"]) + len(batch["latencies_s"])) / elapsed / figures["capacity_per_s"],
    }
    print(f"high 0.2 x C + batch 1.8 x C, {elapsed:g} s, SLO {args.slo_ms:g} ms:")
    print(f"  high:  sent {high['sent']}, answered {len(high['latencies_s'])}, statuses {high['statuses']}; "
          f"p99 {p99(high) * 1000:.1f} ms = {verdict['high_p99_over_unloaded_p99']:.2f} x its unloaded p99 (bar 2); "
          f"success {verdict['high_success_rate']:.4f} (bar 0.99)")
    refused = batch["statuses"].get(503, 0)
    print(f"  batch: sent {batch['sent']}, answered {len(batch['latencies_s'])} "
          f"(p99 {p99(batch) * 1000:.1f} ms), refused {refused} (503, {batch['retry_after']} with Retry-After), "
          f"statuses {batch['statuses']}")
    print(f"  goodput {verdict['goodput_over_c']:.2f} x C")
    print("verdict:", json.dumps(verdict))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "figures": figures,
                                         "verdict": verdict}, indent=1, default=str))


if __name__ == "__main__":
    main()
