"""Watching a repository directory: which models it holds, and which of their versions are complete.

A version directory counts once it is *complete*: it holds ``modelport.toml`` and its files (names,
sizes, modification times) have not changed for ``settle_s``. So ``cp -r build/7 models/flowers/7``
is picked up when the copy has finished; copying to a hidden name (``.7``) and renaming is seen at
once. Changes are noticed by watching the directory (watchfiles) with a periodic rescan as a
fallback. What to do with what is found is the version manager's business (``versions.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from modelport.errors import ModelportError
from modelport.repository import layout
from modelport.repository.bundle import CONFIG_FILE

logger = logging.getLogger("modelport.reload")


@dataclass
class _Seen:
    signature: tuple
    since: float  # monotonic time the signature was first seen unchanged


class Versions(NamedTuple):
    complete: dict[int, Path]  # settled version directories
    outside: list[int]  # version directories that point outside the repository


class RepositoryWatcher:
    def __init__(self, root: Path, *, settle_s: float = 0.5, poll_s: float = 1.0, watch: bool = True) -> None:
        self.root = root
        self.settle_s = settle_s
        self.poll_s = poll_s
        self.watch = watch
        self._seen: dict[tuple[str, int], _Seen] = {}
        self._unsettled: set[tuple[str, int]] = set()  # version directories whose files are still changing
        self._next_wake: float | None = None
        self._changed = asyncio.Event()

    # -- what is on disk ------------------------------------------------------------------------------

    def models(self) -> dict[str, Path]:
        """Model directories with valid names, inside the repository."""
        found = {}
        for child in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if child.name.startswith(".") or not child.is_dir():
                continue
            try:
                layout.check_name(child.name)
            except ModelportError:
                logger.warning("ignoring %s: not a valid model name", child)
                continue
            if layout.escapes(self.root, child):
                logger.warning("ignoring %s: it points outside the repository", child)
                continue
            found[child.name] = child
        # A model gone from disk has nothing left to settle (else start-up would wait for it forever).
        for key in [k for k in self._seen if k[0] not in found]:
            del self._seen[key]
        self._unsettled = {k for k in self._unsettled if k[0] in found}
        return found

    def versions(self, name: str, model_dir: Path) -> Versions:
        """The model's complete versions now; the others are looked at again once they may have settled."""
        complete, outside = {}, []
        present = layout.versions(model_dir)
        numbers = {int(p.name) for p in present}
        for key in [k for k in self._seen if k[0] == name and k[1] not in numbers]:
            del self._seen[key]  # the directory is gone
            self._unsettled.discard(key)
        for version_dir in present:
            key = (name, int(version_dir.name))
            if layout.escapes(self.root, version_dir):
                outside.append(key[1])
                continue
            if not (version_dir / CONFIG_FILE).is_file():
                self._seen.pop(key, None)
                self._unsettled.discard(key)
                continue
            if self._settled(key, version_dir):
                complete[key[1]] = version_dir
        return Versions(complete, outside)

    def settled_file(self, name: str, version: int, path: Path) -> tuple | None:
        """The signature of the directory holding ``path`` (a pipeline's file) once it has settled."""
        return self._seen[(name, version)].signature if self._settled((name, version), path.parent) else None

    def _settled(self, key: tuple[str, int], directory: Path) -> bool:
        now = time.monotonic()
        sig = layout.signature(directory)
        seen = self._seen.get(key)
        if seen is None or seen.signature != sig:
            self._seen[key] = _Seen(sig, now)
            self.wake_at(now + self.settle_s)
            self._unsettled.add(key)
            return False
        if now - seen.since < self.settle_s:
            self.wake_at(seen.since + self.settle_s)
            self._unsettled.add(key)
            return False
        self._unsettled.discard(key)
        return True

    def signature(self, name: str, version: int) -> tuple | None:
        """The files a version was last seen with (None: its directory is gone or incomplete)."""
        seen = self._seen.get((name, version))
        return seen.signature if seen is not None else None

    def unsettled(self, name: str | None = None) -> bool:
        """Files still being written: anywhere, or in the model ``name``."""
        return any(name is None or key[0] == name for key in self._unsettled)

    # -- when to look again ---------------------------------------------------------------------------

    def wake_at(self, when: float) -> None:
        self._next_wake = when if self._next_wake is None else min(self._next_wake, when)

    def looking(self) -> None:
        """A scan starts: the wake-up times it asks for replace the earlier ones."""
        self._next_wake = None

    def changed(self) -> None:
        """Look again now (a rollout decided, say)."""
        self._changed.set()

    async def settle(self) -> None:
        """Sleep until the earliest directory may have settled."""
        await asyncio.sleep(max(0.01, (self._next_wake or time.monotonic()) - time.monotonic()))

    async def follow(self, scan) -> None:
        """Call ``scan()`` after every change and at least every ``poll_s``, until cancelled."""
        if not self.watch:
            return
        watcher = asyncio.ensure_future(self._watch_files())
        try:
            while True:
                timeout = self.poll_s
                if self._next_wake is not None:
                    timeout = max(0.01, min(timeout, self._next_wake - time.monotonic()))
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
                self._changed.clear()
                await scan()
        finally:
            watcher.cancel()

    async def _watch_files(self) -> None:
        try:
            from watchfiles import awatch
        except ImportError:  # polling alone still works, at poll_s
            return
        try:
            async for _ in awatch(self.root, debounce=50, step=20, recursive=True):
                self._changed.set()
        except (OSError, RuntimeError) as exc:
            logger.warning("watching %s failed (%s); polling every %.1f s", self.root, exc, self.poll_s)
