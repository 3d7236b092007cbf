"""Issue 6's figures: a version switch under load, and 100 load/unload cycles.

    python benchmarks/repository.py [--cycles 100]

1. The default model served from a watched repository under continuous load (4 client threads,
   the article's upload API); a copy of it is published as version 2. Reported: failed requests
   during the switch, and the time from the copy's completion to the first answer from version 2
   (the 2 s target; the reloader waits 0.5 s for files to settle by design).
2. The repository API unloads and reloads the default model ``--cycles`` times; the server's RSS
   and open file descriptors are compared with their values after the first cycles.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from http_server import free_port, start_server  # noqa: E402

from modelport import samples  # noqa: E402

from modelport.packaged import default_model  # noqa: E402

TOKEN = "bench-token"


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=100)
    args = parser.parse_args()
    source = default_model.ensure_default_model()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        repo = tmp / "repo"
        shutil.copytree(source, repo / "lite" / "1")
        port = free_port()
        proc, _ = start_server([str(repo), "--admin-token", TOKEN], port, tmp / "server.log")
        url = f"http://127.0.0.1:{port}"
        image = samples.jpeg(samples.photo("coffee"))
        results: list[tuple[float, int, str | None]] = []
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                while not stop.is_set():
                    response = http.post("/?model=lite", files={"data": image})
                    results.append((time.monotonic(), response.status_code, response.headers.get("x-model-version")))

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(2)
        shutil.copytree(source, tmp / "build" / "2")
        shutil.copytree(tmp / "build" / "2", repo / "lite" / "2")  # the user's `cp -r`
        complete = time.monotonic()
        while not any(v == "2" for _, _, v in results[-4:]) and time.monotonic() - complete < 20:
            time.sleep(0.005)
        first_v2 = next(t for t, _, v in results if v == "2")
        time.sleep(2)
        stop.set()
        for t in threads:
            t.join()
        failed = sum(1 for _, status, _ in results if status != 200)
        after_v2 = [v for t, _, v in results if t > first_v2 + 0.5]

        def cycle(http) -> None:
            assert http.post("/v2/repository/models/lite/unload", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
            assert http.post("/v2/repository/models/lite/load", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
            assert http.post("/?model=lite", files={"data": image}).status_code == 200

        with httpx.Client(base_url=url, timeout=60) as http:
            for _ in range(3):
                cycle(http)
            rss_start, fds_start = rss_mb(proc.pid), len(os.listdir(f"/proc/{proc.pid}/fd"))
            start = time.perf_counter()
            for _ in range(args.cycles):
                cycle(http)
            cycles_s = time.perf_counter() - start
            rss_end, fds_end = rss_mb(proc.pid), len(os.listdir(f"/proc/{proc.pid}/fd"))
        proc.terminate()
        proc.wait(timeout=60)

    print(f"switch under load: {len(results)} requests, {failed} failed; first answer from version 2 "
          f"{first_v2 - complete:.2f} s after its directory was complete = {(first_v2 - complete) / 2:.2f} x the "
          f"2 s target; after it, {sum(v == '2' for v in after_v2)}/{len(after_v2)} answers from version 2")
    print(f"{args.cycles} unload/load cycles of the default model in {cycles_s:.1f} s: RSS {rss_start:.0f} -> "
          f"{rss_end:.0f} MB ({(rss_end / rss_start - 1) * 100:+.1f} %, target within 10 %), file descriptors "
          f"{fds_start} -> {fds_end} ({fds_end - fds_start:+d}, target within 5)")


if __name__ == "__main__":
    main()
