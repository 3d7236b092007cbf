"""The import check: the source in its own framework and the bundle through modelport's own decode
path classify the same images, and must agree.

- The **conversion**: the source is given the bundle's own input (modelport's decode and crop,
  normalised as the bundle will normalise), so any difference is the converter's.
- The **preprocessing**: where the source says how its input is made, the source gets that instead:
  a keras.applications model its own normalisation of the same crops; a graph that decodes the JPEG
  itself (the retrain guide's) is compared at its input tensor, the graph's decode, resize and
  normalisation against the bundle's, in grey levels. (Its outputs are not compared end to end:
  TF1's resize does not antialias, so a deep network's top-1 moves on ~1 photo in 10 between the two
  resizes even with the right normalisation, while a wrong one is off by tens of grey levels.)

A top-1 that flips where the source's two best classes were within ``max_difference`` of each other
is a near-tie, not a disagreement.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from modelport.engine.imaging import to_model_input
from modelport.engine.model import Model
from modelport.engine.predictions import softmax
from modelport.errors import ModelportError
from modelport.importer.preprocess import Preprocessing
from modelport.importer.source import Converted

MAX_GREY_LEVELS = 16.0  # a decoding graph's input against the bundle's, mean: ~2 when right at 299 px, ~9 at 64 px (TF1 resize aliases); 41 with torchvision for inception


@dataclass
class Report:
    images: int
    top1_agreement: float  # near-ties that flipped count as agreeing
    top1_flips: int  # every flip, near-ties included
    max_abs_difference: float  # of probabilities, over every image and class
    mean_abs_difference: float
    source_s: float
    bundle_s: float
    compared: str  # what the source was given
    input_grey_levels: float | None = None  # a decoding graph: its input against the bundle's
    passed: bool = False
    reason: str = ""
    warning: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        verdict = "passed" if self.passed else f"FAILED: {self.reason}"
        grey = (f"; input {self.input_grey_levels:.1f} grey levels from the graph's own"
                if self.input_grey_levels is not None else "")
        warning = f" ({self.warning})" if self.warning else ""
        return (f"check on {self.images} images ({self.compared}): top-1 agreement {self.top1_agreement:.3f} "
                f"({self.top1_flips} flipped), max |p difference| {self.max_abs_difference:.2g}, mean "
                f"{self.mean_abs_difference:.2g}{grey}; source {self.source_s:.2f} s, bundle {self.bundle_s:.2f} s; "
                f"{verdict}{warning}")


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
        rows = [crops[i:i + 1] for i in range(len(crops))] if model.input.shape[0] == 1 else [crops]
        ours = np.concatenate([model.run_crops(r, [model.output.name])[model.output.name] for r in rows])
        bundle_s = time.monotonic() - started
        started = time.monotonic()
        grey = None
        if converted.own_input is not None:
            bundle_input = to_model_input(crops, model.spec)
            grey = _grey_levels(converted.own_input(images), bundle_input, model)
            source_input = bundle_input
        else:
            source_input = _source_input(crops, model, source_preprocessing)
        theirs = np.asarray(converted.run(images, source_input), dtype=np.float32).reshape(ours.shape)
        source_s = time.monotonic() - started
    finally:
        model.close()
    ours, theirs = _probabilities(ours, logits), _probabilities(theirs, logits)
    difference = np.abs(ours - theirs)
    flipped = ours.argmax(1) != theirs.argmax(1)
    top2 = np.sort(theirs, axis=1)[:, -2:] if theirs.shape[1] > 1 else np.zeros((len(theirs), 2))
    near_tie = (top2[:, 1] - top2[:, 0]) <= max_difference
    agreement = float(np.mean(~flipped | near_tie))
    report = Report(len(images), agreement, int(flipped.sum()), float(difference.max()), float(difference.mean()),
                    source_s, bundle_s, compared, grey)
    if grey is not None and grey > MAX_GREY_LEVELS:
        report.reason = (f"the graph's own input differs from the bundle's by {grey:.1f} grey levels on average "
                         f"(more than {MAX_GREY_LEVELS:g}): its preprocessing is not the one given")
    elif agreement < min_agreement:
        report.reason = f"top-1 agreement {agreement:.3f} is below {min_agreement}"
    elif report.max_abs_difference > max_difference:
        report.reason = f"a probability differs by {report.max_abs_difference:.3g}, more than {max_difference}"
    report.passed = not report.reason
    if len(set(theirs.argmax(1))) == 1 and np.ptp(theirs, axis=0).max() < 1e-4:
        report.warning = "the source answers the same for every photo: the check cannot tell much"
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


def _grey_levels(own: np.ndarray, bundle_input: np.ndarray, model: Model) -> float:
    """Mean difference of two normalised inputs, in the bundle's pixel units (grey levels)."""
    if own.shape != bundle_input.shape:
        return float("inf")  # another size or layout: not the same preprocessing at all
    std = np.asarray(model.spec.std, np.float32)
    std = std.reshape(1, 3, 1, 1) if model.spec.layout == "NCHW" else std
    return float(np.mean(np.abs(own.astype(np.float32) - bundle_input.astype(np.float32)) * std))


def _probabilities(values: np.ndarray, logits: bool) -> np.ndarray:
    values = values.reshape(len(values), -1).astype(np.float32)
    return softmax(values) if logits else values
