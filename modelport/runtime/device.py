"""Where a model's batches run: ``cpu``, ``cuda`` / ``cuda:N`` (an NVIDIA GPU), or ``auto``.

Decoding and preprocessing always stay on the CPU; only the runtime's batches move. Asking for a
GPU that is not there fails at start with what is missing; only ``auto`` falls back to the CPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from modelport.errors import BundleError, MissingExtra

_PATTERN = re.compile(r"cpu|auto|cuda(?::(\d{1,2}))?")


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu", "cuda" or "auto"
    index: int = 0

    @classmethod
    def parse(cls, text: str) -> "Device":
        match = _PATTERN.fullmatch(text.strip().lower()) if isinstance(text, str) else None
        if match is None:
            raise BundleError(f"device {text!r} is not one of cpu, cuda, cuda:N, auto")
        kind = text.strip().lower().split(":")[0]
        return cls(kind, int(match.group(1) or 0))

    def __str__(self) -> str:
        return f"cuda:{self.index}" if self.kind == "cuda" else self.kind

    # -- per runtime ------------------------------------------------------------------------------

    def onnx_providers(self) -> list:
        """ONNX Runtime execution providers for this device (CPU last, for the ops CUDA lacks)."""
        if self.kind == "cpu":
            return ["CPUExecutionProvider"]
        import onnxruntime as ort

        available = ort.get_available_providers()
        if "CUDAExecutionProvider" in available and _cuda_devices_onnx() > self.index:
            return [("CUDAExecutionProvider", {"device_id": self.index}), "CPUExecutionProvider"]
        if self.kind == "auto":
            return ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" not in available:
            raise MissingExtra(f"--device {self} needs ONNX Runtime with CUDA: pip install 'modelport[gpu]' "
                               f"(onnxruntime-gpu) on a machine with an NVIDIA GPU; this onnxruntime offers "
                               f"{', '.join(available)} (or use --device cpu / auto)")
        raise BundleError(f"--device {self}: no such NVIDIA GPU here ({_cuda_devices_onnx()} visible); "
                          f"use --device cpu or auto")

    def torch_device(self, torch) -> str:
        if self.kind == "cpu":
            return "cpu"
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count > self.index:
            return f"cuda:{self.index}"
        if self.kind == "auto":
            return "cpu"
        raise BundleError(f"--device {self}: PyTorch sees {count} CUDA device(s) (torch {torch.__version__}"
                          f"{', a CPU-only build' if not torch.backends.cuda.is_built() else ''}); use --device cpu "
                          f"or auto")


CPU = Device("cpu")


def _cuda_devices_onnx() -> int:
    """GPUs the CUDA driver reports (without importing torch): 0 when there is no driver."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value
