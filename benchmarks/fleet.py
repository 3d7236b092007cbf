"""The fleet at scale, for real (issue 27): 50 worker processes, one balancer, 20 discovery clients.

    python benchmarks/fleet.py [--workers 50] [--clients 20] [--client-processes 4] [--in-flight 2]
                               [--steady-s 60] [--restart-batch 5] [--worker-slo-ms MS] [--json fleet.json]

Everything real on this machine: etcd, ``modelport balance`` with its HAProxy, ``modelport serve``
workers (a fixed-cost model: a request holds its worker 100 ms without CPU, like a call to an
accelerator, so that 50 workers fit 2 cores; 4 % of them 5 x slower), discovery clients
(``AsyncClient("etcd://...")``, closed loop, ``--in-flight`` each) in a few processes, and one client
through HAProxy. Phases, in one run:

1. steady load for ``--steady-s``: the etcd events each watcher receives per second (``etcdctl
   watch`` on the prefix: a watcher gets every event), etcd's and HAProxy's CPU, the discovery
   clients' throughput and latency (written with ``--json`` for ``fleet_sim.py --validate``);
2. 5 workers join, one at a time, then leave (SIGTERM: draining, then the key goes): how long after
   the key changed (as a watcher of our own sees it) every client's member list and HAProxy's
   servers show it, p50 / p99 / max;
3. a rolling restart of every worker under load, ``--restart-batch`` at a time (each replaced by a
   new process, the next batch once the new ones are registered): failed requests, on both paths.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from balancer import fixed_cost_bundle  # noqa: E402
from cluster import BalancerProcess, EtcdServer, registry  # noqa: E402
from servers import Server, stop_all, wait_until  # noqa: E402

from modelport.cluster.members import ClusterURL  # noqa: E402
from modelport.server.cluster import worker_id  # noqa: E402

PIXELS = np.zeros((1, 8, 8, 3), np.uint8)
SERVICE_S, SLOW_FACTOR, SLOW_SHARE = 0.100, 5, 0.04


# -- the clients (run as their own processes: ``fleet.py --client ...``) -------------------------

async def discovery_clients(url: str, clients: int, in_flight: int, stop_file: Path) -> dict:
    """``clients`` discovery clients, each ``in_flight`` requests at a time, until ``stop_file``
    appears. Every request (start, latency, error) and every change each client's member list saw."""
    from modelport import AsyncClient

    requests: list[tuple[float, float, str]] = []
    seen: list[tuple[float, int, str, str]] = []  # (time, client, member id, "join" / "leave")

    async def one_client(index: int) -> None:
        async with AsyncClient(url, model="fixed", timeout_s=30) as client:
            await client.discovery.start()
            directory = client.discovery.directory
            ready = {m.id for m in directory.members.values() if m.state == "ready"}
            follow = directory._on_change  # the benchmark listens in beside discovery's own follower

            def changed(members) -> None:
                now, serving = time.time(), {m.id for m in members.values() if m.state == "ready"}
                seen.extend((now, index, m, "join") for m in serving - ready)
                seen.extend((now, index, m, "leave") for m in ready - serving)  # draining or gone
                ready.clear()
                ready.update(serving)
                follow(members)

            directory._on_change = changed

            async def loop() -> None:
                while not stop_file.exists():
                    start = time.time()
                    try:
                        await client.infer("fixed", {"image": PIXELS})
                        requests.append((start, time.time() - start, ""))
                    except Exception as exc:  # counted, never hidden
                        requests.append((start, time.time() - start, f"{type(exc).__name__}: {exc}"[:200]))

            await asyncio.gather(*(loop() for _ in range(in_flight)))

    await asyncio.gather(*(one_client(i) for i in range(clients)))
    return {"requests": requests, "seen": seen}


async def balancer_client(url: str, in_flight: int, stop_file: Path) -> dict:
    """The same load through ``modelport balance`` (HAProxy), one request at a time per slot."""
    import aiohttp

    body = json.dumps({"inputs": [{"name": "image", "shape": [1, 8, 8, 3], "datatype": "UINT8",
                                   "data": PIXELS.ravel().tolist()}]})
    requests: list[tuple[float, float, str]] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async def loop() -> None:
            while not stop_file.exists():
                start = time.time()
                try:
                    async with session.post(url + "/v2/models/fixed/infer", data=body) as response:
                        await response.read()
                        error = "" if response.status == 200 else f"HTTP {response.status}"
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"[:200]
                requests.append((start, time.time() - start, error))

        await asyncio.gather(*(loop() for _ in range(in_flight)))
    return {"requests": requests, "seen": []}


# -- what the orchestrator watches ---------------------------------------------------------------

class Watch:
    """``etcdctl watch --prefix``: every event on the members' prefix, with the time it arrived."""

    def __init__(self, url: str) -> None:
        cluster = ClusterURL.parse(url)
        self.events: list[tuple[float, str, str, str]] = []  # (time, "PUT" / "DELETE", member id, value)
        self._prefix = cluster.prefix
        self.proc = subprocess.Popen(["etcdctl", f"--endpoints=http://{cluster.host}:{cluster.port}", "watch",
                                      "--prefix", cluster.prefix], stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        kind = key = None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            if line in ("PUT", "DELETE") and key is None:
                kind = line
            elif kind is not None and key is None and line.startswith(self._prefix):
                key, arrived = line[len(self._prefix):], time.time()
                if kind == "DELETE":
                    self.events.append((arrived, kind, key, ""))
                    kind = key = None
            elif key is not None:  # a PUT's value
                self.events.append((arrived, kind, key, line))
                kind = key = None

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)

    def joins(self, start: float, end: float) -> list[tuple[float, str]]:
        """Keys written for the first time within the window."""
        first: dict[str, float] = {}
        for t, kind, member, _ in self.events:
            if kind == "PUT":
                first.setdefault(member, t)
        return [(t, m) for m, t in first.items() if start <= t <= end]

    def leaves(self, start: float, end: float) -> list[tuple[float, str]]:
        """A worker's first sign of leaving within the window: "draining" written, or its key gone."""
        first: dict[str, float] = {}
        for t, kind, member, value in self.events:
            if start <= t <= end and (kind == "DELETE" or '"state":"draining"' in value):
                first.setdefault(member, t)
        return [(t, m) for m, t in first.items()]


class HAProxyServers:
    """HAProxy's servers, read from its stats page every 20 ms: when each appeared UP and left."""

    def __init__(self, balancer: BalancerProcess) -> None:
        self.changes: list[tuple[float, str, str]] = []  # (time, server, "join" / "leave")
        self._balancer, self._stop = balancer, threading.Event()
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self) -> None:
        up: set[str] = set()
        with httpx.Client(timeout=2) as http:
            while not self._stop.wait(0.02):
                text = http.get(f"http://127.0.0.1:{self._balancer.stats_port}/;csv").text.lstrip("# ")
                now_up = {row["svname"] for row in csv.DictReader(io.StringIO(text))
                          if row["pxname"] == "workers" and row["svname"] not in ("BACKEND", "FRONTEND")
                          and row["status"].startswith("UP")}
                now = time.time()
                self.changes += [(now, s, "join") for s in now_up - up] + [(now, s, "leave") for s in up - now_up]
                up = now_up

    def stop(self) -> None:
        self._stop.set()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def descendants(root: int, name: str) -> list[int]:
    """The processes called ``name`` under ``root`` (HAProxy runs a master and a worker)."""
    parents: dict[int, tuple[int, str]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        parents[int(stat.parent.name)] = (int(text.rsplit(")", 1)[1].split()[1]), text[text.index("(") + 1:text.rindex(")")])
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, (parent, _) in parents.items() if parent in frontier]
        found += [pid for pid in children if parents[pid][1] == name]
        frontier = children
    return found


def quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0}
    return {"n": len(ordered), "p50": ordered[len(ordered) // 2], "p99": ordered[int(0.99 * (len(ordered) - 1))],
            "max": ordered[-1]}


# -- the run ------------------------------------------------------------------------------------

class Fleet:
    def __init__(self, work: Path, workers: int, slo_ms: float | None) -> None:
        self.work = work
        self.options = ("--latency-slo-ms", str(slo_ms)) if slo_ms else ()
        (work / "etcd").mkdir()
        self.etcd = EtcdServer(work / "etcd").start()
        self.url = self.etcd.url("fleet")
        fixed_cost_bundle(work / "normal" / "fixed" / "1", SERVICE_S)
        fixed_cost_bundle(work / "slow" / "fixed" / "1", SERVICE_S * SLOW_FACTOR)
        self.slow = max(1, round(SLOW_SHARE * workers))
        self.workers: list[Server] = []
        self.started = 0

    def start(self, slow: bool = False) -> Server:
        self.started += 1
        worker = Server(str(self.work / ("slow" if slow else "normal")), "--cluster", self.url, "--drain-s", "1",
                        "--lease-ttl-s", "3", "--log-level", "warning", *self.options, log=self.work / f"w{self.started}.log")
        worker.slow = slow
        self.workers.append(worker)
        return worker

    def wait_registered(self, workers: list[Server], timeout_s: float = 180) -> None:
        for worker in workers:
            worker.wait_ready(timeout_s)
        wanted = {worker_id(w.port) for w in workers}
        wait_until(lambda: wanted <= set(registry(self.url)[0]), timeout_s, what="registered")

    def stop(self, worker: Server) -> None:
        worker.proc.send_signal(signal.SIGTERM)

    def close(self) -> None:
        stop_all(self.workers)
        self.etcd.close()


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="modelport-fleet-"))
    fleet = Fleet(work, args.workers, args.worker_slo_ms)
    processes: list[tuple[subprocess.Popen, Path]] = []
    balancer = watch = None
    try:
        began = time.monotonic()
        initial = [fleet.start(slow=i < fleet.slow) for i in range(args.workers)]
        fleet.wait_registered(initial)
        print(f"{args.workers} workers ({fleet.slow} at {SLOW_FACTOR} x) ready and registered in "
              f"{time.monotonic() - began:.0f} s", flush=True)
        balancer = BalancerProcess(fleet.url, work / "balancer.log")
        wait_until(lambda: len(balancer.servers()) == args.workers, 30, what="HAProxy has every worker")
        haproxy_pids = descendants(balancer.proc.pid, "haproxy")
        watch, haproxy = Watch(fleet.url), HAProxyServers(balancer)
        stop_file = work / "stop"
        per_process = -(-args.clients // args.client_processes)
        for i in range(args.client_processes):
            count = min(per_process, args.clients - i * per_process)
            out = work / f"clients{i}.json"
            processes.append((subprocess.Popen([sys.executable, __file__, "--client", "discovery", "--url", fleet.url,
                                                "--clients", str(count), "--in-flight", str(args.in_flight),
                                                "--stop-file", str(stop_file), "--out", str(out)]), out))
        out = work / "haproxy-client.json"
        processes.append((subprocess.Popen([sys.executable, __file__, "--client", "balancer", "--url", balancer.url,
                                            "--in-flight", str(args.in_flight * 2), "--stop-file", str(stop_file),
                                            "--out", str(out)]), out))
        time.sleep(10)  # warm: every client has listed the members and seen every worker answer

        steady = (time.time(), cpu_seconds(fleet.etcd.proc.pid), sum(map(cpu_seconds, haproxy_pids)))
        time.sleep(args.steady_s)
        steady_end = (time.time(), cpu_seconds(fleet.etcd.proc.pid), sum(map(cpu_seconds, haproxy_pids)))
        print(f"steady window of {args.steady_s} s done", flush=True)

        churn = time.time()
        joined = []
        for _ in range(5):
            worker = fleet.start()
            fleet.wait_registered([worker])
            joined.append(worker)
            time.sleep(2)
        for worker in joined:
            fleet.stop(worker)
            worker.proc.wait(30)
            time.sleep(2)
        churn_end = time.time()
        print("5 joins and 5 leaves done", flush=True)

        restart = time.time()
        serving = [w for w in fleet.workers if w.proc.poll() is None]
        for first in range(0, len(serving), args.restart_batch):
            batch = serving[first:first + args.restart_batch]
            for worker in batch:
                fleet.stop(worker)
            fresh = [fleet.start(slow=w.slow) for w in batch]
            fleet.wait_registered(fresh)
            for worker in batch:
                worker.proc.wait(30)
        restart_end = time.time()
        print(f"rolling restart of {len(serving)} workers done in {restart_end - restart:.0f} s", flush=True)
        time.sleep(3)
        stop_file.touch()
        results = []
        for proc, out in processes:
            proc.wait(60)
            results.append(json.loads(out.read_text()))
        haproxy.stop()
        return analyse(args, fleet, watch, haproxy, results, steady, steady_end, (churn, churn_end),
                       (restart, restart_end))
    finally:
        (work / "stop").touch()
        for proc, _ in processes:
            if proc.poll() is None:
                proc.kill()
        if watch is not None:
            watch.close()
        if balancer is not None:
            balancer.stop()
        fleet.close()


def analyse(args, fleet, watch, haproxy, results, steady, steady_end, churn, restart) -> dict:
    discovery = [r for part in results[:-1] for r in part["requests"]]
    through_haproxy = results[-1]["requests"]
    window_s = steady_end[0] - steady[0]
    in_steady = [r for r in discovery if steady[0] <= r[0] and r[0] + r[1] <= steady_end[0]]
    events_in_steady = [e for e in watch.events if steady[0] <= e[0] <= steady_end[0]]

    observed = [(t, (p, c), m, what) for p, part in enumerate(results[:-1]) for t, c, m, what in part["seen"]]
    clients = sorted({who for _, who, _, _ in observed})
    observed += [(t, "haproxy", server, what) for t, server, what in haproxy.changes]

    def delays(events: list[tuple[float, str]], what: str, observers) -> list[float]:
        """For each key change and each observer: how long until the observer showed it."""
        out = []
        for t0, member in events:
            for observer in observers:
                times = [t for t, who, m, w in observed if who == observer and m == member and w == what and t >= t0 - 1]
                out.append(min(times) - t0 if times else float("inf"))
        return out

    def failed(requests, window) -> tuple[int, int, list[str]]:
        inside = [r for r in requests if window[0] <= r[0] <= window[1]]
        errors = [r[2] for r in inside if r[2]]
        return len(inside), len(errors), sorted(set(errors))[:5]

    latencies = [r[1] for r in in_steady if not r[2]]
    q = quantiles(latencies)
    figures = {
        "cpu": "2 cores, " + " ".join(sorted(set(open("/proc/cpuinfo").read().split()) & {"avx2", "avx512_vnni", "amx_bf16"})),
        "workers": args.workers, "slow_workers": fleet.slow, "clients": args.clients,
        "in_flight_per_client": args.in_flight, "cores": os.cpu_count(),
        "service_ms_mean": SERVICE_S * 1000, "service_ms_cv": 0.02, "slow_factor": SLOW_FACTOR,
        "shared_cores": False,  # the fixed-cost model holds a worker without CPU: independent servers
        "steady_s": round(window_s, 1),
        "etcd_events": len(events_in_steady),
        "etcd_events_per_watcher_per_s": len(events_in_steady) / window_s,
        "etcd_cpu_share": (steady_end[1] - steady[1]) / window_s,
        "haproxy_cpu_share": (steady_end[2] - steady[2]) / window_s,
        "throughput_rps": len(in_steady) / window_s,
        "p50_ms": q.get("p50", 0) * 1000, "p99_ms": q.get("p99", 0) * 1000,
        "client_overhead_ms": q.get("p50", 0) * 1000 - SERVICE_S * 1000,
        "steady_failed": sum(1 for r in in_steady if r[2]),
        "join_seen_by_clients_s": quantiles(delays(watch.joins(*churn), "join", clients)),
        "leave_seen_by_clients_s": quantiles(delays(watch.leaves(*churn), "leave", clients)),
        "join_seen_by_haproxy_s": quantiles(delays(watch.joins(*churn), "join", ["haproxy"])),
        "leave_seen_by_haproxy_s": quantiles(delays(watch.leaves(*churn), "leave", ["haproxy"])),
        "policy": "p2c-ewma", "slo_ms": args.worker_slo_ms,
    }
    for name, requests in (("discovery", discovery), ("haproxy", through_haproxy)):
        count, errors, kinds = failed(requests, restart)
        figures[f"restart_{name}"] = {"requests": count, "failed": errors, "errors": kinds}
    figures["restart_s"] = round(restart[1] - restart[0], 1)
    return figures


def report(f: dict) -> None:
    slo = f", workers' latency SLO {f['slo_ms']:g} ms" if f.get("slo_ms") else ""
    print(f"\n{f['workers']} workers ({f['slow_workers']} at {f['slow_factor']} x){slo}, {f['clients']} discovery clients x "
          f"{f['in_flight_per_client']} in flight, CPU {f['cpu']}")
    print(f"steady {f['steady_s']} s: {f['throughput_rps']:.0f} req/s, p50 {f['p50_ms']:.1f} ms, p99 {f['p99_ms']:.1f} ms "
          f"({f['steady_failed']} failed); etcd events per watcher per second {f['etcd_events_per_watcher_per_s']:.3f} "
          f"({f['etcd_events']} events; the old design: up to 1 per worker per second = {f['workers']}); "
          f"CPU share of one core: etcd {f['etcd_cpu_share']:.3f}, HAProxy {f['haproxy_cpu_share']:.3f}")
    for what in ("join_seen_by_clients_s", "leave_seen_by_clients_s", "join_seen_by_haproxy_s", "leave_seen_by_haproxy_s"):
        q = f[what]
        if q.get("n"):
            print(f"{what}: n={q['n']} p50 {q['p50'] * 1000:.0f} ms, p99 {q['p99'] * 1000:.0f} ms, "
                  f"max {q['max'] * 1000:.0f} ms (bar: p99 <= 1 s: {'met' if q['p99'] <= 1 else 'MISSED'})")
        else:
            print(f"{what}: no observations")
    for name in ("discovery", "haproxy"):
        r = f[f"restart_{name}"]
        print(f"rolling restart ({f['restart_s']} s), {name}: {r['failed']} of {r['requests']} failed {r['errors']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--client-processes", type=int, default=4)
    parser.add_argument("--in-flight", type=int, default=2, help="requests each discovery client keeps in flight")
    parser.add_argument("--steady-s", type=float, default=60)
    parser.add_argument("--restart-batch", type=int, default=5)
    parser.add_argument("--worker-slo-ms", type=float, default=None,
                        help="start the workers with --latency-slo-ms: they refuse (503) what would miss it, and "
                             "discovery retries elsewhere")
    parser.add_argument("--json", type=Path, help="write the figures here (fleet_sim.py --validate reads it)")
    parser.add_argument("--client", choices=["discovery", "balancer"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--stop-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client == "discovery":
        args.out.write_text(json.dumps(asyncio.run(discovery_clients(args.url, args.clients, args.in_flight,
                                                                     args.stop_file))))
        return
    if args.client == "balancer":
        args.out.write_text(json.dumps(asyncio.run(balancer_client(args.url, args.in_flight, args.stop_file))))
        return
    figures = run(args)
    report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
