"""Issue 15's figures: safe rollouts of the default model under continuous open-loop load.

    python benchmarks/rollout.py [--rate 30] [--seconds 20]

One `modelport serve` over a repository holding the default model as `m`, with a [rollout] policy.
Users are an open-loop Poisson stream of photo uploads at --rate; every answer's version and label
is kept, and a label is "wrong" when it differs from what version 1 answers for that photo.
1. p99 of user requests while a version is in shadow / p99 with no rollout (target <= 1.1), in
   interleaved windows (--rounds pairs of --seconds each: no rollout, then a version in a shadow
   stage that never ends, aborted after its window): the machine's drift over minutes (+-20 % on
   these shared machines) lands on both sides alike, which one window of each does not give;
2. a good version (the same files) arrives: shadow -> canary -> promoted; errors (target 0), and
   the same p99 ratio over its single shadow window against the first baseline (informative);
3. a bad version (labels file shuffled), shadow on: rolled back in shadow; user-visible wrong
   answers (target 0);
4. a bad version, shadow off, canary 10 %: the users who saw it / (canary share x requests in the
   window it was judged over) (target <= 1).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from common import photo_files  # noqa: E402
from servers import Server, wait_until  # noqa: E402

from modelport.packaged import default_model  # noqa: E402

TOKEN = "rollout-bench"
ENDLESS_SHADOW = "shadow_requests = 1000000\ncanary_share = 0\n"
SHADOW_POLICY = "shadow_requests = 300\nmin_agreement = 0.97\ncanary_share = 0.1\ncanary_requests = 300\n"
CANARY_ONLY = "shadow_requests = 0\nmin_agreement = 0.97\ncanary_share = 0.1\ncanary_requests = 300\n"


def publish(source: Path, target: Path, shuffle_labels: bool = False) -> None:
    staging = target.parent / f".{target.name}"
    staging.mkdir()
    for item in source.iterdir():
        if item.name == "labels.txt" and shuffle_labels:
            labels = item.read_text().splitlines()
            random.Random(0).shuffle(labels)
            (staging / item.name).write_text("\n".join(labels) + "\n")
        else:
            (staging / item.name).symlink_to(item.resolve())
    staging.rename(target)  # seen at once, complete


class Users:
    """Open-loop Poisson uploads; each answer: (sent at, latency s, status, version, label, photo)."""

    def __init__(self, url: str, photos: list[bytes], rate: float) -> None:
        self.url, self.photos, self.rate = url, photos, rate
        self.answers: list[tuple[float, float, int, str, str | None, int]] = []
        self._stop = False

    async def run(self, until) -> None:
        rng = random.Random(1)
        tasks = set()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:
            start = time.monotonic()
            planned = start
            while not until():
                planned += rng.expovariate(self.rate)
                await asyncio.sleep(max(0.0, planned - time.monotonic()))
                task = asyncio.ensure_future(self._one(session, planned, rng.randrange(len(self.photos))))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)

    async def _one(self, session, planned: float, photo: int) -> None:
        form = aiohttp.FormData()
        form.add_field("data", self.photos[photo], filename="photo.jpg", content_type="image/jpeg")
        async with session.post(self.url + "/?model=m", data=form) as response:
            body = await response.json(content_type=None)
            label = body[0][0] if response.status == 200 else None
            self.answers.append((planned, time.monotonic() - planned, response.status,
                                 response.headers.get("x-model-version", ""), label, photo))


def run_users(url, photos, rate, until) -> Users:
    users = Users(url, photos, rate)
    asyncio.run(users.run(until))
    return users


def status(url: str) -> dict:
    response = httpx.get(url + "/v2/models/m/rollout")
    return response.json() if response.status_code == 200 else {}


class Watch:
    """The rollout's status, polled in a thread of its own (a blocking poll inside the generator's
    loop would delay its sends and show up as latency), with when each stage was first seen."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.now: dict = {}
        self.first_seen: dict[tuple[str, str], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.now = status(self.url)
            key = (self.now.get("candidate_version"), self.now.get("stage"))
            self.first_seen.setdefault(key, time.monotonic())
            time.sleep(0.1)

    def stage(self, version: str) -> str | None:
        now = self.now
        return now.get("stage") if now.get("candidate_version") == version else None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def p99(latencies) -> float:
    return quantile_ms(latencies, 99)


def quantile_ms(latencies, q: float) -> float:
    return float(np.percentile(np.array(latencies), q)) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=30)
    parser.add_argument("--seconds", type=float, default=20, help="per window")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved pairs of windows for the p99 ratio")
    args = parser.parse_args()
    source = default_model.ensure_default_model()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = [p.read_bytes() for p in photo_files(tmp / "photos")]
        repo = tmp / "repo"
        (repo / "m").mkdir(parents=True)
        publish(source, repo / "m" / "1")
        (repo / "m" / "model.toml").write_text("[rollout]\n" + ENDLESS_SHADOW)
        server = Server(str(repo), "--log-level", "warning", "--admin-token", TOKEN,
                        log=tmp / "server.log").wait_ready(120)
        watch = Watch(server.url)
        try:
            def window() -> Users:
                end = time.monotonic() + args.seconds
                return run_users(server.url, photos, args.rate, lambda: time.monotonic() > end)

            def ok_latencies(users: Users) -> list[float]:
                return [lat for _, lat, code, *_ in users.answers if code == 200]

            # 1. p99 with a version in shadow / without a rollout, interleaved windows
            window()  # warm: the first seconds after start are slower than any later ones
            base, truth, pooled = None, {}, {"none": [], "shadow": []}
            version = 1
            for round_ in range(args.rounds):
                plain = window()
                base = base or plain
                truth.update({photo: label for _, _, code, _, label, photo in plain.answers if code == 200})
                version += 1
                publish(source, repo / "m" / str(version))
                wait_until(lambda: watch.stage(str(version)) == "shadow", 120, what="shadow")
                shadowed = window()
                copies = status(server.url)["shadow"]
                httpx.post(f"{server.url}/v2/repository/models/m/rollout/abort",
                           headers={"authorization": f"Bearer {TOKEN}"}).raise_for_status()
                wait_until(lambda: watch.stage(str(version)) == "rolled_back", 30, what="aborted")
                pooled["none"] += ok_latencies(plain)
                pooled["shadow"] += ok_latencies(shadowed)
                print(f"round {round_ + 1}: p99 {p99(ok_latencies(shadowed)):.1f} ms in shadow / "
                      f"{p99(ok_latencies(plain)):.1f} ms without = "
                      f"{p99(ok_latencies(shadowed)) / p99(ok_latencies(plain)):.2f}; {copies['compared']} copies "
                      f"compared, {copies['dropped']} not made", flush=True)
            ratio = p99(pooled["shadow"]) / p99(pooled["none"])
            print(f"p99 of user requests in shadow / without a rollout, {args.rounds} interleaved pairs of "
                  f"{args.seconds:g} s windows at {args.rate:g} req/s: {p99(pooled['shadow']):.1f} / "
                  f"{p99(pooled['none']):.1f} ms = {ratio:.2f} (target <= 1.1); p50 "
                  f"{quantile_ms(pooled['shadow'], 50) / quantile_ms(pooled['none'], 50):.2f}, p90 "
                  f"{quantile_ms(pooled['shadow'], 90) / quantile_ms(pooled['none'], 90):.2f}", flush=True)
            base_p99 = p99(ok_latencies(base))

            # 2. a good version: shadow -> canary -> promoted
            (repo / "m" / "model.toml").write_text("[rollout]\n" + SHADOW_POLICY)
            time.sleep(1.5)  # the reloader reads model.toml on its next sync
            start = time.monotonic()
            version += 1
            good_version = str(version)
            publish(source, repo / "m" / good_version)
            good = run_users(server.url, photos, args.rate,
                             lambda: watch.stage(good_version) in ("promoted", "rolled_back")
                             or time.monotonic() - start > 900)
            final = status(server.url)
            seen = watch.first_seen
            shadow_from, shadow_to = seen.get((good_version, "shadow"), 0), seen.get((good_version, "canary"), 1e18)
            in_shadow = [lat for sent, lat, code, *_ in good.answers if code == 200 and shadow_from <= sent < shadow_to]
            errors = sum(code != 200 for _, _, code, *_ in good.answers)
            ratio = p99(in_shadow) / base_p99 if len(in_shadow) > 50 else float("nan")
            print(f"good version: {final['stage']} after {time.monotonic() - start:.1f} s ({final['reason']}); "
                  f"{errors} errors in {len(good.answers)} requests; p99 in shadow ({len(in_shadow)} requests over "
                  f"{min(shadow_to, time.monotonic()) - shadow_from:.0f} s) {p99(in_shadow):.1f} ms = {ratio:.2f} x "
                  f"the first window without a rollout (informative: one window each, minutes apart); "
                  f"{final['shadow']['dropped']} copies not made (busy or over the budget)", flush=True)
            wait_until(lambda: httpx.get(server.url + "/v2/models/m/versions/1/ready").status_code != 200, 30)

            # 3. a bad version, shadow on
            start = time.monotonic()
            version += 1
            bad_version = str(version)
            publish(source, repo / "m" / bad_version, shuffle_labels=True)
            bad = run_users(server.url, photos, args.rate,
                            lambda: watch.stage(bad_version) == "rolled_back" or time.monotonic() - start > 600)
            final = status(server.url)
            seen_by_users = sum(v == bad_version for _, _, _, v, *_ in bad.answers)
            wrong = sum(code == 200 and label != truth.get(photo, label) for _, _, code, _, label, photo in bad.answers)
            print(f"bad version, shadow on: {final['stage']} after {time.monotonic() - start:.1f} s "
                  f"({final['reason']}); answers from it {seen_by_users}, wrong answers {wrong} of {len(bad.answers)} "
                  f"(target 0)", flush=True)

            # 4. a bad version, shadow off, canary 10 %
            (repo / "m" / "model.toml").write_text("[rollout]\n" + CANARY_ONLY)
            time.sleep(1.5)  # the reloader reads model.toml on its next sync
            start = time.monotonic()
            version += 1
            canary_version = str(version)
            publish(source, repo / "m" / canary_version, shuffle_labels=True)
            canary = run_users(server.url, photos, args.rate,
                               lambda: watch.stage(canary_version) == "rolled_back" or time.monotonic() - start > 600)
            final = status(server.url)
            begin = watch.first_seen.get((canary_version, "canary"), start)
            seen_by_users = sum(v == canary_version for _, _, _, v, *_ in canary.answers)
            window = sum(sent >= begin for sent, *_ in canary.answers)
            print(f"bad version, canary 10 %: {final['stage']} ({final['reason']}); users who saw it "
                  f"{seen_by_users} of {window} requests in the window it was judged over: "
                  f"{seen_by_users / max(1, 0.1 * window):.2f} x (canary share x window) (target <= 1); "
                  f"{final['canary']['compared']} canary answers compared", flush=True)
        finally:
            watch.close()
            server.stop()
            shutil.rmtree(repo, ignore_errors=True)


if __name__ == "__main__":
    main()
