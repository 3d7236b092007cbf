"""OpenVINO on the CPU, for the same ``model.onnx`` ONNX Runtime reads (the ``openvino`` extra).

OpenVINO reads the ONNX file itself: no conversion step, no IR file. Precision is the CPU
plugin's inference precision: ``fp32`` (exact, as ONNX Runtime), ``bf16`` (where the CPU computes
it natively: AMX or AVX-512 BF16), or ``int8`` for a quantized graph (its QDQ nodes run as
integer kernels; the layers left in float at bf16 where that is native, as the version's gate
measured them there, else at fp32: see ``optimize``).
"""

from __future__ import annotations

import os
import queue
from pathlib import Path

import numpy as np

from modelport.runtime.device import CPU, Device
from modelport.errors import BundleError, MissingExtra
from modelport.runtime import TensorSpec

try:
    import openvino as ov
except ImportError:  # the extra is missing: say how to get it, at load
    ov = None

PRECISIONS = ("fp32", "bf16", "int8")

_OV_TO_V2 = {
    "boolean": "BOOL", "u8": "UINT8", "u16": "UINT16", "u32": "UINT32", "u64": "UINT64", "i8": "INT8",
    "i16": "INT16", "i32": "INT32", "i64": "INT64", "f16": "FP16", "f32": "FP32", "f64": "FP64",
    "string": "BYTES",
}

_core = None
CACHE_MAX_BYTES = 512 * 1024 * 1024  # compiled models kept for the next load; the oldest go first


def core():
    """One OpenVINO Core per process, with compiled models cached under $MODELPORT_HOME: a load
    that finds its model there compiles in 0.07 s instead of 0.3 s (Lite0 INT8), which is most of
    a one-shot `classify`'s start. The cache is keyed by the model's content and the settings."""
    global _core
    if ov is None:
        raise MissingExtra("runtime = \"openvino\" needs OpenVINO: pip install 'modelport[openvino]'")
    if _core is None:
        _core = ov.Core()
        cache = _cache_dir()
        if cache is not None:
            _core.set_property({"CACHE_DIR": str(cache)})
    return _core


def _cache_dir() -> Path | None:
    """$MODELPORT_HOME/cache/openvino, trimmed to CACHE_MAX_BYTES; None where it cannot be written
    (a read-only image): then every load compiles."""
    from modelport.home import model_home

    directory = model_home() / "cache" / "openvino"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK):
            return None
        blobs = sorted(directory.iterdir(), key=lambda path: path.stat().st_mtime, reverse=True)
        total = 0
        for blob in blobs:
            total += blob.stat().st_size
            if total > CACHE_MAX_BYTES:
                blob.unlink(missing_ok=True)
    except OSError:
        return None
    return directory


def available() -> bool:
    return ov is not None


class OpenVinoRuntime:
    platform = "onnx_onnxv1"  # the model's format, as for ONNX Runtime; the engine is in the metadata
    engine = "openvino"
    pure_compute = True
    can_share_arena = False
    can_run_thin = True  # a second, one-thread compiled model serves batches that run beside others

    def __init__(self, model_path: str | os.PathLike, *, threads: int | None = None, bundle=None,
                 device: Device = CPU, precision: str = "fp32", **_) -> None:
        if device.kind != "cpu":
            raise BundleError(f"{model_path}: runtime \"openvino\" runs on the CPU here; use runtime = "
                              f"\"onnxruntime\" for device {device}")
        if precision not in PRECISIONS:
            raise BundleError(f"{model_path}: precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        self.device = "cpu"
        config = {
            "INFERENCE_NUM_THREADS": threads or os.cpu_count() or 1,
            # One stream, one request at a time per batch: the batcher decides what runs at once
            # (docs/decisions.md, "OpenVINO beside ONNX Runtime").
            "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
        }
        if precision == "int8":
            # Its float layers: bf16 where native (as its gate measured them there), else f32; asked
            # for explicitly, so that MODELPORT_CPU_FLAGS pins them too.
            from modelport.runtime.precision import native_bf16

            precision = "bf16" if native_bf16() else "fp32"
        config["INFERENCE_PRECISION_HINT"] = {"fp32": "f32", "bf16": "bf16"}[precision]
        try:
            model = core().read_model(os.fspath(model_path))
            self._compiled = core().compile_model(model, "CPU", config)
        except MissingExtra:
            raise
        except Exception as exc:  # OpenVINO raises RuntimeError for every kind of bad file
            raise BundleError(f"{model_path}: OpenVINO cannot load it: {exc}") from None
        self.inputs = [_spec(port) for port in self._compiled.inputs]
        self.outputs = [_spec(port) for port in self._compiled.outputs]
        self._output_index = {o.name: i for i, o in enumerate(self.outputs)}
        self._all_outputs = [o.name for o in self.outputs]
        # Infer requests are not to be shared by threads at once: a small pool, one per caller.
        self._requests: queue.SimpleQueue = queue.SimpleQueue()

    @property
    def inference_precision(self) -> str:
        """What the plugin computes the float layers in, read back from the compiled model."""
        name = self._compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        return {"f32": "fp32", "f16": "fp16"}.get(name, name)

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        names = output_names or self._all_outputs
        try:
            request = self._requests.get_nowait()
        except queue.Empty:
            request = self._compiled.create_infer_request()
        try:
            # share_inputs: no copy of the batch; the outputs are copied (the request is reused).
            results = request.infer(feeds, share_inputs=True)
            return {name: np.array(results[self._output_index[name]]) for name in names}
        finally:
            self._requests.put(request)

    def close(self) -> None:
        self._requests = queue.SimpleQueue()
        self._compiled = None


def _spec(port) -> TensorSpec:
    shape = tuple(d.get_length() if d.is_static else -1 for d in port.get_partial_shape())
    kind = port.get_element_type().get_type_name()
    return TensorSpec(port.get_any_name(), _OV_TO_V2.get(kind, kind.upper()), shape)
