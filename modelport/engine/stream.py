"""Online classification of a stream of file names: the model is loaded once.

Paths are read and decoded by a small thread pool while the previous batch runs (Pillow and
ONNX Runtime both release the GIL). Results come out in input order, one per input, as soon as
their batch is done, so a pipe consumer sees answers before standard input closes.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from modelport.errors import ModelportError
from modelport.engine.imaging import lower_priority
from modelport.engine.model import Model

_EOF = None


def classify_stream(model: Model, lines: Iterable[str], emit: Callable[[dict], None], *, top_k: int,
                    batch_size: int = 8, decode_workers: int = 2, window: int = 64) -> int:
    """Classify every path in ``lines``; call ``emit`` once per input, in order. Returns the failure count."""
    pending: queue.Queue = queue.Queue(maxsize=window)  # bounds memory: at most `window` decoded crops
    failures = 0
    with ThreadPoolExecutor(decode_workers, thread_name_prefix="decode", initializer=lower_priority) as pool:
        reader = threading.Thread(target=_read, args=(model, lines, pool, pending), daemon=True, name="stdin")
        reader.start()
        done = False
        while not done:
            batch = [pending.get()]
            # Take whatever is already decoded behind the head, so the runtime never waits on a
            # slow file while later ones are ready; order is kept because batches are prefixes.
            while len(batch) < batch_size and batch[-1] is not _EOF:
                try:
                    item = pending.get_nowait()
                except queue.Empty:
                    break
                batch.append(item)
                if item is not _EOF and not item[1].done():
                    break
            if batch[-1] is _EOF:
                batch.pop()
                done = True
            failures += _run_batch(model, batch, emit, top_k)
        reader.join()
    return failures


def _read(model: Model, lines: Iterable[str], pool: ThreadPoolExecutor, pending: queue.Queue) -> None:
    try:
        for line in lines:
            path = line.rstrip("\r\n")
            if path.strip():
                pending.put((path, pool.submit(_load, model, path)))
    finally:
        pending.put(_EOF)


def _load(model: Model, path: str) -> np.ndarray:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise _FileError(exc.strerror or str(exc)) from None
    return model.decode(data)


class _FileError(Exception):
    pass


def _run_batch(model: Model, batch: list[tuple[str, Future]], emit: Callable[[dict], None], top_k: int) -> int:
    crops, errors = [], {}
    for i, (_, future) in enumerate(batch):
        try:
            crops.append(future.result())
        except (ModelportError, _FileError) as exc:
            errors[i] = str(exc)
    predictions = iter(model.top_k(model.predict(np.stack(crops)), top_k) if crops else [])
    for i, (path, _) in enumerate(batch):
        if i in errors:
            emit({"path": path, "error": errors[i]})
        else:
            emit({"path": path, "predictions": [p.as_dict() for p in next(predictions)]})
    return len(errors)
