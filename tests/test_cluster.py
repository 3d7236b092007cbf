"""Many workers: real etcd, real HAProxy (through ``modelport balance``), real worker processes
that get SIGKILLed, SIGSTOPped and restarted, under continuous load through the balancer."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx

from cluster import TTL_S, EtcdServer, Load, put_raw, registry
from modelport.server.cluster import worker_id
from servers import Server, free_port, wait_until


def test_three_workers_register_share_traffic_and_are_listed(cluster):
    workers = [cluster.start_worker() for _ in range(3)]
    balancer = cluster.start_balancer()
    ids = {worker_id(w.port) for w in workers}
    wait_until(lambda: set(balancer.servers()) == ids, 5, what="HAProxy has the 3 workers")
    seen = set()
    with httpx.Client(base_url=balancer.url, timeout=10) as client:
        for i in range(30):
            reply = client.get("/v2")
            assert reply.status_code == 200
            assert reply.json()["worker"] == reply.headers["x-modelport-worker"]
            seen.add(reply.headers["x-modelport-worker"])
    assert seen == ids
    listed = subprocess.run([sys.executable, "-m", "modelport", "cluster", "ls", "--cluster", cluster.url, "--json"],
                            capture_output=True, text=True, check=True)
    members = {m["id"]: m for m in json.loads(listed.stdout)["members"]}
    assert set(members) == ids
    for w in workers:
        m = members[worker_id(w.port)]
        assert m["http"] == f"http://127.0.0.1:{w.port}" and m["state"] == "ready"
        assert m["models"] == {"tiny": {"versions": ["1"], "labels": {}}}
    table = subprocess.run([sys.executable, "-m", "modelport", "cluster", "ls", "--cluster", cluster.url],
                           capture_output=True, text=True, check=True).stdout
    assert all(i in table for i in ids) and "ready" in table


def test_port_0_advertises_the_real_ports(cluster, cluster_repo, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "modelport", "serve", str(cluster_repo), "--port", "0",
                             "--zmq-port", "0", "--cluster", cluster.url], stdout=open(tmp_path / "w.log", "wb"),
                            stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: len(cluster.members()) == 1, 30, every_s=0.1, what="registration")
        (member,) = cluster.members().values()
        assert member.http_port > 0 and member.zmq and not member.zmq.endswith(":0")
        reply = httpx.get(member.http + "/v2")
        assert reply.json()["worker"] == member.id == worker_id(member.http_port)
        from modelport import Client

        with Client("zmq://" + member.zmq.removeprefix("tcp://")) as client:
            assert client.ping()
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_sigkill_under_load_loses_no_request_and_the_worker_leaves(cluster):
    workers = [cluster.start_worker() for _ in range(3)]
    balancer = cluster.start_balancer()
    wait_until(lambda: len(balancer.servers()) == 3, 5, what="3 servers")
    load = Load(balancer.url)
    time.sleep(1)
    victim = workers[0]
    victim_id = worker_id(victim.port)
    killed = time.monotonic()
    victim.proc.send_signal(signal.SIGKILL)
    gone_after = wait_until(lambda: victim_id not in cluster.members(), TTL_S + 3, what="key gone")
    wait_until(lambda: victim_id not in balancer.servers(), 5, what="HAProxy server removed")
    removed_after = time.monotonic() - killed
    time.sleep(1)
    load.stop()
    assert gone_after <= TTL_S + 1, gone_after
    assert not load.failed(), (load.failed()[:5], load.errors[:5])
    assert len(load.results) > 100
    assert victim_id not in load.workers_since(killed + removed_after)
    assert len(load.workers_since(killed + removed_after)) == 2


def test_rolling_restart_of_every_worker_has_zero_non_2xx(cluster):
    for _ in range(3):
        cluster.start_worker()
    balancer = cluster.start_balancer()
    wait_until(lambda: len(balancer.servers()) == 3, 5, what="3 servers")
    load = Load(balancer.url)
    wait_until(lambda: len(load.workers_since(0)) == 3, 5, what="traffic on the first 3 workers")
    for old in list(cluster.workers[:3]):
        old_id = worker_id(old.port)
        old.signal(signal.SIGTERM)
        assert old.proc.wait(30) == 0
        assert old_id not in cluster.members()  # revoked on the way out, not left to expire
        new = cluster.start_worker()
        wait_until(lambda: balancer.servers().get(worker_id(new.port)) == "UP", 5, what="new worker UP")
    wait_until(lambda: len(load.workers_since(0)) == 6, 5, what="every new worker answered too")
    load.stop()
    assert not load.failed(), (load.failed()[:5], load.errors[:5])
    assert set(cluster.members()) == {worker_id(w.port) for w in cluster.workers[3:]}
    log = balancer.log.read_text()
    assert "draining worker" in log and "removed worker" in log


def test_a_new_worker_takes_traffic_within_a_second_of_registering(cluster):
    for _ in range(2):
        cluster.start_worker()
    balancer = cluster.start_balancer()
    load = Load(balancer.url, clients=4)
    fourth = cluster.start_worker(wait=False)
    fourth_id = worker_id(fourth.port)
    wait_until(lambda: fourth_id in cluster.members(), 30, every_s=0.01, what="registration")
    registered = time.monotonic()
    wait_until(lambda: fourth_id in load.workers_since(registered), 5, every_s=0.01, what="traffic to the new worker")
    took = time.monotonic() - registered
    load.stop()
    assert took <= 1.0, took
    assert not load.failed()


def test_etcd_outage_traffic_flows_and_the_registry_recovers_exactly(cluster, etcd_server):
    for _ in range(3):
        cluster.start_worker()
    balancer = cluster.start_balancer()
    wait_until(lambda: len(balancer.servers()) == 3, 5, what="3 servers")
    load = Load(balancer.url)
    etcd_server.stop()
    time.sleep(TTL_S + 2)  # longer than a lease: every worker must register again afterwards
    during = [r for r in load.results if r[1] == 200]
    etcd_server.start()
    live = {worker_id(w.port) for w in cluster.workers}
    wait_until(lambda: set(cluster.members()) == live, 15, every_s=0.2, what="registry == live workers")
    time.sleep(1.5)
    load.stop()
    members, other = registry(cluster.url)
    assert set(members) == live and not other  # no duplicates, no stale keys
    assert not load.failed(), (load.failed()[:5], load.errors[:5])
    assert len(during) > 50  # traffic kept flowing while etcd was down
    assert set(balancer.servers()) == live
    for worker in cluster.workers:
        assert "will register again" in worker.log.read_text()


def test_sigstop_leaves_the_rotation_and_sigcont_brings_it_back(cluster):
    workers = [cluster.start_worker() for _ in range(2)]
    balancer = cluster.start_balancer()
    wait_until(lambda: len(balancer.servers()) == 2, 5, what="2 servers")
    load = Load(balancer.url, timeout_s=30)
    time.sleep(0.5)
    frozen, other = workers[0], workers[1]
    frozen_id = worker_id(frozen.port)
    frozen.proc.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    wait_until(lambda: frozen_id not in cluster.members(), TTL_S + 3, what="lease expired")
    wait_until(lambda: balancer.servers().get(frozen_id, "MAINT") != "UP", 5, what="out of rotation")
    time.sleep(0.5)
    assert load.workers_since(stopped + 2.5) == {worker_id(other.port)}  # traffic continues elsewhere
    frozen.proc.send_signal(signal.SIGCONT)
    resumed = time.monotonic()
    wait_until(lambda: frozen_id in cluster.members(), 10, what="registered again")
    wait_until(lambda: frozen_id in load.workers_since(resumed), 20, what="traffic again")
    load.stop()
    assert not load.failed(), (load.failed()[:5], load.errors[:5])


def test_worker_started_while_etcd_is_down_serves_then_registers(cluster_repo, tmp_path):
    etcd = EtcdServer(tmp_path / "etcd")
    (tmp_path / "etcd").mkdir()
    url = etcd.url("late")
    worker = Server(str(cluster_repo), "--cluster", url, log=tmp_path / "w.log").wait_ready()
    try:
        assert httpx.post(worker.url + "/v2/models/tiny/infer",
                          json={"inputs": [{"name": "image", "shape": [1, 3, 8, 8], "datatype": "FP32",
                                            "data": [0.0] * 192}]}).status_code == 200
        etcd.start()
        wait_until(lambda: worker_id(worker.port) in registry(url)[0], 10, every_s=0.1, what="late registration")
    finally:
        worker.stop()
        etcd.close()


def test_bad_cluster_urls_are_clear_errors():
    for args in (["balance", "--cluster", "http://x:1/y"], ["cluster", "ls", "--cluster", "etcd://h:1/bad name"],
                 ["serve", "--cluster", "etcd://:99999/x"]):
        result = subprocess.run([sys.executable, "-m", "modelport", *args], capture_output=True, text=True, timeout=30)
        assert result.returncode != 0 and "invalid cluster URL" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "modelport", "cluster", "ls", "--cluster",
                             f"etcd://127.0.0.1:{free_port()}/x"], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "unreachable" in result.stderr and "Traceback" not in result.stderr


def test_garbage_and_unreachable_members_are_skipped_or_checked_out(cluster):
    cluster.start_worker()
    put_raw(cluster.url, "garbage", b"{not json")
    put_raw(cluster.url, "someone-else", json.dumps({"hello": "world"}).encode())
    dead_port = free_port()  # nothing listens there: connections are refused
    put_raw(cluster.url, "ghost", json.dumps({"schema": 1, "id": "ghost", "http": f"http://127.0.0.1:{dead_port}",
                                              "state": "ready"}).encode())
    balancer = cluster.start_balancer()
    wait_until(lambda: balancer.servers().get("ghost", "").startswith("DOWN"), 5, what="ghost checked out")
    load = Load(balancer.url)
    time.sleep(1.5)
    load.stop()
    assert not load.failed() and len(load.results) > 30
    assert balancer.proc.poll() is None
    log = balancer.log.read_text()
    assert "skipping modelport/" in log and "garbage" in log and "Traceback" not in log
    listed = subprocess.run([sys.executable, "-m", "modelport", "cluster", "ls", "--cluster", cluster.url],
                            capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0 and "skipped" in listed.stderr and "ghost" in listed.stdout


async def test_etcd_waits_are_bounded_even_when_an_operation_ignores_its_cancel():
    """A gRPC call or channel close may never finish cancelling; asyncio.wait_for waits for it
    to, ``within`` and ``stop`` do not (a full test run once hung in a client's close)."""
    import asyncio

    from modelport.cluster.etcd import stop, within

    release = asyncio.Event()

    async def stubborn():  # like a gRPC read that does not notice cancellation
        while True:
            try:
                await release.wait()
                return "late"
            except asyncio.CancelledError:
                continue

    try:
        bounded = asyncio.ensure_future(within(stubborn(), 0.2))
        await asyncio.wait([bounded], timeout=2)  # asyncio.wait_for(stubborn(), 0.2) would still wait here
        assert bounded.done() and isinstance(bounded.exception(), asyncio.TimeoutError)
        assert await within(asyncio.sleep(0.01, "on time"), 1.0) == "on time"
        task = asyncio.ensure_future(stubborn())
        await asyncio.sleep(0.01)  # running, inside its wait
        start = time.monotonic()
        await stop(task, 0.2)
        assert time.monotonic() - start < 1.0 and not task.done()
    finally:
        release.set()  # let the stubborn ones finish
    await asyncio.sleep(0.01)
    assert task.done()
