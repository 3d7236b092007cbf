"""Who may start a batch now: the CPU's batches, shared by every model's batcher in a process
(``batching.py``). Everything runs on one event loop: no locks."""

from __future__ import annotations

import asyncio


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
