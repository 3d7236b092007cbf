"""A loaded model: the real default model's answers, and a tiny model's exact arithmetic."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np

from conftest import make_tiny_bundle, tiny_onnx
from modelport import samples
from modelport.repository.bundle import Serving, load_bundle
from modelport.engine.model import Model
from modelport.engine.predictions import softmax, top_k
from modelport.server.app import concurrent_batches
from test_slo import cost_bundle


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


def test_batches_side_by_side_by_default_where_a_thin_session_pays(default_bundle, tmp_path):
    chosen = Model(load_bundle(default_bundle), concurrent_batches=None)
    crops = np.stack([chosen.decode(samples.jpeg(samples.photo(name))) for name in ("chelsea", "coffee", "astronaut")])
    cores = os.cpu_count() or 1
    assert chosen.concurrent_batches == (2 if cores >= 2 else 1)
    if cores >= 2:  # a second session, of one thread per batch: the same answers as the full one
        assert chosen.thin_runtime is not chosen.runtime
        full = chosen.run_crops(crops)
        thin = chosen.run({chosen.input.name: crops}, thin=True)
        assert all(np.allclose(full[name], thin[name], atol=1e-5) for name in full)
    # Where the thread count is fixed, or the runtime is not ONNX Runtime: one batch at a time.
    assert Model.load(default_bundle, threads=1, concurrent_batches=None).concurrent_batches == 1
    python_model = cost_bundle(tmp_path / "cost" / "1", "0 0")
    assert Model.load(python_model, concurrent_batches=None).concurrent_batches == 1
    # The server: unset lets the model choose, unless a latency SLO is set; set is set.
    assert concurrent_batches(Serving()) is None
    assert concurrent_batches(Serving(latency_slo_ms=80)) == 1
    assert concurrent_batches(replace(Serving(latency_slo_ms=80), concurrent_batches=2)) == 2
