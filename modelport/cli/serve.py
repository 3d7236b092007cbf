"""``modelport serve``: options -> a ``ServerConfig`` and the bundles to serve."""

from __future__ import annotations

from pathlib import Path

import click

from modelport.cli.common import LOG_LEVEL_OPTION
from modelport.runtime.precision import ENGINE_CHOICES, PRECISIONS


def _read_config(ctx: click.Context, param: click.Parameter, path: str | None) -> str | None:
    """``--config FILE``: the ``[server]`` table of a TOML file gives any option's default (its
    flag's name, with ``_`` or ``-``: ``grpc_port = 8001``, ``keys = "keys.toml"``); the command line
    and environment variables still win. Read before the other options, so that they see it."""
    if path is None:
        return None
    import tomllib

    try:
        table = tomllib.loads(Path(path).read_text(encoding="utf-8")).get("server", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise click.BadParameter(f"{path}: {exc}", ctx=ctx, param=param) from None
    if not isinstance(table, dict):
        raise click.BadParameter(f"{path}: [server] must be a table", ctx=ctx, param=param)
    names = {flag[2:].replace("-", "_"): option.name for option in ctx.command.params
             if isinstance(option, click.Option) and option.name != "config"
             for flag in option.opts if flag.startswith("--")}  # --keys -> keys_file
    defaults = {}
    for key, value in table.items():
        name = names.get(key.replace("-", "_"))
        if name is None:
            raise click.BadParameter(f"{path}: [server] has no setting {key!r}; the settings are the options of "
                                     f"`modelport serve`: {', '.join(sorted(names))}", ctx=ctx, param=param)
        defaults[name] = value
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return path


@click.command()
@click.argument("source", required=False)
@click.option("--config", type=click.Path(dir_okay=False), envvar="MODELPORT_CONFIG", is_eager=True,
              expose_value=False, callback=_read_config,
              help="A TOML file whose [server] table sets any of these options (grpc_port = 8001, "
                   "repository = \"models\", ...); the command line wins. Also $MODELPORT_CONFIG.")
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
@click.option("--otlp-endpoint", default=None,
              help="Send traces (OpenTelemetry, OTLP/HTTP) to this receiver, e.g. http://127.0.0.1:4318 "
                   "(also $OTEL_EXPORTER_OTLP_ENDPOINT).")
@click.option("--trace-sample", type=click.FloatRange(0, 1), default=None,
              help="Share of new traces sampled; a request that arrives traced follows its caller (default 0.01).")
@click.option("--grpc-port", type=int, default=None,
              help="Also serve the same models over gRPC (the Open Inference Protocol, Triton's and KServe's) on this port "
                   "(e.g. 8001).")
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
@click.option("--keys", "keys_file", type=click.Path(dir_okay=False), default=None, envvar="MODELPORT_KEYS",
              help="Tenants and their API keys (TOML; `modelport keys new` makes one): every protocol then needs a key, "
                   "and each tenant gets its models, quota and priority class. Re-read on change.")
@click.option("--memory-budget-mb", type=click.FloatRange(min=1), default=None,
              help="Keep models and versions beyond this much memory on disk, loaded on first use; the least "
                   "recently used are unloaded to make room.")
@LOG_LEVEL_OPTION
def serve(source: str | None, repository_dir: Path | None, watch: bool, admin_token: str | None, host: str,
          port: int, zmq_port: int | None, otlp_endpoint: str | None, trace_sample: float | None,
          grpc_port: int | None, max_batch_size, max_delay_ms, max_queue_size, concurrent_batches,
          latency_slo_ms, timeout_ms, max_body_mb, max_pixels, max_images_per_request, exit_timeout_s, read_timeout_s,
          write_timeout_s, runtime_threads, device, engine, precision, model_name, cluster, advertise, lease_ttl_s,
          drain_s, keys_file, memory_budget_mb, log_level) -> None:
    """Serve SOURCE over HTTP: a repository (<name>/<version>/...), a model directory or a bundle.

    A repository is followed while serving (new versions load, then take traffic; removed ones
    drain and unload). Without SOURCE, serves the default model (efficientnet-lite0) on
    127.0.0.1:12480.
    """
    from modelport.errors import NotFound
    from modelport.packaged import default_model
    from modelport.repository import layout as repository
    from modelport.repository.bundle import CONFIG_FILE
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
    if root is None:
        def bundles():
            return {repository.check_name(model_name or default_model.NAME): default_model.ensure_default_model()}
    elif not root.is_dir():
        raise NotFound(f"{root}: no such directory")
    elif model_name is not None and not ((root / CONFIG_FILE).is_file() or repository.versions(root)):
        raise click.UsageError("--model-name names a single bundle or model directory; a repository names its "
                               "models by their directories")
    elif (root / CONFIG_FILE).is_file() or repository.versions(root):
        found = repository.scan(root)  # one bundle, or one model's highest version: served as is
        if model_name is not None:
            found = {repository.check_name(model_name): path for path in found.values()}

        def bundles():
            return found
    else:
        bundles = None  # a repository: followed while serving
    config = ServerConfig(
        host=host, port=port, zmq_port=zmq_port, grpc_port=grpc_port, otlp_endpoint=otlp_endpoint,
        trace_sample=trace_sample, max_body_bytes=int(max_body_mb * 1024 * 1024), timeout_ms=timeout_ms,
        exit_timeout_s=exit_timeout_s, read_timeout_s=read_timeout_s, write_timeout_s=write_timeout_s,
        runtime_threads=runtime_threads, device=device, engine=engine, precision=precision, log_level=log_level,
        max_images_per_request=max_images_per_request, cluster=cluster, advertise=advertise, lease_ttl_s=lease_ttl_s,
        drain_s=drain_s, admin_token=admin_token, keys_file=keys_file, memory_budget_mb=memory_budget_mb,
        batching=BatchingOverrides(max_batch_size, max_delay_ms, max_queue_size, latency_slo_ms, concurrent_batches),
        **({"max_pixels": max_pixels} if max_pixels else {}),
    )
    if bundles is None:
        run_server(None, config, repository=root, watch=watch)
    else:
        run_server(bundles, config)
