"""Pipelines through a real server: a Lite0 -> Lite2 cascade against Lite2 alone, and a pipeline's own overhead.

    python benchmarks/pipeline.py [--images 200] [--seconds 10] [--confident 0.7]

Builds EfficientNet-Lite2 (ONNX, from its PyPI weight package) beside the default Lite0 in a
temporary repository, with three pipelines: ``smart`` (cascade Lite0 -> Lite2), ``one`` (a chain of
Lite0 alone, for the overhead) and nothing else. The photo set is ``samples.photo_set`` (crops of
the real photos scikit-image and scikit-learn ship; ``--photos objects``, the default, only of
ImageNet objects); the threshold is set so that Lite0 answers ``--confident`` of them (0.7: 30 %
escalated), measured in-process first.

Figures, each a ratio measured in this run:
- cost: 1 / throughput at saturation (ZeroMQ, 8 requests in flight, one image each), for Lite0
  alone, Lite2 alone and the cascade; the cascade's measured cost / the cost its escalation share
  predicts, cost(Lite0) + share x cost(Lite2) (target <= 1.05), and / Lite2 alone (target <= 0.8);
- top-1 agreement of the cascade's answers with Lite2 alone's, through the server (target >= 0.98);
- overhead: p50 of one request at a time, pipeline ``one`` minus Lite0 directly (target <= 0.2 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from conftest import make_tiny_bundle  # noqa: E402
from servers import Server, free_port, metric  # noqa: E402

from modelport import AsyncClient, Client, default_model, samples  # noqa: E402
from modelport.model import Model  # noqa: E402
from modelport.packaged import build  # noqa: E402

LITE0, LITE2 = "efficientnet-lite0", "efficientnet-lite2"


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--confident", type=float, default=0.7, help="share of images Lite0 should answer")
    parser.add_argument("--photos", choices=["objects", "all"], default="objects",
                        help="crops of photos of ImageNet objects only, or of every sample photo (text, "
                             "textures, microscopy: images no ImageNet model is sure about)")
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    vnni = "avx512_vnni" in open("/proc/cpuinfo").read()
    print(f"CPU: {cpu}; AVX-512 VNNI: {'yes' if vnni else 'no'}")

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        shutil.copytree(default_model.ensure_default_model(), repo / LITE0 / "1")
        started = time.monotonic()
        build(LITE2, repo / LITE2 / "1", runtime="onnx")
        print(f"built {LITE2} in {time.monotonic() - started:.0f} s")
        images = samples.photo_set(args.images, seed=11, objects=args.photos == "objects")

        lite0 = Model.load(repo / LITE0 / "1", name=LITE0)
        confidence = np.array([lite0.predict(np.stack([lite0.decode(d)]))[0].max() for d in images])
        threshold = float(np.quantile(confidence, 1 - args.confident))
        print(f"threshold escalate_below = {threshold:.3f}: Lite0 confident on "
              f"{(confidence >= threshold).mean():.0%} of {len(images)} images")
        del lite0
        (repo / "smart").mkdir()
        (repo / "smart" / "pipeline.toml").write_text(
            f'kind = "cascade"\nsteps = ["{LITE0}", "{LITE2}"]\nescalate_below = {threshold}\n')
        (repo / "one").mkdir()
        (repo / "one" / "pipeline.toml").write_text(f'kind = "chain"\nsteps = ["{LITE0}"]\n')
        make_tiny_bundle(repo / "tiny" / "1", size=8)  # a sub-millisecond model: the overhead stands out
        (repo / "one-tiny").mkdir()
        (repo / "one-tiny" / "pipeline.toml").write_text('kind = "chain"\nsteps = ["tiny"]\n')

        zmq_port = free_port()
        server = Server(str(repo), log=Path(tmp) / "server.log", zmq_port=zmq_port).wait_ready(120)
        try:
            url = f"zmq://127.0.0.1:{zmq_port}"
            with Client(url) as client:
                answers = {m: [client.classify(d, model=m, top_k=1)[0].index for d in images] for m in (LITE2, "smart")}
            agreement = float(np.mean(np.array(answers[LITE2]) == np.array(answers["smart"])))

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
                for direct_model, pipeline, data in ((LITE0, "one", images[0]), ("tiny", "one-tiny", samples.jpeg(
                        np.zeros((8, 8, 3), np.uint8)))):
                    for model in (direct_model, pipeline):
                        p50_ms(client, model, data, 30)  # warm
                    pairs = [(p50_ms(client, direct_model, data, 100), p50_ms(client, pipeline, data, 100))
                             for _ in range(7)]
                    overheads[direct_model] = (statistics.median(b - a for a, b in pairs),
                                               statistics.median(a for a, _ in pairs))
            sweep = evaluate_sweep(repo, images)
        finally:
            server.stop()

    print(f"cost per image at saturation: Lite0 {cost[LITE0]:.2f} ms, Lite2 {cost[LITE2]:.2f} ms "
          f"(Lite0 / Lite2 = {cost[LITE0] / cost[LITE2]:.2f}), cascade {cost['smart']:.2f} ms "
          f"at {share:.1%} escalated")
    print(f"cascade measured / predicted (cost(Lite0) + share x cost(Lite2) = {predicted:.2f} ms): "
          f"{cost['smart'] / predicted:.3f} (target <= 1.05)")
    print(f"cascade / Lite2 alone: {cost['smart'] / cost[LITE2]:.3f} (target <= 0.8)")
    print(f"top-1 agreement of the cascade with Lite2 alone over {len(images)} images: {agreement:.1%} "
          f"(target >= 98 %)")
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


def evaluate_sweep(repo: Path, images: list[bytes]):
    """The threshold sweep of ``modelport pipeline evaluate`` on the same images (in-process)."""
    from modelport.pipeline.config import read_pipeline
    from modelport.pipeline.evaluate import evaluate

    config = read_pipeline(repo / "smart" / "pipeline.toml")
    steps = [Model.load(repo / name / "1", name=name) for name in (LITE0, LITE2)]
    return evaluate(config, steps, None, images, None, target=0.98)


if __name__ == "__main__":
    main()
