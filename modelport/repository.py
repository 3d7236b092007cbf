"""Finding bundles: a path to a version, a path to a model's versions, or a model name."""

from __future__ import annotations

from pathlib import Path

from modelport import default_model
from modelport.bundle import CONFIG_FILE
from modelport.errors import NotFound


def resolve(ref: str | None) -> Path:
    """A model reference -> the version directory to load.

    - None or ``efficientnet-lite0``: the default model (built on first use);
    - a bundle directory (holds ``modelport.toml``);
    - a model directory (``<name>/<version>/...``): its highest version;
    - a name under ``$MODELPORT_HOME/models``: its highest version.
    """
    if ref is None or (ref == default_model.NAME and not Path(ref).exists()):
        return default_model.ensure_default_model()
    path = Path(ref)
    if not path.exists():
        named = default_model.model_home() / "models" / ref
        if not named.is_dir():
            raise NotFound(f"no model {ref!r}: not a directory, and not a model in {named.parent}")
        path = named
    if (path / CONFIG_FILE).is_file():
        return path
    version = latest_version(path)
    if version is None:
        raise NotFound(f"{path}: no bundle here (no {CONFIG_FILE}, and no numbered version directories)")
    return version


def versions(model_dir: Path) -> list[Path]:
    """Version directories of a model, lowest first. Hidden or non-numeric entries are ignored."""
    found = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()] if model_dir.is_dir() else []
    return sorted(found, key=lambda p: int(p.name))


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
    return path.parent.name if path.name.isdigit() else path.name
