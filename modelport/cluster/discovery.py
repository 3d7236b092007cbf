"""Client-side discovery: the client finds workers in the member directory and calls them directly.

The article's "pseudo-DNS": step one, look the workers up (a ``Directory``: listed once, then
followed by watch, so no etcd round trip per request, and the last known list survives an
etcd outage); step two, call one of them with the ordinary single-address client
(``modelport.client.AsyncClient``), whose request building and error mapping are reused as they are.

- **Which workers**: those whose directory entry has the requested model (and version or label)
  READY and is not ``draining``.
- **Which one**: power of two choices on a cost the client measures itself: Finagle's peak EWMA
  of latency (a slow answer counts at once, fast ones decay it over ``tau_s``) times the requests
  it has in flight there, plus half the load the worker reported with its latest answer (in-band:
  the member directory carries no load).
- **Failover**: a failure that says "not here" (connection refused or reset, the worker left the
  member directory mid-request, 503 draining/overloaded) is retried on another worker, within a retry
  budget (``retry_ratio`` extra requests over a 10 s window, plus a small floor); an error that
  came from the model (400, 404, 500, deadline) is returned as it is.
- **Hedging** (off unless ``hedge_after_ms``): if the first attempt has not answered after a delay
  (fixed, or "p95": the p95 of the other workers' latencies), a second copy goes to another worker; the first answer
  wins and the other attempt is cancelled (over HTTP its connection is closed, so a queued request
  is never computed). Hedges are paid from the same budget.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, TypeVar

from modelport.cluster.etcd import stop
from modelport.cluster.members import DRAINING, ClusterURL, Directory, Member
from modelport.errors import ModelportError, NotFound, Overloaded, ServerUnreachable, Unavailable

logger = logging.getLogger("modelport.discovery")
T = TypeVar("T")


class WorkerGone(Unavailable):
    """The worker left the member directory (or could not be reached) while a request was on its way."""


class LatencyWindow:
    """The last ``size`` latencies and their (median, p95), sorted again only every ``every`` new
    samples, not per request."""

    def __init__(self, size: int, every: int) -> None:
        self._values: collections.deque[float] = collections.deque(maxlen=size)
        self._every = every
        self._samples = 0
        self._sorted_at = -1
        self._quantiles = (0.001, 0.0)  # before any sample

    def __len__(self) -> int:
        return len(self._values)

    def add(self, latency_s: float) -> None:
        self._values.append(latency_s)
        self._samples += 1

    def quantiles(self) -> tuple[float, float]:
        # A short window is sorted on every sample (a cold first answer stood as the median for 16).
        every = 1 if len(self._values) < 4 * self._every else self._every
        if self._values and (self._sorted_at < 0 or self._samples - self._sorted_at >= every):
            ordered = sorted(self._values)
            self._quantiles = (ordered[len(ordered) // 2], ordered[int(0.95 * (len(ordered) - 1))])
            self._sorted_at = self._samples
        return self._quantiles


@dataclass
class Endpoint:
    member: Member
    client: object  # the single-address AsyncClient for this worker
    in_flight: int = 0
    ewma_s: float = 0.0  # 0: no answer seen yet
    stamp: float = field(default_factory=time.monotonic)
    last_sent: float = field(default_factory=time.monotonic)
    attempts: set = field(default_factory=set)
    gone: bool = False
    others: int = 0  # requests of other clients there, as of its latest answer to us
    others_at: float = 0.0
    latencies: LatencyWindow = field(default_factory=lambda: LatencyWindow(200, 16))  # its own answers

    def p95(self) -> float | None:
        """This worker's own p95, None until it has answered 20 times."""
        return self.latencies.quantiles()[1] if len(self.latencies) >= 20 else None

    def observe(self, latency_s: float, tau_s: float) -> None:
        """Peak EWMA: jump up to a slower sample at once, decay towards faster ones."""
        now = time.monotonic()
        if self.ewma_s == 0.0 or latency_s > self.ewma_s:
            self.ewma_s = latency_s
        else:
            weight = math.exp(-(now - self.stamp) / tau_s)
            self.ewma_s = self.ewma_s * weight + latency_s * (1 - weight)
        self.stamp = now

    def cost(self, default_s: float, tau_s: float, now: float) -> float:
        # A worker that looked slow and is no longer chosen gets no new samples to correct it: its
        # estimate decays towards the typical latency while it waits (Finagle's peak EWMA decays
        # on read the same way), and once it has not been tried for a quarter of the decay time
        # (0.5 s) it competes as a fresh worker again: one probe at a time, since a probe in
        # flight counts. A worker that is still slow is then found slow again by that one request.
        ewma = self.ewma_s or default_s
        if ewma > default_s:
            if self.in_flight == 0 and now - self.last_sent > tau_s / 4:
                ewma = default_s
            else:
                ewma = default_s + (ewma - default_s) * math.exp(-(now - self.stamp) / tau_s)
        others = self.others if now - self.others_at <= tau_s / 4 else 0
        return ewma * (self.in_flight + 1 + 0.5 * others)

    def note_load(self, load) -> None:
        """The load the worker reported with an answer, as the answer arrives (in-band,
        ``protocol/load.py``), kept as the requests it holds besides ours while some are waiting
        there: the report counts our others too (all but the one it answers, still in flight here). It counts while it is
        recent (a quarter of the decay time): an older report says little about now, and a worker
        not chosen for a while competes as a fresh one."""
        # Only a worker that has requests waiting is loaded in a way that delays the next one (one
        # running, or a hedge's loser still counted there, is not).
        others = max(0, load.in_flight - (self.in_flight - 1)) if load.queued else 0
        self.others, self.others_at = others, time.monotonic()


class RetryBudget:
    """At most ``ratio`` retries (and hedges) per request over a sliding window, plus a floor of
    ``min_per_s`` so that a client with little traffic can still fail over (Finagle's RetryBudget)."""

    def __init__(self, ratio: float = 0.2, min_per_s: float = 1.0, window_s: float = 10.0) -> None:
        self.ratio, self.min_per_s, self.window_s = ratio, min_per_s, window_s
        self._requests: collections.deque[float] = collections.deque()
        self._retries: collections.deque[float] = collections.deque()

    def deposit(self) -> None:
        self._requests.append(time.monotonic())

    def withdraw(self) -> bool:
        now = time.monotonic()
        for queue in (self._requests, self._retries):
            while queue and queue[0] < now - self.window_s:
                queue.popleft()
        if len(self._retries) + 1 > self.ratio * len(self._requests) + self.min_per_s * self.window_s:
            return False
        self._retries.append(now)
        return True


def serves(member: Member, model: str, version: str | int | None) -> bool:
    info = member.models.get(model)
    if info is None or member.state == DRAINING:
        return False
    if version is None:
        return bool(info.get("versions"))
    wanted = str(version)
    return wanted in info.get("versions", []) or wanted in info.get("labels", {})


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, (WorkerGone, Overloaded, ServerUnreachable)):  # the last: refused, reset, cut short
        return True
    # draining or still loading there (not "member directory unreachable"); a timeout is not retried
    return isinstance(exc, Unavailable) and exc.kind == "unavailable"


class Discovery:
    def __init__(self, cluster: ClusterURL, *, transport: str, connect: Callable[[str], object],
                 timeout_s: float = 30.0, hedge_after_ms: float | str | None = None, retry_ratio: float = 0.2,
                 tau_s: float = 2.0) -> None:
        if transport not in ("http", "zmq", "grpc"):
            raise ValueError(f"transport must be 'http', 'zmq' or 'grpc', not {transport!r}")
        if hedge_after_ms not in (None, "p95") and not (isinstance(hedge_after_ms, (int, float)) and hedge_after_ms > 0):
            raise ValueError(f"hedge_after_ms must be a positive number of ms or 'p95', not {hedge_after_ms!r}")
        self.cluster = cluster
        self.transport = transport
        self.timeout_s = timeout_s
        self.hedge_after_ms = hedge_after_ms
        self.budget = RetryBudget(retry_ratio)
        self.tau_s = tau_s
        self._connect = connect  # URL -> single-address AsyncClient
        self.endpoints: dict[str, Endpoint] = {}
        self.directory = Directory(cluster, on_change=self._members_changed)
        self._task: asyncio.Task | None = None
        self._closing: set[asyncio.Task] = set()
        self._latencies = LatencyWindow(1000, 32)  # every worker's answers
        self.stats = collections.Counter()  # requests, retries, hedges, hedges_won, budget_exhausted
        self.attempts = collections.Counter()  # per member id: attempts sent there

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.directory.run(), name="discovery")
        try:
            await asyncio.wait_for(self.directory.synced.wait(), self.timeout_s)
        except asyncio.TimeoutError:
            raise Unavailable(f"directory {self.cluster} unreachable: no worker list after {self.timeout_s} s") from None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.directory.close()  # closing the channel also ends a watch read the cancel missed
        await stop(self._task, self.timeout_s)
        for endpoint in list(self.endpoints.values()):
            await endpoint.client.close()
        self.endpoints.clear()

    def candidates(self, model: str, version: str | int | None) -> list[Member]:
        members = [m for m in self.directory.members.values() if serves(m, model, version) and self._address(m)]
        if members:
            return members
        if not self.directory.members:
            raise Unavailable(f"no workers in {self.cluster}", retry_after_s=1)
        what = f"model {model!r}" + (f" version {version}" if version is not None else "")
        if any(serves(m, model, version) for m in self.directory.members.values()):
            raise NotFound(f"no worker in {self.cluster} serves {what} over {self.transport}")
        if any(model in m.models for m in self.directory.members.values() if m.state == DRAINING):
            raise Unavailable(f"every worker serving {what} is draining", retry_after_s=1)
        raise NotFound(f"no worker in {self.cluster} serves {what}")

    async def call(self, model: str, version: str | int | None, op: Callable[[object], Awaitable[T]]) -> T:
        """Run ``op(worker_client)`` on a chosen worker, failing over and hedging as configured."""
        await self.start()
        self.stats["requests"] += 1
        self.budget.deposit()
        tried: set[str] = set()
        while True:
            first = self._pick(model, version, tried)
            try:
                return await self._hedged(first, model, version, op, tried)
            except Exception as exc:
                if not _retryable(exc):
                    raise
                if not self._any_left(model, version, tried):
                    tried.clear()  # everyone failed once: a fresh round, if the budget allows
                if not self.budget.withdraw():
                    self.stats["budget_exhausted"] += 1
                    raise
                self.stats["retries"] += 1
                logger.debug("retrying on another worker after %s", exc)

    # -- choosing ------------------------------------------------------------------------------------

    def _pick(self, model: str, version, tried: set[str]) -> Endpoint:
        members = self.candidates(model, version)
        fresh = [m for m in members if m.id not in tried] or members
        pair = random.sample(fresh, 2) if len(fresh) > 1 else fresh
        default = self._latencies.quantiles()[0]
        now = time.monotonic()
        return min((self._endpoint(m) for m in pair), key=lambda e: e.cost(default, self.tau_s, now))

    def _any_left(self, model: str, version, tried: set[str]) -> bool:
        try:
            return any(m.id not in tried for m in self.candidates(model, version))
        except ModelportError:
            return False

    def _address(self, member: Member) -> str | None:
        if self.transport == "http":
            return member.http
        if self.transport == "grpc":
            return "grpc://" + member.grpc if member.grpc else None
        return "zmq://" + member.zmq.removeprefix("tcp://") if member.zmq else None

    def _endpoint(self, member: Member) -> Endpoint:
        endpoint = self.endpoints.get(member.id)
        if endpoint is None or endpoint.gone or self._address(endpoint.member) != self._address(member):
            endpoint = Endpoint(member, self._connect(self._address(member)))
            if hasattr(endpoint.client, "on_load"):  # every answer's load report, errors' too
                endpoint.client.on_load = endpoint.note_load
            self.endpoints[member.id] = endpoint
        endpoint.member = member  # the latest models and state
        return endpoint

    def _members_changed(self, members: dict[str, Member]) -> None:
        # A draining worker is no longer chosen (``serves``) but finishes what it has; a worker
        # that left gets its attempts cancelled (they fail over as WorkerGone) and its client closed.
        for member_id in [i for i in self.endpoints if i not in members]:
            endpoint = self.endpoints.pop(member_id)
            endpoint.gone = True
            for attempt in list(endpoint.attempts):
                attempt.cancel()
            closing = asyncio.get_running_loop().create_task(self._close_when_idle(endpoint))
            self._closing.add(closing)  # a task nobody references may be collected before it runs
            closing.add_done_callback(self._closing.discard)

    async def _close_when_idle(self, endpoint: Endpoint) -> None:
        while endpoint.attempts:
            await asyncio.sleep(0.05)
        await endpoint.client.close()

    # -- attempts ---------------------------------------------------------------------------------

    async def _hedged(self, first: Endpoint, model: str, version, op, tried: set[str]):
        tried.add(first.member.id)
        one = asyncio.ensure_future(self._attempt(first, op))
        delay_s = self._hedge_delay_s(first, model, version)
        try:
            if delay_s is None:
                return await one
            done, _ = await asyncio.wait({one}, timeout=delay_s)
            if done:
                return one.result()
            try:
                second = self._pick(model, version, tried)
            except ModelportError:
                return await one
            if second is first or second.member.id in tried or not self.budget.withdraw():
                return await one
            tried.add(second.member.id)
            self.stats["hedges"] += 1
            two = asyncio.ensure_future(self._attempt(second, op))
            pending, error = {one, two}, None
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for attempt in done:
                    if attempt.exception() is None:
                        if attempt is two:
                            self.stats["hedges_won"] += 1
                        for loser in pending:
                            loser.cancel()
                        return attempt.result()
                    error = attempt.exception()
            raise error
        except asyncio.CancelledError:
            one.cancel()
            raise

    async def _attempt(self, endpoint: Endpoint, op):
        self.attempts[endpoint.member.id] += 1
        endpoint.last_sent = time.monotonic()
        endpoint.in_flight += 1
        endpoint.attempts.add(asyncio.current_task())
        start = time.monotonic()
        try:
            result = await op(endpoint.client)
        except asyncio.CancelledError:
            if endpoint.gone:
                raise WorkerGone(f"worker {endpoint.member.id} left the member directory during the request") from None
            # A hedge's loser: its latency is at least this long, and no shorter than the worker's
            # usual (a lower bound is not a sample: taken as one, a slow worker whose requests are
            # always hedged would look as fast as the hedge delay). It counts in the p95 too:
            # leaving the slow attempts out would lower the p95, hedge earlier, and spiral into
            # hedging most requests.
            elapsed = max(time.monotonic() - start, endpoint.ewma_s)
            endpoint.observe(elapsed, self.tau_s)
            self._record(endpoint, elapsed)
            raise
        except Exception as exc:
            if _retryable(exc):
                endpoint.observe(max(time.monotonic() - start, endpoint.ewma_s * 2, 0.01), self.tau_s)
            raise
        finally:
            endpoint.in_flight -= 1
            endpoint.attempts.discard(asyncio.current_task())
        elapsed = time.monotonic() - start
        endpoint.observe(elapsed, self.tau_s)
        self._record(endpoint, elapsed)
        return result

    def _hedge_delay_s(self, first: Endpoint, model: str, version) -> float | None:
        """A fixed delay, or "p95": the p95 of the workers a hedge could go to, not of this one.

        The hedge is worth sending once this attempt has waited longer than another worker would
        take: with every worker alike that is the usual p95, but when one worker is slower than the
        rest, its own answers make the overall p95 (once they are over 5 % of all), and a hedge at
        that p95 would come too late for exactly the requests that need it.
        """
        if self.hedge_after_ms is None:
            return None
        if self.hedge_after_ms != "p95":
            return self.hedge_after_ms / 1000
        if len(self._latencies) < 20:
            return None  # not enough answers yet to know the tail
        others, unsettled = [], []
        for member in self.candidates(model, version):
            endpoint = self.endpoints.get(member.id)
            if endpoint is not None and endpoint is not first and not endpoint.gone:
                p95 = endpoint.p95()
                if p95 is not None:
                    others.append(p95)
                elif endpoint.ewma_s:
                    unsettled.append(endpoint.ewma_s)
        if others:
            return statistics.median(others)
        # No other has a p95 of its own (a slow worker seldom chosen never gets one): the overall p95,
        # but not before they are known to answer (sooner, a hedge cannot win; it only copies load).
        return max([self._latencies.quantiles()[1]] + unsettled)

    def _record(self, endpoint: Endpoint, latency_s: float) -> None:
        endpoint.latencies.add(latency_s)
        self._latencies.add(latency_s)
