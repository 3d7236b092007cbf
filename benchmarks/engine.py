"""Engines and precisions for one ONNX bundle, in one process: ONNX Runtime and OpenVINO, fp32, bf16, int8.

    python benchmarks/engine.py [--model DIR] [--int8 DIR] [--rounds 6] [--seconds 1] [--photos DIR] [--limit N]

Rows: ORT fp32 (the reference: today's exact answers), ORT int8, OpenVINO fp32, OpenVINO bf16,
OpenVINO int8, each a ``Model.load`` with that engine and precision. ``--model``: the fp32 bundle
(default: the default model, EfficientNet-Lite0). ``--int8``: its INT8 version; without it one is
built into a temporary directory by ``modelport.optimize.int8.optimize`` (calibrated on
``sample_calibration()``, gated on ``sample_evaluation()``: the 500 photos below are all kept
for evaluation). A row that cannot load here (bf16 on a CPU without native bf16, an INT8 version
its gate refused) is skipped with the reason.

Figures, each a ratio to ORT fp32 measured in the same run:
- batch 8: images a second over a block of ``--seconds`` of batches of 8 real crops; every round
  runs each row's block in turn (interleaved, so drift hits every row); the median over
  ``--rounds``, and the median and min-max of the per-round ratio;
- batch 1: the p50 latency of one crop within a block, interleaved the same way;
- answers on the natural photos of ``--photos`` (default ../shared/data/imagenet-sample, 500
  photos, one per even ImageNet class; decoded once by the fp32 model, the same crops for every
  row): top-1 correct (N/500), top-1 agreement with ORT fp32, that agreement where ORT fp32's top-1
  probability is >= 0.5 (N/M), and how often the row's top-1 is among ORT fp32's top 5.
Also printed: the CPU's flags that decide bf16 and int8 speed, each row's engine and
``precision_reason``, and what ``Model.load`` picks with everything on auto.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from modelport import samples

from modelport.packaged import default_model
from modelport.errors import BundleError, MissingExtra
from modelport.engine.model import Model
from modelport.optimize import int8 as optimize_int8

REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO.parent / "shared" / "data" / "imagenet-sample"
FLAGS = ("avx2", "avx512_vnni", "avx512_bf16", "amx_bf16")
ROWS = (("ORT fp32", "onnxruntime", "fp32"), ("ORT int8", "onnxruntime", "int8"),
        ("OpenVINO fp32", "openvino", "fp32"), ("OpenVINO bf16", "openvino", "bf16"),
        ("OpenVINO int8", "openvino", "int8"))


def cpu_flags() -> list[str]:
    """What `grep -o 'avx2\\|avx512_vnni\\|amx_bf16' /proc/cpuinfo | sort -u` prints (and avx512_bf16)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = {word for line in text.splitlines() if line.startswith("flags") for word in line.split()}
    return sorted(set(FLAGS) & flags)


def run(model: Model, crops: np.ndarray) -> np.ndarray:
    return model.run_crops(crops, [model.output.name])[model.output.name]


def rate_block(model: Model, crops: np.ndarray, seconds: float, batch: int = 8) -> float:
    done, i, start = 0, 0, time.perf_counter()
    while done == 0 or time.perf_counter() - start < seconds:
        run(model, crops[i:i + batch])
        done += batch
        i = (i + batch) % (len(crops) - batch + 1)
    return done / (time.perf_counter() - start)


def p50_block(model: Model, crops: np.ndarray, seconds: float) -> float:
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < 5 or time.perf_counter() < deadline:
        crop = crops[len(times) % len(crops)][None]
        start = time.perf_counter()
        run(model, crop)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_photos(directory: Path, limit: int | None) -> list[tuple[Path, int]] | None:
    table = directory / "labels.csv"
    if not table.is_file():
        return None
    with open(table, newline="") as f:
        rows = [(directory / "images" / row["path"], int(row["class_index"])) for row in csv.DictReader(f)]
    return rows[:limit] if limit else rows


def predict(model: Model, crops: np.ndarray, batch: int = 8) -> np.ndarray:
    return np.concatenate([model.predict(crops[i:i + batch]) for i in range(0, len(crops), batch)])


def answers(probabilities: np.ndarray, reference: np.ndarray, truth: np.ndarray) -> dict[str, str]:
    top1, ref1 = probabilities.argmax(1), reference.argmax(1)
    confident = reference.max(1) >= 0.5
    ref5 = np.argsort(-reference, axis=1)[:, :5]
    n = len(truth)
    return {"top-1": f"{(top1 == truth).sum()}/{n}",
            "= fp32": f"{(top1 == ref1).mean():.1%}",
            "= fp32 (p >= 0.5)": f"{(top1 == ref1)[confident].sum()}/{confident.sum()}",
            "in fp32 top-5": f"{(ref5 == top1[:, None]).any(1).mean():.1%}"}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=None, help="the fp32 bundle (default: the default model)")
    parser.add_argument("--int8", type=Path, default=None, help="its INT8 version (default: build one)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=1.0, help="length of one row's block in a round")
    parser.add_argument("--photos", type=Path, default=PHOTOS, help="a folder with labels.csv and images/")
    parser.add_argument("--limit", type=int, default=None, help="only the first N photos, for accuracy")
    args = parser.parse_args()
    print(f"CPU flags: {' '.join(cpu_flags()) or 'none of ' + ', '.join(FLAGS)}")
    source = args.model or default_model.ensure_default_model()

    auto = Model.load(source)
    print(f"auto (Model.load(path)): engine {auto.engine}, precision {auto.precision}: {auto.precision_reason}")
    auto.close()

    with tempfile.TemporaryDirectory(prefix="modelport-engine-") as tmp:
        int8_path = args.int8
        if int8_path is None:
            print("building the INT8 version (sample_calibration / sample_evaluation) ...", flush=True)
            try:
                # target_dir: optimize's default is the next version beside the source, which would
                # publish into the user's model directory.
                int8_path, _ = optimize_int8.optimize(source, optimize_int8.sample_calibration(),
                                                      optimize_int8.sample_evaluation(),
                                                      target_dir=Path(tmp) / "int8" / "1",
                                                      progress=lambda message: print(f"  {message}", flush=True))
            except optimize_int8.Refused as exc:
                print(f"  no INT8 version: {exc}")
        models: dict[str, Model] = {}
        for row, engine, precision in ROWS:
            path = int8_path if precision == "int8" else source
            if path is None:
                continue
            try:
                models[row] = Model.load(path, engine=engine, precision=precision, concurrent_batches=1)
            except (BundleError, MissingExtra) as exc:
                print(f"skipped {row}: {exc}")
                continue
            model = models[row]
            computes = getattr(model.runtime, "inference_precision", None)
            print(f"{row}: engine {model.engine}, precision {model.precision}"
                  + (f" (plugin computes float layers in {computes})" if computes else "")
                  + f": {model.precision_reason}")
        reference = models["ORT fp32"]

        photos = read_photos(args.photos, args.limit)
        if photos is None:
            print(f"no photos: {args.photos / 'labels.csv'} is missing; accuracy skipped")
            crops = np.stack([reference.decode(d) for d in samples.photo_set(64, seed=7, objects=True)])
        else:
            # Decoded once, by the reference: every row answers the very same pixels.
            crops = np.stack([reference.decode(path.read_bytes()) for path, _ in photos])
        # Fewer photos than that (--limit): repeated, so that a full batch of 8 always fits.
        timing = crops[:64] if len(crops) >= 64 else np.resize(crops, (64, *crops.shape[1:]))

        rates: dict[str, list[float]] = {row: [] for row in models}
        p50s: dict[str, list[float]] = {row: [] for row in models}
        for model in models.values():  # one block each first: a first block after loading runs cold
            rate_block(model, timing, min(args.seconds, 0.5))
        names = list(models)
        for r in range(args.rounds):
            # Each round starts at a different row, so no row always runs first (after the idle gap).
            order = names[r % len(names):] + names[:r % len(names)]
            for row in order:
                rates[row].append(rate_block(models[row], timing, args.seconds))
            for row in order:
                p50s[row].append(p50_block(models[row], timing, args.seconds))

        results = {}
        if photos is not None:
            truth = np.array([index for _, index in photos])
            fp32 = predict(reference, crops)
            results = {row: answers(fp32 if row == "ORT fp32" else predict(model, crops), fp32, truth)
                       for row, model in models.items()}
        for model in models.values():
            model.close()

    ref_rates, ref_p50s = rates["ORT fp32"], p50s["ORT fp32"]
    header = ["row", "batch 8 img/s", "/ ORT fp32 (min-max)", "batch 1 p50 ms", "/ ORT fp32 (min-max)"]
    if results:
        header += list(next(iter(results.values())))
    print(f"\n{args.rounds} round(s) of {args.seconds:g} s blocks; "
          + (f"answers on {len(photos)} photos of {args.photos}" if photos else "no answers"))
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in models:
        cells = [row, f"{statistics.median(rates[row]):.0f}",
                 spread([a / b for a, b in zip(rates[row], ref_rates)]),
                 f"{statistics.median(p50s[row]) * 1000:.2f}",
                 spread([a / b for a, b in zip(p50s[row], ref_p50s)])]
        cells += list(results.get(row, {}).values())
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
