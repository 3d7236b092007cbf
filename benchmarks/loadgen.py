"""A small closed-loop HTTP/1.1 load generator: keep-alive connections, raw sockets, no client library.

Each of ``concurrency`` connections sends its next request as soon as the previous answer is in.
The client costs little CPU, so the server, not the client, is what gets measured.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from typing import Callable


@dataclass
class Result:
    latencies_s: list[float]
    elapsed_s: float
    errors: int
    wrong: int

    @property
    def throughput(self) -> float:
        return len(self.latencies_s) / self.elapsed_s

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies_s)


def request_bytes(method: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        if line.lower().startswith("content-length:"):
            length = int(line.split(":", 1)[1])
    body = await reader.readexactly(length)
    return status, body


async def _run(port: int, requests: list[tuple[bytes, Callable[[bytes], bool]]], concurrency: int,
               count: int) -> Result:
    latencies: list[float] = []
    errors = wrong = 0
    next_index = 0

    async def connection() -> None:
        nonlocal next_index, errors, wrong
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while next_index < count:
                raw, check = requests[next_index % len(requests)]
                next_index += 1
                start = time.perf_counter()
                writer.write(raw)
                status, body = await _read_response(reader)
                latencies.append(time.perf_counter() - start)
                if status != 200:
                    errors += 1
                elif not check(body):
                    wrong += 1
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return Result(latencies, time.perf_counter() - start, errors, wrong)


def run(port: int, requests: list[tuple[bytes, Callable[[bytes], bool]]], *, concurrency: int, count: int) -> Result:
    return asyncio.run(_run(port, requests, concurrency, count))
