"""Dynamic batching: one plain asyncio object per loaded model.

Requests wait in a bounded queue; one worker task takes a batch and runs it while the next one
queues. A batch starts as soon as the runtime is free, unless companions are already on their way
(requests still decoding, announced with ``expect()``) and waiting for them stays under
``max_delay_ms`` and the batch is not full. So at low load nothing waits, and under load batches
form on their own while the previous one runs. How big a batch may grow, how long it may wait and
whether a request is refused early are the ``Planner``'s (``slo.py``): fixed settings, or chosen
to keep a latency SLO.

Priority classes (``priority.py``): a request's class is read where it joins the queue (``admit``,
``submit``). Batches take the most urgent class first, oldest first within a class, and lower
classes fill the rest (``queues.py``): a lower class waits behind a higher one, never longer than
the higher one keeps the runtime busy. Shedding starts at the lowest class: a request is judged
(queue bound, SLO, deadline) against the work of its own class and those above only, and one that
finds the queue full of that work is refused; one that finds it full, but partly of lower classes,
takes the place of the newest request of the lowest class, which is answered ``Overloaded``.

Invariants (everything here runs on one event loop, so no locks):
- every submitted item gets exactly one answer: its result, or an exception;
- a failed batch sets the same exception on each of its futures;
- items whose client went away (future cancelled) are dropped before compute;
- items past their deadline get ``DeadlineExceeded`` before compute;
- an item shed for a more urgent one gets ``Overloaded`` and is not computed;
- the run function returns one result per item, checked.
No metrics, logging or I/O in here: ``on_batch`` is the hook.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Generic, Sequence, TypeVar

from modelport.errors import DeadlineExceeded, Overloaded, Unavailable
from modelport.engine import priority
from modelport.engine.cores import Cores
from modelport.engine.priority import Priority
from modelport.engine.queues import Entry, Queues
from modelport.engine.slo import Planner

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchInfo:
    size: int  # items
    rows: int
    queue_s: list[float]  # per item
    run_s: float
    thin: bool = False  # ran beside other batches, on a share of the cores


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
        self._queue: Queues[T] = Queues()
        # Admitted requests still preparing their input (decoding), in order of admission.
        self._preparing: dict[_Admission, None] = {}
        self._preparing_by = [0] * len(Priority)  # by rank
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

    @property
    def _expected(self) -> int:
        """Admitted requests still preparing their input: companions on their way."""
        return len(self._preparing)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._work(), name="batcher")

    def admit(self, *, rows: int = 1, arrived: float | None = None, deadline: float | None = None,
              preparing: bool = True) -> "_Admission":
        """Reserve a queue place before the (costly) input preparation; refuse at once when full,
        or when the request would finish past its SLO or deadline. A place held by a lower class
        is taken from it (``check``).

        Use as ``with batcher.admit(): item = await decode(...)`` then ``await batcher.submit(item)``
        with no await in between: while the block runs, the worker knows a companion is coming.
        """
        urgency = priority.current()
        self._judge(urgency, rows, arrived, deadline, preparing, shed=True)
        return _Admission(self, urgency, time.monotonic() if arrived is None else arrived)

    def check(self, *, rows: int = 1, arrived: float | None = None, deadline: float | None = None,
              preparing: bool = True) -> None:
        """Refuse now if a request would be refused: lets a front-end skip reading a body in vain.
        Sheds nothing: a lower class's place is taken only by ``admit``, once the body is there."""
        self._judge(priority.current(), rows, arrived, deadline, preparing, shed=False)

    def _judge(self, urgency: Priority, rows: int, arrived: float | None, deadline: float | None,
               preparing: bool, *, shed: bool) -> None:
        """Refuse a request of class ``urgency`` whose own class and those above fill the queue, or
        would make it miss its SLO or deadline; with ``shed``, make it a place in a full queue."""
        if self._closing:
            raise Unavailable("model is unloading", retry_after_s=1)
        now = time.monotonic()
        self.planner.saw(urgency, now)
        full = len(self._queue) + self._expected >= self.max_queue_size
        if full:
            self._drop_abandoned()
            full = len(self._queue) + self._expected >= self.max_queue_size
        expected = sum(self._preparing_by[:urgency.rank + 1])
        if full and self._queue.count_ahead_of(urgency) + expected >= self.max_queue_size:
            raise Overloaded(f"queue full ({self.max_queue_size} requests waiting)", retry_after_s=1)
        ahead_rows = self._queue.rows_ahead_of(urgency)
        self.planner.refuse_late(now=now, arrived=now if arrived is None else arrived, deadline=deadline, rows=rows,
                                 priority=urgency, queued_rows=ahead_rows,
                                 queue=((e.arrived, e.rows, e.priority) for e in self._queue.ahead_of(urgency)),
                                 expected=expected, filler=self._queue.rows - ahead_rows + self._expected - expected,
                                 running_left_s=self._running_left(now), preparing=preparing)
        if full and shed:  # judged last: a request refused anyway sheds nobody
            self._shed_for(urgency)

    def _shed_for(self, urgency: Priority) -> None:
        """Free a place for a request of class ``urgency``: the newest request of the least urgent
        class below it leaves (queued: answered now; still decoding: when its decode ends)."""
        queued = self._queue.newest_below(urgency)
        decoding = max((a for a in self._preparing if a.priority.rank > urgency.rank),
                       key=lambda a: (a.priority.rank, a.arrived), default=None)
        refusal = Overloaded(f"queue full ({self.max_queue_size} requests waiting): "
                             f"its place was given to a request of class {urgency}", retry_after_s=1)
        if decoding is not None and (queued is None or (decoding.priority.rank, decoding.arrived)
                                     >= (queued.priority.rank, queued.arrived)):
            decoding.shed = refusal
            decoding.release()
        elif queued is not None:
            self._queue.remove_newest(queued)
            queued.future.set_exception(refusal)

    def predicted_wait_s(self) -> float:
        """How long a request arriving now would wait before its batch starts (the planner's guess)."""
        return self.planner.predicted_wait_s(self._queue.rows + self._expected, self._running_left(time.monotonic()))

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
        urgency = priority.current()
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
        self.planner.saw(urgency, now)
        self._queue.append(Entry(item, rows, future, deadline, now if arrived is None else arrived, urgency, now))
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
            batch = self._take(*self._caps(thin))
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
            self._cores.running or self._expected or self._queue.rows > self.item_rows)

    def _caps(self, thin: bool) -> tuple[int, int]:
        """Rows for the next batch: with the leading class's requests, and with lower classes'
        filler (``slo.py``). Thin batches share the rows of one full batch, so the runtime never
        holds more rows at once than one full batch (its memory is that of one full batch)."""
        if not self._queue:
            return 1, 1
        head = self._queue.head()
        cap, fill = self.planner.cap_for(head.arrived, time.monotonic(), head.priority)
        return (min(cap, self.item_rows), min(fill, self.item_rows)) if thin else (cap, fill)

    async def _gather(self) -> None:
        """Wait for announced companions while the batch is short and the oldest can afford it."""
        oldest = self._queue.head()
        give_up = self.planner.gather_until(oldest.arrived, oldest.enqueued)
        while self._expected and self._queue.rows < self._caps(self._thin())[0] and not self._closing:
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
        for entry in self._queue.drop(lambda e: e.future.done() or (e.deadline is not None and now > e.deadline)):
            if not entry.future.done():
                entry.future.set_exception(DeadlineExceeded("deadline passed while queued; not computed"))

    def _take(self, cap: int, fill: int) -> list[Entry[T]]:
        """The next batch: up to ``cap`` rows of the leading (most urgent) class, and lower classes
        after them up to ``fill`` rows in all."""
        batch: list[Entry[T]] = []
        rows = 0
        lead: Priority | None = None
        now = time.monotonic()
        while self._queue:
            entry = self._queue.head()
            if batch and rows + entry.rows > (cap if entry.priority is lead else fill):
                break
            self._queue.pop()
            if entry.future.done():  # cancelled: the client went away
                continue
            if entry.deadline is not None and now > entry.deadline:
                entry.future.set_exception(DeadlineExceeded("deadline passed while queued; not computed"))
                continue
            batch.append(entry)
            rows += entry.rows
            if lead is None:
                lead = entry.priority
            self.planner.prepared(entry.enqueued - entry.arrived)
        return batch

    async def _execute(self, batch: list[Entry[T]], key: int) -> None:
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
    """A place reserved for a request while it prepares its input. A more urgent request may take
    the place meanwhile (``shed``): the block then ends in that ``Overloaded``, and nothing queues."""

    def __init__(self, batcher: Batcher, urgency: Priority, arrived: float) -> None:
        self._batcher = batcher
        self.priority = urgency
        self.arrived = arrived
        self.shed: Overloaded | None = None

    def __enter__(self) -> "_Admission":
        self._batcher._preparing[self] = None
        self._batcher._preparing_by[self.priority.rank] += 1
        return self

    def release(self) -> None:
        """Give the place back (once): the input is ready, or the place was taken."""
        if self in self._batcher._preparing:
            del self._batcher._preparing[self]
            self._batcher._preparing_by[self.priority.rank] -= 1

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.release()
        self._batcher._wakeup.set()
        if self.shed is not None and exc_type is None:
            raise self.shed
