"""INT8 against fp32 in one process: the default model and `modelport optimize`'s version of it.

    python benchmarks/optimize.py [--int8 PATH] [--rounds 5]

Without --int8, builds one (`modelport build-model efficientnet-lite0 --int8 --min-top5 0.95`
into a temporary directory; see BENCHMARKS.md for why 0.95 on CPUs without VNNI). Measures,
interleaved (fp32, int8, fp32, ...), best of --rounds: throughput at batch 8 on real crops, and
the median batch-1 latency. Figures: int8/fp32 throughput at batch 8 (target >= 1.8) and int8/fp32
batch-1 latency (target <= 0.55). Prints the CPU and whether it has AVX-512 VNNI.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from modelport import samples

from modelport.packaged import default_model
from modelport.engine.model import Model


def throughput(model: Model, crops: np.ndarray, batch: int = 8) -> float:
    start = time.perf_counter()
    for i in range(0, len(crops), batch):
        model.run_crops(crops[i:i + batch], [model.output.name])
    return len(crops) / (time.perf_counter() - start)


def latency_s(model: Model, crops: np.ndarray) -> float:
    times = []
    for crop in crops:
        start = time.perf_counter()
        model.run_crops(crop[None], [model.output.name])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--int8", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    info = open("/proc/cpuinfo").read()
    cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    print(f"CPU: {cpu}; AVX-512 VNNI: {'yes' if 'avx512_vnni' in info else 'no'}; "
          f"AVX-512F: {'yes' if 'avx512f' in info else 'no'}; AVX2: {'yes' if 'avx2' in info else 'no'}")
    with tempfile.TemporaryDirectory() as tmp:
        int8_path = args.int8
        if int8_path is None:
            subprocess.run([sys.executable, "-m", "modelport", "build-model", "efficientnet-lite0", "--int8",
                            "--output", tmp, "--min-top5", "0.95"], check=True, stdout=subprocess.DEVNULL)
            int8_path = Path(tmp) / "efficientnet-lite0-int8" / "1"
        fp32, int8 = Model.load(default_model.ensure_default_model()), Model.load(int8_path)
        crops = np.stack([fp32.decode(d) for d in samples.photo_set(96, seed=7, objects=True)])
        rates, latencies = {"fp32": [], "int8": []}, {"fp32": [], "int8": []}
        for _ in range(args.rounds):
            for name, model in (("fp32", fp32), ("int8", int8)):
                throughput(model, crops[:16])  # warm
                rates[name].append(throughput(model, crops))
                latencies[name].append(latency_s(model, crops[:48]))
    best = {k: max(v) for k, v in rates.items()}
    fastest = {k: min(v) for k, v in latencies.items()}
    print(f"batch 8: fp32 {best['fp32']:.0f} img/s, int8 {best['int8']:.0f} img/s: int8 / fp32 = "
          f"{best['int8'] / best['fp32']:.2f} (target >= 1.8; all rounds: "
          f"{', '.join(f'{a / b:.2f}' for a, b in zip(rates['int8'], rates['fp32']))})")
    print(f"batch 1: fp32 {fastest['fp32'] * 1000:.2f} ms, int8 {fastest['int8'] * 1000:.2f} ms: int8 / fp32 = "
          f"{fastest['int8'] / fastest['fp32']:.2f} (target <= 0.55)")


if __name__ == "__main__":
    main()
