"""A pipeline served like a model: a ``Servable`` like a model's service, its steps run by their own services.

Every step is looked up in the routing table on each request and runs through that model's own
batcher, queue and admission limits, so pipeline traffic and direct traffic batch together, and
a step's new version is picked up like any client would pick it up. The request's deadline holds
across steps. An encoded image is decoded once per request, when the first step that needs it
runs, and cropped for each input geometry the steps take, only for the rows that reach them (a
cascade's cheap step at 224 px, the accurate one at 260 px for the images it escalates, cropped
from the same decoded image).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, Sequence

import numpy as np

from modelport import telemetry
from modelport.engine import imaging
from modelport.repository.bundle import ImageInput, Serving
from modelport.errors import BadInput, BundleError, ModelportError, NotFound, Unavailable
from modelport.engine.predictions import Prediction, confidence, top_k
from modelport.runtime import TensorSpec
from modelport.engine.servable import Classifies, Servable, Stats, Timing, check_deadline, check_rows
from modelport.pipeline.config import PipelineConfig

logger = logging.getLogger("modelport.pipeline")
PLATFORM = "modelport_pipeline"
# Decoded images one request keeps for its later steps, at most: 256 phone photos would hold 2 GB
# (12 MP, decoded at 1/2 scale). 64 MiB holds ~110 ImageNet-size photos; a row past it that goes
# on to another input size is decoded again.
KEEP_DECODED_BYTES = 64 << 20


class PipelineModel:
    """What the front-ends read from ``service.model``: input, outputs, labels, platform, top-k."""

    def __init__(self, config: PipelineConfig, services: Sequence) -> None:
        first, last = services[0].model, services[-1].model
        self.default_k = services[0].serving.top_k
        self.input = first.input
        self.spec: ImageInput = first.spec
        self.takes_images = first.takes_images
        if config.kind == "chain":
            self.labels = last.labels
            self.output = last.output
            outputs = list(last.outputs)
            self._probabilities = last.probabilities
        else:
            self.labels = first.labels
            self.output = TensorSpec("probabilities", "FP32", (-1, len(self.labels)))
            outputs = [self.output]
            self._probabilities = lambda values: values  # steps' answers, already probabilities
        self.outputs: list[TensorSpec] = outputs
        self.platform = f"{PLATFORM}/{config.kind}"
        # Raw tensors can go to a cascade or an ensemble only if every step takes the same one.
        self.takes_tensors = config.kind == "chain" or all(
            s.model.input == first.input and s.model.spec == first.spec for s in services)

    def describe(self) -> dict:
        return {"device": "cpu"}  # its steps say where they run

    def probabilities(self, output: np.ndarray) -> np.ndarray:
        return self._probabilities(output)

    def top_k(self, probabilities: np.ndarray, k: int | None = None) -> list[list[Prediction]]:
        return top_k(probabilities, self.labels, k or self.default_k)


class Routing(Protocol):
    """Where the steps are found on each request (the server's routing table)."""

    def get(self, name: str, version: str | int | None = None) -> Servable: ...


class PipelineService(Classifies):
    def __init__(self, name: str, config: PipelineConfig, routing: Routing, *, decode_pool: ThreadPoolExecutor,
                 max_pixels: int, max_images: int, observer=None, version: int = 1) -> None:
        self.name = name
        self.version = version
        self.config = config
        self.kind = config.kind
        self.max_pixels = max_pixels
        self.max_images = max_images
        self.stats = Stats()
        self._routing = routing
        self._decode_pool = decode_pool
        self._observer = observer
        self._checked: tuple = ()
        try:  # at load: every step there and fitting, or FAILED with the reason
            self.steps()
        except Unavailable:
            raise  # a step still loading: the version manager waits for it
        except ModelportError as exc:
            raise BundleError(f"{config.path}: {exc.message}") from None

    # -- what the front-ends read ----------------------------------------------------------------

    @property
    def serving(self) -> Serving:
        return self.steps()[0].serving

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.model.outputs]

    # A pipeline owns no batcher: its steps' services queue and compute, and report it themselves.
    busy = False
    queued = 0

    def admit(self) -> None:
        """Refusing early is the first step's business."""
        self.steps()[0].admit()

    def start(self) -> None:
        pass

    async def close(self) -> None:
        pass  # a pipeline owns no model: its steps are the routing table's

    def steps(self) -> list[Servable]:
        """The services of the steps now, checked against each other whenever one changed."""
        services = []
        for step in self.config.steps:
            try:
                services.append(self._routing.get(step.model, step.version))
            except (NotFound, Unavailable) as exc:
                raise type(exc)(f"pipeline {self.name!r}: step {step.ref!r}: {exc.message}") from None
        key = tuple(id(s) for s in services)
        if key != self._checked:
            try:
                self.model = _check(self.config, services)
            except BundleError as exc:  # a step's new version no longer fits
                if not self._checked:
                    raise
                raise Unavailable(f"pipeline {self.name!r} no longer fits its steps: {exc.message}") from None
            self._checked = key
        return services

    def check_rows(self, rows: int, input_name: str | None = None) -> None:
        check_rows(rows, self.max_images, input_name)

    def check_tensor(self, array: np.ndarray) -> None:
        services = self.steps()
        if not self.model.takes_tensors:
            raise BadInput(f"pipeline {self.name!r} takes encoded images: its steps take different inputs",
                           input_name=self.model.input.name)
        services[0].check_tensor(array)

    def resolve_outputs(self, names: Sequence[str] | None) -> list[str]:
        outputs = self.output_names
        if not names:
            return outputs
        for name in names:
            if name not in outputs:
                raise BadInput(f"pipeline {self.name!r} has no output {name!r}; it has {', '.join(outputs)}")
        return list(names)

    def top_k(self, outputs: dict[str, np.ndarray], k: int | None) -> list[list[Prediction]]:
        return self.model.top_k(self.model.probabilities(outputs[self.model.output.name]), k)

    # -- requests -------------------------------------------------------------------------------

    async def infer_images(self, images: Sequence[bytes], *, deadline: float | None, timing: Timing,
                           input_name: str | None = None) -> dict[str, np.ndarray]:
        if not images:
            raise BadInput("no image given", input_name=input_name)
        self.check_rows(len(images), input_name)
        services = self.steps()
        if not self.model.takes_images:
            raise BadInput(f"pipeline {self.name!r} takes tensors ({self.model.input.name!r}), not images",
                           input_name=input_name)
        source = _Images(list(images), input_name, timing, pool=self._decode_pool, max_pixels=self.max_pixels)
        return await self._run(services, source, deadline, timing)

    async def infer_tensor(self, array: np.ndarray, *, deadline: float | None, timing: Timing) -> dict[str, np.ndarray]:
        self.check_tensor(array)
        return await self._run(self.steps(), _Tensor(array), deadline, timing)

    async def _run(self, services: list, source: "_Images | _Tensor", deadline: float | None,
                   timing: Timing) -> dict[str, np.ndarray]:
        start = time.monotonic()
        timing.steps = []
        try:
            if self.kind == "cascade":
                result = await self._cascade(services, source, deadline, timing)
            elif self.kind == "ensemble":
                result = await self._ensemble(services, source, deadline, timing)
            else:
                result = await self._chain(services, source, deadline, timing)
        except Exception:
            self.stats.fail_count += 1
            self.stats.fail_ns += int((time.monotonic() - start) * 1e9)
            raise
        self.stats.success_count += 1
        self.stats.inference_count += source.rows
        self.stats.execution_count += 1
        self.stats.success_ns += int((time.monotonic() - timing.arrived) * 1e9)
        self.stats.last_inference_ms = int(time.time() * 1000)
        return result

    async def _cascade(self, services, source, deadline, timing) -> dict[str, np.ndarray]:
        rows = source.rows
        answer = np.zeros((rows, len(self.model.labels)), np.float32)
        answered_by = [""] * rows
        remaining = np.arange(rows)
        for i, service in enumerate(services):
            last = i == len(services) - 1
            outputs = await self._step(service, source, remaining, deadline, timing, keep_decoded=not last)
            probabilities = service.model.probabilities(outputs[service.model.output.name])
            if last:  # the last step always answers
                done = np.ones(len(remaining), bool)
            else:
                done = confidence(probabilities, self.config.confidence) >= self.config.escalate_below[i]
            answer[remaining[done]] = probabilities[done]
            for row in remaining[done]:
                answered_by[row] = service.name
            if self._observer is not None:
                self._observer.observe_pipeline_step(self.name, service.name, int(done.sum()))
            if isinstance(source, _Images):
                source.forget(remaining[done])
            remaining = remaining[~done]
            if not len(remaining):
                break
        timing.answered_by = answered_by
        return {"probabilities": answer}

    async def _ensemble(self, services, source, deadline, timing) -> dict[str, np.ndarray]:
        every = np.arange(source.rows)
        answers = await asyncio.gather(*(self._step(s, source, every, deadline, timing, keep_decoded=True)
                                         for s in services))
        total = sum(w * s.model.probabilities(a[s.model.output.name]).astype(np.float32)
                    for w, s, a in zip(self.config.weights, services, answers))
        for service in services:
            if self._observer is not None:
                self._observer.observe_pipeline_step(self.name, service.name, source.rows)
        return {"probabilities": np.asarray(total, np.float32)}

    async def _chain(self, services, source, deadline, timing) -> dict[str, np.ndarray]:
        every = np.arange(source.rows)
        outputs = await self._step(services[0], source, every, deadline, timing)
        for feed, service, previous in zip(self.config.feed, services[1:], services):
            value = outputs[feed or previous.model.output.name]
            outputs = await self._step(service, _Tensor(value), every, deadline, timing)
        return outputs

    async def _step(self, service, source, rows: np.ndarray, deadline, timing: Timing, *,
                    keep_decoded: bool = False) -> dict[str, np.ndarray]:
        check_deadline(deadline)
        step_timing = Timing()
        timing.steps.append((service.name, step_timing))
        with telemetry.span(f"modelport.pipeline.step {service.name}", attributes={
                "modelport.pipeline": self.name, "modelport.model": service.name}) if telemetry.serving() \
                else contextlib.nullcontext():
            return await self._step_in(service, source, rows, deadline, step_timing, keep_decoded)

    async def _step_in(self, service, source, rows: np.ndarray, deadline, step_timing: Timing,
                       keep_decoded: bool) -> dict[str, np.ndarray]:
        if isinstance(source, _Tensor):
            return await service.infer_tensor(source.take(rows), deadline=deadline, timing=step_timing)
        if isinstance(service, PipelineService):  # a nested pipeline decodes for its own steps
            return await service.infer_images(source.take(rows), deadline=deadline, timing=step_timing,
                                              input_name=source.input_name)
        crops = await source.crops(service.model.spec, rows, keep_decoded=keep_decoded)
        return await service.infer_crops(crops, deadline=deadline, timing=step_timing)


class _Tensor:
    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.rows = len(array)

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.array if len(rows) == self.rows else self.array[rows]


class _Images:
    """Encoded images, decoded once on first need and cropped per input geometry, only the rows asked for.

    A row's decoded image stays (up to ``KEEP_DECODED_BYTES``) for the later steps that may crop
    it at another size, until the pipeline says the row goes no further.
    """

    def __init__(self, images: list[bytes], input_name: str | None, timing: Timing, *, pool: ThreadPoolExecutor,
                 max_pixels: int) -> None:
        self.images = images
        self.rows = len(images)
        self.input_name = input_name
        self._timing = timing
        self._pool = pool
        self._max_pixels = max_pixels
        self._crops: dict[tuple, dict[int, np.ndarray]] = {}
        self._decoded: dict[int, imaging.Decoded] = {}
        self._kept_bytes = 0
        # One lock for every geometry: an ensemble's steps ask at once, and the second must find
        # the first's decoded images.
        self._lock = asyncio.Lock()

    def take(self, rows: np.ndarray) -> list[bytes]:
        return [self.images[i] for i in rows]

    async def crops(self, spec: ImageInput, rows: np.ndarray, *, keep_decoded: bool) -> np.ndarray:
        # Models that crop alike share crops, whatever their normalisation (applied per batch).
        geometry = (spec.height, spec.width, spec.resize_shorter, spec.channel_order)
        cache = self._crops.setdefault(geometry, {})
        async with self._lock:
            missing = [int(i) for i in rows if int(i) not in cache]
            if missing:
                start = time.monotonic()
                crops, kept = await asyncio.get_running_loop().run_in_executor(
                    self._pool, self._decode, spec, missing, keep_decoded)
                self._timing.decode_s += time.monotonic() - start
                telemetry.interval("modelport.decode", start, time.monotonic(), {"modelport.images": len(missing)})
                cache.update(zip(missing, crops))
                for i, decoded in kept.items():
                    self.forget([i])
                    self._decoded[i] = decoded
                    self._kept_bytes += decoded.nbytes
        return np.stack([cache[int(i)] for i in rows])

    def forget(self, rows: Sequence[int] | np.ndarray) -> None:
        """These rows go to no further step: their decoded images can go."""
        for i in rows:
            decoded = self._decoded.pop(int(i), None)
            if decoded is not None:
                self._kept_bytes -= decoded.nbytes

    def _decode(self, spec: ImageInput, rows: list[int], keep: bool
                ) -> tuple[list[np.ndarray], dict[int, imaging.Decoded]]:
        """On a decode thread, under ``crops``'s lock; ``forget`` runs between a cascade's steps,
        never during this, so ``_decoded`` holds still."""
        crops, kept = [], {}
        room = KEEP_DECODED_BYTES - self._kept_bytes if keep else 0
        for i in rows:
            before = self._decoded.get(i)
            decoded = imaging.load(self.images[i], spec, max_pixels=self._max_pixels, input_name=self.input_name,
                                   reuse=before)
            crops.append(imaging.crop(decoded, spec, input_name=self.input_name))
            if decoded is not before and decoded.nbytes <= room:
                kept[i] = decoded
                room -= decoded.nbytes
        return crops, kept


def _check(config: PipelineConfig, services: Sequence) -> PipelineModel:
    """Steps that must agree do: label sets (cascade, ensemble), shapes and dtypes along a chain."""
    refs = [s.ref for s in config.steps]
    if config.kind in ("cascade", "ensemble"):
        first = services[0].model
        for ref, service in zip(refs[1:], services[1:]):
            labels = service.model.labels
            if labels != first.labels:
                differ = next((i for i, (a, b) in enumerate(zip(first.labels, labels)) if a != b),
                              min(len(labels), len(first.labels)))
                raise BundleError(f"label sets differ: step {refs[0]!r} has {len(first.labels)} labels, step {ref!r} "
                                  f"has {len(labels)}, first difference at index {differ}; a {config.kind} needs the "
                                  f"same labels in the same order")
        for ref, service in zip(refs, services):
            if not service.model.takes_images and not (service.model.input == first.input):
                raise BundleError(f"step {ref!r} takes tensors, and the steps' inputs differ: a {config.kind} "
                                  f"gives every step the same input")
    else:
        for i, (feed, before, after) in enumerate(zip(config.feed, services, services[1:])):
            outputs = {o.name: o for o in before.model.outputs}
            name = feed or before.model.output.name
            if name not in outputs:
                raise BundleError(f"feed[{i}] = {name!r}: step {refs[i]!r} has no such output; it has "
                                  f"{', '.join(outputs)}")
            out, into = outputs[name], after.model.input
            fits = len(out.shape) == len(into.shape) and all(
                a == b or a == -1 or b == -1 for a, b in zip(out.shape[1:], into.shape[1:]))
            if out.datatype != into.datatype or not fits:
                raise BundleError(f"feed[{i}]: output {name!r} of step {refs[i]!r} is {out.datatype} "
                                  f"{list(out.shape)}, but step {refs[i + 1]!r} takes {into.datatype} "
                                  f"{list(into.shape)} ({into.name!r})")
    return PipelineModel(config, services)
