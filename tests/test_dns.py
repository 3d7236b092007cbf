"""`modelport dns`: the registry as SRV records, checked with dig, dnspython and HAProxy's own
resolver (`server-template`), against real etcd and real workers."""

from __future__ import annotations

import signal
import socket
import subprocess
import time

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.resolver
import httpx
import pytest

from cluster import HAPROXY_WITH_DNS, DnsProcess, Load
from modelport.cluster.members import ClusterURL
from modelport.server.cluster import worker_id
from servers import free_port, wait_until


@pytest.fixture
def dns_server(cluster, tmp_path):
    server = DnsProcess(cluster.url, tmp_path / "dns.log")
    yield server
    server.stop()


def names(cluster) -> tuple[str, str, str]:
    origin = f"{ClusterURL.parse(cluster.url).name}.modelport."
    return f"_modelport._tcp.{origin}", f"_modelport-zmq._tcp.{origin}", f"_modelport._tcp.tiny.{origin}"


def test_srv_names_exactly_the_live_workers_and_follows_changes_within_a_second(cluster, dns_server):
    http_name, zmq_name, model_name = names(cluster)
    zmq_ports = [free_port(), free_port()]
    workers = [cluster.start_worker("--zmq-port", str(p)) for p in zmq_ports]
    wait_until(lambda: dns_server.srv(http_name) == {w.port for w in workers}, 2, what="both workers in DNS")
    assert dns_server.srv(zmq_name) == set(zmq_ports)
    assert dns_server.srv(model_name) == {w.port for w in workers}

    # dig, as a person would type it
    dig = subprocess.run(["dig", "@127.0.0.1", "-p", str(dns_server.port), http_name, "SRV", "+short"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    assert sorted(int(line.split()[2]) for line in dig.splitlines()) == sorted(w.port for w in workers)
    # dnspython's stub resolver, and the A record of a target
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port = ["127.0.0.1"], dns_server.port
    answer = resolver.resolve(http_name, "SRV")
    assert {rr.port for rr in answer} == {w.port for w in workers}
    target = str(next(iter(answer)).target)
    assert [rr.address for rr in resolver.resolve(target, "A")] == ["127.0.0.1"]
    over_tcp = dns.query.tcp(dns.message.make_query(http_name, "SRV"), "127.0.0.1", port=dns_server.port, timeout=2)
    assert {rr.port for rrset in over_tcp.answer for rr in rrset} == {w.port for w in workers}

    # a worker joins: in DNS within a second of its registration
    third = cluster.start_worker(wait=False)
    wait_until(lambda: worker_id(third.port) in cluster.members(), 30, every_s=0.01, what="registration")
    joined = wait_until(lambda: third.port in dns_server.srv(http_name), 2, every_s=0.01, what="in DNS")
    # a worker leaves: out of DNS within a second of its key going
    leaving = workers[0]
    leaving.signal(signal.SIGTERM)
    wait_until(lambda: worker_id(leaving.port) not in cluster.members(), 10, every_s=0.01, what="key gone")
    left = wait_until(lambda: leaving.port not in dns_server.srv(http_name), 2, every_s=0.01, what="out of DNS")
    assert joined <= 1.0 and left <= 1.0, (joined, left)
    assert dns_server.srv(http_name) == {workers[1].port, third.port}


def test_an_answer_too_big_for_udp_is_truncated_and_whole_over_tcp():
    """In-process: the zone of 40 workers, asked without EDNS (512-byte UDP answers)."""
    from modelport.cluster.dns import Zone
    from modelport.cluster.members import Member

    zone = Zone(ClusterURL.parse("etcd://127.0.0.1:2379/big"))
    zone.update({f"w{i}": Member(f"w{i}", f"http://10.0.0.{i}:{8000 + i}", models={"tiny": {"versions": ["1"]}})
                 for i in range(1, 41)})
    query = dns.message.make_query("_modelport._tcp.big.modelport.", "SRV", use_edns=False).to_wire()
    udp = dns.message.from_wire(zone.answer(query))
    assert udp.flags & dns.flags.TC and not udp.answer  # the client must ask again over TCP
    tcp = dns.message.from_wire(zone.answer(query, max_size=65535))
    assert sorted(rr.port for rrset in tcp.answer for rr in rrset) == [8000 + i for i in range(1, 41)]
    assert len(tcp.additional) == 40  # the targets' A records came along
    edns = dns.message.make_query("_modelport._tcp.big.modelport.", "SRV", use_edns=0, payload=8192).to_wire()
    assert len(dns.message.from_wire(zone.answer(edns)).answer[0]) == 40  # fits the size the client allows


def test_unknown_names_are_nxdomain_and_garbage_is_dropped(cluster, dns_server):
    cluster.start_worker()
    http_name, _, _ = names(cluster)
    for name in ("nope.modelport.", f"_modelport._tcp.nope.{http_name.split('.', 2)[2]}", "example.com."):
        reply = dns.query.udp(dns.message.make_query(name, "SRV"), "127.0.0.1", port=dns_server.port, timeout=2)
        assert reply.rcode() == dns.rcode.NXDOMAIN, name
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for garbage in (b"", b"\x00", b"garbage" * 50, bytes(range(256)), b"\x12\x34\x81\x80" + b"\xff" * 40):
            s.sendto(garbage, ("127.0.0.1", dns_server.port))
    time.sleep(0.2)
    assert dns_server.proc.poll() is None
    assert len(dns_server.srv(http_name)) == 1  # still answering
    assert "Traceback" not in dns_server.log.read_text()


def test_haproxy_with_only_server_template_follows_modelport_dns(cluster, dns_server, tmp_path):
    first = cluster.start_worker()
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_WITH_DNS.format(directory=tmp_path, dns_port=dns_server.port, port=port,
                                              cluster=ClusterURL.parse(cluster.url).name))
    haproxy = subprocess.Popen(["haproxy", "-W", "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                               stderr=open(tmp_path / "haproxy.log", "wb"), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _worker_behind(url) == worker_id(first.port), 10, what="served through HAProxy")
        load = Load(url, clients=2)
        second = cluster.start_worker()
        joined = time.monotonic()
        wait_until(lambda: worker_id(second.port) in load.workers_since(joined), 10, what="new worker takes traffic")
        first.signal(signal.SIGTERM)
        assert first.proc.wait(30) == 0
        gone = time.monotonic()
        wait_until(lambda: load.workers_since(gone + 1) == {worker_id(second.port)}, 10, what="left worker out")
        load.stop()
        assert not load.failed(), (load.failed()[:5], load.errors[:5])
    finally:
        haproxy.terminate()
        haproxy.wait(10)


def _worker_behind(url: str) -> str | None:
    try:
        return httpx.get(url + "/v2", timeout=1).headers.get("x-modelport-worker")
    except httpx.HTTPError:
        return None
