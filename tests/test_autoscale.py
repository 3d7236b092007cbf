"""``modelport autoscale``: the decision rule on plain numbers, then the real thing: a real etcd,
worker processes it starts itself, load through the discovery client, workers added under a load
step and drained away after it, a dead worker replaced, everything stopped on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cluster import TTL_S, registry
from modelport import AsyncClient
from modelport.cluster.autoscale import AutoscaleConfig, Rule, load_from_metrics
from modelport.cluster.members import READY
from modelport.errors import BadInput
from modelport.repository.bundle import write_config
from servers import wait_until

# -- the rule: no processes -----------------------------------------------------------------------

CONFIG = AutoscaleConfig(min_workers=1, max_workers=3, target_in_flight=2, up_delay_s=1, down_delay_s=4,
                         interval_s=0.5, look_back_s=1)


def run_rule(rule: Rule, current: int, load: float, start: float, until: float, every_s: float = 0.25):
    """Measure ``load`` every ``every_s`` from ``start``; (time, decision) of the first decision, or None."""
    now = start
    while now <= until + 1e-9:
        rule.observe(now, load)
        decision = rule.decide(now, current)
        if decision is not None:
            return now, decision
        now += every_s
    return None


def test_scales_up_only_after_the_up_delay():
    rule = Rule(CONFIG)
    assert run_rule(rule, 1, 0.0, 0, 2) is None  # idle at the minimum: nothing to do
    at, decision = run_rule(rule, 1, 24.0, 2.25, 10)  # the mean is 6 at once: ceil(6 / 2) = 3 wanted
    assert at == pytest.approx(2.25 + 1.0)  # held for exactly the up delay
    assert (decision.current, decision.desired) == (1, 3)
    assert "= 12 worker(s), capped at --max 3; above 1 for 1.0 s" in decision.why


def test_scales_down_only_after_the_longer_down_delay():
    rule = Rule(CONFIG)
    at, decision = run_rule(rule, 3, 1.0, 0, 10)
    assert at == pytest.approx(4.0)  # the down delay, not the up delay
    assert (decision.current, decision.desired) == (3, 1)


def test_a_dip_restarts_the_delay():
    rule = Rule(CONFIG)
    assert run_rule(rule, 3, 1.0, 0, 3.5) is None  # fewer wanted for 3.5 s: not yet
    assert run_rule(rule, 3, 100.0, 3.75, 4.75) is None  # three wanted again: the count starts over
    at, _ = run_rule(rule, 3, 1.0, 5.0, 20)
    assert at == pytest.approx(5.75 + 4.0)  # a fresh down delay, from when the spike left the window


def test_desired_is_clamped_to_min_and_max():
    rule = Rule(CONFIG)
    _, up = run_rule(rule, 1, 100.0, 0, 5)
    assert up.desired == 3 and "capped at --max 3" in up.why
    rule = Rule(AutoscaleConfig(min_workers=2, max_workers=5, target_in_flight=2, down_delay_s=1, look_back_s=1))
    _, down = run_rule(rule, 4, 0.0, 0, 5)
    assert down.desired == 2 and "floored at --min 2" in down.why
    # Outside the bounds is no decision to wait for: at once, even with nothing measured.
    assert Rule(CONFIG).decide(0.0, 0).desired == 1
    assert Rule(CONFIG).decide(0.0, 7).desired == 3


def test_boundary_pairs_of_the_target():
    rule = Rule(CONFIG)
    assert rule.wanted(4.0) == 2 and rule.wanted(4.0 + 1e-6) == 3  # just at / just over 2 per worker
    assert rule.wanted(0.0) == 0 and rule.wanted(0.1 * 3 / 0.15) == 1  # float error adds no worker


def test_the_load_is_the_mean_over_the_look_back_window():
    rule = Rule(CONFIG)
    rule.observe(0.0, 10.0)
    rule.observe(0.5, 2.0)
    assert rule.average(0.5) == pytest.approx(6.0)
    assert rule.average(1.2) == pytest.approx(2.0)  # the sample at 0.0 has left the 1 s window
    assert rule.average(1.6) is None  # nothing measured lately: no decision either way
    assert rule.decide(1.6, 2) is None
    # A one-sample spike inside a calm window moves the mean, not the fleet.
    rule = Rule(CONFIG)
    for i in range(4):
        rule.observe(i * 0.25, 12.0 if i == 3 else 0.0)
    assert rule.average(0.75) == pytest.approx(3.0)  # ceil(3 / 2) = 2 wanted, not 3 (a spike of 12)


def test_settings_are_checked():
    with pytest.raises(BadInput):
        AutoscaleConfig(min_workers=3, max_workers=2)
    with pytest.raises(BadInput):
        AutoscaleConfig(min_workers=0, max_workers=2)  # no worker: nothing to measure the load on
    with pytest.raises(BadInput):
        AutoscaleConfig(target_in_flight=0)


def test_load_from_metrics_is_the_ongoing_requests_gauge():
    text = ("# TYPE modelport_requests_in_flight gauge\nmodelport_requests_in_flight 5.0\n"
            "# TYPE modelport_queue_depth gauge\n"  # a subset of those in flight: not added again
            'modelport_queue_depth{model="a",version="1"} 2.0\nmodelport_queue_depth{model="b",version="3"} 1.0\n')
    assert load_from_metrics(text) == 5
    assert load_from_metrics("# TYPE modelport_requests_in_flight gauge\nmodelport_requests_in_flight 0.0\n") == 0


# -- the real thing --------------------------------------------------------------------------------

SLOW_MODEL = '''
import time

import numpy as np

from modelport.runtime import TensorSpec


class Model:
    """20 ms a batch, on no CPU: a request stays in flight long enough to be counted."""

    inputs = [TensorSpec("image", "UINT8", (-1, 8, 8, 3))]
    outputs = [TensorSpec("logits", "FP32", (-1, 4))]

    def __init__(self, bundle_dir):
        pass

    def run(self, feeds):
        time.sleep(0.02)
        return {"logits": np.zeros((len(feeds["image"]), 4), np.float32)}
'''
IMAGE = np.zeros((1, 8, 8, 3), np.uint8)
UP_DELAY_S, DOWN_DELAY_S, LOOK_BACK_S = 1.0, 4.0, 1.0


def make_slow_repo(root: Path) -> Path:
    bundle = root / "slow" / "1"
    bundle.mkdir(parents=True)
    (bundle / "model.py").write_text(SLOW_MODEL)
    (bundle / "labels.txt").write_text("a\nb\nc\nd\n")
    write_config(bundle, {
        "format": 1, "runtime": "python", "model_file": "model.py",
        "input": {"height": 8, "width": 8, "resize_shorter": 0, "dtype": "uint8", "layout": "NHWC"},
        "output": {"name": "logits", "kind": "logits"},
        # One request at a time: eight clients keep eight requests in flight on one worker.
        "serving": {"top_k": 2, "max_batch_size": 1, "concurrent_batches": 1},
    })
    return root


class Levels:
    """Up to ``most`` clients sending requests back to back; ``level`` of them busy at a time."""

    def __init__(self, client: AsyncClient, most: int) -> None:
        self.client, self.level, self.answers, self.errors = client, 0, 0, []
        self._done = False
        self._tasks = [asyncio.ensure_future(self._one(i)) for i in range(most)]

    async def _one(self, i: int) -> None:
        while not self._done:
            if i >= self.level:
                await asyncio.sleep(0.02)
                continue
            try:
                reply = await self.client.infer("slow", {"image": IMAGE})
                assert reply["logits"].shape == (1, 4)
                self.answers += 1
            except Exception as exc:  # every failure is a test failure: collect them
                self.errors.append(repr(exc))

    async def close(self) -> None:
        self._done = True
        await asyncio.gather(*self._tasks)


def ready_workers(url: str) -> dict[int, str]:
    """pid -> member id of the ready workers."""
    return {m.pid: m.id for m in registry(url)[0].values() if m.state == READY}


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_a_load_step_scales_1_to_3_and_back_with_no_failed_request(etcd_server, tmp_path):
    repo = make_slow_repo(tmp_path / "repo")
    url = etcd_server.url("autoscale-step")
    log = tmp_path / "autoscale.log"
    scaler = subprocess.Popen(
        [sys.executable, "-m", "modelport", "autoscale", "--cluster", url, "--min", "1", "--max", "3",
         "--target-in-flight", "2", "--up-delay-s", str(UP_DELAY_S), "--down-delay-s", str(DOWN_DELAY_S),
         "--look-back-s", str(LOOK_BACK_S), "--interval-s", "0.25", "--stop-timeout-s", "20",
         "--", sys.executable, "-m", "modelport", "serve", str(repo), "--port", "0", "--drain-s", "1",
         "--lease-ttl-s", str(TTL_S)],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    seen: set[int] = set()  # every worker pid, to prove each is gone at the end
    timings = {}

    def count(n: int) -> bool:
        if scaler.poll() is not None:
            raise RuntimeError(f"autoscale exited:\n{log.read_text()[-3000:]}")
        ready = ready_workers(url)
        seen.update(ready)
        return len(ready) == n

    async def scenario() -> Levels:
        loop = asyncio.get_running_loop()

        def until(n: int, timeout_s: float, what: str):
            return loop.run_in_executor(None, lambda: wait_until(lambda: count(n), timeout_s, every_s=0.1, what=what))

        async with AsyncClient(url, model="slow", timeout_s=20) as client:
            load = Levels(client, 8)
            try:
                load.level = 8  # the step: ~8 in flight + queued > 2 per worker x 3
                timings["up"] = await until(3, 15, "3 workers within 15 s of the step")
                await asyncio.sleep(0.5)
                assert len(await loop.run_in_executor(None, ready_workers, url)) == 3  # and no more (--max 3)
                load.level = 1  # a trickle: ~1 in flight, one worker's worth; the other two drain under it
                light = time.monotonic()
                timings["down"] = await until(1, DOWN_DELAY_S + LOOK_BACK_S + 10, "back to 1 worker")
                assert time.monotonic() - light >= DOWN_DELAY_S  # not before the down delay
                await loop.run_in_executor(None, lambda: wait_until(lambda: len(registry(url)[0]) == 1, 10,
                                                                    what="the other two drained and gone"))
                timings["gone"] = time.monotonic() - light
            finally:
                await load.close()
            return load

    try:
        wait_until(lambda: count(1), 30, every_s=0.1, what="the first worker")
        load = asyncio.run(scenario())
        assert not load.errors, load.errors[:3]  # failover and draining: zero failed requests
        assert load.answers > 200
        text = log.read_text()
        assert re.search(r"scale 1 -> 3 worker\(s\): load [\d.]+ .* capped at --max 3", text), text[-3000:]
        assert re.search(r"scale 3 -> 1 worker\(s\): load [\d.]+", text), text[-3000:]
        assert text.count("SIGTERM, it drains then exits") == 2 and "SIGKILL" not in text

        # A worker that dies is replaced (here the only one, so --min 1 wants another at once).
        (victim,) = ready_workers(url)
        assert parent_of(victim) == scaler.pid  # the autoscaler's own child, nobody else's
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: count(1) and victim not in ready_workers(url), 15, every_s=0.1, what="a replacement")
        assert f"worker pid {victim}" in log.read_text() and "exited unexpectedly" in log.read_text()
    finally:
        scaler.send_signal(signal.SIGTERM)  # drains and stops every worker, then exits 0
        try:
            code = scaler.wait(30)
        except subprocess.TimeoutExpired:
            scaler.kill()
            raise
    assert code == 0, log.read_text()[-3000:]
    assert registry(url)[0] == {}  # every worker left the member directory
    for pid in seen:  # and exited (a pid reused since by someone else's process would not name the repo)
        cmdline = Path(f"/proc/{pid}/cmdline")
        assert not cmdline.exists() or str(repo) not in cmdline.read_text()
    print(f"\n3 workers {timings['up']:.1f} s after the step; 1 worker {timings['down']:.1f} s after it ended "
          f"(the other two gone at {timings['gone']:.1f} s); {load.answers} answers, 0 failed")


def test_a_worker_that_ignores_sigterm_is_killed_only_after_the_stop_timeout(etcd_server, tmp_path):
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    log = tmp_path / "autoscale.log"
    scaler = subprocess.Popen(
        [sys.executable, "-m", "modelport", "autoscale", "--cluster", etcd_server.url("autoscale-stubborn"),
         "--min", "2", "--max", "2", "--target-in-flight", "1", "--stop-timeout-s", "1.5",
         "--", sys.executable, "-c", stubborn],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: log.read_text().count("started worker") == 2, 20, what="two workers started")
        time.sleep(0.3)  # the children's own start: their SIGTERM handler is set
        children = [int(pid) for pid in re.findall(r"started worker (\d+)", log.read_text())]
        assert all(parent_of(pid) == scaler.pid for pid in children)
        scaler.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        with pytest.raises(subprocess.TimeoutExpired):
            scaler.wait(1.0)  # still waiting for its workers to drain
        assert scaler.wait(10) == 0
        assert 1.5 <= time.monotonic() - stopped < 6
    finally:
        if scaler.poll() is None:
            scaler.kill()
    text = log.read_text()
    assert text.count("after SIGTERM: SIGKILL") == 2 and text.count("killed by SIGKILL") == 2, text
    assert "exited unexpectedly" not in text
