"""A model's waiting requests: one FIFO per priority class (``priority.py``), served from the most
urgent class and shed from the least.

``Queues`` is what the batcher holds between a request's arrival and its batch: it hands out
entries most urgent class first, oldest first within a class, and counts, for a class, the work
that would be served before it (its own class and those above). Nothing in here decides: the
batcher says what to take and what to shed. One event loop, no locks.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Generic, Iterator, TypeVar

from modelport.engine.priority import Priority

T = TypeVar("T")

CLASSES = sorted(Priority, key=lambda p: p.rank)  # most urgent first


@dataclass
class Entry(Generic[T]):
    item: T
    rows: int
    future: asyncio.Future
    deadline: float | None  # time.monotonic() seconds
    arrived: float  # the request's arrival (before decoding): its SLO runs from here
    priority: Priority = Priority.NORMAL
    enqueued: float = field(default_factory=time.monotonic)


class Queues(Generic[T]):
    def __init__(self) -> None:
        self._classes: list[deque[Entry[T]]] = [deque() for _ in CLASSES]  # by rank
        self._rows = [0] * len(CLASSES)
        self._count = 0
        self.rows = 0  # of every entry

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __iter__(self) -> Iterator[Entry[T]]:
        """Every entry in the order the batcher serves them."""
        for queue in self._classes:
            yield from queue

    def append(self, entry: Entry[T]) -> None:
        rank = entry.priority.rank
        self._classes[rank].append(entry)
        self._rows[rank] += entry.rows
        self.rows += entry.rows
        self._count += 1

    def head(self) -> Entry[T]:
        """The entry served next: the oldest of the most urgent class waiting."""
        return next(queue[0] for queue in self._classes if queue)

    def pop(self) -> Entry[T]:
        """Take the head."""
        entry = next(queue for queue in self._classes if queue).popleft()
        self._forget(entry)
        return entry

    def ahead_of(self, priority: Priority) -> Iterator[Entry[T]]:
        """The entries served before a request of ``priority`` arriving now: its class and those above."""
        for queue in self._classes[:priority.rank + 1]:
            yield from queue

    def count_ahead_of(self, priority: Priority) -> int:
        return sum(len(queue) for queue in self._classes[:priority.rank + 1])

    def rows_ahead_of(self, priority: Priority) -> int:
        return sum(self._rows[:priority.rank + 1])

    def newest_below(self, priority: Priority) -> Entry[T] | None:
        """The newest entry of the least urgent class below ``priority``: the first to shed for it."""
        for queue in reversed(self._classes[priority.rank + 1:]):
            if queue:
                return queue[-1]
        return None

    def remove_newest(self, entry: Entry[T]) -> None:
        """Remove ``entry``, the newest of its class (``newest_below``)."""
        self._classes[entry.priority.rank].pop()
        self._forget(entry)

    def drop(self, gone: Callable[[Entry[T]], bool]) -> list[Entry[T]]:
        """Remove every entry ``gone`` says to, keeping the order of the rest; return them."""
        dropped: list[Entry[T]] = []
        for rank, queue in enumerate(self._classes):
            kept: deque[Entry[T]] = deque()
            for entry in queue:
                (dropped if gone(entry) else kept).append(entry)
            self._classes[rank] = kept
        for entry in dropped:
            self._forget(entry)
        return dropped

    def _forget(self, entry: Entry[T]) -> None:
        self._rows[entry.priority.rank] -= entry.rows
        self.rows -= entry.rows
        self._count -= 1
