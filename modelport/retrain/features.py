"""Backbone features, computed once per image content and cached on disk.

The cache lives in ``$MODELPORT_HOME/features/<backbone id>/``: one shard file per run that
computed something, each holding content hashes and their feature rows. A second run with more
images computes only the new ones. The backbone id hashes the graph file and the pipeline, so a
different backbone never reuses another's features.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from modelport.errors import ModelportError
from modelport.engine.imaging import lower_priority
from modelport.engine.model import Model

FEATURES_OUTPUT = "features"


@dataclass
class Extraction:
    features: dict[Path, np.ndarray] = field(default_factory=dict)
    unreadable: dict[Path, str] = field(default_factory=dict)
    cache_hits: int = 0
    computed: int = 0
    seconds: float = 0.0


def backbone_id(model: Model) -> str:
    digest = hashlib.sha256()
    with open(model.bundle.model_file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    digest.update(repr(model.spec).encode())
    return digest.hexdigest()[:16]


class FeatureCache:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._rows: dict[str, np.ndarray] = {}
        for shard in sorted(directory.glob("shard-*.npz")) if directory.is_dir() else []:
            with np.load(shard) as data:
                for key, row in zip(data["keys"], data["features"]):
                    self._rows[str(key)] = row

    def get(self, key: str) -> np.ndarray | None:
        return self._rows.get(key)

    def add(self, rows: dict[str, np.ndarray]) -> None:
        if not rows:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        keys = np.array(list(rows))
        staging = self.directory / f".tmp-{uuid.uuid4().hex}.npz"
        np.savez(staging, keys=keys, features=np.stack(list(rows.values())))
        # Atomic: a concurrent reader sees a whole shard or none.
        os.replace(staging, self.directory / f"shard-{time.time_ns()}-{uuid.uuid4().hex[:8]}.npz")
        self._rows.update(rows)


def extract(model: Model, paths: Sequence[Path], cache: FeatureCache, *, batch_size: int = 16,
            progress: Callable[[int], None] | None = None) -> Extraction:
    """Features for every readable path; unreadable files are recorded, never fatal."""
    if FEATURES_OUTPUT not in {o.name for o in model.outputs}:
        raise ModelportError(f"backbone {model.name!r} has no {FEATURES_OUTPUT!r} output to retrain on")
    result = Extraction()
    start = time.perf_counter()
    keys: dict[Path, str] = {}  # content hash of each image still to compute
    todo: list[Path] = []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            result.unreadable[path] = exc.strerror or str(exc)
            if progress:
                progress(1)
            continue
        key = hashlib.sha256(data).hexdigest()
        cached = cache.get(key)
        if cached is not None:
            result.features[path] = cached
            result.cache_hits += 1
            if progress:
                progress(1)
        else:
            keys[path] = key
            todo.append(path)

    new_rows: dict[str, np.ndarray] = {}

    def decode(path: Path):
        try:
            return model.decode(path.read_bytes())  # read again: the page cache has it, memory stays flat
        except ModelportError as exc:
            return exc
        except OSError as exc:
            return ModelportError(exc.strerror or str(exc))

    with ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="decode", initializer=lower_priority) as pool:
        # Decoding runs up to a few batches ahead of inference; the window bounds the crops held.
        window: deque = deque()
        upcoming = iter(todo)
        for offset in range(0, len(todo), batch_size):
            while len(window) < 4 * batch_size and (path := next(upcoming, None)) is not None:
                window.append((path, pool.submit(decode, path)))
            crops, good = [], []
            for _ in range(min(batch_size, len(window))):
                path, future = window.popleft()
                crop = future.result()
                if isinstance(crop, ModelportError):
                    result.unreadable[path] = crop.message
                else:
                    crops.append(crop)
                    good.append(path)
            if crops:
                rows = model.run_crops(np.stack(crops), [FEATURES_OUTPUT])[FEATURES_OUTPUT]
                for path, row in zip(good, rows):
                    result.features[path] = row
                    new_rows[keys[path]] = row
            result.computed += len(crops)
            if progress:
                progress(min(batch_size, len(todo) - offset))
    cache.add(new_rows)
    result.seconds = time.perf_counter() - start
    return result
