"""Issue 26's gRPC figures: gRPC against HTTP KServe V2 on the same server process, same run.

    python benchmarks/grpc_vs_http.py [--count 1200] [--rounds 3]

Needs h2load (Debian's nghttp2-client): one C client that speaks both protocols, so that a ratio
measures the two servers and not two client libraries.

1. Trivial model (no image work), one request at a time, p50 of the round trip:
   a. the same client on both sides: h2load sends a gRPC ModelInfer (a raw tensor, HTTP/2) and the
      KServe V2 binary request (HTTP/1.1, keep-alive) -> the bar's figure;
   b. Python clients, for what a user's script sees: grpcio's blocking stub against a raw-socket
      HTTP client, and Triton's own clients (tritonclient.grpc against tritonclient.http).
2. Trivial model, 32 in flight, h2load (gRPC: 32 streams on one connection; HTTP: 32 connections).
3. The default model with 32 requests in flight: h2load on both sides (one JPEG as ``image_bytes``
   with the classification parameter, against KServe V2 binary + classification), every answer
   counted as a success in the server's own metrics -> the bar's figure (the same client, so the
   servers are compared); then the Python clients: grpc.aio (one channel) against raw-socket HTTP,
   the same JPEGs, every answer's top-1 label checked, with each client's own CPU a request (it
   runs on the server's two cores, so a heavier client takes from the server).
The protocols alternate within each round, and which goes first alternates from round to round,
so drift and a first-run penalty hit both alike. Bars: gRPC throughput >= HTTP's
(ratio >= 1.0); trivial p50 gRPC <= HTTP's (ratio <= 1.0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import statistics
import struct
import subprocess
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
from servers import metric  # noqa: E402


def cpu_flags() -> str:
    flags = set(open("/proc/cpuinfo").read().split())
    return " ".join(sorted(f for f in ("avx2", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags))


class H2load:
    """h2load against one server: a gRPC call (HTTP/2, one connection) and a V2 request (HTTP/1.1)."""

    def __init__(self, tmp: Path, port: int, gport: int, model: str, grpc_message: bytes, v2_body: bytes,
                 v2_header_length: int) -> None:
        self.tmp, self.port, self.gport, self.model = tmp, port, gport, model
        (tmp / "grpc.bin").write_bytes(struct.pack(">BI", 0, len(grpc_message)) + grpc_message)
        (tmp / "v2.bin").write_bytes(v2_body)
        self.v2_header_length = v2_header_length

    def run(self, protocol: str, count: int, in_flight: int) -> tuple[float, float]:
        """(p50 s, requests/s); every request must have succeeded."""
        log = self.tmp / "h2load.log"
        log.unlink(missing_ok=True)  # h2load appends to it
        if protocol == "grpc":
            args = ["-c", "1", "-m", str(in_flight), "-d", str(self.tmp / "grpc.bin"), "-H", "content-type: application/grpc",
                    "-H", "te: trailers", f"http://127.0.0.1:{self.gport}/inference.GRPCInferenceService/ModelInfer"]
        else:
            args = ["--h1", "-c", str(in_flight), "-m", "1", "-d", str(self.tmp / "v2.bin"),
                    "-H", f"inference-header-content-length: {self.v2_header_length}",
                    f"http://127.0.0.1:{self.port}/v2/models/{self.model}/infer"]
        # gRPC answers a failed call with HTTP 200 and grpc-status: count successes on the server.
        before = self._answered(protocol)
        out = subprocess.run(["h2load", "-n", str(count), "--log-file", str(log)] + args,
                             capture_output=True, text=True, check=True).stdout
        answered = self._answered(protocol) - before
        if f"{count} succeeded" not in out or answered != count:
            raise SystemExit(f"h2load {protocol}: not every request answered ({answered} of {count}):\n{out}")
        times = [int(line.split()[2]) / 1e6 for line in log.read_text().splitlines()]
        rate = float(next(line for line in out.splitlines() if line.startswith("finished in")).split(",")[1].split()[0])
        return statistics.median(times), rate

    def _answered(self, protocol: str) -> float:
        return metric(f"http://127.0.0.1:{self.port}", "modelport_requests_total", model=self.model,
                      protocol="grpc" if protocol == "grpc" else "kserve", status="200")


def grpc_round_trips(port: int, request, count: int) -> list[float]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = codec.messages()[1].GRPCInferenceServiceStub(channel)
        times = []
        for _ in range(count):
            start = time.perf_counter()
            stub.ModelInfer(request)
            times.append(time.perf_counter() - start)
    return times


def triton_round_trips(client, tensor: np.ndarray, count: int) -> list[float]:
    """Triton's own client, gRPC or HTTP (their InferInput classes differ, the calls do not)."""
    module = type(client).__module__.rsplit(".", 1)[0]
    infer_input = sys.modules[module].InferInput("image", list(tensor.shape), "FP32")
    infer_input.set_data_from_numpy(tensor, **({"binary_data": True} if "http" in module else {}))
    times = []
    for _ in range(count):
        start = time.perf_counter()
        client.infer("tiny", [infer_input])
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


def own_cpu_s() -> float:
    """This process's CPU seconds (all its threads: the Python clients run here)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def ratio_line(what: str, g: list[float], h: list[float], unit: str, scale: float, bar: str) -> str:
    gm, hm = statistics.median(g) * scale, statistics.median(h) * scale
    rounds = ", ".join(f"{a / b:.2f}" for a, b in zip(g, h))
    return f"{what}: gRPC {gm:.3f} {unit}, HTTP {hm:.3f} {unit}; gRPC / HTTP = {gm / hm:.2f} (rounds: {rounds}){bar}"


def v2_tensor_body(tensor: np.ndarray) -> tuple[bytes, int]:
    header = json.dumps({"inputs": [{"name": "image", "shape": list(tensor.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": tensor.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + tensor.tobytes(), len(header)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=1200, help="default-model requests per protocol per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("h2load") is None:
        raise SystemExit("needs h2load: apt-get install nghttp2-client")
    import tritonclient.grpc as triton_grpc
    import tritonclient.http as triton_http

    bundle = default_model.ensure_default_model()
    from conftest import make_tiny_bundle

    lines = [f"CPU flags: {cpu_flags()}; 2 cores; {args.rounds} rounds, the protocols alternating"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # -- trivial model
        make_tiny_bundle(tmp / "repo" / "tiny" / "1")
        port, gport = free_port(), free_port()
        proc, _ = start_server([str(tmp / "repo"), "--grpc-port", str(gport)], port, tmp / "tiny.log")
        tensor = np.zeros((1, 3, 8, 8), np.float32)
        greq = codec.infer_request("tiny", None, {"image": tensor}, [])
        body, header_length = v2_tensor_body(tensor)
        h2 = H2load(tmp, port, gport, "tiny", greq.SerializeToString(), body, header_length)
        hreq = [(loadgen.request_bytes("POST", "/v2/models/tiny/infer", body,
                                       {"Inference-Header-Content-Length": str(header_length)}),
                 lambda b: b'"outputs"' in b)]
        tg = triton_grpc.InferenceServerClient(f"127.0.0.1:{gport}")
        th = triton_http.InferenceServerClient(f"127.0.0.1:{port}")
        for protocol in ("grpc", "v2"):  # warm up
            h2.run(protocol, 300, 1)
        grpc_round_trips(gport, greq, 300)
        loadgen.run(port, hreq, concurrency=1, count=300)
        triton_round_trips(tg, tensor, 100), triton_round_trips(th, tensor, 100)
        same = {"grpc": [], "v2": []}
        flood = {"grpc": [], "v2": []}
        python = {"grpc": [], "v2": []}
        triton = {"grpc": [], "v2": []}
        for n in range(args.rounds):
            order = ("grpc", "v2") if n % 2 == 0 else ("v2", "grpc")  # who goes first alternates too
            blocks = {"grpc": [], "v2": []}
            for _ in range(4):  # one request at a time: short blocks, interleaved, so drift hits both
                for protocol in order:
                    blocks[protocol].append(h2.run(protocol, 500, 1)[0])
            for protocol in order:
                same[protocol].append(statistics.median(blocks[protocol]))
            for protocol in order:
                flood[protocol].append(h2.run(protocol, 8000, 32)[1])
            for protocol in order:
                if protocol == "grpc":
                    python["grpc"].append(statistics.median(grpc_round_trips(gport, greq, 1500)))
                    triton["grpc"].append(statistics.median(triton_round_trips(tg, tensor, 1000)))
                else:
                    python["v2"].append(loadgen.run(port, hreq, concurrency=1, count=1500).p50)
                    triton["v2"].append(statistics.median(triton_round_trips(th, tensor, 1000)))
        tg.close(), th.close()
        proc.terminate()
        proc.wait(timeout=60)
        lines.append(ratio_line("trivial model, C=1, p50, h2load on both sides", same["grpc"], same["v2"], "ms", 1000,
                                " (bar <= 1.0)"))
        lines.append(ratio_line("trivial model, C=1, p50, grpcio blocking stub / raw-socket HTTP", python["grpc"],
                                python["v2"], "ms", 1000, ""))
        lines.append(ratio_line("trivial model, C=1, p50, tritonclient.grpc / tritonclient.http", triton["grpc"],
                                triton["v2"], "ms", 1000, ""))
        lines.append(ratio_line("trivial model, 32 in flight, h2load, req/s", flood["grpc"], flood["v2"], "req/s", 1, ""))

        # -- default model, 32 in flight
        files = photo_files(tmp / "photos")
        datas = [p.read_bytes() for p in files]
        labels = [p[0].label for p in Model.load(bundle).classify(datas, 1)]
        port, gport = free_port(), free_port()
        proc, _ = start_server(["--grpc-port", str(gport)], port, tmp / "server.log")
        grequests = [(codec.infer_request(default_model.NAME, None, [d], [("probabilities", 1)]), label)
                     for d, label in zip(datas, labels)]
        hrequests = v2_classify_requests(datas, labels, default_model.NAME)
        raw = hrequests[0][0]
        head, _, body = raw.partition(b"\r\n\r\n")
        header_length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                 if line.lower().startswith(b"inference-header-content-length")))
        h2 = H2load(tmp, port, gport, default_model.NAME, grequests[0][0].SerializeToString(), body, header_length)
        asyncio.run(grpc_closed_loop(gport, grequests, 8, 48))
        loadgen.run(port, hrequests, concurrency=8, count=48)
        rates = {"grpc": [], "v2": []}
        same = {"grpc": [], "v2": []}
        client_cpu = {"grpc": [], "v2": []}  # the Python clients' own CPU a request, on the server's two cores
        g_wrong = h_wrong = 0
        for n in range(args.rounds):
            order = ("grpc", "v2") if n % 2 == 0 else ("v2", "grpc")
            for protocol in order:
                cpu_before = own_cpu_s()
                if protocol == "grpc":
                    rate, wrong = asyncio.run(grpc_closed_loop(gport, grequests, 32, args.count))
                    rates["grpc"].append(rate)
                    g_wrong += wrong
                else:
                    r = loadgen.run(port, hrequests, concurrency=32, count=args.count)
                    rates["v2"].append(r.throughput)
                    h_wrong += r.wrong + r.errors
                client_cpu[protocol].append((own_cpu_s() - cpu_before) / args.count)
            for protocol in order:
                same[protocol].append(h2.run(protocol, args.count, 32)[1])
        proc.terminate()
        proc.wait(timeout=60)
        lines.append(ratio_line("default model, 32 in flight, img/s, h2load on both sides", same["grpc"], same["v2"],
                                "img/s", 1, " (bar >= 1.0)"))
        lines.append(ratio_line(f"default model, 32 in flight, {args.count} requests a round, img/s, grpc.aio / raw-socket HTTP",
                                rates["grpc"], rates["v2"], "img/s", 1, f"; wrong or failed: gRPC {g_wrong}, HTTP {h_wrong}"))
        lines.append(ratio_line("  the Python clients' own CPU a request (same two cores)", client_cpu["grpc"], client_cpu["v2"],
                                "ms", 1000, ""))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
