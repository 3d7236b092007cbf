"""``modelport optimize --precision bf16``: the same fp32 graph, checked at bf16 before anyone serves it so.

bf16 needs no new graph: OpenVINO's CPU plugin computes the float layers in bf16 where the CPU
does natively (AMX, AVX-512 BF16). What it needs is evidence that the answers survive, so the
gate is INT8's (modelport/optimize/report.py): confident top-1 agreement with ONNX Runtime's fp32
answers, and bf16's top-1 inside fp32's top 5. A version that passes is published as a copy of
its source with ``[metadata] precision = "bf16"`` and the figures; ``precision = "auto"`` then
serves it at bf16 on CPUs that compute bf16 natively, and at fp32 elsewhere (runtime/precision.py).
The packaged models are checked the same way when they are built (packaged.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from modelport.repository.bundle import Bundle, load_bundle
from modelport.errors import BadInput, MissingExtra
from modelport.engine.model import Model
from modelport.optimize import report as r
from modelport.optimize.int8 import Refused, crops_of, next_version, predict_all, publish

RECIPE = "OpenVINO, float layers at bf16 (INFERENCE_PRECISION_HINT=bf16); the graph is the fp32 one"


def check(bundle: Bundle, evaluation: Sequence[bytes], *, labels: Sequence[int] | None = None,
          min_agreement: float = 0.995, min_top5: float = 0.99, speed_batches: Sequence[int] | None = None,
          progress: Callable[[str], None] = lambda message: None) -> r.Report:
    """bf16 on OpenVINO against fp32 on ONNX Runtime, on ``evaluation``; raises ``Refused`` when
    the answers are not kept, BadInput / MissingExtra where bf16 cannot be checked here."""
    from modelport.runtime.precision import NATIVE_BF16_FLAGS, native_bf16, openvino_installed

    if bundle.runtime != "onnx":
        raise BadInput(f"{bundle.path}: bf16 runs ONNX models on OpenVINO; this bundle's runtime is {bundle.runtime!r}")
    if not openvino_installed():
        raise MissingExtra("--precision bf16 is checked on OpenVINO: pip install 'modelport[openvino]'")
    if not native_bf16():
        raise BadInput(f"this CPU does not compute bf16 natively (none of {', '.join(NATIVE_BF16_FLAGS)} in its flags): "
                       f"bf16 can be checked, and pays, only on one that does")
    if not evaluation:
        raise BadInput("no evaluation images: pass --eval (or --calibration) with images like the model's")
    fp32 = Model(bundle, engine="onnxruntime", precision="fp32")
    bf16 = Model(bundle, engine="openvino", precision="bf16")
    try:
        progress(f"decoding {len(evaluation)} evaluation images")
        crops = crops_of(fp32, evaluation)
        reencoded = predict_all(fp32, crops_of(fp32, [r.reencode(data) for data in evaluation]))
        result = r.agreement(predict_all(fp32, crops), predict_all(bf16, crops), reencoded=reencoded,
                             truth=np.asarray(labels) if labels is not None else None)
        reasons = r.gate(result, min_agreement=min_agreement, min_top5=min_top5, precision="bf16")
        progress(f"bf16 on OpenVINO: confident top-1 agreement with fp32 "
                 f"{'n/a' if result.top1_confident is None else f'{result.top1_confident:.1%}'}, "
                 f"bf16 top-1 in fp32 top-5 {result.in_top5:.1%}" + ("" if not reasons else " - not enough"))
        tried = [{"fp32_layers": [], "engine": "openvino", "agreement": result.__dict__, "passed": not reasons,
                  "reasons": reasons}]
        if reasons:
            report = r.Report(RECIPE, [], result, [], False, reasons, tried, precision="bf16", engine="openvino")
            raise Refused(f"bf16 not published: {'; '.join(reasons)}; nothing was written", report)
        batches = speed_batches or sorted({1, min(bundle.serving.max_batch_size, 8)})
        progress("measuring speed, fp32 (ONNX Runtime) and bf16 (OpenVINO) interleaved")
        speeds = [r.speed(fp32.run_crops, bf16.run_crops, crops, batch) for batch in batches]
        return r.Report(RECIPE, [], result, speeds, True, [], tried, precision="bf16", engine="openvino")
    finally:
        fp32.close()
        bf16.close()


def optimize(source: Path, evaluation: Sequence[bytes], *, labels: Sequence[int] | None = None,
             target_dir: Path | None = None, min_agreement: float = 0.995, min_top5: float = 0.99,
             progress: Callable[[str], None] = lambda message: None) -> tuple[Path, r.Report]:
    """Check the bundle at ``source`` at bf16 and publish it as the next version; raises
    ``Refused`` (nothing written) when the answers are not kept."""
    bundle = load_bundle(source)
    report = check(bundle, evaluation, labels=labels, min_agreement=min_agreement, min_top5=min_top5,
                   progress=progress)
    return publish(bundle, bundle.model_file, report, target_dir or next_version(source)), report
