"""modelport bench (modelport/bench/) against real servers: counts, wrong answers, stalls, protocols."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import make_tiny_bundle
from servers import Server


def bench(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modelport", "bench", *args], capture_output=True, text=True,
                          timeout=timeout_s)


@pytest.fixture(scope="module")
def photos(images, tmp_path_factory):
    """The two sample photos, and what `modelport classify --json` says of them."""
    directory = tmp_path_factory.mktemp("bench-photos")
    for name, path in images.items():
        (directory / f"{name}.jpg").write_bytes(path.read_bytes())
    expect = directory.parent / "expect.json"
    result = subprocess.run([sys.executable, "-m", "modelport", "classify", "--json",
                             *sorted(str(p) for p in directory.iterdir())], capture_output=True, text=True, check=True)
    expect.write_text(result.stdout)
    return directory, expect


def levels(result: subprocess.CompletedProcess) -> list[dict]:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["levels"]


@pytest.mark.parametrize("protocol", ["upload", "v2", "tfserving", "zmq", "grpc"])
def test_every_protocol_counts_right_answers(default_server, photos, protocol):
    directory, expect = photos
    url = {"zmq": default_server.zmq_url, "grpc": f"grpc://{default_server.grpc_address}"}.get(protocol, default_server.url)
    (level,) = levels(bench(url, "--images", str(directory), "--protocol", protocol, "--concurrency", "2",
                            "--duration", "1.5", "--expect", str(expect), "--json", "-"))
    assert level["sent"] == level["ok"] + level["wrong"] + sum(level["errors"].values())
    assert level["ok"] > 5 and level["wrong"] == 0 and not level["errors"]
    assert level["latency_ms"]["p50"] <= level["latency_ms"]["p99"] <= level["latency_ms"]["max"]
    if protocol not in ("zmq", "grpc"):  # modelport's own figures, read from /metrics around the run
        assert level["server"]["batches"] > 0 and level["server"]["mean_batch_size"] >= 1


def test_wrong_answers_and_errors_are_counted_apart(default_server, photos, tmp_path):
    directory, expect = photos
    lines = [json.loads(line) for line in expect.read_text().splitlines()]
    for entry in lines:  # claim every photo is the other one
        entry["path"] = {"cat.jpg": "espresso.jpg", "espresso.jpg": "cat.jpg"}[entry["path"].rsplit("/", 1)[1]]
    swapped = tmp_path / "swapped.json"
    swapped.write_text("\n".join(json.dumps(e) for e in lines) + "\n")
    (level,) = levels(bench(default_server.url, "--images", str(directory), "--concurrency", "2", "--duration", "1",
                            "--expect", str(swapped), "--json", "-"))
    assert level["wrong"] == level["sent"] > 0 and level["ok"] == 0
    (level,) = levels(bench(default_server.url, "--images", str(directory), "--model", "no-such-model",
                            "--concurrency", "2", "--duration", "0.5", "--json", "-"))
    assert level["errors"] == {"http 404 not_found": level["sent"]} and level["ok"] == 0


def test_a_stalled_server_shows_its_stall_in_open_loop_latency(tmp_path, photos):
    directory, _ = photos
    make_tiny_bundle(tmp_path / "repo" / "tiny" / "1", size=8)
    server = Server(str(tmp_path / "repo"), log=tmp_path / "server.log").wait_ready()
    try:
        def stall() -> None:
            time.sleep(2.5)  # the run has started (after its 1 s warm-up)
            server.proc.send_signal(signal.SIGSTOP)
            time.sleep(0.8)
            server.proc.send_signal(signal.SIGCONT)

        staller = threading.Thread(target=stall)
        staller.start()
        (level,) = levels(bench(server.url, "--images", str(directory), "--model", "tiny", "--rate", "40",
                                "--duration", "4", "--json", "-"))
        staller.join()
    finally:
        server.stop()
    # Measured from the planned send time, the requests planned during the stall wait for it: the
    # worst one about the whole stall, and more than 1 % of requests more than half of it.
    assert level["latency_ms"]["max"] >= 700
    assert level["latency_ms"]["p99"] >= 400
    assert level["sent"] == level["ok"] + sum(level["errors"].values())
    assert level["schedule_error_ms"]["p99"] < 50  # the generator kept its schedule meanwhile


def test_a_sweep_writes_its_json_and_plot(default_server, photos, tmp_path):
    directory, _ = photos
    out, png = tmp_path / "out.json", tmp_path / "sweep.png"
    result = bench(default_server.url, "--images", str(directory), "--rate", "5:15:5", "--duration", "1",
                   "--arrivals", "constant", "--json", str(out), "--plot", str(png))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert [level["offered_per_s"] for level in report["levels"]] == [5, 10, 15]
    assert [level["sent"] for level in report["levels"]] == [5, 10, 15]  # constant arrivals: rate x duration
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 20_000
    assert "p99 ms" in result.stdout and "right/s" in result.stdout  # a pipe gets the whole table


def test_bad_arguments_are_clear(default_server, photos):
    directory, _ = photos
    for args, message in ((["--rate", "10", "--concurrency", "2"], "give --rate"),
                          (["--rate", "9:1:1"], "STOP >= START"),
                          (["--concurrency", "0"], "at least 1")):
        result = bench(default_server.url, "--images", str(directory), *args)
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
