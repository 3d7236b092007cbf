"""``modelport bench``: load a server and report latency, throughput, errors and wrong answers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


@click.command()
@click.argument("url")
@click.option("--images", "images_dir", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
              help="Folder of images to send (flat, or in <class>/ folders), cycled through.")
@click.option("--model", "-m", default="efficientnet-lite0", show_default=True, help="Model (or pipeline) to ask.")
@click.option("--protocol", type=click.Choice(["upload", "v2", "tfserving", "zmq", "grpc", "discovery"]), default=None,
              help="Default: upload for http://, zmq for zmq://, grpc for grpc://, discovery for etcd://.")
@click.option("--rate", default=None, help="Open loop: requests a second, or a sweep START:STOP:STEP.")
@click.option("--arrivals", type=click.Choice(["poisson", "constant"]), default="poisson", show_default=True)
@click.option("--concurrency", "-c", default=None, help="Closed loop: requests in flight (or a list: 1,8,32).")
@click.option("--duration", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds per level.")
@click.option("--expect", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="`modelport classify --json` output for these images: answers that differ count as wrong.")
@click.option("--limit", "limit_model", default=None,
              help="Also measure MODEL's in-process limit on the same images; throughputs become ratios to it.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write every level's figures to this JSON file ('-': standard output).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG: latency and throughput against offered load (a sweep), or latency over time (one level).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the Poisson arrivals.")
def bench(url: str, images_dir: Path, model: str, protocol: str | None, rate: str | None, arrivals: str,
          concurrency: str | None, duration: float, expect: Path | None, limit_model: str | None,
          json_path: Path | None, plot_path: Path | None, seed: int) -> None:
    """Load URL with IMAGES and report latency (from each request's planned send time), throughput,
    errors by kind and wrong answers: open loop with --rate, closed loop with --concurrency.

    URL: http://host:port (modelport, Triton, TF Serving...), zmq://host:port, etcd://host:port/cluster.
    """
    from rich.console import Console
    from rich.table import Table

    from modelport.bench import protocols as bench_protocols
    from modelport.bench.report import plot
    from modelport.bench.sweep import bench as run_bench, in_process_limit, parse_rates, read_expect
    from modelport.folders import find_images

    if (rate is None) == (concurrency is None):
        raise click.UsageError("give --rate (open loop) or --concurrency (closed loop)")
    rates = parse_rates(rate) if rate else None
    try:
        levels = [int(c) for c in concurrency.split(",")] if concurrency else None
    except ValueError:
        raise click.UsageError(f"--concurrency {concurrency!r}: a number or a list like 1,8,32") from None
    if levels and any(c < 1 for c in levels):
        raise click.UsageError("--concurrency: at least 1")
    paths, _ = find_images(images_dir)
    images = [p.read_bytes() for p in paths]
    expected = read_expect(expect, paths) if expect else None
    console = Console(stderr=True)
    limit = None
    if limit_model:
        with console.status(f"measuring {limit_model} in-process on the same images..."):
            limit = in_process_limit(limit_model, images)
        console.print(f"in-process limit of {limit_model}: {limit:.1f} img/s")

    def show(s) -> None:
        level = f"{s.offered_per_s:g} req/s offered" if s.mode == "open" else f"{s.concurrency} in flight"
        extra = f" = {s.good_per_s / limit:.2f} x limit" if limit else ""
        console.print(f"{level}: {s.good_per_s:.1f} right answers/s{extra}, p50 {_ms(s.latency_ms['p50'])} ms, "
                      f"p99 {_ms(s.latency_ms['p99'])} ms, errors {sum(s.errors.values())}, wrong {s.wrong}"
                      + ("  [bold red]generator behind its schedule[/bold red]" if s.behind else ""))

    summaries = run_bench(url, images, protocol=protocol or bench_protocols.default_protocol(url), model=model,
                          rates=rates, concurrency=levels, duration_s=duration, arrivals=arrivals,
                          expected=expected, seed=seed, on_level=show)
    for s in summaries:
        s.limit_per_s = limit
    table = Table(title=f"modelport bench {url} ({model}, {len(images)} images, {duration:g} s per level)")
    for column in ("req/s" if rates else "in flight", "answers/s", "right/s", "p50 ms", "p90 ms", "p99 ms",
                   "p99.9 ms", "max ms", "errors", "wrong", "batch", "queue ms"):
        table.add_column(column, justify="right")
    for s in summaries:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(s.errors.items())) or "0"
        table.add_row(f"{s.offered_per_s:g}" if s.mode == "open" else str(s.concurrency),
                      f"{s.throughput_per_s:.1f}",
                      f"{s.good_per_s:.1f}" + (f" ({s.good_per_s / limit:.2f} x)" if limit else ""),
                      *(_ms(s.latency_ms[k]) for k in ("p50", "p90", "p99", "p99.9", "max")),
                      errors, str(s.wrong),
                      f"{s.server['mean_batch_size']:.2f}" if s.server else "-",
                      f"{s.server['mean_queue_ms']:.1f}" if s.server else "-")
    # stdout stays the JSON's when it goes there; into a file or a pipe, the table is not cut to 80 columns
    Console(stderr=str(json_path) == "-", width=None if sys.stdout.isatty() else 160).print(table)
    for s in summaries:
        if s.behind:
            console.print(f"[bold red]at {s.offered_per_s:g} req/s the generator fell behind its schedule (p99 "
                          f"{s.schedule_error_ms['p99']:.1f} ms late, {s.unsent} never sent): those figures measure "
                          f"this machine, not the server[/bold red]")
    if json_path is not None:
        document = json.dumps({"url": url, "model": model, "images": len(images), "limit_per_s": limit,
                               "levels": [s.as_dict() for s in summaries]}, indent=1)
        if str(json_path) == "-":
            click.echo(document)
        else:
            json_path.write_text(document + "\n")
    if plot_path is not None:
        plot(summaries, plot_path, f"{model} at {url}")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
