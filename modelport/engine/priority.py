"""Priority classes: what is served first, and shed last, when there is not enough.

A request's class comes from its tenant (``--keys``), lowered per request but never raised
(``server/tenants.py``); without tenants every request is ``normal`` (and may lower itself). The
front-end sets it for the request's task (``set_current``); the engine reads it where a request
joins a queue (``current``), so no call between them carries it.
"""

from __future__ import annotations

from contextvars import ContextVar
from enum import StrEnum


class Priority(StrEnum):
    HIGH = "high"
    NORMAL = "normal"
    BATCH = "batch"

    @property
    def rank(self) -> int:
        """0 for the most urgent: batches fill from the lowest rank, shedding starts at the highest."""
        return _RANKS[self]


_RANKS = {Priority.HIGH: 0, Priority.NORMAL: 1, Priority.BATCH: 2}
_current: ContextVar[Priority] = ContextVar("modelport_priority", default=Priority.NORMAL)


def current() -> Priority:
    """The class of the request this task is working on (``normal`` unless a front-end set one)."""
    return _current.get()


def set_current(priority: Priority) -> None:
    """Set the class of the request this task works on (each request runs in a task of its own)."""
    _current.set(priority)


def lowered(ceiling: Priority, asked: str | None) -> Priority:
    """The class a request asks for, never above ``ceiling`` (its tenant's); ``None`` or an empty
    string asks for the ceiling. An unknown name is ``ValueError``."""
    if not asked:
        return ceiling
    wanted = Priority(asked.strip().lower())
    return wanted if wanted.rank > ceiling.rank else ceiling
