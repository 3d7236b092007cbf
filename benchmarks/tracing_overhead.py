"""Issue 26's tracing figures: the default model at 32 requests in flight, tracing on (100 %
sampled, every span exported to an OTLP/HTTP receiver) against tracing off, and tracing off against
the code before tracing existed (a git worktree of --before), same run, windows alternated.

    python benchmarks/tracing_overhead.py [--count 1200] [--before COMMIT]

Bars: on >= 0.95 x off; off = before (within the windows' noise).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
import loadgen  # noqa: E402
from common import photo_files, v2_classify_requests  # noqa: E402
from http_server import free_port, start_server  # noqa: E402

from modelport.engine.model import Model  # noqa: E402
from modelport.packaged import default_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class Sink:
    """An OTLP/HTTP receiver that counts what it is sent and keeps nothing."""

    def __init__(self) -> None:
        self.posts = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                sink.posts += 1
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def cpu_flags() -> str:
    flags = set(open("/proc/cpuinfo").read().split())
    return " ".join(sorted(f for f in ("avx2", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=1200)
    parser.add_argument("--before", default=None, help="A commit before tracing, to compare 'off' with.")
    args = parser.parse_args()
    bundle = default_model.ensure_default_model()
    sink = Sink()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = photo_files(tmp / "photos")
        datas = [p.read_bytes() for p in files]
        labels = [p[0].label for p in Model.load(bundle).classify(datas, 1)]
        requests = v2_classify_requests(datas, labels, default_model.NAME)
        servers = {}
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        for name, extra in (("off", []), ("on", ["--otlp-endpoint", sink.url, "--trace-sample", "1"])):
            port = free_port()
            servers[name] = (start_server(extra, port, tmp / f"{name}.log")[0], port)
        if args.before:
            worktree = tmp / "before"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.before],
                           check=True, capture_output=True)
            port = free_port()
            os.environ["PYTHONPATH"] = str(worktree)  # the old package first on the path of its server
            servers["before"] = (start_server([], port, tmp / "before.log")[0], port)
            del os.environ["PYTHONPATH"]
        for _, port in servers.values():
            loadgen.run(port, requests, concurrency=8, count=64)
        rates = {name: [] for name in servers}
        wrong = {name: 0 for name in servers}
        for _ in range(3):
            for name, (_, port) in servers.items():
                result = loadgen.run(port, requests, concurrency=32, count=args.count // 3)
                rates[name].append(result.throughput)
                wrong[name] += result.wrong + result.errors
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
        if args.before:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=True)
    mean = {name: statistics.mean(r) for name, r in rates.items()}
    print(f"CPU flags: {cpu_flags()}; 2 cores; default model, 32 in flight, {args.count} requests per server")
    for name, r in rates.items():
        print(f"  {name:6s} {mean[name]:.1f} img/s (windows {', '.join(f'{x:.1f}' for x in r)}); wrong or failed {wrong[name]}")
    print(f"tracing on (100 % sampled, {sink.posts} exports) / off = {mean['on'] / mean['off']:.3f} (bar >= 0.95)")
    if "before" in mean:
        print(f"tracing off / before tracing ({args.before}) = {mean['off'] / mean['before']:.3f} (bar: no measurable change)")


if __name__ == "__main__":
    main()
