"""modelport optimize (modelport/optimize/): INT8 versions of real models, checked and reported.

The default model is quantized once per module by the real command; the tests recompute its report
from the two bundles, serve the new version, and check that a bad recipe is refused with nothing
written.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from modelport import samples
from modelport.model import Model
from modelport.optimize.report import reencode
from servers import Server

MODEL = "lite0"


def modelport(*args: str, timeout_s: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modelport", *args], capture_output=True, text=True,
                          timeout=timeout_s)


def write_photos(directory: Path, count: int, seed: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(samples.photo_set(count, seed=seed, objects=True)):
        (directory / f"{i:03d}.jpg").write_bytes(data)
    return directory


@pytest.fixture(scope="module")
def optimized(default_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("optimize")
    repo = root / "repo"
    shutil.copytree(default_bundle, repo / MODEL / "1")
    calibration, evaluation = write_photos(root / "cal", 24, 31), write_photos(root / "eval", 24, 32)
    result = modelport("optimize", str(repo / MODEL), "--calibration", str(calibration), "--eval", str(evaluation),
                       "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # stdout is the report alone: ONNX Runtime's chatter is kept off it
    return repo, evaluation, report


def _probabilities(model: Model, crops: np.ndarray) -> np.ndarray:
    return model.predict(crops)


def test_the_int8_version_is_published_with_a_report_its_bundles_confirm(optimized):
    repo, evaluation, report = optimized
    assert Path(report["bundle"]) == repo / MODEL / "2" and report["passed"]
    assert sorted(p.name for p in (repo / MODEL).iterdir()) == ["1", "2"]  # no staging left behind
    fp32, int8 = Model.load(repo / MODEL / "1"), Model.load(repo / MODEL / "2")
    assert int8.bundle.metadata["precision"] == "int8" and int8.bundle.metadata["optimized_from"] == "1"
    assert json.loads((repo / MODEL / "2" / "optimize-report.json").read_text())["agreement"] == report["agreement"]

    photos = [p.read_bytes() for p in sorted(evaluation.iterdir())]
    crops = np.stack([fp32.decode(d) for d in photos])
    f, q = _probabilities(fp32, crops), _probabilities(int8, crops)
    again = _probabilities(fp32, np.stack([fp32.decode(reencode(d)) for d in photos]))
    a = report["agreement"]
    same = f.argmax(1) == q.argmax(1)
    confident = f.max(1) >= 0.5
    assert a["images"] == len(photos) and a["top1"] == pytest.approx(same.mean())
    assert a["confident_images"] == confident.sum() and a["top1_confident"] == pytest.approx(same[confident].mean())
    top5 = np.argsort(-f, 1)[:, :5]
    assert a["in_top5"] == pytest.approx(np.mean([q_top in row for q_top, row in zip(q.argmax(1), top5)]))
    assert a["jpeg_yardstick"] == pytest.approx((again.argmax(1) == f.argmax(1)).mean())
    assert a["top1_confident"] >= 0.995 and a["in_top5"] >= 0.99  # the default gate
    assert report["fp32_layers"] and len(report["fp32_layers"]) <= 8  # chosen by sensitivity, and few
    assert {s["batch"] for s in report["speed"]} == {1, 8} and all(s["ratio"] > 0 for s in report["speed"])


def test_the_int8_version_serves_and_says_what_it_is(optimized, images, tmp_path):
    repo, _, _ = optimized
    server = Server(str(repo), log=tmp_path / "server.log").wait_ready()
    try:
        meta = httpx.get(server.url + f"/v2/models/{MODEL}").json()
        assert meta["versions"] == ["2"] and meta["parameters"]["metadata"]["precision"] == "int8"
        answer = httpx.post(server.url + f"/?model={MODEL}", files={"data": images["espresso"].read_bytes()})
        assert answer.status_code == 200 and answer.headers["x-model-version"] == "2"
        assert answer.json()[0][0] == "espresso"
    finally:
        server.stop()


def test_a_bad_recipe_is_refused_and_nothing_is_written(optimized, tmp_path):
    repo, evaluation, _ = optimized
    before = sorted(p.name for p in (repo / MODEL).iterdir())
    result = modelport("optimize", str(repo / MODEL / "1"), "--calibration", str(evaluation),
                       "--eval", str(evaluation), "--per-tensor", "--calibration-method", "minmax",
                       "--max-fp32-layers", "0")
    assert result.returncode == 1
    assert "INT8 model not published" in result.stderr and "nothing was written" in result.stderr
    assert sorted(p.name for p in (repo / MODEL).iterdir()) == before


def test_optimize_explains_what_it_cannot_do(optimized, tmp_path):
    repo, evaluation, _ = optimized
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted(evaluation.iterdir())[:3]:
        shutil.copy(path, few / path.name)
    result = modelport("optimize", str(repo / MODEL / "1"), "--calibration", str(few))
    assert result.returncode != 0 and "give at least 8" in result.stderr and "Traceback" not in result.stderr
    labelled = tmp_path / "labelled" / "not-a-label"
    labelled.mkdir(parents=True)
    shutil.copy(next(evaluation.iterdir()), labelled / "x.jpg")
    result = modelport("optimize", str(repo / MODEL / "1"), "--calibration", str(evaluation),
                       "--eval", str(labelled.parent))
    assert result.returncode != 0 and "'not-a-label' name no label of the model" in result.stderr


def test_retrain_int8_publishes_a_quantized_version_with_accuracy(tmp_path, default_bundle):
    data = tmp_path / "data"
    samples.labelled_folder(data, classes=3, per_class=20, seed=4)
    result = modelport("retrain", str(data), "--name", "things", "--output", str(tmp_path / "models"),
                       "--val-fraction", "0.3", "--int8", "--seed", "0")
    assert result.returncode == 0, result.stderr
    versions = sorted(p.name for p in (tmp_path / "models" / "things").iterdir())
    assert versions == ["1", "2"]
    report = json.loads((tmp_path / "models" / "things" / "2" / "optimize-report.json").read_text())
    a = report["agreement"]
    assert a["accuracy_fp32"] is not None and a["accuracy_int8"] >= a["accuracy_fp32"] - 0.005
    assert Model.load(tmp_path / "models" / "things" / "2").bundle.metadata["precision"] == "int8"


def test_build_model_int8_builds_the_default_model_quantized_as_its_own_model(tmp_path, default_bundle):
    # --min-top5 0.95: on CPUs without AVX-512 VNNI, ONNX Runtime's u8s8 kernels saturate and the
    # sample photos (many crops no ImageNet class fits) keep 97-98 % of INT8 answers in fp32's
    # top 5, under the default 99 % (docs/optimize.md); the gate itself is tested above.
    result = modelport("build-model", "efficientnet-lite0", "--int8", "--output", str(tmp_path), "--min-top5", "0.95")
    assert result.returncode == 0, result.stderr
    bundle = tmp_path / "efficientnet-lite0-int8" / "1"
    assert Path(result.stdout.strip().splitlines()[-1]) == bundle
    report = json.loads((bundle / "optimize-report.json").read_text())
    assert report["passed"] and report["agreement"]["top1_confident"] >= 0.995
    assert report["agreement"]["in_top5"] >= 0.95 and report["agreement"]["images"] == 128
    assert Model.load(bundle).bundle.metadata["precision"] == "int8"
    assert not (tmp_path / "efficientnet-lite0").exists()  # the fp32 build was a temporary step
