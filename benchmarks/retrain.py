"""Issue 4's figures: retraining 2,000 images of 10 classes, first run and cached run.

    python benchmarks/retrain.py [--per-class 200]

The dataset is built offline from photos that scikit-image ships (random crops of one photo per
class, so the classes are easy: this measures the machinery, not the backbone). Feature
extraction speed is compared with the core pipeline (classify_stream) on the same images, in
the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from modelport import samples

from modelport.packaged import default_model
from modelport.engine.model import Model
from modelport.retrain import retrain
from modelport.engine.stream import classify_stream


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()
    default_model.ensure_default_model()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, held_out = tmp / "data", tmp / "held_out"
        samples.labelled_folder(data, classes=args.classes, per_class=args.per_class, seed=0)
        samples.labelled_folder(held_out, classes=args.classes, per_class=20, seed=99)
        paths = sorted(data.rglob("*.jpg"))

        # The core pipeline on the same images, same process, for the ratio.
        model = Model.load(default_model.default_model_dir())
        start = time.perf_counter()
        classify_stream(model, [f"{p}\n" for p in paths], lambda _: None, top_k=1)
        core_rate = len(paths) / (time.perf_counter() - start)

        # A feature cache of its own, so that the first run really starts cold.
        start = time.perf_counter()
        first = retrain(data, name="bench", output=tmp / "models", cache_dir=tmp / "features")
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        second = retrain(data, name="bench", output=tmp / "models", cache_dir=tmp / "features")
        second_s = time.perf_counter() - start

        exported = Model.load(second.bundle)
        held = sorted(held_out.rglob("*.jpg"))
        predictions = exported.classify([p.read_bytes() for p in held], 1)
        accuracy = float(np.mean([row[0].label == p.parent.name for row, p in zip(predictions, held)]))

    x = first.extraction
    extract_rate = x.computed / x.seconds
    print(f"machine: {os.cpu_count()} cores; {len(paths)} images, {args.classes} classes")
    print(f"feature extraction {extract_rate:.1f} img/s; core pipeline (classify_stream) {core_rate:.1f} img/s; "
          f"ratio {extract_rate / core_rate:.2f} (target >= 0.9)")
    print(f"first run end to end  {first_s:6.1f} s = {first_s / 60:.2f} x the 60 s target "
          f"({x.computed} computed, {len(x.unreadable)} unreadable)")
    print(f"second run (cached)   {second_s:6.1f} s = {second_s / 10:.2f} x the 10 s target "
          f"({second.extraction.cache_hits} from cache, {second.extraction.computed} computed)")
    print(f"validation accuracy {first.report.val_accuracy:.1%}; held-out accuracy ({len(held)} images, other crops) "
          f"{accuracy:.1%}; calibration error {first.report.ece_before:.3f} -> {first.report.ece_after:.3f}")


if __name__ == "__main__":
    sys.exit(main())
