"""Run the levels asked for against one target, with the server's own figures around each."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from modelport.bench import protocols
from modelport.bench.report import Summary, summarise
from modelport.bench.run import closed_loop, open_loop
from modelport.errors import BadInput


def parse_rates(text: str) -> list[float]:
    """"300" or "50:400:50" (from 50 to 400 inclusive, in steps of 50)."""
    try:
        parts = [float(p) for p in text.split(":")]
    except ValueError:
        raise BadInput(f"--rate {text!r}: a number, or START:STOP:STEP") from None
    if len(parts) == 1:
        rates = parts
    elif len(parts) == 3 and parts[2] > 0 and parts[1] >= parts[0]:
        count = int(round((parts[1] - parts[0]) / parts[2])) + 1
        rates = [parts[0] + i * parts[2] for i in range(count)]
    else:
        raise BadInput(f"--rate {text!r}: a number, or START:STOP:STEP with STOP >= START and STEP > 0")
    if any(r <= 0 for r in rates):
        raise BadInput("--rate: rates must be above 0")
    return rates


def read_expect(path: Path, images: Sequence[Path]) -> list[tuple[int | None, str | None]]:
    """``modelport classify --json`` output -> the expected (index, label) of each image, by file name."""
    by_name = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            entry = json.loads(line)
            top = entry["predictions"][0]
            by_name[Path(entry["path"]).name] = (top.get("index"), top.get("label"))
    missing = [p.name for p in images if p.name not in by_name]
    if missing:
        raise BadInput(f"--expect {path}: no answer for {', '.join(missing[:3])}"
                       + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    return [by_name[p.name] for p in images]


def server_figures(url: str, model: str) -> dict[str, float] | None:
    """modelport's batch and queue counters for ``model`` (None when the target is not modelport)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    if not url.startswith("http"):
        return None
    try:
        text = httpx.get(url.rstrip("/") + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    wanted = {"modelport_batch_size_sum", "modelport_batch_size_count", "modelport_queue_duration_seconds_sum",
              "modelport_queue_duration_seconds_count"}
    values = dict.fromkeys(wanted, 0.0)
    found = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted and sample.labels.get("model") == model:
                values[sample.name] += sample.value
                found = True
    return values if found else None


def _server_delta(before, after) -> dict[str, float] | None:
    if before is None or after is None:
        return None
    d = {k: after[k] - before[k] for k in before}
    batches, queued = d["modelport_batch_size_count"], d["modelport_queue_duration_seconds_count"]
    return {"batches": batches,
            "mean_batch_size": round(d["modelport_batch_size_sum"] / batches, 3) if batches else 0.0,
            "mean_queue_ms": round(d["modelport_queue_duration_seconds_sum"] / queued * 1000, 3) if queued else 0.0}


def in_process_limit(model_ref: str, images: Sequence[bytes], seconds: float = 5.0) -> float:
    """Images a second of MODEL in this process: decode + batches of 8, on the same images."""
    from modelport.packaged import default_model
    from modelport.engine.model import Model

    model = Model.load(default_model.resolve(model_ref))
    model.predict(np.stack([model.decode(images[0])]))
    done, start, i = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds or done < 16:
        batch = [images[(i + j) % len(images)] for j in range(8)]
        model.predict(np.stack([model.decode(d) for d in batch]))
        done += 8
        i += 8
    return done / (time.perf_counter() - start)


def bench(url: str, images: Sequence[bytes], *, protocol: str, model: str, rates: Sequence[float] | None,
          concurrency: Sequence[int] | None, duration_s: float, arrivals: str = "poisson",
          expected=None, seed: int = 0, warmup_s: float = 1.0,
          on_level: Callable[[Summary], None] = lambda s: None) -> list[Summary]:
    async def main() -> list[Summary]:
        target = protocols.target(url, protocol, model)
        try:
            await target.prepare()
            requests = [target.encode(image) for image in images]
            if warmup_s:  # connections open, the server's first batches done
                await closed_loop(target, requests, 4, warmup_s)
            summaries = []
            levels = [("open", r) for r in rates or ()] + [("closed", c) for c in concurrency or ()]
            for mode, level in levels:
                before = await asyncio.to_thread(server_figures, url, model)
                if mode == "open":
                    run = await open_loop(target, requests, level, duration_s, arrivals=arrivals, seed=seed)
                else:
                    run = await closed_loop(target, requests, level, duration_s)
                after = await asyncio.to_thread(server_figures, url, model)
                summary = summarise(run, expected)
                summary.server = _server_delta(before, after)
                summaries.append(summary)
                on_level(summary)
            return summaries
        finally:
            await target.close()

    return asyncio.run(main())
