"""One ONNX graph: the backbone up to its pooled features, the new head, the calibrated softmax.

The backbone's own classifier is pruned away; ``features`` stays an output, so a retrained model
can itself be a backbone or feed a cascade.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from modelport.retrain.head import Head

FEATURES = "features"
PROBABILITIES = "probabilities"


def compose(backbone_file: Path, head: Head, target: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(backbone_file))
    graph = model.graph
    keep = _ancestors(graph, FEATURES)
    nodes = [n for i, n in enumerate(graph.node) if i in keep]
    used = {name for n in nodes for name in n.input}
    initializers = [t for t in graph.initializer if t.name in used]

    prefix = "retrain_head_"
    new_nodes = [
        helper.make_node("MatMul", [FEATURES, prefix + "weights"], [prefix + "matmul"]),
        helper.make_node("Add", [prefix + "matmul", prefix + "bias"], [prefix + "logits"]),
        # Calibration: softmax(logits / T), stored as a multiplication by 1 / T.
        helper.make_node("Mul", [prefix + "logits", prefix + "inv_temperature"], [prefix + "scaled"]),
        helper.make_node("Softmax", [prefix + "scaled"], [PROBABILITIES], axis=1),
    ]
    initializers += [
        numpy_helper.from_array(head.weights.astype(np.float32), prefix + "weights"),
        numpy_helper.from_array(head.bias.astype(np.float32), prefix + "bias"),
        numpy_helper.from_array(np.array(1.0 / head.temperature, dtype=np.float32), prefix + "inv_temperature"),
    ]
    classes = head.weights.shape[1]
    features_info = next(o for o in graph.output if o.name == FEATURES)
    outputs = [helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, ["batch", classes]), features_info]
    new_graph = helper.make_graph(nodes + new_nodes, graph.name + "_retrained", list(graph.input), outputs,
                                  initializer=initializers)
    new_model = helper.make_model(new_graph, opset_imports=model.opset_import, producer_name="modelport retrain")
    new_model.ir_version = model.ir_version
    onnx.checker.check_model(new_model)
    onnx.save(new_model, str(target))


def _ancestors(graph, output: str) -> set[int]:
    """Indexes of the nodes that ``output`` depends on (protobuf hands out new wrappers on every
    access, so node identity cannot be used)."""
    nodes = list(graph.node)
    producer = {name: i for i, node in enumerate(nodes) for name in node.output}
    keep: set[int] = set()
    stack = [output]
    seen = set()
    while stack:
        name = stack.pop()
        if name in seen or name not in producer:
            continue
        seen.add(name)
        keep.add(producer[name])
        stack.extend(nodes[producer[name]].input)
    return keep
