"""``modelport pipeline evaluate``: where to set a cascade's threshold, measured on the user's images.

Each step runs once over the folder (in-process, batches of 8); every threshold of the sweep is
then replayed from those answers, so a sweep costs one pass per step. For each threshold: the
share of images escalated past the first step, accuracy (labelled ``<class>/`` folders) or top-1
agreement with a reference model, and the mean compute cost per image, from the steps' measured
cost: cost(step 1) + share reaching step 2 x cost(step 2) + ..., where a step's cost is its batched
inference plus its decode, counted once per input geometry as the server decodes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from modelport.errors import BadInput
from modelport.folders import truth_from_labels
from modelport.engine.model import Model
from modelport.pipeline.config import PipelineConfig
from modelport.engine.predictions import confidence

BATCH = 8


@dataclass
class Row:
    threshold: float
    escalated: float  # share of images that went past the first step
    score: float  # accuracy, or agreement with the reference
    cost_ms: float  # mean compute per image
    relative_cost: float  # / the reference (or the last step) alone


@dataclass
class Report:
    measure: str  # "accuracy" or "agreement with <reference>"
    images: int
    step_cost_ms: list[float]
    reference_cost_ms: float
    reference_score: float  # the reference alone: accuracy, or 1.0 for agreement
    calibration_error: float  # of the first step's top-1 probability, 10 bins
    rows: list[Row]
    best: Row | None  # the cheapest threshold meeting the target
    target: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Measured:
    probabilities: np.ndarray
    decode_ms: float  # per image
    infer_ms: float  # per image, in batches of BATCH

    @property
    def cost_ms(self) -> float:
        return self.decode_ms + self.infer_ms


def run_model(model: Model, images: Sequence[bytes]) -> Measured:
    model.predict(np.stack([model.decode(images[0])]))  # warm
    decode_s = infer_s = 0.0
    parts = []
    for i in range(0, len(images), BATCH):
        start = time.perf_counter()
        crops = np.stack([model.decode(data) for data in images[i:i + BATCH]])
        middle = time.perf_counter()
        parts.append(model.predict(crops))
        decode_s += middle - start
        infer_s += time.perf_counter() - middle
    return Measured(np.concatenate(parts), decode_s * 1000 / len(images), infer_s * 1000 / len(images))


def step_costs(steps: Sequence[Model], measured: Sequence[Measured]) -> list[float]:
    """What each step adds per image it sees: its inference, and its decode unless an earlier step
    crops alike (the server decodes once per geometry)."""
    seen, costs = set(), []
    for model, m in zip(steps, measured):
        geometry = (model.spec.height, model.spec.width, model.spec.resize_shorter, model.spec.channel_order)
        costs.append(m.infer_ms + (0.0 if geometry in seen else m.decode_ms))
        seen.add(geometry)
    return costs


def sweep(config: PipelineConfig, step_probabilities: list[np.ndarray], step_cost_ms: list[float],
          truth: np.ndarray, reference_cost_ms: float, *,
          thresholds: Sequence[float] | None = None) -> list[Row]:
    """Replay the cascade at each threshold (the same one for every step but the last).

    ``truth``: the class index each image should get (its label, or the reference's top-1).
    """
    thresholds = thresholds if thresholds is not None else [round(t, 2) for t in np.arange(0, 1.0001, 0.05)]
    confidences = [confidence(p, config.confidence) for p in step_probabilities]
    tops = [p.argmax(axis=1) for p in step_probabilities]
    rows = []
    for threshold in thresholds:
        answer = np.full(len(truth), -1)
        reached = np.ones(len(truth), bool)
        cost = 0.0
        for i, (sure, top) in enumerate(zip(confidences, tops)):
            cost += reached.mean() * step_cost_ms[i]
            last = i == len(tops) - 1
            stops = reached & ((sure >= threshold) if not last else True)
            answer[stops] = top[stops]
            reached &= ~stops
        escalated = float((confidences[0] < threshold).mean()) if len(tops) > 1 else 0.0
        rows.append(Row(float(threshold), escalated, float((answer == truth).mean()), cost,
                        cost / reference_cost_ms))
    return rows


def cheapest_meeting(rows: Sequence[Row], target: float) -> Row | None:
    meeting = [r for r in rows if r.score >= target]
    return min(meeting, key=lambda r: (r.cost_ms, -r.score)) if meeting else None


def calibration_error(probabilities: np.ndarray, truth: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error of the top-1 probability: sum over bins of |confidence - accuracy| x share."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == truth
    edges = np.linspace(0, 1, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high) if low > 0 else (confidence <= high)
        if inside.any():
            error += inside.mean() * abs(confidence[inside].mean() - correct[inside].mean())
    return float(error)


def evaluate(config: PipelineConfig, steps: list[Model], reference: Model | None, images: list[bytes],
             labels: list[str] | None, *, target: float) -> Report:
    if config.kind != "cascade":
        raise BadInput(f"{config.path}: pipeline evaluate sweeps a cascade's threshold; this is a {config.kind}")
    measured = [run_model(model, images) for model in steps]
    probabilities = [m.probabilities for m in measured]
    costs = step_costs(steps, measured)
    reference = reference or steps[-1]
    same = [m for step, m in zip(steps, measured) if step.bundle.path.resolve() == reference.bundle.path.resolve()]
    alone = same[0] if same else run_model(reference, images)  # a step is measured once
    reference_probabilities, reference_cost = alone.probabilities, alone.cost_ms
    if labels is not None:
        truth = truth_from_labels(labels, steps[0].labels)
        measure = "accuracy"
        reference_score = float((reference_probabilities.argmax(axis=1) == truth).mean())
    else:
        truth = reference_probabilities.argmax(axis=1)
        measure = f"agreement with {reference.name}"
        reference_score = 1.0
    rows = sweep(config, probabilities, costs, truth, reference_cost)
    return Report(measure, len(images), costs, reference_cost, reference_score,
                  calibration_error(probabilities[0], truth), rows, cheapest_meeting(rows, target), target)


def verdict(report: Report) -> str:
    """One plain sentence: what to set, and whether a cascade pays on these images at all."""
    if report.best is None:
        return (f"No threshold reaches {report.measure} {report.target:.1%} on these images; the best is "
                f"{max(r.score for r in report.rows):.1%}. Use the accurate model alone, or lower the target.")
    best = report.best
    if best.relative_cost >= 1:
        return (f"On these images the cascade costs MORE than the accurate model alone at every threshold that "
                f"reaches {report.target:.1%} ({best.relative_cost:.2f} x at escalate_below = {best.threshold}): "
                f"serve the accurate model alone.")
    return (f"Set escalate_below = {best.threshold}: {best.score:.1%} {report.measure}, {best.escalated:.0%} of "
            f"images escalated, {best.relative_cost:.2f} x the cost of the accurate model alone.")


def plot(report: Report, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from modelport.errors import MissingExtra

        raise MissingExtra("--plot needs matplotlib: pip install 'modelport[plot]'") from None
    figure, axis = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    costs = [r.relative_cost for r in report.rows]
    scores = [r.score for r in report.rows]
    axis.plot(costs, scores, marker="o", markersize=3, label="cascade, by threshold")
    for row in report.rows[::4]:
        axis.annotate(f"{row.threshold:g}", (row.relative_cost, row.score), fontsize=7,
                      textcoords="offset points", xytext=(4, -8))
    axis.axvline(1.0, color="grey", linestyle="--", linewidth=1, label="accurate model alone (cost 1)")
    axis.axhline(report.target, color="tab:red", linestyle=":", linewidth=1, label=f"target {report.target:.1%}")
    if report.best is not None:
        axis.plot([report.best.relative_cost], [report.best.score], marker="*", markersize=12, color="tab:green",
                  label=f"escalate_below = {report.best.threshold:g}")
    axis.set_xlabel("compute per image / accurate model alone")
    axis.set_ylabel(report.measure)
    axis.set_title(f"cascade on {report.images} images")
    axis.legend(fontsize=8, loc="lower right")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
