"""The cluster's commands: ``balance`` (HAProxy), ``resolve``, ``dns`` and ``cluster ls``."""

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

    from modelport.cluster.lookup import find_workers

    members = asyncio.run(find_workers(cluster, model_name, version, transport))
    if as_json:
        click.echo(json.dumps([asdict(m) for m in members]))
        return
    for m in members:
        click.echo(f"{ {'http': m.http, 'zmq': m.zmq, 'grpc': m.grpc}[transport]}  {m.id}  load {m.total_load}")


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
    """List the workers registered in the cluster: address, models, state, load, age."""
    import asyncio

    from modelport.cluster.lookup import read_members
    from modelport.cluster.members import age_s

    members, skipped = asyncio.run(read_members(cluster))
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
