"""The PyTorch runtime against the same TorchScript module run by hand, in one process.

    python benchmarks/torch_runtime.py [--batches 30]

EfficientNet-Lite0 built with `modelport build-model efficientnet-lite0 --runtime torch`; batches of
8 real crops. The limit: `torch.jit.load` + `module(torch.from_numpy(batch))` in a loop, same
threads. The figure: modelport's `Model.run_crops` throughput / the limit (target >= 0.8), and
the ONNX Runtime export of the same network for comparison.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import photo_files  # noqa: E402

from modelport.packaged import default_model  # noqa: E402

from modelport.engine import imaging  # noqa: E402
from modelport.engine.model import Model  # noqa: E402
from modelport.packaged.weights import build  # noqa: E402


def rate(run, batches: list[np.ndarray]) -> float:
    run(batches[0])  # warm
    start = time.perf_counter()
    for batch in batches:
        run(batch)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args()
    import torch

    work = Path(tempfile.mkdtemp(prefix="torchbench"))
    bundle = build("efficientnet-lite0", work / "efficientnet-lite0" / "1", runtime="torch")
    model = Model.load(bundle)
    crops = np.stack([imaging.decode(p.read_bytes(), model.spec) for p in photo_files(work / "photos", 48)])
    batches = [crops[(i * 8) % 40:(i * 8) % 40 + 8] for i in range(args.batches)]
    module = torch.jit.load(str(bundle / "model.pt")).eval()

    def by_hand(batch: np.ndarray) -> None:
        with torch.inference_mode():
            module(torch.from_numpy(batch))

    onnx = Model.load(default_model.ensure_default_model())
    results = {}
    for _ in range(3):  # interleaved, best of 3: the machine drifts
        results.setdefault("hand", []).append(rate(by_hand, batches))
        results.setdefault("runtime", []).append(rate(lambda b: model.run_crops(b), batches))
        results.setdefault("onnx", []).append(rate(lambda b: onnx.run_crops(b), batches))
    hand, ours, ort = max(results["hand"]), max(results["runtime"]), max(results["onnx"])
    print(f"TorchScript by hand: {hand:.1f} img/s (the limit)")
    print(f"modelport torch runtime: {ours:.1f} img/s = {ours / hand:.2f} x the limit (target >= 0.8)")
    print(f"the same network on ONNX Runtime (the default): {ort:.1f} img/s = {ort / hand:.2f} x the limit")


if __name__ == "__main__":
    main()
