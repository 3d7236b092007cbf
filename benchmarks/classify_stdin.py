"""Issue 2's figures: `modelport classify --stdin` and one-shot classify against the naive limit.

    python benchmarks/classify_stdin.py [--images 400]

Prints every figure as a ratio to L (or to its target) measured in this same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import NaiveLimit, peak_rss_mb, photo_files  # noqa: E402

from modelport.packaged import default_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    bundle = default_model.ensure_default_model()
    with tempfile.TemporaryDirectory() as tmp:
        files = photo_files(Path(tmp) / "photos")
        paths = [files[i % len(files)] for i in range(args.images)]
        datas = [p.read_bytes() for p in paths]

        naive = NaiveLimit(bundle)
        naive.throughput(datas[:16])  # warm caches
        limit, naive_top1 = naive.throughput(datas)
        limit_lat = naive.latency_s(datas[:48])

        ceiling = naive.ort_ceiling(datas)

        stdin = "".join(f"{p}\n" for p in paths)
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "modelport", "classify", "--stdin",
                                 "--batch-size", str(args.batch_size)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        # Write from a thread so that the child's output is read while it runs (no pipe deadlock);
        # the last answer is read before the child exits, which is when its peak RSS is known.
        writer = threading.Thread(target=lambda: (proc.stdin.write(stdin), proc.stdin.close()))
        writer.start()
        lines = [proc.stdout.readline() for _ in paths]
        elapsed = time.perf_counter() - start
        rss_mb = peak_rss_mb(proc.pid)
        assert proc.wait() == 0
        writer.join()
        out = [json.loads(line) for line in lines]
        assert [o["path"] for o in out] == [str(p) for p in paths]
        top1 = [o["predictions"][0]["index"] for o in out]
        agree = sum(a == b for a, b in zip(top1, naive_top1)) / len(top1)
        stdin_rate = len(paths) / elapsed

        one_shot = []
        for _ in range(5):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "modelport", "classify", str(files[0])], check=True,
                           capture_output=True)
            one_shot.append(time.perf_counter() - start)

    print(f"machine: {os.cpu_count()} cores; {len(paths)} images ({len(files)} distinct JPEGs, 200-640 px)")
    print(f"L (naive limit, batch 8)          {limit:8.1f} img/s")
    print(f"L_lat (naive, batch 1, median)    {limit_lat * 1000:8.2f} ms")
    print(f"classify --stdin (start+load+run) {stdin_rate:8.1f} img/s  = {stdin_rate / limit:.2f} x L   (target >= 1.30)")
    print(f"ORT alone on decoded crops        {ceiling:8.1f} img/s  = {ceiling / limit:.2f} x L   (no front-end can pass this)")
    print(f"classify --stdin / ORT-alone      {stdin_rate / ceiling:8.2f}")
    print(f"top-1 agreement with naive        {agree * 100:8.1f} %")
    print(f"one-shot classify, median of 5    {statistics.median(one_shot):8.2f} s    = "
          f"{statistics.median(one_shot) / 1.5:.2f} x the 1.5 s target")
    print(f"peak RSS of the stdin process     {rss_mb:8.0f} MB   = {rss_mb / 250:.2f} x the 250 MB target")


if __name__ == "__main__":
    main()
