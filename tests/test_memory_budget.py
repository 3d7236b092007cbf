"""The memory budget (lifecycle/residency.py, lifecycle/on_demand.py): versions beyond it wait on disk
and load on first use; the least recently used resident version makes room, never one with
requests in flight.

The models are real Python bundles of a known size: weights of SIZE_MB drawn from a seed at load
(so a version's RSS growth is its size, give or take a page), answering the mean pixel of each
channel through them; a control directory (``$SIZED_MODEL_CONTROL``) can hold a version's requests
at a gate or slow its load. In-process tests drive a real VersionManager; the others a real server.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from modelport.engine.model import Model
from modelport.engine.servable import Timing
from modelport.engine.service import ModelService
from modelport.errors import DeadlineExceeded
from modelport.lifecycle.residency import Residency
from modelport.lifecycle.routing import RoutingTable
from modelport.lifecycle.versions import VersionManager
from modelport.lifecycle.watcher import RepositoryWatcher
from modelport.repository.bundle import write_config
from servers import Server, in_fresh_process, metric

SIZE_MB = 32
# Holds 4 versions, never 5: a load keeps 5 % of the budget free besides its version's peak, so
# 3 resident + 1 loading take 4 x 32 + 8 MB and what else the process grew by (a few MB); 5 take 160.
BUDGET_MB = 5 * SIZE_MB
TOKEN = "budget-token"
CONTROL = "SIZED_MODEL_CONTROL"

SIZED_MODEL = '''
import os
import time
from pathlib import Path

import numpy as np

from modelport.runtime import TensorSpec


class Model:
    """Weights of a known size from a seed (the file "weights": seed, MB); the answer is each
    channel's mean pixel times their sum over each class's quarter. In $SIZED_MODEL_CONTROL:
    "<seed>.gate" holds requests while it exists, "<seed>.load_s" slows the load."""

    inputs = [TensorSpec("image", "UINT8", (-1, 8, 8, 3))]
    outputs = [TensorSpec("logits", "FP32", (-1, 4))]

    def __init__(self, bundle_dir):
        seed, size_mb = (Path(bundle_dir) / "weights").read_text().split()
        self.control = Path(os.environ.get("SIZED_MODEL_CONTROL", "/nonexistent"))
        self.seed = seed
        delay = self.control / f"{seed}.load_s"
        if delay.exists():
            time.sleep(float(delay.read_text()))
        columns = int(float(size_mb) * 2**20 / 4 / 3) // 4 * 4
        self.weights = np.random.default_rng(int(seed)).standard_normal((3, columns), dtype=np.float32)
        self.head = self.weights.reshape(3, 4, -1).sum(axis=2)

    def run(self, feeds):
        while (self.control / f"{self.seed}.gate").exists():
            time.sleep(0.002)
        return {"logits": feeds["image"].astype(np.float32).mean(axis=(1, 2)) @ self.head}
'''


def make_sized_bundle(directory: Path, seed: int, size_mb: float = SIZE_MB) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.py").write_text(SIZED_MODEL)
    (directory / "labels.txt").write_text("a\nb\nc\nd\n")
    (directory / "weights").write_text(f"{seed} {size_mb}")
    write_config(directory, {
        "format": 1, "runtime": "python", "model_file": "model.py",
        "input": {"height": 8, "width": 8, "resize_shorter": 0, "dtype": "uint8", "layout": "NHWC"},
        "output": {"name": "logits", "kind": "logits"}, "serving": {"top_k": 2},
    })
    return directory


def make_repository(root: Path, versions: int) -> Path:
    """Model "m", versions 1..n (version v drawn from seed v), every one wanted by its policy."""
    for version in range(1, versions + 1):
        make_sized_bundle(root / "m" / str(version), seed=version)
    (root / "m" / "model.toml").write_text("version_policy = { all = true }\n")
    return root


@functools.lru_cache(maxsize=None)
def _head(seed: int, size_mb: float = SIZE_MB) -> np.ndarray:
    columns = int(size_mb * 2**20 / 4 / 3) // 4 * 4
    return np.random.default_rng(seed).standard_normal((3, columns), dtype=np.float32).reshape(3, 4, -1).sum(axis=2)


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)


def expected(version: int, x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32).mean(axis=(1, 2)) @ _head(version)


@pytest.fixture
def control(tmp_path, monkeypatch) -> Path:
    directory = tmp_path / "control"
    directory.mkdir()
    monkeypatch.setenv(CONTROL, str(directory))
    return directory


# -- in process: a real version manager under a budget ---------------------------------------------

class Events:
    """The budget's observer: loads and evictions, in order."""

    def __init__(self) -> None:
        self.loaded: list[tuple[int, str]] = []
        self.evicted: list[int] = []
        self.evicted_models: list[str] = []
        self.waits: list[float] = []

    def model_loaded(self, model, version, reason, seconds) -> None:
        self.loaded.append((version, reason))

    def model_evicted(self, model, version) -> None:
        self.evicted.append(version)
        self.evicted_models.append(model)

    def load_waited(self, seconds) -> None:
        self.waits.append(seconds)


class Budgeted:
    """A repository served under a budget by a real VersionManager (watching off)."""

    def __init__(self, root: Path, budget_mb: float, pools) -> None:
        self.root = root
        self.decode_pool, self.infer_pool = pools
        self.budget_mb = budget_mb
        self.events = Events()

    async def start(self) -> None:
        self.routing = RoutingTable()
        self.residency = Residency(int(self.budget_mb * 2**20), self.routing, observer=self.events)
        self.watcher = RepositoryWatcher(self.root, settle_s=0.0, watch=False)
        self.manager = VersionManager(self.watcher, self.routing, self._load, residency=self.residency)
        await self.manager.load_initial()

    async def _load(self, name: str, path: Path) -> ModelService:
        loop = asyncio.get_running_loop()
        model = await loop.run_in_executor(self.infer_pool, lambda: Model.load(path, name=name))
        service = ModelService(model, decode_pool=self.decode_pool, infer_pool=self.infer_pool)
        service.start()
        return service

    def resident(self) -> list[int]:
        """Resident versions, least recently used first."""
        return [od.version for od in self.residency.resident()]

    async def answer(self, version: int | None, seed: int = 0, deadline_s: float | None = None, *,
                     model: str = "m", weights_seed: int | None = None) -> np.ndarray:
        x = image(seed)
        timing = Timing()
        deadline = None if deadline_s is None else timing.arrived + deadline_s
        out = await self.routing.get(model, version).infer_tensor(x, deadline=deadline, timing=timing)
        np.testing.assert_allclose(out["logits"], expected(weights_seed or version, x), rtol=1e-5)
        return out["logits"]

    async def close(self) -> None:
        for entry in self.routing.index():
            await self.routing.retire(entry["name"], int(entry["version"]))


@pytest.fixture(scope="module")
def pools():
    with ThreadPoolExecutor(2) as decode_pool, ThreadPoolExecutor(4) as infer_pool:
        yield decode_pool, infer_pool


def run(budgeted: Budgeted, scenario) -> None:
    async def main():
        await budgeted.start()
        try:
            await scenario()
        finally:
            await budgeted.close()

    asyncio.run(main())


async def until(predicate, timeout_s: float = 10) -> None:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, "condition not met in time"
        await asyncio.sleep(0.005)


@in_fresh_process  # the budget measures this process's RSS
def test_the_least_recently_used_version_makes_room(tmp_path, pools, control):
    budgeted = Budgeted(make_repository(tmp_path / "repo", 6), BUDGET_MB, pools)

    async def scenario():
        # Loaded newest first, each measured; 6 and 5 (least recently loaded) made room for 2 and 1.
        assert budgeted.resident() == [4, 3, 2, 1]
        assert budgeted.events.evicted == [6, 5]
        assert all(abs(od.size_bytes / 2**20 - SIZE_MB) < 2 for od in budgeted.residency.resident())
        await budgeted.answer(2)
        await budgeted.answer(4)
        assert budgeted.resident() == [3, 1, 2, 4]  # a request makes a version the most recently used
        await budgeted.answer(6)  # on disk: loaded, and 3, now the least recently used, made room
        assert budgeted.events.evicted == [6, 5, 3] and budgeted.resident() == [1, 2, 4, 6]
        await budgeted.answer(1)
        await budgeted.answer(5)
        assert budgeted.events.evicted == [6, 5, 3, 2] and budgeted.resident() == [4, 6, 1, 5]
        assert budgeted.events.loaded[6:] == [(6, "demand"), (5, "demand")]
        index = {int(e["version"]): e["resident"] for e in budgeted.routing.index(resident=True)}
        assert index == {1: True, 2: False, 3: False, 4: True, 5: True, 6: True}
        assert budgeted.residency.in_use_bytes() <= budgeted.residency.budget_bytes

    run(budgeted, scenario)


@in_fresh_process  # the budget measures this process's RSS
def test_a_version_with_requests_in_flight_is_never_unloaded(tmp_path, pools, control):
    budgeted = Budgeted(make_repository(tmp_path / "repo", 5), BUDGET_MB, pools)

    async def scenario():
        assert budgeted.resident() == [4, 3, 2, 1]
        (control / "4.gate").touch()
        held = asyncio.ensure_future(budgeted.answer(4, seed=7))
        await until(lambda: budgeted.routing.get("m", 4).busy)
        for version in (3, 2, 1):
            await budgeted.answer(version)
        assert budgeted.resident() == [4, 3, 2, 1]  # 4 is the least recently used, and in flight
        await budgeted.answer(5)
        assert budgeted.events.evicted[-1] == 3 and budgeted.resident() == [4, 2, 1, 5]
        assert not held.done()
        (control / "4.gate").unlink()
        await held  # answered right, by the version that stayed

    run(budgeted, scenario)


def test_a_load_waits_for_the_requests_in_flight_when_nothing_else_can_make_room(tmp_path, pools, control):
    budgeted = Budgeted(make_repository(tmp_path / "repo", 2), 1.5 * SIZE_MB, pools)  # holds 1

    async def scenario():
        assert budgeted.resident() == [1] and budgeted.events.evicted == [2]
        (control / "1.gate").touch()
        held = asyncio.ensure_future(budgeted.answer(1, seed=3))
        await until(lambda: budgeted.routing.get("m", 1).busy)
        evicted_when_held_ended = []
        held.add_done_callback(lambda _: evicted_when_held_ended.extend(budgeted.events.evicted))
        cold = asyncio.ensure_future(budgeted.answer(2, deadline_s=30))
        await asyncio.sleep(0.3)
        assert not cold.done() and budgeted.resident() == [1]  # waiting: 1 has a request in flight
        (control / "1.gate").unlink()
        await cold
        await held
        assert evicted_when_held_ended == [2]  # 1 was unloaded only after its request was answered
        assert budgeted.events.evicted == [2, 1] and budgeted.resident() == [2]

    run(budgeted, scenario)


@in_fresh_process  # the budget measures this process's RSS
def test_the_versions_of_a_rollout_in_progress_stay_resident(tmp_path, pools, control):
    root = make_repository(tmp_path / "repo", 4)
    make_sized_bundle(root / "r" / "1", seed=101)
    (root / "r" / "model.toml").write_text("[rollout]\nshadow_requests = 1000\ncanary_share = 0\n")
    budgeted = Budgeted(root, BUDGET_MB, pools)

    async def scenario():
        make_sized_bundle(root / "r" / "2", seed=102)
        await budgeted.manager.sync()  # r 2 arrives while r 1 serves: judged in shadow
        while budgeted.watcher.unsettled():
            await budgeted.watcher.settle()
            await budgeted.manager.sync()
        rollout = budgeted.routing.rollouts["r"]
        assert rollout.active and [od.name for od in budgeted.residency.resident()] == ["m", "m", "r", "r"]
        await budgeted.answer(1)
        await budgeted.answer(2)  # r 1 and r 2 are the least recently used now
        for version in (3, 4, 1, 2):
            await budgeted.answer(version)
        assert budgeted.events.evicted_models == ["m"] * len(budgeted.events.evicted)
        assert sorted(budgeted.resident()) == [1, 1, 2, 2]  # r 1, r 2, and the last two of m
        for seed in range(4):  # r 1 answers; its shadow copies run on r 2, through the stand-ins
            await budgeted.answer(None, seed, model="r", weights_seed=101)
            await asyncio.sleep(0.1)
        await until(lambda: rollout.compared["shadow"] >= 1)

    run(budgeted, scenario)


@in_fresh_process  # the budget measures this process's RSS
def test_a_cold_request_past_its_deadline_is_refused_and_the_load_goes_on(tmp_path, pools, control):
    budgeted = Budgeted(make_repository(tmp_path / "repo", 5), BUDGET_MB, pools)

    async def scenario():
        (control / "5.load_s").write_text("0.5")
        with pytest.raises(DeadlineExceeded, match="loading"):
            await budgeted.answer(5, deadline_s=0.1)  # just under the load: refused at its deadline
        await until(lambda: 5 in budgeted.resident())  # the load went on: the next request finds it
        await budgeted.answer(5, deadline_s=0.1)
        assert budgeted.events.loaded[-1] == (5, "demand") and len(budgeted.events.waits) == 1
        assert 0.09 < budgeted.events.waits[0] < 0.3

    run(budgeted, scenario)


# -- a real server ---------------------------------------------------------------------------------

def infer(server: Server, version: int, seed: int, timeout_ms: float = 10_000) -> httpx.Response:
    x = image(seed)
    body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    return httpx.post(f"{server.url}/v2/models/m/versions/{version}/infer", json=body,
                      headers={"x-request-timeout-ms": str(timeout_ms)}, timeout=30)


def right(response: httpx.Response, version: int, seed: int) -> bool:
    if response.status_code != 200 or response.json()["model_version"] != str(version):
        return False
    logits = np.array(response.json()["outputs"][0]["data"], np.float32)
    return np.allclose(logits, expected(version, image(seed)).ravel(), rtol=1e-5)


def load_ms(response: httpx.Response) -> float | None:
    for entry in response.headers.get("server-timing", "").split(","):
        name, _, duration = entry.strip().partition(";dur=")
        if name == "load":
            return float(duration)
    return None


def index(server: Server) -> dict[int, bool]:
    entries = httpx.post(server.url + "/v2/repository/index", headers={"authorization": f"Bearer {TOKEN}"}).json()
    assert all(e["state"] == "READY" for e in entries)
    return {int(e["version"]): e["resident"] for e in entries}


def peak_rss_bytes(server: Server) -> int:
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def serve(root: Path, tmp_path: Path, control: Path) -> Server:
    return Server(str(root), "--admin-token", TOKEN, "--memory-budget-mb", str(BUDGET_MB),
                  log=tmp_path / "server.log", env={**os.environ, CONTROL: str(control)}).wait_ready()


def test_a_cold_version_is_loaded_within_the_request_deadline_and_the_wait_reported(tmp_path, control):
    server = serve(make_repository(tmp_path / "repo", 6), tmp_path, control)
    try:
        # Ready, and every version ready, while two of them wait on disk.
        assert index(server) == {1: True, 2: True, 3: True, 4: True, 5: False, 6: False}
        assert httpx.get(server.url + "/v2/health/ready").status_code == 200
        assert httpx.get(server.url + "/v2/models/m/versions/6/ready").status_code == 200

        # A boundary pair: loads of 0.6 s, deadlines just under (504 at the deadline) and well over.
        (control / "5.load_s").write_text("0.6")
        (control / "6.load_s").write_text("0.6")
        start = time.monotonic()
        refused = infer(server, 5, seed=1, timeout_ms=200)
        assert refused.status_code == 504 and refused.json()["kind"] == "deadline_exceeded"
        assert "loading" in refused.json()["error"] and time.monotonic() - start < 0.55
        start = time.monotonic()
        cold = infer(server, 6, seed=2, timeout_ms=5000)
        took_ms = (time.monotonic() - start) * 1000
        assert right(cold, 6, seed=2) and took_ms < 5000
        assert 600 <= load_ms(cold) <= took_ms  # the wait, reported (behind 5's load, which went on)
        warm = infer(server, 5, seed=3)  # 5's load went on after its request left
        assert right(warm, 5, seed=3) and load_ms(warm) is None
        # 5's load made room with 4, then 6's with 3: the least recently used each time.
        assert index(server) == {1: True, 2: True, 3: False, 4: False, 5: True, 6: True}

        # First requests to a version on disk share one load.
        cold_version = next(v for v, resident in index(server).items() if not resident)
        loads = metric(server.url, "modelport_model_loads_total", model="m", reason="demand")
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda seed: infer(server, cold_version, seed), range(10, 14)))
        assert all(right(a, cold_version, seed) for a, seed in zip(answers, range(10, 14)))
        assert all(load_ms(a) is not None for a in answers)
        assert metric(server.url, "modelport_model_loads_total", model="m", reason="demand") == loads + 1
        assert metric(server.url, "modelport_model_load_wait_seconds_count") == 1 + 1 + 4
        assert metric(server.url, "modelport_models_resident") == 4
        base = metric(server.url, "modelport_memory_base_bytes")
        assert peak_rss_bytes(server) <= base + BUDGET_MB * 2**20
    finally:
        server.stop()
    assert "Traceback" not in server.log.read_text()


def test_twenty_versions_under_a_budget_that_holds_four_answer_right(tmp_path, control):
    server = serve(make_repository(tmp_path / "repo", 20), tmp_path, control)
    try:
        assert sum(index(server).values()) == 4
        # A skewed workload: a few versions take most requests (Zipf over a shuffled order).
        rng = random.Random(0)
        order = list(range(1, 21))
        rng.shuffle(order)
        weights = [1 / rank ** 1.2 for rank in range(1, 21)]
        work = [(rng.choices(order, weights)[0], seed) for seed in range(60)]
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda job: infer(server, *job), work))
        wrong = [(v, seed, a.status_code) for (v, seed), a in zip(work, answers) if not right(a, v, seed)]
        assert wrong == []
        assert sum(index(server).values()) <= 4
        loads = metric(server.url, "modelport_model_loads_total", model="m", reason="demand")
        evictions = metric(server.url, "modelport_model_evictions_total", model="m")
        assert 0 < loads < len(work) and evictions == 16 + loads  # every load past the first four made room
        base = metric(server.url, "modelport_memory_base_bytes")
        assert peak_rss_bytes(server) <= base + BUDGET_MB * 2**20
    finally:
        server.stop()
    assert "Traceback" not in server.log.read_text()
