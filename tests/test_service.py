"""modelport/engine/service.py in-process, with tiny real models and no server: a service answers
what its model answers (tensors, images, top-k); it refuses at once, without computing, what is
over the image limit, past its deadline, malformed, or beyond a full queue (the gate model holds a
batch to fill it); it counts what it did. And ``ModelService`` and ``PipelineService`` both offer
everything the ``Servable`` protocol declares."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import make_tiny_bundle, tiny_onnx
from modelport import samples
from modelport.engine.model import Model
from modelport.engine.servable import Servable, ServedModel, Stats, Timing
from modelport.engine.service import ModelService
from modelport.errors import BadInput, DeadlineExceeded, Overloaded, PayloadTooLarge
from modelport.lifecycle.routing import RoutingTable
from modelport.lifecycle.states import State
from modelport.pipeline.config import read_pipeline
from modelport.pipeline.service import PipelineService
from modelport.repository.bundle import Serving
from servers import Gate, make_gate_bundle


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(2) as pool:
        yield pool


@pytest.fixture
def tiny(tmp_path):
    """A tiny float model (NCHW, 8 x 8, 4 classes) and the weights of its graph."""
    return make_tiny_bundle(tmp_path / "tiny" / "1"), tiny_onnx(tmp_path / "weights.onnx")


@pytest.fixture
def serve(pool):
    """``async with serve(bundle, **options) as service``: a started ModelService, closed at the end."""

    @contextlib.asynccontextmanager
    async def serving(bundle, **options):
        service = ModelService(Model.load(bundle), decode_pool=pool, **options)
        service.start()
        try:
            yield service
        finally:
            await service.close()

    return serving


@contextlib.contextmanager
def held(gate: Gate):
    """The gate model blocks every batch until the block ends (always opened, even on failure)."""
    gate.close()
    try:
        yield
    finally:
        gate.open()


async def until(condition, what: str, timeout_s: float = 10) -> None:
    """Let the loop run until ``condition()`` holds (a thread or task reached a point), or fail."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.001)


def photos() -> list[bytes]:
    rng = np.random.default_rng(1)
    return [samples.jpeg(samples.photo("chelsea")),  # a real photo of a cat, 451 x 300
            samples.jpeg(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)),
            samples.jpeg(rng.integers(0, 256, (40, 24, 3), dtype=np.uint8))]


def never_computed(service: ModelService) -> bool:
    return service.stats.execution_count == 0 and service.stats.inference_count == 0


# -- the model's own answers ----------------------------------------------------------------------

async def test_infer_tensor_gives_the_models_own_answer(tiny, serve):
    bundle, weights = tiny
    x = np.random.default_rng(0).normal(size=(3, 3, 8, 8)).astype(np.float32)
    async with serve(bundle) as service:
        expected = service.model.run({"image": x})["logits"]
        outputs = await service.infer_tensor(x, deadline=None, timing=Timing())
    assert list(outputs) == ["logits"] and outputs["logits"].shape == (3, 4)
    assert np.allclose(outputs["logits"], expected, atol=1e-6)
    assert np.allclose(outputs["logits"], x.mean(axis=(2, 3)) @ weights, atol=1e-5)  # what the graph computes


async def test_infer_images_decodes_each_image_and_answers_like_the_model(tiny, serve):
    images = photos()
    async with serve(tiny[0]) as service:
        model = service.model
        expected = model.run_crops(np.stack([model.decode(data) for data in images]))["logits"]
        timing = Timing()
        outputs = await service.infer_images(images, deadline=None, timing=timing, input_name="image")
    assert np.allclose(outputs["logits"], expected, atol=1e-6)
    assert timing.decode_s > 0


async def test_classify_gives_the_models_top_k_labels_and_scores(tiny, serve):
    images = photos()
    async with serve(tiny[0]) as service:
        expected = service.model.classify(images, k=2)
        got = await service.classify(images, k=2, deadline=None, timing=Timing())
        default_k = await service.classify(images, k=None, deadline=None, timing=Timing())
    assert [[p.label for p in row] for row in got] == [[p.label for p in row] for row in expected]
    assert np.allclose([[p.score for p in row] for row in got], [[p.score for p in row] for row in expected],
                       atol=1e-6)
    assert all(len(row) == 3 for row in default_k)  # the bundle's serving.top_k
    assert [row[:2] for row in default_k] == got


async def test_a_request_larger_than_a_batch_runs_as_batches_of_at_most_max_batch_size(tmp_path, serve):
    bundle = make_gate_bundle(tmp_path / "gate" / "1", max_batch_size=2)
    x = np.random.default_rng(2).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    async with serve(bundle) as service:
        expected = service.model.run({"image": x})["logits"]
        gate = Gate(bundle)
        outputs = await service.infer_tensor(x, deadline=None, timing=Timing())
    assert gate.batches() == [2, 2, 1]
    assert np.allclose(outputs["logits"], expected, atol=1e-6)  # the parts put back in order


# -- refused at once, nothing computed --------------------------------------------------------------

async def test_the_image_limit_is_a_boundary_pair_and_over_it_nothing_is_computed(tiny, serve):
    x = np.zeros((5, 3, 8, 8), np.float32)
    async with serve(tiny[0], max_images=4) as service:
        service.check_rows(4)
        with pytest.raises(PayloadTooLarge, match="5 images in one request is over the limit of 4") as caught:
            service.check_rows(5, "image")
        assert caught.value.input_name == "image" and caught.value.status == 413
        with pytest.raises(PayloadTooLarge):
            await service.infer_tensor(x, deadline=None, timing=Timing())
        with pytest.raises(PayloadTooLarge):
            await service.infer_images(photos() + photos(), deadline=None, timing=Timing())
        assert never_computed(service)
        await service.infer_tensor(x[:4], deadline=None, timing=Timing())
        assert service.stats.inference_count == 4


async def test_a_deadline_already_passed_is_refused_without_computing(tiny, serve):
    passed = time.monotonic() - 0.001
    async with serve(tiny[0]) as service:
        for call in (service.infer_tensor(np.zeros((1, 3, 8, 8), np.float32), deadline=passed, timing=Timing()),
                     service.infer_images(photos(), deadline=passed, timing=Timing()),
                     service.classify(photos(), k=1, deadline=passed, timing=Timing())):
            with pytest.raises(DeadlineExceeded, match="not computed") as caught:
                await call
            assert caught.value.status == 504
        assert never_computed(service)


async def test_a_deadline_that_passes_while_queued_behind_a_held_batch_is_never_computed(tmp_path, serve):
    bundle = make_gate_bundle(tmp_path / "gate" / "1", max_batch_size=1)
    x = np.zeros((1, 8, 8, 3), np.uint8)
    async with serve(bundle) as service:
        gate = Gate(bundle)
        with held(gate):
            first = asyncio.ensure_future(service.infer_tensor(x, deadline=None, timing=Timing()))
            await until(lambda: service.busy, "the first batch running")
            with pytest.raises(DeadlineExceeded, match="deadline passed while queued; not computed"):
                await service.infer_tensor(x, deadline=time.monotonic() + 0.05, timing=Timing())
        await first
        await service.infer_tensor(x, deadline=None, timing=Timing())  # runs after the expired one's turn
    assert gate.batches() == [1, 1]  # the first and the last: the expired one never reached the model
    assert service.stats.fail_count == 1 and service.stats.success_count == 2


async def test_a_full_queue_refuses_at_once_and_the_refused_request_never_runs(tmp_path, serve):
    bundle = make_gate_bundle(tmp_path / "gate" / "1", max_batch_size=1, max_queue_size=1)
    x = np.zeros((1, 8, 8, 3), np.uint8)
    async with serve(bundle) as service:
        assert (service.busy, service.queued) == (False, 0)
        service.admit()
        gate = Gate(bundle)
        with held(gate):
            running = asyncio.ensure_future(service.infer_tensor(x, deadline=None, timing=Timing()))
            await until(lambda: service.busy, "the first batch running")
            assert service.queued == 0
            service.admit()  # one place left in the queue
            waiting = asyncio.ensure_future(service.infer_tensor(x, deadline=None, timing=Timing()))
            await until(lambda: service.queued == 1, "the second request queued")
            with pytest.raises(Overloaded, match=r"queue full \(1 requests waiting\)") as caught:
                service.admit()
            assert caught.value.retry_after_s == 1 and caught.value.status == 503
            with pytest.raises(Overloaded):
                await service.infer_tensor(x, deadline=None, timing=Timing())
            with pytest.raises(Overloaded):
                await service.infer_images(photos()[:1], deadline=None, timing=Timing())
        await asyncio.gather(running, waiting)
        assert (service.busy, service.queued) == (False, 0)
        service.admit()
    assert gate.batches() == [1, 1]  # the two admitted ones; none of the refused


async def test_a_malformed_tensor_is_bad_input_naming_the_input_and_is_not_computed(tiny, serve):
    nan = np.zeros((1, 3, 8, 8), np.float32)
    nan[0, 0, 0, 0] = np.nan
    inf = np.full((1, 3, 8, 8), np.inf, np.float32)
    cases = [(np.zeros((1, 3, 8, 8), np.float64), "must be FP32"),
             (np.zeros((1, 3, 8, 8), np.uint8), "must be FP32"),
             (np.zeros((1, 3, 8, 9), np.float32), r"must have shape \[-1, 3, 8, 8\], got \[1, 3, 8, 9\]"),
             (np.zeros((3, 8, 8), np.float32), "must have shape"),
             (np.zeros((0, 3, 8, 8), np.float32), "empty batch"),
             (nan, "NaN or infinite"), (inf, "NaN or infinite")]
    async with serve(tiny[0]) as service:
        for array, message in cases:
            with pytest.raises(BadInput, match=message) as caught:
                await service.infer_tensor(array, deadline=None, timing=Timing())
            assert caught.value.input_name == "image"
        assert never_computed(service)


async def test_no_image_or_an_undecodable_one_is_bad_input_and_is_not_computed(tiny, serve):
    async with serve(tiny[0]) as service:
        with pytest.raises(BadInput, match="no image given") as caught:
            await service.infer_images([], deadline=None, timing=Timing(), input_name="images")
        assert caught.value.input_name == "images"
        with pytest.raises(BadInput) as caught:
            await service.classify([photos()[0], b"not an image"], k=1, deadline=None, timing=Timing(),
                                   input_name="images")
        assert caught.value.input_name == "images"
        assert never_computed(service)


def test_resolve_outputs_defaults_to_every_output_and_refuses_an_unknown_one(tiny, pool):
    service = ModelService(Model.load(tiny[0]), decode_pool=pool)
    try:
        assert service.resolve_outputs(None) == ["logits"] and service.resolve_outputs([]) == ["logits"]
        assert service.resolve_outputs(["logits"]) == ["logits"]
        with pytest.raises(BadInput, match="model 'tiny' has no output 'probabilities'; it has logits"):
            service.resolve_outputs(["logits", "probabilities"])
    finally:
        service.model.close()


# -- what it counts -----------------------------------------------------------------------------------

async def test_stats_count_requests_rows_batches_and_failures(tmp_path, serve):
    bundle = make_gate_bundle(tmp_path / "gate" / "1", max_batch_size=8)
    async with serve(bundle) as service:
        assert service.stats == Stats()
        before = int(time.time() * 1000)
        await service.infer_tensor(np.zeros((3, 8, 8, 3), np.uint8), deadline=None, timing=Timing())
        await service.infer_tensor(np.zeros((2, 8, 8, 3), np.uint8), deadline=None, timing=Timing())
        stats = service.stats
        assert (stats.success_count, stats.inference_count, stats.execution_count, stats.fail_count) == (2, 5, 2, 0)
        assert stats.success_ns > 0 and stats.compute_infer_ns > 0 and stats.queue_ns >= 0
        assert stats.last_inference_ms >= before
        (bundle / "fail").touch()  # the model raises: a failure of the model's own
        with pytest.raises(RuntimeError, match="a bug in model code"):
            await service.infer_tensor(np.zeros((1, 8, 8, 3), np.uint8), deadline=None, timing=Timing())
        assert (stats.success_count, stats.fail_count) == (2, 1) and stats.fail_ns > 0
        (bundle / "fail").unlink()
        await service.infer_tensor(np.zeros((1, 8, 8, 3), np.uint8), deadline=None, timing=Timing())
        assert (stats.success_count, stats.fail_count) == (3, 1)


# -- the Servable protocol ----------------------------------------------------------------------------

def declared(protocol) -> dict[str, object]:
    """What a Protocol declares: annotated attributes (None), properties and methods."""
    found = {name: None for name in getattr(protocol, "__annotations__", {})}
    for name, value in vars(protocol).items():
        if not name.startswith("_") and (callable(value) or isinstance(value, property)):
            found[name] = value
    return found


def check_offers(obj, protocol) -> None:
    missing = [name for name in declared(protocol) if not hasattr(obj, name)]
    assert not missing, f"{type(obj).__name__} lacks {missing} of {protocol.__name__}"
    for name, member in declared(protocol).items():
        if isinstance(member, property) or member is None:
            assert not inspect.ismethod(getattr(obj, name)), f"{name} must be a value, not a method"
            continue
        got = getattr(obj, name)
        assert callable(got), name
        assert inspect.iscoroutinefunction(got) == inspect.iscoroutinefunction(member), f"{name}: async or not"
        # Called the same way: the same kinds of parameters, and the same names where a caller must
        # name them (keyword-only); a positional parameter's name is the implementation's own.
        want = list(inspect.signature(member).parameters.values())[1:]  # without self
        have = list(inspect.signature(got).parameters.values())

        def calls(params):
            return [(p.kind, p.name if p.kind == p.KEYWORD_ONLY else None) for p in params]

        assert calls(have) == calls(want), f"{name}{inspect.signature(got)} vs {inspect.signature(member)}"


def check_values(service) -> None:
    assert isinstance(service.name, str) and isinstance(service.version, int)
    assert isinstance(service.stats, Stats) and isinstance(service.serving, Serving)
    assert isinstance(service.busy, bool) and isinstance(service.queued, int)
    assert service.output_names and all(isinstance(n, str) for n in service.output_names)
    check_offers(service.model, ServedModel)
    assert isinstance(service.model.takes_images, bool)


def test_the_protocol_declares_what_the_front_ends_use():
    assert {"name", "version", "model", "stats", "serving", "output_names", "busy", "queued", "admit", "check_rows",
            "check_tensor", "resolve_outputs", "top_k", "classify", "infer_images", "infer_tensor", "start",
            "close"} <= set(declared(Servable))


async def test_a_model_service_and_a_pipeline_service_both_offer_all_of_servable(tiny, tmp_path, serve, pool):
    x = np.random.default_rng(3).normal(size=(2, 3, 8, 8)).astype(np.float32)
    async with serve(tiny[0]) as step:
        check_offers(step, Servable)
        check_values(step)
        routing = RoutingTable()
        routing.set_state("tiny", 1, State.READY, service=step)
        (tmp_path / "chain").mkdir()
        (tmp_path / "chain" / "pipeline.toml").write_text('kind = "chain"\nsteps = ["tiny"]\n')
        pipeline = PipelineService("chain", read_pipeline(tmp_path / "chain" / "pipeline.toml"), routing,
                                   decode_pool=pool, max_pixels=10_000_000, max_images=16)
        check_offers(pipeline, Servable)
        check_values(pipeline)
        # Served the same way: the one-step chain answers what its step answers.
        through_pipeline = await pipeline.infer_tensor(x, deadline=None, timing=Timing())
        assert np.allclose(through_pipeline["logits"], step.model.run({"image": x})["logits"], atol=1e-6)
