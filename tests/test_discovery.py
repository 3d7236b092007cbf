"""Client-side discovery against real etcd and real worker processes: spreading, failover,
routing by model/version/label, the retry budget, hedging, and `modelport resolve`."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from conftest import make_tiny_bundle
from modelport import AsyncClient, Client
from modelport.errors import NotFound, Overloaded, Unavailable
from modelport.server.cluster import worker_id
from servers import Gate, free_port, in_fresh_process, make_gate_bundle, metric, wait_until
from test_rpc import expected_logits

TTL_WAIT = 5.0  # longer than a worker's lease (3 s): a SIGKILLed worker's key is gone by then
TENSOR = np.random.default_rng(3).normal(size=(1, 3, 8, 8)).astype(np.float32)


async def hammer(client: AsyncClient, seconds: float, concurrency: int = 8, **kwargs) -> tuple[int, list]:
    """Requests from ``concurrency`` tasks for ``seconds``: (answers, errors)."""
    answers, errors = 0, []
    stop = time.monotonic() + seconds

    async def one() -> None:
        nonlocal answers
        while time.monotonic() < stop:
            try:
                reply = await client.infer("tiny", {"image": TENSOR}, **kwargs)
                assert reply["logits"].shape == (1, 4)
                answers += 1
            except Exception as exc:  # every failure is a test failure: collect them
                errors.append(repr(exc))

    await asyncio.gather(*(one() for _ in range(concurrency)))
    return answers, errors


@pytest.mark.parametrize("transport", ["http", "zmq"])
def test_spreads_over_three_workers_and_sigkill_loses_nothing(cluster, transport):
    workers = [cluster.start_worker("--zmq-port", str(free_port())) for _ in range(3)]
    ids = [worker_id(w.port) for w in workers]

    async def scenario():
        async with AsyncClient(cluster.url, transport=transport, timeout_s=20) as client:
            answers, errors = await hammer(client, 1.5)
            assert not errors and answers > 30
            assert all(client.discovery.attempts[i] > 3 for i in ids), client.discovery.attempts  # spread
            victim = workers[0]
            victim.proc.send_signal(signal.SIGKILL)
            during = asyncio.ensure_future(hammer(client, TTL_WAIT))
            await asyncio.get_running_loop().run_in_executor(None, lambda: wait_until(
                lambda: ids[0] not in cluster.members(), TTL_WAIT, what="key gone"))
            await asyncio.sleep(0.2)  # attempts already on their way are cancelled and fail over
            after_gone = client.discovery.attempts[ids[0]]
            answers, errors = await during
            assert not errors, errors[:3]  # failover: zero failed requests for the caller
            assert client.discovery.attempts[ids[0]] == after_gone  # nothing more sent to the dead one
            assert client.discovery.stats["retries"] <= 0.2 * client.discovery.stats["requests"] + 10
            reply = await client.infer("tiny", {"image": TENSOR})
            return reply["logits"]

    logits = asyncio.run(scenario())
    assert logits.shape == (1, 4)



def test_routes_by_model_version_and_label(cluster, tmp_path):
    plain = cluster.start_worker()  # tiny version 1 only
    repo = tmp_path / "canary-repo"
    make_tiny_bundle(repo / "tiny" / "1", size=8)
    make_tiny_bundle(repo / "tiny" / "2", size=8, seed=5)
    make_tiny_bundle(repo / "other" / "1", size=8)
    (repo / "tiny" / "model.toml").write_text('version_policy = { all = true }\n[labels]\ncanary = 2\n')
    canary = cluster.start_worker(repo=repo)
    wait_until(lambda: cluster.members()[worker_id(canary.port)].models.get("tiny", {}).get("versions") == ["1", "2"],
               10, what="both versions advertised")
    with Client(cluster.url) as client:
        for version in ("canary", 2):
            for _ in range(10):
                client.infer("tiny", {"image": TENSOR}, version=version)
        for _ in range(10):
            client.infer("other", {"image": TENSOR})
        only_canary = dict(client.discovery.attempts)
        for _ in range(30):
            client.infer("tiny", {"image": TENSOR}, version=1)
        both = dict(client.discovery.attempts)
        with pytest.raises(NotFound) as info:
            client.infer("nope", {"image": TENSOR})
        assert "no worker" in info.value.message
        with pytest.raises(NotFound):
            client.infer("tiny", {"image": TENSOR}, version=7)
    assert only_canary == {worker_id(canary.port): 30}  # the plain worker lacks them: never asked
    assert both[worker_id(plain.port)] > 0 and sum(both.values()) == 60  # version 1: either may answer


def test_an_empty_cluster_is_unavailable_and_a_dead_registry_is_a_clear_error(cluster):
    with pytest.raises(Unavailable) as info:
        with Client(cluster.url, timeout_s=5) as client:
            client.infer("tiny", {"image": TENSOR})
    assert "no workers" in info.value.message
    with pytest.raises(Unavailable) as info:
        with Client(f"etcd://127.0.0.1:{free_port()}/x", timeout_s=2) as client:
            client.infer("tiny", {"image": TENSOR})
    assert "unreachable" in info.value.message


def test_retries_stay_within_the_budget_when_every_worker_refuses(cluster, tmp_path):
    repo = tmp_path / "gate-repo"
    bundle = make_gate_bundle(repo / "gate" / "1", max_batch_size=1, max_queue_size=1, max_delay_ms=0)
    workers = [cluster.start_worker(repo=repo) for _ in range(2)]
    gate = Gate(bundle)
    gate.close()
    pixels = np.zeros((1, 8, 8, 3), np.uint8)
    body = {"inputs": [{"name": "image", "shape": [1, 8, 8, 3], "datatype": "UINT8", "data": [0] * 192}]}
    def hold(url: str) -> threading.Thread:
        thread = threading.Thread(target=lambda: httpx.post(url + "/v2/models/gate/infer", json=body, timeout=60),
                                  daemon=True)
        thread.start()
        return thread

    # One running, then one queued, on each: each queue is full. The second is sent only once the first
    # runs: sent together, the second can find the first still queued and be refused.
    holders = [hold(w.url) for w in workers]
    wait_until(lambda: len(gate.batches()) == 2, 10, what="one request running on each worker")
    holders += [hold(w.url) for w in workers]
    wait_until(lambda: all(metric(w.url, "modelport_queue_depth") == 1 for w in workers), 10, what="one queued on each: queues full")
    try:
        with Client(cluster.url, model="gate") as client:
            errors = []
            for _ in range(60):
                with pytest.raises(Overloaded) as info:
                    client.infer("gate", {"image": pixels})
                errors.append(info.value)
            stats = client.discovery.stats
        assert all(e.retry_after_s >= 1 for e in errors)
        assert stats["requests"] == 60
        assert stats["retries"] <= 0.2 * 60 + 10  # the budget: 20 % of requests plus a floor of 1/s
        assert stats["budget_exhausted"] > 0
    finally:
        gate.open()
        for t in holders:
            t.join(30)


def test_hedging_cuts_the_tail_when_a_worker_stalls(cluster):
    frozen, _ = [cluster.start_worker() for _ in range(2)]

    async def run(hedge_after_ms) -> tuple[list[float], object]:
        async with AsyncClient(cluster.url, hedge_after_ms=hedge_after_ms, timeout_s=20) as client:
            for _ in range(30):  # warm: latencies known, connections open
                await client.infer("tiny", {"image": TENSOR})
            times = []
            frozen.proc.send_signal(signal.SIGSTOP)  # for 1.2 s: shorter than its lease
            asyncio.get_running_loop().call_later(1.2, frozen.proc.send_signal, signal.SIGCONT)
            stopped = time.monotonic()

            async def one() -> None:  # 4 at a time: the healthy worker's queue makes the frozen one look cheap
                while time.monotonic() - stopped < 1.0:
                    start = time.monotonic()
                    await client.infer("tiny", {"image": TENSOR})
                    times.append(time.monotonic() - start)

            await asyncio.gather(*(one() for _ in range(4)))
            await asyncio.sleep(0.5)
            return times, client.discovery

    plain, _ = asyncio.run(run(None))
    hedged, discovery = asyncio.run(run(30))
    assert max(plain) > 0.3  # without hedging, a request that went to the frozen worker waits for it
    assert max(hedged) <= 0.5 * max(plain), (max(hedged), max(plain))
    assert discovery.stats["hedges_won"] >= 1
    assert discovery.stats["hedges"] <= 0.2 * discovery.stats["requests"] + 10
    assert all(e.in_flight == 0 for e in discovery.endpoints.values())  # the losers were cancelled


def test_resolve_prints_the_workers_for_a_model_best_first(cluster):
    workers = [cluster.start_worker("--zmq-port", str(free_port())) for _ in range(2)]
    result = subprocess.run([sys.executable, "-m", "modelport", "resolve", "--cluster", cluster.url, "--model", "tiny",
                             "--json"], capture_output=True, text=True, timeout=30, check=True)
    listed = json.loads(result.stdout)
    assert {w["id"] for w in listed} == {worker_id(w.port) for w in workers}
    assert all(w["http"].startswith("http://127.0.0.1:") and w["zmq"].startswith("tcp://") for w in listed)
    lines = subprocess.run([sys.executable, "-m", "modelport", "resolve", "--cluster", cluster.url, "--model", "tiny",
                            "--transport", "zmq"], capture_output=True, text=True, timeout=30, check=True).stdout
    assert lines.count("tcp://127.0.0.1:") == 2
    missing = subprocess.run([sys.executable, "-m", "modelport", "resolve", "--cluster", cluster.url, "--model", "nope"],
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode != 0 and "no worker" in missing.stderr


def test_sync_client_over_zmq_gets_right_answers(cluster):
    cluster.start_worker("--zmq-port", str(free_port()))
    weights = __import__("conftest").tiny_onnx(cluster.workers[0].log.parent / "w.onnx")
    with Client(cluster.url, transport="zmq") as client:
        reply = client.infer("tiny", {"image": TENSOR})
        assert client.ping()
    assert np.allclose(reply["logits"], expected_logits(TENSOR, weights), atol=1e-4)


def test_clients_find_workers_over_grpc_by_the_address_they_advertise(cluster):
    grpc_port = free_port()
    worker = cluster.start_worker("--grpc-port", str(grpc_port))
    assert cluster.members()[worker_id(worker.port)].grpc == f"127.0.0.1:{grpc_port}"
    weights = __import__("conftest").tiny_onnx(cluster.workers[0].log.parent / "w.onnx")
    with Client(cluster.url, transport="grpc") as client:
        reply = client.infer("tiny", {"image": TENSOR})
    assert np.allclose(reply["logits"], expected_logits(TENSOR, weights), atol=1e-4)
    resolved = subprocess.run([sys.executable, "-m", "modelport", "resolve", "--cluster", cluster.url, "--model", "tiny",
                               "--transport", "grpc"], capture_output=True, text=True, timeout=30, check=True).stdout
    assert resolved.startswith(f"127.0.0.1:{grpc_port}  {worker_id(worker.port)}")


@in_fresh_process  # the client's hedging reads its own timing: a pytest process grown by the suite skews it
def test_p95_hedging_waits_for_the_other_workers_not_for_the_slow_one(cluster, tmp_path):
    """One worker ten times slower than the other: its answers are more than 5 % of all, so the
    overall p95 is its latency; hedging at the p95 of the *other* worker still cuts that tail."""
    from test_slo import cost_bundle

    for name, seconds in (("fast", 0.02), ("slow", 0.2)):
        cost_bundle(tmp_path / name / "cost" / "1", f"{seconds} 0", max_batch_size=1, max_delay_ms=0)
        cluster.start_worker(repo=tmp_path / name)
    pixels = np.zeros((1, 8, 8, 3), np.uint8)

    async def run(hedge_after_ms) -> tuple[list[float], object]:
        async with AsyncClient(cluster.url, hedge_after_ms=hedge_after_ms, timeout_s=20) as client:
            for _ in range(30):  # warm: both workers' latencies known
                await client.infer("cost", {"image": pixels})
            times: list[float] = []
            stop = time.monotonic() + 4

            async def one() -> None:
                while time.monotonic() < stop:
                    start = time.monotonic()
                    await client.infer("cost", {"image": pixels})
                    times.append(time.monotonic() - start)

            await asyncio.gather(one(), one())
            return times, client.discovery

    def p99(values: list[float]) -> float:
        return sorted(values)[int(0.99 * (len(values) - 1))]

    plain, _ = asyncio.run(run(None))
    hedged, discovery = asyncio.run(run("p95"))
    assert p99(plain) > 0.15  # the slow worker's answers are in the tail without hedging
    assert p99(hedged) <= 0.5 * p99(plain), (p99(hedged), p99(plain))
    assert discovery.stats["hedges"] <= 0.15 * discovery.stats["requests"], discovery.stats
    assert discovery.stats["hedges_won"] >= 1
