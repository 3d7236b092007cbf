"""The load loops: open (a schedule of arrivals) and closed (a number of requests in flight).

Open loop: every request has a planned send time, fixed before the run (Poisson or evenly spaced
arrivals), and its latency is measured **from that planned time**, not from when it actually left:
a server that stalls cannot hide the requests it delayed (no coordinated omission, as in wrk2 /
HdrHistogram). How late each request actually left is recorded too (the schedule error): when it
grows, the generator, not the server, is falling behind, and the report says so.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Sequence

from modelport.bench.protocols import Answer, Failure


@dataclass
class Sample:
    planned: float  # seconds from the start
    sent: float
    done: float
    image: int
    answer: Answer | None = None
    error: str | None = None

    @property
    def latency_s(self) -> float:
        return self.done - self.planned


@dataclass
class Run:
    mode: str  # "open" or "closed"
    offered: float | None  # requests a second planned (open loop)
    concurrency: int | None
    duration_s: float
    samples: list[Sample] = field(default_factory=list)
    unsent: int = 0  # planned but never sent: the generator could not keep up (open loop)


_SPIN_S = 0.0015


async def open_loop(target, requests: Sequence, rate: float, duration_s: float, *, arrivals: str = "poisson",
                    seed: int = 0, max_in_flight: int = 10_000) -> Run:
    if arrivals == "constant":  # k / rate, not a running sum: no drift from adding up 1 / rate
        planned = [k / rate for k in range(int(rate * duration_s) + 1) if k / rate < duration_s]
    else:
        rng = random.Random(seed)
        planned, t = [], rng.expovariate(rate)
        while t < duration_s:
            planned.append(t)
            t += rng.expovariate(rate)
    run = Run("open", rate, None, duration_s)
    in_flight: set[asyncio.Task] = set()
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i, at in enumerate(planned):
        delay = start + at - loop.time()
        if delay > _SPIN_S:
            await asyncio.sleep(delay - _SPIN_S)
        # The event loop's poll waits whole milliseconds (a sleep ends up to 1 ms late): the last
        # stretch is spent yielding, so requests leave on time and responses are still read.
        while loop.time() < start + at:
            await asyncio.sleep(0)
        if len(in_flight) >= max_in_flight:
            run.unsent += 1
            continue
        task = loop.create_task(_one(target, requests, i % len(requests), at, start, loop, run))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.gather(*in_flight)
    return run


async def closed_loop(target, requests: Sequence, concurrency: int, duration_s: float) -> Run:
    run = Run("closed", None, concurrency, duration_s)
    loop = asyncio.get_running_loop()
    start = loop.time()
    counter = iter(range(10**12))

    async def worker() -> None:
        while loop.time() - start < duration_s:
            i = next(counter)
            await _one(target, requests, i % len(requests), loop.time() - start, start, loop, run)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return run


async def _one(target, requests, image: int, planned: float, start: float, loop, run: Run) -> None:
    sent = loop.time() - start
    sample = Sample(planned, sent, sent, image)
    try:
        sample.answer = await target.send(requests[image])
    except Failure as exc:
        sample.error = exc.kind
    except Exception as exc:  # a client-side surprise is still an error of this request, not of the run
        sample.error = f"client: {type(exc).__name__}"
    sample.done = loop.time() - start
    run.samples.append(sample)
