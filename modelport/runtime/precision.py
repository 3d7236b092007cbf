"""Which engine runs an ONNX bundle, and at which precision: the settings, checked against the CPU.

``[serving] runtime`` (``serve --runtime``): ``auto``, ``onnxruntime`` or ``openvino``.
``[serving] precision`` (``serve --precision``): ``auto``, ``fp32``, ``bf16`` or ``int8``.

- ``fp32`` keeps today's exact answers: ONNX Runtime, unless ``openvino`` is named.
- ``bf16`` only where the CPU computes it natively (AMX or AVX-512 BF16), on OpenVINO; anywhere
  else asking for it stops the load with the reason, never a silent emulation.
- ``int8`` is a version that ``modelport optimize`` quantized (``[metadata] precision = "int8"``):
  its graph is integer, so it cannot run at fp32 and an fp32 file cannot run at int8. It runs on
  the engine its gate measured (``[metadata] engine``, ONNX Runtime before there was a choice).
- ``auto`` never changes answers on faith. A reduced precision is taken only where a gate on real
  images backs it: an INT8 version passed its gate to exist; an fp32 file whose ``[metadata]
  precision = "bf16"`` says it was checked at bf16 (``optimize --precision bf16``, or the packaged
  models at build time) runs at bf16 where that is native. Everything else runs at fp32. Where
  more than one engine may run it, each is timed at load and the fastest kept.

``MODELPORT_CPU_FLAGS`` (a space-separated list) stands in for the CPU's own flags: a fleet of
mixed machines can pin every worker to what its weakest machine computes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

from modelport.errors import BundleError, MissingExtra

ENGINES = {
    "onnxruntime": "modelport.runtime.onnx:OnnxRuntime",
    "openvino": "modelport.runtime.openvino:OpenVinoRuntime",
}
ENGINE_CHOICES = ("auto", *ENGINES)
PRECISIONS = ("auto", "fp32", "bf16", "int8")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# An engine other than ONNX Runtime is kept for an fp32 model only when timed at least this much
# faster: ONNX Runtime's answers are the reference, and load-time timings scatter by a few percent.
MARGIN = 1.05


@dataclass(frozen=True)
class Plan:
    engines: tuple[str, ...]  # candidates, timed at load when more than one; the first is the reference
    precision: str  # fp32, bf16 or int8
    reason: str  # why, for the log and the metadata


def cpu_flags() -> frozenset[str]:
    override = os.environ.get("MODELPORT_CPU_FLAGS")
    if override is not None:
        return frozenset(override.split())
    return _proc_flags()


@lru_cache(maxsize=1)
def _proc_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def native_bf16() -> bool:
    flags = cpu_flags()
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def openvino_installed() -> bool:
    from modelport.runtime import openvino

    return openvino.available()


def plan(bundle, *, engine: str | None = None, precision: str | None = None, device=None) -> Plan:
    """The engine(s) and precision for ``bundle``; ``engine`` / ``precision`` override its [serving]
    settings. Raises BundleError (or MissingExtra) with the reason when the settings cannot be met."""
    where = bundle.path / "modelport.toml"
    engine = engine or bundle.serving.runtime
    asked = precision or bundle.serving.precision
    if engine not in ENGINE_CHOICES:
        raise BundleError(f"{where}: runtime {engine!r} is not one of {', '.join(ENGINE_CHOICES)}")
    if asked not in PRECISIONS:
        raise BundleError(f"{where}: precision {asked!r} is not one of {', '.join(PRECISIONS)}")
    checked = bundle.metadata.get("precision") if isinstance(bundle.metadata, dict) else None
    quantized = checked == "int8"
    if bundle.runtime != "onnx":  # TorchScript and Python models run as they are
        if engine not in ("auto",) or asked in ("bf16", "int8"):
            raise BundleError(f"{where}: runtime = {engine!r}, precision = {asked!r} apply to ONNX bundles; this "
                              f"bundle's runtime is {bundle.runtime!r}, which runs at fp32")
        return Plan((bundle.runtime,), "fp32", f"a {bundle.runtime} bundle runs as it is")
    if device is not None and device.kind != "cpu":
        if engine == "openvino" or asked == "bf16":
            raise BundleError(f"{where}: runtime = {engine!r}, precision = {asked!r} run on the CPU; device {device} "
                              f"runs ONNX Runtime at fp32 (or int8 for an INT8 version)")
        return Plan(("onnxruntime",), "int8" if quantized else "fp32", f"device {device}: ONNX Runtime")
    if engine == "openvino" and not openvino_installed():
        raise MissingExtra(f"{where}: runtime = \"openvino\" needs OpenVINO: pip install 'modelport[openvino]'")
    engines = _engines(engine)

    if quantized:
        if asked in ("fp32", "bf16"):
            raise BundleError(f"{where}: precision = {asked!r}, but this version is an INT8 model (made by modelport "
                              f"optimize from version {bundle.metadata.get('optimized_from', '?')}): it runs at int8; "
                              f"serve the fp32 version for fp32 answers")
        # On the engine its gate measured: another engine's integer kernels round otherwise.
        checked_on = bundle.metadata.get("engine", "onnxruntime")
        if engine == "auto":
            if checked_on == "openvino" and not openvino_installed():
                raise MissingExtra(f"{where}: this INT8 version was checked on OpenVINO, which is not installed: "
                                   f"pip install 'modelport[openvino]'")
            return Plan((checked_on,), "int8", f"an INT8 version; its gate passed on {checked_on}")
        return Plan((engine,), "int8", f"an INT8 version (its gate passed on {checked_on}); runtime = {engine!r} "
                                       f"asked for")
    if asked == "int8":
        raise BundleError(f"{where}: precision = \"int8\" needs an INT8 version of this model: make one with "
                          f"`modelport optimize {bundle.path} --calibration PHOTOS/` (checked against fp32 before "
                          f"it is written)")
    if asked == "bf16":
        if not native_bf16():
            raise BundleError(f"{where}: precision = \"bf16\": this CPU does not compute bf16 natively (none of "
                              f"{', '.join(NATIVE_BF16_FLAGS)} in its flags), and bf16 emulated in fp32 is slower "
                              f"and changes answers for nothing; use precision = \"fp32\" or \"auto\"")
        if engine == "onnxruntime":
            raise BundleError(f"{where}: precision = \"bf16\": ONNX Runtime has no bf16 kernels on the CPU; use "
                              f"runtime = \"openvino\" (or \"auto\")")
        if not openvino_installed():
            raise MissingExtra(f"{where}: precision = \"bf16\" runs on OpenVINO: pip install 'modelport[openvino]'")
        return Plan(("openvino",), "bf16", "asked for bf16; this CPU computes it natively")
    if asked == "fp32":
        # Today's exact answers: ONNX Runtime's, unless another engine is named.
        return Plan(("onnxruntime",) if engine == "auto" else (engine,), "fp32", "asked for fp32")
    # auto
    if checked == "bf16" and engine in ("auto", "openvino"):
        if native_bf16() and openvino_installed():
            return Plan(("openvino",), "bf16", "checked at bf16 against fp32 on real images, and this CPU "
                                               "computes bf16 natively")
        why = "this CPU does not compute bf16 natively" if not native_bf16() else "OpenVINO is not installed"
        return Plan(engines, "fp32", f"checked at bf16, but {why}: fp32"
                    + (", engines timed at load" if len(engines) > 1 else ""))
    return Plan(engines, "fp32", "no reduced precision checked for this version: fp32"
                + (", engines timed at load" if len(engines) > 1 else ""))


def _engines(engine: str) -> tuple[str, ...]:
    if engine != "auto":
        return (engine,)
    return ("onnxruntime", "openvino") if openvino_installed() else ("onnxruntime",)
