"""Load in-band (issue 27): every answer carries the worker's load, on HTTP, gRPC and ZeroMQ, and
the worker's key in etcd changes only when what the worker is changes; at steady load its only
etcd traffic is the lease keep-alive. Real etcd (watched with etcdctl), a real worker, real load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
import zmq

from modelport.cluster.members import ClusterURL
from modelport.protocol import grpc as codec
from modelport.protocol import wire
from modelport.protocol.load import HEADER, Load, from_text, from_wire
from modelport.server.cluster import worker_id
from servers import free_port, wait_until
from test_slo import cost_bundle

STEADY_S = float(os.environ.get("MODELPORT_STEADY_S", "7"))  # the figure: 60 (BENCHMARKS.md)
PIXELS = np.zeros((1, 8, 8, 3), np.uint8)


def test_the_load_text_round_trips_and_anything_else_is_no_report():
    assert from_text(Load(3, 1).to_text()) == Load(3, 1)
    assert Load(3, 1).to_text() == "TEXT named_metrics.in_flight=3, named_metrics.queued=1"
    assert from_text("TEXT cpu_utilization=0.5, named_metrics.queued=2.0, named_metrics.other=x") == Load(0, 2)
    for bad in (None, "", "JSON {}", "TEXT cpu_utilization=0.5", "TEXT named_metrics.in_flight=-1",
                "TEXT named_metrics.in_flight=lots", "TEXT named_metrics.in_flight=1e20", "TEXT " + "a" * 2000):
        assert from_text(bad) is None, bad
    assert from_wire(Load(2, 5).to_wire()) == Load(2, 5)
    for bad in (None, [], {"in_flight": True}, {"in_flight": -1}, {"queued": "3"}, {"in_flight": 10**12}):
        assert from_wire(bad) is None, bad


def _etcdctl_watch(url: str) -> tuple[subprocess.Popen, list[str]]:
    """``etcdctl watch`` on the cluster's prefix, its output lines collected as they come."""
    cluster = ClusterURL.parse(url)
    proc = subprocess.Popen(["etcdctl", f"--endpoints=http://{cluster.host}:{cluster.port}", "watch", "--prefix",
                             cluster.prefix], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


def _in_background(url: str, count: int) -> list[threading.Thread]:
    """``count`` slow requests at once (one runs, the rest queue)."""
    def one() -> None:
        with httpx.Client(timeout=30) as client:
            body = json.dumps({"inputs": [{"name": "image", "shape": [1, 8, 8, 3], "datatype": "UINT8",
                                           "data": PIXELS.ravel().tolist()}]})
            assert client.post(url + "/v2/models/cost/infer", content=body).status_code == 200

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def test_every_answer_reports_the_load_and_the_key_never_changes_with_it(cluster, tmp_path):
    cost_bundle(tmp_path / "repo" / "cost" / "1", "0 0.5", max_batch_size=1, max_delay_ms=0)
    zmq_port, grpc_port = free_port(), free_port()
    worker = cluster.start_worker("--zmq-port", str(zmq_port), "--grpc-port", str(grpc_port), repo=tmp_path / "repo")
    key = ClusterURL.parse(cluster.url).key(worker_id(worker.port))
    watch, lines = _etcdctl_watch(cluster.url)
    time.sleep(0.5)  # the watch is in place
    registered = cluster.members()[worker_id(worker.port)]

    def http_load() -> Load | None:
        return from_text(httpx.get(worker.url + "/v2/health/live", timeout=5).headers.get(HEADER))

    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.RCVTIMEO, 5000)
    socket.connect(f"tcp://127.0.0.1:{zmq_port}")
    messages, stubs = codec.messages()
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    try:
        assert http_load() == Load(0, 0)
        started = time.monotonic()
        # Load that varies for STEADY_S: 4, then 1, then 6 requests at a time, and idle between.
        for count in (4, 1, 6):
            threads = _in_background(worker.url, count)
            if count == 4:  # while 4 are there (one running, three queued), every protocol says so
                wait_until(lambda: http_load() == Load(4, 3), 5, every_s=0.02, what="4 in flight, 3 queued over HTTP")
                _, call = stubs.GRPCInferenceServiceStub(channel).ServerLive.with_call(messages.ServerLiveRequest())
                assert from_text(dict(call.trailing_metadata())[HEADER]).in_flight >= 3
                socket.send(wire.pack({"id": 1, "op": "ping"}))
                assert from_wire(wire.unpack(socket.recv())["load"]).in_flight >= 3
                listed = subprocess.run([sys.executable, "-m", "modelport", "cluster", "ls", "--cluster", cluster.url,
                                         "--json"], capture_output=True, text=True, check=True, timeout=30)
                load = json.loads(listed.stdout)["members"][0]["load"]  # asked of the worker, not of etcd
                assert load["in_flight"] >= 1, load  # some of the 4 are still there after the command started
            for thread in threads:
                thread.join()
            time.sleep(max(0.0, min(1.0, STEADY_S / 3 - (time.monotonic() - started) / 3)))
        while time.monotonic() - started < STEADY_S:  # the rest of the window: one request at a time
            for thread in _in_background(worker.url, 1):
                thread.join()
        assert http_load() == Load(0, 0)
        elapsed = time.monotonic() - started
        during = [line for line in lines if line.strip() in ("PUT", "DELETE")]
        assert cluster.members()[worker_id(worker.port)] == registered
        # The watch does see what the worker is: stopping publishes "draining", then the key goes.
        worker.proc.terminate()
        worker.proc.wait(30)
        wait_until(lambda: [line.strip() for line in lines if line.strip() in ("PUT", "DELETE")][-2:] == ["PUT", "DELETE"],
                   5, what="draining, then gone, seen by the watch")
    finally:
        socket.close(linger=0)
        context.term()
        channel.close()
        watch.terminate()
        watch.wait(5)
    assert elapsed > 2 * 3  # two lease TTLs (3 s) and more: the lease was kept alive throughout
    assert during == [], lines  # 0 rewrites while the load varied
    assert "load" not in json.loads(lines[lines.index("PUT\n") + 2])  # the draining value, as written
    print(f"{elapsed:.1f} s of varying load: 0 writes to {key}")


@pytest.mark.parametrize("transport", ["http", "zmq"])
def test_discovery_counts_the_requests_other_clients_hold_at_a_worker(cluster, tmp_path, transport):
    """The worker's report with its answer feeds the client's choice: the requests there besides
    the client's own (those it counts itself)."""
    import asyncio

    from modelport import AsyncClient

    cost_bundle(tmp_path / "repo" / "cost" / "1", "0 0.5", max_batch_size=1, max_delay_ms=0)
    extra = ("--zmq-port", str(free_port())) if transport == "zmq" else ()
    worker = cluster.start_worker(*extra, repo=tmp_path / "repo")

    async def run():
        async with AsyncClient(cluster.url, model="cost", transport=transport, timeout_s=30) as client:
            await client.infer("cost", {"image": PIXELS})
            endpoint = next(iter(client.discovery.endpoints.values()))
            assert endpoint.others == 0 and endpoint.client.load == Load(0, 0)
            ours = asyncio.ensure_future(client.infer("cost", {"image": PIXELS}))
            await asyncio.sleep(0.1)  # ours is running; 3 of another client's arrive and queue
            others = await asyncio.to_thread(lambda: _in_background(worker.url, 3))
            await ours
            # 3 there besides ours; 2 or 3 of them waiting (the next may have started already)
            assert endpoint.client.load.in_flight == 3 and endpoint.client.load.queued >= 2, endpoint.client.load
            assert endpoint.others == 3
            # Two of ours and nobody else's: the report counts our other one, the client takes it away.
            await asyncio.gather(*(asyncio.to_thread(t.join) for t in others))
            await asyncio.gather(client.infer("cost", {"image": PIXELS}), client.infer("cost", {"image": PIXELS}))
            assert endpoint.others == 0

    asyncio.run(run())
