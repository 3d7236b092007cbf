"""Fine-tune the default backbone on a folder of labelled images into a servable bundle.

    from modelport.retrain import retrain
    result = retrain("photos/", name="flowers", output="models/")
    result.bundle          # models/flowers/<next version>
    result.report          # accuracy, per-class precision/recall, confusion, calibration

Steps: scan and split the folder -> backbone features (cached by content hash) -> logistic
regression head, regularisation picked on the validation split -> temperature calibration ->
one ONNX graph (backbone + head + calibrated softmax) in a new version directory.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from modelport.home import model_home
from modelport.packaged import default_model

from modelport.repository import layout as repository
from modelport.repository.bundle import write_config
from modelport.errors import BadInput, MissingExtra
from modelport.engine.model import Model
from modelport.repository.layout import check_name
from modelport.retrain import dataset as dataset_module
from modelport.retrain.features import Extraction, FeatureCache, backbone_id, extract
from modelport.retrain.head import Head
from modelport.retrain.report import Report

INSTALL_HINT = "pip install 'modelport[retrain]'"


@dataclass
class RetrainResult:
    bundle: Path
    version: int
    report: Report
    extraction: Extraction
    counts: dict[str, int]
    head: "Head"  # the fitted head, as the exported graph should compute it
    skipped: dict[str, str] = field(default_factory=dict)  # unreadable file -> why


def retrain(data: str | Path, *, name: str, output: str | Path, backbone: str | None = None,
            val_fraction: float = 0.1, seed: int = 0, min_per_class: int = 5, cache_dir: str | Path | None = None,
            progress: Callable[[int, int], None] | None = None) -> RetrainResult:
    """Train a head on ``data`` (one sub-directory per class) and write ``output/name/<next version>``.

    Features are cached in ``cache_dir`` (default ``$MODELPORT_HOME/features``), per backbone.
    ``progress(done, total)`` is called as feature extraction advances.
    """
    try:
        import onnx  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise MissingExtra(f"retraining needs scikit-learn and onnx ({exc.name} is missing): {INSTALL_HINT}") from None
    check_name(name)  # the same rule the repository and the server apply
    data, output = Path(data), Path(output)
    split = dataset_module.scan(data, val_fraction=val_fraction, seed=seed, min_per_class=min_per_class)
    model = Model.load(default_model.resolve(backbone), precision="fp32")  # features as the exported graph computes them
    cache = FeatureCache(Path(cache_dir or model_home() / "features") / backbone_id(model))

    examples = split.train + split.val
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, len(examples))

    extraction = extract(model, [e.path for e in examples], cache, progress=advance)
    train = [e for e in split.train if e.path in extraction.features]
    val = [e for e in split.val if e.path in extraction.features]
    _check_survivors(split.classes, train, val, extraction)

    from modelport.retrain import export, head as head_module, report as report_module  # sklearn, onnx: lazily

    def stack(examples):
        return (np.stack([extraction.features[e.path] for e in examples]).astype(np.float64),
                np.array([e.label for e in examples]))

    train_x, train_y = stack(train)
    val_x, val_y = stack(val)
    head = head_module.fit(train_x, train_y, val_x, val_y, len(split.classes), seed=seed)
    from modelport.engine.predictions import softmax

    report = report_module.build(split.classes, val_y, softmax(head.logits(val_x)), head.probabilities(val_x),
                                 head.temperature, head.regularisation_c)

    model_dir = output / name
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".retrain-", dir=model_dir))
    try:
        export.compose(model.bundle.model_file, head, staging / "model.onnx")
        (staging / "labels.txt").write_text("\n".join(split.classes) + "\n", encoding="utf-8")
        counts = {c: 0 for c in split.classes}
        for e in train + val:
            counts[split.classes[e.label]] += 1
        spec = model.spec
        metadata = {
            "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "backbone": f"{model.name}/{model.version}",
            "dataset": str(data.resolve()),
            "classes": json.dumps(counts),
            "train_images": len(train), "validation_images": len(val),
            "validation_accuracy": round(report.val_accuracy, 6),
            "temperature": round(head.temperature, 6), "regularisation_c": head.regularisation_c,
            "skipped_files": len(extraction.unreadable),
        }
        version = _publish(model_dir, staging, name, spec, metadata)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return RetrainResult(model_dir / str(version), version, report, extraction, counts, head,
                         {str(p): why for p, why in extraction.unreadable.items()})


def _publish(model_dir: Path, staging: Path, name: str, spec, metadata: dict) -> int:
    """Rename the staging directory to the next version number; never overwrite an existing one."""
    def configure(version: int) -> None:
        write_config(staging, {
            "format": 1, "name": name, "version": version, "runtime": "onnx", "model_file": "model.onnx",
            "input": {"name": spec.name or "image", "height": spec.height, "width": spec.width,
                      "resize_shorter": spec.resize_shorter, "channel_order": spec.channel_order,
                      "layout": spec.layout, "dtype": spec.dtype, "mean": list(spec.mean), "std": list(spec.std)},
            "output": {"name": "probabilities", "kind": "probabilities"},
            "serving": {"top_k": min(5, len(json.loads(metadata["classes"])))},
            "metadata": metadata,
        })

    return repository.publish(model_dir, staging, configure)


def _check_survivors(classes, train, val, extraction: Extraction) -> None:
    present_train = {e.label for e in train}
    missing = [classes[i] for i in range(len(classes)) if i not in present_train]
    if missing:
        raise BadInput(f"no readable training images left for class(es) {', '.join(missing)} "
                       f"({len(extraction.unreadable)} files could not be read)")
    if not val:
        raise BadInput("no readable validation images left")
