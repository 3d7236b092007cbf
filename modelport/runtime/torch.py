"""PyTorch runtime: a TorchScript archive (``torch.jit.save``) on the CPU.

TorchScript has no signature to read, so the bundle describes it: the input is the image input
of ``modelport.toml`` (name, dtype, layout, size), and ``outputs = ["probabilities", "features"]``
names what ``forward`` returns, in order (a tensor, a tuple of tensors, or a dict). Output shapes
are learned from one run at load.

Only TorchScript archives are loaded. A plain ``torch.save`` file is a pickle, and unpickling runs
whatever code it names: such files are refused before torch sees them, never loaded as a fallback.
This module is imported only for ``runtime = "torch"`` bundles: an ONNX-only install never imports
torch.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path

import numpy as np

from modelport.runtime.device import CPU, Device
from modelport.errors import BundleError, MissingExtra
from modelport.runtime import NUMPY_TO_V2, V2_TO_NUMPY, TensorSpec

_DTYPES = {"uint8": "UINT8", "float32": "FP32"}
_threads_set = False


def check_torchscript(path: Path) -> None:
    """A TorchScript archive is a zip with a ``code/`` directory; ``torch.save`` files have none."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        names = []
    if not any("/code/" in name or name.startswith("code/") for name in names):
        raise BundleError(f"{path}: not a TorchScript archive. modelport loads only TorchScript "
                          f"(torch.jit.script or torch.jit.trace, then torch.jit.save); plain torch.save files "
                          f"are pickles, which run arbitrary code when loaded, and are refused")


class TorchRuntime:
    platform = "pytorch_torchscript"
    pure_compute = True

    def __init__(self, model_path: str | os.PathLike, *, threads: int | None = None, bundle=None,
                 device: Device = CPU) -> None:
        path = Path(model_path)
        check_torchscript(path)
        try:
            import torch
        except ImportError:
            raise MissingExtra("runtime = \"torch\" needs PyTorch: pip install 'modelport[torch]'") from None
        self._torch = torch
        self._device = self.device = device.torch_device(torch)  # a GPU asked for and missing fails here        _set_threads(torch, threads or os.cpu_count() or 1)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 points at torch.export
                self._module = torch.jit.load(str(path), map_location=self._device).eval()
        except Exception as exc:  # torch raises RuntimeError and others for damaged archives
            raise BundleError(f"{path}: PyTorch cannot load it: {str(exc).splitlines()[0]}") from None
        image = bundle.input if bundle is not None else None
        name = (image.name if image and image.name else "image")
        dtype = image.dtype if image else "float32"
        height, width = (image.height, image.width) if image else (224, 224)
        if image is not None and image.kind == "tensor":
            shape = (-1, image.size)
        elif image is None or image.layout == "NHWC":
            shape = (-1, height, width, 3)
        else:
            shape = (-1, 3, height, width)
        self.inputs = [TensorSpec(name, _DTYPES[dtype], shape)]
        self._output_names = list(bundle.outputs) if bundle is not None and bundle.outputs else \
            [bundle.output.name if bundle is not None and bundle.output.name else "output"]
        # One run on zeros tells the output shapes and dtypes (and loads the kernels).
        probe = np.zeros((1, *shape[1:]), dtype=V2_TO_NUMPY[self.inputs[0].datatype])
        try:
            produced = self._call(probe)
        except BundleError:
            raise
        except Exception as exc:
            raise BundleError(f"{path}: forward() failed on a zero batch of shape {list(probe.shape)}: "
                              f"{str(exc).splitlines()[0]}") from None
        self.outputs = [TensorSpec(n, NUMPY_TO_V2.get(a.dtype, "FP32"), (-1, *a.shape[1:]))
                        for n, a in produced.items()]

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        outputs = self._call(feeds[self.inputs[0].name])
        return {n: outputs[n] for n in (output_names or self._output_names)}

    def _call(self, array: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            result = self._module(torch.from_numpy(np.ascontiguousarray(array)).to(self._device))
        if isinstance(result, torch.Tensor):
            result = (result,)
        if isinstance(result, dict):
            result = tuple(result[n] for n in self._output_names)
        if not isinstance(result, (tuple, list)) or len(result) != len(self._output_names):
            raise BundleError(f"forward() returned {len(result) if isinstance(result, (tuple, list)) else 'no'} "
                              f"tensors, but modelport.toml names {len(self._output_names)}: "
                              f"outputs = {self._output_names}")
        return {n: t.detach().cpu().numpy() for n, t in zip(self._output_names, result)}

    def close(self) -> None:
        self._module = None


def _set_threads(torch, threads: int) -> None:
    # Process-wide in torch: set once, like ORT's per-session setting (one thread per core).
    global _threads_set
    if not _threads_set:
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set, or inter-op work already started
            pass
        _threads_set = True
