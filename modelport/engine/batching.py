"""Dynamic batching: one plain asyncio object per loaded model.

Requests wait in a bounded queue; one worker task takes a batch and runs it while the next one
queues. A batch starts as soon as the runtime is free, unless companions are already on their way
(requests still decoding, announced with ``expect()``) and waiting for them stays under
``max_delay_ms`` and the batch is not full. So at low load nothing waits, and under load batches
form on their own while the previous one runs. How big a batch may grow, how long it may wait and
whether a request is refused early are the ``Planner``'s (``slo.py``): fixed settings, or chosen
to keep a latency SLO.

Invariants (everything here runs on one event loop, so no locks):
- every submitted item gets exactly one answer: its result, or an exception;
- a failed batch sets the same exception on each of its futures;
- items whose client went away (future cancelled) are dropped before compute;
- items past their deadline get ``DeadlineExceeded`` before compute;
- the run function returns one result per item, checked.
No metrics, logging or I/O in here: ``on_batch`` is the hook.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Generic, Sequence, TypeVar

from modelport.errors import DeadlineExceeded, Overloaded, Unavailable
from modelport.engine.slo import Planner

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Entry(Generic[T]):
    item: T
    rows: int
    future: asyncio.Future
    deadline: float | None  # time.monotonic() seconds
    arrived: float  # the request's arrival (before decoding): its SLO runs from here
    enqueued: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class BatchInfo:
    size: int  # items
    rows: int
    queue_s: list[float]  # per item
    run_s: float
    thin: bool = False  # ran beside other batches, on a share of the cores


class Cores:
    """The CPU's batches, shared by the batchers of every model in a process (a pipeline's steps, a
    rollout's two versions): a full batch takes every core, so it runs alone among all of them, and
    thin ones run side by side. Without it, two models' full batches would each spread over every
    core at once and wait on each other's threads."""

    def __init__(self) -> None:
        self.running: dict[object, bool] = {}  # batch -> thin
        self._wakeups: list[asyncio.Event] = []
        # Batchers with work that could not start, oldest first: the first goes next, so that one
        # model's stream of thin batches never starves another's full one.
        self._waiting: list[object] = []

    def can_start(self, slots: int, who: object) -> bool:
        """Nothing runs, or only thin batches and fewer than ``slots`` of them; and no other batcher
        has waited longer."""
        if self._waiting and self._waiting[0] is not who:
            return False
        return not self.running or (len(self.running) < slots and all(self.running.values()))

    def wait(self, who: object) -> None:
        if who not in self._waiting:
            self._waiting.append(who)

    def done_waiting(self, who: object) -> None:
        if who in self._waiting:
            first = self._waiting[0] is who
            self._waiting.remove(who)
            if first:
                self._wake()

    def follow(self, wakeup: asyncio.Event) -> None:
        self._wakeups.append(wakeup)

    def forget(self, wakeup: asyncio.Event) -> None:
        if wakeup in self._wakeups:
            self._wakeups.remove(wakeup)

    def enter(self, batch: object, thin: bool) -> None:
        self.running[batch] = thin

    def leave(self, batch: object) -> None:
        del self.running[batch]
        self._wake()  # any batcher may start now

    def _wake(self) -> None:
        for wakeup in self._wakeups:
            wakeup.set()


class Batcher(Generic[T, R]):
    def __init__(self, run: Callable[[Sequence[T]], Awaitable[Sequence[R]]], *, max_batch_size: int,
                 max_delay_ms: float, max_queue_size: int,
                 on_batch: Callable[[BatchInfo], None] | None = None,
                 run_now: Callable[[Sequence[T]], Sequence[R] | None] | None = None,
                 planner: Planner | None = None, max_concurrent_batches: int = 1,
                 run_thin: Callable[[Sequence[T]], Awaitable[Sequence[R]]] | None = None,
                 cores: Cores | None = None) -> None:
        self._run = run
        # With max_concurrent_batches > 1: how a batch runs beside others ("thin": on a runtime with
        # fewer threads). A batch runs full only when it is all there is to do.
        self._run_thin = run_thin or run
        # Optional synchronous shortcut for an idle batcher: returns results, or None to decline.
        self._run_now = run_now
        self.max_batch_size = max_batch_size  # the hard cap; the planner's cap may be lower
        self.max_queue_size = max_queue_size
        self.planner = planner or Planner(max_batch_size=max_batch_size, max_delay_ms=max_delay_ms)
        self._on_batch = on_batch
        self._queue: deque[_Entry[T]] = deque()
        self._queued_rows = 0  # rows of the entries in _queue
        self._expected = 0  # admitted requests still preparing their input (decoding)
        # Batches at the runtime: id -> (start, rows, thin). More than one only with
        # max_concurrent_batches > 1, and then only thin ones side by side: see _can_start.
        self.max_concurrent_batches = max_concurrent_batches
        self._running: dict[int, tuple[float, int, bool]] = {}
        self._batch_ids = 0
        self._wakeup = asyncio.Event()
        # Shared with the other models' batchers where the server passes one (else this model's own).
        self._cores = cores or Cores()
        self._cores.follow(self._wakeup)
        self._closing = False
        self._task: asyncio.Task | None = None
        self._executing: set[asyncio.Task] = set()

    @property
    def busy(self) -> bool:
        return bool(self._running)

    @property
    def running(self) -> int:
        """Batches at the runtime now."""
        return len(self._running)

    @property
    def item_rows(self) -> int:
        """The most rows one submitted item should have: a thin batch's share with batches side by
        side, else a whole batch."""
        return max(1, self.max_batch_size // self.max_concurrent_batches)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._work(), name="batcher")

    def admit(self, *, rows: int = 1, arrived: float | None = None, deadline: float | None = None,
              preparing: bool = True) -> "_Admission":
        """Reserve a queue place before the (costly) input preparation; refuse at once when full,
        or when the request would finish past its SLO or deadline.

        Use as ``with batcher.admit(): item = await decode(...)`` then ``await batcher.submit(item)``
        with no await in between: while the block runs, the worker knows a companion is coming.
        """
        self.check(rows=rows, arrived=arrived, deadline=deadline, preparing=preparing)
        return _Admission(self)

    def check(self, *, rows: int = 1, arrived: float | None = None, deadline: float | None = None,
              preparing: bool = True) -> None:
        """Refuse now if a request would be refused: lets a front-end skip reading a body in vain."""
        if self._closing:
            raise Unavailable("model is unloading", retry_after_s=1)
        if len(self._queue) + self._expected >= self.max_queue_size:
            self._drop_abandoned()
        if len(self._queue) + self._expected >= self.max_queue_size:
            raise Overloaded(f"queue full ({self.max_queue_size} requests waiting)", retry_after_s=1)
        now = time.monotonic()
        self.planner.refuse_late(now=now, arrived=now if arrived is None else arrived, deadline=deadline, rows=rows,
                                 queued_rows=self._queued_rows,
                                 queue=((e.arrived, e.rows) for e in self._queue), expected=self._expected,
                                 running_left_s=self._running_left(now), preparing=preparing)

    def predicted_wait_s(self) -> float:
        """How long a request arriving now would wait before its batch starts (the planner's guess)."""
        return self.planner.predicted_wait_s(self._queued_rows + self._expected, self._running_left(time.monotonic()))

    def _running_left(self, now: float) -> float:
        """Until a runtime slot frees: 0 while one is free, else the soonest predicted end of this
        model's batches (another model's batches' costs are that model's to know: not counted)."""
        if self._can_start() or not self._running:
            return 0.0
        return min(max(0.0, start + self.planner.cost.predict(rows) - now) for start, rows, _ in self._running.values())

    def _can_start(self) -> bool:
        """A batch may start now: nothing runs, or only thin batches and a slot is free, here and
        among the models sharing the cores. A full batch (every runtime thread) runs alone: a batch
        beside it would take a core its threads wait for."""
        return self._cores.can_start(self.max_concurrent_batches, self)  # this model's batches are among them

    async def submit(self, item: T, *, rows: int = 1, deadline: float | None = None,
                     arrived: float | None = None) -> R:
        # No closing check here: a request admitted before close() began is still served.
        if self._run_now is not None and not self._queue and not self.busy and not self._expected:
            # Idle, nobody waiting, nobody coming: a batch of one, run right here. No await
            # between the check and the run, so nothing can slip in: still one batch at a time.
            start = time.monotonic()
            results = self._run_now([item])
            if results is not None:
                if len(results) != 1:
                    raise RuntimeError(f"batch of 1 produced {len(results)} results")
                run_s = time.monotonic() - start
                self.planner.ran(rows, run_s)
                if self._on_batch is not None:
                    self._on_batch(BatchInfo(1, rows, [0.0], run_s))
                return results[0]
        future = asyncio.get_running_loop().create_future()
        now = time.monotonic()
        self._queue.append(_Entry(item, rows, future, deadline, now if arrived is None else arrived, now))
        self._queued_rows += rows
        self._wakeup.set()
        # If the caller is cancelled (client gone), the future is cancelled too and the worker
        # skips it: a request nobody waits for is never computed.
        return await future

    async def close(self) -> None:
        """Refuse new admissions; finish everything admitted or queued; then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._cores.forget(self._wakeup)
        self._cores.done_waiting(self)

    async def _work(self) -> None:
        while True:
            while not self._queue or not self._can_start():
                if self._queue:  # work that may not start yet: next in line among the models
                    self._cores.wait(self)
                else:
                    self._cores.done_waiting(self)
                if self._closing and not self._expected and not self._queue:
                    if self._executing:
                        await asyncio.gather(*self._executing)
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._gather()
            if not self._can_start():  # another model's batch started while this one gathered
                continue
            thin = self._thin()
            batch = self._take(self._cap(thin))
            if not batch:
                continue
            # The slot is taken now, before any await: the check above stays true.
            self._batch_ids += 1
            key = self._batch_ids
            self._running[key] = (time.monotonic(), sum(e.rows for e in batch), thin)
            self._cores.enter((self, key), thin)
            self._cores.done_waiting(self)
            if self.max_concurrent_batches == 1:
                await self._execute(batch, key)
            else:
                task = asyncio.ensure_future(self._execute(batch, key))
                self._executing.add(task)
                task.add_done_callback(self._executing.discard)

    def _thin(self) -> bool:
        """Whether the next batch runs thin: there is more to do than one batch (others run, more rows
        wait than a thin batch takes, or requests are on their way), so batches side by side, each
        on its share of the cores, beat one batch on all of them (docs/decisions.md)."""
        return self.max_concurrent_batches > 1 and bool(
            self._cores.running or self._expected or self._queued_rows > self.item_rows)

    def _cap(self, thin: bool) -> int:
        """Rows for the next batch. Thin batches share the rows of one full batch, so the runtime never
        holds more rows at once than one full batch (its memory is that of one full batch)."""
        cap = self.planner.cap_for(self._queue[0].arrived, time.monotonic()) if self._queue else 1
        return min(cap, self.item_rows) if thin else cap

    async def _gather(self) -> None:
        """Wait for announced companions while the batch is short and the oldest can afford it."""
        oldest = self._queue[0]
        give_up = self.planner.gather_until(oldest.arrived, oldest.enqueued)
        while self._expected and self._queued_rows < self._cap(self._thin()) and not self._closing:
            remaining = give_up - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _drop_abandoned(self) -> None:
        """Entries nobody waits for (cancelled, or past their deadline) leave a full queue now, not
        when the worker reaches them: they must not hold places that live requests could take."""
        now = time.monotonic()
        kept: deque[_Entry[T]] = deque()
        for entry in self._queue:
            expired = entry.deadline is not None and now > entry.deadline
            if entry.future.done() or expired:
                if not entry.future.done():
                    entry.future.set_exception(DeadlineExceeded("deadline passed while queued; not computed"))
                self._queued_rows -= entry.rows
            else:
                kept.append(entry)
        self._queue = kept

    def _take(self, cap: int) -> list[_Entry[T]]:
        batch: list[_Entry[T]] = []
        rows = 0
        now = time.monotonic()
        while self._queue:
            entry = self._queue[0]
            if batch and rows + entry.rows > cap:
                break
            self._queue.popleft()
            self._queued_rows -= entry.rows
            if entry.future.done():  # cancelled: the client went away
                continue
            if entry.deadline is not None and now > entry.deadline:
                entry.future.set_exception(DeadlineExceeded("deadline passed while queued; not computed"))
                continue
            batch.append(entry)
            rows += entry.rows
            self.planner.prepared(entry.enqueued - entry.arrived)
        return batch

    async def _execute(self, batch: list[_Entry[T]], key: int) -> None:
        start, rows, thin = self._running[key]
        try:
            results = await (self._run_thin if thin else self._run)([e.item for e in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} produced {len(results)} results")
        except Exception as exc:  # every request in a failed batch gets the error
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(exc)
            results = None
        finally:
            del self._running[key]
            self._cores.leave((self, key))  # a runtime slot is free: wakes this and the other batchers
        end = time.monotonic()
        if results is not None:
            self.planner.ran(rows, end - start)
            for entry, result in zip(batch, results):
                if not entry.future.done():
                    entry.future.set_result(result)
        if self._on_batch is not None:
            self._on_batch(BatchInfo(len(batch), rows, [start - e.enqueued for e in batch], end - start, thin))


class _Admission:
    def __init__(self, batcher: Batcher) -> None:
        self._batcher = batcher

    def __enter__(self) -> "_Admission":
        self._batcher._expected += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self._batcher._expected -= 1
        self._batcher._wakeup.set()
