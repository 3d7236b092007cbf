"""How big a batch may grow and how long it may wait: fixed settings, or chosen to keep a latency SLO.

``BatchCost`` learns a model's batch time as ``a * rows + b`` from the batches it runs (least
squares, older batches fading; BentoML fits the same line). ``Planner`` uses it for three things:

- **Batch-size cap.** Fixed settings: ``max_batch_size``. With ``latency_slo_ms``: additive increase
  while batches at the cap are safe and the queue asks for more, decrease by a quarter when a batch
  is not (Clipper's AIMD on batch size). "Safe" means a request that arrives just after a batch
  starts can wait for it and still run in its own within the SLO: ``prep + 2 * t(cap) <= target``.
  Once batches of a size have been seen, the fitted line (with a margin for noise) also bounds the
  cap, so it does not keep probing a size it already knows to be too slow.
- **Waiting for companions.** Fixed: up to ``max_delay_ms``. SLO: as long as the oldest request can
  afford it, never longer than one decode.
- **Early refusal.** A request whose predicted finish (the running batch's remainder, the batches
  queued ahead of it, its own) lies past its SLO or its deadline is refused at once with a
  ``Retry-After``, before its body is decoded, instead of being queued to miss (Clockwork).
  Deadlines are checked this way in both modes; the SLO only when one is set.

**Priority classes** (``priority.py``): the batcher serves the most urgent class first and lower
classes fill the rest of a batch. The SLO is planned for the most urgent class seen lately (the
last ``_URGENT_MEMORY_S``: ``high`` where tenants use it, else ``normal``; with one class in use,
batches and refusals are what they were without classes):

- rows of the class that leads a batch (the head of the queue) may grow it up to the cap above;
  rows of lower classes only fill it up to the steady size, and a batch led by a lower class (no
  urgent request waiting) is at most the steady size. So an urgent request that arrives just after
  a batch starts waits at most one steady batch, then runs in its own, filled or not: within its
  SLO whatever the lower classes' load. Lower classes absorb the waiting.
- a request's early refusal plays out only the work of its own class and those above (and the
  lower classes' filler in its batch), so the lowest class is refused first: more lies ahead of
  it. One admitted within its SLO may still be pushed back by urgent arrivals after it.

No I/O, no clock of its own: the batcher passes ``now`` in. Everything runs on one event loop.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Iterable

from modelport.engine.priority import Priority
from modelport.errors import Overloaded

# Plan to finish within this share of the SLO: the rest is the front-end's (HTTP parsing, the
# answer's encoding) and the noise the fitted line does not capture.
_TARGET_SHARE = 0.8
_FRONT_END_S = 0.001
_FADE = 0.9  # per batch: the fit follows the last ~10 batches
_RATIOS = 32  # recent observed/predicted run times, for the noise margin
_NOISE_QUANTILE = 0.9
# A class that sent a request within this many seconds is expected to send more: batches stay ones
# it can wait out even while none of its requests is queued.
_URGENT_MEMORY_S = 10.0
_LEAST_URGENT = max(p.rank for p in Priority)


class BatchCost:
    """A batch's run time as ``a * rows + b``, fit on recent batches."""

    def __init__(self, first_s: float, pair_s: float | None = None) -> None:
        # Prior until real batches arrive: the warm-up runs of one row and of two. Without the
        # second, rows cost the same in any batch (no batching gain): pessimistic, so batches
        # start small and grow as real ones show what batching gains.
        self._w = self._n = self._nn = self._t = self._nt = 0.0
        first_s = max(first_s, 1e-5)
        self.a, self.b = first_s, 0.0
        self._add(1, first_s, 1.0)
        self._add(2, max(pair_s, first_s) if pair_s is not None else 2 * first_s, 1.0)
        self._fit()
        self._ratios: deque[float] = deque(maxlen=_RATIOS)
        self.noise = 1.0  # high quantile of observed / predicted
        self.largest_seen = 1

    def predict(self, rows: int) -> float:
        return self.a * rows + self.b

    def high(self, rows: int) -> float:
        """A run time that most batches of this size stay under."""
        return self.predict(rows) * self.noise

    def observe(self, rows: int, run_s: float, *, track_noise: bool) -> None:
        if track_noise:
            predicted = self.predict(rows)
            if predicted > 0:
                self._ratios.append(run_s / predicted)
                ordered = sorted(self._ratios)
                self.noise = min(3.0, max(1.0, ordered[int(_NOISE_QUANTILE * (len(ordered) - 1))]))
        self.largest_seen = max(self.largest_seen, rows)
        for name in ("_w", "_n", "_nn", "_t", "_nt"):
            setattr(self, name, getattr(self, name) * _FADE)
        self._add(rows, run_s, 1.0)
        self._fit()

    def _add(self, rows: int, run_s: float, weight: float) -> None:
        self._w += weight
        self._n += weight * rows
        self._nn += weight * rows * rows
        self._t += weight * run_s
        self._nt += weight * rows * run_s

    def _fit(self) -> None:
        mean_n, mean_t = self._n / self._w, self._t / self._w
        var_n = self._nn / self._w - mean_n * mean_n
        if var_n > 1e-6:
            a = (self._nt / self._w - mean_n * mean_t) / var_n
        else:  # every recent batch had the same size: scale the line through them, keeping its shape
            scale = mean_t / max(self.predict(mean_n), 1e-9)
            a = self.a * scale
        a = max(a, 0.0)
        b = mean_t - a * mean_n
        if b < 0:  # a line through the origin fits better than a negative fixed cost
            a, b = self._nt / self._nn, 0.0
        self.a, self.b = a, b


class Planner:
    def __init__(self, *, max_batch_size: int, max_delay_ms: float, latency_slo_ms: float | None = None,
                 first_batch_s: float = 0.0, pair_batch_s: float | None = None) -> None:
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_ms / 1000
        self.slo_s = None if latency_slo_ms is None else latency_slo_ms / 1000
        self.target_s = 0.0 if self.slo_s is None else self.slo_s * _TARGET_SHARE - _FRONT_END_S
        self.cost = BatchCost(first_batch_s, pair_batch_s)
        self.cap = max_batch_size  # the cap of the last batch taken (what the metric shows)
        self._prep_s = 0.0  # recent time from arrival to the queue (decoding): a high-ish EWMA
        self._seen = [-math.inf] * (_LEAST_URGENT + 1)  # by rank: when a request of the class last arrived

    # -- what the batcher asks --------------------------------------------------------------------

    def cap_for(self, oldest_arrived: float, now: float, lead: Priority = Priority.NORMAL) -> tuple[int, int]:
        """Rows for the next batch: (with the lead class's rows, with lower classes' filler). The
        lead is the class of the oldest queued request of the most urgent class waiting.

        The biggest batch that still lets the oldest queued request finish within the SLO, and
        never less than the steady size: a request already late gains nothing from a small batch,
        and small batches are what lets a backlog grow. Filler, or a batch led by a class below
        the most urgent one seen lately, stops at the steady size (see the module's docstring)."""
        if self.slo_s is None:
            return self.cap, self.cap
        steady = self.steady_cap()
        if lead.rank > self._urgent_rank(now):
            self.cap = steady
        else:
            self.cap = max(steady, self._fits(oldest_arrived + self.target_s - now))
        return self.cap, steady

    def saw(self, priority: Priority, now: float) -> None:
        """A request of ``priority`` arrived."""
        self._seen[priority.rank] = now

    def _urgent_rank(self, now: float) -> int:
        """The rank of the most urgent class seen lately (the least urgent one when none was)."""
        return next((rank for rank, seen in enumerate(self._seen) if now - seen <= _URGENT_MEMORY_S), _LEAST_URGENT)

    def gather_until(self, oldest_arrived: float, oldest_enqueued: float) -> float:
        """How long the batcher may wait for announced companions (monotonic seconds)."""
        if self.slo_s is None:
            return oldest_enqueued + self.max_delay_s
        # Companions announced are decoding: they arrive within about one decode, and waiting
        # for them must leave the oldest time for a full batch.
        slack = oldest_arrived + self.target_s - self.cost.high(self.steady_cap()) - oldest_enqueued
        return oldest_enqueued + max(0.0, min(slack, self._prep_s))

    def steady_cap(self) -> int:
        """The batch size a busy server settles at: a request can wait out one such batch, then
        run in the next, within the SLO."""
        return self._fits((self.target_s - self._prep_s) / 2)

    def refuse_late(self, *, now: float, arrived: float, deadline: float | None, rows: int, priority: Priority,
                    queued_rows: int, queue: Iterable[tuple[float, int, Priority]], expected: int, filler: int,
                    running_left_s: float, preparing: bool) -> None:
        """Raise ``Overloaded`` if this request would finish past its SLO or its deadline.

        ``queue`` is (arrival, rows, class) of each request served before it (its own class and
        those above), in the order served; ``queued_rows`` their rows; ``expected`` requests of
        those classes are still decoding and will queue ahead of it; ``filler`` rows of lower
        classes wait to fill its batch. The batches are played out as the batcher will form them,
        with the fitted run times.
        """
        if self.slo_s is None and deadline is None:
            return
        if not queued_rows and not expected and not running_left_s:
            # Nothing ahead: refusing could not help it, and a server that refused everything
            # would never run the batches that correct its estimates.
            return
        # Every request has a deadline (the server's default timeout): settle the usual case in
        # O(1) with a bound (every row in a batch of its own, the slowest way, and every row of
        # filler in some batch) before playing out the queue.
        worst = (now + max(running_left_s, self._prep_s if preparing else 0.0)
                 + (queued_rows + expected + rows) * self.cost.predict(1) + filler * self.cost.a)
        if (self.slo_s is None or worst <= arrived + self.target_s) and (deadline is None or worst <= deadline):
            return
        ahead = [*queue, *((now, 1, priority) for _ in range(expected))]
        clock = now + running_left_s
        ahead.append((arrived, rows, priority))
        if preparing and self._prep_s > clock - now:
            clock = now + self._prep_s  # it cannot start before its own decode ends
        finish = self._play_out(ahead, clock, filler, self._urgent_rank(now))
        if self.slo_s is not None and finish > arrived + self.target_s:
            raise Overloaded(f"would miss the latency SLO of {self.slo_s * 1000:g} ms: "
                             f"{(finish - arrived) * 1000:.0f} ms predicted with {len(ahead) - 1} request(s) ahead",
                             retry_after_s=finish - now)
        if deadline is not None and finish > deadline:
            raise Overloaded(f"would miss its deadline: {(finish - now) * 1000:.0f} ms predicted with "
                             f"{len(ahead) - 1} request(s) ahead, {max(0.0, deadline - now) * 1000:.0f} ms left",
                             retry_after_s=finish - now)

    def _play_out(self, queue: list[tuple[float, int, Priority]], clock: float, filler: int, urgent: int) -> float:
        """When the last of ``queue`` finishes, taking batches the way the batcher does (its last
        batch filled with up to ``filler`` rows of lower classes)."""
        i = 0
        while i < len(queue):
            lead_arrived, rows, lead = queue[i]
            if self.slo_s is None:
                cap = fill = self.cap
            elif lead.rank > urgent:
                cap = fill = self.steady_cap()
            else:
                cap = self._fits(lead_arrived + self.target_s - clock)
                fill = min(cap, self.steady_cap())
            i += 1
            while i < len(queue) and rows + queue[i][1] <= (cap if queue[i][2] is lead else fill):
                rows += queue[i][1]
                i += 1
            if i == len(queue) and filler:
                rows = max(rows, min(rows + filler, fill))
            clock += self.cost.predict(rows)
        return clock

    def predicted_wait_s(self, queued_rows: int, running_left_s: float) -> float:
        cap = self.cap if self.slo_s is None else self.steady_cap()
        return running_left_s + math.ceil(queued_rows / cap) * self.cost.predict(cap)

    # -- what the batcher reports -----------------------------------------------------------------

    def prepared(self, seconds: float) -> None:
        # Rises fast, falls slowly: a high-side estimate of the decode time under the current load.
        self._prep_s += (seconds - self._prep_s) * (0.3 if seconds > self._prep_s else 0.05)

    def ran(self, rows: int, run_s: float) -> None:
        self.cost.observe(rows, run_s, track_noise=self.slo_s is not None)

    def _fits(self, seconds: float) -> int:
        """The most rows whose batch (with the noise margin) runs within ``seconds``; at least 1."""
        per_row = self.cost.a * self.cost.noise
        fixed = self.cost.b * self.cost.noise
        if per_row <= 0:
            return self.max_batch_size
        return max(1, min(self.max_batch_size, int((seconds - fixed) / per_row)))
