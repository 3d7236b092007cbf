"""Issue 14's figures: SLO-aware batching against the best fixed setting found by brute force.

    python benchmarks/slo_batching.py [--slo-ms MS] [--seconds 8] [--grid full|quick] [--plot docs/slo-batching.png]

One `modelport serve` holds the default model several times, each copy with its own [serving]
settings: every fixed (max_batch_size, max_delay_ms) of the grid, today's defaults, and one with
only `latency_slo_ms`. `modelport bench` (in this process, open loop, Poisson) drives them with
the same photos:
1. batch-1 latency (closed loop, one in flight): the SLO is 5 x its p50 unless --slo-ms says;
2. the SLO capacity of each fixed setting: the highest rate at which p99 <= SLO (bisection); the
   best of them is C, the yardstick;
3. the SLO batcher, the best fixed setting and the defaults at 0.2 .. 2 x C: p99 / SLO, refusals,
   answers within the SLO per second / C, refusal latency, the worst accepted latency / SLO.
Every figure is a ratio to something measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import tomllib
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from common import photo_files  # noqa: E402
from servers import Server, wait_until  # noqa: E402

from modelport.packaged import default_model  # noqa: E402
from modelport.bench.sweep import bench  # noqa: E402
from modelport.repository.bundle import CONFIG_FILE, write_config  # noqa: E402

GRIDS = {"full": ((1, 2, 4, 8, 16), (0, 2, 5, 10)), "quick": ((1, 4, 16), (0, 5))}
LOADS = (0.2, 0.5, 0.8, 0.95, 1.2, 2.0)


def copy_model(source: Path, target: Path, serving: dict) -> None:
    target.mkdir(parents=True)
    config = tomllib.loads((source / CONFIG_FILE).read_text())
    for name in (config["model_file"], "labels.txt"):
        (target / name).symlink_to(source / name)
    config.pop("name", None)
    config["serving"] = {**config["serving"], **serving}
    write_config(target, config)


MIN_REQUESTS = 250  # a p99 over fewer is one unlucky request


def level(url: str, photos: list[bytes], model: str, rate: float | None, seconds: float,
          concurrency: int | None = None) -> dict:
    if rate:
        seconds = max(seconds, MIN_REQUESTS / rate)
    summary = bench(url, photos, protocol="upload", model=model, rates=[rate] if rate else None,
                    concurrency=[concurrency] if concurrency else None, duration_s=seconds, warmup_s=0.5)[0]
    return summary.as_dict(with_samples=True)


def capacity(url: str, photos: list[bytes], model: str, slo_ms: float, low: float, high: float, seconds: float,
             steps: int) -> tuple[float, dict]:
    """Highest rate (of a bisection between low and high) at which p99 <= SLO with no errors."""
    best, best_level = 0.0, {}
    for _ in range(steps):
        rate = (low + high) / 2
        result = level(url, photos, model, rate, seconds)
        p99 = result["latency_ms"]["p99"]
        if p99 is not None and p99 <= slo_ms and not result["errors"]:
            best, best_level, low = rate, result, rate
        else:
            high = rate
    return best, best_level


def judged(result: dict, slo_ms: float, capacity_per_s: float) -> dict:
    latencies = np.array([ms for _, ms in result["over_time"]])
    within = int((latencies <= slo_ms).sum()) if len(latencies) else 0
    refused = sum(result["errors"].values())
    return {
        "offered_per_s": result["offered_per_s"], "p50_ms": result["latency_ms"]["p50"],
        "p99_over_slo": None if result["latency_ms"]["p99"] is None else result["latency_ms"]["p99"] / slo_ms,
        "worst_over_slo": None if not len(latencies) else float(latencies.max()) / slo_ms,
        "refused_share": refused / max(1, result["sent"]),
        "refusal_max_ms": result["error_latency_ms"].get("max"),
        "within_slo_per_s_over_c": within / result["duration_s"] / capacity_per_s,
        "errors": result["errors"], "generator_behind": result["behind"], "server": result["server"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slo-ms", type=float, default=None, help="default: 5 x the batch-1 latency, to 5 ms")
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full")
    parser.add_argument("--steps", type=int, default=4, help="bisection steps per fixed setting")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    sizes, delays = GRIDS[args.grid]
    source = default_model.ensure_default_model()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = [p.read_bytes() for p in photo_files(tmp / "photos")]
        repo = tmp / "repo"
        fixed = {f"b{b}-d{d}": {"max_batch_size": b, "max_delay_ms": float(d)} for b in sizes for d in delays}
        for name, serving in fixed.items():
            copy_model(source, repo / name / "1", serving)
        copy_model(source, repo / "defaults" / "1", {})
        server = Server(str(repo), "--log-level", "warning", log=tmp / "server.log").wait_ready(300)
        try:
            one = level(server.url, photos, "defaults", None, args.seconds, concurrency=1)
            ceiling = level(server.url, photos, "defaults", None, args.seconds, concurrency=16)["throughput_per_s"]
            batch1_ms = one["latency_ms"]["p50"]
            if args.slo_ms is None:
                args.slo_ms = max(5.0, round(5 * batch1_ms / 5) * 5)
            # The SLO model arrives now, through the repository (loaded within a second or two).
            copy_model(source, repo / "slo" / "1", {"latency_slo_ms": args.slo_ms})
            wait_until(lambda: httpx.get(server.url + "/v2/models/slo/ready").status_code == 200, 60, what="slo model")
            print(f"batch-1 latency p50 {batch1_ms:.1f} ms: SLO {args.slo_ms:g} ms = {args.slo_ms / batch1_ms:.1f} x; "
                  f"closed-loop ceiling {ceiling:.0f} req/s", flush=True)
            capacities = {}
            for name in fixed:
                capacities[name], _ = capacity(server.url, photos, name, args.slo_ms, 0.0, ceiling, args.seconds,
                                               args.steps)
                print(f"  {name:8s} SLO capacity {capacities[name]:6.1f} req/s", flush=True)
            best = max(capacities, key=capacities.get)
            c = capacities[best]
            print(f"best fixed setting {best}: C = {c:.1f} req/s ({c / ceiling:.2f} x the ceiling)", flush=True)
            curves = {}
            for model in ("slo", best, "defaults"):
                curves[model] = [judged(level(server.url, photos, model, c * load, args.seconds), args.slo_ms, c)
                                 for load in LOADS]
                for load, row in zip(LOADS, curves[model]):
                    print(f"  {model:8s} {load:4.2f} x C: p99/SLO {_f(row['p99_over_slo'])}  worst/SLO "
                          f"{_f(row['worst_over_slo'])}  refused {row['refused_share']:.1%}  within-SLO/s / C "
                          f"{row['within_slo_per_s_over_c']:.2f}  refusal max {_f(row['refusal_max_ms'], 1)} ms  "
                          f"p50 {_f(row['p50_ms'], 1)} ms{'  (generator behind)' if row['generator_behind'] else ''}",
                          flush=True)
        finally:
            server.stop()
    slo = dict(zip(LOADS, curves["slo"]))
    defaults = dict(zip(LOADS, curves["defaults"]))
    verdict = {
        "p99_within_slo_up_to_0.95C": all(slo[x]["p99_over_slo"] is not None and slo[x]["p99_over_slo"] <= 1
                                          for x in LOADS if x <= 0.95),
        "within_slo_per_s_over_c_at_1.2_and_2": [slo[1.2]["within_slo_per_s_over_c"],
                                                 slo[2.0]["within_slo_per_s_over_c"]],
        "refusal_max_ms_at_1.2_and_2": [slo[1.2]["refusal_max_ms"], slo[2.0]["refusal_max_ms"]],
        "worst_accepted_over_slo_above_c": max(slo[x]["worst_over_slo"] or 0 for x in LOADS if x > 1),
        "p50_at_0.2C_slo_over_defaults": slo[0.2]["p50_ms"] / defaults[0.2]["p50_ms"],
    }
    print("verdict:", json.dumps(verdict))
    if args.json:
        args.json.write_text(json.dumps({"slo_ms": args.slo_ms, "batch1_ms": batch1_ms, "capacities": capacities,
                                         "best": best, "curves": curves, "verdict": verdict}, indent=1))
    if args.plot:
        plot(args.plot, curves, best, c, args.slo_ms)


def plot(path: Path, curves: dict, best: str, c: float, slo_ms: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = {"slo": f"latency_slo_ms = {slo_ms:g}", best: f"best fixed setting ({best})", "defaults": "defaults (b8-d5)"}
    for model, rows in curves.items():
        x = [row["offered_per_s"] / c for row in rows]
        y = [row["p99_over_slo"] * slo_ms if row["p99_over_slo"] is not None else np.nan for row in rows]
        ax.plot(x, y, marker="o", label=names[model])
    ax.axhline(slo_ms, color="grey", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("offered load / SLO capacity of the best fixed setting")
    ax.set_ylabel("p99 latency of answered requests (ms)")
    ax.set_title("p99 against offered load (default model, 2 cores)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _f(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    main()
