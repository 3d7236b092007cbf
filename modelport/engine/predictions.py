"""What a classification answer is, and how one is cut from a probability row."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np


class Prediction(NamedTuple):
    label: str
    index: int
    score: float

    def as_dict(self) -> dict:
        return {"label": self.label, "index": self.index, "score": self.score}


def top_k(probabilities: np.ndarray, labels: Sequence[str], k: int) -> list[list[Prediction]]:
    """Best ``k`` classes per row, best first."""
    k = max(1, min(k, probabilities.shape[1]))
    # argpartition is O(C) per row; only the k survivors are sorted.
    part = np.argpartition(-probabilities, k - 1, axis=1)[:, :k]
    rows = []
    for row, idx in zip(probabilities, part):
        idx = idx[np.argsort(-row[idx], kind="stable")]
        rows.append([Prediction(labels[i], int(i), float(row[i])) for i in idx])
    return rows


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def confidence(probabilities: np.ndarray, how: str = "top1") -> np.ndarray:
    """Per row: the top-1 probability ("top1"), or its lead over the second ("margin")."""
    if how == "top1" or probabilities.shape[1] < 2:
        return probabilities.max(axis=1)
    best_two = -np.partition(-probabilities, 1, axis=1)[:, :2]
    return best_two[:, 0] - best_two[:, 1]
