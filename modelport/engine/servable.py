"""What the front-ends serve: the ``Servable`` interface that a model's service and a pipeline both
implement, and the request-side types they share (timing, statistics, the per-request checks).

HTTP, ZeroMQ and the lifecycle (routing table, version manager, rollouts) speak only to this
interface; ``ModelService`` (``service.py``) and ``PipelineService`` (``pipeline/service.py``)
implement it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from modelport.engine.predictions import Prediction
from modelport.errors import DeadlineExceeded, PayloadTooLarge
from modelport.repository.bundle import ImageInput, Serving
from modelport.runtime import TensorSpec


@dataclass
class Timing:
    """Where one request's time went; becomes its Server-Timing header."""

    arrived: float = field(default_factory=time.monotonic)
    decode_s: float = 0.0
    queue_s: float = 0.0
    infer_s: float = 0.0
    enqueued: float = 0.0
    load_s: float = 0.0  # under a memory budget: the wait for the version to load from disk (0: it was resident)
    # A pipeline's request: each step's own timing, and the step that answered each row (cascade).
    # Empty tuples by default: a model's request allocates nothing for them.
    steps: Sequence[tuple[str, "Timing"]] = ()
    answered_by: Sequence[str] = ()

    def server_timing(self) -> str:
        loaded = f", load;dur={self.load_s * 1000:.3f}" if self.load_s else ""
        if not self.steps:
            return (f"decode;dur={self.decode_s * 1000:.3f}, queue;dur={self.queue_s * 1000:.3f}, "
                    f"infer;dur={self.infer_s * 1000:.3f}{loaded}")
        entries = [f"decode;dur={self.decode_s * 1000:.3f}"]
        for name, step in self.steps:
            entries.append(f"{name}.queue;dur={step.queue_s * 1000:.3f}, {name}.infer;dur={step.infer_s * 1000:.3f}")
        return ", ".join(entries) + loaded


@dataclass
class Stats:
    """Counters for the V2 statistics extension (nanoseconds, as Triton reports them)."""

    inference_count: int = 0
    execution_count: int = 0
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_ns: int = 0
    compute_infer_ns: int = 0
    last_inference_ms: int = 0


class ServedModel(Protocol):
    """What a front-end reads about what it serves: tensors, labels, and how answers become labels."""

    input: TensorSpec  # the graph input a raw tensor must match
    output: TensorSpec  # the output that holds the class scores
    outputs: list[TensorSpec]
    labels: list[str]
    spec: ImageInput  # how an encoded image becomes the input
    platform: str

    @property
    def takes_images(self) -> bool: ...

    def describe(self) -> dict:
        """Where and how it runs (device, engine, precision, metadata), for the metadata endpoints."""

    def probabilities(self, output: np.ndarray) -> np.ndarray: ...

    def top_k(self, probabilities: np.ndarray, k: int | None = None) -> list[list[Prediction]]: ...


class Servable(Protocol):
    """Something the routing table routes requests to: one model version, or a pipeline."""

    name: str
    version: int
    model: ServedModel
    stats: Stats

    @property
    def serving(self) -> Serving: ...

    @property
    def output_names(self) -> list[str]: ...

    @property
    def busy(self) -> bool:
        """Computing now."""

    @property
    def queued(self) -> int:
        """Requests waiting for a batch."""

    def admit(self) -> None:
        """Refuse now (Overloaded, Unavailable) what would be refused after reading the body."""

    def check_rows(self, rows: int, input_name: str | None = None) -> None: ...

    def check_tensor(self, array: np.ndarray) -> None: ...

    def resolve_outputs(self, names: Sequence[str] | None) -> list[str]: ...

    def top_k(self, outputs: dict[str, np.ndarray], k: int | None) -> list[list[Prediction]]: ...

    async def classify(self, images: Sequence[bytes], *, k: int | None, deadline: float | None, timing: Timing,
                       input_name: str | None = None) -> list[list[Prediction]]: ...

    async def infer_images(self, images: Sequence[bytes], *, deadline: float | None, timing: Timing,
                           input_name: str | None = None) -> dict[str, np.ndarray]: ...

    async def infer_tensor(self, array: np.ndarray, *, deadline: float | None,
                           timing: Timing) -> dict[str, np.ndarray]: ...

    def start(self) -> None: ...

    async def close(self) -> None: ...


class Classifies:
    """``classify`` as every servable does it (a model's service, a pipeline, a version loaded on
    demand): its ``infer_images``, then its ``top_k``."""

    async def classify(self, images: Sequence[bytes], *, k: int | None, deadline: float | None, timing: Timing,
                       input_name: str | None = None) -> list[list[Prediction]]:
        outputs = await self.infer_images(images, deadline=deadline, timing=timing, input_name=input_name)
        return self.top_k(outputs, k)


def check_rows(rows: int, max_images: int, input_name: str | None = None) -> None:
    """The per-request image limit (an image is one row of the batch dimension)."""
    if rows > max_images:
        raise PayloadTooLarge(f"{rows} images in one request is over the limit of {max_images}; "
                              f"send them in several requests", input_name=input_name)


def check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded("deadline passed before compute; not computed")
