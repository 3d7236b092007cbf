"""What an import starts from: the source converted to ONNX, and a way to run the source itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from modelport.errors import BadInput
from modelport.importer.preprocess import Preprocessing

OPSET = 17


@dataclass
class Converted:
    """A source model as an ONNX graph, beside the source itself for the check."""

    kind: str  # onnx | torchscript | torch-module | savedmodel | keras | tflite | graphdef
    onnx: object  # onnx.ModelProto
    input: str  # the graph input the bundle feeds
    output: str  # the graph output holding the class scores
    converter: str  # what converted it, with versions
    # The source run in its own framework: (encoded images, the batch the source's input takes) -> scores.
    run: Callable[[list[bytes], np.ndarray], np.ndarray]
    own_preprocessing: Preprocessing | None = None  # what the source says of its input, if it says
    # A graph that decodes before the cut: encoded images -> the value of its input tensor, as the
    # graph's own decode, resize and normalisation make it (then ``run`` feeds that tensor).
    own_input: Callable[[list[bytes]], np.ndarray] | None = None
    notes: list[str] = field(default_factory=list)


class UnsupportedOperator(BadInput):
    """A converter could not express an operator; the message names it and where to cut."""


def graph_tensor(model, name: str | None, what: str, names: list[str]) -> str:
    """The named graph input or output, or the only one; a clear error otherwise."""
    if name is not None:
        if name not in names:
            raise BadInput(f"no {what} {name!r} in the converted graph; it has {', '.join(names)}")
        return name
    if len(names) != 1:
        flag = "--input" if what == "input" else "--output-tensor"
        raise BadInput(f"the graph has {len(names)} {what}s ({', '.join(names)}): name one with {flag}")
    return names[0]


def check_operators(model) -> None:
    """Every node an ONNX operator: a converter that cannot express one leaves it in the graph as is."""
    import onnx

    for node in model.graph.node:
        if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type):
            raise UnsupportedOperator(f"operator {node.op_type} (node {node.name!r}, output "
                                      f"{', '.join(node.output)}) has no ONNX form; cut the graph after it "
                                      f"(--input TENSOR, the first tensor it no longer reaches) or before it "
                                      f"(--output-tensor TENSOR)")
