"""Engines and precisions (modelport/runtime/precision.py, runtime/openvino.py): each one this CPU
has gives the right labels on real photos; bf16 is refused where the CPU lacks it (tested on any
CPU: MODELPORT_CPU_FLAGS stands in for the CPU's flags); `auto`'s choice shows in the metadata; a
version served by OpenVINO rolls out like any other. INT8 on both engines: test_optimize.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace

import httpx
import numpy as np
import pytest

from conftest import make_tiny_bundle
from modelport import samples
from modelport.repository.bundle import load_bundle, write_config
from modelport.errors import BundleError
from modelport.engine.model import Model
from modelport.runtime.precision import native_bf16, plan
from servers import free_port, wait_until
from test_rollout import Traffic, pictures, serve, wait_stage, write_policy  # noqa: F401 (fixture)

CAT, ESPRESSO = samples.KNOWN["chelsea"], samples.KNOWN["coffee"]
AVX2_ONLY = "fpu sse4_2 avx avx2 fma"  # an AMD EPYC's flags, as far as precision cares
ENGINES = [("onnxruntime", "fp32"), ("openvino", "fp32"),
           pytest.param("openvino", "bf16", marks=pytest.mark.skipif(
               not native_bf16(), reason="this CPU does not compute bf16 natively (no amx_bf16 / avx512_bf16)"))]


@pytest.fixture(scope="module")
def reference(default_bundle, images):
    """ONNX Runtime at fp32: today's exact answers, on the two photos."""
    model = Model.load(default_bundle, engine="onnxruntime", precision="fp32")
    crops = np.stack([model.decode(images[name].read_bytes()) for name in ("cat", "espresso")])
    yield crops, model.predict(crops)
    model.close()


@pytest.mark.parametrize("engine, precision", ENGINES)
def test_each_engine_and_precision_gives_the_right_labels_on_real_photos(default_bundle, reference, engine,
                                                                         precision):
    crops, expected = reference
    model = Model.load(default_bundle, engine=engine, precision=precision, concurrent_batches=2)
    try:
        assert (model.engine, model.precision) == (engine, precision)
        for runtime in (model.runtime, model.thin_runtime):  # a lone batch, and one beside another
            got = model.probabilities(runtime.run({"image": crops}, ["probabilities"])["probabilities"])
            assert got[0].argmax() in CAT and got[1].argmax() in ESPRESSO
            # fp32 on either engine is fp32: the same probabilities to rounding; bf16 keeps the order
            # of what matters and moves probabilities by at most a few hundredths.
            assert np.abs(got - expected).max() < (1e-4 if precision == "fp32" else 0.05)
            assert (np.argsort(-got, 1)[:, :3] == np.argsort(-expected, 1)[:, :3]).all() or precision == "bf16"
        if engine == "openvino":
            assert model.runtime.inference_precision == precision  # read back from the compiled model
    finally:
        model.close()


def test_bf16_is_refused_with_the_reason_where_the_cpu_lacks_it(default_bundle, monkeypatch):
    monkeypatch.setenv("MODELPORT_CPU_FLAGS", AVX2_ONLY)
    with pytest.raises(BundleError, match="does not compute bf16 natively"):
        Model.load(default_bundle, precision="bf16")
    # auto on such a CPU: fp32, and it says why, for a version checked at bf16 (optimize --precision bf16).
    bundle = load_bundle(default_bundle)
    checked = plan(replace(bundle, metadata={"precision": "bf16", "speedup_batch8": 2.0}))
    assert checked.precision == "fp32" and "does not compute bf16 natively" in checked.reason
    # ...and a packaged model's INT8 variant runs its float layers at fp32 there, not bf16.
    if plan(bundle).precision == "int8":
        model = Model.load(default_bundle, precision="int8")
        assert model.runtime.inference_precision == "fp32" or model.engine == "onnxruntime"
        model.close()


def test_bf16_refused_stops_the_server_with_the_reason(default_bundle, tmp_path):
    env = {**__import__("os").environ, "MODELPORT_CPU_FLAGS": AVX2_ONLY}
    done = subprocess.run([sys.executable, "-m", "modelport", "serve", str(default_bundle), "--precision", "bf16",
                           "--port", str(free_port())], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode != 0
    assert "does not compute bf16 natively" in done.stderr and "precision" in done.stderr


@pytest.mark.parametrize("engine, precision, message", [
    ("onnxruntime", "bf16", None),  # refused for the engine, or before that for the CPU
    ("auto", "int8", "needs an INT8 version of this model: make one with `modelport optimize"),
])
def test_settings_that_cannot_hold_are_refused_at_load(tmp_path, engine, precision, message):
    with pytest.raises(BundleError) as refused:
        plan(load_bundle(make_tiny_bundle(tmp_path / "m" / "1")), engine=engine, precision=precision)
    if message:
        assert message in refused.value.message
    else:
        assert "ONNX Runtime has no bf16" in refused.value.message or "natively" in refused.value.message


def test_a_typo_in_the_settings_is_a_bundle_error(tmp_path):
    make_tiny_bundle(tmp_path / "m" / "1", serving={"precision": "fp8"})
    with pytest.raises(BundleError, match="serving.precision = 'fp8'; expected one of auto, fp32, bf16, int8"):
        load_bundle(tmp_path / "m" / "1")


def test_fp32_asked_keeps_onnx_runtime_and_its_exact_answers(default_bundle, reference):
    crops, expected = reference
    model = Model.load(default_bundle, precision="fp32")
    try:
        assert model.engine == "onnxruntime" and np.array_equal(model.predict(crops), expected)
    finally:
        model.close()


def test_autos_choice_and_its_reason_are_in_the_v2_metadata(default_server, default_bundle):
    reply = httpx.get(default_server.url + "/v2/models/efficientnet-lite0")
    parameters = reply.json()["parameters"]
    expected = plan(load_bundle(default_bundle))
    assert parameters["precision"] == expected.precision and parameters["precision_reason"].startswith(expected.reason)
    assert parameters["engine"] in expected.engines
    metadata = load_bundle(default_bundle).metadata
    checked = {p for p in ("bf16", "int8") if any(k.startswith(f"{p}_speedup") for k in metadata)}
    if checked:  # checked at build on this CPU: served at the fastest of them, and it says so
        assert parameters["precision"] in checked and "checked against fp32 on real images" in parameters[
            "precision_reason"]
    else:
        assert parameters["precision"] == "fp32"


def test_an_openvino_version_rolls_out_and_takes_over_like_any_other(tmp_path, pictures):  # noqa: F811
    repo = tmp_path / "repo"
    make_tiny_bundle(repo / "m" / "1", serving={"top_k": 3, "runtime": "onnxruntime", "precision": "fp32"})
    # OpenVINO's call costs more than ONNX Runtime's on a graph this tiny: latency is not what is tested.
    write_policy(repo / "m", "shadow_requests = 10\ncanary_share = 0.3\ncanary_requests = 10\nmax_p99_ratio = 100")
    server = serve(repo, tmp_path)
    try:
        with Traffic(server.url, "m", pictures) as traffic:
            wait_until(lambda: len(traffic.answers) > 10)
            start = len(traffic.answers)
            make_tiny_bundle(repo / "m" / "2", serving={"top_k": 3, "runtime": "openvino", "precision": "fp32"})
            wait_stage(server.url, "m", "promoted", 60)
            wait_until(lambda: traffic.answers[-1][1] == "2")
            parameters = httpx.get(server.url + "/v2/models/m/versions/2").json()["parameters"]
            assert (parameters["engine"], parameters["precision"]) == ("openvino", "fp32")
            # Reloaded from disk like any version: a third one, on OpenVINO too, takes over in turn.
            make_tiny_bundle(repo / "m" / "3", serving={"top_k": 3, "runtime": "openvino", "precision": "fp32"})
            wait_until(lambda: traffic.answers[-1][1] == "3", 60, what="version 3 promoted")
        assert all(code == 200 for code, _, _ in traffic.since(start))  # zero errors through both rollouts
    finally:
        server.stop()


def test_write_config_round_trips_the_new_serving_keys(tmp_path):
    make_tiny_bundle(tmp_path / "b", serving={"runtime": "openvino", "precision": "bf16"})
    bundle = load_bundle(tmp_path / "b")
    assert (bundle.serving.runtime, bundle.serving.precision) == ("openvino", "bf16")
    write_config(tmp_path / "b", {"format": 1, "runtime": "onnx", "model_file": "model.onnx"})


def test_compiled_models_are_cached_under_the_home_and_the_cache_is_trimmed(default_bundle, model_home,
                                                                             monkeypatch):
    from modelport.runtime import openvino

    Model.load(default_bundle, engine="openvino", precision="fp32").close()
    cache = model_home / "cache" / "openvino"
    blobs = list(cache.iterdir())
    assert any(b.stat().st_size > 1_000_000 for b in blobs)  # Lite0 compiled, weights inside
    # Trimmed to its bound, oldest first, when a process opens it.
    for i, age in enumerate((300, 200, 100)):
        old = cache / f"old-{i}.blob"
        old.write_bytes(b"x" * 1000)
        os.utime(old, (time.time() - age, time.time() - age))
    newest = max(blobs, key=lambda b: b.stat().st_mtime)
    monkeypatch.setattr(openvino, "CACHE_MAX_BYTES", newest.stat().st_size + 1500)
    assert openvino._cache_dir() == cache
    left = {b.name for b in cache.iterdir()}
    assert newest.name in left and "old-0.blob" not in left and "old-1.blob" not in left
