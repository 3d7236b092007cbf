"""The live routing table: which versions of which models take requests, and in what state.

Front-ends ask ``get(name, version_or_label)`` for a ``Servable``; the loader (static or the
version manager) publishes and retires versions. Everything runs on the server's event loop, so a
switch is one assignment: a request sees either the old version or the new one, never neither.

States follow Triton's repository index, plus FAILED: LOADING -> READY -> UNLOADING -> (gone);
LOADING -> FAILED (with a reason) when a version cannot be loaded; READY -> ROLLED_BACK (unloaded,
with the reason) when a rollout judged it bad. While a model has a rollout in progress
(``rollout.py``), requests that name no version go where the rollout says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from modelport import untrusted
from modelport.lifecycle.states import State
from modelport.memory import release_memory
from modelport.errors import NotFound, Unavailable
from modelport.repository.layout import check_name
from modelport.engine.servable import Servable

if TYPE_CHECKING:
    from modelport.lifecycle.rollout import Rollout



@dataclass
class VersionState:
    state: str
    reason: str = ""
    service: Servable | None = None


@dataclass
class _Model:
    versions: dict[int, VersionState] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)


class RoutingTable:
    def __init__(self, observer=None) -> None:
        self._models: dict[str, _Model] = {}
        self.rollouts: dict[str, "Rollout"] = {}  # the last rollout of each model, in progress or ended
        self.ready = False  # the first load has finished
        self._observer = observer  # gets state_changed(name, version, old, new)

    # -- requests ---------------------------------------------------------------------------------

    def get(self, name: str, version: str | int | None = None, *, routed: bool = True) -> Servable:
        """The service for a request; ``routed=False`` for questions about the model (metadata,
        readiness, statistics): those get the serving version, never a canary's pick."""
        check_name(name)
        model = self._models.get(name)
        if model is None or not model.versions:  # (labels alone enter a model whose files are settling)
            if not self.ready:
                raise Unavailable("models are still loading", retry_after_s=1)
            if model is None:
                raise NotFound(f"unknown model {name!r}")
        version = untrusted.version(version)
        if version is None:
            rollout = self.rollouts.get(name)
            if rollout is not None and rollout.active:
                return rollout.pick() if routed else rollout.serving
            ready = [v for v, s in model.versions.items() if s.state == State.READY]
            if not ready:
                if any(s.state == State.LOADING for s in model.versions.values()):
                    why = "; ".join(f"version {v} {s.reason}" for v, s in sorted(model.versions.items())
                                    if s.state == State.LOADING and s.reason)
                    raise Unavailable(f"model {name!r} has no version ready" + (f" ({why})" if why else ""),
                                      retry_after_s=1)
                failed = "; ".join(f"version {v} FAILED: {s.reason}" for v, s in sorted(model.versions.items())
                                   if s.state == State.FAILED and s.reason)
                raise NotFound(f"model {name!r} has no version available" + (f" ({failed})" if failed else ""))
            return model.versions[max(ready)].service
        number = self._version_number(name, model, version)
        state = model.versions.get(number)
        if state is None or state.state in (State.FAILED, State.UNAVAILABLE, State.ROLLED_BACK):
            detail = f" ({state.reason})" if state is not None and state.reason else ""
            raise NotFound(f"model {name!r} has no version {number} available{detail}")
        if state.state == State.LOADING:
            raise Unavailable(f"model {name!r} version {number} is still loading", retry_after_s=1)
        if state.state == State.UNLOADING:
            raise NotFound(f"model {name!r} version {number} is being unloaded")
        return state.service

    def default(self, *, routed: bool = True) -> Servable:
        for name in self._models:
            try:
                return self.get(name, routed=routed)
            except (NotFound, Unavailable):
                continue
        if not self.ready:
            raise Unavailable("models are still loading", retry_after_s=1)
        raise NotFound("no model loaded")

    def services(self) -> list[Servable]:
        return [s.service for m in self._models.values() for s in m.versions.values() if s.state == State.READY]

    def __iter__(self):
        return iter(self.services())

    def __len__(self) -> int:
        return len(self.services())

    def known(self, name: str) -> bool:
        return name in self._models

    def versions(self, name: str) -> dict[int, VersionState]:
        check_name(name)
        if name not in self._models:
            raise NotFound(f"unknown model {name!r}")
        return dict(self._models[name].versions)

    def labels(self, name: str) -> dict[str, int]:
        return dict(self._models[name].labels) if name in self._models else {}

    def index(self, *, resident: bool = False) -> list[dict]:
        """``resident``: say of each version whether it is in memory (under a memory budget a READY
        version may wait on disk, loaded on first use: ``on_demand.py``)."""
        entries = []
        for name, model in sorted(self._models.items()):
            for v, s in sorted(model.versions.items()):
                entry = {"name": name, "version": str(v), "state": s.state, "reason": s.reason}
                if resident:
                    entry["resident"] = s.state == State.READY and getattr(s.service, "resident", True)
                entries.append(entry)
        return entries

    # -- loading and unloading (the loaders' side) ----------------------------------------------

    def set_state(self, name: str, version: int, state: str, reason: str = "",
                  service: Servable | None = None) -> None:
        model = self._models.setdefault(name, _Model())
        old = model.versions.get(version)
        model.versions[version] = VersionState(state, reason, service if service is not None else
                                               (old.service if old and state in (State.READY, State.UNLOADING) else None))
        if self._observer is not None:
            self._observer.state_changed(name, version, old.state if old else None, state)

    def roll_back(self, name: str, version: int, reason: str) -> Servable | None:
        """Take a version out of routing now, keeping it in the index with the reason. Returns its
        service, for the caller to close (its queued requests are still answered)."""
        state = self._models[name].versions.get(version)
        service = state.service if state is not None else None
        self.set_state(name, version, State.ROLLED_BACK, reason)
        return service

    def set_labels(self, name: str, labels: dict[str, int]) -> None:
        self._models.setdefault(name, _Model()).labels = dict(labels)

    async def retire(self, name: str, version: int) -> None:
        """Stop routing new requests to a version, let its queue drain, then unload it."""
        model = self._models.get(name)
        state = model.versions.get(version) if model else None
        if state is None:
            return
        if state.service is None:  # FAILED or never loaded: just forget it
            self._forget(name, version, state.state)
            return
        self.set_state(name, version, State.UNLOADING)
        await state.service.close()
        self._forget(name, version, State.UNLOADING)
        state.service = None
        release_memory()

    def _forget(self, name: str, version: int, old_state: str) -> None:
        model = self._models[name]
        model.versions.pop(version, None)
        if self._observer is not None:
            self._observer.state_changed(name, version, old_state, None)
        if not model.versions and not model.labels:
            del self._models[name]

    def forget_model(self, name: str) -> None:
        if name in self._models and not self._models[name].versions:
            del self._models[name]

    def _version_number(self, name: str, model: _Model, version: str | int) -> int:
        if isinstance(version, int):
            return version
        check_name(version, "version label")
        if version not in model.labels:
            raise NotFound(f"model {name!r} has no version label {version!r}")
        return model.labels[version]
