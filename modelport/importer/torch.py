"""PyTorch sources -> ONNX with torch's exporter: an ``nn.Module`` (Python API) or a TorchScript file;
and ONNX files as they are. Each is run in its own framework for the check."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from modelport.errors import BadInput, MissingExtra
from modelport.importer.source import OPSET, Converted, UnsupportedOperator, check_operators


def _torch():
    try:
        import torch
    except ImportError:
        raise MissingExtra("importing PyTorch models needs the torch extra: pip install 'modelport[torch]'") from None
    return torch


def module(net, example, kind: str = "torch-module") -> Converted:
    torch = _torch()
    import onnx

    net = net.eval()
    example = torch.as_tensor(np.asarray(example)) if not isinstance(example, torch.Tensor) else example
    buffer = io.BytesIO()
    try:
        with torch.no_grad():
            torch.onnx.export(net, (example,), buffer, input_names=["image"], output_names=["scores"],
                              dynamic_axes={"image": {0: "batch"}, "scores": {0: "batch"}},
                              opset_version=OPSET, dynamo=False)
    except torch.onnx.errors.UnsupportedOperatorError as exc:
        raise UnsupportedOperator(f"{exc}; cut the model before that operator (export a module that stops "
                                  f"before it) or give it an ONNX form") from None
    except (RuntimeError, TypeError, ValueError) as exc:
        raise BadInput(f"torch could not export the model with an input of shape {list(example.shape)}: {exc}") from None
    onnx_model = onnx.load_from_string(buffer.getvalue())
    check_operators(onnx_model)

    def run(images, batch):
        with torch.no_grad():
            result = net(torch.from_numpy(np.ascontiguousarray(batch)))
        result = result[0] if isinstance(result, (tuple, list)) else result
        return result.numpy()

    return Converted(kind, onnx_model, "image", "scores", f"torch.onnx {torch.__version__} (opset {OPSET})", run)


def torchscript(path: Path, example_shape: tuple[int, ...]) -> Converted:
    torch = _torch()
    try:
        net = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise BadInput(f"{path}: not a TorchScript archive torch can load: {exc}") from None
    return module(net, torch.zeros(example_shape), kind="torchscript")


def onnx_file(path: Path) -> Converted:
    import onnx
    import onnxruntime

    try:
        onnx_model = onnx.load(str(path))
    except Exception as exc:
        raise BadInput(f"{path}: not an ONNX model: {exc}") from None
    check_operators(onnx_model)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(images, batch):
        return session.run([converted.output], {converted.input: batch})[0]

    converted = Converted("onnx", onnx_model, session.get_inputs()[0].name, session.get_outputs()[0].name,
                          f"none (ONNX, opset {onnx_model.opset_import[0].version})", run)
    return converted


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip with ``code/`` and ``constants.pkl``; a plain torch.save is a pickle."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in names)
