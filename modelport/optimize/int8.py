"""``modelport optimize``: an ONNX bundle -> its INT8 version, published only if it keeps the answers.

Steps: decode the calibration and evaluation images once (the model's own preprocessing) ->
pre-process the graph -> quantize everything -> if that fails the gate, measure each layer's
sensitivity and try candidates that keep the most sensitive layers in fp32 (fewest first: every
fp32 layer costs speed) until one passes the gate on the evaluation images -> measure speed interleaved -> write
the new version into the model directory (a hidden directory renamed into place, so a watching
server loads it complete) with its report, or write nothing and say why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from modelport.engine import imaging

from modelport.repository import layout as repository
from modelport.repository.bundle import CONFIG_FILE, load_bundle
from modelport.errors import BadInput, BundleError
from modelport.engine.model import Model
from modelport.optimize import quantize as q
from modelport.optimize import report as r
from modelport.runtime.precision import candidate_engines


REPORT_FILE = "optimize-report.json"
INT8_VARIANT = "model-int8.onnx"  # a packaged model's checked INT8 graph, beside its fp32 one
INT8_VARIANT_REPORT = "model-int8.report.json"  # and the report of its check
CANDIDATE_FP32_LAYERS = (0, 1, 2, 4, 8)  # most sensitive weighted layers kept in fp32, tried in order
MAX_CALIBRATION = 128
SENSITIVITY_IMAGES = 8


def sample_calibration() -> list[bytes]:
    """What `build-model --int8` calibrates on: photos of ImageNet objects (scikit-image, scikit-learn)."""
    from modelport import samples

    return samples.photo_set(48, seed=101, objects=True)


def sample_evaluation() -> list[bytes]:
    """...and checks on: other crops of them, 128 so that one miss is under 1 %."""
    from modelport import samples

    return samples.photo_set(128, seed=102, objects=True)


class Refused(BundleError):
    """The INT8 model missed the thresholds: nothing was written."""

    def __init__(self, message: str, report: r.Report) -> None:
        super().__init__(message)
        self.report = report


def optimize(source: Path, calibration: Sequence[bytes], evaluation: Sequence[bytes] | None = None, *,
             labels: Sequence[int] | None = None, target_dir: Path | None = None, recipe: q.Recipe = q.Recipe(),
             min_agreement: float = 0.995, min_top5: float = 0.99,
             candidates: Sequence[int] = CANDIDATE_FP32_LAYERS, engine: str = "auto",
             progress: Callable[[str], None] = lambda message: None) -> tuple[Path, r.Report]:
    """Quantize the bundle at ``source`` (a version directory). Returns (new version dir, report);
    raises ``Refused`` (nothing written) when no candidate passes.

    ``evaluation``: held-out images; None splits the calibration images (two thirds calibrate).
    ``labels``: class indices of the evaluation images, for accuracy.
    ``engine``: the engine the gate checks the INT8 model on, and the new version runs on; ``auto``
    checks every installed one and keeps the fastest that passes (one graph serves both).
    """
    bundle = load_bundle(source)
    if bundle.runtime != "onnx":
        raise BadInput(f"{source}: modelport optimize quantizes ONNX models; this bundle's runtime is "
                       f"{bundle.runtime!r}")
    engines = candidate_engines(engine)
    if len(calibration) < 8:
        raise BadInput(f"{len(calibration)} calibration images: give at least 8 (100-500 is typical)")
    if evaluation is None:
        cut = max(4, len(calibration) * 2 // 3)
        calibration, evaluation = calibration[:cut], calibration[cut:]
    if not evaluation:
        raise BadInput("no evaluation images: pass --eval, or more calibration images to split")
    fp32 = Model(bundle, engine="onnxruntime", precision="fp32")  # the reference: today's exact answers
    progress(f"decoding {len(calibration)} calibration and {len(evaluation)} evaluation images")
    calibration_crops = crops_of(fp32, calibration[:MAX_CALIBRATION])
    evaluation_crops = crops_of(fp32, evaluation)
    reencoded_crops = crops_of(fp32, [r.reencode(data) for data in evaluation])
    calibration_inputs = imaging.to_model_input(calibration_crops, bundle.input)
    input_name = fp32.input.name
    fp32_probabilities = predict_all(fp32, evaluation_crops)
    reencoded = predict_all(fp32, reencoded_crops)
    truth = np.asarray(labels) if labels is not None else None

    with tempfile.TemporaryDirectory(prefix="modelport-optimize-") as tmp:
        tmp = Path(tmp)
        prepared = q.prepare(bundle.model_file, tmp / "prepared.onnx")
        progress("quantizing every layer but the classifier head")
        head = q.output_head(prepared, fp32.output.name)
        whole = q.quantize(prepared, tmp / "int8-0.onnx", input_name, calibration_inputs, recipe=recipe,
                           exclude=head)
        tried, chosen, ranked = [], None, None
        for keep in candidates:
            if keep and ranked is None:  # measured only once the whole graph has failed the gate
                progress("measuring each layer's sensitivity, to keep the most sensitive in fp32")
                ranked = [(name, loss) for name, loss in
                          q.sensitivity(prepared, whole, input_name, calibration_inputs[:SENSITIVITY_IMAGES])
                          if name not in head]
            names = [name for name, _ in (ranked or [])[:keep]]
            path = whole if keep == 0 else q.quantize(prepared, tmp / f"int8-{keep}.onnx", input_name,
                                                      calibration_inputs, recipe=recipe,
                                                      exclude=head + q.with_followers(prepared, names))
            names = head + names
            passed = {}
            for name in engines:
                int8 = _bundle_model(bundle, path, tmp / f"bundle-{keep}-{name}", engine=name)
                result = r.agreement(fp32_probabilities, predict_all(int8, evaluation_crops), reencoded=reencoded,
                                     truth=truth)
                reasons = r.gate(result, min_agreement=min_agreement, min_top5=min_top5)
                tried.append({"fp32_layers": names, "engine": name, "agreement": result.__dict__,
                              "passed": not reasons, "reasons": reasons})
                progress(f"classifier head and {keep} layer(s) kept in fp32, on {name}: confident top-1 agreement "
                         f"{_percent(result.top1_confident)}, INT8 top-1 in fp32 top-5 {result.in_top5:.1%}"
                         + ("" if not reasons else " - not enough"))
                if reasons:
                    int8.close()
                else:
                    passed[name] = (int8, result)
            if passed:
                chosen = (names, path, passed)
                break
        if chosen is None:
            last = tried[-1]
            report = r.Report(recipe.describe(), last["fp32_layers"], r.Agreement(**last["agreement"]), [], False,
                              last["reasons"], tried, engine=last["engine"])
            raise Refused(f"INT8 model not published: {'; '.join(last['reasons'])} (even with "
                          f"{len(last['fp32_layers'])} layers kept in fp32); nothing was written", report)
        names, path, passed = chosen
        progress(f"measuring speed, fp32 and INT8 interleaved, on {', '.join(passed)}")
        batches = sorted({1, min(bundle.serving.max_batch_size, 8)})
        speeds = {name: [r.speed(fp32.run_crops, int8.run_crops, evaluation_crops, batch) for batch in batches]
                  for name, (int8, _) in passed.items()}
        best = max(speeds, key=lambda name: speeds[name][-1].ratio)  # at the largest batch
        report = r.Report(recipe.describe(), names, passed[best][1], speeds[best], True, [], tried,
                          precision="int8", engine=best,
                          engines={name: {"passed": name in passed,
                                          "speedup": {s.batch: round(s.ratio, 3) for s in speeds.get(name, [])}}
                                   for name in engines})
        for int8, _ in passed.values():
            int8.close()
        fp32.close()
        published = publish(bundle, path, report, target_dir or next_version(source))
    return published, report


def crops_of(model: Model, images: Sequence[bytes]) -> np.ndarray:
    return np.stack([model.decode(data) for data in images])


def predict_all(model: Model, crops: np.ndarray, batch: int = 8) -> np.ndarray:
    return np.concatenate([model.probabilities(model.run_crops(crops[i:i + batch], [model.output.name])
                                               [model.output.name]) for i in range(0, len(crops), batch)])


def _bundle_model(bundle, model_file: Path, directory: Path, *, engine: str) -> Model:
    """The quantized graph loaded the way the server will load it: as an INT8 bundle, on ``engine``."""
    directory.mkdir()
    shutil.copy(model_file, directory / bundle.model_file.name)
    _copy_bundle_files(bundle, directory)
    set_metadata(directory / CONFIG_FILE, {"precision": "int8", "engine": engine})
    return Model.load(directory, name=bundle.name, engine=engine, precision="int8")


def _copy_bundle_files(bundle, directory: Path) -> None:
    for path in bundle.path.iterdir():
        if path.is_file() and path != bundle.model_file and path.name not in (REPORT_FILE, INT8_VARIANT, INT8_VARIANT_REPORT):
            shutil.copy(path, directory / path.name)


def next_version(source: Path) -> Path:
    model_dir = source.parent
    numbers = [int(p.name) for p in repository.versions(model_dir)]
    return model_dir / str(max(numbers, default=0) + 1)


def publish(bundle, model_file: Path, report: r.Report, target: Path) -> Path:
    """Write the new version under a hidden name, then rename it into place: complete when seen."""
    if target.exists():
        raise BadInput(f"{target} exists already; versions are immutable")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.optimizing-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        shutil.copy(model_file, staging / bundle.model_file.name)
        _copy_bundle_files(bundle, staging)
        _add_metadata(staging / CONFIG_FILE, bundle, report)
        (staging / REPORT_FILE).write_text(json.dumps(report.as_dict(), indent=2) + "\n")
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _add_metadata(config: Path, bundle, report: r.Report) -> None:
    """The report's headline figures in ``[metadata]`` (shown in V2 model metadata)."""
    a = report.agreement
    set_metadata(config, {
        "precision": report.precision, "engine": report.engine, "optimized_from": str(bundle.version),
        "recipe": report.recipe, "fp32_layers": len(report.fp32_layers), "agreement_top1": round(a.top1, 4),
        "agreement_top1_confident": round(a.top1_confident, 4) if a.top1_confident is not None else -1.0,
        f"{report.precision}_top1_in_fp32_top5": round(a.in_top5, 4),
        **{f"speedup_batch{s.batch}": round(s.ratio, 3) for s in report.speed},
    })


# [metadata] keys a check writes: a new check's figures replace the source's, never mix with them.
REPORT_KEYS = re.compile(r"precision|engine|optimized_from|recipe|fp32_layers|checked_on|agreement_.*|speedup_.*"
                         r"|(int8|bf16)_.*")


def set_metadata(config: Path, values: dict, *, replace: bool = True) -> None:
    """A check's figures in ``[metadata]``; ``replace``: instead of those of any check of the source."""
    import tomllib

    from modelport.repository.bundle import write_config

    raw = tomllib.loads(config.read_text(encoding="utf-8"))
    raw.pop("version", None)  # the directory names the version
    kept = {k: v for k, v in raw.get("metadata", {}).items() if not (replace and REPORT_KEYS.fullmatch(k))}
    raw["metadata"] = {**kept, **values}
    write_config(config.parent, raw)


def mark_checked(directory: Path, report: r.Report, checked_on: str, published: Path | None = None) -> None:
    """Record a passed check in a bundle being built (the packaged models), its figures under the
    precision's prefix: ``auto`` serves whichever checked precision ran fastest. bf16 runs the
    bundle's own file; INT8 the ``published`` version's graph, copied beside it."""
    p = report.precision
    extra = {}
    if published is not None:
        shutil.copy(published / "model.onnx", directory / INT8_VARIANT)
        shutil.copy(published / REPORT_FILE, directory / INT8_VARIANT_REPORT)
        extra = {f"{p}_model_file": INT8_VARIANT, f"{p}_engine": report.engine,
                 f"{p}_fp32_layers": len(report.fp32_layers)}
    a = report.agreement
    set_metadata(directory / CONFIG_FILE, {
        f"{p}_checked_on": checked_on, **extra,
        f"{p}_agreement_top1_confident": round(a.top1_confident, 4) if a.top1_confident is not None else -1.0,
        f"{p}_top1_in_fp32_top5": round(a.in_top5, 4),
        **{f"{p}_speedup_batch{s.batch}": round(s.ratio, 3) for s in report.speed},
    }, replace=False)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def checked_variant(directory: Path) -> tuple[Path, r.Report] | None:
    """The INT8 graph a packaged model was checked with at build, and that check's report (None if
    it was not checked, or built before the report was kept)."""
    model_file, report_file = directory / INT8_VARIANT, directory / INT8_VARIANT_REPORT
    if not (model_file.is_file() and report_file.is_file()):
        return None
    return model_file, r.Report.from_dict(json.loads(report_file.read_text()))
