"""The ``modelport`` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from modelport.errors import ModelportError
from modelport.runtime.precision import ENGINE_CHOICES, PRECISIONS

MODEL_HELP = "A bundle directory, a model directory (highest version wins) or a model name. Default: efficientnet-lite0."


class _Group(click.Group):
    """Turns modelport errors into one clear line and the error's exit code, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ModelportError as exc:
            click.echo(f"modelport: {exc.message}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=_Group)
@click.version_option(package_name="modelport")
def main() -> None:
    """Put a trained image model into production: classify, serve, retrain."""


def load_model(ref: str | None, *, quiet: bool = False):
    """Resolve and load a model, with a progress line if the default model must be built first."""
    from modelport.packaged import default_model
    from modelport.engine.model import Model

    if (ref is None or ref == default_model.NAME) and not default_model.default_model_dir().is_dir() and not quiet:
        from rich.console import Console

        with Console(stderr=True).status(f"Building {default_model.NAME} (first use only)..."):
            path = default_model.resolve(ref)
    else:
        path = default_model.resolve(ref)
    return Model.load(path)


@main.command()
@click.argument("images", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", "-m", "model_ref", default=None, help=MODEL_HELP)
@click.option("--top-k", "-k", type=click.IntRange(min=1), default=None, help="How many labels to print (default: the bundle's, 5).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image instead of label_image-style lines.")
@click.option("--stdin", "from_stdin", is_flag=True, help="Read image paths from standard input, one per line; write one JSON line per path.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Images per inference batch with --stdin.")
def classify(images: tuple[Path, ...], model_ref: str | None, top_k: int | None, as_json: bool, from_stdin: bool,
             batch_size: int) -> None:
    """Print the top-k labels of each IMAGE (or of each path read from stdin with --stdin).

    Exit status: 0 if every image was classified, 1 if any failed, 2 for a model problem.
    """
    if not images and not from_stdin:
        raise click.UsageError("give one or more IMAGE paths, or --stdin")
    if images and from_stdin:
        raise click.UsageError("give IMAGE paths or --stdin, not both")
    model = load_model(model_ref)
    k = top_k or model.bundle.serving.top_k
    if from_stdin:
        from modelport.engine.stream import classify_stream

        def emit(result: dict) -> None:
            sys.stdout.write(json.dumps(result) + "\n")
            sys.stdout.flush()

        failures = classify_stream(model, sys.stdin, emit, top_k=k, batch_size=batch_size)
        sys.exit(1 if failures else 0)

    failures = 0
    for path in images:
        try:
            predictions = model.classify([path.read_bytes()], k)[0]
        except (ModelportError, OSError) as exc:
            failures += 1
            message = exc.message if isinstance(exc, ModelportError) else (exc.strerror or str(exc))
            if as_json:
                click.echo(json.dumps({"path": str(path), "error": message}))
            else:
                click.echo(f"{path}: error: {message}", err=True)
            continue
        if as_json:
            click.echo(json.dumps({"path": str(path), "predictions": [p.as_dict() for p in predictions]}))
            continue
        if len(images) > 1:
            click.echo(f"{path}:")
        for p in predictions:
            click.echo(f"{p.label} (score = {p.score:.5f})")
    sys.exit(1 if failures else 0)


@main.command()
@click.argument("data", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", required=True, help="Model name: the bundle goes to OUTPUT/NAME/<next version>.")
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path), default=Path("models"),
              show_default=True, help="Repository directory to write the new version into.")
@click.option("--backbone", default=None, help="Backbone model with a 'features' output. Default: efficientnet-lite0.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the validation split.")
@click.option("--min-per-class", type=click.IntRange(min=2), default=5, show_default=True)
@click.option("--confusion-png", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw the validation confusion matrix into this PNG.")
@click.option("--int8", is_flag=True, help="Also quantize the new version (modelport optimize: calibrated on the "
                                           "training images, checked on the validation images) into the next one.")
def retrain(data: Path, name: str, output: Path, backbone: str | None, val_fraction: float, seed: int,
            min_per_class: int, confusion_png: Path | None, int8: bool) -> None:
    """Fine-tune the backbone on DATA (one sub-directory of images per class) into a new bundle version."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from modelport.retrain import retrain as run_retrain
    from modelport.retrain.report import confusion_png as draw, render

    console = Console(stderr=True)
    columns = (TextColumn("features"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} img/s"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("features", total=None, rate="-")
        started = [None]

        def progress(done: int, total: int) -> None:
            import time

            now = time.perf_counter()
            started[0] = started[0] or now
            rate = done / (now - started[0]) if now > started[0] else 0
            bar.update(task, completed=done, total=total, rate=f"{rate:.0f}")

        result = run_retrain(data, name=name, output=output, backbone=backbone, val_fraction=val_fraction,
                             seed=seed, min_per_class=min_per_class, progress=progress)
    x = result.extraction
    console.print(f"{x.computed} images computed, {x.cache_hits} from the feature cache, "
                  f"{len(x.unreadable)} unreadable skipped, in {x.seconds:.1f} s")
    for path, why in list(result.skipped.items())[:10]:
        console.print(f"  skipped {path}: {why}")
    render(result.report, console)
    if confusion_png:
        draw(result.report, confusion_png)
        console.print(f"confusion matrix drawn to {confusion_png}")
    click.echo(result.bundle)
    if int8:
        from modelport.optimize.int8 import optimize as run
        from modelport.retrain import dataset

        split = dataset.scan(data, val_fraction=val_fraction, seed=seed, min_per_class=min_per_class)
        readable = result.extraction.features  # what retrain could decode; the rest was skipped
        train = [e for e in split.train if e.path in readable]
        val = [e for e in split.val if e.path in readable]
        _optimize_and_report(lambda progress: run(result.bundle, [e.path.read_bytes() for e in train],
                                                  [e.path.read_bytes() for e in val],
                                                  labels=[e.label for e in val], progress=progress))


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), default=Path("."))
def samples(directory: Path) -> None:
    """Write two sample photos with known answers into DIRECTORY: cat.jpg and espresso.jpg."""
    from modelport.samples import write_samples

    for path in write_samples(directory):
        click.echo(path)


@main.command("build-model")
@click.argument("name", type=click.Choice(["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]))
@click.option("--runtime", type=click.Choice(["onnx", "torch"]), default="onnx", show_default=True,
              help="Export to ONNX (ONNX Runtime) or to TorchScript (the PyTorch runtime).")
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Repository to write NAME/<next version> into. Default: $MODELPORT_HOME/models.")
@click.option("--int8", is_flag=True, help="Quantize it (modelport optimize, calibrated and checked on the sample "
                                           "photos) into its own model, NAME-int8.")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=0.995, show_default=True,
              help="With --int8: as for modelport optimize.")
@click.option("--min-top5", type=click.FloatRange(0, 1), default=0.99, show_default=True,
              help="With --int8: as for modelport optimize.")
def build_model(name: str, runtime: str, output: Path | None, int8: bool, min_agreement: float,
                min_top5: float) -> None:
    """Build a packaged model (EfficientNet-Lite0/1/2, ImageNet) into a repository as a new version."""
    import tempfile

    from modelport.home import model_home

    from modelport.repository import layout as repository
    from modelport.packaged.weights import build

    root = output or model_home() / "models"
    if not int8:
        existing = [int(p.name) for p in repository.versions(root / name)]
        click.echo(build(name, root / name / str(max(existing, default=0) + 1), runtime=runtime))
        return
    if runtime != "onnx":
        raise click.UsageError("--int8 quantizes ONNX models: use it with --runtime onnx")
    from modelport.optimize.int8 import optimize as run, sample_calibration, sample_evaluation

    target_model = root / f"{name}-int8"
    existing = [int(p.name) for p in repository.versions(target_model)]
    target = target_model / str(max(existing, default=0) + 1)
    with tempfile.TemporaryDirectory(prefix="modelport-build-") as tmp:
        fp32 = build(name, Path(tmp) / name / "1", runtime="onnx", checks=False)  # quantized below
        _optimize_and_report(lambda progress: run(fp32, sample_calibration(), sample_evaluation(), target_dir=target,
                                                  min_agreement=min_agreement, min_top5=min_top5,
                                                  progress=progress))


@main.command("build-default")
@click.option("--checks/--no-checks", default=True, show_default=True,
              help="Check it at the reduced precisions this CPU runs (bf16, INT8), as `serve`'s first use does. "
                   "--no-checks for an image built on one machine and run on others: it serves at fp32.")
def build_default(checks: bool) -> None:
    """Build the default model (EfficientNet-Lite0, ImageNet) into the cache and print its path."""
    from modelport.packaged import default_model

    if checks:
        load_model(None)
    else:
        default_model.ensure_default_model(checks=False)
    click.echo(default_model.default_model_dir())


@main.command()
@click.argument("source", required=False)
@click.option("--repository", "repository_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A model repository (<name>/<version>/...) to serve and follow: the same as giving it as SOURCE.")
@click.option("--watch/--no-watch", default=True, show_default=True,
              help="Follow the repository: load new versions and unload removed ones while serving.")
@click.option("--admin-token", envvar="MODELPORT_ADMIN_TOKEN", default=None,
              help="Enables the V2 repository API (index, load, unload) for requests bearing this token. "
                   "Also read from $MODELPORT_ADMIN_TOKEN.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; 0.0.0.0 to serve other machines.")
@click.option("--port", "-p", type=int, default=12480, show_default=True)
@click.option("--zmq-port", type=int, default=None, help="Also serve the same models over ZeroMQ on this port (e.g. 12490).")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=None, help="Override every bundle's [serving] max_batch_size.")
@click.option("--max-delay-ms", type=click.FloatRange(min=0), default=None, help="Longest a request waits for batch companions.")
@click.option("--max-queue-size", type=click.IntRange(min=1), default=None, help="Requests waiting per model before 503.")
@click.option("--concurrent-batches", type=click.IntRange(min=1), default=None,
              help="Batches a model runs at once. Default: 2 for ONNX models up to 100 MB on a CPU of 2+ cores "
                   "without a latency SLO, else 1. Above 1, a lone batch still runs on every core; under load, "
                   "batches run side by side on a thin runtime session of cores / N threads, each at most "
                   "max_batch_size / N rows (README, BENCHMARKS.md).")
@click.option("--latency-slo-ms", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Keep p99 latency under this: the batcher picks batch sizes and waits itself, and refuses at once "
                   "(503) what would miss it. Overrides every bundle's [serving] latency_slo_ms.")
@click.option("--timeout-ms", type=click.FloatRange(min=1), default=30_000, show_default=True,
              help="Default request deadline; the X-Request-Timeout-Ms header may lower it.")
@click.option("--max-body-mb", type=click.FloatRange(min=0.001), default=16, show_default=True, help="Request body limit (413 above).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=None, help="Largest image accepted, in pixels (default 40 MP).")
@click.option("--max-images-per-request", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images (batch rows) one request may carry (413 above); a request runs as batches of at most "
                   "max_batch_size.")
@click.option("--exit-timeout-s", type=click.FloatRange(min=0), default=30, show_default=True,
              help="On SIGTERM, longest wait for in-flight requests.")
@click.option("--read-timeout-s", type=click.FloatRange(min=0.1), default=30, show_default=True,
              help="A request's headers and body must arrive within this (slow clients are cut off).")
@click.option("--write-timeout-s", type=click.FloatRange(min=0.1), default=30, show_default=True,
              help="A client that reads none of its responses for this long is cut off.")
@click.option("--runtime-threads", type=click.IntRange(min=1), default=None, help="Threads per model (default: one per core).")
@click.option("--device", default=None, help="cpu, cuda, cuda:N or auto (GPU if there is one): where every model's batches "
                                             "run (default: each bundle's [serving] device, cpu). Decoding stays on the CPU.")
@click.option("--runtime", "engine", type=click.Choice(ENGINE_CHOICES), default=None,
              help="The engine of every ONNX model: onnxruntime, openvino (pip install 'modelport[openvino]'), or auto: "
                   "each timed at load, the fastest kept (default: each bundle's [serving] runtime, auto).")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="fp32 (exact answers), bf16 (OpenVINO, only where the CPU computes it natively), int8 (an INT8 "
                   "version from `modelport optimize`), or auto: a reduced precision only where a gate on real images "
                   "backs it (default: each bundle's [serving] precision, auto).")
@click.option("--model-name", default=None, help="Serve a single bundle or model directory under this name "
                                                  "(KServe passes the InferenceService's name).")
@click.option("--cluster", default=None, envvar="MODELPORT_CLUSTER",
              help="Join a cluster: etcd://HOST:PORT/NAME. Registers once every model is ready (see `modelport balance`).")
@click.option("--advertise", default=None, help="Host name or address others reach this server at (default: --host).")
@click.option("--lease-ttl-s", type=click.IntRange(min=1), default=3, show_default=True,
              help="With --cluster: the member directory forgets a worker that stops refreshing for this long.")
@click.option("--drain-s", type=click.FloatRange(min=0), default=3.0, show_default=True,
              help="With --cluster, on SIGTERM: keep serving this long after announcing 'draining'.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True)
def serve(source: str | None, repository_dir: Path | None, watch: bool, admin_token: str | None, host: str,
          port: int, zmq_port: int | None, max_batch_size, max_delay_ms, max_queue_size, concurrent_batches, latency_slo_ms,
          timeout_ms,
          max_body_mb, max_pixels, max_images_per_request, exit_timeout_s, read_timeout_s, write_timeout_s, runtime_threads,
          device, engine, precision, model_name, cluster, advertise, lease_ttl_s, drain_s, log_level) -> None:
    """Serve SOURCE over HTTP: a repository (<name>/<version>/...), a model directory or a bundle.

    A repository is followed while serving (new versions load, then take traffic; removed ones
    drain and unload). Without SOURCE, serves the default model (efficientnet-lite0) on
    127.0.0.1:12480.
    """
    from modelport.packaged import default_model
    from modelport.repository import layout as repository
    from modelport.repository.bundle import CONFIG_FILE
    from modelport.errors import NotFound
    from modelport.repository.layout import check_name
    from modelport.server.config import BatchingOverrides, ServerConfig
    from modelport.server.run import serve as run_server

    if source and repository_dir:
        raise click.UsageError("give SOURCE or --repository, not both")
    if device is not None:
        from modelport.runtime.device import Device

        Device.parse(device)  # a typo is an error now, not after the models load
    if cluster is not None:
        from modelport.cluster.etcd import client_library
        from modelport.cluster.members import ClusterURL

        ClusterURL.parse(cluster)  # a malformed URL is an error now, not after the models load
        client_library()
    root = repository_dir or (Path(source) if source else None)
    bundles = None
    if root is None:
        def bundles():
            return {check_name(model_name or default_model.NAME): default_model.ensure_default_model()}
    elif not root.is_dir():
        raise NotFound(f"{root}: no such directory")
    elif model_name is not None and not ((root / CONFIG_FILE).is_file() or repository.versions(root)):
        raise click.UsageError("--model-name names a single bundle or model directory; a repository names its "
                               "models by their directories")
    elif (root / CONFIG_FILE).is_file() or repository.versions(root):
        found = repository.scan(root)  # one bundle, or one model's highest version: served as is
        if model_name is not None:
            found = {check_name(model_name): path for path in found.values()}

        def bundles():
            return found
    config = ServerConfig(
        host=host, port=port, zmq_port=zmq_port, max_body_bytes=int(max_body_mb * 1024 * 1024), timeout_ms=timeout_ms,
        exit_timeout_s=exit_timeout_s, read_timeout_s=read_timeout_s, write_timeout_s=write_timeout_s,
        runtime_threads=runtime_threads, device=device, engine=engine, precision=precision, log_level=log_level,
        max_images_per_request=max_images_per_request, cluster=cluster, advertise=advertise, lease_ttl_s=lease_ttl_s, drain_s=drain_s,
        batching=BatchingOverrides(max_batch_size, max_delay_ms, max_queue_size, latency_slo_ms,
                                   concurrent_batches), admin_token=admin_token,
        **({"max_pixels": max_pixels} if max_pixels else {}),
    )
    if bundles is None:
        run_server(None, config, repository=root, watch=watch)
    else:
        run_server(bundles, config)


def _cluster_url(ctx, param, value):
    from modelport.cluster.members import ClusterURL

    if value is None:
        return None
    return ClusterURL.parse(value)


CLUSTER_OPTION = click.option("--cluster", required=True, envvar="MODELPORT_CLUSTER", callback=_cluster_url,
                              help="The cluster's member directory in etcd: etcd://HOST:PORT/NAME (also $MODELPORT_CLUSTER).")


@main.command()
@CLUSTER_OPTION
@click.option("--host", default="127.0.0.1", show_default=True, help="Address HAProxy listens on.")
@click.option("--port", "-p", type=click.IntRange(1, 65535), default=12480, show_default=True)
@click.option("--stats-port", type=click.IntRange(1, 65535), default=12488, show_default=True,
              help="HAProxy's stats page (/) and Prometheus metrics (/metrics).")
@click.option("--retry-body-kb", type=click.IntRange(16, 16384), default=256, show_default=True,
              help="Requests up to this size are replayed on another worker if theirs fails (HAProxy's buffer).")
@click.option("--haproxy-socket", type=click.Path(dir_okay=False), default=None,
              help="Drive an HAProxy you already run (its admin socket) instead of starting one.")
@click.option("--backend", default="workers", show_default=True, help="With --haproxy-socket: the backend to fill.")
@click.option("--threads", type=click.IntRange(1, 64), default=1, show_default=True,
              help="HAProxy threads. One thread proxies far more requests than models answer, and had the "
                   "shortest hop (docs/decisions.md).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True)
def balance(cluster, host: str, port: int, stats_port: int, retry_body_kb: int, haproxy_socket: str | None,
            backend: str, threads: int | None, log_level: str) -> None:
    """Run HAProxy in front of the cluster's workers, following the member directory (no reloads)."""
    import asyncio
    import logging
    import signal
    import tempfile

    from modelport.cluster.balancer import Balancer
    from modelport.cluster.etcd import client_library
    from modelport.cluster.haproxy import HAProxyConfig, HAProxyProcess, RuntimeAPI

    client_library()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if haproxy_socket:
        haproxy, api = None, RuntimeAPI(haproxy_socket, backend)
    else:
        directory = Path(tempfile.mkdtemp(prefix="modelport-haproxy-"))
        haproxy = HAProxyProcess(HAProxyConfig(host, port, stats_port, bufsize=retry_body_kb * 1024,
                                                   threads=threads), directory)
        api = RuntimeAPI(haproxy.admin_socket)

    async def run() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await Balancer(cluster, api, haproxy).run()
        except asyncio.CancelledError:
            pass

    asyncio.run(run())


@main.command()
@CLUSTER_OPTION
@click.option("--model", "-m", "model_name", required=True, help="The model to find workers for.")
@click.option("--version", default=None, help="A version number or label (default: any READY version).")
@click.option("--transport", type=click.Choice(["http", "zmq"]), default="http", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="The workers as a JSON list, best first.")
def resolve(cluster, model_name: str, version: str | None, transport: str, as_json: bool) -> None:
    """The two-step lookup for scripts: the workers that serve MODEL now, least loaded first."""
    import asyncio
    from dataclasses import asdict

    from modelport.cluster.discovery import Discovery

    async def look_up():
        discovery = Discovery(cluster, transport=transport, connect=lambda address: None, timeout_s=5)
        try:
            await discovery.start()
            return discovery.candidates(model_name, version)
        finally:
            await discovery.close()

    members = sorted(asyncio.run(look_up()), key=lambda m: (m.total_load, m.id))
    if as_json:
        click.echo(json.dumps([asdict(m) for m in members]))
        return
    for m in members:
        click.echo(f"{m.http if transport == 'http' else m.zmq}  {m.id}  load {m.total_load}")


@main.command()
@CLUSTER_OPTION
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to answer on.")
@click.option("--port", "-p", type=click.IntRange(1, 65535), default=5353, show_default=True)
@click.option("--domain", default="modelport", show_default=True,
              help="Names are <service>.<cluster>.<domain>, e.g. _modelport._tcp.prod.modelport")
@click.option("--ttl-s", type=click.IntRange(0, 3600), default=1, show_default=True, help="TTL of every answer.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True)
def dns(cluster, host: str, port: int, domain: str, ttl_s: int, log_level: str) -> None:
    """Answer DNS SRV queries for the cluster's workers (dig, dnspython, HAProxy's resolvers)."""
    import asyncio
    import logging
    import signal

    from modelport.cluster.dns import dns_library, serve_dns

    dns_library()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def run() -> None:
        task = asyncio.current_task()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
        try:
            await serve_dns(cluster, host=host, port=port, domain=domain, ttl_s=ttl_s)
        except asyncio.CancelledError:
            pass

    asyncio.run(run())


@main.group()
def cluster() -> None:
    """Look at a cluster's member directory (etcd)."""


@cluster.command("ls")
@CLUSTER_OPTION
@click.option("--json", "as_json", is_flag=True, help="One JSON document: members and skipped keys.")
def cluster_ls(cluster, as_json: bool) -> None:
    """List the workers registered in the cluster: address, models, state, load, age."""
    import asyncio

    from modelport.cluster.members import Member, age_s

    async def read():
        etcd = cluster.etcd()
        try:
            return await etcd.list(cluster.prefix)
        finally:
            await etcd.close()

    values, _ = asyncio.run(read())
    members, skipped = [], {}
    for key, raw in sorted(values.items()):
        try:
            members.append(Member.from_json(raw))
        except ValueError as exc:
            skipped[key] = str(exc)
    if as_json:
        from dataclasses import asdict

        click.echo(json.dumps({"cluster": str(cluster), "members": [asdict(m) for m in members], "skipped": skipped}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{cluster}: {len(members)} worker(s)")
    for column in ("worker", "address", "models", "state", "load", "age"):
        table.add_column(column)
    for m in members:
        models = ", ".join(f"{name} {'/'.join(info.get('versions', []))}" for name, info in sorted(m.models.items()))
        address = m.http + (f"  {m.zmq}" if m.zmq else "")
        table.add_row(m.id, address, models or "-", m.state, f"{m.load.get('in_flight', 0)} + {m.load.get('queued', 0)}",
                      f"{age_s(m):.0f} s")
    Console().print(table)
    for key, why in skipped.items():
        click.echo(f"skipped {key}: {why}", err=True)


@main.command()
@click.argument("model_ref", metavar="MODEL")
@click.option("--precision", type=click.Choice(["int8", "bf16"]), default="int8", show_default=True,
              help="int8: a quantized graph, calibrated on --calibration. bf16: the same graph, served at bf16 by "
                   "OpenVINO where the CPU computes bf16 natively (checked on --eval, or on --calibration's images).")
@click.option("--runtime", "engine", type=click.Choice(ENGINE_CHOICES), default="auto", show_default=True,
              help="The engine the gate checks on and the new version runs on; auto: every installed engine, the "
                   "fastest that passes (bf16: OpenVINO).")
@click.option("--calibration", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Images like the ones the model will see (100-500; flat, or in <class>/ folders). Needed for int8.")
@click.option("--eval", "eval_dir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Held-out images for the report; <class>/ folders named after the labels add accuracy. "
                   "Default: the last third of the calibration images.")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=0.995, show_default=True,
              help="Top-1 agreement with fp32 needed on images fp32 is confident about (top-1 >= 0.5).")
@click.option("--min-top5", type=click.FloatRange(0, 1), default=0.99, show_default=True,
              help="Share of the new version's top-1 answers that must be inside fp32's top 5.")
@click.option("--per-tensor", is_flag=True, help="Per-tensor weights instead of per-channel (to compare recipes).")
@click.option("--calibration-method", type=click.Choice(["percentile", "minmax", "entropy"]), default="percentile",
              show_default=True)
@click.option("--max-fp32-layers", type=click.IntRange(min=0), default=8, show_default=True,
              help="At most this many of the most sensitive layers are kept in fp32.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def optimize(model_ref: str, precision: str, engine: str, calibration: Path | None, eval_dir: Path | None,
             min_agreement: float, min_top5: float, per_tensor: bool, calibration_method: str, max_fp32_layers: int,
             as_json: bool) -> None:
    """Make MODEL's next version at a reduced precision (INT8 or bf16), with an accuracy report;
    refuse if answers are lost.

    MODEL is a model directory (its highest version is the source) or a version directory. Exit
    status 1 and nothing written when the new version misses --min-agreement or --min-top5.
    """
    from modelport.packaged import default_model
    from modelport.repository.bundle import load_bundle
    from modelport.folders import find_images, truth_from_labels

    source = default_model.resolve(model_ref)
    evaluation, truth = None, None
    if eval_dir is not None:
        eval_paths, labels = find_images(eval_dir)
        evaluation = [p.read_bytes() for p in eval_paths]
        if labels is not None:
            truth = truth_from_labels(labels, load_bundle(source).labels)
    if precision == "bf16":
        if engine == "onnxruntime":
            raise click.UsageError("--precision bf16 runs on OpenVINO (ONNX Runtime has no bf16 kernels on the CPU)")
        from modelport.optimize import bf16

        if evaluation is None:
            if calibration is None:
                raise click.UsageError("--precision bf16 needs images to check on: --eval (or --calibration)")
            evaluation = [p.read_bytes() for p in find_images(calibration)[0]]
        _optimize_and_report(lambda progress: bf16.optimize(
            source, evaluation, labels=truth, min_agreement=min_agreement, min_top5=min_top5, progress=progress),
            as_json)
        return
    if calibration is None:
        raise click.UsageError("--precision int8 needs --calibration: images like the ones the model will see")
    from modelport.optimize.int8 import CANDIDATE_FP32_LAYERS, optimize as run
    from modelport.optimize.quantize import Recipe

    calibration_paths, _ = find_images(calibration)
    recipe = Recipe(per_channel=not per_tensor, calibration=calibration_method)
    candidates = [k for k in CANDIDATE_FP32_LAYERS if k <= max_fp32_layers]
    _optimize_and_report(lambda progress: run(
        source, [p.read_bytes() for p in calibration_paths], evaluation, labels=truth, recipe=recipe,
        min_agreement=min_agreement, min_top5=min_top5, candidates=candidates, engine=engine, progress=progress),
        as_json)


def _optimize_and_report(run, as_json: bool = False) -> Path:
    from rich.console import Console

    from modelport.optimize.int8 import Refused

    console = Console(stderr=True)
    try:
        published, report = run(lambda message: console.print(f"[dim]{message}[/dim]"))
    except Refused as exc:
        if as_json:
            click.echo(json.dumps(exc.report.as_dict()))
        console.print(f"[bold red]{exc.message}[/bold red]")
        raise SystemExit(1)
    if as_json:
        click.echo(json.dumps({"bundle": str(published), **report.as_dict()}))
        return published
    _print_report(report, Console())
    click.echo(published)
    return published


def _print_report(report, console) -> None:
    from rich.table import Table

    a = report.agreement
    reduced = report.precision.upper()
    table = Table(title=f"{reduced} on {report.engine} against fp32 on {a.images} held-out images", show_header=False)
    rows = [("recipe", report.recipe),
            ("layers kept in fp32", ", ".join(report.fp32_layers) or "none"),
            ("top-1 agreement, all images", f"{a.top1:.1%}"),
            (f"  on images fp32 is confident about ({a.confident_images})",
             "n/a" if a.top1_confident is None else f"{a.top1_confident:.1%}"),
            (f"  on images with a clear top-1 ({a.clear_images})", "n/a" if a.top1_clear is None else f"{a.top1_clear:.1%}"),
            (f"{reduced} top-1 inside fp32's top 5", f"{a.in_top5:.1%}"),
            ("top-5 overlap", f"{a.top5_overlap:.1%}"),
            ("yardstick: fp32 keeps its own answer after a JPEG q90 re-encode",
             "n/a" if a.jpeg_yardstick is None else f"{a.jpeg_yardstick:.1%}")]
    if a.accuracy_fp32 is not None:
        rows.append((f"accuracy fp32 -> {reduced}", f"{a.accuracy_fp32:.1%} -> {a.accuracy_reduced:.1%}"))
    rows += [(f"speed at batch {s.batch}", f"{s.ratio:.2f} x fp32 ({s.reduced_per_s:.0f} vs {s.fp32_per_s:.0f} img/s)")
             for s in report.speed]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if a.confident_images < 50:
        console.print(f"[yellow]Only {a.confident_images} evaluation images are ones fp32 is confident about: the "
                      f"agreement figures are rough. Give --eval more images of the model's classes.[/yellow]")


@main.command()
@click.argument("url")
@click.option("--images", "images_dir", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
              help="Folder of images to send (flat, or in <class>/ folders), cycled through.")
@click.option("--model", "-m", default="efficientnet-lite0", show_default=True, help="Model (or pipeline) to ask.")
@click.option("--protocol", type=click.Choice(["upload", "v2", "tfserving", "zmq", "discovery"]), default=None,
              help="Default: upload for http://, zmq for zmq://, discovery for etcd://.")
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


@main.group()
def pipeline() -> None:
    """Work with pipelines (cascade, chain, ensemble) in a model repository."""


@pipeline.command("evaluate")
@click.argument("pipeline_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("images", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--reference", default=None,
              help="Model to agree with when IMAGES has no <class>/ folders (a name in the repository, a bundle "
                   "or model directory). Default: the cascade's last step.")
@click.option("--target", "--target-agreement", "target", type=click.FloatRange(0, 1), default=0.99,
              show_default=True, help="Accuracy or agreement the chosen threshold must reach.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Draw cost against accuracy/agreement into this PNG.")
@click.option("--json", "as_json", is_flag=True, help="The report as one JSON document.")
def pipeline_evaluate(pipeline_dir: Path, images: Path, reference: str | None, target: float,
                      plot_path: Path | None, as_json: bool) -> None:
    """Sweep a cascade's threshold over IMAGES: escalated share, accuracy or agreement, cost per image.

    PIPELINE_DIR is <repository>/<name> holding pipeline.toml; its steps are loaded from the same
    repository. IMAGES with <class>/ folders named after the model's labels give accuracy;
    otherwise agreement with --reference.
    """
    from modelport.folders import find_images
    from modelport.pipeline import evaluate as ev
    from modelport.pipeline.config import PIPELINE_FILE, read_pipeline

    config = read_pipeline(pipeline_dir / PIPELINE_FILE)
    root = pipeline_dir.parent
    steps = [load_model(str(_step_dir(root, step.model, step.version)), quiet=True) for step in config.steps]
    reference_model = None
    if reference is not None:
        local = root / reference
        reference_model = load_model(str(local if local.is_dir() else reference), quiet=True)
    paths, labels = find_images(images)
    with _status(f"Running {len(config.steps)} step(s) over {len(paths)} images..."):
        report = ev.evaluate(config, steps, reference_model, [p.read_bytes() for p in paths], labels, target=target)
    if plot_path is not None:
        ev.plot(report, plot_path)
    if as_json:
        click.echo(json.dumps(report.as_dict()))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{pipeline_dir.name}: {report.images} images, {report.measure}")
    for column in ("escalate_below", "escalated", report.measure.split(" ")[0], "ms / image", "cost / accurate"):
        table.add_column(column, justify="right")
    for row in report.rows:
        style = "bold green" if row is report.best else None
        table.add_row(f"{row.threshold:g}", f"{row.escalated:.1%}", f"{row.score:.1%}", f"{row.cost_ms:.2f}",
                      f"{row.relative_cost:.2f}", style=style)
    console = Console()
    console.print(table)
    console.print(f"steps: {', '.join(f'{s.ref} {c:.2f} ms' for s, c in zip(config.steps, report.step_cost_ms))}; "
                  f"accurate model alone: {report.reference_cost_ms:.2f} ms/image, {report.measure} "
                  f"{report.reference_score:.1%}")
    console.print(f"first step's calibration error (ECE, 10 bins): {report.calibration_error:.3f}"
                  + ("  (badly calibrated: its confidence is a poor guide to when to escalate)"
                     if report.calibration_error > 0.1 else ""))
    console.print(ev.verdict(report))
    if plot_path is not None:
        console.print(f"plot: {plot_path}")


@main.group()
def rollout() -> None:
    """Safe rollouts of new versions (a [rollout] table in the model's model.toml): status, promote, abort."""


_server_option = click.option("--url", default="http://127.0.0.1:12480", show_default=True, envvar="MODELPORT_URL",
                              help="The server that runs the rollout.")
_token_option = click.option("--admin-token", envvar="MODELPORT_ADMIN_TOKEN", required=True,
                             help="The server's --admin-token (also read from $MODELPORT_ADMIN_TOKEN).")


@rollout.command("status")
@click.argument("model")
@_server_option
@click.option("--json", "as_json", is_flag=True)
def rollout_status(model: str, url: str, as_json: bool) -> None:
    """The latest rollout of MODEL (a name, or the model's directory in the repository)."""
    _print_rollout(_rollout_call("GET", url, model, ""), as_json)


def _rollout_decision(action: str, summary: str) -> None:
    @rollout.command(action, help=summary)
    @click.argument("model")
    @_server_option
    @_token_option
    def decide(model: str, url: str, admin_token: str) -> None:
        _print_rollout(_rollout_call("POST", url, model, action, admin_token), False)


_rollout_decision("promote", "Promote MODEL's candidate version now, skipping what is left of its judgement.")
_rollout_decision("abort", "Roll MODEL's candidate version back now.")


def _rollout_call(method: str, url: str, model: str, action: str, token: str | None = None) -> dict:
    import httpx

    from modelport.client import _http_error

    name = Path(model).name  # models/flowers -> flowers
    path = f"/v2/models/{name}/rollout" if not action else f"/v2/repository/models/{name}/rollout/{action}"
    headers = {"authorization": f"Bearer {token}"} if token else {}
    response = httpx.request(method, url.rstrip("/") + path, headers=headers, timeout=30)
    if response.status_code != 200:
        raise _http_error(response.status_code, response.content, response.headers)
    return response.json()


def _print_rollout(status: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(status))
        return
    shadow, canary = status["shadow"], status["canary"]
    click.echo(f"{status['model']}: version {status['candidate_version']} against {status['serving_version']}: "
               f"{status['stage'].replace('_', ' ')}" + (f" ({status['reason']})" if status["reason"] else ""))
    click.echo(f"  shadow: {shadow['compared']} compared, agreement {shadow['agreement']:.3f}, {shadow['errors']} "
               f"errors, {shadow['dropped']} dropped (busy), p99 compute ratio {shadow['p99_compute_ratio']}")
    click.echo(f"  canary: {canary['answers']} answers, {canary['errors']} errors, p99 latency ratio "
               f"{canary['p99_latency_ratio']}")


def _step_dir(root: Path, model: str, version: str | None) -> Path:
    from modelport.errors import NotFound
    from modelport.packaged import default_model
    from modelport.pipeline.config import PIPELINE_FILE
    from modelport.repository.model_config import read_model_config

    model_dir = root / model
    if not model_dir.is_dir():
        raise NotFound(f"step {model!r}: no such model in {root}")
    if (model_dir / PIPELINE_FILE).is_file():
        raise NotFound(f"step {model!r} is a pipeline: evaluate a cascade of models")
    if version is None:
        return default_model.resolve(str(model_dir))
    from modelport import untrusted

    number = version if untrusted.ascii_digits(version) else read_model_config(model_dir).labels.get(version)
    if number is None or not (model_dir / str(number)).is_dir():
        raise NotFound(f"step {model}:{version}: no such version in {model_dir}")
    return model_dir / str(number)


def _status(message: str):
    from rich.console import Console

    return Console(stderr=True).status(message)


if __name__ == "__main__":
    main()
