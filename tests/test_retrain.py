"""retrain on a small real dataset: the exported bundle works everywhere a bundle works."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import numpy as np
import pytest

from modelport import samples
from modelport.errors import BadInput
from modelport.engine.model import Model
from modelport.retrain import retrain
from modelport.retrain.dataset import scan
from modelport.retrain.features import FeatureCache, extract
from servers import Server


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    classes = samples.labelled_folder(root, classes=4, per_class=12, seed=0)
    (root / classes[1] / "broken.jpg").write_bytes(b"this is not a jpeg")
    (root / classes[2] / "notes.txt").write_text("not an image suffix: ignored")
    held_out = tmp_path_factory.mktemp("held_out")
    samples.labelled_folder(held_out, classes=4, per_class=3, seed=99)
    return root, held_out, classes


@pytest.fixture(scope="module")
def trained(dataset, default_bundle, tmp_path_factory):
    root, _, _ = dataset
    output = tmp_path_factory.mktemp("models")
    first = retrain(root, name="photos", output=output)
    second = retrain(root, name="photos", output=output)
    return first, second, output


def test_report_and_versions(trained, dataset):
    first, second, output = trained
    _, _, classes = dataset
    assert (first.version, second.version) == (1, 2)
    assert first.bundle == output / "photos" / "1" and (output / "photos" / "2" / "model.onnx").is_file()
    assert first.report.classes == tuple(sorted(classes))
    assert first.report.val_accuracy >= 0.9
    assert sum(map(sum, first.report.confusion)) == 4  # 4 classes x max(1, round(12 * 0.1)) validation images
    assert first.counts == {c: 12 for c in sorted(classes)}
    assert first.report.temperature > 0


def test_unreadable_files_are_skipped_and_reported(trained):
    first, _, _ = trained
    assert len(first.skipped) == 1 and next(iter(first.skipped)).endswith("broken.jpg")
    assert "cannot decode image" in next(iter(first.skipped.values()))


def test_second_run_hits_the_cache(trained):
    first, second, _ = trained
    assert second.extraction.computed == 0
    assert second.extraction.cache_hits == 48 == first.extraction.cache_hits + first.extraction.computed


def test_cache_computes_only_new_images(dataset, default_model, tmp_path):
    root, held_out, classes = dataset
    cache = FeatureCache(tmp_path / "cache")
    paths = sorted(root.rglob("*.jpg"))[:10]
    assert extract(default_model, paths, cache).computed == 10
    more = paths + sorted(held_out.rglob("*.jpg"))[:3]
    again = extract(default_model, more, FeatureCache(tmp_path / "cache"))  # a fresh process would read shards
    assert (again.computed, again.cache_hits) == (3, 10)


def test_exported_graph_equals_two_stage_computation(trained, default_model, dataset):
    """Backbone features -> the fitted head -> calibrated softmax, computed in numpy, against the
    single exported graph on the same held-out images."""
    first, _, _ = trained
    _, held_out, _ = dataset
    exported = Model.load(first.bundle)
    crops = np.stack([default_model.decode(p.read_bytes()) for p in sorted(held_out.rglob("*.jpg"))])
    features = default_model.run({"image": crops}, ["features"])["features"].astype(np.float64)
    expected = first.head.probabilities(features)
    actual = exported.predict(crops)
    assert np.allclose(actual, expected, atol=1e-5)
    assert np.allclose(actual.sum(1), 1, atol=1e-5)
    assert first.head.temperature == first.report.temperature
    # The features output survives in the exported graph, unchanged.
    assert np.allclose(exported.run({"image": crops}, ["features"])["features"], features, atol=1e-5)


def test_held_out_images_through_classify_and_http(trained, dataset, tmp_path):
    first, _, output = trained
    _, held_out, _ = dataset
    paths = sorted(held_out.rglob("*.jpg"))
    result = subprocess.run([sys.executable, "-m", "modelport", "classify", "--model", str(output / "photos"), "--json",
                             *map(str, paths)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    correct = sum(a["predictions"][0]["label"] == p.parent.name for a, p in zip(answers, paths))
    assert correct >= len(paths) - 1

    server = Server(str(output), log=tmp_path / "server.log").wait_ready()
    try:
        for path in paths[:4]:
            response = httpx.post(server.url + "/?model=photos", files={"data": path.read_bytes()})
            assert response.status_code == 200 and response.headers["x-model-version"] == "2"
            assert response.json()[0][0] == path.parent.name
    finally:
        server.stop()


def test_too_small_class_is_an_error_before_any_work(tmp_path):
    samples.labelled_folder(tmp_path / "d", classes=2, per_class=6)
    for extra in list((tmp_path / "d" / "coffee").iterdir())[:3]:
        extra.unlink()
    with pytest.raises(BadInput, match="'coffee' has 3"):
        scan(tmp_path / "d", min_per_class=5)


def test_empty_folder_and_single_class_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="at least 2"):
        scan(tmp_path / "empty")
    with pytest.raises(BadInput, match="not a directory"):
        scan(tmp_path / "missing")


def test_split_is_deterministic_and_stratified(dataset):
    root, _, _ = dataset
    a, b = scan(root, seed=3), scan(root, seed=3)
    assert a == b
    assert sorted(e.label for e in a.val) == [0, 1, 2, 3]  # one per class of 12-13 at 10 %
    assert not {e.path for e in a.val} & {e.path for e in a.train}
    assert scan(root, seed=4).val != a.val


def test_cli_retrain_prints_the_bundle_and_draws_confusion(dataset, default_bundle, tmp_path):
    root, _, _ = dataset
    result = subprocess.run([sys.executable, "-m", "modelport", "retrain", str(root), "--name", "cli", "--output",
                             str(tmp_path / "m"), "--confusion-png", str(tmp_path / "cm.png")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "m" / "cli" / "1")
    assert "validation accuracy" in result.stderr and "confusion matrix" in result.stderr
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_retrain_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run([sys.executable, "-m", "modelport", "retrain", str(tmp_path / "empty"), "--name", "x"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "at least 2" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["../escape", "", ".hidden", "a/b"])
def test_model_name_must_be_a_plain_directory_name(dataset, tmp_path, name):
    root, _, _ = dataset
    with pytest.raises(BadInput, match="invalid model name"):
        retrain(root, name=name, output=tmp_path / "m")
    assert not (tmp_path / "escape").exists()
