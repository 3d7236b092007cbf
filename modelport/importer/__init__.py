"""Bring your own model: ONNX, TorchScript, a PyTorch ``nn.Module``, a TensorFlow SavedModel, Keras
(.keras, .h5), TFLite, or a frozen GraphDef becomes a checked bundle, the next version in a repository.

    modelport import output_graph.pb --labels output_labels.txt --input Mul:0 \\
        --output-tensor final_result:0 --preprocess inception

    from modelport.importer import import_model
    import_model(net, example_input=torch.zeros(1, 3, 224, 224), labels="labels.txt", name="pets",
                 preprocess="torchvision")

The bundle is written under a hidden name and renamed, like every version. Before that, the check
(``check.py``) runs the source in its own framework and the bundle through modelport's decode path
on the same photos; a disagreement beyond tolerance writes nothing (``ImportRejected``, exit 1).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from modelport.errors import BadInput
from modelport.importer import torch as torch_sources
from modelport.importer.check import ImportRejected, Report, compare
from modelport.importer.preprocess import Preprocessing, custom, preset
from modelport.importer.source import Converted, graph_tensor
from modelport.repository import layout
from modelport.repository.bundle import write_config

__all__ = ["ImportRejected", "ImportResult", "import_model"]
CHECK_PHOTOS = 32
REPORT_FILE = "import-report.json"


@dataclass
class ImportResult:
    path: Path  # the new version's directory
    version: int
    report: Report
    converted: Converted


def import_model(source, *, labels: str | Path | None = None, name: str | None = None, output: str | Path = "models",
                 input: str | None = None, output_tensor: str | None = None, image_size: int | None = None,
                 preprocess: str | None = None, mean: tuple[float, float, float] | None = None,
                 std: tuple[float, float, float] | None = None, example_input=None,
                 check_images: str | Path | None = None, min_agreement: float = 0.98,
                 max_difference: float = 0.05, progress=lambda message: None) -> ImportResult:
    """Convert, write, check and publish; see the module's docstring."""
    flags = _flag_preprocessing(preprocess, mean, std)
    name = layout.check_name(name or _default_name(source))
    progress(f"converting {_describe(source)}")
    converted = _convert(source, input, output_tensor, image_size, example_input)
    graph = _Graph(converted, input if converted.kind == "onnx" else None, output_tensor if converted.kind == "onnx" else None,
                   image_size)
    chosen = flags or converted.own_preprocessing
    if graph.dtype == "float32" and chosen is None:
        raise BadInput(f"say how pixels become this model's {graph.dtype} input: --preprocess "
                       f"{'|'.join(['inception', 'keras-mobilenet', 'torchvision', 'caffe', 'unit', 'raw'])} "
                       f"(or --mean and --std)")
    chosen = chosen or preset("raw")
    label_list = _labels(labels, graph.classes)
    images = _check_images(check_images)

    model_dir = Path(output) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=model_dir))
    try:
        import onnx

        onnx.save(converted.onnx, str(staging / "model.onnx"))
        (staging / "labels.txt").write_text("\n".join(label_list) + "\n", encoding="utf-8")
        metadata = {"source": _describe(source), "source_kind": converted.kind, "converter": converted.converter,
                    "preprocessing": chosen.name, "preprocessing_from": "flags" if flags else "the source"}
        config = _config(name, graph, chosen, len(label_list), metadata)
        write_config(staging, {**config, "version": 1})
        progress(f"checking on {len(images)} photos")
        if converted.own_input is not None:
            compared = "the graph's own decode and normalisation at its input, the bundle's input through the rest"
        elif converted.own_preprocessing is not None:
            compared = f"the source with its own preprocessing ({converted.own_preprocessing.name})"
        else:
            compared = f"the source with the given preprocessing ({chosen.name}): the conversion checked"
        report = compare(converted, staging, images, source_preprocessing=converted.own_preprocessing or chosen,
                         logits=graph.logits, min_agreement=min_agreement, max_difference=max_difference,
                         compared=compared)
        if not report.passed:
            raise ImportRejected(report)
        (staging / REPORT_FILE).write_text(json.dumps({**report.as_dict(), "notes": converted.notes}, indent=2),
                                           encoding="utf-8")
        metadata["check"] = report.text()
        version = layout.publish(model_dir, staging, lambda v: write_config(staging, {**config, "version": v}))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ImportResult(model_dir / str(version), version, report, converted)


class _Graph:
    """The converted graph's input and output, as the bundle describes them."""

    def __init__(self, converted: Converted, input: str | None, output: str | None, image_size: int | None) -> None:
        graph = converted.onnx.graph
        initializers = {i.name for i in graph.initializer}
        inputs = [i for i in graph.input if i.name not in initializers]
        converted.input = graph_tensor(converted.onnx, input or (converted.input if len(inputs) > 1 else None),
                                       "input", [i.name for i in inputs])
        converted.output = graph_tensor(converted.onnx, output or (converted.output if len(graph.output) > 1 else None),
                                        "output", [o.name for o in graph.output])
        spec = next(i for i in inputs if i.name == converted.input).type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in spec.shape.dim]
        if len(dims) != 4 or 3 not in (dims[1], dims[3]):
            raise BadInput(f"input {converted.input!r} has shape {dims}: an image model takes [N, H, W, 3] or "
                           f"[N, 3, H, W]")
        self.name, self.output_name = converted.input, converted.output
        self.layout = "NHWC" if dims[3] == 3 else "NCHW"
        height, width = (dims[1], dims[2]) if self.layout == "NHWC" else (dims[2], dims[3])
        if height is None or width is None:
            if image_size is None:
                raise BadInput(f"input {converted.input!r} takes images of any size: give one with --image-size")
            height = width = image_size
        self.height, self.width = height, width
        self.fixed_batch = dims[0] == 1
        import onnx

        elem = spec.elem_type
        if elem not in (onnx.TensorProto.FLOAT, onnx.TensorProto.UINT8):
            raise BadInput(f"input {converted.input!r} is {onnx.TensorProto.DataType.Name(elem)}: an image model "
                           f"takes FLOAT or UINT8 pixels")
        self.dtype = "float32" if elem == onnx.TensorProto.FLOAT else "uint8"
        out = next(o for o in graph.output if o.name == converted.output).type.tensor_type
        last = out.shape.dim[-1] if out.shape.dim else None
        self.classes = last.dim_value if last is not None and last.HasField("dim_value") else None
        producer = next((n for n in graph.node if converted.output in n.output), None)
        self.logits = producer is None or producer.op_type != "Softmax"


def _convert(source, input, output_tensor, image_size, example_input) -> Converted:
    from modelport.importer import tensorflow as tf_sources

    if not isinstance(source, (str, Path)):
        if example_input is None:
            raise BadInput("a PyTorch module needs example_input= (e.g. torch.zeros(1, 3, 224, 224))")
        return torch_sources.module(source, example_input)
    path = Path(source)
    if not path.exists():
        raise BadInput(f"{path}: no such file or directory")
    suffix = path.suffix.lower()
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise BadInput(f"{path}: a directory, but not a SavedModel (no saved_model.pb)")
        return tf_sources.saved_model(path, output_tensor)
    if suffix == ".onnx":
        return torch_sources.onnx_file(path)
    if suffix in (".keras", ".h5", ".hdf5"):
        return tf_sources.keras(path)
    if suffix == ".tflite":
        return tf_sources.tflite(path)
    if suffix == ".pb":
        return tf_sources.graph_def(path, input, output_tensor)
    if torch_sources.is_torchscript(path):
        if image_size is None:
            raise BadInput(f"{path}: a TorchScript file says nothing of its input size: give --image-size")
        shape = tuple(example_input.shape) if example_input is not None else (1, 3, image_size, image_size)
        return torch_sources.torchscript(path, shape)
    raise BadInput(f"{path}: not a model file modelport imports (.onnx, TorchScript .pt, .keras, .h5, .tflite, "
                   f"a frozen GraphDef .pb, or a SavedModel directory); a plain torch.save pickle is refused")


def _flag_preprocessing(name, mean, std) -> Preprocessing | None:
    if (mean is None) != (std is None):
        raise BadInput("--mean and --std go together")
    if name is not None and mean is not None:
        raise BadInput("give --preprocess or --mean/--std, not both")
    if mean is not None:
        return custom(tuple(mean), tuple(std))
    return preset(name) if name is not None else None


def _config(name: str, graph: _Graph, chosen: Preprocessing, classes: int, metadata: dict) -> dict:
    return {
        "format": 1, "name": name, "runtime": "onnx", "model_file": "model.onnx",
        "input": {"name": graph.name, "height": graph.height, "width": graph.width,
                  "resize_shorter": chosen.geometry(graph.height, graph.width), "channel_order": chosen.channel_order,
                  "layout": graph.layout, "dtype": graph.dtype, "mean": list(chosen.mean), "std": list(chosen.std)},
        "output": {"name": graph.output_name, "kind": "logits" if graph.logits else "probabilities"},
        "serving": {"top_k": min(5, classes), **({"max_batch_size": 1} if graph.fixed_batch else {})},
        "metadata": metadata,
    }


def _labels(path, classes: int | None) -> list[str]:
    if path is None:
        if classes == 1000:
            return resources.files("modelport").joinpath("data/imagenet_labels.txt").read_text("utf-8").splitlines()
        raise BadInput(f"give the labels with --labels FILE (one per line, {classes or 'one per class'})")
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines or any(not line for line in lines):
        raise BadInput(f"{path}: one non-empty label per line")
    if classes is not None and len(lines) != classes:
        raise BadInput(f"{path} has {len(lines)} labels; the model's output has {classes} classes")
    return lines


def _check_images(directory) -> list[bytes]:
    if directory is not None:
        from modelport.folders import find_images

        paths, _ = find_images(Path(directory))
        return [p.read_bytes() for p in paths]
    from modelport import samples

    return [samples.jpeg(samples.photo("chelsea")), samples.jpeg(samples.photo("coffee")),
            *samples.photo_set(CHECK_PHOTOS - 2, objects=True)]


def _default_name(source) -> str:
    if isinstance(source, (str, Path)):
        path = Path(source)
        return (path.name if path.is_dir() else path.stem).replace(" ", "-") or "imported"
    return type(source).__name__.lower()


def _describe(source) -> str:
    return str(source) if isinstance(source, (str, Path)) else f"{type(source).__module__}.{type(source).__name__}"
