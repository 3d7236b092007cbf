"""Finding bundles: a path to a version, a path to a model's versions, or a model name."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from modelport import untrusted

from modelport.packaged import default_model
from modelport.repository.bundle import CONFIG_FILE
from modelport.errors import BundleError, NotFound
from modelport.lifecycle.rollout import RolloutPolicy


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
    found = [p for p in model_dir.iterdir() if p.is_dir() and untrusted.ascii_digits(p.name)] if model_dir.is_dir() else []
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
    return path.parent.name if untrusted.ascii_digits(path.name) else path.name


# -- a watched repository: per-model configuration and version policy ------------------------------

MODEL_CONFIG = "model.toml"


@dataclass(frozen=True)
class ModelConfig:
    """``<repository>/<model>/model.toml`` (optional)::

        version_policy = { latest = 2 }     # default { latest = 1 }; or { all = true }; or { specific = [3, 5] }
        [labels]
        stable = 6
        canary = 7

    Versions named by a label are loaded too, whatever the policy. A ``[rollout]`` table makes new
    versions go through shadow and canary before they take the traffic (``rollout.py``).
    """

    latest: int | None = 1
    all: bool = False
    specific: tuple[int, ...] = ()
    labels: dict[str, int] = field(default_factory=dict)
    rollout: RolloutPolicy | None = None

    def wanted(self, available: list[int]) -> set[int]:
        if self.all:
            chosen = set(available)
        elif self.specific:
            chosen = set(self.specific) & set(available)
        else:
            chosen = set(sorted(available)[-self.latest:]) if self.latest else set()
        return chosen | (set(self.labels.values()) & set(available))


def read_model_config(model_dir: Path) -> ModelConfig:
    path = model_dir / MODEL_CONFIG
    if not path.is_file():
        return ModelConfig()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid TOML: {exc}") from None
    unknown = set(raw) - {"version_policy", "labels", "rollout"}
    if unknown:
        raise BundleError(f"{path}: unknown key {sorted(unknown)[0]}")
    policy = raw.get("version_policy", {"latest": 1})
    if not isinstance(policy, dict) or len(policy) != 1:
        raise BundleError(f"{path}: version_policy must be one of {{latest = N}}, {{all = true}}, {{specific = [...]}}")
    (kind, value), = policy.items()
    labels = raw.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                               for v in labels.values()):
        raise BundleError(f"{path}: labels must map names to version numbers")
    for label in labels:
        if label.isdigit() or not label.replace("-", "").replace("_", "").isalnum():
            raise BundleError(f"{path}: label {label!r} must be a word, not a number")
    rollout = RolloutPolicy.from_table(raw["rollout"], path) if "rollout" in raw else None
    if kind == "latest" and isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return ModelConfig(latest=value, labels=labels, rollout=rollout)
    if kind == "all" and value is True:
        return ModelConfig(latest=None, all=True, labels=labels, rollout=rollout)
    if kind == "specific" and isinstance(value, list) and value and all(isinstance(v, int) and v > 0 for v in value):
        return ModelConfig(latest=None, specific=tuple(value), labels=labels, rollout=rollout)
    raise BundleError(f"{path}: version_policy {policy!r} is not {{latest = N >= 1}}, {{all = true}} or "
                      f"{{specific = [N, ...]}}")


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
