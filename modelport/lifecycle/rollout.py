"""Safe rollouts: a new version is shadowed, then canaried, then promoted -- or rolled back.

A model whose ``model.toml`` has a ``[rollout]`` table does not hand its traffic to a new version
as soon as it is warm. The new version (the *candidate*) is judged against the version serving now:

- **shadow**: copies of live requests run on it after the serving version has answered, only when
  both are idle (one copy at a time; dropped and counted otherwise), so users never wait for it.
  Its top-1 *label* is compared with the serving version's (a shuffled labels file disagrees even
  though the weights are the same), its errors counted, its compute time compared.
- **canary**: a share of the requests that name no version is answered by it, chosen per request
  and kept exact as it goes (share x n, give or take one, after any n requests);
  its error rate and p99 latency are compared with the serving version's over the same window, and
  (when idle, as in shadow) the serving version answers copies of its requests so that its answers
  are still compared: a wrong version is caught within a few canary answers.
- **promoted**: it takes all traffic and the labels that named the old version move to it; or
  **rolled back**: it stops taking traffic at once, is unloaded, and keeps its reason and figures.

A rollout judges only what its own server sees: in a cluster each worker judges its own.
No I/O here; the version manager acts on the outcome (``on_end``), the server's metrics observe it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import deque
from dataclasses import asdict
from enum import StrEnum
from typing import Callable

import numpy as np

from modelport.engine import priority
from modelport.engine.priority import Priority
from modelport.errors import BadInput, Overloaded, PayloadTooLarge, Unavailable
from modelport.repository.model_config import RolloutPolicy

logger = logging.getLogger("modelport.rollout")



class Stage(StrEnum):
    """Where a rollout stands; the last two are ends. (A rolled-back *version* is State.ROLLED_BACK.)"""

    SHADOW = "shadow"
    CANARY = "canary"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"

_LATENCIES = 2048  # per side, for the p99s
# Copies (shadow, canary comparisons) may use this share of the server's *idle* time, measured by
# their own decode and compute: "only when idle" is not enough on a few cores, where a copy that
# starts in a gap still runs beside the next user batch (measured: copying every request at half
# load on 2 cores doubled the work and the queue ran away). A share of the idle time, not of all
# time, because what copies cost users grows with the load: in a queue busy a fraction u of the
# time, extra work b stretches waiting by (1 - u) / (1 - u - b), which stays within 1.1 x exactly
# when b <= (1 - u) / 11. So copies get 9 % of the idle time: 9 % of an idle server, 4.5 % at half
# load, almost nothing near saturation.
_COPY_SHARE = 0.09
_COPY_BURST_S = 0.2
_CORES = os.cpu_count() or 1
# A p99 ratio is judged only when the difference is more than this: between two sub-millisecond
# models the ratio is noise (a thread hand-off, a cache miss, a collection), not a slower version
# (measured: a tiny model's copies ran 0.1 ms or 1.4 ms depending on the path they took).
_LATENCY_FLOOR_S = 0.002
# The client's own mistakes and refusals say nothing about a version's health.
_NOT_ITS_FAULT = (BadInput, PayloadTooLarge, Overloaded, Unavailable, asyncio.CancelledError)


class Rollout:
    def __init__(self, name: str, policy: RolloutPolicy, serving, candidate, *,
                 on_end: Callable[["Rollout"], None], observer=None, rng: Callable[[], float] = random.random) -> None:
        self.name = name
        self.policy = policy
        self.serving = serving
        self.candidate = candidate
        self._on_end = on_end
        self._observer = observer
        self._rng = rng
        self.started_at = time.time()
        self.ended_at: float | None = None
        self.reason = ""
        self.stage = ""
        self._credit, self._threshold = 0.0, 1.0  # set again when the canary starts
        # answers compared (shadow: the candidate's copies; canary: the serving version's copies)
        self.compared = {Stage.SHADOW: 0, Stage.CANARY: 0}
        self.agreed = {Stage.SHADOW: 0, Stage.CANARY: 0}
        self.copies_dropped = {Stage.SHADOW: 0, Stage.CANARY: 0}
        self.shadow_errors = 0
        self._copy_busy = False
        self._budget_s = 0.0  # copy time available now (token bucket, refilled from idle time)
        self._budget_at = time.monotonic()
        # Machine-seconds (a batch has every core, a decode one): used by both versions, copies
        # excluded, at the last refill (0 at first: the first refill only sets the mark); decoding
        # of the requests to either version so far; copies so far.
        self._busy_at = 0.0
        self._users_s = 0.0
        self._copies_s = 0.0
        self._shadow_infer = {"serving": deque(maxlen=_LATENCIES), "candidate": deque(maxlen=_LATENCIES)}
        # canary
        self.canary_answers = self.canary_errors = 0
        self._latency = {"serving": deque(maxlen=_LATENCIES), "candidate": deque(maxlen=_LATENCIES)}
        self._tasks: set[asyncio.Task] = set()

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self.serving.mirror = self._mirror
        self.candidate.mirror = self._mirror
        self.serving.probe = lambda ok, seconds: self._probe("serving", ok, seconds)
        self.candidate.probe = lambda ok, seconds: self._probe("candidate", ok, seconds)
        if self.policy.shadow_requests > 0:
            self._enter(Stage.SHADOW)
        elif self.policy.canary_share > 0:
            self._enter(Stage.CANARY)
        else:
            self.promote("the policy has neither a shadow nor a canary stage")

    @property
    def active(self) -> bool:
        return self.stage in (Stage.SHADOW, Stage.CANARY)

    def promote(self, reason: str) -> None:
        if self.active or not self.stage:
            self._end(Stage.PROMOTED, reason)

    def roll_back(self, reason: str) -> None:
        if self.active:
            self._end(Stage.ROLLED_BACK, reason)

    def _enter(self, stage: str) -> None:
        self.stage = stage
        self._credit, self._threshold = 0.0, self._rng()  # the canary's share of requests, so far
        self._latency["serving"].clear()  # each stage compares the two over its own window
        self._latency["candidate"].clear()
        logger.info("model %s version %s: rollout %s (against version %s)", self.name, self.candidate.version, stage,
                    self.serving.version)
        if self._observer is not None:
            self._observer.rollout_stage_changed(self.name, self.candidate.version, stage)

    def _end(self, stage: str, reason: str) -> None:
        self.reason = reason
        self.ended_at = time.time()
        for service in (self.serving, self.candidate):
            if service.mirror == self._mirror:
                service.mirror = None
        self.serving.probe = self.candidate.probe = None
        for task in self._tasks:
            task.cancel()
        self._enter(stage)
        logger.log(logging.INFO if stage == Stage.PROMOTED else logging.WARNING, "model %s version %s %s: %s",
                   self.name, self.candidate.version, stage.replace("_", " "), reason)
        self._on_end(self)

    # -- routing ---------------------------------------------------------------------------------

    def pick(self):
        """The service for a request that names no version.

        In canary, the share is kept per request, not on average: each request earns the canary
        ``canary_share`` of a request and it takes one once its credit passes a random threshold in
        [0, 1). After n requests it has answered n x share, give or take one, at every moment
        (a coin per request strays by sqrt(n x share): 24 answers instead of 15 was seen in 150), and
        the random thresholds keep it off any period a client's own traffic might have.
        """
        if self.stage != Stage.CANARY:
            return self.serving
        self._credit += self.policy.canary_share
        if self._credit < self._threshold:
            return self.serving
        self._credit -= 1.0
        self._threshold = self._rng()
        return self.candidate

    # -- copies: shadow (to the candidate), canary (to the serving version) -----------------------

    def _mirror(self, *, images=None, crops=None, tensor=None, outputs=None, timing=None, service=None) -> None:
        """Called by either version with each request it answered (sync, on the loop)."""
        if timing is not None:
            self._users_s += timing.decode_s / _CORES  # decoding used one core of the machine
        stage = self.stage
        if stage == Stage.SHADOW and service is self.serving:
            source, target = self.serving, self.candidate
        elif stage == Stage.CANARY and service is self.candidate:
            source, target = self.candidate, self.serving
        else:
            return
        now = time.monotonic()
        self._budget_s = min(_COPY_BURST_S, self._budget_s + self._idle_since_last(now) * _COPY_SHARE)
        self._budget_at = now
        spare = (not self._copy_busy and self._budget_s > 0 and not source.queued and not source.busy
                 and not target.queued and not target.busy)
        if not spare:  # only spare capacity, within the budget: copies never make users wait
            self.copies_dropped[stage] += 1
            return
        self._copy_busy = True
        task = asyncio.ensure_future(self._copy(stage, source, target, images, crops, tensor, outputs, timing))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _copy(self, stage, source, target, images, crops, tensor, outputs, timing) -> None:
        from modelport.engine.servable import Timing

        mine = Timing()
        priority.set_current(Priority.BATCH)  # a shadow copy never competes with live requests (its own task)
        try:
            if tensor is not None:
                answer = await target.infer_tensor(tensor, deadline=None, timing=mine)
            elif crops is not None and target.model.spec == source.model.spec:
                answer = await target.infer_crops(crops, deadline=None, timing=mine)
            elif images is not None:
                answer = await target.infer_images(images, deadline=None, timing=mine)
            else:
                self.copies_dropped[stage] += 1
                return
        except _NOT_ITS_FAULT:
            self.copies_dropped[stage] += 1
            return
        except Exception as exc:
            if target is self.candidate:
                self.shadow_errors += 1
                self._count(stage)
                logger.debug("shadow request on %s version %s failed: %s", self.name, target.version, exc)
                self._judge_shadow()
            return
        finally:
            self._copy_busy = False
            self._budget_s -= mine.decode_s + mine.infer_s
            self._copies_s += mine.infer_s + mine.decode_s / _CORES
        if self.stage != stage:
            return
        theirs, ours = _top1(source, outputs), _top1(target, answer)
        self.compared[stage] += len(ours)
        self.agreed[stage] += sum(a == b for a, b in zip(theirs, ours))
        if stage == Stage.SHADOW:
            if timing is not None:
                self._shadow_infer["serving"].append(timing.infer_s)
                self._shadow_infer["candidate"].append(mine.infer_s)
            self._count(Stage.SHADOW, len(ours))
            self._judge_shadow()
        else:
            self._judge_agreement(Stage.CANARY, self.policy.canary_requests)

    def _idle_since_last(self, now: float) -> float:
        """Seconds of the whole machine nobody used since the last refill: wall time less both versions'
        batch time (a batch has every core) and the requests' decoding (one core each), copies excluded."""
        batches_s = (self.serving.stats.compute_infer_ns + self.candidate.stats.compute_infer_ns) / 1e9
        busy = batches_s + self._users_s - self._copies_s
        used = max(0.0, busy - self._busy_at)
        self._busy_at = busy
        return max(0.0, (now - self._budget_at) - used)

    def _judge_agreement(self, stage: str, planned: int) -> bool:
        """Roll back once disagreements rule out min_agreement over the planned answers (or over
        those compared, when they are all in); True if it did."""
        p = self.policy
        compared, agreed = self.compared[stage], self.agreed[stage]
        if compared and (compared - agreed > (1 - p.min_agreement) * planned
                         or compared >= planned and agreed / compared < p.min_agreement):
            self.roll_back(f"top-1 agreement with version {self.serving.version} is {agreed / compared:.3f} over "
                           f"{compared} {stage} answers compared, below min_agreement {p.min_agreement}")
            return True
        return False

    def _judge_shadow(self) -> None:
        if self.stage != Stage.SHADOW:
            return
        p = self.policy
        needed = p.shadow_requests
        if self._judge_agreement(Stage.SHADOW, needed):
            return
        tries = self.compared[Stage.SHADOW] + self.shadow_errors
        if self.shadow_errors > p.max_error_rate * needed:
            self.roll_back(f"{self.shadow_errors} of {tries} shadow requests failed: error rate above "
                           f"max_error_rate {p.max_error_rate}")
            return
        if self.compared[Stage.SHADOW] < needed:
            return
        ratio = _p99_ratio(self._shadow_infer) or 0.0
        if _too_slow(self._shadow_infer, p.max_p99_ratio):
            self.roll_back(f"{_name(self._shadow_infer)} compute time is {ratio:.2f} x version "
                           f"{self.serving.version}'s in shadow, above max_p99_ratio {p.max_p99_ratio}")
        elif p.canary_share > 0:
            self._enter(Stage.CANARY)
        else:
            self.promote(f"shadow passed: agreement {self.agreement(Stage.SHADOW):.3f} over {self.compared[Stage.SHADOW]} answers")

    # -- canary ----------------------------------------------------------------------------------

    def _probe(self, side: str, ok: bool | None, seconds: float) -> None:
        """Each request either version answered (ok), failed by its own fault (False), or refused (None)."""
        if self.stage != Stage.CANARY or ok is None:
            return
        if ok:
            self._latency[side].append(seconds)
        if side != "candidate":
            return
        self.canary_answers += 1
        self.canary_errors += not ok
        self._count("canary")
        p = self.policy
        if self.canary_errors > p.max_error_rate * p.canary_requests:
            self.roll_back(f"{self.canary_errors} of {self.canary_answers} canary requests failed: error rate "
                           f"above max_error_rate {p.max_error_rate}")
        elif self.canary_answers >= p.canary_requests:
            ratio = _p99_ratio(self._latency) or 0.0
            if _too_slow(self._latency, p.max_p99_ratio):
                self.roll_back(f"{_name(self._latency)} latency is {ratio:.2f} x version {self.serving.version}'s in "
                               f"canary, above max_p99_ratio {p.max_p99_ratio}")
            elif not self._judge_agreement(Stage.CANARY, self.compared[Stage.CANARY]):
                self.promote(f"canary passed: {self.canary_errors} errors in {self.canary_answers} answers, p99 "
                             f"ratio {ratio:.2f}, agreement "
                             f"{self.agreement(Stage.CANARY):.3f} over {self.compared[Stage.CANARY]} compared")

    # -- reporting -------------------------------------------------------------------------------

    def agreement(self, stage: str) -> float:
        return self.agreed[stage] / self.compared[stage] if self.compared[stage] else 1.0

    def status(self) -> dict:
        return {
            "model": self.name, "serving_version": str(self.serving.version),
            "candidate_version": str(self.candidate.version), "stage": self.stage, "reason": self.reason,
            "started": self.started_at, "ended": self.ended_at,
            "shadow": {"compared": self.compared[Stage.SHADOW], "agreed": self.agreed[Stage.SHADOW],
                       "agreement": round(self.agreement(Stage.SHADOW), 4), "errors": self.shadow_errors,
                       "dropped": self.copies_dropped[Stage.SHADOW], "p99_compute_ratio": _round(_p99_ratio(self._shadow_infer)),
                       "compute_ms": _summary_ms(self._shadow_infer)},
            "canary": {"answers": self.canary_answers, "errors": self.canary_errors,
                       "compared": self.compared[Stage.CANARY], "agreement": round(self.agreement(Stage.CANARY), 4),
                       "dropped": self.copies_dropped[Stage.CANARY], "p99_latency_ratio": _round(_p99_ratio(self._latency)),
                       "latency_ms": _summary_ms(self._latency)},
            "policy": asdict(self.policy),
        }

    def _count(self, stage: str, answers: int = 1) -> None:
        if self._observer is not None:
            self._observer.rollout_counted(self.name, self.candidate.version, stage, answers)


def _top1(service, outputs: dict[str, np.ndarray]) -> list[str]:
    values = outputs[service.model.output.name]
    return [service.model.labels[i] for i in values.reshape(len(values), -1).argmax(axis=1)]


def _p99_ratio(samples: dict[str, deque]) -> float | None:
    quantile = _quantile(samples)
    if quantile is None:
        return None
    serving = float(np.percentile(samples["serving"], quantile))
    return float(np.percentile(samples["candidate"], quantile)) / max(serving, 1e-6)


def _quantile(samples: dict[str, deque]) -> float | None:
    """99 with a hundred answers a side; below that a p99 is just the slowest one (one hiccup
    would roll a good version back), so the medians are compared instead; nothing below ten."""
    fewest = min(len(samples["serving"]), len(samples["candidate"]))
    return None if fewest < 10 else 99 if fewest >= 100 else 50


def _name(samples: dict[str, deque]) -> str:
    return "p99" if _quantile(samples) == 99 else "median (too few answers for a p99)"


def _too_slow(samples: dict[str, deque], max_ratio: float) -> bool:
    ratio = _p99_ratio(samples)
    if ratio is None or ratio <= max_ratio:
        return False
    q = _quantile(samples)
    return float(np.percentile(samples["candidate"], q) - np.percentile(samples["serving"], q)) > _LATENCY_FLOOR_S


def _summary_ms(samples: dict[str, deque]) -> dict:
    return {side: {"count": len(values), "p50": _round(float(np.percentile(values, 50)) * 1000) if values else None,
                   "p99": _round(float(np.percentile(values, 99)) * 1000) if values else None}
            for side, values in samples.items()}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
