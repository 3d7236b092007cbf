"""The batcher in-process: batches form, every answer reaches its own request, failures spread."""

from __future__ import annotations

import asyncio
import time

import pytest

from modelport.engine.batching import Batcher, Cores
from modelport.errors import DeadlineExceeded, Overloaded


class Runtime:
    """A runtime held by a gate: a batch starts, then waits until the test opens the gate."""

    def __init__(self, fail: Exception | None = None, short_by: int = 0) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()
        self.fail = fail
        self.short_by = short_by

    async def __call__(self, items):
        self.batches.append(list(items))
        self.started.set()
        await self.gate.wait()
        if self.fail:
            raise self.fail
        return [i * 10 for i in items][: len(items) - self.short_by]


def batcher(runtime, **kwargs) -> Batcher:
    settings = {"max_batch_size": 8, "max_delay_ms": 5, "max_queue_size": 100, **kwargs}
    b = Batcher(runtime, **settings)
    b.start()
    return b


async def test_every_request_gets_its_own_answer():
    runtime = Runtime()
    b = batcher(runtime)
    results = await asyncio.gather(*(b.submit(i) for i in range(100)))
    assert results == [i * 10 for i in range(100)]
    assert sum(len(batch) for batch in runtime.batches) == 100
    await b.close()


async def test_batches_form_while_the_runtime_is_busy():
    runtime = Runtime()
    runtime.gate.clear()
    b = batcher(runtime, max_batch_size=4)
    first = asyncio.ensure_future(b.submit(0))
    await runtime.started.wait()
    rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 10)]
    await asyncio.sleep(0)
    runtime.gate.set()
    assert await asyncio.gather(first, *rest) == [i * 10 for i in range(10)]
    assert [len(x) for x in runtime.batches] == [1, 4, 4, 1]
    await b.close()


async def test_low_load_does_not_wait_for_the_delay():
    b = batcher(Runtime(), max_delay_ms=2000)
    start = time.monotonic()
    assert await b.submit(7) == 70
    assert time.monotonic() - start < 0.5  # nothing else was on its way: no reason to wait
    await b.close()


async def test_waits_for_announced_companions_up_to_the_delay():
    runtime = Runtime()
    b = batcher(runtime, max_delay_ms=2000)
    with b.admit():  # a request still decoding
        first = asyncio.ensure_future(b.submit(1))
        await asyncio.sleep(0.05)
        assert runtime.batches == []  # held back for the companion
        second = asyncio.ensure_future(b.submit(2))
    assert await asyncio.gather(first, second) == [10, 20]
    assert runtime.batches == [[1, 2]]
    await b.close()


async def test_delay_bound_is_kept_when_the_companion_is_slow():
    runtime = Runtime()
    b = batcher(runtime, max_delay_ms=30)
    with b.admit():
        start = time.monotonic()
        assert await b.submit(1) == 10
        waited = time.monotonic() - start
    assert 0.02 < waited < 0.5
    await b.close()


async def test_failed_batch_fails_every_request_in_it():
    runtime = Runtime(fail=ValueError("boom"))
    runtime.gate.clear()
    b = batcher(runtime)
    first = asyncio.ensure_future(b.submit(0))
    await runtime.started.wait()
    rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 4)]
    await asyncio.sleep(0)
    runtime.gate.set()
    results = await asyncio.gather(first, *rest, return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results)
    await b.close()


async def test_short_output_is_an_error_not_a_misaligned_answer():
    b = batcher(Runtime(short_by=1))
    with pytest.raises(RuntimeError, match="produced"):
        await b.submit(1)
    await b.close()


async def test_cancelled_request_is_never_computed():
    runtime = Runtime()
    runtime.gate.clear()
    b = batcher(runtime, max_batch_size=1)
    first = asyncio.ensure_future(b.submit(0))
    await runtime.started.wait()
    gone = asyncio.ensure_future(b.submit(99))
    kept = asyncio.ensure_future(b.submit(2))
    await asyncio.sleep(0)
    gone.cancel()
    runtime.gate.set()
    assert await asyncio.gather(first, kept) == [0, 20]
    assert [99] not in runtime.batches
    await b.close()


async def test_expired_deadline_is_answered_without_compute():
    runtime = Runtime()
    runtime.gate.clear()
    b = batcher(runtime, max_batch_size=1)
    first = asyncio.ensure_future(b.submit(0))
    await runtime.started.wait()
    late = asyncio.ensure_future(b.submit(5, deadline=time.monotonic() + 0.01))
    await asyncio.sleep(0.05)
    runtime.gate.set()
    with pytest.raises(DeadlineExceeded):
        await late
    await first
    assert [5] not in runtime.batches
    await b.close()


async def test_full_queue_refuses_at_once_and_queued_ones_complete():
    runtime = Runtime()
    runtime.gate.clear()
    b = batcher(runtime, max_batch_size=1, max_queue_size=3)
    running = asyncio.ensure_future(b.submit(0))
    await runtime.started.wait()
    queued = [asyncio.ensure_future(b.submit(i)) for i in (1, 2, 3)]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded) as info:
        b.admit()
    assert info.value.headers()["Retry-After"] == "1"
    runtime.gate.set()
    assert await asyncio.gather(running, *queued) == [0, 10, 20, 30]
    await b.close()


async def test_requests_nobody_waits_for_give_their_places_in_a_full_queue_to_live_ones():
    runtime = Runtime()
    runtime.gate.clear()
    b = batcher(runtime, max_batch_size=1, max_queue_size=3)
    running = asyncio.ensure_future(b.submit(0))
    await runtime.started.wait()
    gone = asyncio.ensure_future(b.submit(1))
    late = asyncio.ensure_future(b.submit(2, deadline=time.monotonic() + 0.01))
    live = asyncio.ensure_future(b.submit(3))
    await asyncio.sleep(0.05)
    gone.cancel()
    b.check()  # full by count, but two of the three are abandoned: a place for a live request
    with pytest.raises(DeadlineExceeded):
        await late  # answered when it was dropped, not when the worker reached it
    assert b.queued == 1
    runtime.gate.set()
    assert await asyncio.gather(running, live) == [0, 30]
    assert [1] not in runtime.batches and [2] not in runtime.batches
    await b.close()


async def test_close_drains_the_queue():
    runtime = Runtime()
    runtime.gate.clear()
    b = batcher(runtime, max_batch_size=2)
    futures = [asyncio.ensure_future(b.submit(i)) for i in range(5)]
    await runtime.started.wait()
    closing = asyncio.ensure_future(b.close())
    runtime.gate.set()
    await closing
    assert [f.result() for f in futures] == [0, 10, 20, 30, 40]


async def test_idle_batcher_runs_a_fast_request_at_once_through_run_now():
    runtime = Runtime()
    taken = []

    def run_now(items):
        taken.append(list(items))
        return [i * 10 for i in items]

    b = Batcher(runtime, max_batch_size=8, max_delay_ms=5, max_queue_size=10, run_now=run_now)
    b.start()
    assert await b.submit(4) == 40
    assert taken == [[4]] and runtime.batches == []  # no hand-over to the worker
    await b.close()


async def test_run_now_is_skipped_while_a_batch_runs_and_may_decline():
    runtime = Runtime()
    runtime.gate.clear()
    declined = []
    b = Batcher(runtime, max_batch_size=8, max_delay_ms=0, max_queue_size=10,
                run_now=lambda items: declined.append(list(items)))  # returns None: declines
    b.start()
    first = asyncio.ensure_future(b.submit(1))
    await runtime.started.wait()
    second = asyncio.ensure_future(b.submit(2))  # busy: straight to the queue
    await asyncio.sleep(0)
    runtime.gate.set()
    assert await asyncio.gather(first, second) == [10, 20]
    assert declined == [[1]]  # asked once, when idle; declined; the worker ran both
    await b.close()


async def test_a_lone_batch_runs_full_and_nothing_starts_beside_it():
    full, thin = Runtime(), Runtime()
    full.gate.clear()
    b = batcher(full, max_batch_size=4, max_concurrent_batches=2, run_thin=thin)
    first = asyncio.ensure_future(b.submit(0))
    await full.started.wait()  # all there was to do: on the full runtime (every core)
    more = [asyncio.ensure_future(b.submit(i)) for i in range(1, 6)]
    await asyncio.sleep(0.01)
    # A full batch keeps every core: the others wait for it instead of starting beside it.
    assert full.batches == [[0]] and thin.batches == [] and b.queued == 5
    full.gate.set()
    assert await asyncio.gather(first, *more) == [i * 10 for i in range(6)]
    # Then more waited than one thin batch takes: thin batches of max_batch_size / 2 rows side by
    # side, and the last one, alone again, full.
    assert thin.batches == [[1, 2], [3, 4]] and full.batches == [[0], [5]]
    await b.close()


async def test_thin_batches_run_side_by_side_and_close_waits_for_them():
    full, thin = Runtime(), Runtime()
    thin.gate.clear()
    b = batcher(full, max_batch_size=4, max_concurrent_batches=2, run_thin=thin)
    requests = [asyncio.ensure_future(b.submit(i)) for i in range(7)]
    await thin.started.wait()
    await asyncio.sleep(0.01)
    # Two thin batches at once, each at most half a batch, no third: the rest wait for a free slot.
    assert thin.batches == [[0, 1], [2, 3]] and full.batches == [] and b.running == 2 and b.queued == 3
    closing = asyncio.ensure_future(b.close())
    thin.gate.set()
    assert await asyncio.gather(*requests) == [i * 10 for i in range(7)]
    await closing
    assert sorted(len(x) for x in thin.batches + full.batches) == [1, 2, 2, 2] and not b.busy

# -- models sharing the cores (a pipeline's steps, a rollout's two versions, one server) ----------------

async def test_a_full_batch_of_one_model_runs_alone_among_all_models():
    cores = Cores()
    a_full, a_thin, b_full, b_thin = Runtime(), Runtime(), Runtime(), Runtime()
    a_full.gate.clear()
    a = batcher(a_full, max_batch_size=4, max_concurrent_batches=2, run_thin=a_thin, cores=cores)
    b = batcher(b_full, max_batch_size=4, max_concurrent_batches=2, run_thin=b_thin, cores=cores)
    first = asyncio.ensure_future(a.submit(0))
    await a_full.started.wait()  # model a alone: full, on every core
    other = asyncio.ensure_future(b.submit(1))
    await asyncio.sleep(0.01)
    assert b_full.batches == b_thin.batches == [] and b.queued == 1  # b waits for a's full batch
    a_full.gate.set()
    assert await asyncio.gather(first, other) == [0, 10]
    assert b_full.batches == [[1]]  # then alone in turn: full
    await a.close()
    await b.close()


async def test_thin_batches_of_two_models_share_the_slots():
    cores = Cores()
    runtimes = [Runtime() for _ in range(4)]
    for r in runtimes:
        r.gate.clear()
    a = batcher(runtimes[0], max_batch_size=4, max_concurrent_batches=2, run_thin=runtimes[1], cores=cores)
    b = batcher(runtimes[2], max_batch_size=4, max_concurrent_batches=2, run_thin=runtimes[3], cores=cores)
    requests = [asyncio.ensure_future(x.submit(i)) for i in range(6) for x in (a, b)]
    await asyncio.sleep(0.02)
    assert len(cores.running) == 1 or (len(cores.running) == 2 and all(cores.running.values()))
    assert len(cores.running) <= 2  # never more batches than slots, whichever model they belong to
    for r in runtimes:
        r.gate.set()
    assert len(await asyncio.gather(*requests)) == 12 and not cores.running
    await a.close()
    await b.close()


async def test_a_one_at_a_time_model_is_not_starved_by_another_models_thin_batches():
    cores = Cores()
    lone = Runtime()
    lengths = iter([0.004, 0.007] * 10_000)

    async def busy_thin(items):  # overlapping thin batches of uneven length: some slot is always taken
        await asyncio.sleep(next(lengths))
        return [i * 10 for i in items]

    busy = batcher(busy_thin, max_batch_size=2, max_concurrent_batches=2, run_thin=busy_thin, cores=cores)
    one = batcher(lone, max_batch_size=2, max_concurrent_batches=1, cores=cores)
    stop = asyncio.Event()

    async def stream():  # a steady stream of requests: thin batches back to back
        i = 0
        while not stop.is_set():
            await asyncio.gather(*(busy.submit(i + k) for k in range(4)))
            i += 4

    streams = [asyncio.ensure_future(stream()) for _ in range(3)]
    await asyncio.sleep(0.02)
    assert await asyncio.wait_for(one.submit(7), 2) == 70  # it gets its turn: next in line
    stop.set()
    await asyncio.gather(*streams)
    await busy.close()
    await one.close()
