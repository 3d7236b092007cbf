"""What every benchmark here measures against: the naive in-process limit L, on the same images.

L = the textbook pipeline (full decode -> bilinear resize of the shorter side to 256 -> centre
crop 224 -> float normalise) then ONNX Runtime with 2 threads at batch 8, serially.
L_lat = the same at batch 1, per image (median).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from modelport import samples

from modelport.engine import imaging
from modelport.repository.bundle import load_bundle

MEAN, STD = 127.0, 128.0


def photo_files(directory: Path, distinct: int = 48, seed: int = 0) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(samples.photo_set(distinct, seed=seed)):
        path = directory / f"photo{i:03d}.jpg"
        path.write_bytes(data)
        paths.append(path)
    return paths


class NaiveLimit:
    """The reference pipeline on a plain ORT session, with nothing of modelport's on the path."""

    def __init__(self, bundle_dir: Path) -> None:
        self.bundle = load_bundle(bundle_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        self.session = ort.InferenceSession(str(self.bundle.model_file), options, providers=["CPUExecutionProvider"])
        self.session.run(["probabilities"], {"image": np.zeros((1, 224, 224, 3), np.uint8)})

    def preprocess(self, data: bytes) -> np.ndarray:
        crop = imaging.reference(data, self.bundle.input).astype(np.float32)
        # The naive server normalises in float; our graph normalises inside, so undo it there.
        return (crop - MEAN) / STD * STD + MEAN

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(["probabilities"], {"image": batch.astype(np.uint8)})[0]

    def throughput(self, images: list[bytes], batch_size: int = 8) -> tuple[float, np.ndarray]:
        start = time.perf_counter()
        out = []
        for i in range(0, len(images), batch_size):
            out.append(self.infer(np.stack([self.preprocess(d) for d in images[i:i + batch_size]])))
        elapsed = time.perf_counter() - start
        return len(images) / elapsed, np.concatenate(out).argmax(1)

    def latency_s(self, images: list[bytes]) -> float:
        times = []
        for data in images:
            start = time.perf_counter()
            self.infer(self.preprocess(data)[None])
            times.append(time.perf_counter() - start)
        return statistics.median(times)


    def ort_ceiling(self, images: list[bytes], batch_size: int = 8) -> float:
        """ONNX Runtime alone on already-decoded crops: no server or CLI can beat this on 2 cores."""
        crops = [imaging.reference(d, self.bundle.input) for d in images]
        start = time.perf_counter()
        for i in range(0, len(crops), batch_size):
            self.infer(np.stack(crops[i:i + batch_size]))
        return len(crops) / (time.perf_counter() - start)


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a running process, in MB; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def v2_classify_requests(datas: list[bytes], labels: list[str], model: str) -> list[tuple[bytes, object]]:
    """Raw HTTP requests for ``loadgen``: each JPEG as KServe V2 binary ``image_bytes`` with the
    classification extension (top 1), paired with a check that the answer's label is the expected one."""
    import json
    import struct

    import loadgen

    requests = []
    for data, label in zip(datas, labels):
        blob = struct.pack("<I", len(data)) + data
        header = json.dumps({"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES",
                                         "parameters": {"binary_data_size": len(blob)}}],
                             "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}]}).encode()
        raw = loadgen.request_bytes("POST", f"/v2/models/{model}/infer", header + blob,
                                    {"Inference-Header-Content-Length": str(len(header))})
        requests.append((raw, lambda b, label=label: json.loads(b)["outputs"][0]["data"][0].split(":", 2)[2] == label))
    return requests
