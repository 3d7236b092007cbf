"""What a reduced-precision model (INT8, or bf16) kept of the fp32 model's answers, and what it
gained in speed.

Overall top-1 agreement alone misleads: on photos whose content is no class of the model, the fp32
model is unsure and near-ties flip on any perturbation. So the report splits agreement by the fp32
model's own confidence, counts how often the reduced answer is still among fp32's top five, and
measures a yardstick: how often fp32 changes its own answer when the same photo is merely
re-encoded as JPEG quality 90.
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass, field

import numpy as np

CONFIDENT = 0.5  # fp32 top-1 probability at or above which an image counts as "confident"
CLEAR_MARGIN = 0.2  # fp32 top-1 minus top-2 at or above which the answer counts as "clear"


@dataclass
class Agreement:
    images: int
    top1: float  # reduced top-1 == fp32 top-1, over every image
    confident_images: int
    top1_confident: float | None  # over images where fp32's top-1 probability >= CONFIDENT
    clear_images: int
    top1_clear: float | None  # over images where fp32's top-1 leads top-2 by >= CLEAR_MARGIN
    in_top5: float  # reduced top-1 inside fp32's top 5
    top5_overlap: float  # |top5(reduced) & top5(fp32)| / 5, averaged
    jpeg_yardstick: float | None  # fp32 == fp32 on the same photo re-encoded as JPEG q90
    accuracy_fp32: float | None = None  # with labelled folders
    accuracy_reduced: float | None = None


@dataclass
class Speed:
    batch: int
    fp32_per_s: float
    reduced_per_s: float

    @property
    def ratio(self) -> float:
        return self.reduced_per_s / self.fp32_per_s


@dataclass
class Report:
    recipe: str
    fp32_layers: list[str]
    agreement: Agreement
    speed: list[Speed]
    passed: bool
    reasons: list[str] = field(default_factory=list)
    candidates: list[dict] = field(default_factory=list)  # each candidate tried: fp32 layers, agreement
    precision: str = "int8"  # what the new version runs at
    engine: str = "onnxruntime"  # what it was checked (and will run) on
    engines: dict = field(default_factory=dict)  # every engine checked: passed, and its speed-ups

    def as_dict(self) -> dict:
        data = asdict(self)
        for entry in data["speed"]:
            entry["ratio"] = entry["reduced_per_s"] / entry["fp32_per_s"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        """A report as ``as_dict`` wrote it."""
        speed = [Speed(s["batch"], s["fp32_per_s"], s["reduced_per_s"]) for s in data["speed"]]
        return cls(**{**data, "agreement": Agreement(**data["agreement"]), "speed": speed})


def agreement(fp32: np.ndarray, reduced: np.ndarray, *, reencoded: np.ndarray | None = None,
              truth: np.ndarray | None = None) -> Agreement:
    """``fp32``/``reduced``: probabilities (N, classes) on the same crops; ``reencoded``: fp32 on the
    same photos re-encoded as JPEG q90; ``truth``: class indices, for labelled sets."""
    f_top, q_top = fp32.argmax(axis=1), reduced.argmax(axis=1)
    same = f_top == q_top
    ordered = np.sort(fp32, axis=1)
    confident = ordered[:, -1] >= CONFIDENT
    clear = (ordered[:, -1] - ordered[:, -2]) >= CLEAR_MARGIN if fp32.shape[1] > 1 else confident
    k = min(5, fp32.shape[1])
    f_top5 = np.argsort(-fp32, axis=1)[:, :k]
    q_top5 = np.argsort(-reduced, axis=1)[:, :k]
    in_top5 = np.mean([q in row for q, row in zip(q_top, f_top5)])
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(f_top5, q_top5)])
    return Agreement(
        images=len(fp32), top1=float(same.mean()),
        confident_images=int(confident.sum()), top1_confident=float(same[confident].mean()) if confident.any() else None,
        clear_images=int(clear.sum()), top1_clear=float(same[clear].mean()) if clear.any() else None,
        in_top5=float(in_top5), top5_overlap=float(overlap),
        jpeg_yardstick=float((reencoded.argmax(axis=1) == f_top).mean()) if reencoded is not None else None,
        accuracy_fp32=float((f_top == truth).mean()) if truth is not None else None,
        accuracy_reduced=float((q_top == truth).mean()) if truth is not None else None)


def gate(result: Agreement, *, min_agreement: float, min_top5: float, precision: str = "int8") -> list[str]:
    """Why the reduced-precision model must not be published; empty when it may."""
    reasons = []
    if result.top1_confident is None:
        reasons.append(f"no evaluation image is one the fp32 model is sure of (top-1 >= {CONFIDENT}); "
                       f"add images of the model's classes")
    elif result.top1_confident < min_agreement:
        reasons.append(f"top-1 agreement on confident images {result.top1_confident:.2%} < {min_agreement:.2%} "
                       f"({result.confident_images} images)")
    if result.in_top5 < min_top5:
        reasons.append(f"{precision.upper()} top-1 inside fp32's top-5 on {result.in_top5:.2%} of images < {min_top5:.2%}")
    return reasons


def reencode(data: bytes, quality: int = 90) -> bytes:
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def speed(run_fp32, run_reduced, crops: np.ndarray, batch: int, seconds: float = 1.5) -> Speed:
    """Images a second of each, measured interleaved (fp32, reduced, fp32, ...) so that drift hits both."""
    batch_crops = crops[:batch] if len(crops) >= batch else np.resize(crops, (batch, *crops.shape[1:]))
    totals = {"fp32": [0, 0.0], "reduced": [0, 0.0]}
    runs = {"fp32": run_fp32, "reduced": run_reduced}
    for run in runs.values():
        run(batch_crops)  # warm
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline or min(t[0] for t in totals.values()) < 3 * batch:
        for name, run in runs.items():
            start = time.perf_counter()
            run(batch_crops)
            totals[name][0] += batch
            totals[name][1] += time.perf_counter() - start
    return Speed(batch, totals["fp32"][0] / totals["fp32"][1], totals["reduced"][0] / totals["reduced"][1])
