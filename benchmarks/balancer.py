"""Many workers behind `modelport balance`: scaling, the balancer hop, joining and leaving.

    python benchmarks/balancer.py [--seconds 6]

This machine has 2 cores, so scaling is measured with a fixed-cost model: each batch (of one
request) holds its worker's slot for 20 ms without using CPU, so N workers can really give N
times one worker's throughput. Figures, each as a ratio to its limit measured in the same run:

- throughput through the balancer with N = 1, 2, 4, 8 workers / (N x one worker through the
  balancer), at a client concurrency of 4 N (target >= 0.9);
- p50 through HAProxy minus p50 direct to a worker, trivial model, one client (target <= 0.3 ms);
- a new worker's first answer through the balancer after its key appears (target <= 1 s);
- a SIGKILLed worker's key gone after the kill (target <= TTL + 1 s), and the last answer it
  gave through the balancer (none may come after the key is gone).
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
import loadgen  # noqa: E402
from cluster import BalancerProcess, EtcdServer, registry  # noqa: E402
from conftest import make_tiny_bundle  # noqa: E402
from servers import Server, free_port, stop_all, wait_until  # noqa: E402

from modelport.repository.bundle import write_config  # noqa: E402
from modelport.server.cluster import worker_id  # noqa: E402

TTL_S = 3
FIXED_COST_MODEL = '''
import random
import time
import numpy as np
from modelport.runtime import TensorSpec


class Model:
    """Holds its slot for a fixed time per batch without using CPU, like a call to an accelerator;
    with probability SPIKE, ten times as long (a hiccup no worker can predict)."""

    inputs = [TensorSpec("image", "UINT8", (-1, 8, 8, 3))]
    outputs = [TensorSpec("logits", "FP32", (-1, 4))]

    def __init__(self, bundle_dir):
        pass

    def run(self, feeds):
        time.sleep(%(seconds)s * (10 if random.random() < %(spike)s else 1))
        return {"logits": np.zeros((len(feeds["image"]), 4), np.float32)}
'''


def fixed_cost_bundle(directory: Path, seconds: float = 0.020, spike: float = 0.0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.py").write_text(FIXED_COST_MODEL % {"seconds": seconds, "spike": spike})
    (directory / "labels.txt").write_text("a\nb\nc\nd\n")
    write_config(directory, {
        "format": 1, "runtime": "python", "model_file": "model.py",
        "input": {"height": 8, "width": 8, "resize_shorter": 0, "dtype": "uint8", "layout": "NHWC"},
        "output": {"name": "logits", "kind": "logits"},
        "serving": {"max_batch_size": 1, "max_delay_ms": 0, "max_queue_size": 1000},
    })
    return directory


class BenchCluster:
    """What both cluster benchmarks stand on: a scratch directory, a real etcd, a repository with the
    fixed-cost and tiny models (and any others added to ``repo``), and worker processes."""

    def __init__(self, prefix: str, *worker_args: str, zmq: bool = False) -> None:
        self.work = Path(tempfile.mkdtemp(prefix=prefix))
        (self.work / "etcd").mkdir()
        self.etcd = EtcdServer(self.work / "etcd").start()
        self.repo = self.work / "repo"
        fixed_cost_bundle(self.repo / "fixed" / "1")
        make_tiny_bundle(self.repo / "tiny" / "1", size=8)
        self.url = self.etcd.url("bench")
        self.workers: list[Server] = []
        self._args = ("--cluster", self.url, "--drain-s", "1", "--log-level", "warning", *worker_args)
        self._zmq = zmq

    def start_worker(self) -> Server:
        worker = Server(str(self.repo), *self._args, log=self.work / f"w{len(self.workers)}.log",
                        zmq_port=free_port() if self._zmq else None)
        self.workers.append(worker)
        return worker

    def grow_to(self, n: int) -> None:
        """At least ``n`` workers, every one ready and registered."""
        while len(self.workers) < n:
            self.start_worker()
        for w in self.workers:
            w.wait_ready()
        wait_until(lambda: set(registry(self.url)[0]) == {worker_id(w.port) for w in self.workers
                                                          if w.proc.poll() is None}, 30, what="registered")

    def close(self) -> None:
        stop_all(self.workers)
        self.etcd.close()


def infer_request(model: str, datatype: str, shape: list[int]) -> bytes:
    import json

    count = 1
    for d in shape:
        count *= d
    body = json.dumps({"inputs": [{"name": "image", "shape": shape, "datatype": datatype,
                                   "data": [0] * count}]}).encode()
    return loadgen.request_bytes("POST", f"/v2/models/{model}/infer", body, {"Content-Type": "application/json"})


def throughput(port: int, request: bytes, concurrency: int, seconds: float) -> tuple[float, int]:
    # Closed loop for about `seconds`: estimate the count from a short first run.
    probe = loadgen.run(port, [(request, lambda b: True)], concurrency=concurrency, count=concurrency * 5)
    count = max(concurrency * 10, int(probe.throughput * seconds))
    result = loadgen.run(port, [(request, lambda b: True)], concurrency=concurrency, count=count)
    return result.throughput, result.errors + probe.errors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=6, help="per throughput level")
    parser.add_argument("--balancer-args", default="", help="extra `modelport balance` options, e.g. '--threads 1'")
    args = parser.parse_args()
    cluster = BenchCluster("clusterbench", "--lease-ttl-s", str(TTL_S))
    work, url, workers = cluster.work, cluster.url, cluster.workers

    balancer = BalancerProcess(url, work / "balancer.log", *args.balancer_args.split())
    fixed = infer_request("fixed", "UINT8", [1, 8, 8, 3])
    tiny = infer_request("tiny", "FP32", [1, 3, 8, 8])
    try:
        def hop(what: str) -> None:
            """The balancer's own cost: the same worker direct and through HAProxy, alternately."""
            pairs = []
            for _ in range(7):
                through = loadgen.run(balancer.port, [(tiny, lambda b: True)], concurrency=1, count=2000)
                direct = loadgen.run(workers[0].port, [(tiny, lambda b: True)], concurrency=1, count=2000)
                pairs.append((through.p50 - direct.p50, direct.p50, through.p50))
            extra, direct_p50, through_p50 = sorted(pairs)[len(pairs) // 2]
            print(f"balancer hop, {what}: p50 {through_p50 * 1000:.3f} ms through HAProxy - {direct_p50 * 1000:.3f} ms "
                  f"direct = {extra * 1000:.3f} ms = {extra * 1000 / 0.3:.2f} x the 0.3 ms target (median of 7 pairs)",
                  flush=True)

        # -- scaling, and the hop ---------------------------------------------------------------------
        rates = {}
        for n in (1, 2, 4, 8):
            cluster.grow_to(n)
            wanted = {worker_id(w.port) for w in workers}
            wait_until(lambda: {k for k, v in balancer.servers().items() if v.startswith("UP")} == wanted, 30,
                       what=f"{n} workers UP")
            rates[n], errors = throughput(balancer.port, fixed, 4 * n, args.seconds)
            print(f"N={n}: {rates[n]:.0f} req/s through the balancer = {rates[n] / (n * rates[1]):.2f} x N x one "
                  f"worker (target >= 0.9); errors {errors}", flush=True)
            if n == 1:
                hop("one worker behind it")
        hop("8 workers behind it, each request to another one (informative)")

        # -- joining and leaving under load ---------------------------------------------------------
        seen: list[tuple[float, str]] = []
        stop = threading.Event()

        def client() -> None:
            import httpx

            with httpx.Client(base_url=balancer.url, timeout=20) as http:
                while not stop.is_set():
                    reply = http.post("/v2/models/tiny/infer", content=tiny.split(b"\r\n\r\n", 1)[1],
                                      headers={"content-type": "application/json"})
                    seen.append((time.monotonic(), reply.headers.get("x-modelport-worker", "") if reply.status_code
                                 == 200 else f"status {reply.status_code}"))

        threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        joins, leaves, last_answers = [], [], []
        try:
            for _ in range(3):
                new = cluster.start_worker()
                new_id = worker_id(new.port)
                wait_until(lambda: new_id in registry(url)[0], 60, every_s=0.005, what="registration")
                registered = time.monotonic()
                wait_until(lambda: any(w == new_id and t >= registered for t, w in list(seen)), 10, every_s=0.005,
                           what="first answer")
                joins.append(min(t for t, w in list(seen) if w == new_id and t >= registered) - registered)
            for victim in workers[-3:]:
                victim_id = worker_id(victim.port)
                killed = time.monotonic()
                victim.proc.send_signal(signal.SIGKILL)
                wait_until(lambda: victim_id not in registry(url)[0], TTL_S + 5, every_s=0.02, what="key gone")
                gone = time.monotonic()
                leaves.append(gone - killed)
                time.sleep(0.3)
                answered = [t for t, w in list(seen) if w == victim_id]
                last_answers.append((max(answered) - gone) if answered else float("-inf"))
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        failed = [w for _, w in seen if w.startswith("status") or not w]
        print(f"new worker's first answer after registering: {', '.join(f'{j:.3f}' for j in joins)} s; worst "
              f"{max(joins):.3f} s = {max(joins):.2f} x the 1 s target", flush=True)
        print(f"SIGKILLed worker's key gone after: {', '.join(f'{x:.2f}' for x in leaves)} s; worst {max(leaves):.2f} s "
              f"= {max(leaves) / (TTL_S + 1):.2f} x the TTL + 1 s target", flush=True)
        print(f"its last answer relative to its key's removal: {', '.join(f'{x:+.2f}' for x in last_answers)} s "
              f"(negative: nothing after); failed requests during joins and kills: {len(failed)} of {len(seen)}",
              flush=True)
    finally:
        balancer.stop()
        cluster.close()


if __name__ == "__main__":
    main()
