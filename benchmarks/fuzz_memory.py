"""A long fuzz run against the default model: no 5xx, and memory flat.

    python benchmarks/fuzz_memory.py [--rounds 3] [--http 3000] [--zmq 1500] [--oversized]

The server serves EfficientNet-Lite0 (the real default model, under the fuzz target's name
``tiny`` so that the request generators of ``tests/fuzzing.py`` aim at it) over HTTP and ZeroMQ.
The limit is the server's own RSS after warm-up: good requests at every batch size from 1 to 16
images (16 is over max_batch_size, so split). Then rounds of fuzzing, each followed by the same
good requests; the figure is RSS after each round as a ratio to that limit (target <= 1.05).
``--oversized`` adds the requests of 128 tiny images that used to run as one batch of 128.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import httpx
import msgpack
import zmq
from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
import fuzzing  # noqa: E402
from http_server import free_port, start_server  # noqa: E402
from repository import rss_mb  # noqa: E402

from modelport import samples  # noqa: E402

from modelport.packaged import default_model  # noqa: E402


def good_traffic(url: str, photos: list[bytes]) -> None:
    """Every batch size from 1 to 16, binary V2; the answers are checked against one another."""
    with httpx.Client(base_url=url, timeout=60) as client:
        for n in range(1, 17):
            raw = b"".join(struct.pack("<I", len(p)) + p for p in photos[:n])
            header = (b'{"inputs":[{"name":"image_bytes","shape":[%d],"datatype":"BYTES",'
                      b'"parameters":{"binary_data_size":%d}}],"outputs":[{"name":"probabilities",'
                      b'"parameters":{"classification":1}}]}' % (n, len(raw)))
            reply = client.post("/v2/models/tiny/infer", content=header + raw,
                                headers={"inference-header-content-length": str(len(header))})
            assert reply.status_code == 200, reply.text
            assert len(reply.json()["outputs"][0]["data"]) == n


def fuzz_round(url: str, zmq_port: int, http_cases: int, zmq_cases: int, oversized: bool,
               statuses: collections.Counter) -> None:
    quiet = settings(derandomize=False, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    with httpx.Client(base_url=url, timeout=60) as client:
        @settings(quiet, max_examples=http_cases)
        @given(fuzzing.http_cases)
        def http_one(case: fuzzing.HttpCase) -> None:
            status = client.request(case.method, case.path, content=case.body, headers=case.headers).status_code
            statuses[status if fuzzing.allowed_http(case, status) else f"{status} (not allowed)"] += 1

        http_one()
        if oversized:
            raw = b"".join(struct.pack("<I", len(p)) + p for p in [fuzzing.png(i) for i in range(128)])
            header = (b'{"inputs":[{"name":"image_bytes","shape":[128],"datatype":"BYTES",'
                      b'"parameters":{"binary_data_size":%d}}]}' % len(raw))
            for _ in range(20):
                statuses[client.post("/v2/models/tiny/infer", content=header + raw,
                                     headers={"inference-header-content-length": str(len(header))}).status_code] += 1
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.RCVTIMEO, 30_000)
    socket.connect(f"tcp://127.0.0.1:{zmq_port}")

    @settings(quiet, max_examples=zmq_cases)
    @given(fuzzing.zmq_frames)
    def zmq_one(frame: bytes) -> None:
        socket.send(frame)
        reply = msgpack.unpackb(socket.recv(), raw=False, strict_map_key=False)
        status = 200 if reply["ok"] else reply["error"]["status"]
        statuses[f"zmq {status}" if fuzzing.allowed_zmq(frame, reply) else f"zmq {status} (not allowed)"] += 1

    zmq_one()
    socket.close(0)
    context.term()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--http", type=int, default=3000, help="HTTP cases per round")
    parser.add_argument("--zmq", type=int, default=1500, help="ZeroMQ cases per round")
    parser.add_argument("--oversized", action="store_true", help="also send 128-image requests (over the limit)")
    parser.add_argument("--server-args", default="", help="extra `modelport serve` options")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fuzzmem"))
    shutil.copytree(default_model.ensure_default_model(), work / "repo" / "tiny" / "1")
    port, zmq_port = free_port(), free_port()
    proc, _ = start_server([str(work / "repo"), "--zmq-port", str(zmq_port), "--max-queue-size", "1000",
                            "--admin-token", fuzzing.ADMIN_TOKEN, *args.server_args.split()], port, work / "server.log")
    url = f"http://127.0.0.1:{port}"
    photos = samples.photo_set(16, seed=0)
    statuses: collections.Counter = collections.Counter()
    try:
        good_traffic(url, photos)
        good_traffic(url, photos)
        warm = rss_mb(proc.pid)
        print(f"RSS after warm-up (the limit's base): {warm:.0f} MB")
        for i in range(args.rounds):
            start = time.perf_counter()
            fuzz_round(url, zmq_port, args.http, args.zmq, args.oversized, statuses)
            good_traffic(url, photos)
            rss = rss_mb(proc.pid)
            print(f"round {i + 1}: {args.http} HTTP + {args.zmq} ZeroMQ cases in {time.perf_counter() - start:.0f} s, "
                  f"RSS {rss:.0f} MB = {rss / warm:.3f} x warm-up (target <= 1.05)")
        alive = proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(30)
    refused = sum(n for s, n in statuses.items() if "not allowed" in str(s))
    print(f"statuses: {dict(sorted(statuses.items(), key=str))}")
    print(f"answers outside 2xx/4xx/503 (504 only for requests that set a deadline): {refused} (target 0); "
          f"server alive throughout: {alive}")
    print(f"tracebacks in the server log: {(work / 'server.log').read_text().count('Traceback')}")


if __name__ == "__main__":
    main()
