"""The import check: the source in its own framework and the bundle through modelport's own decode
path classify the same images, and must agree."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from modelport.engine.model import Model
from modelport.engine.predictions import softmax
from modelport.errors import ModelportError
from modelport.importer.preprocess import Preprocessing
from modelport.importer.source import Converted


@dataclass
class Report:
    images: int
    top1_agreement: float
    max_abs_difference: float  # of probabilities, over every image and class
    mean_abs_difference: float
    source_s: float
    bundle_s: float
    compared: str  # what the source was given: its own decode, its own preprocessing, or the flags'
    passed: bool = False
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        verdict = "passed" if self.passed else f"FAILED: {self.reason}"
        return (f"check on {self.images} images ({self.compared}): top-1 agreement {self.top1_agreement:.3f}, "
                f"max |p difference| {self.max_abs_difference:.2g}, mean {self.mean_abs_difference:.2g}; "
                f"source {self.source_s:.2f} s, bundle {self.bundle_s:.2f} s; {verdict}")


class ImportRejected(ModelportError):
    """The imported bundle does not answer as its source: nothing was written."""

    kind = "import_rejected"

    def __init__(self, report: Report) -> None:
        super().__init__(f"the imported model does not answer as its source, nothing written: {report.text()}")
        self.report = report


def compare(converted: Converted, bundle_dir, images: list[bytes], *, source_preprocessing: Preprocessing | None,
            logits: bool, min_agreement: float, max_difference: float, compared: str) -> Report:
    model = Model.load(bundle_dir, engine="onnxruntime", precision="fp32", concurrent_batches=1)
    try:
        started = time.monotonic()
        crops = np.stack([model.decode(data) for data in images])  # the bundle's own decode path
        fixed_batch = model.input.shape[0] == 1
        rows = [crops[i:i + 1] for i in range(len(crops))] if fixed_batch else [crops]
        ours = np.concatenate([model.run_crops(r, [model.output.name])[model.output.name] for r in rows])
        bundle_s = time.monotonic() - started
        started = time.monotonic()
        source_input = None
        if not converted.decodes_itself:
            source_input = _source_input(crops, model, source_preprocessing)
        theirs = np.asarray(converted.run(images, source_input), dtype=np.float32).reshape(ours.shape)
        source_s = time.monotonic() - started
    finally:
        model.close()
    ours, theirs = _probabilities(ours, logits), _probabilities(theirs, logits)
    difference = np.abs(ours - theirs)
    agreement = float(np.mean(ours.argmax(1) == theirs.argmax(1)))
    report = Report(len(images), agreement, float(difference.max()), float(difference.mean()), source_s, bundle_s,
                    compared)
    if agreement < min_agreement:
        report.reason = f"top-1 agreement {agreement:.3f} is below {min_agreement}"
    elif report.max_abs_difference > max_difference:
        report.reason = f"a probability differs by {report.max_abs_difference:.3g}, more than {max_difference}"
    report.passed = not report.reason
    return report


def _source_input(crops: np.ndarray, model: Model, preprocessing: Preprocessing | None) -> np.ndarray:
    """The bundle's crops as the source takes them: its own normalisation (or the flags'), its layout."""
    spec = model.spec
    if spec.dtype == "uint8" or preprocessing is None:
        batch = crops
    else:
        if preprocessing.channel_order != spec.channel_order:
            crops = crops[..., ::-1]
        batch = preprocessing.apply(crops)
    if spec.layout == "NCHW":
        batch = batch.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(batch)


def _probabilities(values: np.ndarray, logits: bool) -> np.ndarray:
    values = values.reshape(len(values), -1).astype(np.float32)
    return softmax(values) if logits else values
