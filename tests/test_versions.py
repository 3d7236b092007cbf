"""modelport/lifecycle/watcher.py and versions.py in-process, on a repository of tiny real bundles,
without a server or sockets (the manager's coroutines run under ``asyncio.run``, with watching off).

The watcher: a version counts once its files have been still for the settle time; hidden, invalid
and non-numeric names are not models or versions. The version manager: loads what the policy in
model.toml wants, publishes a new version before the old one retires, keeps a failing version
FAILED with its reason while the old one serves and retries it with backoff (at once when its
files change), unloads and loads on request, holds a pipeline LOADING while a step is still being
written."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import make_tiny_bundle
from modelport.engine.imaging import DEFAULT_MAX_PIXELS
from modelport.engine.model import Model
from modelport.engine.service import ModelService
from modelport.engine.servable import Timing
from modelport.errors import ModelportError, NotFound, Unavailable
from modelport.lifecycle.routing import RoutingTable
from modelport.lifecycle.states import State
from modelport.lifecycle.versions import VersionManager
from modelport.lifecycle.watcher import RepositoryWatcher
from modelport.pipeline.service import PipelineService
from modelport.repository import layout

SETTLE_S = 0.05


def still(seconds: float = SETTLE_S) -> None:
    """Let files stand still for the settle time (what the watcher measures; nothing else waits on it)."""
    time.sleep(seconds + 0.01)


def corrupt(version_dir: Path) -> Path:
    (version_dir / "model.onnx").write_bytes(b"not an ONNX graph")
    return version_dir


# -- the watcher ---------------------------------------------------------------------------------------

def test_a_version_counts_once_its_files_have_been_still_for_the_settle_time(tmp_path):
    version_dir = make_tiny_bundle(tmp_path / "a" / "1")
    watcher = RepositoryWatcher(tmp_path, settle_s=SETTLE_S, watch=False)
    assert watcher.versions("a", tmp_path / "a").complete == {}  # first seen now: not yet
    assert watcher.unsettled() and watcher.unsettled("a") and not watcher.unsettled("b")
    assert watcher.signature("a", 1) == layout.signature(version_dir)
    still()
    assert watcher.versions("a", tmp_path / "a").complete == {1: version_dir}
    assert not watcher.unsettled()


def test_a_file_that_changes_starts_the_settle_time_again(tmp_path):
    version_dir = make_tiny_bundle(tmp_path / "a" / "1")
    watcher = RepositoryWatcher(tmp_path, settle_s=SETTLE_S, watch=False)
    watcher.versions("a", tmp_path / "a")
    still()
    with open(version_dir / "model.onnx", "ab") as copying:  # a copy still under way
        copying.write(b"\0")
    assert watcher.versions("a", tmp_path / "a").complete == {} and watcher.unsettled("a")
    still()
    assert watcher.versions("a", tmp_path / "a").complete == {1: version_dir}


def test_a_version_without_modelport_toml_never_counts_and_is_not_waited_for(tmp_path):
    (tmp_path / "a" / "1").mkdir(parents=True)
    (tmp_path / "a" / "1" / "model.onnx").write_bytes(b"half a copy")
    watcher = RepositoryWatcher(tmp_path, settle_s=SETTLE_S, watch=False)
    assert watcher.versions("a", tmp_path / "a").complete == {}
    still()
    assert watcher.versions("a", tmp_path / "a").complete == {}
    assert not watcher.unsettled() and watcher.signature("a", 1) is None


def test_a_version_copied_to_a_hidden_name_and_renamed_counts_after_the_settle_time(tmp_path):
    make_tiny_bundle(tmp_path / "a" / ".2")
    watcher = RepositoryWatcher(tmp_path, settle_s=SETTLE_S, watch=False)
    assert watcher.versions("a", tmp_path / "a").complete == {} and not watcher.unsettled()
    (tmp_path / "a" / ".2").rename(tmp_path / "a" / "2")
    watcher.versions("a", tmp_path / "a")
    still()
    assert set(watcher.versions("a", tmp_path / "a").complete) == {2}


def test_models_are_visible_directories_with_valid_names(tmp_path):
    for name in ("good", "also.good_1-x", ".hidden", "-dash", "bad name", "a..b", "é"):
        make_tiny_bundle(tmp_path / name / "1")
    (tmp_path / "notes.txt").write_text("not a model")
    watcher = RepositoryWatcher(tmp_path, settle_s=SETTLE_S, watch=False)
    assert sorted(watcher.models()) == ["also.good_1-x", "good"]
    assert watcher.models()["good"] == tmp_path / "good"


def test_a_model_directory_that_points_outside_the_repository_is_ignored(tmp_path):
    make_tiny_bundle(tmp_path / "elsewhere" / "m" / "1")
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "m").symlink_to(tmp_path / "elsewhere" / "m")
    assert RepositoryWatcher(tmp_path / "repo", watch=False).models() == {}


def test_a_repository_that_does_not_exist_has_no_models(tmp_path):
    assert RepositoryWatcher(tmp_path / "missing", watch=False).models() == {}


def test_versions_are_ascii_numbered_directories_and_one_pointing_outside_is_reported(tmp_path):
    model_dir = tmp_path / "repo" / "a"
    for name in ("3", ".4", "x", "٣", "²", "5.0"):
        make_tiny_bundle(model_dir / name)
    (model_dir / "6").write_text("a file, not a directory")
    make_tiny_bundle(tmp_path / "outside" / "7")
    (model_dir / "7").symlink_to(tmp_path / "outside" / "7")
    watcher = RepositoryWatcher(tmp_path / "repo", settle_s=SETTLE_S, watch=False)
    assert watcher.versions("a", model_dir).outside == [7]
    still()
    assert watcher.versions("a", model_dir) == ({3: model_dir / "3"}, [7])


def test_a_removed_version_directory_is_forgotten(tmp_path):
    make_tiny_bundle(tmp_path / "a" / "1")
    watcher = RepositoryWatcher(tmp_path, settle_s=SETTLE_S, watch=False)
    watcher.versions("a", tmp_path / "a")
    shutil.rmtree(tmp_path / "a" / "1")
    assert watcher.versions("a", tmp_path / "a").complete == {}
    assert watcher.signature("a", 1) is None and not watcher.unsettled()


def test_two_directories_for_the_same_version_number_do_not_keep_it_unsettled_forever(tmp_path):
    make_tiny_bundle(tmp_path / "a" / "1")
    make_tiny_bundle(tmp_path / "a" / "01", seed=1)
    os.utime(tmp_path / "a" / "01" / "model.onnx", ns=(1, 1))  # a copy with its own times
    watcher = RepositoryWatcher(tmp_path, settle_s=SETTLE_S, watch=False)
    for _ in range(3):
        watcher.versions("a", tmp_path / "a")
        still()
    assert not watcher.unsettled()


def test_settle_sleeps_until_the_earliest_directory_may_have_settled(tmp_path):
    make_tiny_bundle(tmp_path / "a" / "1")
    watcher = RepositoryWatcher(tmp_path, settle_s=0.2, watch=False)
    watcher.looking()
    watcher.versions("a", tmp_path / "a")
    start = time.monotonic()
    asyncio.run(watcher.settle())
    assert 0.15 < time.monotonic() - start < 1.0
    assert set(watcher.versions("a", tmp_path / "a").complete) == {1}


# -- the version manager -------------------------------------------------------------------------------

class Changes:
    """The routing table's observer: every state change, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, str | None, str | None]] = []

    def state_changed(self, name, version, old, new) -> None:
        self.seen.append((name, version, old, new))

    def of(self, name: str) -> list[tuple[int, str | None, str | None]]:
        return [(v, old, new) for n, v, old, new in self.seen if n == name]


class Repository:
    """A repository directory, its watcher (watching off), routing table and version manager; the
    manager's ``load`` builds a real ModelService from each bundle and counts the loads."""

    def __init__(self, root: Path, pool: ThreadPoolExecutor) -> None:
        self.root = root
        self.pool = pool
        self.changes = Changes()
        self.routing = RoutingTable(observer=self.changes)
        self.watcher = RepositoryWatcher(root, settle_s=SETTLE_S, watch=False)
        self.loads: list[tuple[str, int]] = []
        self.manager = VersionManager(self.watcher, self.routing, self._load, load_pipeline=self._load_pipeline)

    async def _load(self, name: str, path: Path) -> ModelService:
        self.loads.append((name, int(path.name)))
        service = ModelService(Model.load(path, name=name), decode_pool=self.pool)
        service.start()
        return service

    def _load_pipeline(self, name, config) -> PipelineService:
        return PipelineService(name, config, self.routing, decode_pool=self.pool, max_pixels=DEFAULT_MAX_PIXELS,
                               max_images=16)

    async def sync_when_still(self) -> None:
        """One scan, then scans until every directory has settled (what follow() does, without watching)."""
        await self.manager.sync()
        while self.watcher.unsettled():
            await self.watcher.settle()
            await self.manager.sync()

    def states(self, name: str) -> dict[int, str]:
        return {v: s.state for v, s in self.routing.versions(name).items()} if self.routing.known(name) else {}

    async def close(self) -> None:
        for entry in self.routing.index():
            await self.routing.retire(entry["name"], int(entry["version"]))


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(2) as pool:
        yield pool


@pytest.fixture
def repository(tmp_path, pool):
    return Repository(tmp_path / "repo", pool)


def own_answer(bundle) -> np.ndarray:
    """The bundle's own logits for answer()'s input, run without a service."""
    return Model.load(bundle).run({"image": np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)})["logits"]


def run(repository: Repository, scenario) -> None:
    """Run ``scenario()`` on a fresh loop, then retire (close) every service it left loaded."""

    async def main():
        try:
            await scenario()
        finally:
            await repository.close()

    asyncio.run(main())


async def answer(service, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(2, 3, 8, 8)).astype(np.float32)
    return (await service.infer_tensor(x, deadline=None, timing=Timing()))["logits"]


def test_load_initial_serves_the_newest_version_of_each_model_then_marks_the_table_ready(repository):
    root = repository.root
    make_tiny_bundle(root / "a" / "1", seed=1)
    make_tiny_bundle(root / "a" / "2", seed=2)
    make_tiny_bundle(root / "b" / "1", seed=3)

    async def scenario():
        assert not repository.routing.ready
        await repository.manager.load_initial()
        assert repository.routing.ready
        assert repository.states("a") == {2: State.READY} and repository.states("b") == {1: State.READY}
        assert sorted(repository.loads) == [("a", 2), ("b", 1)]  # the older version was never loaded
        a, b = repository.routing.get("a"), repository.routing.get("b")
        assert (a.name, a.version, b.name, b.version) == ("a", 2, "b", 1)
        # Its answers are the bundle's own.
        expected = own_answer(root / "a" / "2")
        assert np.allclose(await answer(a), expected, atol=1e-6)

    run(repository, scenario)


def test_load_initial_waits_for_a_version_still_being_written(repository):
    make_tiny_bundle(repository.root / "a" / "1")

    async def scenario():
        await repository.manager.sync()
        assert repository.loads == [] and repository.states("a") == {}  # just written: not yet
        await repository.manager.load_initial()
        assert repository.states("a") == {1: State.READY}

    run(repository, scenario)


def test_before_the_first_load_a_model_still_settling_is_unavailable_not_missing(repository):
    make_tiny_bundle(repository.root / "a" / "1")

    async def scenario():
        await repository.manager.sync()
        assert not repository.routing.ready
        with pytest.raises(Unavailable):
            repository.routing.get("a")

    run(repository, scenario)


@pytest.mark.parametrize("model_toml, loaded", [
    ("", {4}),
    ("version_policy = { latest = 2 }\n", {3, 4}),
    ("version_policy = { all = true }\n", {1, 2, 3, 4}),
    ("version_policy = { specific = [1, 3] }\n", {1, 3}),
    ("version_policy = { latest = 2 }\n[labels]\nstable = 1\n", {1, 3, 4}),
])
def test_the_version_policy_and_labels_in_model_toml_choose_the_versions_loaded(repository, model_toml, loaded):
    for version in (1, 2, 3, 4):
        make_tiny_bundle(repository.root / "a" / str(version), seed=version)
    (repository.root / "a" / "model.toml").write_text(model_toml)

    async def scenario():
        await repository.manager.load_initial()
        assert set(repository.states("a")) == loaded
        assert {version for _, version in repository.loads} == loaded
        assert repository.routing.get("a").version == max(loaded)

    run(repository, scenario)


def test_a_label_in_model_toml_routes_to_its_version(repository):
    for version in (1, 2):
        make_tiny_bundle(repository.root / "a" / str(version), seed=version)
    (repository.root / "a" / "model.toml").write_text("[labels]\nstable = 1\ncanary = 2\n")

    async def scenario():
        await repository.manager.load_initial()
        assert repository.routing.labels("a") == {"stable": 1, "canary": 2}
        assert repository.routing.get("a", "stable").version == 1
        assert repository.routing.get("a", "canary").version == 2

    run(repository, scenario)


def test_a_new_version_is_loaded_and_published_before_the_old_one_retires(repository):
    root = repository.root
    make_tiny_bundle(root / "a" / "1", seed=1)

    async def scenario():
        await repository.manager.load_initial()
        old = repository.routing.get("a")
        make_tiny_bundle(root / "a" / "2", seed=2)
        await repository.manager.sync()
        assert repository.routing.get("a") is old and repository.loads == [("a", 1)]  # version 2 still settling
        repository.changes.seen.clear()
        await repository.sync_when_still()
        assert repository.changes.of("a") == [(2, None, State.LOADING), (2, State.LOADING, State.READY),
                                              (1, State.READY, State.UNLOADING), (1, State.UNLOADING, None)]
        new = repository.routing.get("a")
        assert new.version == 2 and repository.states("a") == {2: State.READY}
        with pytest.raises(Unavailable, match="unloading"):  # the old service was closed
            old.admit()
        expected = own_answer(root / "a" / "2")
        assert np.allclose(await answer(new), expected, atol=1e-6)

    run(repository, scenario)


def test_rewriting_the_files_of_a_loaded_version_does_not_reload_it(repository):
    make_tiny_bundle(repository.root / "a" / "1")

    async def scenario():
        await repository.manager.load_initial()
        service = repository.routing.get("a")
        (repository.root / "a" / "1" / "labels.txt").write_text("w\nx\ny\nz\n")
        (repository.root / "a" / "1" / "server.log").write_text("a log written beside the model")
        await repository.sync_when_still()
        assert repository.loads == [("a", 1)] and repository.routing.get("a") is service
        assert list(service.model.labels) == ["class0", "class1", "class2", "class3"]  # as it was loaded
        assert repository.states("a") == {1: State.READY}

    run(repository, scenario)


def test_a_version_that_fails_to_load_is_failed_with_its_reason_while_the_old_one_serves(repository):
    root = repository.root
    make_tiny_bundle(root / "a" / "1")

    async def scenario():
        await repository.manager.load_initial()
        serving = repository.routing.get("a")
        corrupt(make_tiny_bundle(root / "a" / "2"))
        await repository.sync_when_still()
        assert repository.states("a") == {1: State.READY, 2: State.FAILED}
        reason = repository.routing.versions("a")[2].reason
        assert "model.onnx" in reason and "cannot load it" in reason
        assert repository.routing.get("a") is serving
        serving.admit()  # still open
        with pytest.raises(NotFound, match="no version 2 available") as caught:
            repository.routing.get("a", 2)
        assert reason in caught.value.message
        assert {"name": "a", "version": "2", "state": "FAILED", "reason": reason} in repository.routing.index()

    run(repository, scenario)


def test_a_failed_version_is_retried_with_backoff_and_at_once_when_its_files_change(repository):
    root = repository.root
    corrupt(make_tiny_bundle(root / "a" / "1"))

    async def scenario():
        await repository.manager.load_initial()
        assert repository.loads == [("a", 1)] and repository.states("a") == {1: State.FAILED}
        await repository.manager.sync()
        assert repository.loads == [("a", 1)]  # within the backoff (1 s after the first failure): not retried
        await asyncio.sleep(1.05)
        await repository.manager.sync()
        assert repository.loads == [("a", 1)] * 2  # the backoff has passed: retried (and failed again)
        assert repository.states("a") == {1: State.FAILED}
        await repository.manager.sync()
        assert repository.loads == [("a", 1)] * 2  # now 2 s until the next try
        make_tiny_bundle(root / "a" / "1")  # fixed files: tried as soon as they are still, backoff or not
        await repository.sync_when_still()
        assert repository.loads == [("a", 1)] * 3 and repository.states("a") == {1: State.READY}
        assert repository.routing.versions("a")[1].reason == ""

    run(repository, scenario)


def test_a_model_whose_only_version_fails_is_not_found_with_the_reason_and_the_table_is_ready(repository):
    corrupt(make_tiny_bundle(repository.root / "a" / "1"))
    make_tiny_bundle(repository.root / "b" / "1")

    async def scenario():
        await repository.manager.load_initial()
        assert repository.routing.ready and repository.states("b") == {1: State.READY}
        with pytest.raises(NotFound, match=r"model 'a' has no version available \(version 1 FAILED: .*model.onnx"):
            repository.routing.get("a")

    run(repository, scenario)


def test_a_removed_version_hands_over_to_the_one_before_and_a_removed_model_is_forgotten(repository):
    root = repository.root
    make_tiny_bundle(root / "a" / "1", seed=1)
    make_tiny_bundle(root / "a" / "2", seed=2)

    async def scenario():
        await repository.manager.load_initial()
        two = repository.routing.get("a")
        shutil.rmtree(root / "a" / "2")
        await repository.sync_when_still()
        assert repository.states("a") == {1: State.READY} and repository.routing.get("a").version == 1
        with pytest.raises(Unavailable):
            two.admit()
        one = repository.routing.get("a")
        shutil.rmtree(root / "a")
        await repository.sync_when_still()
        assert not repository.routing.known("a")
        with pytest.raises(NotFound, match="unknown model 'a'"):
            repository.routing.get("a")
        with pytest.raises(Unavailable):
            one.admit()

    run(repository, scenario)


def test_unload_model_retires_every_version_until_load_model_brings_it_back(repository):
    make_tiny_bundle(repository.root / "a" / "1")

    async def scenario():
        manager = repository.manager
        await manager.load_initial()
        service = repository.routing.get("a")
        await manager.unload_model("a")
        assert not repository.routing.known("a")
        with pytest.raises(Unavailable):
            service.admit()
        await repository.sync_when_still()  # the repository still holds it: unloaded it stays
        assert not repository.routing.known("a") and repository.loads == [("a", 1)]
        await manager.load_model("a")
        assert repository.states("a") == {1: State.READY} and repository.loads == [("a", 1)] * 2

    run(repository, scenario)


def test_unload_model_and_load_model_of_an_unknown_model_are_not_found(repository):
    make_tiny_bundle(repository.root / "a" / "1")

    async def scenario():
        await repository.manager.load_initial()
        with pytest.raises(NotFound, match="unknown model 'nope'"):
            await repository.manager.unload_model("nope")
        with pytest.raises(NotFound, match="no model 'nope' in the repository"):
            await repository.manager.load_model("nope")

    run(repository, scenario)


def test_load_model_of_a_model_that_cannot_load_says_why(repository):
    make_tiny_bundle(repository.root / "a" / "1")

    async def scenario():
        await repository.manager.load_initial()
        corrupt(make_tiny_bundle(repository.root / "b" / "1"))
        await repository.manager.sync()  # seen...
        still()  # ...and still: complete
        with pytest.raises(ModelportError, match=r"model 'b' did not load: version 1: .*model.onnx"):
            await repository.manager.load_model("b")

    run(repository, scenario)


def test_a_pipeline_waits_while_a_step_is_still_being_written_then_serves(repository):
    root = repository.root
    make_tiny_bundle(root / "a" / "1")

    async def scenario():
        await repository.manager.load_initial()
        (root / "p").mkdir()
        (root / "p" / "pipeline.toml").write_text('kind = "chain"\nsteps = ["b"]\n')
        await repository.manager.sync()  # the pipeline file is seen...
        still()  # ...and has settled
        make_tiny_bundle(root / "b" / "1", seed=7)  # its step arrives, still being written
        await repository.manager.sync()
        waiting = repository.routing.versions("p")[1]
        assert waiting.state == State.LOADING
        assert waiting.reason == "waiting: step 'b': its files are still being written"
        with pytest.raises(Unavailable, match="waiting: step 'b'") as caught:
            repository.routing.get("p")
        assert caught.value.retry_after_s == 1
        await repository.sync_when_still()
        assert repository.states("p") == {1: State.READY} and repository.states("b") == {1: State.READY}
        pipeline, step = repository.routing.get("p"), repository.routing.get("b")
        assert isinstance(pipeline, PipelineService)
        assert np.allclose(await answer(pipeline), await answer(step), atol=1e-6)

    run(repository, scenario)


def test_a_pipeline_naming_a_model_that_is_nowhere_fails_once_the_first_load_is_done(repository):
    make_tiny_bundle(repository.root / "a" / "1")
    (repository.root / "p").mkdir(parents=True)
    (repository.root / "p" / "pipeline.toml").write_text('kind = "chain"\nsteps = ["a", "missing"]\n')

    async def scenario():
        await repository.manager.load_initial()
        failed = repository.routing.versions("p")[1]
        assert failed.state == State.FAILED and "step 'missing'" in failed.reason and "unknown model" in failed.reason
        assert repository.states("a") == {1: State.READY}

    run(repository, scenario)


def test_a_model_with_no_rollout_has_none_to_show_promote_or_abort(repository):
    make_tiny_bundle(repository.root / "a" / "1")

    async def scenario():
        await repository.manager.load_initial()
        for call in (repository.manager.rollout, repository.manager.promote, repository.manager.abort):
            with pytest.raises(NotFound, match="model 'a' has had no rollout on this server"):
                call("a")

    run(repository, scenario)


def test_a_model_removed_before_its_files_settled_does_not_hold_start_up(repository):
    make_tiny_bundle(repository.root / "m" / "3")
    make_tiny_bundle(repository.root / "a" / "1")

    async def scenario():
        await repository.manager.sync()
        assert repository.watcher.unsettled("m")
        shutil.rmtree(repository.root / "m")
        await asyncio.wait_for(repository.manager.load_initial(), 10)  # returned: it did not wait for "m"
        assert repository.states("a") == {1: State.READY} and not repository.watcher.unsettled()

    run(repository, scenario)


def test_publishing_next_to_a_stray_file_named_like_the_next_version_is_an_error_not_a_loop(tmp_path):
    from modelport.errors import BundleError
    from modelport.repository import layout

    make_tiny_bundle(tmp_path / "m" / "1")
    (tmp_path / "m" / "2").write_text("not a version")
    staging = tmp_path / "m" / ".staging"
    staging.mkdir()
    with pytest.raises(BundleError, match="in the way of version 2"):
        layout.publish(tmp_path / "m", staging, lambda version: None)
    assert staging.is_dir()  # left to the caller to remove, as on any failure
