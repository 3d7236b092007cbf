"""ONNX Runtime session: created once per loaded model."""

from __future__ import annotations

import os
import threading

import numpy as np
import onnxruntime as ort

from modelport.runtime.device import CPU, Device
from modelport.errors import BundleError
from modelport.runtime import TensorSpec

_ORT_TO_V2 = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64", "tensor(int8)": "INT8",
    "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


class OnnxRuntime:
    platform = "onnx_onnxv1"
    pure_compute = True  # time grows with the input, never waits on I/O: tiny models may run inline
    engine = "onnxruntime"
    can_share_arena = True  # sessions of one model may share one CPU memory arena (see shared_arena)
    can_run_thin = True  # a second, thin session serves batches that run beside others

    def __init__(self, model_path: str | os.PathLike, *, threads: int | None = None, bundle=None,
                 device: Device = CPU, shared_arena: bool = False) -> None:
        providers = device.onnx_providers()  # a GPU asked for and missing fails here, with what is missing
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        # Spinning workers burn the cores that image decoding needs between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if shared_arena:
            # The process's one CPU arena instead of the session's own: a model's full batch never
            # runs beside its thin ones, so the memory the one used serves the others (docs/
            # decisions.md, "Batches side by side by default").
            _register_shared_arena()
            options.add_session_config_entry("session.use_env_allocators", "1")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(os.fspath(model_path), options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for every kind of bad file
            raise BundleError(f"{model_path}: ONNX Runtime cannot load it: {exc}") from None
        self.device = str(device) if "CUDAExecutionProvider" in self._session.get_providers() else "cpu"
        self.inputs = [_spec(i) for i in self._session.get_inputs()]
        self.outputs = [_spec(o) for o in self._session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        names = output_names or [o.name for o in self.outputs]
        return dict(zip(names, self._session.run(names, feeds)))

    def close(self) -> None:
        self._session = None


_arena_lock = threading.Lock()
_arena_registered = False


def _register_shared_arena() -> None:
    """ONNX Runtime's environment-wide CPU arena, registered once per process (default settings:
    it grows by powers of two and keeps what it holds, as a session's own arena does)."""
    global _arena_registered
    with _arena_lock:
        if not _arena_registered:
            cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(cpu, ort.OrtArenaCfg(0, -1, -1, -1))
            _arena_registered = True


def _spec(node) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else -1 for d in node.shape)
    return TensorSpec(node.name, _ORT_TO_V2.get(node.type, node.type), shape)
