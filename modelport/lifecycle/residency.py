"""The memory budget (``--memory-budget-mb``): which model versions stay in memory, and which wait on disk.

Every version is loaded once when it appears (checked, warmed and measured, as without a budget);
from then on it is *resident* or *on disk*. A request for a version on disk loads it again
(``on_demand.py``); to make room, the least recently used resident version is unloaded -- never
one with requests in flight, never one under rollout (its serving version and its candidate).

What counts against the budget is the larger of two figures: the sizes of the resident versions
(each one's RSS growth over its last load), and the process's RSS above its *base*, the RSS
measured when the budget was set up, before any model. The second keeps the budget honest about
what loading models adds besides the versions themselves (the runtime's libraries, its arenas): a
budget is a promise about the process, ``peak RSS <= base + budget``. A load first makes room for
what the version took at its peak the last time (a version never loaded: its files' size times
what the last load took per byte of files) and a headroom (5 % of the budget, raised to what it
is seen to fall short by), and trims again afterwards if it took more.

The budget is exceeded only where nothing can be unloaded: a version bigger than the whole budget,
or rollouts holding more than it. A warning says so. Loads run one at a time (their measurements
would otherwise mix). Everything runs on the server's event loop: the LRU order and the in-flight
counts change between awaits only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable, Protocol

from modelport.engine.servable import Servable
from modelport.errors import NotFound
from modelport.lifecycle.on_demand import OnDemand
from modelport.memory import release_memory, trim_heap

if TYPE_CHECKING:
    from modelport.lifecycle.routing import RoutingTable

logger = logging.getLogger("modelport.residency")

# A version never loaded is estimated at its files' size times this, until a load has measured the
# ratio (the default model on ONNX Runtime: its load peaks at ~4.3 x the .onnx file, and keeps 2 x).
_FIRST_RATIO = 4.0
_SAMPLE_S = 0.005  # RSS is sampled this often during a load: its peak is what the next load makes room for
# Measured (benchmarks/memory_budget.py, 20 versions of the default model, 4 clients): requests and
# missed spikes took up to 4.5 % of the budget beyond what the loads had measured.
_HEADROOM_SHARE = 0.05
_RECHECK_S = 0.1  # a load waiting for requests in flight to end looks again at least this often
_WARN_EVERY_S = 60.0


class Observer(Protocol):
    """Where the budget reports what it did (the server's metrics)."""

    def model_loaded(self, model: str, version: int, reason: str, seconds: float) -> None: ...

    def model_evicted(self, model: str, version: int) -> None: ...

    def load_waited(self, seconds: float) -> None: ...


def rss_bytes() -> int:
    """The process's resident set now (0 where /proc is missing: sizes then come from the files)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """The process's highest resident set so far (VmHWM; 0 where /proc is missing)."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def files_bytes(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):  # a file removed meanwhile
            total += p.stat().st_size if p.is_file() else 0
    return total


class Residency:
    def __init__(self, budget_bytes: int, routing: "RoutingTable", *, observer: Observer | None = None) -> None:
        self.budget_bytes = budget_bytes
        self.routing = routing  # for the rollouts in progress: their versions stay
        self._observer = observer
        self._lru: OrderedDict[tuple[str, int], OnDemand] = OrderedDict()  # resident; least recently used first
        self._lock = asyncio.Lock()  # one load at a time
        self._changed = asyncio.Event()  # a version's last request ended, or a version left
        self._ratio = _FIRST_RATIO
        # Room a load keeps free besides its version's peak, for what the budget cannot see coming:
        # requests in flight (a version's runtime arena grows with the first batch bigger than its
        # warm-up), and the spikes sampling misses. A share of the budget to begin with, raised to
        # what was seen missed or exceeded.
        self._headroom = int(budget_bytes * _HEADROOM_SHARE)
        self._exceeded = False  # knowingly (nothing could be unloaded): the peak RSS no longer teaches anything
        self._warned_at = -_WARN_EVERY_S
        release_memory()
        self.base_bytes = rss_bytes()

    # -- what the server and the index read -------------------------------------------------------

    def resident(self) -> list[OnDemand]:
        """The resident versions, least recently used first."""
        return list(self._lru.values())

    @property
    def resident_bytes(self) -> int:
        return sum(od.size_bytes for od in self._lru.values())

    def in_use_bytes(self) -> int:
        """What counts against the budget now."""
        rss = rss_bytes()
        return max(self.resident_bytes, rss - self.base_bytes if rss else 0)

    # -- the version manager's side -----------------------------------------------------------------

    async def add(self, name: str, version: int, path: Path, load: Callable[[], Awaitable[Servable]]) -> OnDemand:
        """Load a version that has just appeared (making room first); it starts resident."""
        async with self._lock:
            await self._make_room(self._estimate(path, None))
            service, size, peak, seconds = await self._measured(load)
            od = OnDemand(self, name, version, path, load, service)
            self._loaded(od, size, peak, "new", seconds)
            await self._make_room(0, keep=od)
        return od

    # -- the stand-ins' side (on_demand.py) -------------------------------------------------------

    async def reload(self, od: OnDemand) -> Servable:
        """Load a version on disk again for a request, making room first."""
        async with self._lock:
            if od.closed:
                raise NotFound(f"model {od.name!r} version {od.version} is being unloaded")
            await self._make_room(self._estimate(od.path, od), keep=od)
            od.load_started = True  # from here on the load runs to its end, whoever still waits
            service, size, peak, seconds = await self._measured(od.load)
            if od.closed:  # retired while it loaded
                await service.close()
                release_memory()
                raise NotFound(f"model {od.name!r} version {od.version} is being unloaded")
            od.attach(service)
            self._loaded(od, size, peak, "demand", seconds)
            await self._make_room(0, keep=od)
            return service

    def touch(self, od: OnDemand) -> None:
        key = (od.name, od.version)
        if key in self._lru:
            self._lru.move_to_end(key)

    def idle(self) -> None:
        """A version's last request in flight ended: a load waiting for room may find it now."""
        self._changed.set()

    def waited(self, seconds: float) -> None:
        if self._observer is not None:
            self._observer.load_waited(seconds)

    def forget(self, od: OnDemand) -> Servable | None:
        """The version is retired: take it out, returning its service if it was resident."""
        self._lru.pop((od.name, od.version), None)
        self._changed.set()
        return od.detach()

    # -- the work ---------------------------------------------------------------------------------

    def _learn_headroom(self) -> None:
        """Exceeded the budget at some moment (VmHWM above it): keep that much more room from now on."""
        high = peak_rss_bytes()
        if high and not self._exceeded:
            self._headroom = max(self._headroom, high - self.base_bytes - self.budget_bytes)

    def _estimate(self, path: Path, od: OnDemand | None) -> int:
        """The room a load makes first: the version's peak the last time (else its files' size times
        what the last load took per byte of files), and the headroom learnt so far."""
        peak = od.peak_bytes if od is not None and od.peak_bytes else int(files_bytes(path) * self._ratio)
        return min(self.budget_bytes, peak + self._headroom)

    def _evictable(self, od: OnDemand) -> bool:
        return not od.in_flight and not od.closed and not self._under_rollout(od)

    def _under_rollout(self, od: OnDemand) -> bool:
        rollout = self.routing.rollouts.get(od.name)
        return (rollout is not None and rollout.active
                and od.version in (rollout.serving.version, rollout.candidate.version))

    async def _make_room(self, need: int, keep: OnDemand | None = None) -> None:
        self._learn_headroom()
        while True:
            in_use = self.in_use_bytes()
            if in_use + need <= self.budget_bytes:
                return
            others = [od for od in self._lru.values() if od is not keep]
            victim = next((od for od in others if self._evictable(od)), None)  # the least recently used first
            if victim is not None:
                await self._evict(victim)
                continue
            if any(od.in_flight and not self._under_rollout(od) for od in others):
                # Requests end within their deadlines: wait for one of these versions to go idle.
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), _RECHECK_S)
                continue
            self._over_budget(in_use + need, others)
            return

    async def _evict(self, od: OnDemand) -> None:
        del self._lru[(od.name, od.version)]
        service = od.detach()  # from here a request for it waits for a load (behind this one)
        if service is not None:
            await service.close()  # nothing in flight: nothing to drain
            release_memory()
        logger.info("model %s version %s unloaded to make room (memory budget %d MB)", od.name, od.version,
                    self.budget_bytes >> 20)
        if self._observer is not None:
            self._observer.model_evicted(od.name, od.version)

    async def _measured(self, load: Callable[[], Awaitable[Servable]]) -> tuple[Servable, int, int, float]:
        """Load, sampling RSS meanwhile: (service, RSS growth, peak RSS growth, seconds).

        Sampling misses the sharpest spikes (a runtime parsing and optimising a graph while it holds
        the GIL): where the load set a new high for the process (VmHWM), its true peak is known, and
        what sampling missed there joins the headroom every later load keeps."""
        trim_heap()
        before = rss_bytes()
        high_before = peak_rss_bytes()
        peak = before
        started = time.monotonic()
        task = asyncio.ensure_future(load())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=_SAMPLE_S)
                peak = max(peak, rss_bytes())
        except asyncio.CancelledError:  # the server is stopping
            task.cancel()
            raise
        service = task.result()
        seconds = time.monotonic() - started
        high = peak_rss_bytes()
        if high > high_before:  # this load set the process's high: its true peak
            self._headroom = max(self._headroom, high - peak)
            peak = high
        trim_heap()
        size = max(0, rss_bytes() - before)
        return service, size, max(size, peak - before), seconds

    def _loaded(self, od: OnDemand, size: int, peak: int, reason: str, seconds: float) -> None:
        od.size_bytes, od.peak_bytes = size, peak
        self._lru[(od.name, od.version)] = od
        self._lru.move_to_end((od.name, od.version))
        files = files_bytes(od.path)
        if files and peak:
            self._ratio = peak / files
        logger.info("model %s version %s loaded (%s) in %.2f s: %.1f MB resident (peak %.1f MB); %d version(s) "
                    "resident, %.0f of %.0f MB in use", od.name, od.version, reason, seconds, size / 2**20,
                    peak / 2**20, len(self._lru), self.in_use_bytes() / 2**20, self.budget_bytes / 2**20)
        if self._observer is not None:
            self._observer.model_loaded(od.name, od.version, reason, seconds)

    def _over_budget(self, wanted: int, others: list[OnDemand]) -> None:
        self._exceeded = True
        now = time.monotonic()
        level = logging.WARNING if now - self._warned_at >= _WARN_EVERY_S else logging.DEBUG
        if level == logging.WARNING:
            self._warned_at = now
        pinned = [f"{od.name} {od.version}" for od in others if self._under_rollout(od)]
        logger.log(level, "memory budget of %.0f MB exceeded (%.0f MB wanted): nothing can be unloaded%s",
                   self.budget_bytes / 2**20, wanted / 2**20,
                   f" (under rollout: {', '.join(pinned)})" if pinned else " (no other version is resident)")
