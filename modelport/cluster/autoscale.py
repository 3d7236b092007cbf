"""``modelport autoscale``: between ``--min`` and ``--max`` local workers, as many as their load asks for.

The rule is Ray Serve's: desired workers = ceil(load / target per worker), the load averaged over
a look-back window, clamped to [min, max]. The fleet grows only once desired > current has held
for ``up_delay_s``, and shrinks only once desired < current has held for ``down_delay_s`` (longer:
a lull should not cost a warm worker). A worker leaves by SIGTERM, so that it drains (publishes
``draining``, serves on for its ``--drain-s``, finishes what is in flight, exits); SIGKILL only if
it outlives ``stop_timeout_s``.

The load comes from the workers themselves: each one's ``/metrics``, its ongoing inference
requests (``modelport_requests_in_flight``: running or waiting, every protocol; Ray Serve's
"ongoing requests"). The member directory is only asked which of our children is which worker
(the member whose ``pid`` and ``host`` are the child's), for its address; it holds no load.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import socket
import subprocess
import time
from collections import deque
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from modelport.cluster.etcd import stop as stop_task
from modelport.cluster.members import READY, ClusterURL, Directory, Member
from modelport.errors import BadInput

logger = logging.getLogger("modelport.autoscale")

# The worker's gauges (server/metrics.py; deploy/kubernetes/*.yaml query the same names).
IN_FLIGHT = "modelport_requests_in_flight"
SCRAPE_TIMEOUT_S = 2.0
UNREGISTERED_WARNING_S = 60.0  # a worker not in the directory by then: probably another --cluster
EARLY_DEATH_S = 10.0  # a worker that dies younger than this (or unregistered) is restarted with backoff
MAX_RESTART_DELAY_S = 30.0


@dataclass(frozen=True)
class AutoscaleConfig:
    min_workers: int = 1
    max_workers: int = 1
    target_in_flight: float = 1.0  # ongoing requests (running or waiting) one worker should carry
    up_delay_s: float = 2.0
    down_delay_s: float = 30.0
    interval_s: float = 0.5  # between two measurements (and decisions)
    look_back_s: float = 2.0  # the load is the average of the measurements this recent
    stop_timeout_s: float = 60.0  # after SIGTERM, the longest a worker may take to drain and exit

    def __post_init__(self) -> None:
        if not 1 <= self.min_workers <= self.max_workers:
            raise BadInput(f"need 1 <= --min <= --max, got --min {self.min_workers} --max {self.max_workers} "
                           "(at least one worker: the load is measured on the workers)")
        if self.target_in_flight <= 0 or self.interval_s <= 0 or self.look_back_s <= 0:
            raise BadInput("--target-in-flight, --interval-s and --look-back-s must be positive")
        if min(self.up_delay_s, self.down_delay_s, self.stop_timeout_s) < 0:
            raise BadInput("delays and timeouts cannot be negative")


@dataclass(frozen=True)
class Decision:
    current: int
    desired: int
    load: float | None  # the averaged load it was decided on (None: not measured)
    why: str


class Rule:
    """The decision alone, on plain numbers and a clock passed in: no processes, no I/O."""

    def __init__(self, config: AutoscaleConfig) -> None:
        self.config = config
        self._samples: deque[tuple[float, float]] = deque()  # (time, load)
        self._direction = 0  # +1: desired above current, -1: below, 0: equal
        self._since = 0.0  # when the current direction began

    def observe(self, now: float, load: float) -> None:
        self._samples.append((now, load))
        self._forget(now)

    def average(self, now: float) -> float | None:
        """The mean load over the look-back window; None when nothing was measured in it."""
        self._forget(now)
        if not self._samples or self._samples[-1][0] <= now - self.config.look_back_s:
            return None
        return sum(load for _, load in self._samples) / len(self._samples)

    def wanted(self, load: float) -> int:
        """Workers for this load, before clamping (a hair of float error does not add a worker)."""
        return max(0, math.ceil(load / self.config.target_in_flight - 1e-9))

    def decide(self, now: float, current: int) -> Decision | None:
        """The new fleet size, or None to keep ``current``."""
        c = self.config
        load = self.average(now)
        if not c.min_workers <= current <= c.max_workers:  # the bounds are not a decision: no delay
            self._direction = 0
            desired = min(c.max_workers, max(c.min_workers, current))
            return Decision(current, desired, load, "below --min" if current < c.min_workers else "above --max")
        if load is None:  # nothing measured lately (workers starting, etcd away): hold
            self._direction = 0
            return None
        wanted = self.wanted(load)
        desired = min(c.max_workers, max(c.min_workers, wanted))
        direction = (desired > current) - (desired < current)
        if direction != self._direction:
            self._direction, self._since = direction, now
        if direction == 0:
            return None
        held = now - self._since
        if held < (c.up_delay_s if direction > 0 else c.down_delay_s):
            return None
        self._direction = 0
        bound = ""
        if wanted > desired:
            bound = f", capped at --max {c.max_workers}"
        elif wanted < desired:
            bound = f", floored at --min {c.min_workers}"
        why = (f"load {load:.1f} (mean of the last {c.look_back_s:g} s) / target {c.target_in_flight:g} per worker "
               f"= {wanted} worker(s){bound}; {'above' if direction > 0 else 'below'} {current} for {held:.1f} s")
        return Decision(current, desired, load, why)

    def _forget(self, now: float) -> None:
        while self._samples and self._samples[0][0] <= now - self.config.look_back_s:
            self._samples.popleft()


def load_from_metrics(text: str) -> float:
    """A worker's ongoing inference requests (running or waiting, every protocol), from its
    ``/metrics`` text: the gauge counts model requests only, so a scrape does not count itself."""
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == IN_FLIGHT)


class Worker:
    """One child process we started; ``member`` once it has registered."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.pid = process.pid
        self.started = time.monotonic()
        self.exited = asyncio.ensure_future(process.wait())
        self.member: Member | None = None
        self.load: float | None = None  # as last measured
        self.stopping_since: float | None = None  # monotonic time of its SIGTERM
        self.killed = False  # SIGKILLed after outliving its SIGTERM by stop_timeout_s
        self.warned = False  # about not registering

    @property
    def ready(self) -> bool:
        return self.member is not None and self.member.state == READY and self.stopping_since is None

    def signal(self, sig: int) -> None:
        if self.process.returncode is None:  # only a child not yet reaped: its pid is still ours
            try:
                self.process.send_signal(sig)
            except ProcessLookupError:
                pass

    def __str__(self) -> str:
        return f"pid {self.pid}" + (f" ({self.member.id})" if self.member is not None else "")


class Autoscaler:
    """Runs ``command`` as between ``min_workers`` and ``max_workers`` children, until ``stop()``."""

    def __init__(self, cluster: ClusterURL, command: list[str], config: AutoscaleConfig) -> None:
        self.cluster = cluster
        self.command = list(command)
        self.config = config
        self.rule = Rule(config)
        self.directory = Directory(cluster)
        self.workers: dict[int, Worker] = {}  # by pid: children not yet exited
        self.wanted = config.min_workers  # the fleet size decided; children are started or stopped to match
        self._stopping = asyncio.Event()
        self._signals = 0
        self._early_deaths = 0
        self._restart_at = 0.0
        self._host = socket.gethostname()
        # A worker command without --cluster joins ours (modelport serve reads $MODELPORT_CLUSTER).
        self._env = {**os.environ, "MODELPORT_CLUSTER": str(cluster)}
        self._http: httpx.AsyncClient | None = None

    def stop(self) -> None:
        """The first call drains and stops every worker, then ``run()`` returns; a second sends each
        worker a second SIGTERM (modelport serve then exits at once)."""
        self._signals += 1
        if self._signals == 1:
            logger.info("stopping: draining %d worker(s)", len(self.workers))
            self._stopping.set()
            return
        logger.warning("second signal: telling %d worker(s) to exit now", len(self.workers))
        for worker in self.workers.values():
            worker.signal(signal.SIGTERM)

    async def run(self) -> None:
        c = self.config
        logger.info("autoscaling %s: %d to %d worker(s), target %g in flight per worker, up after %g s, down "
                    "after %g s; worker command: %s", self.cluster, c.min_workers, c.max_workers, c.target_in_flight,
                    c.up_delay_s, c.down_delay_s, " ".join(self.command))
        directory = asyncio.create_task(self.directory.run(), name="directory")
        self._http = httpx.AsyncClient(timeout=SCRAPE_TIMEOUT_S, trust_env=False)  # workers: never via a proxy
        try:
            while not self._stopping.is_set():
                await self._tick()
                try:
                    await asyncio.wait_for(self._stopping.wait(), c.interval_s)
                except asyncio.TimeoutError:
                    pass
        finally:
            await self._stop_all()
            await self._http.aclose()
            directory.cancel()
            await self.directory.close()  # closing the channel also ends a watch read the cancel missed
            await stop_task(directory, 5)
        logger.info("stopped")

    async def _tick(self) -> None:
        now = time.monotonic()
        self._match_members(now)
        load = await self._measure()
        if load is not None:
            self.rule.observe(now, load)
        decision = self.rule.decide(now, self.wanted)
        if decision is not None:
            logger.info("scale %d -> %d worker(s): %s", decision.current, decision.desired, decision.why)
            self.wanted = decision.desired
        await self._reconcile(now)

    def _match_members(self, now: float) -> None:
        by_pid = {m.pid: m for m in self.directory.members.values() if m.host == self._host}
        for worker in self.workers.values():
            member = by_pid.get(worker.pid)
            if member is not None and worker.member is None:
                logger.info("worker %d registered as %s at %s", worker.pid, member.id, member.http)
                self._early_deaths = 0
            elif member is None and worker.member is not None and worker.stopping_since is None:
                logger.warning("worker %s left the member directory while running", worker)
            worker.member = member
            if member is None and not worker.warned and now - worker.started > UNREGISTERED_WARNING_S:
                worker.warned = True
                logger.warning("worker %d has not registered in %s after %.0f s: does its command join this "
                               "cluster (--cluster, or none: $MODELPORT_CLUSTER is set for it)?", worker.pid,
                               self.cluster, UNREGISTERED_WARNING_S)

    async def _measure(self) -> float | None:
        """The fleet's load now: the sum over the ready workers that answered; None if none did."""
        ready = [w for w in self.workers.values() if w.ready]
        loads = await asyncio.gather(*(self._scrape(w) for w in ready))
        for worker, load in zip(ready, loads):
            worker.load = load
        measured = [load for load in loads if load is not None]
        if not measured:
            return None
        logger.debug("load %.1f: %s", sum(measured), ", ".join(f"{w.pid}={w.load}" for w in ready))
        return sum(measured)

    async def _scrape(self, worker: Worker) -> float | None:
        try:
            reply = await self._http.get(worker.member.http + "/metrics")
            reply.raise_for_status()
            return load_from_metrics(reply.text)
        except (httpx.HTTPError, ValueError) as exc:
            logger.debug("worker %s: no metrics (%s)", worker, exc)
            return None

    async def _reconcile(self, now: float) -> None:
        """Start or stop children until ``wanted`` run; SIGKILL what outlived its SIGTERM too long."""
        running = [w for w in self.workers.values() if w.stopping_since is None]
        if len(running) < self.wanted and now >= self._restart_at:
            for _ in range(self.wanted - len(running)):
                await self._start()
        elif len(running) > self.wanted:
            # Starting workers serve nothing yet; then the fewest in flight; then the youngest.
            order = sorted(running, key=lambda w: (w.ready, w.load or 0.0, -w.started))
            for worker in order[:len(running) - self.wanted]:
                self._retire(worker, f"{worker.load or 0:g} in flight" if worker.ready else "not serving yet")
        self._kill_overdue(now)

    def _kill_overdue(self, now: float) -> None:
        for worker in self.workers.values():
            if worker.stopping_since is not None and not worker.killed \
                    and now - worker.stopping_since > self.config.stop_timeout_s:
                logger.warning("worker %s still running %.0f s after SIGTERM: SIGKILL", worker,
                               now - worker.stopping_since)
                worker.signal(signal.SIGKILL)
                worker.killed = True

    async def _start(self) -> None:
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command, env=self._env, stdin=subprocess.DEVNULL,
                start_new_session=True)  # our SIGINT (a terminal's ^C) is not theirs: they drain when we say
        except OSError as exc:
            self._back_off(f"cannot start the worker command ({exc})")
            return
        worker = Worker(process)
        self.workers[worker.pid] = worker
        worker.exited.add_done_callback(lambda _: self._exited(worker))
        logger.info("started worker %d (%d running, %d wanted)", worker.pid,
                    sum(w.stopping_since is None for w in self.workers.values()), self.wanted)

    def _retire(self, worker: Worker, why: str) -> None:
        logger.info("stopping worker %s, %s: SIGTERM, it drains then exits", worker, why)
        worker.stopping_since = time.monotonic()
        worker.signal(signal.SIGTERM)

    def _exited(self, worker: Worker) -> None:
        self.workers.pop(worker.pid, None)
        code = _exit_reason(worker.process.returncode)
        if worker.stopping_since is not None:
            logger.info("worker %s exited (%s) %.1f s after SIGTERM", worker, code,
                        time.monotonic() - worker.stopping_since)
            return
        lived_s = time.monotonic() - worker.started
        when = "before registering" if worker.member is None else f"{lived_s:.1f} s after its start"
        if worker.member is None or lived_s < EARLY_DEATH_S:
            self._back_off(f"worker {worker} exited unexpectedly ({code}) {when}")
        else:
            logger.warning("worker %s exited unexpectedly (%s) %s; replacing it", worker, code, when)

    def _back_off(self, why: str) -> None:
        """Start the next worker later, each time twice as late: a broken command must not fork in a loop."""
        self._early_deaths += 1
        delay = min(MAX_RESTART_DELAY_S, 0.5 * 2 ** (self._early_deaths - 1))
        self._restart_at = time.monotonic() + delay
        logger.warning("%s; starting another in %.1f s", why, delay)

    async def _stop_all(self) -> None:
        for worker in list(self.workers.values()):
            if worker.stopping_since is None:
                self._retire(worker, "the autoscaler is stopping")
        while self.workers:
            await asyncio.wait([w.exited for w in self.workers.values()], timeout=self.config.interval_s)
            self._kill_overdue(time.monotonic())


def _exit_reason(returncode: int) -> str:
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"
