"""A model version under the memory budget, as the routing table hands it out: a ``Servable`` that
is the version's service while it is resident, and loads it again for the first request after it
was unloaded (``residency.py`` decides which versions stay).

Front-ends need no change: what they ask before a request runs (the model's tensors and labels,
its limits, the outputs it has) comes from the version's last service, kept after it was closed
(a closed service holds its metadata, not its runtime). A request for a version on disk waits for
the load within its deadline (504 past it, the load going on for the next request); concurrent
first requests share one load; the time waited is in the request's ``Timing`` as ``load_s``.
Counters and a rollout's hooks (``mirror``, ``probe``) live here and follow each load.
"""

from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable, Sequence

import numpy as np

from modelport.engine.predictions import Prediction
from modelport.engine.servable import Classifies, Servable, Timing
from modelport.errors import BadInput, DeadlineExceeded, NotFound, Overloaded

if TYPE_CHECKING:
    from modelport.lifecycle.residency import Residency


class OnDemand(Classifies):
    def __init__(self, residency: "Residency", name: str, version: int, path: Path,
                 load: Callable[[], Awaitable[Servable]], service: Servable) -> None:
        self.name = name
        self.version = version
        self.path = path
        self.load = load
        self.stats = service.stats  # one set of counters across the version's loads
        self.in_flight = 0  # requests from arrival to answer, those waiting for a load included
        self.closed = False  # retired by the version manager: never loaded again
        self.load_started = False  # the load under way has begun (past making room): it is not cancelled
        self.size_bytes = 0  # RSS growth over its last load (set by the residency)
        self.peak_bytes = 0  # the same at the load's peak: what the next load makes room for
        self._residency = residency
        self._service: Servable | None = service
        self._last: Servable = service  # the current service, or the last one (closed): its metadata
        self._loading: asyncio.Future | None = None
        self._waiting = 0
        self._mirror = None
        self._probe = None

    # -- what front-ends read before a request runs -----------------------------------------------

    @property
    def resident(self) -> bool:
        return self._service is not None

    @property
    def model(self):
        return self._last.model

    @property
    def serving(self):
        return self._last.serving

    @property
    def output_names(self) -> list[str]:
        return self._last.output_names

    @property
    def busy(self) -> bool:
        return self._service is not None and self._service.busy

    @property
    def queued(self) -> int:
        return (self._service.queued if self._service is not None else 0) + self._waiting

    def admit(self) -> None:
        if self._service is not None:
            self._service.admit()
        elif self._waiting >= self._last.serving.max_queue_size:
            raise Overloaded(f"model {self.name!r} version {self.version} is loading and already has "
                             f"{self._waiting} requests waiting for it", retry_after_s=1)

    def check_rows(self, rows: int, input_name: str | None = None) -> None:
        self._last.check_rows(rows, input_name)

    def check_tensor(self, array: np.ndarray) -> None:
        self._last.check_tensor(array)

    def resolve_outputs(self, names: Sequence[str] | None) -> list[str]:
        return self._last.resolve_outputs(names)

    def top_k(self, outputs: dict[str, np.ndarray], k: int | None) -> list[list[Prediction]]:
        return self._last.top_k(outputs, k)

    # -- a rollout's hooks, kept across loads ---------------------------------------------------------

    @property
    def mirror(self):
        return self._mirror

    @mirror.setter
    def mirror(self, hook) -> None:
        self._mirror = hook
        if self._service is not None:
            self._hook(self._service)

    @property
    def probe(self):
        return self._probe

    @probe.setter
    def probe(self, hook) -> None:
        self._probe = hook
        if self._service is not None:
            self._hook(self._service)

    def _hook(self, service) -> None:
        # The rollout tells the versions apart by identity: the answers it sees come from this object.
        service.mirror = None if self._mirror is None else functools.partial(_from, self._mirror, self)
        service.probe = self._probe

    # -- requests -----------------------------------------------------------------------------------

    async def infer_images(self, images: Sequence[bytes], *, deadline: float | None, timing: Timing,
                           input_name: str | None = None) -> dict[str, np.ndarray]:
        if not images:  # what can be refused without the model is refused before loading it
            raise BadInput("no image given", input_name=input_name)
        self.check_rows(len(images), input_name)
        service = await self._enter(deadline, timing)
        try:
            return await service.infer_images(images, deadline=deadline, timing=timing, input_name=input_name)
        finally:
            self._leave()

    async def infer_crops(self, crops: np.ndarray, *, deadline: float | None, timing: Timing) -> dict[str, np.ndarray]:
        service = await self._enter(deadline, timing)
        try:
            return await service.infer_crops(crops, deadline=deadline, timing=timing)
        finally:
            self._leave()

    async def infer_tensor(self, array: np.ndarray, *, deadline: float | None, timing: Timing) -> dict[str, np.ndarray]:
        self.check_tensor(array)
        service = await self._enter(deadline, timing)
        try:
            return await service.infer_tensor(array, deadline=deadline, timing=timing)
        finally:
            self._leave()

    async def _enter(self, deadline: float | None, timing: Timing) -> Servable:
        """The resident service, loaded first if need be; counts the request in flight until _leave()."""
        self.in_flight += 1
        self._residency.touch(self)
        if self._service is not None:
            return self._service
        try:
            return await self._wait_for_load(deadline, timing)
        except BaseException:
            self._leave()
            raise

    def _leave(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self._residency.idle()

    async def _wait_for_load(self, deadline: float | None, timing: Timing) -> Servable:
        if self.closed:
            raise NotFound(f"model {self.name!r} version {self.version} is being unloaded")
        if self._loading is None or self._loading.done():
            self._loading = asyncio.ensure_future(self._residency.reload(self))
            self._loading.add_done_callback(self._load_ended)
        loading = self._loading
        started = time.monotonic()
        self._waiting += 1
        try:
            timeout = None if deadline is None else max(0.0, deadline - started)
            return await asyncio.wait_for(asyncio.shield(loading), timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"deadline passed while model {self.name!r} version {self.version} was loading "
                                   f"from disk; not computed (the load goes on)") from None
        finally:
            self._waiting -= 1
            timing.load_s = time.monotonic() - started  # in the request's Server-Timing
            self._residency.waited(timing.load_s)
            if not self._waiting and not self.load_started:
                loading.cancel()  # everyone left while it waited for room: nobody needs it now

    def _load_ended(self, loading: asyncio.Future) -> None:
        self.load_started = False
        if self._loading is loading:
            self._loading = None
        if not loading.cancelled():
            loading.exception()  # its waiters were told; a later request tries again

    # -- the residency's side ---------------------------------------------------------------------

    def attach(self, service: Servable) -> None:
        service.stats = self.stats
        self._hook(service)
        self._service = self._last = service

    def detach(self) -> Servable | None:
        """Take the service out (the caller closes it): from now on a request waits for a load."""
        service, self._service = self._service, None
        return service

    def start(self) -> None:
        pass  # its service was started by the loader

    async def close(self) -> None:
        """Retired from the routing table: unload it (if resident) and never load it again."""
        self.closed = True
        if self._loading is not None and not self.load_started:
            self._loading.cancel()
        service = self._residency.forget(self)
        if service is not None:
            await service.close()


def _from(hook, servable: OnDemand, **seen) -> None:
    hook(**{**seen, "service": servable})
