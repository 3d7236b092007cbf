"""Issue 26's gRPC figures: gRPC against HTTP KServe V2 on the same server process, same run.

    python benchmarks/grpc_vs_http.py [--count 600]

1. Round trip with a trivial model (no image work), one request at a time: gRPC ModelInfer (a raw
   tensor, grpcio's blocking stub) against raw keep-alive HTTP (KServe V2 binary tensor).
2. The default model with 32 requests in flight: gRPC ModelInfer with the encoded image as
   `image_bytes` and the classification parameter (grpc.aio, one channel) against HTTP KServe V2
   binary + classification extension, the same JPEGs, every answer's top-1 label checked.
Bars: gRPC throughput >= HTTP's (ratio >= 1.0), trivial p50 gRPC <= HTTP's (ratio <= 1.0).
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

import grpc
import grpc.aio
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
import loadgen  # noqa: E402
from common import photo_files, v2_classify_requests  # noqa: E402
from http_server import free_port, start_server  # noqa: E402

from modelport.engine.model import Model  # noqa: E402
from modelport.packaged import default_model  # noqa: E402
from modelport.protocol import grpc as codec  # noqa: E402


def cpu_flags() -> str:
    flags = set(open("/proc/cpuinfo").read().split())
    return " ".join(sorted(f for f in ("avx2", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags))


def grpc_round_trips(port: int, request, count: int) -> list[float]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = codec.messages()[1].GRPCInferenceServiceStub(channel)
        times = []
        for _ in range(count):
            start = time.perf_counter()
            stub.ModelInfer(request)
            times.append(time.perf_counter() - start)
    return times


async def grpc_closed_loop(port: int, requests: list, concurrency: int, count: int) -> tuple[float, int]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = codec.messages()[1].GRPCInferenceServiceStub(channel)
        sent = wrong = 0

        async def worker():
            nonlocal sent, wrong
            while sent < count:
                request, label = requests[sent % len(requests)]
                sent += 1
                try:
                    response = await stub.ModelInfer(request)
                    (top,) = codec.infer_outputs(response)["probabilities"][0]
                    wrong += top.split(":", 2)[2] != label
                except grpc.RpcError:
                    wrong += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return count / (time.perf_counter() - start), wrong


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
        port, gport = free_port(), free_port()
        proc, _ = start_server([str(tmp / "repo"), "--grpc-port", str(gport)], port, tmp / "tiny.log")
        tensor = np.zeros((1, 3, 8, 8), np.float32)
        greq = codec.infer_request("tiny", None, {"image": tensor}, [])
        header = json.dumps({"inputs": [{"name": "image", "shape": [1, 3, 8, 8], "datatype": "FP32",
                                         "parameters": {"binary_data_size": tensor.nbytes}}],
                             "parameters": {"binary_data_output": True}}).encode()
        hreq = [(loadgen.request_bytes("POST", "/v2/models/tiny/infer", header + tensor.tobytes(),
                                       {"Inference-Header-Content-Length": str(len(header))}),
                 lambda b: b'"outputs"' in b)]
        grpc_round_trips(gport, greq, 300)
        loadgen.run(port, hreq, concurrency=1, count=300)
        g_times, h_p50s = [], []
        for _ in range(2):  # alternate, so drift hits both alike
            g_times += grpc_round_trips(gport, greq, 1500)
            h_p50s.append(loadgen.run(port, hreq, concurrency=1, count=1500).p50)
        proc.terminate()
        proc.wait(timeout=60)

        # -- default model, 32 in flight
        files = photo_files(tmp / "photos")
        datas = [p.read_bytes() for p in files]
        labels = [p[0].label for p in Model.load(bundle).classify(datas, 1)]
        port, gport = free_port(), free_port()
        proc, _ = start_server(["--grpc-port", str(gport)], port, tmp / "server.log")
        grequests = [(codec.infer_request(default_model.NAME, None, [d], [("probabilities", 1)]), label)
                     for d, label in zip(datas, labels)]
        hrequests = v2_classify_requests(datas, labels, default_model.NAME)
        asyncio.run(grpc_closed_loop(gport, grequests, 8, 48))
        loadgen.run(port, hrequests, concurrency=8, count=48)
        g_rates, h_rates, g_wrong, h_wrong = [], [], 0, 0
        for _ in range(2):
            rate, wrong = asyncio.run(grpc_closed_loop(gport, grequests, 32, args.count // 2))
            g_rates.append(rate)
            g_wrong += wrong
            r = loadgen.run(port, hrequests, concurrency=32, count=args.count // 2)
            h_rates.append(r.throughput)
            h_wrong += r.wrong + r.errors
        proc.terminate()
        proc.wait(timeout=60)

    g50, h50 = statistics.median(g_times) * 1000, statistics.median(h_p50s) * 1000
    print(f"CPU flags: {cpu_flags()}; 2 cores")
    print(f"trivial model round trip, C=1, 3000 requests each: gRPC p50 {g50:.3f} ms, HTTP p50 {h50:.3f} ms; "
          f"gRPC / HTTP = {g50 / h50:.2f} (bar <= 1.0)")
    g_rate, h_rate = statistics.mean(g_rates), statistics.mean(h_rates)
    print(f"default model, 32 in flight, {args.count} requests each: gRPC {g_rate:.1f} img/s, HTTP {h_rate:.1f} img/s, "
          f"gRPC / HTTP = {g_rate / h_rate:.2f} (bar >= 1.0); wrong or failed: gRPC {g_wrong}, HTTP {h_wrong}")


if __name__ == "__main__":
    main()
