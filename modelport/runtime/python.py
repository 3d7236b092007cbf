"""Custom Python models: ``runtime = "python"``, ``model_file = "model.py"``.

The file defines a class ``Model``; modelport makes one instance per load. Loading runs the
file's code, so serve only files you trust (as with any pickle or TorchScript file). The
contract, checked at load time::

    import numpy as np
    from modelport.runtime import TensorSpec

    class Model:
        inputs = [TensorSpec("image", "UINT8", (-1, 224, 224, 3))]
        outputs = [TensorSpec("logits", "FP32", (-1, 10))]

        def __init__(self, bundle_dir):          # the bundle directory, for weights and such
            ...

        def run(self, feeds):                     # {"image": array} -> {"logits": array}
            return {"logits": ...}
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

from modelport.runtime.device import CPU, Device
from modelport.errors import BundleError
from modelport.runtime import TensorSpec

_EXAMPLE = __doc__[__doc__.index("    import numpy"):]


class PythonRuntime:
    platform = "python"

    def __init__(self, model_path: str | os.PathLike, *, threads: int | None = None, bundle=None,
                 device: Device = CPU) -> None:
        path = Path(model_path)
        if device.kind == "cuda":  # custom code picks its own device; saying cuda here would be a promise we cannot keep
            raise BundleError(f"{path}: a Python model chooses its own device; --device {device} applies to onnx "
                              f"and torch bundles only")
        self.device = "cpu"
        module_name = f"modelport_user_model_{abs(hash(path.resolve()))}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise BundleError(f"{path}: not a Python file")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise BundleError(f"{path}: importing it failed: {type(exc).__name__}: {exc}") from None
        cls = getattr(module, "Model", None)
        if cls is None or not callable(getattr(cls, "run", None)):
            raise BundleError(f"{path}: needs a class Model with a run(feeds) method, like this:\n{_EXAMPLE}")
        try:
            self._model = cls(path.parent)
        except Exception as exc:
            raise BundleError(f"{path}: Model(bundle_dir) failed: {type(exc).__name__}: {exc}") from None
        self.inputs = _specs(path, self._model, "inputs")
        self.outputs = _specs(path, self._model, "outputs")
        sys.modules.pop(module_name, None)

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        outputs = self._model.run(feeds)
        return {name: outputs[name] for name in (output_names or [o.name for o in self.outputs])}

    def close(self) -> None:
        close = getattr(self._model, "close", None)
        if callable(close):
            close()
        self._model = None  # its weights go with it, even while the closed Model is still referenced


def _specs(path: Path, model, attr: str) -> list[TensorSpec]:
    specs = getattr(model, attr, None)
    if not isinstance(specs, (list, tuple)) or not specs or not all(isinstance(s, TensorSpec) for s in specs):
        raise BundleError(f"{path}: Model.{attr} must be a non-empty list of TensorSpec, like this:\n{_EXAMPLE}")
    return list(specs)
