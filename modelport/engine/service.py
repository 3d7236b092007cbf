"""A loaded model put to work for the front-ends: decode pool -> batcher -> runtime -> results.

HTTP and ZeroMQ both call the same ``ModelService``: the same queue, limits and batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from modelport import telemetry
from modelport.engine.batching import Batcher, BatchInfo
from modelport.engine.cores import Cores
from modelport.repository.bundle import Serving
from modelport.errors import BadInput, DeadlineExceeded, Overloaded, Unavailable
from modelport.engine.imaging import DEFAULT_MAX_PIXELS, to_model_input
from modelport.engine.model import Model
from modelport.engine.predictions import Prediction
from modelport.runtime import V2_TO_NUMPY
from modelport.engine.servable import Classifies, Stats, Timing, check_deadline, check_rows
from modelport.engine.slo import Planner


# Batches whose recent average run time is below this run on the event loop, not a thread.
_INLINE_BELOW_S = 0.0002
DEFAULT_MAX_IMAGES = 256  # per request; a request runs as batches of at most max_batch_size


class Observer(Protocol):
    """Where a service reports what it did (the server's metrics); kept out of the request path's logic."""

    def observe_batch(self, model: str, info: BatchInfo) -> None: ...

    def observe_decode(self, model: str, seconds: float) -> None: ...


@dataclass
class _Item:
    array: np.ndarray  # rows of crops (uint8 NHWC) or of the graph's own input
    is_crop: bool
    timing: Timing
    started: bool = False  # its batch has reached the runtime
    trace: object = None  # the request's span context, when it is traced: its batch's span links to it


class ModelService(Classifies):
    def __init__(self, model: Model, *, decode_pool: ThreadPoolExecutor, infer_pool: ThreadPoolExecutor | None = None,
                 serving: Serving | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_images: int = DEFAULT_MAX_IMAGES,
                 observer: "Observer | None" = None, cores: Cores | None = None) -> None:
        self.model = model
        self.name = model.name
        self.version = model.version
        self.serving = serving or model.bundle.serving
        self.max_pixels = max_pixels
        self.max_images = max_images
        self.stats = Stats()
        self._decode_pool = decode_pool
        # The batcher runs one batch at a time per model (ORT already spreads a batch over every
        # core); the threads are shared by all models so that loading and unloading versions
        # does not create and destroy threads (and glibc arenas) each time.
        self._own_pool = infer_pool is None
        self._infer_pool = infer_pool or ThreadPoolExecutor(1, thread_name_prefix=f"infer-{model.name}")
        self._observer = observer
        planner = Planner(max_batch_size=self.serving.max_batch_size, max_delay_ms=self.serving.max_delay_ms,
                          latency_slo_ms=self.serving.latency_slo_ms, first_batch_s=model.warm_up_s,
                          pair_batch_s=model.warm_up_pair_s)
        self.batcher: Batcher[_Item, dict[str, np.ndarray]] = Batcher(
            self._run_batch, max_batch_size=self.serving.max_batch_size, max_delay_ms=self.serving.max_delay_ms,
            max_queue_size=self.serving.max_queue_size, on_batch=self._on_batch, run_now=self._run_now,
            planner=planner, max_concurrent_batches=model.concurrent_batches,
            run_thin=functools.partial(self._run_batch, thin=True), cores=cores)
        self.output_names = [o.name for o in model.runtime.outputs]
        # A rollout's hooks (``rollout.py``): ``mirror`` sees each answered request (shadow copies),
        # ``probe`` each outcome: True answered, False failed by the model's fault, None refused.
        self.mirror: Callable[..., None] | None = None
        self.probe: Callable[[bool | None, float], None] | None = None
        self._recent_run_s = model.warm_up_s  # moving average of batch run time
        self._inline_ok = getattr(model.runtime, "pure_compute", False)

    def start(self) -> None:
        self.batcher.start()

    @property
    def busy(self) -> bool:
        return self.batcher.busy

    @property
    def queued(self) -> int:
        return self.batcher.queued

    def admit(self) -> None:
        self.batcher.check()

    async def close(self) -> None:
        await self.batcher.close()
        if self._own_pool:
            self._infer_pool.shutdown(wait=True)
        self.model.close()

    # -- requests -------------------------------------------------------------------------------

    def top_k(self, outputs: dict[str, np.ndarray], k: int | None) -> list[list[Prediction]]:
        probabilities = self.model.probabilities(outputs[self.model.output.name])
        return self.model.top_k(probabilities, k or self.serving.top_k)

    async def infer_images(self, images: Sequence[bytes], *, deadline: float | None, timing: Timing,
                           input_name: str | None = None) -> dict[str, np.ndarray]:
        if not images:
            raise BadInput("no image given", input_name=input_name)
        self.check_rows(len(images), input_name)
        check_deadline(deadline)
        with self.batcher.admit(rows=len(images), arrived=timing.arrived, deadline=deadline):
            start = time.monotonic()
            crops = await asyncio.get_running_loop().run_in_executor(
                self._decode_pool, self._decode_all, images, input_name)
            timing.decode_s = time.monotonic() - start
            telemetry.interval("modelport.decode", start, start + timing.decode_s, {"modelport.images": len(images)})
            if self._observer is not None:
                self._observer.observe_decode(self.name, timing.decode_s)
        outputs = await self._submit(crops, True, deadline, timing)
        if self.mirror is not None:
            self.mirror(images=images, crops=crops, outputs=outputs, timing=timing, service=self)
        return outputs

    async def infer_crops(self, crops: np.ndarray, *, deadline: float | None, timing: Timing) -> dict[str, np.ndarray]:
        """Images already decoded for this model's input (a pipeline decodes each image once and
        crops it per input size)."""
        check_deadline(deadline)
        with self.batcher.admit(rows=len(crops), arrived=timing.arrived, deadline=deadline, preparing=False):
            pass
        outputs = await self._submit(crops, True, deadline, timing)
        if self.mirror is not None:
            self.mirror(crops=crops, outputs=outputs, timing=timing, service=self)
        return outputs

    async def infer_tensor(self, array: np.ndarray, *, deadline: float | None, timing: Timing) -> dict[str, np.ndarray]:
        """The graph's own input, already shaped (N, ...) and typed; checked here, not by the runtime."""
        self.check_tensor(array)
        check_deadline(deadline)
        with self.batcher.admit(rows=len(array), arrived=timing.arrived, deadline=deadline, preparing=False):
            pass  # nothing to prepare: this only refuses at once (queue full, SLO or deadline out of reach)
        outputs = await self._submit(array, False, deadline, timing)
        if self.mirror is not None:
            self.mirror(tensor=array, outputs=outputs, timing=timing, service=self)
        return outputs

    def check_tensor(self, array: np.ndarray) -> None:
        spec = self.model.input
        expected = V2_TO_NUMPY.get(spec.datatype)
        if array.dtype != expected:
            raise BadInput(f"input {spec.name!r} must be {spec.datatype}, got {array.dtype}", input_name=spec.name)
        if array.ndim != len(spec.shape) or any(e not in (-1, a) for e, a in zip(spec.shape[1:], array.shape[1:])):
            raise BadInput(f"input {spec.name!r} must have shape {list(spec.shape)}, got {list(array.shape)}",
                           input_name=spec.name)
        if array.shape[0] < 1:
            raise BadInput(f"input {spec.name!r} has an empty batch", input_name=spec.name)
        self.check_rows(array.shape[0], spec.name)
        # NaN or Infinity (from JSON's 1e999, or raw bytes) would come back as outputs no JSON
        # writer may emit; a model's answer to them means nothing anyway.
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise BadInput(f"input {spec.name!r} holds NaN or infinite values", input_name=spec.name)

    def check_rows(self, rows: int, input_name: str | None = None) -> None:
        check_rows(rows, self.max_images, input_name)

    def resolve_outputs(self, names: Sequence[str] | None) -> list[str]:
        if not names:
            return list(self.output_names)
        for name in names:
            if name not in self.output_names:
                raise BadInput(f"model {self.name!r} has no output {name!r}; it has {', '.join(self.output_names)}")
        return list(names)

    # -- internals ------------------------------------------------------------------------------

    def _decode_all(self, images: Sequence[bytes], input_name: str | None) -> np.ndarray:
        return decode_all(self.model, images, self.max_pixels, input_name)

    async def _submit(self, array: np.ndarray, is_crop: bool, deadline: float | None,
                      timing: Timing) -> dict[str, np.ndarray]:
        timing.enqueued = time.monotonic()
        start = time.monotonic()
        # A request never runs as a batch bigger than the model's: more rows are split into
        # items of at most a batch (a runtime's memory grows with the largest batch shape it has
        # seen, and does not give it back; with batches side by side, at most a thin batch).
        step = self.batcher.item_rows
        trace = telemetry.current_context()
        items = [_Item(array[i:i + step], is_crop, timing, trace=trace) for i in range(0, len(array), step)]
        try:
            # The deadline holds during compute too: a hung or slow model call is answered 504 at
            # the deadline (its batch runs on; the answer is dropped) instead of holding the client.
            async with asyncio.timeout(None if deadline is None else max(0.0, deadline - time.monotonic())):
                result = await self._submit_items(items, deadline)
        except TimeoutError:
            self.stats.fail_count += 1
            self.stats.fail_ns += int((time.monotonic() - start) * 1e9)
            if self.probe is not None:
                self.probe(False, time.monotonic() - timing.arrived)
            if any(item.started for item in items):
                raise DeadlineExceeded("deadline passed while the model was computing; answer dropped") from None
            raise DeadlineExceeded("deadline passed while queued; not computed") from None
        except Exception as exc:
            self.stats.fail_count += 1
            self.stats.fail_ns += int((time.monotonic() - start) * 1e9)
            if self.probe is not None:
                self.probe(None if isinstance(exc, (Overloaded, Unavailable)) else False,
                           time.monotonic() - timing.arrived)
            raise
        self.stats.success_count += 1
        self.stats.success_ns += int((time.monotonic() - timing.arrived) * 1e9)
        if self.probe is not None:
            self.probe(True, time.monotonic() - timing.arrived)
        telemetry.interval("modelport.queue", timing.enqueued, timing.enqueued + timing.queue_s,
                           {"modelport.model": self.name})
        return result

    async def _submit_items(self, items: list[_Item], deadline: float | None) -> dict[str, np.ndarray]:
        if len(items) == 1:
            return await self.batcher.submit(items[0], rows=len(items[0].array), deadline=deadline,
                                             arrived=items[0].timing.arrived)
        tasks = [asyncio.ensure_future(self.batcher.submit(item, rows=len(item.array), deadline=deadline,
                                                           arrived=item.timing.arrived))
                 for item in items]
        try:
            parts = await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # one part failed, or the request was cancelled: the rest are not run
                task.cancel()
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def _fast(self) -> bool:
        # A model this fast costs less than the hand-over to a thread and back (~90 us here): run
        # it on the event loop. A slow batch raises the average and moves it back off. Only
        # runtimes that are pure compute qualify: custom Python code may block.
        return self._inline_ok and self._recent_run_s < _INLINE_BELOW_S

    def _run_now(self, items: Sequence[_Item]) -> list[dict[str, np.ndarray]] | None:
        """The batcher's shortcut when idle: run a fast model at once, on the loop, or decline."""
        if not self._fast():
            return None
        started = time.monotonic()
        for item in items:
            item.timing.queue_s = 0.0
            item.started = True
        with self._batch_span(items, thin=False):
            outputs = self._run_sync(items)
        self._observe_run(items, started)
        return outputs

    def _batch_span(self, items: Sequence[_Item], thin: bool):
        """One span per batch, linked to every traced request in it (docs/tracing.md)."""
        if all(item.trace is None for item in items):  # not traced: nothing to build
            return contextlib.nullcontext()
        return telemetry.batch_span(f"modelport.batch {self.name}", [item.trace for item in items], {
            "modelport.model": self.name, "modelport.version": str(self.version),
            "modelport.batch.rows": sum(len(item.array) for item in items), "modelport.batch.requests": len(items),
            "modelport.engine": getattr(self.model, "engine", ""), "modelport.precision": getattr(self.model, "precision", ""),
            "modelport.batch.thin": thin})

    def _observe_run(self, items: Sequence[_Item], started: float) -> None:
        elapsed = time.monotonic() - started
        self._recent_run_s += (elapsed - self._recent_run_s) * 0.2
        for item in items:
            item.timing.infer_s = elapsed

    async def _run_batch(self, items: Sequence[_Item], thin: bool = False) -> list[dict[str, np.ndarray]]:
        started = time.monotonic()
        for item in items:
            item.timing.queue_s = started - item.timing.enqueued
            item.started = True
        with self._batch_span(items, thin):
            if self._fast():
                outputs = self._run_sync(items)
            else:
                outputs = await asyncio.get_running_loop().run_in_executor(self._infer_pool, self._run_sync, items, thin)
        self._observe_run(items, started)
        return outputs

    def _run_sync(self, items: Sequence[_Item], thin: bool = False) -> list[dict[str, np.ndarray]]:
        # Crops are normalised together, once per batch; graph-ready tensors go in as they are.
        order = [i for i, item in enumerate(items) if item.is_crop] + [i for i, item in enumerate(items) if not item.is_crop]
        parts = []
        crops = [items[i].array for i in order if items[i].is_crop]
        if crops:
            parts.append(to_model_input(np.concatenate(crops), self.model.spec))
        parts.extend(items[i].array for i in order if not items[i].is_crop)
        batch = parts[0] if len(parts) == 1 else np.concatenate(parts)
        outputs = self.model.run({self.model.input.name: batch}, self.output_names, thin=thin)
        results: list[dict[str, np.ndarray] | None] = [None] * len(items)
        row = 0
        for i in order:
            n = len(items[i].array)
            results[i] = {name: value[row:row + n] for name, value in outputs.items()}
            row += n
        return results

    def _on_batch(self, info: BatchInfo) -> None:
        self.stats.inference_count += info.rows
        self.stats.execution_count += 1
        self.stats.queue_ns += int(sum(info.queue_s) * 1e9)
        self.stats.compute_infer_ns += int(info.run_s * 1e9)
        self.stats.last_inference_ms = int(time.time() * 1000)
        if self._observer is not None:
            self._observer.observe_batch(self.name, info)


def decode_all(model: Model, images: Sequence[bytes], max_pixels: int, input_name: str | None) -> np.ndarray:
    return np.stack([model.decode(data, max_pixels=max_pixels, input_name=input_name) for data in images])
