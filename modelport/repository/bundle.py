"""Model bundles: ``<name>/<version>/`` holding the model file, ``labels.txt`` and ``modelport.toml``.

A bundle is plain files; this module reads and validates them without loading the runtime.
Checks that need the runtime (label count against output width, input shape) happen in
:mod:`modelport.model` when the bundle is loaded. See ``docs/bundle-format.md``.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelport import untrusted
from modelport.runtime.device import Device
from modelport.errors import BundleError
from modelport.runtime import RUNTIMES
from modelport.runtime.precision import ENGINE_CHOICES, PRECISIONS

CONFIG_FILE = "modelport.toml"
FORMAT_VERSION = 1

_INPUT_KINDS = ("image", "tensor")
_LAYOUTS = ("NHWC", "NCHW")
_DTYPES = ("uint8", "float32")
_CHANNEL_ORDERS = ("RGB", "BGR")
_OUTPUT_KINDS = ("probabilities", "logits")


@dataclass(frozen=True)
class ImageInput:
    """How an encoded image becomes the tensor the graph takes.

    ``kind = "tensor"`` marks a model that takes no images, only tensors (a classifier head fed
    with another model's features, in a pipeline chain); ``size`` is then the number of values per
    row, for runtimes without a signature to read it from (TorchScript).
    """

    name: str | None = None  # graph input name; None = the graph's first input
    kind: str = "image"
    size: int = 0
    height: int = 224
    width: int = 224
    # Shorter side is resized to this, then the centre height x width is cropped. 0 = resize the
    # whole image straight to height x width (no crop, aspect ratio not kept).
    resize_shorter: int = 256
    channel_order: str = "RGB"
    layout: str = "NHWC"
    dtype: str = "uint8"
    # Only for dtype float32: x = (pixel - mean) / std, per channel, pixel in 0..255.
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class Output:
    name: str | None = None  # graph output name; None = the graph's first output
    kind: str = "probabilities"


@dataclass(frozen=True)
class Serving:
    top_k: int = 5
    max_batch_size: int = 16
    max_delay_ms: float = 5.0
    max_queue_size: int = 256
    # Set: the batcher chooses batch size and waits itself to keep p99 under this, and refuses
    # at once what would miss it (max_delay_ms is then unused; max_batch_size stays the hard cap).
    latency_slo_ms: float | None = None
    device: str = "cpu"  # cpu | cuda | cuda:N | auto; `serve --device` overrides it
    # Batches run at once. Unset: 2 for an ONNX model of at most 100 MB on a CPU of 2+ cores
    # without a latency SLO, else 1. Above 1, batches side by side each run "thin" on cores / N threads and at most
    # max_batch_size / N rows; a lone batch keeps every core (see batching.Batcher).
    concurrent_batches: int | None = None
    # The engine of an ONNX bundle and its precision (runtime/precision.py): auto | onnxruntime |
    # openvino, and auto | fp32 | bf16 | int8; `serve --runtime` / `--precision` override them.
    runtime: str = "auto"
    precision: str = "auto"


@dataclass(frozen=True)
class Bundle:
    path: Path
    name: str
    version: int
    runtime: str
    model_file: Path
    labels: tuple[str, ...]
    input: ImageInput
    output: Output
    serving: Serving
    metadata: dict[str, Any] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()  # runtimes without a signature (TorchScript): forward()'s outputs, in order


def load_bundle(path: str | Path, *, name: str | None = None) -> Bundle:
    """Read and validate the bundle in ``path`` (a version directory)."""
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise BundleError(f"{config_path}: missing (every bundle needs a {CONFIG_FILE})")
    try:
        raw = tomllib.loads(config_path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{config_path}: not valid TOML: {exc}") from None

    reader = _Reader(config_path, raw)
    fmt = reader.get("format", int, FORMAT_VERSION)
    if fmt != FORMAT_VERSION:
        raise BundleError(f"{config_path}: format = {fmt} is not supported (this modelport reads {FORMAT_VERSION})")
    runtime = reader.get("runtime", str, "onnx")
    if runtime not in RUNTIMES:
        raise BundleError(f"{config_path}: unknown runtime {runtime!r}; expected one of {', '.join(sorted(RUNTIMES))}")
    model_file = path / reader.get("model_file", str, "model.onnx")
    labels_file = path / reader.get("labels_file", str, "labels.txt")
    version = reader.get("version", int, _version_from_dir(path))
    bundle_name = reader.get("name", str, _name_from_dir(path))
    if name is not None:  # a repository names its models by directory
        bundle_name = name
    image_input = _section(reader, "input", ImageInput)
    output = _section(reader, "output", Output)
    serving = _section(reader, "serving", Serving)
    metadata = reader.get("metadata", dict, {})
    outputs = reader.get("outputs", list, [])
    if not all(isinstance(o, str) and o for o in outputs) or len(set(outputs)) != len(outputs):
        raise BundleError(f"{config_path}: outputs must be a list of distinct output names, got {outputs!r}")
    reader.reject_unknown()

    _check_choice(config_path, "input.kind", image_input.kind, _INPUT_KINDS)
    if image_input.kind == "tensor" and runtime == "torch" and image_input.size < 1:
        raise BundleError(f"{config_path}: a TorchScript model with input.kind = \"tensor\" needs input.size "
                          f"(values per row): TorchScript has no signature to read it from")
    _check_choice(config_path, "input.layout", image_input.layout, _LAYOUTS)
    _check_choice(config_path, "input.dtype", image_input.dtype, _DTYPES)
    _check_choice(config_path, "input.channel_order", image_input.channel_order, _CHANNEL_ORDERS)
    _check_choice(config_path, "output.kind", output.kind, _OUTPUT_KINDS)
    _check_choice(config_path, "serving.runtime", serving.runtime, ENGINE_CHOICES)
    _check_choice(config_path, "serving.precision", serving.precision, PRECISIONS)
    for key, value in (("input.height", image_input.height), ("input.width", image_input.width),
                       ("serving.top_k", serving.top_k), ("serving.max_batch_size", serving.max_batch_size),
                       ("serving.max_queue_size", serving.max_queue_size),
                       ("serving.concurrent_batches", serving.concurrent_batches)):
        if value is not None and value < 1:
            raise BundleError(f"{config_path}: {key} = {value} must be at least 1")
    if image_input.resize_shorter and image_input.resize_shorter < min(image_input.height, image_input.width):
        raise BundleError(f"{config_path}: input.resize_shorter = {image_input.resize_shorter} is smaller than the crop "
                          f"{image_input.height}x{image_input.width}")
    try:
        Device.parse(serving.device)
    except BundleError as exc:
        raise BundleError(f"{config_path}: serving.{exc.message}") from None
    if serving.latency_slo_ms is not None and not 0 < serving.latency_slo_ms < math.inf:
        raise BundleError(f"{config_path}: serving.latency_slo_ms = {serving.latency_slo_ms} must be a positive number "
                          f"of milliseconds")
    if any(s == 0 for s in image_input.std):
        raise BundleError(f"{config_path}: input.std must not contain 0")

    if not model_file.is_file():
        raise BundleError(f"{model_file}: model file missing (named by model_file in {config_path})")
    labels = _read_labels(labels_file)
    return Bundle(path=path, name=bundle_name, version=version, runtime=runtime, model_file=model_file,
                  labels=labels, input=image_input, output=output, serving=serving, metadata=metadata,
                  outputs=tuple(outputs))


def write_config(path: Path, config: dict[str, Any]) -> None:
    """Write ``modelport.toml``. Values are limited to what bundles use: str, int, float, lists, tables."""
    lines: list[str] = []
    tables = {k: v for k, v in config.items() if isinstance(v, dict)}
    for key, value in config.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {_toml_value(value)}")
    for table, values in tables.items():
        lines.append(f"\n[{table}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
    (path / CONFIG_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _read_labels(labels_file: Path) -> tuple[str, ...]:
    if not labels_file.is_file():
        raise BundleError(f"{labels_file}: labels file missing (one label per line, in output order)")
    try:
        text = labels_file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BundleError(f"{labels_file}: not UTF-8 text") from None
    labels = tuple(line.strip() for line in text.splitlines())
    while labels and not labels[-1]:
        labels = labels[:-1]
    if not labels:
        raise BundleError(f"{labels_file}: no labels")
    if blank := [i + 1 for i, label in enumerate(labels) if not label]:
        raise BundleError(f"{labels_file}: blank label on line {blank[0]}")
    return labels


def _version_from_dir(path: Path) -> int:
    return int(path.name) if untrusted.ascii_digits(path.name) else 1


def _name_from_dir(path: Path) -> str:
    return path.parent.name if untrusted.ascii_digits(path.name) else path.name


def _check_choice(config_path: Path, key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise BundleError(f"{config_path}: {key} = {value!r}; expected one of {', '.join(choices)}")


def _section(reader: "_Reader", table: str, cls: type) -> Any:
    raw = reader.get(table, dict, {})
    sub = _Reader(reader.config_path, raw, prefix=f"{table}.")
    kwargs = {}
    for name, default in cls.__dataclass_fields__.items():
        default_value = default.default
        if isinstance(default_value, tuple):
            value = sub.get(name, list, None)
            if value is not None:
                if len(value) != len(default_value) or not all(isinstance(v, (int, float)) for v in value):
                    raise BundleError(f"{reader.config_path}: {table}.{name} must be a list of "
                                      f"{len(default_value)} numbers")
                kwargs[name] = tuple(float(v) for v in value)
            continue
        number = default_value.__class__ is float or str(default.type).startswith("float")
        integer = str(default.type).startswith("int")
        expected = (int, float) if number else int if integer else type(default_value) if default_value is not None else str
        value = sub.get(name, expected, None)
        if value is not None:
            kwargs[name] = float(value) if number else value
    sub.reject_unknown()
    return cls(**kwargs)


class _Reader:
    """Typed access to a TOML table that remembers which keys were read, so typos are errors."""

    def __init__(self, config_path: Path, raw: dict, prefix: str = "") -> None:
        self.config_path = config_path
        self.raw = raw
        self.prefix = prefix
        self.seen: set[str] = set()

    def get(self, key: str, expected: type | tuple[type, ...], default: Any) -> Any:
        self.seen.add(key)
        if key not in self.raw:
            return default
        value = self.raw[key]
        # bool is an int subclass in Python; a bool where a number belongs is a mistake.
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            names = expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)
            raise BundleError(f"{self.config_path}: {self.prefix}{key} must be {names}, got {value!r}")
        return value

    def reject_unknown(self) -> None:
        unknown = sorted(set(self.raw) - self.seen)
        if unknown:
            raise BundleError(f"{self.config_path}: unknown key {self.prefix}{unknown[0]}")
