"""Runtimes, chosen by name and imported on first use.

A runtime turns a dict of named numpy arrays into a dict of named numpy arrays. Listing them as
import strings keeps an ONNX-only install from importing torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np

RUNTIMES = {
    "onnx": "modelport.runtime.onnx:OnnxRuntime",
    "python": "modelport.runtime.python:PythonRuntime",
    "torch": "modelport.runtime.torch:TorchRuntime",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # KServe V2 datatype name: FP32, UINT8, ...
    shape: tuple[int, ...]  # -1 for a variable dimension


class Runtime(Protocol):
    platform: str
    pure_compute: bool  # optional; True lets the server run very fast batches on its event loop
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def runtime_class(name: str, table: dict[str, str] = RUNTIMES) -> type:
    """The class ``table`` names (``RUNTIMES``, or an engine table), imported on first use."""
    module_name, _, attr = table[name].partition(":")
    return getattr(importlib.import_module(module_name), attr)


# KServe V2 datatype names <-> numpy dtypes.
V2_TO_NUMPY = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8), "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
NUMPY_TO_V2 = {dtype: name for name, dtype in V2_TO_NUMPY.items()}
