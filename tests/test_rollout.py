"""Safe rollouts under live traffic, with real models and a real server: a bad version is rolled
back in shadow without one wrong answer reaching a user, a good one is promoted, a slow one is
rolled back on the latency rule; manual promote and abort need the token; policy errors name
the field."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import make_tiny_bundle
from modelport import samples
from modelport.errors import BundleError
from modelport.repository.model_config import read_model_config
from servers import Server, metric, wait_until
from test_slo import cost_bundle

TOKEN = "rollout-secret"


class Traffic:
    """Live users: one thread posting images in a loop, keeping each answer's status, version and label."""

    def __init__(self, url: str, model: str, images: list[bytes]) -> None:
        self.url, self.model, self.images = url, model, images
        self.answers: list[tuple[int, str, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            i = 0
            while not self._stop.is_set():
                image = self.images[i % len(self.images)]
                response = client.post(self.url + "/", params={"model": self.model}, files={"data": image})
                label = response.json()[0][0] if response.status_code == 200 else None
                self.answers.append((response.status_code, response.headers.get("x-model-version", ""), label))
                i += 1

    def since(self, start: int) -> list[tuple[int, str, str | None]]:
        return self.answers[start:]


def rollout_status(url: str, model: str) -> dict | None:
    response = httpx.get(f"{url}/v2/models/{model}/rollout")
    return response.json() if response.status_code == 200 else None


def wait_stage(url: str, model: str, stage: str, timeout_s: float = 30) -> dict:
    seen = []

    def reached() -> bool:
        seen[:] = [rollout_status(url, model)]
        return (seen[0] or {}).get("stage") == stage

    try:
        wait_until(reached, timeout_s, what=f"rollout {stage}")
    except TimeoutError as exc:  # say where it stood
        raise TimeoutError(f"{exc}; the rollout: {seen[0]}") from None
    return seen[0]


def write_policy(model_dir: Path, rollout: str, labels: str = "") -> None:
    (model_dir / "model.toml").write_text(f"[rollout]\n{rollout}\n" + (f"[labels]\n{labels}\n" if labels else ""))


@pytest.fixture(scope="module")
def pictures() -> list[bytes]:
    rng = np.random.default_rng(3)
    return [samples.jpeg(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(12)]


def serve(repo: Path, tmp_path: Path) -> Server:
    return Server(str(repo), "--admin-token", TOKEN, log=tmp_path / "server.log").wait_ready()


def test_a_bad_version_is_rolled_back_in_shadow_and_no_user_sees_it(tmp_path, pictures):
    repo = tmp_path / "repo"
    make_tiny_bundle(repo / "m" / "1")
    # Not a latency test: a busy machine's latency noise must not decide it (max_p99_ratio is tested below).
    write_policy(repo / "m", "shadow_requests = 40\nmin_agreement = 0.9\ncanary_share = 0.5\ncanary_requests = 20\n"
                             "max_p99_ratio = 100")
    server = serve(repo, tmp_path)
    try:
        with Traffic(server.url, "m", pictures) as traffic:
            wait_until(lambda: len(traffic.answers) > 20)
            # Version 2: the same model with its labels file shuffled (a classic bad release).
            make_tiny_bundle(repo / "m" / "2", labels=["class3", "class2", "class1", "class0"])
            status = wait_stage(server.url, "m", "rolled_back")
            seen_before = len(traffic.answers)
            wait_until(lambda: len(traffic.answers) > seen_before + 20)
        assert "agreement" in status["reason"] and "min_agreement 0.9" in status["reason"]
        assert status["shadow"]["compared"] >= 4 and status["shadow"]["agreement"] < 0.9
        assert status["canary"]["answers"] == 0
        assert {version for _, version, _ in traffic.answers} == {"1"}  # every user answer came from version 1
        assert all(code == 200 for code, _, _ in traffic.answers)
        index = httpx.post(server.url + "/v2/repository/index", headers={"authorization": f"Bearer {TOKEN}"}).json()
        entry = next(e for e in index if e["version"] == "2")
        assert entry["state"] == "ROLLED_BACK" and "agreement" in entry["reason"]
        tf = httpx.get(server.url + "/v1/models/m").json()["model_version_status"]
        assert any(v["version"] == "2" and v["state"] == "END" and "agreement" in v["status"]["error_message"]
                   for v in tf)
        assert metric(server.url, "modelport_rollout_stage", model="m", version="2", stage="rolled_back") == 1
        assert metric(server.url, "modelport_rollout_answers_total", model="m", version="2", stage="shadow") >= 4

        # Not retried while its files stay the same ...
        time.sleep(2.5)
        assert rollout_status(server.url, "m")["stage"] == "rolled_back"
        assert metric(server.url, "modelport_model_state", model="m", version="2", state="ROLLED_BACK") == 1
        # ... and judged again once they change (here: fixed), then promoted through the canary.
        (repo / "m" / "2" / "labels.txt").write_text("class0\nclass1\nclass2\nclass3\n")
        with Traffic(server.url, "m", pictures) as traffic:
            status = wait_stage(server.url, "m", "promoted", 60)
            wait_until(lambda: traffic.answers and traffic.answers[-1][1] == "2")
        assert status["shadow"]["agreement"] == 1.0 and status["canary"]["answers"] >= 20
        assert all(code == 200 for code, _, _ in traffic.answers)
    finally:
        server.stop()


def test_without_shadow_the_canary_catches_a_bad_version_within_a_few_answers(tmp_path, pictures):
    repo = tmp_path / "repo"
    make_tiny_bundle(repo / "m" / "1")
    write_policy(repo / "m", "shadow_requests = 0\nmin_agreement = 0.9\ncanary_share = 0.2\ncanary_requests = 200\n"
                             "max_p99_ratio = 100")
    server = serve(repo, tmp_path)
    try:
        with Traffic(server.url, "m", pictures) as traffic:
            wait_until(lambda: len(traffic.answers) > 10)
            start = len(traffic.answers)
            make_tiny_bundle(repo / "m" / "2", labels=["class3", "class2", "class1", "class0"])
            status = wait_stage(server.url, "m", "rolled_back")
            end = len(traffic.answers)
            wait_until(lambda: len(traffic.answers) > end + 20)
        assert "canary answers compared" in status["reason"]
        bad = [a for a in traffic.since(start) if a[1] == "2"]
        # It answered some users (that is what a canary is), far fewer than its 200 planned answers.
        # (one already on its way to version 2 when it was rolled back is answered, not counted)
        assert 1 <= len(bad) <= 40 and status["canary"]["answers"] in (len(bad), len(bad) - 1)
        # The canary's share holds request by request, not only on average: never more than one
        # answer over 20 % of the requests since it started (plus one on its way at the rollback).
        assert len(bad) <= 0.2 * (end - start) + 2, (len(bad), end - start)
        assert {a[1] for a in traffic.answers[end + 2:]} == {"1"}  # (one may have been on its way)
    finally:
        server.stop()


def test_a_good_version_goes_through_the_canary_and_takes_the_labels(tmp_path, pictures):
    repo = tmp_path / "repo"
    make_tiny_bundle(repo / "m" / "1")
    write_policy(repo / "m", "shadow_requests = 20\ncanary_share = 0.3\ncanary_requests = 30\nmax_p99_ratio = 100",
                 labels="stable = 1")
    server = serve(repo, tmp_path)
    try:
        with Traffic(server.url, "m", pictures) as traffic:
            wait_until(lambda: len(traffic.answers) > 10)
            start = len(traffic.answers)
            make_tiny_bundle(repo / "m" / "2")
            wait_stage(server.url, "m", "canary")
            status = wait_stage(server.url, "m", "promoted", 60)
            wait_until(lambda: traffic.answers[-1][1] == "2")
            during = traffic.since(start)
        assert all(code == 200 for code, _, _ in during)  # zero errors through the whole rollout
        versions = [version for _, version, _ in during]
        first_two = versions.index("2")
        # The canary's answers were a share of the requests, mixed with version 1's, before promotion.
        canary_window = versions[first_two:first_two + 40]
        assert "1" in canary_window and canary_window.count("2") >= 3
        assert "canary passed" in status["reason"]
        wait_until(lambda: httpx.get(server.url + "/v1/models/m/labels/stable").json()
                   ["model_version_status"][0]["version"] == "2", what="label stable moved to 2")
        wait_until(lambda: httpx.get(server.url + "/v2/models/m/versions/1/ready").status_code != 200,
                   what="version 1 retired after promotion")
    finally:
        server.stop()


def test_a_slow_version_is_rolled_back_on_the_latency_rule(tmp_path, pictures):
    repo = tmp_path / "repo"
    cost_bundle(repo / "m" / "1", "0 0.001", max_batch_size=4)
    write_policy(repo / "m", "shadow_requests = 15\nmax_p99_ratio = 1.5\ncanary_share = 0")
    server = serve(repo, tmp_path)
    try:
        with Traffic(server.url, "m", pictures):
            cost_bundle(repo / "m" / "2", "0 0.015", max_batch_size=4)  # fifteen times slower, same answers
            status = wait_stage(server.url, "m", "rolled_back", 60)
        assert status["shadow"]["agreement"] == 1.0
        assert "compute time" in status["reason"] and "max_p99_ratio 1.5" in status["reason"]
        assert status["shadow"]["p99_compute_ratio"] > 1.5
    finally:
        server.stop()


def test_manual_promote_and_abort_need_the_token(tmp_path, pictures):
    repo = tmp_path / "repo"
    make_tiny_bundle(repo / "m" / "1")
    write_policy(repo / "m", "shadow_requests = 1000000\ncanary_share = 0")  # never decides by itself
    server = serve(repo, tmp_path)
    try:
        assert httpx.get(server.url + "/v2/models/m/rollout").status_code == 404  # none yet
        with Traffic(server.url, "m", pictures) as traffic:
            make_tiny_bundle(repo / "m" / "2")
            wait_stage(server.url, "m", "shadow")
            promote = server.url + "/v2/repository/models/m/rollout/promote"
            assert httpx.post(promote).status_code == 401
            assert httpx.post(promote, headers={"authorization": "Bearer wrong"}).status_code == 401
            assert rollout_status(server.url, "m")["stage"] == "shadow"
            response = httpx.post(promote, headers={"authorization": f"Bearer {TOKEN}"})
            assert response.status_code == 200 and response.json()["stage"] == "promoted"
            assert response.json()["reason"] == "promoted by the management API"
            wait_until(lambda: traffic.answers[-1][1] == "2")

            shutil.copytree(repo / "m" / "2", repo / "m" / "3")
            wait_stage(server.url, "m", "shadow")
            abort = server.url + "/v2/repository/models/m/rollout/abort"
            assert httpx.post(abort).status_code == 401
            # The CLI, as an operator would: a wrong token is refused with exit status 1, the right one works.
            cli = [sys.executable, "-m", "modelport", "rollout"]
            refused = subprocess.run([*cli, "abort", str(repo / "m"), "--url", server.url, "--admin-token", "wrong"],
                                     capture_output=True, text=True)
            assert refused.returncode != 0 and "token" in refused.stderr
            done = subprocess.run([*cli, "abort", "m", "--url", server.url, "--admin-token", TOKEN],
                                  capture_output=True, text=True)
            assert done.returncode == 0 and "rolled back (aborted by the management API)" in done.stdout
            shown = subprocess.run([*cli, "status", str(repo / "m"), "--url", server.url, "--json"],
                                   capture_output=True, text=True)
            assert json.loads(shown.stdout)["stage"] == "rolled_back"
            # Nothing left to abort: a clear 404, not a 500.
            again = httpx.post(abort, headers={"authorization": f"Bearer {TOKEN}"})
            assert again.status_code == 404 and "no rollout in progress" in again.json()["error"]
            start = len(traffic.answers)
            wait_until(lambda: len(traffic.answers) > start + 10)
        assert {version for _, version, _ in traffic.since(start)} == {"2"}
    finally:
        server.stop()


@pytest.mark.parametrize("table, field", [
    ("min_agreement = 1.5", "rollout.min_agreement"),
    ("canary_share = -0.1", "rollout.canary_share"),
    ("shadow_requests = 2.5", "rollout.shadow_requests"),
    ("max_p99_ratio = 0.5", "rollout.max_p99_ratio"),
    ("max_error_rate = \"low\"", "rollout.max_error_rate"),
    ("shadow_request = 10", "rollout.shadow_request"),
    ("canary_share = 0.2\ncanary_requests = 0", "rollout.canary_share"),
])
def test_policy_errors_name_the_field(tmp_path, table, field):
    write_policy(tmp_path, table)
    with pytest.raises(BundleError, match=field.replace(".", r"\.")):
        read_model_config(tmp_path)


def test_a_valid_policy_reads_with_defaults(tmp_path):
    write_policy(tmp_path, "shadow_requests = 50\ncanary_share = 0.2\ncanary_requests = 100")
    policy = read_model_config(tmp_path).rollout
    assert (policy.shadow_requests, policy.canary_share, policy.canary_requests) == (50, 0.2, 100)
    assert (policy.min_agreement, policy.max_error_rate, policy.max_p99_ratio) == (0.97, 0.01, 1.5)


def test_a_candidate_whose_directory_goes_away_is_rolled_back_and_nobody_notices(tmp_path, pictures):
    repo = tmp_path / "repo"
    make_tiny_bundle(repo / "m" / "1")
    write_policy(repo / "m", "shadow_requests = 1000000\ncanary_share = 0")
    server = serve(repo, tmp_path)
    try:
        with Traffic(server.url, "m", pictures) as traffic:
            make_tiny_bundle(repo / "m" / "2")
            wait_stage(server.url, "m", "shadow")
            shutil.rmtree(repo / "m" / "2")
            status = wait_stage(server.url, "m", "rolled_back")
            start = len(traffic.answers)
            wait_until(lambda: len(traffic.answers) > start + 10)
        assert "no longer wanted" in status["reason"]
        assert all(code == 200 and version == "1" for code, version, _ in traffic.answers)
        wait_until(lambda: all(e["version"] != "2" for e in httpx.post(
            server.url + "/v2/repository/index", headers={"authorization": f"Bearer {TOKEN}"}).json()),
            what="the removed version forgotten")
    finally:
        server.stop()


@pytest.mark.parametrize("share", [0.1, 0.25, 0.5, 0.03])
def test_the_canary_share_holds_request_by_request(share):
    """After any number of requests the canary has answered share x n of them, give or take one;
    its picks follow no fixed period."""
    import random
    import types

    from modelport.lifecycle.rollout import Rollout, Stage
    from modelport.repository.model_config import RolloutPolicy

    serving, candidate = types.SimpleNamespace(version=1), types.SimpleNamespace(version=2)
    rollout = Rollout("m", RolloutPolicy(shadow_requests=0, canary_share=share, canary_requests=10 ** 6),
                      serving, candidate, on_end=lambda r: None, rng=random.Random(7).random)
    rollout._enter(Stage.CANARY)
    taken, gaps, last = 0, set(), 0
    for n in range(1, 20001):
        if rollout.pick() is candidate:
            taken += 1
            gaps.add(n - last)
            last = n
        assert share * n - 1 <= taken <= share * n + 1, (n, taken)
    assert len(gaps) > 1  # not a fixed stride
