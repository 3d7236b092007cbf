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
  images backs it: an INT8 version passed its gate to exist; a version checked at bf16
  (``optimize --precision bf16``: ``[metadata] precision = "bf16"``; the packaged models at build:
  ``bf16_*``) runs at bf16 where that is native; a packaged model's checked INT8 variant
  (``int8_model_file``, beside the fp32 file) runs where its engine is installed. Of those this
  machine can run, the one whose check measured the most speed is taken. Everything else runs at
  fp32; where more than one engine may run it, each is timed at load and the fastest kept.

``MODELPORT_CPU_FLAGS`` (a space-separated list) stands in for the CPU's own flags: a fleet of
mixed machines can pin every worker to what its weakest machine computes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from modelport.errors import BundleError, MissingExtra

ENGINES = {
    "onnxruntime": "modelport.runtime.onnx:OnnxRuntime",
    "openvino": "modelport.runtime.openvino:OpenVinoRuntime",
}
ENGINE_CHOICES = ("auto", *ENGINES)
PRECISIONS = ("auto", "fp32", "bf16", "int8")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class Plan:
    engines: tuple[str, ...]  # candidates, timed at load when more than one; the first is the reference
    precision: str  # fp32, bf16 or int8
    reason: str  # why, for the log and the metadata
    model_file: Path | None = None  # another file of the version (its checked INT8 variant); None: its own


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
    """Without importing it (a quarter of a second): a model that never runs on it never pays that."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


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
    checks = Checks.of(bundle)
    if bundle.runtime != "onnx":  # TorchScript and Python models run as they are
        if engine not in ("auto",) or asked in ("bf16", "int8"):
            raise BundleError(f"{where}: runtime = {engine!r}, precision = {asked!r} apply to ONNX bundles; this "
                              f"bundle's runtime is {bundle.runtime!r}, which runs at fp32")
        return Plan((bundle.runtime,), "fp32", f"a {bundle.runtime} bundle runs as it is")
    if device is not None and device.kind != "cpu":
        if engine == "openvino" or asked == "bf16":
            raise BundleError(f"{where}: runtime = {engine!r}, precision = {asked!r} run on the CPU; device {device} "
                              f"runs ONNX Runtime at fp32 (or int8 for an INT8 version)")
        if checks.quantized or asked == "int8" and checks.int8_file:
            return Plan(("onnxruntime",), "int8", f"device {device}: ONNX Runtime", checks.int8_file)
        return Plan(("onnxruntime",), "fp32", f"device {device}: ONNX Runtime")
    engines = candidate_engines(engine)

    if checks.quantized:
        if asked in ("fp32", "bf16"):
            raise BundleError(f"{where}: precision = {asked!r}, but this version is an INT8 model (made by modelport "
                              f"optimize from version {bundle.metadata.get('optimized_from', '?')}): it runs at int8; "
                              f"serve the fp32 version for fp32 answers")
        return _int8(where, engine, checks.int8_engine, None, "an INT8 version")
    if asked == "int8":
        if checks.int8_file is not None:
            return _int8(where, engine, checks.int8_engine, checks.int8_file, "its INT8 variant, checked at build")
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
    # auto: the fastest checked precision this machine can run, else fp32.
    options, passed_over = [], []
    if checks.bf16_speedup is not None:
        if engine not in ("auto", "openvino"):
            passed_over.append(f"checked at bf16, but runtime = {engine!r}")
        elif not native_bf16():
            passed_over.append("checked at bf16, but this CPU does not compute bf16 natively")
        elif not openvino_installed():
            passed_over.append("checked at bf16, but OpenVINO is not installed")
        else:
            options.append((checks.bf16_speedup, Plan(("openvino",), "bf16", "checked at bf16 against fp32 on real "
                                                      "images, and this CPU computes bf16 natively")))
    if checks.int8_file is not None:
        if checks.int8_engine == "openvino" and not openvino_installed():
            passed_over.append("an INT8 variant checked on OpenVINO, which is not installed")
        elif engine not in ("auto", checks.int8_engine):
            passed_over.append(f"an INT8 variant checked on {checks.int8_engine}, but runtime = {engine!r}")
        else:
            options.append((checks.int8_speedup or 0.0, Plan(
                (checks.int8_engine,), "int8", f"its INT8 variant, checked against fp32 on real images at build "
                                               f"on {checks.int8_engine}", checks.int8_file)))
    if options:
        speedup, chosen = max(options, key=lambda option: option[0])
        others = f" (of {len(options)} checked)" if len(options) > 1 else ""
        return Plan(chosen.engines, chosen.precision, f"{chosen.reason}; {speedup:.2f} x fp32 at batch 8, the "
                    f"fastest{others}", chosen.model_file)
    why = "; ".join(passed_over) or "no reduced precision checked for this version"
    return Plan(engines, "fp32", f"{why}: fp32" + (", engines timed at load" if len(engines) > 1 else ""))


def _int8(where, engine: str, checked_on: str, model_file, what: str) -> Plan:
    # On the engine its gate measured: another engine's integer kernels round otherwise.
    if engine == "auto":
        if checked_on == "openvino" and not openvino_installed():
            raise MissingExtra(f"{where}: this INT8 model was checked on OpenVINO, which is not installed: "
                               f"pip install 'modelport[openvino]'")
        return Plan((checked_on,), "int8", f"{what}; its gate passed on {checked_on}", model_file)
    return Plan((engine,), "int8", f"{what} (its gate passed on {checked_on}); runtime = {engine!r} asked for",
                model_file)


@dataclass(frozen=True)
class Checks:
    """What a version's [metadata] says was checked against fp32 on real images (optimize/ writes it)."""

    quantized: bool  # the version's own file is INT8 (precision = "int8")
    int8_engine: str  # the engine an INT8 graph was checked on
    int8_file: Path | None  # a checked INT8 variant beside the fp32 file (the packaged models)
    int8_speedup: float | None
    bf16_speedup: float | None  # checked at bf16 (None: not checked)

    @classmethod
    def of(cls, bundle) -> "Checks":
        meta = bundle.metadata if isinstance(bundle.metadata, dict) else {}
        precision = meta.get("precision")
        variant = meta.get("int8_model_file")
        int8_file = None
        if precision != "int8" and isinstance(variant, str) and variant:
            int8_file = bundle.path / variant
            if int8_file.parent != bundle.path or not int8_file.is_file():
                raise BundleError(f"{bundle.path / 'modelport.toml'}: metadata.int8_model_file = {variant!r} is not "
                                  f"a file of this bundle")
        bf16 = None
        if precision == "bf16":
            bf16 = _number(meta.get("speedup_batch8", meta.get("speedup_batch1")), 1.0)
        elif "bf16_speedup_batch8" in meta:
            bf16 = _number(meta["bf16_speedup_batch8"], 1.0)
        return cls(precision == "int8", str(meta.get("int8_engine" if int8_file else "engine", "onnxruntime")),
                   int8_file, _number(meta.get("int8_speedup_batch8"), None), bf16)


def _number(value, default):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def candidate_engines(engine: str) -> tuple[str, ...]:
    """The engine named, or every installed one for ``auto`` (ONNX Runtime, the reference, first)."""
    if engine not in ENGINE_CHOICES:
        raise BundleError(f"runtime {engine!r} is not one of {', '.join(ENGINE_CHOICES)}")
    if engine == "openvino" and not openvino_installed():
        raise MissingExtra("runtime = \"openvino\" needs OpenVINO: pip install 'modelport[openvino]'")
    if engine != "auto":
        return (engine,)
    return ("onnxruntime", "openvino") if openvino_installed() else ("onnxruntime",)
