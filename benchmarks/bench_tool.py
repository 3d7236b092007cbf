"""Is `modelport bench` itself ever the bottleneck? Its own figures against a trivial model.

    python benchmarks/bench_tool.py [--seconds 5]

A server with the tiny 8x8 model (sub-millisecond per request). Figures:
- one bench process, closed loop at 16 in flight, against two running at once: the two together /
  the one alone (target <= 1.1: if two generators get much more than one, one was the limit);
- open loop at a rate well under the server's capacity: the schedule error's p99 (how late
  requests left against their plan; target well under 1 ms when it keeps up).
Run on the same 2 cores as the server, as a user on one machine would; the figures say how much
a generator on the server's own machine costs it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from conftest import make_tiny_bundle  # noqa: E402
from servers import Server  # noqa: E402

from modelport import samples  # noqa: E402


def bench(url: str, images: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "modelport", "bench", url, "--images", str(images), "--model",
                             "tiny", "--json", "-", *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def level(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=300)
    return json.loads(out)["levels"][0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_tiny_bundle(tmp / "repo" / "tiny" / "1", size=8)
        (tmp / "images").mkdir()
        (tmp / "images" / "pixel.png").write_bytes(samples.jpeg(np.zeros((8, 8, 3), np.uint8)))
        server = Server(str(tmp / "repo"), log=tmp / "server.log").wait_ready()
        try:
            closed = ("--concurrency", "16", "--duration", str(args.seconds))
            one = level(bench(server.url, tmp / "images", *closed))["throughput_per_s"]
            pair = [bench(server.url, tmp / "images", *closed) for _ in range(2)]
            two = sum(level(p)["throughput_per_s"] for p in pair)
            rate = max(50.0, round(one * 0.3))
            open_level = level(bench(server.url, tmp / "images", "--rate", str(rate), "--duration",
                                     str(args.seconds)))
        finally:
            server.stop()
    print(f"closed loop, 16 in flight: one bench {one:.0f} req/s, two at once {two:.0f} req/s together = "
          f"{two / one:.2f} x one (target <= 1.1)")
    lag = open_level["schedule_error_ms"]
    print(f"open loop at {rate:g} req/s (0.3 x that): schedule error p50 {lag['p50']:.3f} ms, p99 {lag['p99']:.3f} ms, "
          f"max {lag['max']:.3f} ms; p50 latency {open_level['latency_ms']['p50']:.2f} ms")


if __name__ == "__main__":
    main()
