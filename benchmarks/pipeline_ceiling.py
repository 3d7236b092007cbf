"""Issue 13 part 4: the fp32 server against its pipeline ceiling, and where it loses.

    python benchmarks/pipeline_ceiling.py [--rounds 5] [--count 300]     # servers, interleaved
    python benchmarks/pipeline_ceiling.py --probe [--seconds 4]           # in-process arrangements

Servers: `modelport serve` with the default model as it starts by default, and with
`--concurrent-batches 1` (one batch at a time, every core: the arrangement before batches side by
side), both up at once. Each round runs a closed-loop window of ``--count`` upload requests at 8
and at 32 concurrent clients against each server in turn, and 60 requests at 1, and measures the
pipeline ceiling (``http_server.pipeline_ceiling``: ONNX Runtime alone on decoded crops at its best
batch size, plus the server's decode on the core time it leaves) between every two windows. The
machine's speed drifts by tens of percent within minutes, so every window is divided by the mean of
the ceilings measured just before and just after it, and the figure is the median over rounds.
Peak RSS of each server at the end.

Probe: in one process, no HTTP, a bounded queue between decoding threads (nice +10, as in the
server) and inference, for a few seconds each:
  a. one session on every core, alone (no decoding);
  b. a, fed by the decoding threads (the server with one batch at a time);
  c. one session of one thread, two batches at once, fed by the decoding threads (thin batches);
  d. two sessions of one thread each, fed by the decoding threads.
Images per second through inference, as ratios to (a), and the pipeline ceiling for comparison.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import loadgen  # noqa: E402
from common import peak_rss_mb, photo_files  # noqa: E402
from http_server import free_port, multipart, pipeline_ceiling, start_server  # noqa: E402

from modelport.packaged import default_model  # noqa: E402
from modelport.engine.imaging import lower_priority  # noqa: E402
from modelport.engine.model import Model  # noqa: E402

SERVERS = {"default": [], "one batch at a time": ["--concurrent-batches", "1"]}


def servers(args, bundle: Path, datas: list[bytes], tmp: Path) -> None:
    requests = []
    for data in datas:
        body, content_type = multipart(data)
        requests.append((loadgen.request_bytes("POST", "/?k=1", body, {"Content-Type": content_type}),
                         lambda b: b.startswith(b'[["')))
    running = {}
    try:
        for name, extra in SERVERS.items():
            port = free_port()
            running[name] = (start_server(extra, port, tmp / f"{len(running)}.log")[0], port)
            loadgen.run(port, requests, concurrency=4, count=48)  # warm every thread and connection path
        model = Model.load(bundle)
        ratios = {name: {8: [], 32: []} for name in running}
        p50 = {name: [] for name in running}
        ceilings = []
        ceiling = pipeline_ceiling(model, datas)["images_per_s"]
        for round_ in range(args.rounds):
            line = []
            for name, (_, port) in running.items():
                for c in (8, 32):
                    # Each window between two measurements of the ceiling, against their mean.
                    before = ceiling
                    result = loadgen.run(port, requests, concurrency=c, count=args.count)
                    if result.errors or result.wrong:
                        raise SystemExit(f"{name}: {result.errors} errors, {result.wrong} wrong answers at C={c}")
                    ceiling = pipeline_ceiling(model, datas)["images_per_s"]
                    ceilings.append(ceiling)
                    ratios[name][c].append(result.throughput / ((before + ceiling) / 2))
                p50[name].append(loadgen.run(port, requests, concurrency=1, count=60).p50)
                line.append(f"{name}: {ratios[name][8][-1]:.2f} / {ratios[name][32][-1]:.2f}")
            print(f"round {round_ + 1}: ceiling {min(ceilings[-4:]):6.1f}-{max(ceilings[-4:]):6.1f} img/s   "
                  f"C=8 / C=32 over it: " + "   ".join(line), flush=True)
        rss = {name: peak_rss_mb(proc.pid) for name, (proc, _) in running.items()}
    finally:
        for proc, _ in running.values():
            proc.terminate()
            proc.wait(timeout=60)
    print(f"\n{os.cpu_count()} cores; pipeline ceiling {min(ceilings):.1f}-{max(ceilings):.1f} img/s over "
          f"{args.rounds} rounds; {args.count} requests per window; medians over rounds")
    for name in running:
        c8, c32 = statistics.median(ratios[name][8]), statistics.median(ratios[name][32])
        print(f"  {name:20s} C=8 {c8:.2f}   C=32 {c32:.2f}"
              f" x the ceiling (target >= 0.9)   C=1 p50 {statistics.median(p50[name]) * 1000:5.1f} ms"
              f"   peak RSS {rss[name]:.0f} MB")


def probe(args, bundle: Path, datas: list[bytes]) -> None:
    full = Model.load(bundle)
    thin = Model.load(bundle, threads=1)
    thins = [thin, Model.load(bundle, threads=1)]
    crops = np.stack([full.decode(d) for d in datas[: args.batch]])
    for m in (full, *thins):
        m.predict(crops)

    def alone(model) -> float:
        done, end = 0, time.perf_counter() + args.seconds
        while time.perf_counter() < end:
            model.predict(crops)
            done += len(crops)
        return done / args.seconds

    results = collections.defaultdict(list)
    for _ in range(args.rounds):
        a = alone(full)
        results["a. one session, every core, alone"].append(a)
        for name, models in (("b. a, fed by decoding threads", [full]),
                             ("c. one 1-thread session, 2 batches at once, fed", [thin, thin]),
                             ("d. two 1-thread sessions, fed", thins)):
            results[name].append(fed(models, datas, args.batch, args.seconds) / a)
        ceiling = pipeline_ceiling(full, datas)["images_per_s"]
        results["pipeline ceiling (as http_server.py)"].append(ceiling / a)
    print(f"{os.cpu_count()} cores, default model, batch {args.batch}, {args.seconds:g} s each, {args.rounds} rounds "
          f"(per round: a in img/s, the others / a)")
    for name, values in results.items():
        print(f"  {name:48s} " + "  ".join(f"{v:6.2f}" for v in values))


def fed(models, datas: list[bytes], batch: int, seconds: float, decoders: int = 2, depth: int = 16) -> float:
    """Images/s through ``models`` (one thread each) fed by decoding threads through a bounded queue."""
    cond = threading.Condition()
    queue: collections.deque = collections.deque()
    state = {"stop": False, "next": 0, "done": 0}

    def decode():
        lower_priority()
        while True:
            with cond:
                while len(queue) >= depth and not state["stop"]:
                    cond.wait(0.05)
                if state["stop"]:
                    return
                index = state["next"]
                state["next"] += 1
            crop = models[0].decode(datas[index % len(datas)])
            with cond:
                queue.append(crop)
                cond.notify_all()

    def infer(model):
        while True:
            with cond:
                while len(queue) < batch and not state["stop"]:
                    cond.wait(0.05)
                if state["stop"]:
                    return
                crops = [queue.popleft() for _ in range(batch)]
                cond.notify_all()
            model.predict(np.stack(crops))
            with cond:
                state["done"] += batch

    threads = [threading.Thread(target=decode) for _ in range(decoders)]
    threads += [threading.Thread(target=infer, args=(m,)) for m in models]
    for t in threads:
        t.start()
    time.sleep(0.5)
    start = state["done"]
    time.sleep(seconds)
    done = state["done"] - start
    with cond:
        state["stop"] = True
        cond.notify_all()
    for t in threads:
        t.join()
    return done / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--probe", action="store_true", help="the in-process arrangements instead of the servers")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=300, help="requests per window (servers)")
    parser.add_argument("--seconds", type=float, default=4, help="seconds per arrangement (probe)")
    parser.add_argument("--batch", type=int, default=4, help="batch size (probe): a thin batch's rows")
    args = parser.parse_args()
    bundle = default_model.ensure_default_model()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        datas = [p.read_bytes() for p in photo_files(tmp / "photos")]
        if args.probe:
            probe(args, bundle, datas)
        else:
            servers(args, bundle, datas, tmp)


if __name__ == "__main__":
    main()
