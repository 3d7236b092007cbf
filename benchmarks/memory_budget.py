"""Issue 28's memory budget: 20 versions of the default model served under a budget that holds 4.

    python benchmarks/memory_budget.py [--requests 200] [--clients 4]

The 20 versions are copies of the default model (EfficientNet-Lite0) whose labels.txt is rotated by
the version number: the same weights and memory, but each version names the top class differently,
so an answer from the wrong version (or a mixed-up one) is caught. Every server runs ONNX Runtime at
fp32, as the reference does: the answers are exact.

1. Calibration, in three servers without a budget: an empty repository (the server's *base* RSS,
   no model loaded), one version, two versions. One version's size S = RSS(2) - RSS(1); the first
   load's peak above the base F = VmHWM(1) - base (the runtime's libraries, and the load's own
   transient peak). A budget holds 4 when 3 resident versions and a fourth one's load fit in the
   95 % a load may use (lifecycle/residency.py keeps 5 % free): F + 3 S <= 0.95 B; a fifth never
   fits when F + 4 S > 0.95 B. The budget is B = (F + 3.9 S) / 0.95: most of a version to spare for
   what the process grows by besides the versions (measured: ~8 MB over 20 loads, and the runtime
   arenas of resident versions growing with their first batches of 4).
2. The budgeted server on all 20 versions; a skewed workload (Zipf, s = 1.2, over a shuffled order
   of the versions) from ``--clients`` threads on the upload API, each request naming its version.
   Reported: wrong answers, peak RSS (VmHWM) against base + budget, the cold-load time that
   requests waited (Server-Timing ``load``) p50/p99, the hit ratio (requests that found their
   version resident), loads and evictions.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from http_server import free_port, start_server  # noqa: E402

from modelport import samples  # noqa: E402
from modelport.engine.model import Model  # noqa: E402
from modelport.packaged import default_model  # noqa: E402

TOKEN = "bench-token"
VERSIONS = 20
ENGINE = ["--precision", "fp32", "--runtime", "onnxruntime"]


def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def make_repository(root: Path, source: Path, versions: int) -> Path:
    labels = (source / "labels.txt").read_text().splitlines()
    for v in range(1, versions + 1):
        target = root / "lite" / str(v)
        target.mkdir(parents=True)
        for name in os.listdir(source):
            if name != "labels.txt" and (source / name).is_file():
                os.link(source / name, target / name)  # the same file on disk; each load reads its own copy
        (target / "labels.txt").write_text("\n".join(rotated(labels, v)) + "\n")
    (root / "lite").mkdir(parents=True, exist_ok=True)
    (root / "lite" / "model.toml").write_text("version_policy = { all = true }\n")
    return root


def rotated(labels: list[str], v: int) -> list[str]:
    return labels[v:] + labels[:v]


def ready_rss_mb(root: Path, log: Path) -> tuple[float, float]:
    """A server without a budget on ``root``: its RSS once ready and idle, and its peak RSS."""
    port = free_port()
    proc, _ = start_server([str(root), *ENGINE], port, log)
    try:
        time.sleep(1.0)
        return status_kb(proc.pid, "VmRSS") / 1024, status_kb(proc.pid, "VmHWM") / 1024
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def photos(source: Path, count: int = 8) -> list[tuple[bytes, int]]:
    """Sample photos the reference classifies with a clear top class: (JPEG, class index)."""
    model = Model.load(source, precision="fp32", engine="onnxruntime")
    chosen = []
    for data in samples.photo_set(4 * count, seed=1):
        probabilities = model.classify([data], k=2)[0]
        if probabilities[0].score - probabilities[1].score > 0.1:
            chosen.append((data, model.labels.index(probabilities[0].label)))
        if len(chosen) == count:
            break
    model.close()
    return chosen


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    source = default_model.ensure_default_model()
    labels = (source / "labels.txt").read_text().splitlines()
    images = photos(source)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "empty").mkdir()
        base, _ = ready_rss_mb(tmp / "empty", tmp / "empty.log")
        one, one_peak = ready_rss_mb(make_repository(tmp / "one", source, 1), tmp / "one.log")
        two, _ = ready_rss_mb(make_repository(tmp / "two", source, 2), tmp / "two.log")
        size = two - one
        first = one_peak - base
        budget = (first + 3.9 * size) / 0.95
        print(f"calibration: base {base:.0f} MB, one version {size:.0f} MB resident, the first load's peak "
              f"{first:.0f} MB above the base (with the runtime's libraries) -> budget {budget:.0f} MB (holds 4)")

        repo = make_repository(tmp / "repo", source, VERSIONS)
        port = free_port()
        started = time.perf_counter()
        proc, _ = start_server([str(repo), *ENGINE, "--admin-token", TOKEN, "--memory-budget-mb", f"{budget:.1f}"],
                               port, tmp / "server.log")
        startup_s = time.perf_counter() - started
        url = f"http://127.0.0.1:{port}"
        index = httpx.post(url + "/v2/repository/index", headers={"authorization": f"Bearer {TOKEN}"}).json()
        resident_at_start = sum(e["resident"] for e in index)

        rng = random.Random(0)
        order = list(range(1, VERSIONS + 1))
        rng.shuffle(order)
        weights = [1 / rank ** 1.2 for rank in range(1, VERSIONS + 1)]
        work = [(rng.choices(order, weights)[0], i % len(images)) for i in range(args.requests)]
        results: list[tuple[int, int, bool, float, float | None]] = []  # version, status, right, seconds, load ms
        lock = threading.Lock()
        jobs = iter(work)

        def client() -> None:
            with httpx.Client(base_url=url, timeout=60) as http:
                while True:
                    with lock:
                        job = next(jobs, None)
                    if job is None:
                        return
                    version, photo = job
                    data, index_ = images[photo]
                    start = time.perf_counter()
                    response = http.post(f"/?model=lite&version={version}&k=1", files={"data": data},
                                         headers={"x-request-timeout-ms": "30000"})
                    seconds = time.perf_counter() - start
                    right = response.status_code == 200 and response.json()[0][0] == rotated(labels, version)[index_]
                    load = next((float(e.split(";dur=")[1]) for e in response.headers.get("server-timing", "").split(", ")
                                 if e.startswith("load;")), None)
                    with lock:
                        results.append((version, response.status_code, right, seconds, load))

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        run_start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        run_s = time.perf_counter() - run_start
        metrics = httpx.get(url + "/metrics").text
        peak = status_kb(proc.pid, "VmHWM") / 1024
        index = httpx.post(url + "/v2/repository/index", headers={"authorization": f"Bearer {TOKEN}"}).json()
        proc.terminate()
        proc.wait(timeout=60)

    def gauge(name: str, labels: str = "") -> float:
        line = next((line for line in metrics.splitlines() if line.startswith(name + labels + " ")), None)
        return float(line.split()[-1]) if line else 0.0

    own_base = gauge("modelport_memory_base_bytes") / 2**20
    wrong = [r for r in results if not r[2]]
    waited = [r[4] for r in results if r[4] is not None]
    demand = gauge("modelport_model_loads_total", '{model="lite",reason="demand"}')
    load_s = gauge("modelport_model_load_seconds_sum", '{reason="demand"}') / max(1.0, demand)
    evictions = gauge("modelport_model_evictions_total", '{model="lite"}')
    print(f"{VERSIONS} versions, budget {budget:.0f} MB; startup {startup_s:.1f} s with {resident_at_start} resident; "
          f"{len(results)} requests from {args.clients} clients in {run_s:.1f} s")
    print(f"answers: {len(results) - len(wrong)} right, {len(wrong)} wrong "
          f"(statuses {sorted({r[1] for r in results})})")
    print(f"peak RSS {peak:.0f} MB vs base + budget = {base:.0f} + {budget:.0f} = {base + budget:.0f} MB "
          f"({peak - base - budget:+.0f} MB; the server's own base: {own_base:.0f} MB)")
    print(f"hit ratio {1 - len(waited) / len(results):.2f} ({len(waited)} requests waited for a load); "
          f"cold wait p50 {percentile(waited, 50):.0f} ms, p99 {percentile(waited, 99):.0f} ms; "
          f"loads on demand {demand:.0f} (mean {load_s * 1000:.0f} ms each), "
          f"evictions {evictions:.0f}; "
          f"resident at the end {sum(e['resident'] for e in index)}")
    latency = [r[3] * 1000 for r in results]
    print(f"request latency p50 {percentile(latency, 50):.0f} ms, p99 {percentile(latency, 99):.0f} ms")


if __name__ == "__main__":
    main()
