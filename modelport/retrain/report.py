"""What a retraining run tells its user: accuracy, per-class precision/recall, the confusion
matrix and calibration error before and after temperature scaling."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Report:
    classes: tuple[str, ...]
    val_accuracy: float
    precision: tuple[float, ...]
    recall: tuple[float, ...]
    confusion: tuple[tuple[int, ...], ...]  # rows: true class, columns: predicted
    ece_before: float
    ece_after: float
    temperature: float
    regularisation_c: float

    def as_dict(self) -> dict:
        return asdict(self)


def build(classes: tuple[str, ...], labels: np.ndarray, uncalibrated: np.ndarray, calibrated: np.ndarray,
          temperature: float, regularisation_c: float) -> Report:
    predicted = calibrated.argmax(1)
    n = len(classes)
    confusion = np.zeros((n, n), dtype=int)
    np.add.at(confusion, (labels, predicted), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.nan_to_num(np.diag(confusion) / confusion.sum(0))
        recall = np.nan_to_num(np.diag(confusion) / confusion.sum(1))
    return Report(classes, float(np.mean(predicted == labels)), tuple(map(float, precision)), tuple(map(float, recall)),
                  tuple(tuple(map(int, row)) for row in confusion), expected_calibration_error(uncalibrated, labels),
                  expected_calibration_error(calibrated, labels), temperature, regularisation_c)


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Mean |accuracy - confidence| over confidence bins, weighted by the bin's share of samples."""
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            error += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(error)


def render(report: Report, console) -> None:
    from rich.table import Table

    console.print(f"validation accuracy [bold]{report.val_accuracy:.1%}[/bold]   "
                  f"calibration error {report.ece_before:.3f} -> {report.ece_after:.3f} "
                  f"(temperature {report.temperature:.2f})   C = {report.regularisation_c}")
    per_class = Table("class", "precision", "recall", "validation images", title="per class")
    for name, p, r, row in zip(report.classes, report.precision, report.recall, report.confusion):
        per_class.add_row(name, f"{p:.2f}", f"{r:.2f}", str(sum(row)))
    console.print(per_class)
    confusion = Table("true \\ predicted", *report.classes, title="confusion matrix (validation)")
    for name, row in zip(report.classes, report.confusion):
        confusion.add_row(name, *(str(v) for v in row))
    console.print(confusion)


def confusion_png(report: Report, path: Path, cell_px: int = 48) -> None:
    """The confusion matrix as a PNG: darker cells hold more images; class names on the left."""
    from PIL import Image, ImageDraw

    matrix = np.array(report.confusion, dtype=float)
    n = len(report.classes)
    margin = 8 + 7 * max(len(c) for c in report.classes)
    image = Image.new("RGB", (margin + n * cell_px + 8, 24 + n * cell_px + 8), "white")
    draw = ImageDraw.Draw(image)
    row_totals = matrix.sum(1, keepdims=True)
    shares = np.divide(matrix, row_totals, out=np.zeros_like(matrix), where=row_totals > 0)
    for i in range(n):
        draw.text((4, 24 + i * cell_px + cell_px // 2 - 6), report.classes[i], fill="black")
        for j in range(n):
            shade = int(255 * (1 - shares[i, j]))
            x, y = margin + j * cell_px, 24 + i * cell_px
            draw.rectangle((x, y, x + cell_px - 2, y + cell_px - 2), fill=(shade, shade, 255))
            draw.text((x + 6, y + cell_px // 2 - 6), str(int(matrix[i, j])),
                      fill="white" if shares[i, j] > 0.5 else "black")
    draw.text((margin, 4), "predicted -> (columns in the order of the rows)", fill="black")
    image.save(path)
