"""Issue 5's figures: ZeroMQ against HTTP on the same server process, same models, same run.

    python benchmarks/zmq_vs_http.py [--count 600]

1. Round trip with a trivial model (no image work), one request at a time: raw DEALER + msgpack
   against raw keep-alive HTTP (KServe V2 JSON).
2. The default model with 32 requests in flight: ZeroMQ `classify` against HTTP KServe V2 binary
   + classification extension, the same JPEGs, every answer's top-1 label checked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import numpy as np
import zmq
import zmq.asyncio

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
import loadgen  # noqa: E402
from common import photo_files, v2_classify_requests  # noqa: E402
from http_server import free_port, start_server  # noqa: E402

from modelport.packaged import default_model  # noqa: E402
from modelport.engine.model import Model  # noqa: E402


def zmq_round_trips(port: int, request: bytes, count: int) -> list[float]:
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.connect(f"tcp://127.0.0.1:{port}")
    times = []
    for _ in range(count):
        start = time.perf_counter()
        socket.send(request)
        reply = msgpack.unpackb(socket.recv())
        times.append(time.perf_counter() - start)
        assert reply["ok"], reply
    socket.close(linger=0)
    context.term()
    return times


async def zmq_closed_loop(port: int, requests: list[tuple[bytes, str]], concurrency: int, count: int) -> tuple[float, int]:
    context = zmq.asyncio.Context()
    socket = context.socket(zmq.DEALER)
    socket.connect(f"tcp://127.0.0.1:{port}")
    pending: dict[int, asyncio.Future] = {}
    wrong = 0
    sent = 0

    async def receive():
        while True:
            reply = msgpack.unpackb(await socket.recv())
            pending.pop(reply["id"]).set_result(reply)

    async def worker():
        nonlocal sent, wrong
        while sent < count:
            index = sent
            sent += 1
            body, label = requests[index % len(requests)]
            future = asyncio.get_running_loop().create_future()
            pending[index] = future
            await socket.send(msgpack.packb({"id": index, **body}))
            reply = await future
            if not reply["ok"] or reply["predictions"][0][0][0] != label:
                wrong += 1

    receiver = asyncio.ensure_future(receive())
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    receiver.cancel()
    socket.close(linger=0)
    context.term()
    return count / elapsed, wrong


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=600)
    args = parser.parse_args()
    bundle = default_model.ensure_default_model()
    from conftest import make_tiny_bundle

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # -- trivial model round trips
        make_tiny_bundle(tmp / "repo" / "tiny" / "1")
        port, zport = free_port(), free_port()
        proc, _ = start_server([str(tmp / "repo"), "--zmq-port", str(zport)], port, tmp / "tiny.log")
        tensor = np.zeros((1, 3, 8, 8), np.float32)
        zreq = msgpack.packb({"id": 1, "op": "infer", "model": "tiny",
                              "inputs": {"image": {"dtype": "float32", "shape": [1, 3, 8, 8], "data": tensor.tobytes()}}})
        body = json.dumps({"inputs": [{"name": "image", "shape": [1, 3, 8, 8], "datatype": "FP32",
                                       "data": tensor.ravel().tolist()}]}).encode()
        hreq = [(loadgen.request_bytes("POST", "/v2/models/tiny/infer", body, {"Content-Type": "application/json"}),
                 lambda b: b'"outputs"' in b)]
        zmq_round_trips(zport, zreq, 300)
        loadgen.run(port, hreq, concurrency=1, count=300)
        z_times = zmq_round_trips(zport, zreq, 3000)
        h = loadgen.run(port, hreq, concurrency=1, count=3000)
        proc.terminate()
        proc.wait(timeout=60)

        # -- default model, 32 in flight
        files = photo_files(tmp / "photos")
        datas = [p.read_bytes() for p in files]
        labels = [p[0].label for p in Model.load(bundle).classify(datas, 1)]
        port, zport = free_port(), free_port()
        proc, _ = start_server(["--zmq-port", str(zport)], port, tmp / "server.log")
        zrequests = [({"op": "classify", "images": [d], "top_k": 1}, label) for d, label in zip(datas, labels)]
        hrequests = v2_classify_requests(datas, labels, default_model.NAME)
        asyncio.run(zmq_closed_loop(zport, zrequests, 8, 48))
        loadgen.run(port, hrequests, concurrency=8, count=48)
        # Alternate the two so that the machine's drift hits both alike.
        z_rates, h_rates, z_wrong, h_wrong = [], [], 0, 0
        for _ in range(2):
            rate, wrong = asyncio.run(zmq_closed_loop(zport, zrequests, 32, args.count // 2))
            z_rates.append(rate)
            z_wrong += wrong
            r = loadgen.run(port, hrequests, concurrency=32, count=args.count // 2)
            h_rates.append(r.throughput)
            h_wrong += r.wrong + r.errors
        proc.terminate()
        proc.wait(timeout=60)

    z50 = statistics.median(z_times) * 1000
    print("trivial model round trip, C=1, 3000 requests:")
    print(f"  ZeroMQ p50 {z50:.3f} ms = {z50 / 0.2:.2f} x the 0.2 ms target; p99 "
          f"{sorted(z_times)[int(0.99 * len(z_times))] * 1000:.3f} ms")
    print(f"  HTTP   p50 {h.p50 * 1000:.3f} ms;  ZeroMQ / HTTP = {z50 / (h.p50 * 1000):.2f}")
    z_rate, h_rate = statistics.mean(z_rates), statistics.mean(h_rates)
    print(f"default model, 32 in flight, {args.count} requests each: ZeroMQ {z_rate:.1f} img/s, HTTP {h_rate:.1f} img/s,"
          f" ZeroMQ / HTTP = {z_rate / h_rate:.2f} (target >= 1.0); wrong or failed: ZeroMQ {z_wrong}, HTTP {h_wrong}")


if __name__ == "__main__":
    main()
