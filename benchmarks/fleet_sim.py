"""Issue 27, "Scale, simulated": the client-side worker choice with 1,000 workers and 10,000 clients.

    python benchmarks/fleet_sim.py [--workers 1000] [--clients 10000] [--utilisation 0.7] [--closed-loop]
                                   [--slo-ms S] [--max-queue N] [--load-memory-s 0.5] [--policies a,b]
                                   [--hosts H --cores-per-host C] [--requests 300000] [--seed 0] [--json FILE]
    python benchmarks/fleet_sim.py --validate REAL.json    # against the real 50-worker run (benchmarks/fleet.py)

A discrete-event simulation: one heap of events on simulated time, no thread or task per worker
or client. Every policy sees the same fleet, the same arrivals and the same request sizes (--seed).

The model
- Workers compute ``concurrency`` requests at once and queue the rest (FIFO). A request's service
  time is the worker's mean times its own lognormal draw of mean 1 (``service_cv``); worker means
  spread lognormally (``speed_spread``), and ``slow_fraction`` of them are ``slow_factor`` times
  slower. Service time is CPU time: with ``--hosts H`` the workers share H machines of
  ``cores_per_host`` cores, and k computations on a machine of c cores each progress at min(1, c/k)
  (processor sharing); without it every worker has a machine of its own.
- Admission control (``modelport serve --latency-slo-ms S --max-queue-size N``): a worker refuses a
  request on arrival, at no cost to itself, when N are waiting, or when some are ahead of it and
  (ahead / concurrency + 1) x its mean (as its machine's sharing stretches it) ends past 0.8 x S - 1 ms,
  the share modelport.engine.slo plans for. The refusal (503 overloaded) carries the load in-band.
- Clients send open loop (Poisson, ``utilisation`` x fleet capacity in all, each client an equal
  share) or closed loop (``in_flight`` outstanding per client, a new request as soon as one is
  answered or fails). Answers and refusals reach the client ``overhead_ms`` after the worker.
- Failover, for every policy as discovery.call does it: a refused request goes at once to a worker
  not yet tried for it, chosen by the same policy, if the client's retry budget allows (10 s window:
  ``retry_ratio`` of its requests plus ``budget_floor_per_s`` x 10 s, hedges included); else it fails.
- Policies. ``p2c-ewma`` is modelport.cluster.discovery's choice, per client: peak EWMA of latency
  (tau 2 s, decayed on read, a probe after tau/4 idle; a refusal counts as max(2 x EWMA, 10 ms)), the
  client's own in-flight count, and the load the worker reported on its last answer or refusal to
  that client, less the client's own requests there, for ``load_memory_s`` (discovery: tau/4);
  cost = ewma x (in_flight + 1 + 0.5 x load), the cheaper of 2 random untried workers.
  ``p2c-ewma+hedge`` adds a second attempt after the hedge delay ("p95": the median of the other
  workers' own p95, else the client's p95), paid from the retry budget; the first answer wins, the
  loser leaves the queue unserved or, if running, finishes unheard. ``random``; ``round-robin`` per
  client from a random offset; ``least-loaded-stale``, the old design: the least load in the
  registry, written by each worker at most once a second and seen by every client ``watch_delay_ms``
  later (ties broken at random); ``oracle``, the reference: the least expected wait, (load + 1) x
  mean / concurrency, from every worker's true state at that instant.
- Registry traffic. Old design: every load write (above) goes to every watching client. New design:
  keys change only with membership, here a rolling restart of every worker each ``restart_every_s``
  at ``events_per_restart`` key changes; both designs carry those.

Figures: throughput / fleet capacity (the most any routing could get: each machine's cores given to
its fastest workers first); the failed fraction (refused with the budget spent) and retries per
request; p50, p99, p999 of the answered requests sent after ``warmup_s``, and their ratio to the
oracle's. The run drains, so a queue that never empties shows in the tail instead of being cut off.

Left out: workers that die or leave (refusals are the only failures); Retry-After (discovery ignores
it too); the server's own estimates (fitted batch times, the running batch's remainder: here its
true mean, a running request counted whole); client CPU per request (the overhead is a pure delay);
cancels that take time to arrive; a hedge's size is drawn anew; batching inside a worker; the
restarts' effect on serving; etcd itself (write limit, watch fan-out, compaction). Every client
starts at time 0 knowing nothing, so a short run measures a cold start of the whole fleet. The
oracle minimises each request's expected wait, not the fleet's throughput: on shared machines it
keeps slow workers busy, so it need not reach the capacity above.
"""

from __future__ import annotations

import argparse
import collections
import heapq
import itertools
import json
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from modelport.cluster.discovery import LatencyWindow

POLICIES = ("oracle", "p2c-ewma", "p2c-ewma+hedge", "random", "round-robin", "least-loaded-stale")
QUEUED, RUNNING, ANSWERED, CANCELLED, REFUSED = range(5)  # an attempt's state at its worker
ARRIVE, HOST, ANSWER, HEDGE, WRITE, DELIVER = range(6)  # event kinds
TARGET_SHARE, FRONT_END_S = 0.8, 0.001  # modelport.engine.slo: plan to finish within 0.8 x SLO - 1 ms


def option(default, what: str):
    return field(default=default, metadata={"help": what})


@dataclass
class Scenario:
    workers: int = option(1000, "workers in the fleet")
    clients: int = option(10000, "discovery clients")
    utilisation: float = option(0.7, "open loop: offered load as a fraction of fleet capacity")
    low_utilisation: float = option(0.01, "open loop: the second level for the registry traffic")
    closed_loop: bool = option(False, "closed loop (--in-flight per client) instead of Poisson arrivals")
    in_flight: int = option(1, "closed loop: requests each client keeps outstanding")
    service_ms: float = option(20.0, "mean service time of a worker of average speed")
    service_cv: float = option(0.5, "coefficient of variation of one worker's service times")
    speed_spread: float = option(0.2, "sigma of the lognormal spread of worker speeds (0: all alike)")
    slow_fraction: float = option(0.05, "fraction of workers that are slow")
    slow_factor: float = option(5.0, "how many times slower a slow worker is")
    concurrency: int = option(1, "requests one worker computes at once")
    hosts: int = option(0, "machines shared by the workers (0: one machine per worker)")
    cores_per_host: float = option(2.0, "cores of each shared machine")
    slo_ms: float = option(0.0, "worker latency SLO: refuse what its queue would serve later (0: none)")
    max_queue: int = option(0, "worker: refuse when this many are waiting (0: no bound)")
    overhead_ms: float = option(0.2, "client-side network and overhead per request (and per refusal)")
    watch_delay_ms: float = option(50.0, "registry write -> clients see it (least-loaded-stale)")
    hedge_after_ms: str = option("p95", "hedge delay: 'p95' or a number of ms")
    retry_ratio: float = option(0.2, "retry budget: extra requests per request")
    budget_floor_per_s: float = option(1.0, "retry budget: extra requests allowed per second regardless")
    tau_s: float = option(2.0, "decay time of the peak EWMA")
    load_memory_s: float = option(0.5, "how long an in-band load report counts (discovery: tau_s / 4)")
    restart_every_s: float = option(3600.0, "membership churn: each worker restarted once per this")
    events_per_restart: int = option(3, "key changes one restart makes (draining, deleted, ready)")
    requests: int = option(300_000, "requests to simulate (sets the simulated time)")
    warmup_s: float = option(1.0, "simulated time before latencies count")
    seed: int = option(0, "seed of every random draw")


@dataclass
class Fleet:
    mean_s: list[float]  # each worker's mean service time, CPU seconds
    host: list[int]  # each worker's machine
    cores: list[float]  # each machine's cores
    slow: int
    capacity_rps: float


def build_fleet(s: Scenario) -> Fleet:
    rng = np.random.default_rng([s.seed, 1])
    speed = rng.lognormal(-s.speed_spread ** 2 / 2, s.speed_spread, s.workers)  # mean 1
    slow = round(s.slow_fraction * s.workers)
    speed[rng.permutation(s.workers)[:slow]] *= s.slow_factor
    mean_s = (speed * s.service_ms / 1000).tolist()
    if s.hosts:
        host, cores = [w % s.hosts for w in range(s.workers)], [s.cores_per_host] * s.hosts
    else:
        host, cores = list(range(s.workers)), [float(s.concurrency)] * s.workers
    on_host = collections.defaultdict(list)
    for w, h in enumerate(host):
        on_host[h].append(mean_s[w])
    capacity = 0.0
    for h, means in on_host.items():
        left = cores[h]
        for mean in sorted(means):  # the fastest first: they need the least CPU per answer
            used = min(s.concurrency, left)
            capacity += used / mean
            left -= used
    return Fleet(mean_s, host, cores, slow, capacity)


def expected_rps(s: Scenario, fleet: Fleet) -> float:
    if s.closed_loop:
        round_trip_s = statistics.fmean(fleet.mean_s) + s.overhead_ms / 1000
        return min(fleet.capacity_rps, s.clients * s.in_flight / round_trip_s)
    return s.utilisation * fleet.capacity_rps


def draws(s: Scenario, stream: int) -> Iterator[float]:
    """Service-time multipliers (lognormal, mean 1), from their own stream, so every policy gets the same."""
    sigma = math.sqrt(math.log(1 + s.service_cv ** 2))
    rng = np.random.default_rng([s.seed, stream])
    while True:
        yield from rng.lognormal(-sigma ** 2 / 2, sigma, 65536).tolist()


class Budget:
    """discovery.RetryBudget on simulated time."""
    __slots__ = ("ratio", "floor", "window_s", "requests", "retries")

    def __init__(self, ratio: float, floor_per_s: float, window_s: float = 10.0) -> None:
        self.ratio, self.floor, self.window_s = ratio, floor_per_s * window_s, window_s
        self.requests: collections.deque[float] = collections.deque()
        self.retries: collections.deque[float] = collections.deque()

    def withdraw(self, now: float) -> bool:
        for queue in (self.requests, self.retries):
            while queue and queue[0] < now - self.window_s:
                queue.popleft()
        if len(self.retries) + 1 > self.ratio * len(self.requests) + self.floor:
            return False
        self.retries.append(now)
        return True


class Endpoint:
    """What one client knows of one worker (discovery.Endpoint); ``load``: its others' requests, at ``load_at``."""
    __slots__ = ("worker", "in_flight", "ewma_s", "stamp", "last_sent", "load", "load_at", "window")

    def __init__(self, worker: int, now: float, hedging: bool) -> None:
        self.worker, self.in_flight, self.ewma_s, self.stamp, self.last_sent = worker, 0, 0.0, now, now
        self.load, self.load_at = 0, -math.inf
        self.window = LatencyWindow(200, 16) if hedging else None  # its own answers, for the hedge delay


class Client:
    __slots__ = ("endpoints", "seasoned", "window", "budget", "next_rr")

    def __init__(self, s: Scenario, first_rr: int) -> None:
        self.endpoints: dict[int, Endpoint] = {}
        self.seasoned: dict[int, Endpoint] = {}  # endpoints with 20 answers: a p95 of their own
        self.window = LatencyWindow(1000, 32)  # every worker's answers
        self.budget = Budget(s.retry_ratio, s.budget_floor_per_s)
        self.next_rr = first_rr


class Request:
    __slots__ = ("client", "arrived", "unit", "attempts", "tried", "tries", "answered", "hedged")

    def __init__(self, client: int, now: float, unit: float) -> None:
        self.client, self.arrived, self.unit, self.attempts, self.tried = client, now, unit, [], set()
        self.tries, self.answered, self.hedged = 0, False, None  # rounds of discovery.call's loop; its hedge


class Attempt:
    __slots__ = ("request", "worker", "endpoint", "sent", "work_s", "state")

    def __init__(self, request: Request, worker: int, endpoint: Endpoint | None, now: float, work_s: float) -> None:
        self.request, self.worker, self.endpoint, self.sent, self.work_s, self.state = \
            request, worker, endpoint, now, work_s, QUEUED


class Host:
    """Processor sharing: ``vtime`` is the CPU time each running computation has had since the start."""
    __slots__ = ("cores", "active", "vtime", "vtime_at", "heap", "version")

    def __init__(self, cores: float) -> None:
        self.cores, self.active, self.vtime, self.vtime_at, self.heap, self.version = cores, 0, 0.0, 0.0, [], 0


class Sim:
    def __init__(self, s: Scenario, fleet: Fleet, policy: str, end_s: float) -> None:
        self.s, self.fleet, self.policy, self.end_s, self.n = s, fleet, policy, end_s, s.workers
        self.hedging, self.per_client = policy == "p2c-ewma+hedge", policy.startswith("p2c")
        self.overhead_s, self.tau_s = s.overhead_ms / 1000, s.tau_s
        self.slo_target_s = s.slo_ms / 1000 * TARGET_SHARE - FRONT_END_S if s.slo_ms else None
        self.rnd = random.Random(s.seed)
        self.units, self.hedge_units = draws(s, 2), draws(s, 3)
        self.heap: list = []
        self.seq = itertools.count()
        self.now = 0.0
        self.running, self.queued = [0] * self.n, [0] * self.n
        self.queues = [collections.deque() for _ in range(self.n)]
        self.hosts = [Host(c) for c in fleet.cores]
        self.written, self.written_at, self.write_due = [0] * self.n, [-math.inf] * self.n, [False] * self.n
        self.stale = np.zeros(self.n)  # the registry's loads as the clients last saw them
        self.wait_s = np.array(fleet.mean_s) / s.concurrency  # oracle: expected wait per request ahead
        self.oracle_cost = self.wait_s.copy()
        self.clients = [Client(s, self.rnd.randrange(self.n)) for _ in range(s.clients)]
        self.pick = {"oracle": self._oracle, "p2c-ewma": self._p2c, "p2c-ewma+hedge": self._p2c,
                     "random": self._random, "round-robin": self._round_robin,
                     "least-loaded-stale": self._least_loaded_stale}[policy]
        self.hedge_s = None if s.hedge_after_ms == "p95" else float(s.hedge_after_ms) / 1000
        self.latencies: list[float] = []
        self.answers = self.hedges = self.hedges_won = self.writes = self.retries = self.failed = 0

    def push(self, at: float, kind: int, a, b=None) -> None:
        heapq.heappush(self.heap, (at, next(self.seq), kind, a, b))

    def run(self) -> dict:
        started = time.perf_counter()
        s = self.s
        if s.closed_loop:
            for c in range(s.clients):
                for _ in range(s.in_flight):
                    self._request(c)
        else:
            rng = np.random.default_rng([s.seed, 4])
            count = rng.poisson(s.utilisation * self.fleet.capacity_rps * self.end_s)
            self.arrivals = np.sort(rng.uniform(0, self.end_s, count)).tolist()
            self.senders = rng.integers(s.clients, size=count).tolist()
            self.push(self.arrivals[0], ARRIVE, 0)
        handlers = (self._on_arrive, self._on_host, self._on_answer, self._on_hedge, self._write, self._on_deliver)
        while self.heap:
            self.now, _, kind, a, b = heapq.heappop(self.heap)
            handlers[kind](a, b)
        measured_s, requests = self.end_s - s.warmup_s, len(self.latencies) + self.failed
        p50, p99, p999 = np.percentile(np.array(self.latencies) * 1000, [50, 99, 99.9]).tolist()
        return {"requests": requests, "throughput_rps": self.answers / measured_s,
                "kept_up": self.answers / len(self.latencies),  # < 1: queues grew over the run
                "failed": self.failed / requests, "retries_per_request": self.retries / requests,
                "p50_ms": p50, "p99_ms": p99, "p999_ms": p999, "hedged": self.hedges / requests,
                "hedges_won": self.hedges_won, "registry_writes_per_s": self.writes / measured_s,
                "wall_s": time.perf_counter() - started}

    def _measured(self, at: float) -> bool:
        return self.s.warmup_s <= at < self.end_s

    # -- clients ---------------------------------------------------------------------------------

    def _on_arrive(self, i: int, _) -> None:
        self._request(self.senders[i])
        if i + 1 < len(self.arrivals):
            self.push(self.arrivals[i + 1], ARRIVE, i + 1)

    def _request(self, c: int) -> None:
        client, request = self.clients[c], Request(c, self.now, next(self.units))
        client.budget.requests.append(self.now)
        self._try(client, request)

    def _try(self, client: Client, request: Request) -> None:
        """One round of discovery.call's loop: an attempt on an untried worker, and its hedge timer."""
        request.tries += 1
        worker = self.pick(client, request.tried)
        self._send(request, worker, request.unit)
        if self.hedging:
            delay = self._hedge_delay_s(client, worker)
            if delay is not None:
                self.push(self.now + delay, HEDGE, request, request.tries)

    def _send(self, request: Request, worker: int, unit: float) -> Attempt:
        endpoint = None
        if self.per_client:
            client = self.clients[request.client]
            endpoint = client.endpoints.get(worker)
            if endpoint is None:
                endpoint = client.endpoints[worker] = Endpoint(worker, self.now, self.hedging)
            endpoint.in_flight += 1
            endpoint.last_sent = self.now
        attempt = Attempt(request, worker, endpoint, self.now, unit * self.fleet.mean_s[worker])
        request.attempts.append(attempt)
        request.tried.add(worker)
        self._accept(attempt)
        return attempt

    def _hedge_delay_s(self, client: Client, first: int) -> float | None:
        if self.hedge_s is not None:
            return self.hedge_s
        if len(client.window) < 20:
            return None
        others = [e.window.quantiles()[1] for w, e in client.seasoned.items() if w != first]
        return statistics.median(others) if others else client.window.quantiles()[1]

    def _on_hedge(self, request: Request, tries: int) -> None:
        if request.answered or tries != request.tries or len(request.tried) == self.n:
            return  # answered, or refused and retried since (the retry has a timer of its own)
        client = self.clients[request.client]
        second = self._p2c(client, request.tried)
        if client.budget.withdraw(self.now):
            request.hedged = self._send(request, second, next(self.hedge_units))

    def _on_answer(self, attempt: Attempt, load: int) -> None:
        if attempt.state == CANCELLED:
            return  # a hedge's loser, cancelled while its answer was on the way
        request, client, endpoint = attempt.request, self.clients[attempt.request.client], attempt.endpoint
        if endpoint is not None:  # the load in-band, less the client's other requests there
            endpoint.load, endpoint.load_at = max(0, load - (endpoint.in_flight - 1)), self.now
        if attempt.state == REFUSED:
            self._on_refused(client, attempt)
            return
        request.answered = True
        if endpoint is not None:
            self._observe(client, endpoint, self.now - attempt.sent)
        for other in request.attempts:
            if other is not attempt and other.state != REFUSED:
                self._cancel(client, other)
        if self._measured(request.arrived):
            self.latencies.append(self.now - request.arrived)
            self.hedges += request.hedged is not None
            self.hedges_won += attempt is request.hedged
        if self._measured(self.now):
            self.answers += 1
        if self.s.closed_loop and self.now < self.end_s:
            self._request(request.client)

    def _on_refused(self, client: Client, attempt: Attempt) -> None:
        """discovery.call: a slow sample for the worker, then another worker if the budget allows."""
        request, endpoint = attempt.request, attempt.endpoint
        if endpoint is not None:
            self._observe(client, endpoint, max(self.now - attempt.sent, endpoint.ewma_s * 2, 0.01), record=False)
        if any(a.state in (QUEUED, RUNNING, ANSWERED) for a in request.attempts):
            return  # its hedge is still out: that one answers or fails for the request
        if len(request.tried) == self.n:
            request.tried.clear()  # every worker refused once: a fresh round
        if client.budget.withdraw(self.now):
            self.retries += self._measured(request.arrived)
            self._try(client, request)
            return
        self.failed += self._measured(request.arrived)
        if self.s.closed_loop and self.now < self.end_s:
            self._request(request.client)

    def _cancel(self, client: Client, attempt: Attempt) -> None:
        if attempt.state == QUEUED:  # never computed
            self.queued[attempt.worker] -= 1
            self._load_changed(attempt.worker)
        attempt.state = CANCELLED
        endpoint = attempt.endpoint
        # discovery._attempt: a loser's latency is at least its wait, and no shorter than the worker's usual
        self._observe(client, endpoint, max(self.now - attempt.sent, endpoint.ewma_s))

    def _observe(self, client: Client, endpoint: Endpoint, latency_s: float, record: bool = True) -> None:
        endpoint.in_flight -= 1
        if endpoint.ewma_s == 0.0 or latency_s > endpoint.ewma_s:
            endpoint.ewma_s = latency_s
        else:
            weight = math.exp(-(self.now - endpoint.stamp) / self.tau_s)
            endpoint.ewma_s = endpoint.ewma_s * weight + latency_s * (1 - weight)
        endpoint.stamp = self.now
        if not record:  # a refusal is no latency: it stays out of the windows (the hedge delay's)
            return
        client.window.add(latency_s)
        if endpoint.window is not None:
            endpoint.window.add(latency_s)
            if len(endpoint.window) == 20:
                client.seasoned[endpoint.worker] = endpoint

    # -- policies: each picks a worker not in ``tried`` --------------------------------------------

    def _untried(self, tried: set[int]) -> int:
        while (worker := self.rnd.randrange(self.n)) in tried:
            pass
        return worker

    def _p2c(self, client: Client, tried: set[int]) -> int:
        a = b = self._untried(tried)
        while b == a and len(tried) < self.n - 1:
            b = self._untried(tried)
        default = client.window.quantiles()[0]
        return a if self._cost(client, a, default) <= self._cost(client, b, default) else b

    def _cost(self, client: Client, worker: int, default: float) -> float:
        endpoint = client.endpoints.get(worker)
        if endpoint is None:
            return default  # never tried: default x (0 + 1 + 0.5 x 0)
        ewma = endpoint.ewma_s or default
        if ewma > default:  # discovery.Endpoint.cost: decay on read, a fresh probe after tau/4 idle
            if endpoint.in_flight == 0 and self.now - endpoint.last_sent > self.tau_s / 4:
                ewma = default
            else:
                ewma = default + (ewma - default) * math.exp(-(self.now - endpoint.stamp) / self.tau_s)
        load = endpoint.load if self.now - endpoint.load_at <= self.s.load_memory_s else 0
        return ewma * (endpoint.in_flight + 1 + 0.5 * load)

    def _random(self, client: Client, tried: set[int]) -> int:
        return self._untried(tried)

    def _round_robin(self, client: Client, tried: set[int]) -> int:
        worker = client.next_rr
        while worker in tried:
            worker = (worker + 1) % self.n
        client.next_rr = (worker + 1) % self.n
        return worker

    def _least_loaded_stale(self, client: Client, tried: set[int]) -> int:
        loads = self._without(self.stale, tried)
        least = np.flatnonzero(loads == loads.min())
        return int(least[self.rnd.randrange(len(least))])

    def _oracle(self, client: Client, tried: set[int]) -> int:
        return int(np.argmin(self._without(self.oracle_cost, tried)))

    @staticmethod
    def _without(values: np.ndarray, tried: set[int]) -> np.ndarray:
        if not tried:
            return values
        values = values.copy()
        values[list(tried)] = np.inf
        return values

    # -- workers and machines --------------------------------------------------------------------

    def _accept(self, attempt: Attempt) -> None:
        w = attempt.worker
        if self._refuses(w):  # at once, with its load in-band; the worker spends nothing on it
            attempt.state = REFUSED
            self.push(self.now + self.overhead_s, ANSWER, attempt, self.running[w] + self.queued[w])
            return
        if self.running[w] < self.s.concurrency:
            self.running[w] += 1
            host = self.hosts[self.fleet.host[w]]
            self._compute(host, attempt)
            self._reschedule(host)
        else:
            self.queues[w].append(attempt)
            self.queued[w] += 1
        self._load_changed(w)

    def _refuses(self, w: int) -> bool:
        """engine.batching.check and engine.slo.refuse_late, with the worker's true mean for its estimate."""
        s = self.s
        if s.max_queue and self.queued[w] >= s.max_queue:
            return True
        ahead = self.running[w] + self.queued[w] - s.concurrency + 1  # to finish before it can start
        if self.slo_target_s is None or ahead <= 0:
            return False  # nothing ahead: refusing could not help it
        host = self.hosts[self.fleet.host[w]]
        mean_s = self.fleet.mean_s[w] * max(1.0, host.active / host.cores)
        return (ahead / s.concurrency + 1) * mean_s > self.slo_target_s

    def _compute(self, host: Host, attempt: Attempt) -> None:
        self._advance(host)
        attempt.state = RUNNING
        heapq.heappush(host.heap, (host.vtime + attempt.work_s, next(self.seq), attempt))
        host.active += 1

    def _advance(self, host: Host) -> None:
        if host.active:
            host.vtime += (self.now - host.vtime_at) * min(1.0, host.cores / host.active)
        host.vtime_at = self.now

    def _reschedule(self, host: Host) -> None:
        """Only the machine's next completion is in the event heap; older ones are left there, void."""
        host.version += 1
        if host.heap:
            rate = min(1.0, host.cores / host.active)
            self.push(self.now + (host.heap[0][0] - host.vtime) / rate, HOST, host, host.version)

    def _on_host(self, host: Host, version: int) -> None:
        if version != host.version:
            return
        self._advance(host)
        done = []
        while host.heap and host.heap[0][0] <= host.vtime + 1e-9:  # 1 ns: rounding
            done.append(heapq.heappop(host.heap)[2])
            host.active -= 1
        for attempt in done:
            self._finish(attempt)
        self._reschedule(host)

    def _finish(self, attempt: Attempt) -> None:
        w = attempt.worker
        self.running[w] -= 1
        if attempt.state == RUNNING:  # a cancelled attempt was computed all the same; its answer is dropped
            attempt.state = ANSWERED
            self.push(self.now + self.overhead_s, ANSWER, attempt, self.running[w] + self.queued[w])
        queue = self.queues[w]
        while queue:
            waiting = queue.popleft()
            if waiting.state == QUEUED:
                self.queued[w] -= 1
                self.running[w] += 1
                self._compute(self.hosts[self.fleet.host[w]], waiting)
                break
        self._load_changed(w)

    # -- the old design's registry ---------------------------------------------------------------

    def _load_changed(self, w: int) -> None:
        if self.policy == "oracle":
            self.oracle_cost[w] = self.wait_s[w] * (self.running[w] + self.queued[w] + 1)
        if self.write_due[w]:
            return
        if self.now - self.written_at[w] >= 1.0:
            self._write(w)
        else:
            self.write_due[w] = True
            self.push(self.written_at[w] + 1.0, WRITE, w)

    def _write(self, w: int, _=None) -> None:
        self.write_due[w] = False
        load = self.running[w] + self.queued[w]
        if load == self.written[w]:
            return
        self.written[w], self.written_at[w] = load, self.now
        self.writes += self._measured(self.now)
        if self.policy == "least-loaded-stale":
            self.push(self.now + self.s.watch_delay_ms / 1000, DELIVER, w, load)

    def _on_deliver(self, w: int, load: int) -> None:
        self.stale[w] = load


def registry_traffic(s: Scenario, writes_per_s: float, load: float) -> dict:
    """Events per second, per watching client and in all, for both designs (one watcher per client)."""
    membership = s.workers * s.events_per_restart / s.restart_every_s
    old = writes_per_s + membership
    return {"load_x_capacity": load, "old_writes_per_s": writes_per_s, "old_per_watcher": old,
            "old_total": old * s.clients, "new_per_watcher": membership, "new_total": membership * s.clients}


COLUMNS = (("requests", "requests", "{:,}"), ("answers/s", "throughput_rps", "{:,.0f}"),
           ("x capacity", "x_capacity", "{:.3f}"), ("kept up", "kept_up", "{:.3f}"), ("failed", "failed", "{:.3%}"),
           ("retries/req", "retries_per_request", "{:.3f}"), ("p50 ms", "p50_ms", "{:.1f}"),
           ("p99 ms", "p99_ms", "{:.1f}"), ("p999 ms", "p999_ms", "{:.1f}"), ("p50 x oracle", "p50_x_oracle", "{:.2f}"),
           ("p99 x oracle", "p99_x_oracle", "{:.2f}"), ("p999 x oracle", "p999_x_oracle", "{:.2f}"),
           ("hedged", "hedged", "{:.1%}"), ("wall s", "wall_s", "{:.1f}"))


def simulate(s: Scenario, policies: list[str]) -> dict:
    fleet = build_fleet(s)
    end_s = s.warmup_s + s.requests / expected_rps(s, fleet)
    loop = f"closed loop, {s.in_flight} in flight per client" if s.closed_loop else \
        f"open loop at {s.utilisation:.0%} of capacity ({s.utilisation * fleet.capacity_rps:,.0f} req/s)"
    machines = f"{s.hosts} machines of {s.cores_per_host:g} cores" if s.hosts else "a machine each"
    admission = ", ".join(([f"latency SLO {s.slo_ms:g} ms"] if s.slo_ms else []) +
                          ([f"at most {s.max_queue} waiting"] if s.max_queue else [])) or "none"
    print(f"{s.workers} workers ({fleet.slow} at {s.slow_factor:g}x, concurrency {s.concurrency}, {machines}), "
          f"{s.clients} clients, {loop}; fleet capacity {fleet.capacity_rps:,.0f} req/s; admission control: "
          f"{admission}; in-band load counts {s.load_memory_s:g} s; {end_s:.1f} s simulated, the first "
          f"{s.warmup_s:g} s not counted", flush=True)
    print(f"{'policy':<20}" + "".join(f"{name:>{len(name) + 2}}" for name, _, _ in COLUMNS))
    results = {}
    for policy in ["oracle"] + [p for p in policies if p != "oracle"]:
        r = results[policy] = Sim(s, fleet, policy, end_s).run()
        r |= {"x_capacity": r["throughput_rps"] / fleet.capacity_rps,
              **{f"{q}_x_oracle": r[f"{q}_ms"] / results["oracle"][f"{q}_ms"] for q in ("p50", "p99", "p999")}}
        print(f"{policy:<20}" + "".join(f"{form.format(r[key]):>{len(name) + 2}}" for name, key, form in COLUMNS),
              flush=True)
    print("failed: refused with the client's retry budget spent (not in the latencies, which are of answers); "
          "retries/req: attempts after a refusal, per request")
    levels = []
    if "least-loaded-stale" in results:
        old = results["least-loaded-stale"]
        levels = [registry_traffic(s, old["registry_writes_per_s"], old["x_capacity"])]
        if not s.closed_loop:  # the same simulated time at a lower load
            low = Sim(replace(s, utilisation=s.low_utilisation), fleet, "least-loaded-stale", end_s).run()
            low_x = low["throughput_rps"] / fleet.capacity_rps
            levels.insert(0, registry_traffic(s, low["registry_writes_per_s"], low_x))
        print(f"registry events/s, one watcher per client (old: load written at most 1/s per worker + membership; "
              f"new: membership only, a rolling restart every {s.restart_every_s:g} s)")
        print(f"{'load x capacity':>16}{'old writes/s':>14}{'old per watcher':>17}{'old in all':>16}"
              f"{'new per watcher':>17}{'new in all':>12}{'old / new':>11}")
    for level in levels:
        print(f"{level['load_x_capacity']:>16.3f}{level['old_writes_per_s']:>14,.0f}{level['old_per_watcher']:>17,.1f}"
              f"{level['old_total']:>16,.0f}{level['new_per_watcher']:>17,.2f}{level['new_total']:>12,.1f}"
              f"{level['old_total'] / level['new_total']:>11,.0f}")
    return {"scenario": asdict(s), "capacity_rps": fleet.capacity_rps, "simulated_s": end_s,
            "policies": results, "registry": levels}


def validate(path: Path, args: argparse.Namespace) -> int:
    """The simulation of the real 50-worker run, closed loop on one shared machine: PASS if it is within 20 %."""
    real = json.loads(path.read_text())
    policy = real.get("policy", "p2c-ewma")
    # A model that holds its worker without CPU (fleet.py's fixed-cost model) makes independent
    # servers; one that computes shares the machine's cores.
    shared = real.get("shared_cores", True)
    s = Scenario(workers=real["workers"], clients=real["clients"], closed_loop=True,
                 in_flight=real["in_flight_per_client"], hosts=1 if shared else 0, cores_per_host=real["cores"],
                 service_ms=real["service_ms_mean"], service_cv=real.get("service_ms_cv", 0.5),
                 overhead_ms=real.get("client_overhead_ms", 0.2), concurrency=real.get("worker_concurrency", 1),
                 hedge_after_ms=str(real.get("hedge_after_ms", "p95")), speed_spread=0.0,
                 slow_fraction=real.get("slow_workers", 0) / real["workers"], slow_factor=real.get("slow_factor", 1.0),
                 slo_ms=real.get("slo_ms") or 0.0, max_queue=real.get("max_queue") or 0,
                 load_memory_s=args.load_memory_s, requests=args.requests, warmup_s=args.warmup_s, seed=args.seed)
    fleet = build_fleet(s)
    sim = Sim(s, fleet, policy, s.warmup_s + s.requests / expected_rps(s, fleet)).run()
    throughput, p99 = sim["throughput_rps"] / real["throughput_rps"], sim["p99_ms"] / real["p99_ms"]
    ok = 0.8 <= throughput <= 1.2 and 0.8 <= p99 <= 1.2
    p50 = f"; p50 {sim['p50_ms']:.1f} / {real['p50_ms']:.1f} ms = {sim['p50_ms'] / real['p50_ms']:.2f}" \
        if "p50_ms" in real else ""
    admission = f", SLO {s.slo_ms:g} ms" * bool(s.slo_ms) + f", at most {s.max_queue} waiting" * bool(s.max_queue)
    where = f"on {s.cores_per_host:g} shared cores" if shared else "each on its own (no CPU used)"
    print(f"{s.workers} workers {where}{admission}, {s.clients} clients x {s.in_flight} in "
          f"flight, {policy}, {sim['requests']} requests simulated ({sim['failed']:.2%} failed, "
          f"{sim['retries_per_request']:.3f} retries each): sim / real throughput {sim['throughput_rps']:.0f} / "
          f"{real['throughput_rps']:.0f} req/s = {throughput:.2f}; p99 {sim['p99_ms']:.1f} / {real['p99_ms']:.1f} ms "
          f"= {p99:.2f}{p50} -> {'PASS' if ok else 'FAIL'} (throughput and p99 within 0.8-1.2)")
    if args.json:
        Path(args.json).write_text(json.dumps({"scenario": asdict(s), "real": real, "sim": sim,
                                               "throughput_sim_x_real": throughput, "p99_sim_x_real": p99,
                                               "pass": ok}, indent=2))
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description="Fleet simulation of the client-side worker choice (issue 27).")
    for f in fields(Scenario):
        flag, what = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=what)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=f"{what} (default {f.default})")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated; the oracle always runs")
    parser.add_argument("--json", help="write every figure to this file")
    parser.add_argument("--validate", type=Path, metavar="REAL.json", help="compare with the real benchmark's figures")
    args = parser.parse_args()
    policies = args.policies.split(",")
    if set(policies) - set(POLICIES):
        parser.error(f"unknown policies {sorted(set(policies) - set(POLICIES))}; known: {', '.join(POLICIES)}")
    if args.validate:
        sys.exit(validate(args.validate, args))
    started = time.perf_counter()
    figures = simulate(Scenario(**{f.name: getattr(args, f.name) for f in fields(Scenario)}), policies)
    figures["wall_s"] = time.perf_counter() - started
    print(f"wall time {figures['wall_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
