"""The cluster's commands: ``balance`` (HAProxy), ``autoscale``, ``resolve``, ``dns`` and ``cluster ls``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from modelport.cli.common import LOG_LEVEL_OPTION


def _cluster_url(ctx, param, value):
    from modelport.cluster.members import ClusterURL

    if value is None:
        return None
    return ClusterURL.parse(value)


CLUSTER_OPTION = click.option("--cluster", required=True, envvar="MODELPORT_CLUSTER", callback=_cluster_url,
                              help="The cluster's member directory in etcd: etcd://HOST:PORT/NAME (also $MODELPORT_CLUSTER).")


@click.command()
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
@LOG_LEVEL_OPTION
def balance(cluster, host: str, port: int, stats_port: int, retry_body_kb: int, haproxy_socket: str | None,
            backend: str, threads: int | None, log_level: str) -> None:
    """Run HAProxy in front of the cluster's workers, following the member directory (no reloads)."""
    import tempfile

    from modelport.cluster.balancer import Balancer
    from modelport.cluster.etcd import client_library
    from modelport.cluster.haproxy import HAProxyConfig, HAProxyProcess, RuntimeAPI

    client_library()
    _log(log_level)
    if haproxy_socket:
        haproxy, api = None, RuntimeAPI(haproxy_socket, backend)
    else:
        directory = Path(tempfile.mkdtemp(prefix="modelport-haproxy-"))
        haproxy = HAProxyProcess(HAProxyConfig(host, port, stats_port, bufsize=retry_body_kb * 1024, threads=threads),
                                 directory)
        api = RuntimeAPI(haproxy.admin_socket)
    _run_until_signalled(lambda: Balancer(cluster, api, haproxy).run())


@click.command(options_metavar="[OPTIONS] --")
@CLUSTER_OPTION
@click.option("--min", "min_workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Workers kept running however light the load (at least one: the load is measured on them).")
@click.option("--max", "max_workers", type=click.IntRange(min=1), required=True, help="Most workers ever running.")
@click.option("--target-in-flight", type=click.FloatRange(min=0, min_open=True), required=True,
              help="Ongoing requests (running or waiting) one worker should carry; workers wanted = "
                   "ceil(fleet's load / this).")
@click.option("--up-delay-s", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Start workers only once more are wanted for this long.")
@click.option("--down-delay-s", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Stop workers only once fewer are wanted for this long.")
@click.option("--interval-s", type=click.FloatRange(min=0.05), default=0.5, show_default=True,
              help="Between two measurements of the workers' /metrics.")
@click.option("--look-back-s", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="The load is the mean of the measurements of this last window.")
@click.option("--stop-timeout-s", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="A worker sent SIGTERM (to drain) is SIGKILLed if it runs this much longer.")
@LOG_LEVEL_OPTION
@click.argument("worker_command", nargs=-1, required=True, type=click.UNPROCESSED)
def autoscale(cluster, min_workers: int, max_workers: int, target_in_flight: float, up_delay_s: float,
              down_delay_s: float, interval_s: float, look_back_s: float, stop_timeout_s: float, log_level: str,
              worker_command: tuple[str, ...]) -> None:
    """Run WORKER_COMMAND as --min to --max local workers, as many as their load asks for.

    \b
      modelport autoscale --cluster etcd://127.0.0.1:2379/prod --min 1 --max 4 \\
          --target-in-flight 8 -- modelport serve models/ --port 0

    Every --interval-s, each worker's /metrics gives its ongoing requests (running or waiting); workers
    wanted = ceil(mean load over --look-back-s / --target-in-flight), within --min and --max
    (Ray Serve's rule). More start once more have been wanted for --up-delay-s; the least busy
    are stopped once fewer have been wanted for --down-delay-s. A stopped worker gets SIGTERM and
    drains (announces 'draining', serves on for its --drain-s, finishes what is in flight). A worker
    that dies is replaced. SIGTERM or ^C drains and stops every worker, then exits 0.

    The worker command must join the cluster (it is given $MODELPORT_CLUSTER, so `modelport serve`
    needs no --cluster), take a free port (--port 0), and be the server process itself (not a
    shell around it): its pid is how the autoscaler finds it in the member directory.
    """
    import asyncio
    import shutil
    import signal

    from modelport.cluster.autoscale import AutoscaleConfig, Autoscaler
    from modelport.cluster.etcd import client_library

    client_library()
    if shutil.which(worker_command[0]) is None:
        raise click.UsageError(f"worker command not found: {worker_command[0]!r}")
    config = AutoscaleConfig(min_workers, max_workers, target_in_flight, up_delay_s, down_delay_s, interval_s,
                             look_back_s, stop_timeout_s)
    _log(log_level)

    async def run() -> None:
        scaler = Autoscaler(cluster, list(worker_command), config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, scaler.stop)  # the first drains the workers; a second hurries them
        await scaler.run()

    asyncio.run(run())


@click.command()
@CLUSTER_OPTION
@click.option("--model", "-m", "model_name", required=True, help="The model to find workers for.")
@click.option("--version", default=None, help="A version number or label (default: any READY version).")
@click.option("--transport", type=click.Choice(["http", "zmq", "grpc"]), default="http", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="The workers as a JSON list, best first.")
def resolve(cluster, model_name: str, version: str | None, transport: str, as_json: bool) -> None:
    """The two-step lookup for scripts: the workers that serve MODEL now, least loaded first."""
    import asyncio
    from dataclasses import asdict

    from modelport.cluster.lookup import ask_loads, find_workers

    members = asyncio.run(find_workers(cluster, model_name, version, transport))
    if as_json:
        click.echo(json.dumps([asdict(m) for m in members]))
        return
    loads = asyncio.run(ask_loads(members))
    for m in members:
        load = loads[m.id].in_flight if loads[m.id] else "?"
        click.echo(f"{ {'http': m.http, 'zmq': m.zmq, 'grpc': m.grpc}[transport]}  {m.id}  load {load}")


@click.command()
@CLUSTER_OPTION
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to answer on.")
@click.option("--port", "-p", type=click.IntRange(1, 65535), default=5353, show_default=True)
@click.option("--domain", default="modelport", show_default=True,
              help="Names are <service>.<cluster>.<domain>, e.g. _modelport._tcp.prod.modelport")
@click.option("--ttl-s", type=click.IntRange(0, 3600), default=1, show_default=True, help="TTL of every answer.")
@LOG_LEVEL_OPTION
def dns(cluster, host: str, port: int, domain: str, ttl_s: int, log_level: str) -> None:
    """Answer DNS SRV queries for the cluster's workers (dig, dnspython, HAProxy's resolvers)."""
    from modelport.cluster.dns import dns_library, serve_dns

    dns_library()
    _log(log_level)
    _run_until_signalled(lambda: serve_dns(cluster, host=host, port=port, domain=domain, ttl_s=ttl_s))


@click.group()
def cluster() -> None:
    """Look at a cluster's member directory (etcd)."""


@cluster.command("ls")
@CLUSTER_OPTION
@click.option("--json", "as_json", is_flag=True, help="One JSON document: members and skipped keys.")
def cluster_ls(cluster, as_json: bool) -> None:
    """List the workers registered in the cluster: address, models, state, load (asked of each
    worker), age."""
    import asyncio

    from modelport.cluster.lookup import ask_loads, read_members
    from modelport.cluster.members import age_s

    members, skipped = asyncio.run(read_members(cluster))
    loads = asyncio.run(ask_loads(members))
    if as_json:
        from dataclasses import asdict

        listed = [dict(asdict(m), load=loads[m.id].to_wire() if loads[m.id] else None) for m in members]
        click.echo(json.dumps({"cluster": str(cluster), "members": listed, "skipped": skipped}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{cluster}: {len(members)} worker(s)")
    for column in ("worker", "address", "models", "state", "load", "age"):
        table.add_column(column)
    for m in members:
        models = ", ".join(f"{name} {'/'.join(info.get('versions', []))}" for name, info in sorted(m.models.items()))
        address = m.http + (f"  {m.zmq}" if m.zmq else "")
        load = loads[m.id]
        table.add_row(m.id, address, models or "-", m.state, f"{load.in_flight} + {load.queued}" if load else "?",
                      f"{age_s(m):.0f} s")
    Console().print(table)
    for key, why in skipped.items():
        click.echo(f"skipped {key}: {why}", err=True)


def _log(level: str) -> None:
    import logging

    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _run_until_signalled(start) -> None:
    """Run the coroutine ``start()`` makes until it ends or SIGTERM / SIGINT cancels it."""
    import asyncio
    import signal

    async def run() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await start()  # made inside the running loop: a Balancer's etcd client belongs to it
        except asyncio.CancelledError:
            pass

    asyncio.run(run())
