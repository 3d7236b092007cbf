"""Issue 13 part 4, the probe: where the fp32 server loses against its pipeline ceiling.

    python benchmarks/pipeline_ceiling.py [--seconds 5]

In one process, no HTTP: the default model's ONNX Runtime work and the server's decode, arranged the
ways a server could arrange them on this machine's cores, each for a few seconds:
  a. one session, all cores (the server today), alone;
  b. the same while one thread decodes photos beside it, as many as inference has taken (what a
     busy server does: every image is decoded once);
  c. one session per core, each with one thread, batches in parallel;
  d. c with the decoding thread of b.
Images per second through inference for each (decode keeps pace with it). Ratios are to (a).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import photo_files  # noqa: E402

from modelport import default_model  # noqa: E402
from modelport.model import Model  # noqa: E402


def run_for(seconds: float, workers: list, paced_last: bool = False) -> list[int]:
    """Run each worker (a function doing one unit, returning images done) in its own thread; with
    ``paced_last`` the last one (decode) does no more than the others have inferred."""
    stop = threading.Event()
    counts = [0] * len(workers)

    def loop(i, work):
        while not stop.is_set():
            if paced_last and i == len(workers) - 1 and counts[i] >= sum(counts[:-1]):
                time.sleep(0.0005)
                continue
            counts[i] += work()

    threads = [threading.Thread(target=loop, args=(i, w)) for i, w in enumerate(workers)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    bundle = default_model.ensure_default_model()
    with tempfile.TemporaryDirectory() as tmp:
        datas = [p.read_bytes() for p in photo_files(Path(tmp) / "photos")]
    shared = Model.load(bundle)
    crops = np.stack([shared.decode(d) for d in datas[: args.batch]])
    singles = [Model.load(bundle, threads=1) for _ in range(cores)]
    for m in (shared, *singles):
        m.predict(crops)

    def infer(model):
        def work():
            model.predict(crops)
            return len(crops)
        return work

    position = [0]

    def decode():
        data = datas[position[0] % len(datas)]
        position[0] += 1
        shared.decode(data)
        return 1

    s = args.seconds
    rows = {}
    rows["a. one session, all cores"] = (run_for(s, [infer(shared)])[0] / s, None)
    counts = run_for(s, [infer(shared), decode], paced_last=True)
    rows["b. a + decoding what it infers"] = (counts[0] / s, counts[1] / s)
    counts = run_for(s, [infer(m) for m in singles])
    rows[f"c. {cores} sessions x 1 thread, in parallel"] = (sum(counts) / s, None)
    counts = run_for(s, [*(infer(m) for m in singles), decode], paced_last=True)
    rows["d. c + decoding what it infers"] = (sum(counts[:-1]) / s, counts[-1] / s)
    base = rows["a. one session, all cores"][0]
    print(f"{cores} cores, default model, batch {args.batch}, {s:g} s each")
    for name, (inferred, decoded) in rows.items():
        pipeline = inferred if decoded is None else min(inferred, decoded)
        print(f"  {name:42s} inference {inferred:6.1f} img/s ({inferred / base:.2f} x a)"
              + ("" if decoded is None else f"   decode {decoded:6.1f} img/s   pipeline <= {pipeline:6.1f} img/s "
                 f"({pipeline / base:.2f} x a)"))


if __name__ == "__main__":
    main()
