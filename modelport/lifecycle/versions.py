"""The version manager: keeps the routing table in step with a repository, without dropping requests.

For each model the wanted versions come from its policy (``model.toml``); a new version is loaded
and warmed before it is published, and only then does an old one stop taking requests, drain and
unload (TF Serving's availability-preserving policy). A version that fails to load is FAILED with
the reason and retried with capped exponential backoff (immediately if its files change); whatever
was serving keeps serving. Versions are immutable: rewriting the files of a loaded version does
not reload it; publish a new number. Which directories are complete is the watcher's business
(``watcher.py``).

With a ``[rollout]`` policy, a new version that arrives while another serves is not published as
the default: a ``Rollout`` judges it (shadow, canary) and either promotes it (the labels that named
the old version move to it, and the old one is retired by the version policy) or rolls it back
(ROLLED_BACK in the index, unloaded, not loaded again until its files change).

Under a memory budget (``residency.py``) a model version is published as an ``OnDemand`` stand-in:
loaded and measured here as any version, then kept resident or unloaded to disk by the budget.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Awaitable, Callable

from modelport.engine.servable import Servable
from modelport.errors import ModelportError, NotFound, Unavailable
from modelport.lifecycle.rollout import Stage, Rollout
from modelport.lifecycle.routing import RoutingTable
from modelport.lifecycle.residency import Residency
from modelport.lifecycle.states import State
from modelport.lifecycle.watcher import RepositoryWatcher
from modelport.memory import release_memory
from modelport.pipeline.config import PIPELINE_FILE, PipelineConfig, check_graph, read_pipeline
from modelport.repository import layout
from modelport.repository.model_config import read_model_config

logger = logging.getLogger("modelport.reload")

_RETRY_FIRST_S, _RETRY_MAX_S = 1.0, 60.0
_PIPELINE_RETRY_MAX_S = 4.0  # a pipeline costs nothing to build; its steps may load any moment
_PIPELINE_WAIT_S = 0.2  # a pipeline waiting for a step looks again this soon
PIPELINE_VERSION = 1  # a pipeline is its file: one version, rebuilt when the file changes


def steps_first(names: set[str], on_disk: dict[str, Path]) -> list[str]:
    """Models, then pipelines, each pipeline after the pipelines it names: a pipeline is judged
    once its steps are loaded (or known to have failed). A cycle is ordered anyhow; check_graph
    refuses it with its reason."""
    pipelines = {n: on_disk[n] for n in names if n in on_disk and _is_pipeline(on_disk[n])}
    ordered: list[str] = []

    def visit(name: str, path: frozenset) -> None:
        if name in ordered or name in path:
            return
        try:
            steps = [s.model for s in read_pipeline(pipelines[name] / PIPELINE_FILE).steps]
        except ModelportError:  # judged, with its reason, when it is built
            steps = []
        for step in steps:
            if step in pipelines:
                visit(step, path | {name})
        ordered.append(name)

    for name in sorted(pipelines):
        visit(name, frozenset())
    return sorted(names - set(pipelines)) + ordered


def _is_pipeline(model_dir: Path) -> bool:
    return (model_dir / PIPELINE_FILE).is_file()


@dataclass
class _Failure:
    signature: tuple
    attempts: int
    retry_at: float
    reason: str = ""


class VersionManager:
    def __init__(self, watcher: RepositoryWatcher, routing: RoutingTable,
                 load: Callable[[str, Path], Awaitable[Servable]], *,
                 load_pipeline: Callable[[str, PipelineConfig], Servable] | None = None, observer=None,
                 residency: Residency | None = None) -> None:
        self.watcher = watcher
        self.root = watcher.root
        self.routing = routing
        self._load = load
        self.residency = residency  # a memory budget: versions beyond it wait on disk
        self._load_pipeline = load_pipeline
        self._observer = observer  # the server's metrics: rollout stages and answers
        self._failures: dict[tuple[str, int], _Failure] = {}
        self._unloaded_by_api: set[str] = set()
        self._lock = asyncio.Lock()  # one sync at a time: the watcher's and the API's
        self._built: dict[str, tuple] = {}  # pipeline name -> the signature of the files it was built from
        self._rolled_back: dict[tuple[str, int], tuple] = {}  # -> the signature it was judged with
        self._moved: dict[str, tuple[int, int]] = {}  # model -> (from, to): labels follow a promotion
        self._closing: set[asyncio.Task] = set()
        self._waiting: set[str] = set()  # pipelines LOADING until a step of theirs is judged

    async def load_initial(self) -> None:
        """Load what the repository holds now (once its files are still), then mark the routing table
        ready. Every pipeline is judged by then: READY, or FAILED with its own reason."""
        await self.sync()
        while self.watcher.unsettled():  # at start-up too, a version counts only once its files are still
            await self.watcher.settle()
            await self.sync()
        self.routing.ready = True
        if self._waiting:  # a step found nowhere was "still loading" until now: it is unknown
            await self.sync()

    async def follow(self) -> None:
        """Follow the repository's changes until cancelled (returns at once with watch off)."""
        await self.watcher.follow(self.sync)

    # -- the management API's operations ------------------------------------------------------------

    async def load_model(self, name: str) -> None:
        layout.check_name(name)
        if not (self.root / name).is_dir() or layout.escapes(self.root, self.root / name):
            raise NotFound(f"no model {name!r} in the repository")
        self._unloaded_by_api.discard(name)
        await self.sync(only=name)
        states = self.routing.versions(name)
        if not any(s.state == State.READY for s in states.values()):
            reasons = "; ".join(f"version {v}: {s.reason}" for v, s in states.items() if s.reason)
            raise ModelportError(f"model {name!r} did not load: {reasons or 'no complete version'}")

    async def unload_model(self, name: str) -> None:
        layout.check_name(name)
        self.routing.versions(name)  # NotFound for a model that is not there
        self._unloaded_by_api.add(name)
        await self.sync(only=name)

    def rollout(self, name: str) -> Rollout:
        layout.check_name(name)
        rollout = self.routing.rollouts.get(name)
        if rollout is None:
            raise NotFound(f"model {name!r} has had no rollout on this server")
        return rollout

    def promote(self, name: str) -> Rollout:
        rollout = self._active(name)
        rollout.promote("promoted by the management API")
        return rollout

    def abort(self, name: str) -> Rollout:
        rollout = self._active(name)
        rollout.roll_back("aborted by the management API")
        return rollout

    def _active(self, name: str) -> Rollout:
        rollout = self.rollout(name)
        if not rollout.active:
            raise NotFound(f"model {name!r} has no rollout in progress (the last one ended {rollout.stage})")
        return rollout

    # -- the work -------------------------------------------------------------------------------------

    async def sync(self, only: str | None = None) -> None:
        async with self._lock:
            self.watcher.looking()
            on_disk = self.watcher.models()
            names = [only] if only else steps_first(set(on_disk) | {e["name"] for e in self.routing.index()},
                                                    on_disk)
            for name in names:
                try:
                    await self._sync_model(name, on_disk.get(name))
                except Exception:  # one model's trouble never stops the others
                    logger.exception("syncing model %s failed", name)

    async def _sync_model(self, name: str, model_dir: Path | None) -> None:
        loaded = self.routing.versions(name) if self.routing.known(name) else {}
        if model_dir is None or name in self._unloaded_by_api:
            for version in list(loaded):
                await self.routing.retire(name, version)
            self.routing.set_labels(name, {})
            self.routing.forget_model(name)
            self._waiting.discard(name)
            return
        if _is_pipeline(model_dir) and self._load_pipeline is not None:
            await self._sync_pipeline(name, model_dir / PIPELINE_FILE)
            return
        try:
            config = read_model_config(model_dir)
        except ModelportError as exc:
            logger.error("%s", exc.message)
            config = None
        complete, outside = self.watcher.versions(name, model_dir)
        for version in outside:
            self.routing.set_state(name, version, State.FAILED, "version directory points outside the repository")
        for key in [k for k in self._rolled_back if k[0] == name]:
            if self.watcher.signature(*key) != self._rolled_back[key]:  # new files: judge it again
                del self._rolled_back[key]
                if key[1] in loaded and loaded[key[1]].state == State.ROLLED_BACK:
                    await self.routing.retire(*key)
            else:
                complete.pop(key[1], None)
        loaded = self.routing.versions(name) if self.routing.known(name) else {}
        # A loaded version stays a candidate while its directory exists, even if files in it
        # change: versions are immutable once loaded (logs or caches written beside the model
        # must not unload it).
        candidates = set(complete) | {v for v, s in loaded.items()
                                      if s.state == State.READY and self.watcher.signature(name, v) is not None}
        if config:
            moved = self._moved.get(name)
            labels = {k: (moved[1] if moved and v == moved[0] else v) for k, v in config.labels.items()}
            config = replace(config, labels=labels)
        wanted = config.wanted(sorted(candidates)) if config else {v for v, s in loaded.items()
                                                                   if s.state == State.READY}
        if config:
            self.routing.set_labels(name, config.labels)

        rollout = self.routing.rollouts.get(name)
        serving = self._serving(name, loaded)
        # Load first (newest first), publish each when warm; retire only afterwards.
        for version in sorted(wanted - {v for v, s in loaded.items() if s.state in (State.READY, State.LOADING)},
                              reverse=True):
            judge = None
            if config and config.rollout and serving is not None and version > serving:
                if rollout is not None and rollout.active:
                    rollout.roll_back(f"superseded by version {version}")
                judge = self._rollout_starter(name, config, serving)
            await self._try_load(name, version, complete[version], before_publish=judge)
            rollout = self.routing.rollouts.get(name)
        if rollout is not None and rollout.active and rollout.candidate.version not in wanted:
            rollout.roll_back(f"version {rollout.candidate.version} is no longer wanted (its directory was removed, "
                              f"or the version policy changed)")
        await self._retire_unwanted(name, wanted, rollout)

    async def _retire_unwanted(self, name: str, wanted: set[int], rollout: Rollout | None) -> None:
        loaded = self.routing.versions(name)
        # Availability first: until every wanted version is READY, the newest READY version that
        # is no longer wanted keeps serving.
        wanted_ready = all(v in loaded and loaded[v].state == State.READY for v in wanted)
        unwanted_ready = sorted(v for v, s in loaded.items() if v not in wanted and s.state == State.READY)
        keep = set() if wanted_ready or not unwanted_ready else {unwanted_ready[-1]}
        if rollout is not None and rollout.active:  # the version it is judged against serves on
            keep.add(rollout.serving.version)
        for version, state in loaded.items():
            if state.state in (State.FAILED, State.ROLLED_BACK):
                if self.watcher.signature(name, version) is None:
                    await self.routing.retire(name, version)  # its directory is gone: forget the failure
            elif version not in wanted and version not in keep:
                await self.routing.retire(name, version)

    def _serving(self, name: str, loaded: dict) -> int | None:
        """The version that answers requests naming no version now (before this sync's loads)."""
        rollout = self.routing.rollouts.get(name)
        if rollout is not None and rollout.active:
            return rollout.serving.version
        ready = [v for v, s in loaded.items() if s.state == State.READY]
        return max(ready) if ready else None

    def _rollout_starter(self, name: str, config, serving_version: int):
        def start(candidate: Servable) -> None:
            serving = self.routing.versions(name)[serving_version].service
            rollout = Rollout(name, config.rollout, serving, candidate, on_end=self._rollout_ended,
                              observer=self._observer)
            self.routing.rollouts[name] = rollout
            rollout.start()
        return start

    def _rollout_ended(self, rollout: Rollout) -> None:
        """Called by the rollout itself, on the loop, the moment it is decided."""
        name, version = rollout.name, rollout.candidate.version
        if rollout.stage == Stage.PROMOTED:
            self._moved[name] = (rollout.serving.version, version)
        else:
            service = self.routing.roll_back(name, version, f"rolled back: {rollout.reason}")
            # Judged with the files as they are now: only a change from here brings it back.
            self._rolled_back[(name, version)] = layout.signature(self.root / name / str(version))
            if service is not None:
                task = asyncio.ensure_future(self._close(service))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        self.watcher.changed()  # the next sync retires the old version, moves labels

    @staticmethod
    async def _close(service: Servable) -> None:
        await service.close()
        release_memory()

    async def _sync_pipeline(self, name: str, path: Path) -> None:
        """A pipeline is one file and owns no model: it is (re)built when the file has changed and
        settled, and retried soon after a failure (its steps may still be loading)."""
        sig = self.watcher.settled_file(name, PIPELINE_VERSION, path)
        if sig is None:
            return
        loaded = self.routing.versions(name) if self.routing.known(name) else {}
        current = loaded.get(PIPELINE_VERSION)
        if current is not None and current.state == State.READY and self._built.get(name) == sig:
            return
        for version in [v for v in loaded if v != PIPELINE_VERSION]:  # it was a model before
            await self.routing.retire(name, version)

        async def build():
            config = read_pipeline(path)
            check_graph(name, config, self._pipeline_on_disk)
            self._check_steps_settled(config)
            return self._load_pipeline(name, config)

        await self._try_load(name, PIPELINE_VERSION, build, retry_max_s=_PIPELINE_RETRY_MAX_S)
        if self.routing.versions(name)[PIPELINE_VERSION].state == State.READY:
            self._built[name] = sig

    def _check_steps_settled(self, config: PipelineConfig) -> None:
        """Unavailable while a step's files are still being written, or a step is itself a
        pipeline that waits: judged now, it would fail with a reason stale a moment later."""
        for step in config.steps:
            if step.model in self._waiting:
                raise Unavailable(f"step {step.ref!r} is a pipeline still waiting for its own steps")
            serving = self.routing.known(step.model) and any(
                v.state == State.READY for v in self.routing.versions(step.model).values())
            if not serving and self.watcher.unsettled(step.model):
                raise Unavailable(f"step {step.ref!r}: its files are still being written")

    def _pipeline_on_disk(self, name: str) -> PipelineConfig | None:
        path = self.root / name / PIPELINE_FILE
        return read_pipeline(path) if path.is_file() and not layout.escapes(self.root, path) else None

    async def _load_version(self, name: str, version: int, path: Path) -> Servable:
        if self.residency is None:
            return await self._load(name, path)
        return await self.residency.add(name, version, path, lambda: self._load(name, path))

    async def _try_load(self, name: str, version: int, path: Path | Callable[[], Awaitable],
                        retry_max_s: float = _RETRY_MAX_S,
                        before_publish: Callable[[Servable], None] | None = None) -> None:
        key = (name, version)
        sig = self.watcher.signature(name, version)
        failure = self._failures.get(key)
        now = time.monotonic()
        if failure and failure.signature == sig and now < failure.retry_at:
            self.watcher.wake_at(failure.retry_at)
            return
        self.routing.set_state(name, version, State.LOADING)
        try:
            service = await (path() if callable(path) else self._load_version(name, version, path))
        except Unavailable as exc:
            if not callable(path):
                raise
            # A pipeline whose step is still loading waits for it: not FAILED with a reason that
            # will be stale in a moment. The index shows it LOADING, and why.
            self._waiting.add(name)
            self.routing.set_state(name, version, State.LOADING, f"waiting: {exc.message}")
            self.watcher.wake_at(now + _PIPELINE_WAIT_S)
            return
        except Exception as exc:
            reason = exc.message if isinstance(exc, ModelportError) else f"{type(exc).__name__}: {exc}"
            attempts = failure.attempts + 1 if failure and failure.signature == sig else 1
            delay = min(retry_max_s, _RETRY_FIRST_S * 2 ** (attempts - 1))
            self._failures[key] = _Failure(sig, attempts, now + delay, reason)
            self._waiting.discard(name)
            self.watcher.wake_at(now + delay)
            self.routing.set_state(name, version, State.FAILED, reason)
            # Said once per reason: a pipeline waiting for a step retries every few seconds.
            level = logging.DEBUG if failure and failure.reason == reason else logging.ERROR
            logger.log(level, "model %s version %s FAILED (attempt %d, next in %.0f s): %s", name, version,
                       attempts, delay, reason)
            return
        self._failures.pop(key, None)
        self._waiting.discard(name)
        if before_publish is not None:  # no await from here to READY: no request sees it unjudged
            before_publish(service)
        self.routing.set_state(name, version, State.READY, service=service)
        logger.info("model %s version %s READY", name, version)
