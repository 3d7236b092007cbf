"""Which etcd client library: measured against a real etcd on loopback (the choice is in docs/decisions.md).

    pip install aetcd etcd-client-py etcd3gw      # in a scratch virtual environment
    python benchmarks/etcd_clients.py

For each candidate: import time, put+get round trip (median of 300), the time from a put to its
watch event (median of 100), and what a watch does when etcd is killed and restarted on the same
port: raises (so the caller can re-list and re-watch), resumes by itself, or hangs silently (the
one outcome a registry follower cannot live with). Each figure is printed as a ratio to etcdctl-free
raw HTTP on etcd's JSON gateway (httpx, one keep-alive connection), measured in the same run.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Etcd:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="etcdbench"))
        self.port, self.peer = free_port(), free_port()
        self.proc = None

    def start(self) -> None:
        url, peer = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.peer}"
        self.proc = subprocess.Popen(
            ["etcd", "--name", "b", "--data-dir", str(self.dir / "data"), "--listen-client-urls", url,
             "--advertise-client-urls", url, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"b={peer}", "--initial-cluster-state", "new"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import httpx

        for _ in range(200):
            try:
                if httpx.get(url + "/health", timeout=0.5).json().get("health") == "true":
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.025)
        raise RuntimeError("etcd did not start")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def import_ms(module: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
    return (time.perf_counter() - start) * 1000


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def put_get_ms(put, get, count: int = 300) -> float:
    """Median ms of ``put(i)`` then ``get()`` of one key, for a blocking client."""
    times = []
    for i in range(count):
        start = time.perf_counter()
        put(i)
        get()
        times.append(time.perf_counter() - start)
    return median_ms(times)


async def put_get_ms_async(put, get, count: int = 300) -> float:
    """The same for an asyncio client."""
    times = []
    for i in range(count):
        start = time.perf_counter()
        await put(i)
        await get()
        times.append(time.perf_counter() - start)
    return median_ms(times)


# -- the baseline: raw JSON gateway over httpx ----------------------------------------------------------

def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def gateway(etcd: Etcd) -> dict:
    import httpx

    url = f"http://127.0.0.1:{etcd.port}/v3"
    with httpx.Client() as client:
        put_get = put_get_ms(lambda i: client.post(url + "/kv/put", json={"key": b64("bench/k"), "value": b64(str(i))}),
                             lambda: client.post(url + "/kv/range", json={"key": b64("bench/k")}))
    return {"import_ms": import_ms("httpx"), "put_get_ms": put_get}


# -- aetcd (asyncio, gRPC) -----------------------------------------------------------------------------------

def aetcd_case(etcd: Etcd) -> dict:
    import aetcd

    async def run() -> dict:
        client = aetcd.Client(host="127.0.0.1", port=etcd.port)
        put_get = await put_get_ms_async(lambda i: client.put(b"bench/k", str(i).encode()),
                                         lambda: client.get(b"bench/k"))
        watch = await client.watch_prefix(b"bench/w")
        events = watch.__aiter__()
        latency = []
        for i in range(100):
            start = time.perf_counter()
            await client.put(b"bench/w", str(i).encode())
            await events.__anext__()
            latency.append(time.perf_counter() - start)
        etcd.kill()
        etcd.start()
        outcome = await _after_restart(lambda: client.put(b"bench/w", b"after"), events.__anext__())
        await client.close()
        return {"put_get_ms": put_get, "watch_ms": median_ms(latency), "restart": outcome}

    return {"import_ms": import_ms("aetcd"), **asyncio.run(run())}


# -- etcd-client-py (asyncio, Rust) --------------------------------------------------------------------------

def etcd_client_case(etcd: Etcd) -> dict:
    import etcd_client

    async def run() -> dict:
        client = etcd_client.Client([f"127.0.0.1:{etcd.port}"])
        async with client.connect() as comm:
            put_get = await put_get_ms_async(lambda i: comm.put(b"bench/k", str(i).encode()),
                                             lambda: comm.get(b"bench/k"))
            # Its watch is created on the first __anext__, not by watch_prefix(): start waiting
            # before the put, or the event is missed and the wait never ends.
            events = comm.watch_prefix(b"bench/w").__aiter__()
            latency = []
            for i in range(100):
                start = time.perf_counter()
                waiting = asyncio.ensure_future(events.__anext__())
                await asyncio.sleep(0.05 if i == 0 else 0)
                await comm.put(b"bench/w", str(i).encode())
                await asyncio.wait_for(waiting, 5)
                latency.append(time.perf_counter() - start)
            etcd.kill()
            etcd.start()
            outcome = await _after_restart(lambda: comm.put(b"bench/w", b"after"), events.__anext__())
        return {"put_get_ms": put_get, "watch_ms": median_ms(latency), "restart": outcome}

    return {"import_ms": import_ms("etcd_client"), **asyncio.run(run())}


# -- etcd3gw (synchronous, JSON gateway) ---------------------------------------------------------------------

def etcd3gw_case(etcd: Etcd) -> dict:
    import etcd3gw

    client = etcd3gw.client(host="127.0.0.1", port=etcd.port)
    put_get = put_get_ms(lambda i: client.put("bench/k", str(i)), lambda: client.get("bench/k"))
    arrived = threading.Event()
    events, cancel = client.watch_prefix("bench/w")
    queue: list = []

    def pump() -> None:
        try:
            for event in events:
                queue.append(event)
                arrived.set()
            queue.append("ended")
        except Exception as exc:  # what a broken watch raises
            queue.append(f"raised {type(exc).__name__}")
        arrived.set()

    threading.Thread(target=pump, daemon=True).start()
    time.sleep(0.2)
    latency = []
    for i in range(100):
        arrived.clear()
        start = time.perf_counter()
        client.put("bench/w", str(i))
        arrived.wait(5)
        latency.append(time.perf_counter() - start)
    queue.clear()
    arrived.clear()
    etcd.kill()
    etcd.start()
    try:
        client.put("bench/w", "after")
    except Exception as exc:
        queue.append(f"put raised {type(exc).__name__}")
    arrived.wait(5)
    outcome = ("resumed" if any(isinstance(e, dict) for e in queue) else
               next((e for e in queue if isinstance(e, str)), "hung (no event, no error in 5 s)"))
    cancel()
    return {"import_ms": import_ms("etcd3gw"), "put_get_ms": put_get, "watch_ms": median_ms(latency),
            "restart": outcome}


async def _after_restart(put, next_event) -> str:
    task = asyncio.ensure_future(next_event)
    await asyncio.sleep(0.05)
    try:
        await put()
    except Exception as exc:
        task.cancel()
        return f"put raised {type(exc).__name__}"
    try:
        await asyncio.wait_for(task, 5)
        return "resumed"
    except asyncio.TimeoutError:
        return "hung (no event, no error in 5 s)"
    except Exception as exc:
        return f"raised {type(exc).__name__}"


def main() -> None:
    results = {}
    for name, case in [("raw gateway (httpx)", gateway), ("aetcd", aetcd_case),
                       ("etcd-client-py", etcd_client_case), ("etcd3gw", etcd3gw_case)]:
        print(f"measuring {name}...", file=sys.stderr, flush=True)
        etcd = Etcd()
        etcd.start()
        try:
            results[name] = case(etcd)
        except ImportError as exc:
            results[name] = {"skipped": str(exc)}
        except Exception as exc:
            results[name] = {"failed": f"{type(exc).__name__}: {exc}"}
        finally:
            etcd.close()
    base = results["raw gateway (httpx)"]["put_get_ms"]
    for name, r in results.items():
        if "put_get_ms" in r:
            r["put_get_x_gateway"] = round(r["put_get_ms"] / base, 2)
        print(f"{name:22s} {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
