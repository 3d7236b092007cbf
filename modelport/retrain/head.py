"""The new classifier head: multinomial logistic regression on backbone features, then
temperature calibration of its softmax on the validation split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modelport.engine.predictions import softmax

C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


@dataclass(frozen=True)
class Head:
    weights: np.ndarray  # (features, classes), standardisation folded in
    bias: np.ndarray  # (classes,)
    temperature: float
    regularisation_c: float

    def logits(self, features: np.ndarray) -> np.ndarray:
        return features @ self.weights + self.bias

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        return softmax(self.logits(features) / self.temperature)


def fit(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, classes: int,
        *, seed: int = 0) -> Head:
    """Pick C by validation accuracy (ties: validation log-loss), then calibrate on validation."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    tx, vx = scaler.transform(train_x), scaler.transform(val_x)
    best = None
    for c in C_GRID:
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(tx, train_y)
        probabilities = _full_probabilities(clf, vx, classes)
        accuracy = float(np.mean(probabilities.argmax(1) == val_y))
        loss = _nll(probabilities, val_y)
        if best is None or (accuracy, -loss) > (best[0], -best[1]):
            best = (accuracy, loss, c, clf)
    _, _, c, clf = best
    weights, bias = _dense(clf, classes)
    # Fold the standardisation into the linear layer: (x - mean) / scale @ W + b.
    folded_w = (weights / scaler.scale_[:, None]).astype(np.float32)
    folded_b = (bias - (scaler.mean_ / scaler.scale_) @ weights).astype(np.float32)
    head = Head(folded_w, folded_b, 1.0, c)
    temperature = calibrate(head.logits(val_x), val_y)
    return Head(folded_w, folded_b, temperature, c)


def calibrate(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises the validation negative log-likelihood."""
    from scipy.optimize import minimize_scalar

    result = minimize_scalar(lambda log_t: _nll(softmax(logits / np.exp(log_t)), labels),
                             bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(result.x))


def _nll(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, 1.0))))


def _dense(clf, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's coefficients as (features, classes) for every class, also ones absent in training."""
    weights = np.zeros((clf.coef_.shape[1], classes))
    bias = np.full(classes, -1e4)  # a class never seen in training is never predicted
    if len(clf.classes_) == 2:  # sklearn stores one row for binary problems: logit of class 1
        weights[:, clf.classes_[1]] = clf.coef_[0] / 2
        weights[:, clf.classes_[0]] = -clf.coef_[0] / 2
        bias[clf.classes_[1]], bias[clf.classes_[0]] = clf.intercept_[0] / 2, -clf.intercept_[0] / 2
    else:
        for row, cls in enumerate(clf.classes_):
            weights[:, cls] = clf.coef_[row]
            bias[cls] = clf.intercept_[row]
    return weights, bias


def _full_probabilities(clf, x: np.ndarray, classes: int) -> np.ndarray:
    weights, bias = _dense(clf, classes)
    return softmax(x @ weights + bias)
