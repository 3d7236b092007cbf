"""A loaded model: the real default model's answers, and a tiny model's exact arithmetic."""

from __future__ import annotations

import numpy as np

from conftest import make_tiny_bundle, tiny_onnx
from modelport import samples
from modelport.model import Model
from modelport.predictions import softmax, top_k


def test_default_model_knows_a_cat_and_an_espresso(default_model):
    cat, espresso = default_model.classify([samples.jpeg(samples.photo("chelsea")),
                                            samples.jpeg(samples.photo("coffee"))], 5)
    assert cat[0].index in samples.KNOWN["chelsea"]
    assert espresso[0].index == 967 and espresso[0].label == "espresso"
    assert [p.score for p in cat] == sorted((p.score for p in cat), reverse=True)


def test_default_model_metadata(default_model):
    assert default_model.name == "efficientnet-lite0" and default_model.version == 1
    assert len(default_model.labels) == 1000
    assert default_model.input.datatype == "UINT8" and default_model.input.shape == (-1, 224, 224, 3)
    assert {o.name for o in default_model.runtime.outputs} == {"probabilities", "features"}


def test_tiny_model_arithmetic_matches_numpy(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "tiny" / "1")
    weights = tiny_onnx(tmp_path / "check.onnx")  # same seed, same weights
    model = Model.load(bundle)
    pixels = np.random.default_rng(1).integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    expected = softmax(((pixels.astype(np.float32) - 127.5) / 127.5).mean(axis=(1, 2)) @ weights)
    assert np.allclose(model.predict(pixels), expected, atol=1e-5)


def test_top_k_order_and_bounds():
    probabilities = np.array([[0.1, 0.5, 0.15, 0.25]])
    (row,) = top_k(probabilities, ["a", "b", "c", "d"], 3)
    assert [p.label for p in row] == ["b", "d", "c"]
    (row,) = top_k(probabilities, ["a", "b", "c", "d"], 99)
    assert len(row) == 4
