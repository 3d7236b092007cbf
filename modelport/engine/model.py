"""A loaded model: a bundle, its runtime session and its image pipeline, validated together."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from modelport.engine import imaging
from modelport.runtime.device import Device
from modelport.repository.bundle import Bundle, load_bundle
from modelport.errors import BadInput, BundleError
from modelport.engine.predictions import Prediction, softmax, top_k
from modelport.runtime import V2_TO_NUMPY, TensorSpec, runtime_class
from modelport.runtime.precision import ENGINES
from modelport.runtime.precision import plan as precision_plan


# Batches side by side by default only for models up to this size: the thin session costs about
# the file's size again (the default model, 17 MB: +22 MB after load; docs/decisions.md).
AUTO_THIN_MAX_BYTES = 100 * 1024 * 1024


class Model:
    """Safe to use from several threads: decoding is pure, and a runtime may run concurrently.

    ``concurrent_batches`` > 1 (the server's batches side by side): an ONNX model on the CPU gets a
    second, thin session of cores / N threads for batches that run beside others, and both sessions
    share the process's CPU arena; other runtimes run such batches on their one runtime. None
    (the server's default): 2 where a thin session can be had on 2 or more cores and the model
    file is at most ``AUTO_THIN_MAX_BYTES`` (the thin session holds its own copy of the weights),
    else 1."""

    def __init__(self, bundle: Bundle, *, threads: int | None = None, device: str | None = None,
                 concurrent_batches: int | None = 1, engine: str | None = None,
                 precision: str | None = None) -> None:
        self.bundle = bundle
        self.name = bundle.name
        self.version = bundle.version
        self.labels = bundle.labels
        self.spec = bundle.input
        # The device: the server's --device, else the bundle's [serving] device (default cpu).
        self.device = Device.parse(device or bundle.serving.device)
        # The engine and precision: the server's --runtime / --precision, else the bundle's (auto).
        plan = precision_plan(bundle, engine=engine, precision=precision, device=self.device)
        self.precision = plan.precision
        self.precision_reason = plan.reason
        self.model_file = plan.model_file or bundle.model_file  # a checked INT8 variant, or the bundle's own
        cores = os.cpu_count() or 1
        classes: dict[str, type] = {}  # imported when first needed: OpenVINO's import alone takes 0.4 s

        def cls_of(name: str) -> type:
            if name not in classes:
                classes[name] = _engine_class(bundle, name)
            return classes[name]

        def can_thin(name: str) -> bool:
            return threads is None and self.device.kind == "cpu" and getattr(cls_of(name), "can_run_thin", False)

        if concurrent_batches is None:
            small = any(can_thin(name) for name in plan.engines) and _file_size(self.model_file) <= AUTO_THIN_MAX_BYTES
            concurrent_batches = 2 if small and cores >= 2 else 1
        self.concurrent_batches = concurrent_batches

        def make(name: str, threads: int | None):
            cls = cls_of(name)
            extra = {"precision": plan.precision} if name == "openvino" else {}
            if can_thin(name) and concurrent_batches > 1 and getattr(cls, "can_share_arena", False):
                extra["shared_arena"] = True
            return cls(self.model_file, threads=threads, bundle=bundle, device=self.device, **extra)

        reference, *others = plan.engines
        runtimes = {reference: make(reference, threads)}
        # Checked before anything runs: a graph that does not fit its bundle fails with the reason.
        # (Every candidate reads the same file: one engine's signature is the others'.)
        first = runtimes[reference]
        self.input = self._pick(first.inputs, bundle.input.name, "input")
        self.output = self._pick(first.outputs, bundle.output.name, "output")
        self._check_signature()
        self.engine, timed = reference, ""
        if others:
            feeds = _timing_feeds(first, bundle)
            if _median_s(first, feeds) < TIMED_MIN_S:  # the other engines are not even compiled
                # A batch this short is the call's overhead and the machine's noise: workers of one
                # fleet would each pick another engine by chance (and answer at other latencies).
                timed = f"a batch takes under {TIMED_MIN_S * 1000:.0f} ms: {reference} kept"
            else:
                runtimes.update({name: make(name, threads) for name in others})
                self.engine, timed = _fastest(runtimes, feeds)
        self.runtime = runtimes.pop(self.engine)
        for loser in runtimes.values():
            loser.close()
        if timed:
            self.precision_reason += f"; {timed}"
        if plan.precision == "int8" and self.engine == "openvino":
            self.precision_reason += f"; its float layers at {self.runtime.inference_precision}"
        # Batches that run beside others: on every core's share of threads (see batching.Batcher).
        thin = can_thin(self.engine) and concurrent_batches > 1
        self.thin_runtime = make(self.engine, max(1, cores // concurrent_batches)) if thin else self.runtime
        self.warm_up()

    @classmethod
    def load(cls, path: str | os.PathLike, *, name: str | None = None, threads: int | None = None,
             device: str | None = None, concurrent_batches: int | None = 1, engine: str | None = None,
             precision: str | None = None) -> "Model":
        return cls(load_bundle(Path(path), name=name), threads=threads, device=device,
                   concurrent_batches=concurrent_batches, engine=engine, precision=precision)

    @property
    def takes_images(self) -> bool:
        return self.spec.kind == "image"

    def describe(self) -> dict:
        """Where and how it runs, for the metadata endpoints."""
        return {"device": getattr(self.runtime, "device", "cpu"), "engine": self.engine, "precision": self.precision,
                "precision_reason": self.precision_reason,
                **({"metadata": self.bundle.metadata} if self.bundle.metadata else {})}

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.runtime.outputs

    @property
    def platform(self) -> str:
        return self.runtime.platform

    def decode(self, data: bytes, *, max_pixels: int = imaging.DEFAULT_MAX_PIXELS,
               input_name: str | None = None) -> np.ndarray:
        """Encoded image -> (H, W, 3) uint8. Safe to call from many threads at once."""
        if not self.takes_images:
            raise BadInput(f"model {self.name!r} takes tensors ({self.input.name!r}), not images",
                           input_name=input_name)
        return imaging.decode(data, self.spec, max_pixels=max_pixels, input_name=input_name)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 crops -> (N, classes) probabilities."""
        return self.probabilities(self.run_crops(images, [self.output.name])[self.output.name])

    def run_crops(self, images: np.ndarray, output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        """(N, H, W, 3) uint8 crops -> raw outputs; layout and normalisation once for the batch."""
        return self.run({self.input.name: imaging.to_model_input(images, self.spec)}, output_names)

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str] | None = None, *,
            thin: bool = False) -> dict[str, np.ndarray]:
        """Raw tensors in, raw tensors out; ``thin``: on the thin runtime (a batch beside others)."""
        return (self.thin_runtime if thin else self.runtime).run(feeds, output_names)

    def probabilities(self, output: np.ndarray) -> np.ndarray:
        return softmax(output) if self.bundle.output.kind == "logits" else output

    def classify(self, images: list[bytes], k: int | None = None) -> list[list[Prediction]]:
        batch = np.stack([self.decode(data) for data in images])
        return self.top_k(self.predict(batch), k)

    def top_k(self, probabilities: np.ndarray, k: int | None = None) -> list[list[Prediction]]:
        return top_k(probabilities, self.labels, k or self.bundle.serving.top_k)

    def warm_up(self) -> None:
        # The first run allocates ORT's arena and picks kernels; pay for it at load, not on a
        # request. The warm runs' times tell the server how expensive a batch is: one row, and
        # (where the batch dimension is free) two, so a latency SLO knows from the start what
        # batching gains.
        self.warm_up_pair_s = None
        self.warm_up_s = self._time_runs(1)
        if self.input.shape[0] == -1 and self.bundle.serving.max_batch_size > 1:
            self.warm_up_pair_s = self._time_runs(2)
        if self.thin_runtime is not self.runtime:
            self._time_runs(1, thin=True)

    def _time_runs(self, rows: int, thin: bool = False) -> float:
        if self.takes_images:
            batch = np.zeros((rows, self.spec.height, self.spec.width, 3), dtype=np.uint8)
            feeds = {self.input.name: imaging.to_model_input(batch, self.spec)}
        else:
            feeds = {self.input.name: np.zeros([rows] + [max(d, 1) for d in self.input.shape[1:]],
                                               dtype=V2_TO_NUMPY[self.input.datatype])}
        run = lambda: self.run(feeds, [self.output.name], thin=thin)  # noqa: E731
        run()
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    def close(self) -> None:
        self.runtime.close()
        if self.thin_runtime is not self.runtime:
            self.thin_runtime.close()

    def _pick(self, specs: list[TensorSpec], name: str | None, what: str) -> TensorSpec:
        if name is None:
            return specs[0]
        for spec in specs:
            if spec.name == name:
                return spec
        raise BundleError(f"{self.bundle.path / 'modelport.toml'}: {what}.name = {name!r} is not a graph {what}; "
                          f"the graph has {', '.join(s.name for s in specs)}")

    def _check_signature(self) -> None:
        where = self.bundle.model_file
        spec = self.spec
        if not self.takes_images:
            self._check_labels()
            return
        expected_dtype = {"uint8": "UINT8", "float32": "FP32"}[spec.dtype]
        if self.input.datatype != expected_dtype:
            raise BundleError(f"{where}: input {self.input.name!r} is {self.input.datatype}, but modelport.toml says "
                              f"input.dtype = {spec.dtype!r}")
        if spec.layout == "NHWC":
            expected_shape = (spec.height, spec.width, 3)
        else:
            expected_shape = (3, spec.height, spec.width)
        actual = self.input.shape[1:]
        if len(actual) != 3 or any(a not in (-1, e) for a, e in zip(actual, expected_shape)):
            raise BundleError(f"{where}: input {self.input.name!r} has shape {list(self.input.shape)}, but "
                              f"modelport.toml describes [-1, {', '.join(map(str, expected_shape))}] ({spec.layout})")
        self._check_labels()

    def _check_labels(self) -> None:
        width = self.output.shape[-1] if self.output.shape else -1
        if width != -1 and width != len(self.labels):
            raise BundleError(f"{self.bundle.path / 'labels.txt'}: {len(self.labels)} labels, but output "
                              f"{self.output.name!r} has {width} classes")


def _engine_class(bundle: Bundle, engine: str) -> type:
    """An ONNX bundle runs on the engine named; other bundles on their own runtime."""
    return runtime_class(bundle.runtime) if bundle.runtime != "onnx" else runtime_class(engine, ENGINES)


# Another engine than the reference (ONNX Runtime: its answers are today's) is kept only when timed
# at least this much faster (load-time timings scatter by a few percent), and not at all for a
# batch under TIMED_MIN_S, where the call's overhead and the machine's noise decide.
MARGIN = 1.05
TIMED_MIN_S = 0.002


def _timing_feeds(runtime, bundle: Bundle) -> dict:
    """A batch of the bundle's size (at most 8) to time engines on."""
    spec = runtime.inputs[0]
    rows = min(8, bundle.serving.max_batch_size) if spec.shape and spec.shape[0] == -1 else 1
    if bundle.input.kind == "image":
        shape = (rows, bundle.input.height, bundle.input.width, 3)
        return {spec.name: imaging.to_model_input(np.random.default_rng(0).integers(
            0, 256, shape, dtype=np.uint8), bundle.input)}
    return {spec.name: np.zeros([rows] + [max(d, 1) for d in spec.shape[1:]], dtype=V2_TO_NUMPY[spec.datatype])}


def _median_s(runtime, feeds: dict, rounds: int = 5) -> float:
    runtime.run(feeds)  # the first run allocates and picks kernels
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        runtime.run(feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _fastest(runtimes: dict, feeds: dict, rounds: int = 5) -> tuple[str, str]:
    """The engine whose batches ran fastest, and why: interleaved rounds, medians. The first
    engine is the reference: another must beat it by ``MARGIN``."""
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    for name, runtime in runtimes.items():  # the first run of each allocates and picks kernels
        runtime.run(feeds)
    for _ in range(rounds):
        for name, runtime in runtimes.items():
            start = time.perf_counter()
            runtime.run(feeds)
            times[name].append(time.perf_counter() - start)
    medians = {name: float(np.median(t)) for name, t in times.items()}
    reference, *others = medians
    best = min(others, key=medians.get)
    if medians[best] * MARGIN < medians[reference]:
        return best, f"{best} was the fastest ({medians[reference] / medians[best]:.2f} x {reference})"
    return reference, f"{reference} was the fastest, or within {MARGIN - 1:.0%}"


def _file_size(path: Path) -> float:
    try:
        return os.path.getsize(path)
    except OSError:  # missing: the runtime says so, with the path, when it tries to load it
        return float("inf")
