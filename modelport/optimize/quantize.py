"""The INT8 recipe: ONNX Runtime static quantization, with the sensitive layers kept in fp32.

Measured on EfficientNet-Lite0 (BENCHMARKS.md), and kept because it won:
- ``quant_pre_process`` first (shape inference, constant folding: fewer nodes to quantize);
- QDQ format, **per-channel** int8 weights (per-tensor weights lose the depthwise convolutions),
  **uint8 activations** (the fast integer kernels on x86 take u8 x s8), percentile calibration
  (99.99: min-max lets one outlier pixel waste the range);
- **which layers stay fp32** decides how many answers survive. They are chosen by measurement,
  not by name: the model is quantized whole once, ONNX Runtime's QDQ debugging tools compare every
  weighted layer's output and weights with the float model's on calibration images, and the layers
  with the lowest signal-to-quantization-noise ratio are excluded, together with the activation
  that follows each (a ReLU6 ``Clip`` fuses with its convolution only when both are quantized or
  both are not). Candidates with more layers kept in fp32 are tried until one passes the gate.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from modelport.errors import MissingExtra

logger = logging.getLogger("modelport.optimize")

WEIGHTED = ("Conv", "Gemm", "MatMul")
FOLLOWERS = ("Clip", "Relu", "Softmax", "Sigmoid", "HardSigmoid", "Mul")


@dataclass(frozen=True)
class Recipe:
    per_channel: bool = True
    percentile: float = 99.99
    calibration: str = "percentile"  # or "minmax", "entropy"
    activations: str = "uint8"  # or "int8"

    def describe(self) -> str:
        weights = "per-channel" if self.per_channel else "per-tensor"
        return (f"QDQ, {weights} int8 weights, {self.activations} activations, "
                f"{self.calibration}{f' {self.percentile}' if self.calibration == 'percentile' else ''} calibration")


def _quantization():
    try:
        from onnxruntime import quantization
        from onnxruntime.quantization import qdq_loss_debug  # noqa: F401
    except ImportError as exc:  # pragma: no cover - onnxruntime always ships it
        raise MissingExtra(f"ONNX Runtime's quantization tools are missing: {exc}") from None
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise MissingExtra("modelport optimize needs onnx: pip install 'modelport[retrain]'") from None
    return quantization


class _Feeds:
    """A CalibrationDataReader over prepared input tensors, one image per run."""

    def __init__(self, name: str, inputs: np.ndarray) -> None:
        self._items = iter([{name: row[None]} for row in inputs])

    def get_next(self):
        return next(self._items, None)

    def __iter__(self):  # the debugging tools iterate; quantize_static calls get_next
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item

    def rewind(self):  # pragma: no cover - the interface asks for it
        pass


def prepare(model_file: Path, target: Path) -> Path:
    """ONNX Runtime's pre-processing: shape inference and graph optimisation before quantizing."""
    _quantization()  # a clear message if the tools are missing
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(model_file), str(target), skip_symbolic_shape=True)
    return target


def quantize(prepared: Path, target: Path, input_name: str, inputs: np.ndarray, *, recipe: Recipe,
             exclude: Sequence[str] = ()) -> Path:
    q = _quantization()
    methods = {"percentile": q.CalibrationMethod.Percentile, "minmax": q.CalibrationMethod.MinMax,
               "entropy": q.CalibrationMethod.Entropy}
    extra = {"ActivationSymmetric": False, "WeightSymmetric": True}
    if recipe.calibration == "percentile":
        extra["CalibPercentile"] = recipe.percentile
    chatter = io.StringIO()  # the calibrator print()s its progress: keep stdout for our output (--json)
    with contextlib.redirect_stdout(chatter):
        q.quantize_static(str(prepared), str(target), _Feeds(input_name, inputs), quant_format=q.QuantFormat.QDQ,
                          per_channel=recipe.per_channel,
                          activation_type=q.QuantType.QUInt8 if recipe.activations == "uint8" else q.QuantType.QInt8,
                          weight_type=q.QuantType.QInt8, calibrate_method=methods[recipe.calibration],
                          nodes_to_exclude=list(exclude), extra_options=extra)
    logger.debug("%s", chatter.getvalue())
    return target


def sensitivity(prepared: Path, quantized: Path, input_name: str, inputs: np.ndarray) -> list[tuple[str, float]]:
    """Weighted layers of ``prepared``, most sensitive first: (node name, dB lost).

    ONNX Runtime's QDQ debugging tools give, for every quantized tensor, its signal-to-noise ratio
    against the float model's same tensor (the error accumulated up to there). A layer's
    sensitivity is how much of that ratio is lost across it (with the activation fused after it):
    the stem of an image model, fed almost exact pixels, typically loses the most.
    """
    import onnx
    from onnxruntime.quantization import qdq_loss_debug as debug

    graph = onnx.load(str(prepared)).graph
    with tempfile.TemporaryDirectory() as tmp:
        augmented_float = Path(tmp) / "float.onnx"
        augmented_qdq = Path(tmp) / "qdq.onnx"
        debug.modify_model_output_intermediate_tensors(str(prepared), str(augmented_float))
        debug.modify_model_output_intermediate_tensors(str(quantized), str(augmented_qdq))
        float_acts = debug.collect_activations(str(augmented_float), _Feeds(input_name, inputs))
        qdq_acts = debug.collect_activations(str(augmented_qdq), _Feeds(input_name, inputs))
    errors = debug.compute_activation_error(debug.create_activation_matching(qdq_acts, float_acts))
    snr = {name: e["xmodel_err"] for name, e in errors.items() if np.isfinite(e.get("xmodel_err", np.nan))}
    consumers = _consumers(graph)
    scores = []
    for node in graph.node:
        if node.op_type not in WEIGHTED:
            continue
        out = node.output[0]
        after = consumers.get(out, [])
        if len(after) == 1 and after[0].op_type in FOLLOWERS:
            out = after[0].output[0]
        before = snr.get(node.input[0])
        if before is None or out not in snr:
            continue
        scores.append((node.name or node.output[0], float(before - snr[out])))
    return sorted(scores, key=lambda item: -item[1])


def _consumers(graph) -> dict[str, list]:
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def with_followers(prepared: Path, names: Sequence[str]) -> list[str]:
    """The nodes named, and the activation right after each (quantized or kept together)."""
    import onnx

    graph = onnx.load(str(prepared)).graph
    consumers = _consumers(graph)
    chosen = list(names)
    wanted = set(names)
    for node in graph.node:
        if (node.name or node.output[0]) in wanted:
            after = consumers.get(node.output[0], [])
            if len(after) == 1 and after[0].op_type in FOLLOWERS and after[0].name not in wanted:
                chosen.append(after[0].name)
    return chosen


def output_head(prepared: Path, output: str) -> list[str]:
    """The nodes from the classifier's last weighted layer to ``output``, kept in fp32 always.

    Not a choice by sensitivity but by arithmetic: a quantized probability has steps of 1/255, so
    every class below half a step reads 0 and the order of all but the top few answers is lost
    (top-5 on an unsure image becomes arbitrary). The walk back stops at the first weighted layer.
    """
    import onnx

    graph = onnx.load(str(prepared)).graph
    producers = {out: node for node in graph.node for out in node.output}
    chosen, name = [], output
    for _ in range(8):
        node = producers.get(name)
        if node is None:
            break
        chosen.append(node.name or node.output[0])
        if node.op_type in WEIGHTED:
            return chosen
        name = node.input[0]
    return chosen
