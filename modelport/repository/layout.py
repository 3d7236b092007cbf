"""Finding bundles: a path to a version, a path to a model's versions, or a model name."""

from __future__ import annotations

import re
from pathlib import Path

from modelport import untrusted

from modelport.repository.bundle import CONFIG_FILE
from modelport.errors import BadInput, BundleError, NotFound


_VALID_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(name: str, what: str = "model name") -> str:
    """Model names are plain directory names: no separators, no '..', no NUL, nothing hidden."""
    if not isinstance(name, str) or not _VALID_NAME.fullmatch(name) or ".." in name:
        raise BadInput(f"invalid {what} {name!r}: letters, digits, '.', '_' and '-' only, "
                       f"starting with a letter or digit")
    return name


def versions(model_dir: Path) -> list[Path]:
    """Version directories of a model, lowest first. Hidden or non-numeric entries are ignored."""
    found = [p for p in model_dir.iterdir() if p.is_dir() and _version_name(p.name)] if model_dir.is_dir() else []
    return sorted(found, key=lambda p: int(p.name))


def _version_name(name: str) -> bool:
    """``7``, not ``07``: two spellings of one number would be two directories for one version."""
    return untrusted.ascii_digits(name) and name == str(int(name))


def latest_version(model_dir: Path) -> Path | None:
    found = versions(model_dir)
    return found[-1] if found else None


def scan(repository: Path) -> dict[str, Path]:
    """Every model in a repository directory -> its highest version directory.

    A directory that is itself a model (holds versions) or a bundle is a repository of one.
    """
    if (repository / CONFIG_FILE).is_file():
        return {_bundle_name(repository): repository}
    if versions(repository):
        return {repository.name: latest_version(repository)}
    models = {}
    for child in sorted(repository.iterdir()) if repository.is_dir() else []:
        if child.is_dir() and not child.name.startswith(".") and (latest := latest_version(child)):
            models[child.name] = latest
    if not models:
        raise NotFound(f"{repository}: no models (expected <name>/<version>/{CONFIG_FILE})")
    return models


def _bundle_name(path: Path) -> str:
    return path.parent.name if untrusted.ascii_digits(path.name) else path.name


def signature(version_dir: Path) -> tuple:
    """Names, sizes and modification times of a version's files: unchanged means settled."""
    entries = []
    for path in sorted(version_dir.rglob("*")):
        try:
            stat = path.stat()
        except OSError:
            continue
        entries.append((str(path.relative_to(version_dir)), stat.st_size, stat.st_mtime_ns))
    return tuple(entries)


def escapes(root: Path, path: Path) -> bool:
    """True if ``path`` (a symlink, or under one) resolves outside ``root``."""
    try:
        return not path.resolve().is_relative_to(root.resolve())
    except OSError:
        return True


def publish(model_dir: Path, staging: Path, configure) -> int:
    """Rename ``staging`` (a hidden directory in ``model_dir``) to the next version number, after
    ``configure(version)`` has written its config; never overwrites an existing version."""
    while True:
        latest = latest_version(model_dir)
        version = int(latest.name) + 1 if latest else 1
        configure(version)
        try:
            staging.rename(model_dir / str(version))  # fails if another run took this number first
            return version
        except OSError:
            taken = model_dir / str(version)
            if not taken.exists():
                raise
            if not taken.is_dir():  # not a version another run published: a stray file in the way
                raise BundleError(f"{taken} is in the way of version {version}: it is not a version directory") from None
