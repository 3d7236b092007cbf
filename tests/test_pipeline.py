"""Pipelines (modelport/pipeline/): cascades, chains and ensembles served like one model, by a real server.

The steps are real models: the default EfficientNet-Lite0 (the cheap step), a 1000-class ONNX
graph at 260 px with ImageNet's labels (the "accurate" step: another input size, another answer),
and a TorchScript head on Lite0's features (a chain across runtimes).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import make_tiny_bundle
from modelport import Client, samples
from modelport.engine import imaging
from modelport.repository.bundle import write_config
from modelport.errors import BundleError
from modelport.engine.model import Model
from modelport.pipeline import service as pipeline_service
from modelport.pipeline.config import MAX_DEPTH, check_graph, read_pipeline
from modelport.pipeline.service import PipelineService, _Images
from modelport.lifecycle.routing import RoutingTable
from modelport.lifecycle.states import State
from modelport.engine.service import ModelService, Timing
from servers import Gate, Server, free_port, make_gate_bundle, metric, raw_dealer, wait_until

CHEAP, ACCURATE, HEAD = "efficientnet-lite0", "accurate", "flowers-head"
FLOWERS = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]


def write_pipeline(repo: Path, name: str, text: str) -> Path:
    directory = repo / name
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "pipeline.toml"
    path.write_text(text)
    return path


def make_head(directory: Path, seed: int = 3) -> object:
    """A TorchScript classifier head: Lite0's 1280 features -> 5 flower probabilities."""
    import torch

    torch.manual_seed(seed)
    head = torch.nn.Sequential(torch.nn.Linear(1280, len(FLOWERS)), torch.nn.Softmax(dim=1)).eval()
    directory.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(head), str(directory / "head.pt"))
    (directory / "labels.txt").write_text("\n".join(FLOWERS) + "\n")
    write_config(directory, {"format": 1, "runtime": "torch", "model_file": "head.pt", "outputs": ["probabilities"],
                             "input": {"kind": "tensor", "size": 1280, "name": "features", "dtype": "float32"},
                             "output": {"name": "probabilities", "kind": "probabilities"}})
    return head


@pytest.fixture(scope="module")
def repo(default_bundle, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("pipelines")
    shutil.copytree(default_bundle, repo / CHEAP / "1")
    labels = (default_bundle / "labels.txt").read_text().splitlines()
    make_tiny_bundle(repo / ACCURATE / "1", classes=1000, size=260, dtype="uint8", layout="NHWC", labels=labels,
                     seed=5)
    make_tiny_bundle(repo / "small" / "1", classes=4)  # other labels, another input
    make_head(repo / HEAD / "1")
    return repo


@pytest.fixture(scope="module")
def models(repo):
    return {name: Model.load(repo / name / "1", name=name) for name in (CHEAP, ACCURATE, HEAD)}


@pytest.fixture(scope="module")
def threshold(models, images) -> float:
    """Between the cheap step's top-1 on a photo it is sure of and on an image it is not sure of."""
    sure = _top1(models[CHEAP], images["espresso"].read_bytes())
    unsure = _top1(models[CHEAP], _noise())
    assert unsure + 0.1 < sure, (unsure, sure)  # the test needs one of each
    return (sure + unsure) / 2


@pytest.fixture(scope="module")
def server(repo, threshold, tmp_path_factory):
    write_pipeline(repo, "smart", f'kind = "cascade"\nsteps = ["{CHEAP}", "{ACCURATE}"]\n'
                                  f'escalate_below = {threshold}\n')
    write_pipeline(repo, "flowers", f'kind = "chain"\nsteps = ["{CHEAP}", "{HEAD}"]\nfeed = ["features"]\n')
    write_pipeline(repo, "blend", f'kind = "ensemble"\nsteps = ["{CHEAP}", "{ACCURATE}"]\nweights = [1, 3]\n')
    write_pipeline(repo, "nested", 'kind = "chain"\nsteps = ["smart"]\n')
    write_pipeline(repo, "mixed-labels", f'kind = "cascade"\nsteps = ["{CHEAP}", "small"]\nescalate_below = 0.5\n')
    write_pipeline(repo, "misfed", f'kind = "chain"\nsteps = ["{CHEAP}", "{HEAD}"]\nfeed = ["probabilities"]\n')
    write_pipeline(repo, "missing-step", f'kind = "cascade"\nsteps = ["{CHEAP}", "nope"]\nescalate_below = 0.5\n')
    log = tmp_path_factory.mktemp("pipeline-server") / "server.log"
    server = Server(str(repo), log=log, zmq_port=free_port()).wait_ready()
    yield server
    server.stop()


def _noise() -> bytes:
    import io

    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _probabilities(model: Model, data: bytes) -> np.ndarray:
    return model.predict(np.stack([model.decode(data)]))[0]


def _top1(model: Model, data: bytes) -> float:
    return float(_probabilities(model, data).max())


def _rows(server, model: str) -> float:
    return metric(server.url, "modelport_batch_size_sum", model=model)


def _v2_images(server, model: str, images: list[bytes], **extra) -> httpx.Response:
    body = {"inputs": [{"name": "image_bytes", "shape": [len(images)], "datatype": "BYTES",
                        "data": [base64.b64encode(i).decode() for i in images]}], **extra}
    return httpx.post(f"{server.url}/v2/models/{model}/infer", json=body, timeout=30)


# -- serving --------------------------------------------------------------------------------------

def test_a_confident_image_stops_at_the_cheap_step_and_an_unsure_one_goes_on(server, models, images):
    sure, unsure = images["espresso"].read_bytes(), _noise()
    before = {m: _rows(server, m) for m in (CHEAP, ACCURATE)}
    response = _v2_images(server, "smart", [sure])
    assert response.status_code == 200, response.text
    assert response.headers["x-modelport-answered-by"] == CHEAP
    assert {m: _rows(server, m) - before[m] for m in (CHEAP, ACCURATE)} == {CHEAP: 1, ACCURATE: 0}
    answer = np.array(response.json()["outputs"][0]["data"], np.float32)
    assert np.allclose(answer, _probabilities(models[CHEAP], sure), atol=1e-6)

    response = _v2_images(server, "smart", [unsure, sure])  # rows answered by different steps
    assert response.json()["parameters"]["answered_by"] == f"{ACCURATE},{CHEAP}"
    assert {m: _rows(server, m) - before[m] for m in (CHEAP, ACCURATE)} == {CHEAP: 3, ACCURATE: 1}
    answer = np.array(response.json()["outputs"][0]["data"], np.float32).reshape(2, 1000)
    assert np.allclose(answer[0], _probabilities(models[ACCURATE], unsure), atol=1e-6)  # decoded at 260 px
    assert np.allclose(answer[1], _probabilities(models[CHEAP], sure), atol=1e-6)
    timing = response.headers["server-timing"]
    assert f"{CHEAP}.infer" in timing and f"{ACCURATE}.infer" in timing
    assert metric(server.url, "modelport_pipeline_step_rows_total", pipeline="smart", step=ACCURATE) >= 1


def test_a_chain_onnx_to_torchscript_answers_like_the_two_run_by_hand(server, models, images):
    data = images["cat"].read_bytes()
    features = models[CHEAP].run_crops(np.stack([models[CHEAP].decode(data)]), ["features"])["features"]
    by_hand = models[HEAD].run({"features": features}, ["probabilities"])["probabilities"][0]
    response = _v2_images(server, "flowers", [data])
    assert response.status_code == 200, response.text
    answer = np.array(response.json()["outputs"][0]["data"], np.float32)
    assert np.allclose(answer, by_hand, atol=1e-5)
    top = httpx.post(server.url + "/?model=flowers&k=1", files={"data": data}).json()
    assert top == [[FLOWERS[int(np.argmax(by_hand))], pytest.approx(float(by_hand.max()), abs=1e-5)]]
    meta = httpx.get(server.url + "/v2/models/flowers").json()
    assert meta["platform"] == "modelport_pipeline/chain"
    assert [o["name"] for o in meta["outputs"]] == ["probabilities"]


def test_an_ensemble_answers_the_weighted_average(server, models, images):
    data = images["cat"].read_bytes()
    expected = 0.25 * _probabilities(models[CHEAP], data) + 0.75 * _probabilities(models[ACCURATE], data)
    answer = np.array(_v2_images(server, "blend", [data]).json()["outputs"][0]["data"], np.float32)
    assert np.allclose(answer, expected, atol=1e-6)


def test_pipelines_answer_on_every_protocol_with_the_step_named(server, models, images):
    sure = images["espresso"].read_bytes()
    expected = _probabilities(models[CHEAP], sure)
    best = int(np.argmax(expected))
    upload = httpx.post(server.url + "/?model=smart", files={"data": sure})
    assert upload.status_code == 200 and upload.headers["x-modelport-answered-by"] == CHEAP
    assert upload.json()[0][0] == models[CHEAP].labels[best]
    tf = httpx.post(server.url + "/v1/models/smart:predict",
                    json={"instances": [{"b64": base64.b64encode(sure).decode()}]})
    assert tf.status_code == 200 and tf.headers["x-modelport-answered-by"] == CHEAP
    assert int(np.argmax(tf.json()["predictions"][0])) == best
    with Client(server.zmq_url, model="smart") as over_zmq, Client(server.url, model="smart") as over_http:
        assert over_zmq.classify(sure)[0].index == over_http.classify(sure)[0].index == best
        assert np.allclose(over_zmq.infer("smart", [sure])["probabilities"][0], expected, atol=1e-6)
    reply = _zmq_raw(server, {"op": "classify", "model": "smart", "images": [sure, _noise()]})
    assert reply["ok"] and reply["answered_by"] == [CHEAP, ACCURATE]
    nested = httpx.post(server.url + "/?model=nested", files={"data": sure})  # a pipeline of a pipeline
    assert nested.status_code == 200 and nested.json()[0][0] == models[CHEAP].labels[best]
    index = {m["name"]: m for m in httpx.get(server.url + "/v2/models/smart").json()["inputs"]}
    assert set(index) == {"image", "image_bytes"}


def _zmq_raw(server, request: dict) -> dict:
    import msgpack

    with raw_dealer(server.zmq_port, timeout_ms=20000) as raw:
        raw.send(msgpack.packb({"id": 1, **request}))
        return msgpack.unpackb(raw.recv())


def test_bad_input_to_a_pipeline_is_a_clear_error(server):
    response = httpx.post(server.url + "/?model=smart", files={"data": b"not an image"})
    assert response.status_code == 400 and "cannot decode image" in response.json()["error"]
    tensor = {"inputs": [{"name": "image", "shape": [1, 224, 224, 3], "datatype": "UINT8", "data": [0] * 150528}]}
    response = httpx.post(server.url + "/v2/models/smart/infer", json=tensor)
    assert response.status_code == 400 and "takes encoded images" in response.json()["error"]
    response = _v2_images(server, "smart", [b"x"], outputs=[{"name": "features"}])
    assert response.status_code == 400 and "has no output 'features'" in response.json()["error"]


def test_broken_pipelines_fail_at_load_with_their_reason_and_the_models_serve_on(server):
    reasons = {
        "mixed-labels": "label sets differ: step 'efficientnet-lite0' has 1000 labels, step 'small' has 4",
        "misfed": "feed[0]: output 'probabilities' of step 'efficientnet-lite0' is FP32 [-1, 1000], "
                  "but step 'flowers-head' takes FP32 [-1, 1280]",
        "missing-step": "step 'nope': unknown model 'nope'",
    }
    for name, reason in reasons.items():
        response = httpx.get(f"{server.url}/v2/models/{name}")
        assert response.status_code == 404, name
        assert reason in response.json()["error"] and "pipeline.toml" in response.json()["error"], response.text
    for model in (CHEAP, "small", HEAD):
        assert httpx.get(f"{server.url}/v2/models/{model}/ready").status_code == 200


def test_a_pipeline_waits_for_a_step_still_being_written_and_never_fails_for_it(server, repo, default_bundle):
    """The step's files keep changing for a while (a copy in progress): the pipeline is LOADING,
    says what it waits for, and is READY once the step is; never FAILED on the way."""
    step = repo / "late-step" / "1"
    shutil.copytree(default_bundle, step)
    stop = threading.Event()

    def keep_writing():  # the directory's signature changes every 0.1 s: never settled
        for i in range(100):  # at most 10 s
            if stop.wait(0.1):
                return
            (step / "copying.tmp").write_text(str(i))

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        write_pipeline(repo, "late", 'kind = "chain"\nsteps = ["late-step"]\n')

        def waiting() -> bool:  # (before: 404 while the pipeline's own file settles)
            reply = httpx.get(server.url + "/v2/models/late")
            return reply.status_code == 503 and "waiting: step 'late-step'" in reply.json()["error"]

        wait_until(waiting, 10, what="the pipeline LOADING, waiting for its step")
    finally:
        stop.set()
        writer.join()
    seen = []

    def ready() -> bool:
        reply = httpx.get(server.url + "/v2/models/late")
        seen.append((reply.status_code, reply.text[:200]))
        return reply.status_code == 200

    wait_until(ready, 20, what="the pipeline READY once its step is")
    assert all(status in (200, 503) for status, _ in seen), seen  # never FAILED with a reason about to be stale
    shutil.rmtree(repo / "late")
    shutil.rmtree(repo / "late-step")


def test_a_pipeline_hot_reloads(server, repo, images):
    data = images["espresso"].read_bytes()
    path = write_pipeline(repo, "live", f'kind = "cascade"\nsteps = ["{CHEAP}", "{ACCURATE}"]\nescalate_below = 0\n')

    def answered_by():
        response = httpx.post(server.url + "/?model=live", files={"data": data})
        return response.headers.get("x-modelport-answered-by") if response.status_code == 200 else response.status_code

    wait_until(lambda: answered_by() == CHEAP, 10, what="a new pipeline served")
    path.write_text(f'kind = "cascade"\nsteps = ["{CHEAP}", "{ACCURATE}"]\nescalate_below = 1\n')  # always escalate
    wait_until(lambda: answered_by() == ACCURATE, 10, what="an edited pipeline rebuilt")
    path.write_text('kind = "cascade"\nsteps = []\n')
    wait_until(lambda: answered_by() == 404, 10, what="a broken edit FAILED")
    assert "steps must be a list of model names" in httpx.get(server.url + "/v2/models/live").json()["error"]
    path.unlink()
    path.parent.rmdir()
    wait_until(lambda: httpx.get(server.url + "/v2/models/live").json().get("error", "").startswith("unknown model"),
               10, what="a removed pipeline forgotten")


# -- pipeline.toml, checked without a server --------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ('kind = "funnel"\nsteps = ["a"]', "kind = 'funnel'; expected one of cascade, chain, ensemble"),
    ('kind = "cascade"\nsteps = ["a", "b"]', "a cascade needs escalate_below"),
    ('kind = "cascade"\nsteps = ["a", "b"]\nescalate_below = 1.5', "escalate_below must be a number from 0 to 1"),
    ('kind = "cascade"\nsteps = ["a", "b", "c"]\nescalate_below = [0.5]', "or a list of 2 such numbers"),
    ('kind = "cascade"\nsteps = ["a", "b"]\nescalate_below = 0.5\nconfidence = "vibes"', "confidence = 'vibes'"),
    ('kind = "cascade"\nsteps = ["a", "a"]\nescalate_below = 0.5', "names the same step twice"),
    ('kind = "chain"\nsteps = ["a", "b"]\nfeed = ["x", "y"]', "feed must list 1 output name(s)"),
    ('kind = "chain"\nsteps = ["a", "b"]\nescalate_below = 0.5', "escalate_below applies to a cascade, not to a chain"),
    ('kind = "ensemble"\nsteps = ["a", "b"]\nweights = [1]', "weights must be 2 non-negative numbers"),
    ('kind = "ensemble"\nsteps = ["a", "../b"]', "invalid step model name '../b'"),
    ('kind = "ensemble"\nsteps = ["a"]\nthreshold = 1', "unknown key 'threshold'"),
    ('kind = "ensemble"\nsteps = "a"', "steps must be a list of model names"),
    ('kind = "chain\nsteps = []', "not valid TOML"),
])
def test_each_mistake_in_pipeline_toml_is_named(tmp_path, text, message):
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    with pytest.raises(BundleError) as info:
        read_pipeline(path)
    assert message in info.value.message and str(path) in info.value.message


def test_cycles_and_deep_nesting_are_refused(tmp_path):
    configs = {}
    for name, steps in {"a": ["b"], "b": ["c"], "c": ["a"]}.items():
        configs[name] = read_pipeline(write_pipeline(tmp_path, name, f'kind = "chain"\nsteps = {json.dumps(steps)}'))
    with pytest.raises(BundleError) as info:
        check_graph("a", configs["a"], configs.get)
    assert "steps form a cycle: a -> b -> c -> a" in info.value.message

    names = [f"p{i}" for i in range(MAX_DEPTH + 2)]
    deep = {n: read_pipeline(write_pipeline(tmp_path, n, f'kind = "chain"\nsteps = ["{nxt}"]'))
            for n, nxt in zip(names, names[1:] + ["model"])}
    check_graph(names[-MAX_DEPTH], deep[names[-MAX_DEPTH]], deep.get)  # exactly the limit: fine
    with pytest.raises(BundleError) as info:
        check_graph(names[0], deep[names[0]], deep.get)
    assert f"nested deeper than {MAX_DEPTH} levels" in info.value.message


# -- modelport pipeline evaluate --------------------------------------------------------------------

def _evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modelport", "pipeline", "evaluate", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_cascade(tmp_path_factory):
    """Two 4-class models on real photos, and a folder of those photos in <class>/ folders."""
    root = tmp_path_factory.mktemp("evaluate")
    repo, photos = root / "repo", root / "photos"
    make_tiny_bundle(repo / "cheap" / "1", seed=0, size=16)
    make_tiny_bundle(repo / "sharp" / "1", seed=1, size=32)
    write_pipeline(repo, "tiered", 'kind = "cascade"\nsteps = ["cheap", "sharp"]\nescalate_below = 0.5\n')
    for i, data in enumerate(samples.photo_set(24, seed=3)):
        folder = photos / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.jpg").write_bytes(data)
    return repo, photos


def test_evaluate_reports_numbers_a_replay_by_hand_agrees_with(tiny_cascade, tmp_path):
    repo, photos = tiny_cascade
    plot = tmp_path / "curve.png"
    result = _evaluate(str(repo / "tiered"), str(photos), "--json", "--target", "0.2", "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"

    paths = sorted(photos.rglob("*.jpg"))
    truth = np.array([int(p.parent.name.removeprefix("class")) for p in paths])
    cheap, sharp = (Model.load(repo / n / "1", name=n) for n in ("cheap", "sharp"))
    first, second = ([_probabilities(m, p.read_bytes()) for p in paths] for m in (cheap, sharp))
    first, second = np.array(first), np.array(second)
    assert report["measure"] == "accuracy" and report["images"] == 24
    cost_cheap, cost_sharp = report["step_cost_ms"]
    assert report["reference_cost_ms"] >= cost_sharp > 0  # alone, it decodes for itself
    for row in report["rows"]:
        escalate = first.max(axis=1) < row["threshold"]
        answer = np.where(escalate, second.argmax(axis=1), first.argmax(axis=1))
        assert row["escalated"] == pytest.approx(escalate.mean())
        assert row["score"] == pytest.approx((answer == truth).mean())
        assert row["cost_ms"] == pytest.approx(cost_cheap + escalate.mean() * cost_sharp)
        assert row["relative_cost"] == pytest.approx(row["cost_ms"] / report["reference_cost_ms"])
    meeting = [r for r in report["rows"] if r["score"] >= 0.2]
    assert report["best"] == min(meeting, key=lambda r: (r["cost_ms"], -r["score"]))
    assert report["reference_score"] == pytest.approx((second.argmax(axis=1) == truth).mean())
    confidence, correct = first.max(axis=1), first.argmax(axis=1) == truth
    ece = sum(abs(confidence[b].mean() - correct[b].mean()) * b.mean()
              for b in (np.digitize(confidence, np.linspace(0, 1, 11)[1:-1], right=True) == k for k in range(10))
              if b.any())
    assert report["calibration_error"] == pytest.approx(ece)


def test_evaluate_says_plainly_when_the_cascade_costs_more(tiny_cascade, tmp_path):
    repo, photos = tiny_cascade
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted(photos.rglob("*.jpg"))[:8]:
        shutil.copy(path, flat / path.name)
    # With the first step as the reference, full agreement comes at no escalation and at exactly the
    # first step's own cost (measured once): never cheaper than "the accurate model alone".
    result = _evaluate(str(repo / "tiered"), str(flat), "--reference", "cheap", "--target-agreement", "1.0")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "agreement with cheap" in text
    assert "the cascade costs MORE than the accurate model alone" in text and "serve the accurate model alone" in text
    bad = _evaluate(str(repo / "tiered"), str(photos / "class0"), "--reference", "nope")
    assert bad.returncode != 0 and "nope" in bad.stderr and "Traceback" not in bad.stderr


def test_the_deadline_holds_across_steps_and_later_steps_are_not_run(tmp_path, images):
    repo = tmp_path / "repo"
    held = make_gate_bundle(repo / "held" / "1", max_batch_size=1, max_delay_ms=0)
    make_tiny_bundle(repo / "after" / "1", classes=4, size=8, layout="NHWC", dtype="uint8", labels=list("abcd"))
    write_pipeline(repo, "slow-first", 'kind = "cascade"\nsteps = ["held", "after"]\nescalate_below = 1.0\n')
    server = Server(str(repo), log=tmp_path / "server.log").wait_ready()
    gate = Gate(held)
    try:
        data = images["cat"].read_bytes()
        ok = httpx.post(server.url + "/?model=slow-first", files={"data": data})
        assert ok.status_code == 200 and ok.headers["x-modelport-answered-by"] == "after"  # 1.0: always escalates
        ran = _rows(server, "after")
        gate.close()
        started = time.monotonic()
        late = httpx.post(server.url + "/?model=slow-first", files={"data": data},
                          headers={"x-request-timeout-ms": "400"}, timeout=30)
        waited = time.monotonic() - started
        assert late.status_code == 504 and late.json()["kind"] == "deadline_exceeded"
        assert 0.35 < waited < 2.0  # answered at its deadline, not when the step finally finished
        gate.open()
        wait_until(lambda: len(gate.batches()) == 2, 10, what="the held step finished")  # the first, then this
        time.sleep(0.3)
        assert _rows(server, "after") == ran  # the request out of time never reached its second step
    finally:
        gate.open()
        server.stop()


# -- one decode per image per request -------------------------------------------------------------

LITE2_LIKE = "lite2-geometry"  # Lite2's input geometry (260 px crop of a 297 px resize) on a tiny graph


@pytest.fixture(scope="module")
def lite2_like(default_bundle, tmp_path_factory) -> Path:
    labels = (default_bundle / "labels.txt").read_text().splitlines()
    return make_tiny_bundle(tmp_path_factory.mktemp("lite2-like") / LITE2_LIKE / "1", classes=1000, size=260,
                            dtype="uint8", layout="NHWC", labels=labels, seed=7, input__resize_shorter=297)


@pytest.fixture
def decodes(monkeypatch) -> list[tuple[str, int]]:
    """(decoder, DCT scale) of every image decode from now on, in this process, decode threads too."""
    from PIL import Image

    seen, real = [], Image._getdecoder

    def counting(mode, decoder_name, args, extra=()):
        if decoder_name != "raw":  # raw: pixels copied from memory, not decoded
            seen.append((decoder_name, extra[0] if decoder_name == "jpeg" else 1))
        return real(mode, decoder_name, args, extra)

    monkeypatch.setattr(Image, "_getdecoder", counting)
    return seen


def _resized(array: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(array).resize((width, height), Image.BILINEAR))


def _sharing_photos() -> list[bytes]:
    """Photos on which a 256 px and a 297 px resize take the same DCT scale: 1/1 under 1536 px
    on the shorter side, 1/2 at 2400 px (grey too), and a PNG, never drafted."""
    import io

    from PIL import Image

    cat, coffee = samples.photo("chelsea"), samples.photo("coffee")
    png = io.BytesIO()
    Image.fromarray(_resized(coffee, 900, 600)).save(png, format="PNG")
    return [samples.jpeg(coffee), samples.jpeg(_resized(cat, 3200, 2400)),
            samples.jpeg(_resized(cat, 2400, 3200)[..., 0]), png.getvalue()]


def _images(photos: list[bytes], pool) -> _Images:
    return _Images(photos, None, Timing(), pool=pool, max_pixels=imaging.DEFAULT_MAX_PIXELS)


async def test_an_image_is_decoded_once_for_two_input_sizes_and_each_crop_is_what_decode_gives(
        models, lite2_like, decodes):
    specs = models[CHEAP].spec, Model.load(lite2_like, name=LITE2_LIKE).spec
    # 1536 px on the shorter side: 1/2 covers a 256 px resize three times over, not a 297 px one.
    # Decoding once at 1/1 would change the 224 px crop: that photo is decoded again instead.
    between = samples.jpeg(_resized(samples.photo("chelsea"), 2048, 1536))
    for photos, expected in ((_sharing_photos(), [("jpeg", 1), ("jpeg", 2), ("jpeg", 2), ("zip", 1)]),
                             ([between], [("jpeg", 2), ("jpeg", 1)])):
        alone = [np.stack([imaging.decode(p, spec) for p in photos]) for spec in specs]
        decodes.clear()
        with ThreadPoolExecutor(1) as pool:
            source = _images(photos, pool)
            for spec, crops in zip(specs, alone):
                assert np.array_equal(await source.crops(spec, np.arange(len(photos)), keep_decoded=True), crops)
        assert decodes == expected


@pytest.mark.parametrize("room, decoded_again", [(0, False), (-1, True)])
async def test_a_request_keeps_decoded_images_up_to_its_limit_and_until_forgotten(
        models, lite2_like, decodes, monkeypatch, room, decoded_again):
    photo = _sharing_photos()[1]  # 3200 x 2400, decoded at 1/2: 1600 x 1200 x 3 bytes
    monkeypatch.setattr(pipeline_service, "KEEP_DECODED_BYTES", 1600 * 1200 * 3 + room)
    cheap, accurate = models[CHEAP].spec, Model.load(lite2_like, name=LITE2_LIKE).spec
    decodes.clear()  # the sample photo's own
    with ThreadPoolExecutor(1) as pool:
        source = _images([photo], pool)
        await source.crops(cheap, np.arange(1), keep_decoded=True)
        await source.crops(accurate, np.arange(1), keep_decoded=True)
        assert len(decodes) == (2 if decoded_again else 1)
        source.forget([0])  # the row goes no further: a third size would need a new decode
        await source.crops(replace(accurate, height=240, width=240), np.arange(1), keep_decoded=False)
        assert len(decodes) == (3 if decoded_again else 2)


async def test_a_cascade_decodes_each_escalated_image_once_and_an_ensemble_each_image_once(
        default_bundle, lite2_like, tmp_path, decodes):
    photos = _sharing_photos()
    cheap, accurate = Model.load(default_bundle, name=CHEAP), Model.load(lite2_like, name=LITE2_LIKE)
    expected = {m.name: m.predict(np.stack([m.decode(p) for p in photos])) for m in (cheap, accurate)}
    decodes.clear()
    routing = RoutingTable()
    with ThreadPoolExecutor(2) as pool:
        services = [ModelService(m, decode_pool=pool) for m in (cheap, accurate)]
        for service in services:
            service.start()
            routing.set_state(service.name, 1, State.READY, service=service)
        try:
            for kind, extra in (("cascade", "escalate_below = 1.0"), ("ensemble", "")):
                config = read_pipeline(write_pipeline(tmp_path, kind, f'kind = "{kind}"\n'
                                                      f'steps = ["{CHEAP}", "{LITE2_LIKE}"]\n{extra}\n'))
                pipeline = PipelineService(kind, config, routing, decode_pool=pool,
                                           max_pixels=imaging.DEFAULT_MAX_PIXELS, max_images=16)
                timing = Timing()
                answer = (await pipeline.infer_images(photos, deadline=None, timing=timing))["probabilities"]
                assert len(decodes) == len(photos), (kind, decodes)
                decodes.clear()
                if kind == "cascade":  # every row escalated (no top-1 reaches 1.0), each decoded once
                    assert timing.answered_by == [LITE2_LIKE] * len(photos)
                    assert np.allclose(answer, expected[LITE2_LIKE], atol=1e-6)
                else:
                    assert np.allclose(answer, (expected[CHEAP] + expected[LITE2_LIKE]) / 2, atol=1e-6)
        finally:
            for service in services:
                await service.close()
