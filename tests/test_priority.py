"""Priority classes in the engine: batches fill from the most urgent class, a full queue and the early
refusal shed the least urgent first, and SLO batching plans for the urgent class.

In-process: the batcher with runtimes held by a gate or of controlled cost, then a real
``ModelService`` with a Python model of controlled cost under twice its capacity. The class is set
the way a front-end sets it: ``priority.set_current`` in the request's own task.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from modelport.engine import priority
from modelport.engine.batching import Batcher
from modelport.engine.model import Model
from modelport.engine.priority import Priority
from modelport.engine.servable import Timing
from modelport.engine.service import ModelService
from modelport.engine.slo import Planner
from modelport.errors import Overloaded

from test_batching import Runtime
from servers import in_fresh_process
from test_slo import CostRuntime, cost_bundle

HIGH, NORMAL, BATCH = Priority.HIGH, Priority.NORMAL, Priority.BATCH


def as_class(cls: Priority, coroutine):
    """Run ``coroutine`` as a request of class ``cls``, in a task of its own (as each request runs)."""

    async def request():
        priority.set_current(cls)
        return await coroutine

    return asyncio.ensure_future(request())


def judged(cls: Priority, call):
    """``call()`` (an admission check) made by a request of class ``cls``; the caller's class is kept."""

    def as_request():
        priority.set_current(cls)
        return call()

    return contextvars.copy_context().run(as_request)


async def held(runtime: Runtime, **settings) -> tuple[Batcher, asyncio.Future]:
    """A batcher whose runtime holds its first batch (request 0) until the gate opens."""
    b = Batcher(runtime, **{"max_batch_size": 2, "max_delay_ms": 0, "max_queue_size": 100, **settings})
    b.start()
    runtime.gate.clear()
    first = asyncio.ensure_future(b.submit(0))
    await runtime.started.wait()
    return b, first


async def queue(b: Batcher, *requests: tuple[Priority, int]) -> list[asyncio.Future]:
    """Submit each (class, value) in this order; return once all are queued."""
    futures = []
    for cls, value in requests:
        futures.append(as_class(cls, b.submit(value)))
        await asyncio.sleep(0)  # each reaches the queue before the next starts
    await asyncio.sleep(0)
    return futures


# -- order ---------------------------------------------------------------------------------------------

async def test_a_high_request_queued_after_batch_ones_is_served_first():
    runtime = Runtime()
    b, first = await held(runtime)
    rest = await queue(b, (BATCH, 1), (BATCH, 2), (NORMAL, 3), (BATCH, 4), (HIGH, 9), (NORMAL, 5))
    runtime.gate.set()
    assert await asyncio.gather(first, *rest) == [0, 10, 20, 30, 40, 90, 50]
    # Most urgent first, oldest first within a class; lower classes fill what a batch has left.
    assert runtime.batches == [[0], [9, 3], [5, 1], [2, 4]]
    await b.close()


async def test_with_every_request_normal_batches_are_first_come_first_served():
    runtime = Runtime()
    b, first = await held(runtime)
    rest = await queue(b, *((NORMAL, i) for i in range(1, 6)))
    runtime.gate.set()
    assert await asyncio.gather(first, *rest) == [0, 10, 20, 30, 40, 50]
    assert runtime.batches == [[0], [1, 2], [3, 4], [5]]
    await b.close()


async def test_a_lower_class_waits_behind_a_higher_one_and_then_runs():
    runtime = Runtime()
    b, first = await held(runtime, max_batch_size=1)
    waiting = await queue(b, (BATCH, 1))
    highs = await queue(b, *((HIGH, i) for i in range(2, 5)))
    runtime.gate.set()
    assert await asyncio.gather(first, *waiting, *highs) == [0, 10, 20, 30, 40]
    assert runtime.batches == [[0], [2], [3], [4], [1]]  # last, but served: high load ended
    await b.close()


# -- a full queue --------------------------------------------------------------------------------------

async def test_a_full_queue_gives_the_newest_lowest_class_place_to_a_more_urgent_request():
    runtime = Runtime()
    b, first = await held(runtime, max_batch_size=1, max_queue_size=3)
    queued = await queue(b, (BATCH, 1), (BATCH, 2), (NORMAL, 3))
    # A batch request finds the queue full of its class and above: refused, nothing shed ...
    with pytest.raises(Overloaded, match="queue full"):
        judged(BATCH, b.admit)
    assert b.queued == 3 and not any(f.done() for f in queued)
    # ... a high one passes the check before its body is read, and sheds only once admitted.
    judged(HIGH, b.check)
    assert not any(f.done() for f in queued)
    urgent = as_class(HIGH, _admitted(b, 9))
    await asyncio.sleep(0.01)
    assert queued[1].done() and not queued[0].done() and not queued[2].done()  # the newest batch one
    with pytest.raises(Overloaded, match="given to a request of class high") as info:
        await queued[1]
    assert info.value.headers()["Retry-After"] == "1"
    runtime.gate.set()
    assert await asyncio.gather(first, urgent, queued[2], queued[0]) == [0, 90, 30, 10]
    assert runtime.batches == [[0], [9], [3], [1]]  # the shed one was never computed
    await b.close()


async def test_a_full_queue_of_its_own_class_and_above_refuses_a_request():
    runtime = Runtime()
    b, first = await held(runtime, max_batch_size=1, max_queue_size=3)
    queued = await queue(b, (HIGH, 1), (NORMAL, 2), (BATCH, 3))
    judged(NORMAL, b.check)  # one place held by a lower class: it can be had
    queued += await queue(b, (NORMAL, 4))  # (submitted without admission: the queue holds 4 now)
    with pytest.raises(Overloaded, match=r"queue full \(3 requests waiting\)$"):
        judged(NORMAL, b.check)  # 3 of its own class and above: full for it, whatever lies below
    runtime.gate.set()
    assert await asyncio.gather(first, *queued) == [0, 10, 20, 30, 40]
    await b.close()


async def test_a_place_held_by_a_request_still_decoding_can_be_shed():
    runtime = Runtime()
    b, first = await held(runtime, max_batch_size=1, max_queue_size=2)
    queued = await queue(b, (NORMAL, 1))
    decoded = asyncio.Event()
    outcome = {}

    async def slow_batch_request():
        try:
            with b.admit():
                await decoded.wait()  # decoding while the high request arrives
            outcome["batch"] = await b.submit(2)
        except Overloaded as exc:
            outcome["batch"] = exc

    slow = as_class(BATCH, slow_batch_request())
    await asyncio.sleep(0)
    urgent = as_class(HIGH, _admitted(b, 9))
    await asyncio.sleep(0)
    decoded.set()
    runtime.gate.set()
    assert await asyncio.gather(first, urgent, *queued) == [0, 90, 10]
    await slow
    assert isinstance(outcome["batch"], Overloaded) and [2] not in runtime.batches
    await b.close()


async def _admitted(b: Batcher, value: int):
    with b.admit():
        pass
    return await b.submit(value)


# -- early refusal -------------------------------------------------------------------------------------

async def test_the_slo_refusal_sheds_the_batch_class_before_the_high_one():
    runtime = CostRuntime(a=0.0, b=0.030)  # 30 ms a batch; 100 ms SLO: 79 ms to plan for
    planner = Planner(max_batch_size=1, max_delay_ms=0, latency_slo_ms=100, first_batch_s=0.030)
    b = Batcher(runtime, max_batch_size=1, max_delay_ms=0, max_queue_size=100, planner=planner)
    b.start()
    runtime.gate.clear()
    first = asyncio.ensure_future(b.submit(0))
    await runtime.started.wait()
    # One batch request fits behind the running batch (30 + 30); a second does not (+ 30 = 90).
    judged(BATCH, b.check)
    waiting = await queue(b, (BATCH, 1))
    with pytest.raises(Overloaded, match="latency SLO of 100 ms"):
        judged(BATCH, b.check)
    # With that same queue a high request is admitted: the batch one is not ahead of it ...
    judged(HIGH, b.check)
    highs = await queue(b, (HIGH, 2))
    # ... and a second high one is refused: high work alone would now miss.
    with pytest.raises(Overloaded, match="latency SLO of 100 ms"):
        judged(HIGH, b.check)
    runtime.gate.set()
    assert await asyncio.gather(first, *highs, *waiting) == [0, 20, 10]
    assert runtime.batches == [1, 1, 1]
    await b.close()


async def test_the_deadline_refusal_counts_only_work_of_its_class_and_above():
    runtime = Runtime()
    planner = Planner(max_batch_size=1, max_delay_ms=0, first_batch_s=0.050, pair_batch_s=0.100)  # 50 ms a row
    b, first = await held(runtime, max_batch_size=1, planner=planner)
    waiting = await queue(b, *((BATCH, i) for i in range(1, 5)))
    deadline = time.monotonic() + 0.120  # the running batch + 4 queued x 50 ms ahead of a batch request
    with pytest.raises(Overloaded, match="would miss its deadline"):
        judged(BATCH, lambda: b.check(deadline=deadline))
    judged(HIGH, lambda: b.check(deadline=deadline))  # nothing of its class ahead: it fits
    runtime.gate.set()
    await asyncio.gather(first, *waiting)
    await b.close()


# -- SLO batching plans for the urgent class ---------------------------------------------------------

async def _batches_after(classes: list[Priority]) -> tuple[list[int], int]:
    """Hold one batch, queue a request of each class given, release: the sizes of the batches that
    follow, and the steady size the planner had when the second batch formed."""
    seen: list[int] = []
    runtime = CostRuntime(a=0.002, b=0.010)  # 12 ms for 1, 26 ms for 8; 100 ms SLO: 79 to plan for
    planner = Planner(max_batch_size=32, max_delay_ms=0, latency_slo_ms=100, first_batch_s=0.012,
                      pair_batch_s=0.014)

    async def run(items):
        seen.append(planner.steady_cap())
        return await runtime(items)

    b = Batcher(run, max_batch_size=32, max_delay_ms=0, max_queue_size=100, planner=planner)
    b.start()
    runtime.gate.clear()
    first = as_class(classes[0], b.submit(0))
    await runtime.started.wait()
    rest = await queue(b, *((cls, i) for i, cls in enumerate(classes[1:], 1)))
    runtime.gate.set()
    await asyncio.gather(first, *rest)
    await b.close()
    return runtime.batches[1:], seen[1]


@in_fresh_process  # the planner learns from measured batch times: a busy pytest process skews them
async def test_slo_batches_are_sized_for_the_high_class_and_filled_by_lower_ones():
    everyone = 25 * [NORMAL]
    batches, steady = await _batches_after(everyone)
    # One class: the cap lets the oldest finish within the SLO (~ (79 - 12 - 10) / 2 rows), more
    # than the steady size (a request can wait out one batch and run in the next: ~ (39.5 - 10) / 2).
    assert batches[0] > steady
    # A high request at the head: it may still lead a batch that size, but batch rows fill only to
    # the steady size, so that the next high arrival can wait the batch out.
    batches, steady = await _batches_after([HIGH, HIGH] + 24 * [BATCH])
    assert batches[0] <= steady
    # High seen lately, none waiting: a batch led by the batch class is one high can wait out.
    batches, steady = await _batches_after([HIGH] + 25 * [BATCH])
    assert batches[0] <= steady
    # Many high ones: they lead a batch as big as one class would.
    batches, steady = await _batches_after(26 * [HIGH])
    assert batches[0] > steady


# -- a service under twice its capacity ------------------------------------------------------------------

async def test_high_keeps_its_latency_under_twice_capacity_and_the_batch_class_absorbs_the_refusals(tmp_path):
    # 22 ms for one row, 36 ms for eight: capacity ~ 8 / 0.036 = 220 /s at the steady size
    bundle = cost_bundle(tmp_path / "cost" / "1", "0.002 0.020", max_batch_size=8, max_delay_ms=0,
                         latency_slo_ms=100)
    with ThreadPoolExecutor(1) as pool:
        service = ModelService(Model.load(bundle), decode_pool=pool)
        service.start()
        try:
            tensor = np.zeros((1, 8, 8, 3), np.uint8)
            capacity = await _closed_loop(service, tensor, in_flight=16, seconds=1.5)
            rng = np.random.default_rng(7)
            alone = await _open_loop(service, tensor, {HIGH: 0.2 * capacity}, seconds=3.0, rng=rng)
            loaded = await _open_loop(service, tensor, {HIGH: 0.2 * capacity, BATCH: 1.8 * capacity}, seconds=3.0,
                                      rng=rng)
        finally:
            await service.close()
    unloaded_p99 = np.percentile(alone[HIGH]["ok"], 99)
    high, batch = loaded[HIGH], loaded[BATCH]
    summary = (f"capacity {capacity:.0f}/s; high p99 {np.percentile(high['ok'], 99) * 1000:.0f} ms loaded, "
               f"{unloaded_p99 * 1000:.0f} ms alone; high ok {len(high['ok'])} refused {high['refused']}; "
               f"batch ok {len(batch['ok'])} refused {batch['refused']}")
    assert 100 <= capacity <= 260, summary
    assert len(high["ok"]) >= 100, summary
    assert np.percentile(high["ok"], 99) <= 2 * unloaded_p99, summary
    assert len(high["ok"]) / (len(high["ok"]) + high["refused"]) >= 0.99, summary
    assert batch["refused"] > 0.2 * (len(batch["ok"]) + batch["refused"]), summary  # the overload went here
    assert len(batch["ok"]) > 0, summary  # and it still got what was left


async def _closed_loop(service: ModelService, tensor: np.ndarray, *, in_flight: int, seconds: float) -> float:
    """Answers per second with ``in_flight`` normal requests always out."""
    answered = 0
    end = time.monotonic() + seconds

    async def worker():
        nonlocal answered
        while time.monotonic() < end:
            try:
                await service.infer_tensor(tensor, deadline=None, timing=Timing())
                answered += 1
            except Overloaded:
                await asyncio.sleep(0.005)

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return answered / (time.monotonic() - start)


async def _open_loop(service: ModelService, tensor: np.ndarray, rates: dict[Priority, float], *, seconds: float,
                     rng: np.random.Generator) -> dict[Priority, dict]:
    """Poisson arrivals per class at ``rates`` (per second); each class's latencies of answered
    requests and its count of refusals."""
    results = {cls: {"ok": [], "refused": 0} for cls in rates}

    async def request(cls: Priority) -> None:
        priority.set_current(cls)
        timing = Timing()
        try:
            await service.infer_tensor(tensor, deadline=None, timing=timing)
        except Overloaded:
            results[cls]["refused"] += 1
            return
        results[cls]["ok"].append(time.monotonic() - timing.arrived)

    async def arrivals(cls: Priority, rate: float) -> list[asyncio.Task]:
        tasks = []
        start = time.monotonic()
        due = start
        while due - start < seconds:
            due += rng.exponential(1 / rate)
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            tasks.append(asyncio.ensure_future(request(cls)))
        return tasks

    streams = await asyncio.gather(*(arrivals(cls, rate) for cls, rate in rates.items()))
    await asyncio.gather(*(task for tasks in streams for task in tasks))
    return results
