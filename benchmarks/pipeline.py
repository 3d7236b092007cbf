"""Pipelines through a real server: a Lite0 -> Lite2 cascade against Lite2 alone, and a pipeline's own overhead.

    python benchmarks/pipeline.py [--images 200] [--seconds 10] [--confident 0.7 | --escalate-below T]
        [--photos objects|all|DIR] [--runtime auto|onnxruntime|openvino] [--precision auto|fp32|bf16|int8]

Builds EfficientNet-Lite2 (ONNX, from its PyPI weight package) beside the default Lite0 in a
temporary repository, with three pipelines: ``smart`` (cascade Lite0 -> Lite2), ``one`` (a chain of
Lite0 alone, for the overhead) and nothing else. The photo set is ``samples.photo_set`` (crops of
the real photos scikit-image and scikit-learn ship; ``--photos objects``, the default, only of
ImageNet objects), or every image under ``--photos DIR`` (the first ``--images`` of them, sorted),
scored against true classes where a ``labels.csv`` (path relative to DIR, class_index) lies in DIR
or beside it. The threshold is set so that Lite0 answers ``--confident`` of them (0.7: 30 %
escalated), measured in-process first, or to ``--escalate-below``.

``--runtime`` and ``--precision`` go to ``modelport serve`` (and to the in-process models), so both
steps run at the same engine and precision; each model's engine and precision are printed as the
server reports them. ``--precision int8`` serves the INT8 graphs their builds checked (``modelport
optimize``'s recipe and gate, on the sample photos); the sub-millisecond overhead model has none, so
its overhead line is left out.

Figures, each a ratio measured in this run:
- cost: 1 / throughput at saturation (ZeroMQ, 8 requests in flight, one image each), for Lite0
  alone, Lite2 alone and the cascade; the cascade's measured cost / the cost its escalation share
  predicts, cost(Lite0) + share x cost(Lite2) (target <= 1.05), and / Lite2 alone (target <= 0.85);
- top-1 agreement of the cascade's answers with Lite2 alone's, through the server (target >= 0.98),
  and, with true classes, the top-1 accuracy of Lite0 alone, Lite2 alone and the cascade;
- overhead: p50 of one request at a time, pipeline ``one`` minus Lite0 directly (target <= 0.2 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from conftest import make_tiny_bundle  # noqa: E402
from servers import Server, free_port, metric  # noqa: E402

from modelport import AsyncClient, Client, samples  # noqa: E402

from modelport.packaged import default_model  # noqa: E402
from modelport.engine.model import Model  # noqa: E402
from modelport.packaged.weights import build  # noqa: E402
from modelport.runtime.precision import ENGINE_CHOICES, PRECISIONS  # noqa: E402

LITE0, LITE2 = "efficientnet-lite0", "efficientnet-lite2"
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")


async def saturate(url: str, model: str, images: list[bytes], seconds: float, in_flight: int = 8) -> float:
    """Images per second, closed loop, ``in_flight`` requests of one image at a time."""
    done = 0
    async with AsyncClient(url, model=model, timeout_s=60) as client:
        for data in images[:in_flight]:
            await client.classify(data)  # warm
        start = time.monotonic()

        async def worker(offset: int) -> None:
            nonlocal done
            i = offset
            while time.monotonic() - start < seconds:
                await client.classify(images[i % len(images)])
                done += 1
                i += in_flight

        await asyncio.gather(*(worker(k) for k in range(in_flight)))
        return done / (time.monotonic() - start)


def p50_ms(client: Client, model: str, data: bytes, count: int) -> float:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        client.classify(data, model=model)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def read_photos(directory: Path, count: int | None) -> tuple[list[bytes], list[int] | None]:
    """The first ``count`` images under ``directory`` (sorted), and their true classes where a
    ``labels.csv`` in it or beside it names them (path relative to ``directory``, class_index)."""
    paths = sorted(p for p in directory.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES)[:count]
    if not paths:
        raise SystemExit(f"--photos {directory}: no {', '.join(PHOTO_SUFFIXES)} files under it")
    table = next((c for c in (directory / "labels.csv", directory.parent / "labels.csv") if c.is_file()), None)
    truth = None
    if table is not None:
        with open(table, newline="", encoding="utf-8") as file:
            classes = {row["path"]: int(row["class_index"]) for row in csv.DictReader(file)}
        names = [p.relative_to(directory).as_posix() for p in paths]
        missing = [n for n in names if n not in classes]
        if missing:
            raise SystemExit(f"{table} names no class for {len(missing)} of the photos, e.g. {missing[0]}")
        truth = [classes[n] for n in names]
    print(f"{len(paths)} photos from {directory}"
          + (f", true classes from {table}" if truth else "; no labels.csv: agreement only"))
    return [p.read_bytes() for p in paths], truth


def add_models(repo: Path, precision: str, engine: str) -> None:
    """Lite0 and Lite2 as version 1 of each. A packaged build is checked at the reduced precisions
    this CPU runs (bf16, INT8 beside the fp32 graph): ``--precision int8`` serves each one's INT8
    graph, ``auto`` the fastest checked."""
    started = time.monotonic()
    build(LITE2, repo / LITE2 / "1", runtime="onnx")
    print(f"built {LITE2} (with its precision checks) in {time.monotonic() - started:.0f} s")
    shutil.copytree(default_model.ensure_default_model(), repo / LITE0 / "1")


def engines_of(url: str, models: tuple[str, ...]) -> dict[str, str]:
    """``engine at precision`` of each model, as the server's V2 metadata reports it."""
    described = {}
    for model in models:
        parameters = httpx.get(f"{url}/v2/models/{model}", timeout=10).json()["parameters"]
        described[model] = f"{parameters.get('engine', '?')} at {parameters.get('precision', '?')}"
    return described


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=None, help="photos to use (default: 200, or all under DIR)")
    parser.add_argument("--seconds", type=float, default=10)
    threshold_group = parser.add_mutually_exclusive_group()
    threshold_group.add_argument("--confident", type=float, default=0.7, help="share of images Lite0 should answer")
    threshold_group.add_argument("--escalate-below", type=float, default=None,
                                 help="the cascade's threshold itself (instead of --confident)")
    parser.add_argument("--photos", default="objects", metavar="objects|all|DIR",
                        help="crops of photos of ImageNet objects only, or of every sample photo (text, "
                             "textures, microscopy: images no ImageNet model is sure about), or the photos "
                             "under DIR (e.g. ../shared/data/imagenet-sample/images)")
    parser.add_argument("--runtime", choices=ENGINE_CHOICES, default="auto",
                        help="serve --runtime: the engine of both steps")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="serve --precision: the precision of both steps")
    args = parser.parse_args()
    if args.photos not in ("objects", "all") and not Path(args.photos).is_dir():
        parser.error(f"--photos {args.photos!r}: not objects, all or a directory")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    vnni = "avx512_vnni" in open("/proc/cpuinfo").read()
    print(f"CPU: {cpu}; AVX-512 VNNI: {'yes' if vnni else 'no'}; --runtime {args.runtime} --precision {args.precision}")

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        add_models(repo, args.precision, args.runtime)
        if args.photos in ("objects", "all"):
            images, truth = samples.photo_set(args.images or 200, seed=11, objects=args.photos == "objects"), None
        else:
            images, truth = read_photos(Path(args.photos), args.images)

        lite0 = Model.load(repo / LITE0 / "1", name=LITE0, engine=args.runtime, precision=args.precision)
        confidence = np.array([lite0.predict(np.stack([lite0.decode(d)]))[0].max() for d in images])
        threshold = (args.escalate_below if args.escalate_below is not None
                     else float(np.quantile(confidence, 1 - args.confident)))
        print(f"threshold escalate_below = {threshold:.3f}: Lite0 confident on "
              f"{(confidence >= threshold).mean():.0%} of {len(images)} images")
        lite0.close()
        del lite0
        (repo / "smart").mkdir()
        (repo / "smart" / "pipeline.toml").write_text(
            f'kind = "cascade"\nsteps = ["{LITE0}", "{LITE2}"]\nescalate_below = {threshold}\n')
        (repo / "one").mkdir()
        (repo / "one" / "pipeline.toml").write_text(f'kind = "chain"\nsteps = ["{LITE0}"]\n')
        overhead_pairs = [(LITE0, "one", images[0])]
        if args.precision != "int8":  # the tiny graph has no INT8 version
            make_tiny_bundle(repo / "tiny" / "1", size=8)  # a sub-millisecond model: the overhead stands out
            (repo / "one-tiny").mkdir()
            (repo / "one-tiny" / "pipeline.toml").write_text('kind = "chain"\nsteps = ["tiny"]\n')
            overhead_pairs.append(("tiny", "one-tiny", samples.jpeg(np.zeros((8, 8, 3), np.uint8))))

        zmq_port = free_port()
        server = Server(str(repo), "--runtime", args.runtime, "--precision", args.precision,
                        log=Path(tmp) / "server.log", zmq_port=zmq_port).wait_ready(300)
        try:
            engines = engines_of(server.url, (LITE0, LITE2))
            url = f"zmq://127.0.0.1:{zmq_port}"
            with Client(url) as client:
                answers = {m: np.array([client.classify(d, model=m, top_k=1)[0].index for d in images])
                           for m in (LITE0, LITE2, "smart")}
            agree = int((answers[LITE2] == answers["smart"]).sum())

            rates = {}
            for model in (LITE0, LITE2, "smart"):
                before = {s: metric(server.url, "modelport_pipeline_step_rows_total", pipeline="smart", step=s)
                          for s in (LITE0, LITE2)}
                rates[model] = asyncio.run(saturate(url, model, images, args.seconds))
                if model == "smart":
                    rows = {s: metric(server.url, "modelport_pipeline_step_rows_total", pipeline="smart", step=s)
                            - before[s] for s in (LITE0, LITE2)}
                    share = rows[LITE2] / (rows[LITE0] + rows[LITE2])
            cost = {m: 1000 / r for m, r in rates.items()}
            predicted = cost[LITE0] + share * cost[LITE2]

            overheads = {}
            with Client(url) as client:
                for direct_model, pipeline, data in overhead_pairs:
                    for model in (direct_model, pipeline):
                        p50_ms(client, model, data, 30)  # warm
                    pairs = [(p50_ms(client, direct_model, data, 100), p50_ms(client, pipeline, data, 100))
                             for _ in range(7)]
                    overheads[direct_model] = (statistics.median(b - a for a, b in pairs),
                                               statistics.median(a for a, _ in pairs))
            sweep = evaluate_sweep(repo, images, args.runtime, args.precision)
        finally:
            server.stop()

    print("engines: " + "; ".join(f"{m} on {e}" for m, e in engines.items())
          + ("" if len(set(engines.values())) == 1 else " - the steps DIFFER: pin --runtime / --precision"))
    print(f"cost per image at saturation: Lite0 {cost[LITE0]:.2f} ms, Lite2 {cost[LITE2]:.2f} ms "
          f"(Lite0 / Lite2 = {cost[LITE0] / cost[LITE2]:.2f}), cascade {cost['smart']:.2f} ms "
          f"at {share:.1%} escalated")
    print(f"cascade measured / predicted (cost(Lite0) + share x cost(Lite2) = {predicted:.2f} ms): "
          f"{cost['smart'] / predicted:.3f} (target <= 1.05)")
    print(f"cascade / Lite2 alone: {cost['smart'] / cost[LITE2]:.3f} (target <= 0.85)")
    print(f"top-1 agreement of the cascade with Lite2 alone: {agree}/{len(images)} = {agree / len(images):.1%} "
          f"(target >= 98 %)")
    if truth is not None:
        right = {m: int((answers[m] == np.array(truth)).sum()) for m in (LITE0, LITE2, "smart")}
        print("top-1 accuracy against the true classes: " + ", ".join(
            f"{name} {right[m]}/{len(images)} = {right[m] / len(images):.1%}"
            for name, m in (("Lite0 alone", LITE0), ("Lite2 alone", LITE2), ("cascade", "smart"))))
    best = sweep.best
    near = min(sweep.rows, key=lambda row: abs(row.threshold - threshold))
    print("pipeline evaluate on the same images: the cheapest threshold reaching 98 % agreement is "
          + (f"escalate_below = {best.threshold} ({best.score:.1%}, {best.escalated:.0%} escalated, "
             f"{best.relative_cost:.2f} x Lite2 alone)" if best else "none")
          + f"; at {near.threshold}: {near.score:.1%} at {near.relative_cost:.2f} x")
    for model, (overhead, direct) in overheads.items():
        print(f"pipeline overhead (a chain of {model} alone - {model} directly, p50 one at a time over ZeroMQ, "
              f"median of 7 x 100): {overhead:.3f} ms on a {direct:.2f} ms request = {overhead / 0.2:.2f} x "
              f"the 0.2 ms target")


def evaluate_sweep(repo: Path, images: list[bytes], engine: str, precision: str):
    """The threshold sweep of ``modelport pipeline evaluate`` on the same images (in-process)."""
    from modelport.pipeline.config import read_pipeline
    from modelport.pipeline.evaluate import evaluate

    config = read_pipeline(repo / "smart" / "pipeline.toml")
    steps = [Model.load(repo / name / "1", name=name, engine=engine, precision=precision) for name in (LITE0, LITE2)]
    return evaluate(config, steps, None, images, None, target=0.98)


if __name__ == "__main__":
    main()
