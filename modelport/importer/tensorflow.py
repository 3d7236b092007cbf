"""TensorFlow sources -> ONNX with tf2onnx: Keras (.keras, .h5), SavedModel, TFLite, frozen GraphDef.

Each is run in TensorFlow itself for the check. A frozen GraphDef (the retrain guide's
``output_graph.pb``) is cut at the named tensors; its ``PlaceholderWithDefault`` nodes (the guide's
bottleneck input) become what they default to. Where the graph decodes the JPEG itself before the
cut, the check runs it from the JPEG, so the bundle's own preprocessing is checked against the
graph's.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from modelport.errors import BadInput, MissingExtra
from modelport.importer.preprocess import from_keras_name
from modelport.importer.source import OPSET, Converted, UnsupportedOperator, check_operators

_EXTRA = "importing TensorFlow, Keras and TFLite models needs the tensorflow extra: pip install 'modelport[tensorflow]'"


def _tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
        import tf2onnx
    except ImportError:
        raise MissingExtra(_EXTRA) from None
    # Their warnings are about their own internals (deprecations, shapes they guess); what matters
    # to the user (an operator without an ONNX form) is raised as our error.
    tf.get_logger().setLevel(logging.ERROR)
    logging.getLogger("tf2onnx").setLevel(logging.CRITICAL)
    return tf, tf2onnx


def _converter() -> str:
    tf, tf2onnx = _tf()
    return f"tf2onnx {tf2onnx.__version__} (TensorFlow {tf.__version__}, opset {OPSET})"


def keras(path: Path) -> Converted:
    tf, tf2onnx = _tf()
    import keras as keras_module

    try:
        model = keras_module.models.load_model(path, compile=False)
    except Exception as exc:
        raise BadInput(f"{path}: not a Keras model Keras can load: {exc}") from None
    if len(model.inputs) != 1:
        raise BadInput(f"{path}: the model has {len(model.inputs)} inputs; an image model has one")
    spec = model.inputs[0]
    name = (getattr(spec, "name", None) or "image").split(":")[0]
    signature = (tf.TensorSpec((None, *spec.shape[1:]), spec.dtype, name=name),)
    onnx_model, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=OPSET)
    check_operators(onnx_model)

    def run(images, batch):
        return np.asarray(model(batch, training=False))

    own = from_keras_name(model.name)
    notes = [f"preprocessing of keras.applications {model.name!r}: {own.name}"] if own else []
    return Converted("keras", onnx_model, onnx_model.graph.input[0].name, onnx_model.graph.output[0].name,
                     _converter(), run, own_preprocessing=own, notes=notes)


def saved_model(path: Path, output: str | None) -> Converted:
    tf, tf2onnx = _tf()
    loaded = tf.saved_model.load(str(path))
    signature = loaded.signatures.get("serving_default")
    if signature is None:
        raise BadInput(f"{path}: the SavedModel has no 'serving_default' signature")
    _, inputs = signature.structured_input_signature
    if len(inputs) != 1:
        raise BadInput(f"{path}: serving_default takes {len(inputs)} inputs; an image model takes one")
    (input_name, spec), = inputs.items()
    outputs = sorted(signature.structured_outputs)
    output = output or (outputs[0] if len(outputs) == 1 else None)
    if output not in outputs:
        raise BadInput(f"{path}: name the output with --output-tensor; serving_default has {', '.join(outputs)}")
    function = tf.function(lambda x: signature(**{input_name: x})[output],
                           input_signature=[tf.TensorSpec((None, *spec.shape[1:]), spec.dtype, name=input_name)])
    onnx_model, _ = tf2onnx.convert.from_function(function, input_signature=function.input_signature,
                                                  opset=OPSET, output_path=None)
    check_operators(onnx_model)

    def run(images, batch):
        return signature(**{input_name: tf.constant(batch)})[output].numpy()

    return Converted("savedmodel", onnx_model, onnx_model.graph.input[0].name, onnx_model.graph.output[0].name,
                     _converter(), run)


def tflite(path: Path) -> Converted:
    tf, tf2onnx = _tf()
    onnx_model, _ = tf2onnx.convert.from_tflite(str(path), opset=OPSET)
    check_operators(onnx_model)
    interpreter = tf.lite.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    (inp,), out = interpreter.get_input_details(), interpreter.get_output_details()[0]

    def run(images, batch):
        rows = []
        for row in batch:  # a TFLite graph is usually fixed at a batch of one
            interpreter.set_tensor(inp["index"], row[None].astype(inp["dtype"]))
            interpreter.invoke()
            rows.append(interpreter.get_tensor(out["index"])[0])
        return np.stack(rows)

    return Converted("tflite", onnx_model, onnx_model.graph.input[0].name, onnx_model.graph.output[0].name,
                     _converter(), run)


def graph_def(path: Path, input: str | None, output: str | None) -> Converted:
    tf, tf2onnx = _tf()
    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(path.read_bytes())
    except Exception as exc:
        raise BadInput(f"{path}: not a frozen TensorFlow GraphDef: {exc}") from None
    _defaults_to_identity(graph_def)
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    input = _tensor(graph, input, "input") or _only(graph, "Placeholder", "--input")
    output = _tensor(graph, output, "output") or _only_sink(graph)
    onnx_model, _ = tf2onnx.convert.from_graph_def(graph_def, input_names=[input], output_names=[output], opset=OPSET)
    try:
        check_operators(onnx_model)
    except UnsupportedOperator as exc:
        cut = _cut_after(graph, input)
        raise UnsupportedOperator(exc.message + (f"; for this graph: --input {cut}" if cut else "")) from None
    contents = _encoded_input(graph, input)
    session = tf.compat.v1.Session(graph=graph)
    fixed = graph.get_tensor_by_name(input).shape[0] == 1

    def run(images, batch):
        if fixed:  # the guide's graph takes a batch of one
            return np.concatenate([session.run(output, {input: row[None]}) for row in batch])
        return session.run(output, {input: batch})

    def own_input(images):  # the graph's own decode, resize and normalisation of each JPEG
        return np.concatenate([session.run(input, {contents: data}) for data in images])

    notes = ["the graph decodes the JPEG itself: the check compares its input with modelport's"] if contents else []
    return Converted("graphdef", onnx_model, onnx_model.graph.input[0].name, onnx_model.graph.output[0].name,
                     _converter(), run, own_input=own_input if contents is not None else None, notes=notes)


def _defaults_to_identity(graph_def) -> None:
    """PlaceholderWithDefault -> Identity of its default: the bottleneck input of the retrain guide's
    graph is fed by the graph's own pooling when nothing overrides it."""
    for node in graph_def.node:
        if node.op == "PlaceholderWithDefault":
            node.op = "Identity"
            node.attr["T"].type = node.attr["dtype"].type
            del node.attr["dtype"]
            del node.attr["shape"]


def _tensor(graph, name: str | None, what: str) -> str | None:
    if name is None:
        return None
    name = name if ":" in name else name + ":0"
    try:
        graph.get_tensor_by_name(name)
    except (KeyError, ValueError):
        raise BadInput(f"no tensor {name!r} in the graph for the {what}") from None
    return name


def _only(graph, op_type: str, flag: str) -> str:
    found = [op.outputs[0].name for op in graph.get_operations() if op.type == op_type]
    if len(found) != 1:
        raise BadInput(f"name the graph's input tensor with {flag} (e.g. Mul:0 for the retrain guide's graph); "
                       f"placeholders: {', '.join(found) or 'none'}")
    return found[0]


def _only_sink(graph) -> str:
    consumed = {t.name for op in graph.get_operations() for t in op.inputs}
    sinks = [op.outputs[0].name for op in graph.get_operations() if op.outputs and op.outputs[0].name not in consumed
             and op.type not in ("Const", "NoOp", "Assert", "SaveV2", "RestoreV2")]
    if len(sinks) != 1:
        raise BadInput(f"name the graph's output tensor with --output-tensor (e.g. final_result:0); "
                       f"candidates: {', '.join(sinks[:10]) or 'none'}")
    return sinks[0]


def _encoded_input(graph, input: str):
    """The string placeholder the input tensor is computed from (the graph decodes images), if any."""
    seen, stack = set(), [graph.get_tensor_by_name(input).op]
    while stack:
        op = stack.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        if op.type == "Placeholder" and op.outputs[0].dtype.name == "string":
            return op.outputs[0].name
        stack.extend(t.op for t in op.inputs)
    return None


def _cut_after(graph, start: str) -> str | None:
    """Where an image model's graph can be cut after its decoding: the last float tensor of
    shape [N, H, W, 3] on the way from ``start`` to the first convolution."""
    cut, op = None, graph.get_tensor_by_name(start).op
    for _ in range(64):
        outputs = [t for t in op.outputs if t.dtype.is_floating and t.shape.rank == 4 and t.shape[-1] == 3]
        if outputs:
            cut = outputs[0].name
        consumers = [c for t in op.outputs for c in t.consumers()]
        if len(consumers) != 1 or consumers[0].type.startswith("Conv"):
            break
        op = consumers[0]
    return cut
