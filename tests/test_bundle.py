"""Bundle validation: each mistake is reported with the file it is in and what is wrong."""

from __future__ import annotations

import pytest

from conftest import make_tiny_bundle
from modelport.repository.bundle import load_bundle
from modelport.errors import BundleError
from modelport.engine.model import Model


def _error(path) -> str:
    with pytest.raises(BundleError) as info:
        Model.load(path)
    return info.value.message


def test_valid_tiny_bundle_loads(tmp_path):
    model = Model.load(make_tiny_bundle(tmp_path / "tiny" / "3"))
    assert (model.name, model.version) == ("tiny", 3)
    assert model.labels == ("class0", "class1", "class2", "class3")
    assert model.platform == "onnx_onnxv1"


def test_missing_config(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "m" / "1")
    (bundle / "modelport.toml").unlink()
    message = _error(bundle)
    assert "modelport.toml" in message and "missing" in message


def test_bad_toml(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "m" / "1")
    (bundle / "modelport.toml").write_text("runtime = [unclosed\n")
    message = _error(bundle)
    assert "modelport.toml" in message and "not valid TOML" in message


def test_missing_labels(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "m" / "1")
    (bundle / "labels.txt").unlink()
    message = _error(bundle)
    assert "labels.txt" in message and "missing" in message


def test_label_count_differs_from_output_width(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "m" / "1", classes=4, labels=["a", "b", "c"])
    message = _error(bundle)
    assert "labels.txt" in message and "3 labels" in message and "4 classes" in message


def test_unknown_runtime(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "m" / "1", runtime="tensorflow")
    message = _error(bundle)
    assert "unknown runtime 'tensorflow'" in message and "onnx" in message


def test_unknown_key_is_a_typo_not_ignored(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "m" / "1", input__hieght=8)
    assert "unknown key input.hieght" in _error(bundle)


def test_wrong_type(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "m" / "1", serving__top_k="five")
    assert "serving.top_k must be int" in _error(bundle)


def test_bad_choice(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "m" / "1", input__layout="CHW")
    assert "input.layout = 'CHW'" in _error(bundle)


def test_missing_model_file(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "m" / "1")
    (bundle / "model.onnx").unlink()
    message = _error(bundle)
    assert "model.onnx" in message and "missing" in message


def test_garbage_model_file(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "m" / "1")
    (bundle / "model.onnx").write_bytes(b"this is not a protobuf" * 10)
    message = _error(bundle)
    assert "model.onnx" in message and "cannot load" in message


def test_dtype_mismatch_with_graph(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "m" / "1", input__dtype="uint8")  # graph takes float32
    message = _error(bundle)
    assert "FP32" in message and "input.dtype = 'uint8'" in message


def test_shape_mismatch_with_graph(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "m" / "1", input__height=16, input__width=16)  # graph is 8x8
    message = _error(bundle)
    assert "shape" in message and "16" in message


def test_unknown_output_name(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "m" / "1", output__name="scores")
    message = _error(bundle)
    assert "'scores' is not a graph output" in message and "logits" in message


def test_blank_label(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "m" / "1")
    (bundle / "labels.txt").write_text("a\n\nc\nd\n")
    assert "blank label on line 2" in _error(bundle)


def test_unsupported_format_version(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "m" / "1", format=7)
    assert "format = 7" in _error(bundle)


def test_load_bundle_reads_without_runtime(tmp_path):
    bundle = load_bundle(make_tiny_bundle(tmp_path / "flowers" / "12"))
    assert (bundle.name, bundle.version, bundle.serving.top_k) == ("flowers", 12, 3)
