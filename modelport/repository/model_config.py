"""``model.toml``: a model's version policy, version labels and rollout policy, beside its versions."""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelport.errors import BundleError

MODEL_CONFIG = "model.toml"


@dataclass(frozen=True)
class RolloutPolicy:
    """The ``[rollout]`` table of ``model.toml``."""

    shadow_requests: int = 500  # compared shadow answers before the shadow verdict; 0 = no shadow stage
    min_agreement: float = 0.97  # top-1 label agreement with the serving version
    canary_share: float = 0.1  # of requests that name no version; 0 = no canary stage
    canary_requests: int = 1000  # canary answers before the canary verdict
    max_error_rate: float = 0.01
    max_p99_ratio: float = 1.5  # candidate's p99 latency / the serving version's

    @classmethod
    def from_table(cls, raw: Any, path) -> "RolloutPolicy":
        if not isinstance(raw, dict):
            raise BundleError(f"{path}: [rollout] must be a table")
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise BundleError(f"{path}: rollout.{unknown[0]} is not a rollout setting; the settings are "
                              f"{', '.join(cls.__dataclass_fields__)}")
        values = {}
        for name, spec in cls.__dataclass_fields__.items():
            if name not in raw:
                continue
            value = raw[name]
            is_int = spec.type in ("int", int)
            if isinstance(value, bool) or not isinstance(value, (int,) if is_int else (int, float)) \
                    or not math.isfinite(value):
                raise BundleError(f"{path}: rollout.{name} must be {'a whole number' if is_int else 'a number'}, "
                                  f"got {value!r}")
            values[name] = value if is_int else float(value)
        policy = cls(**values)
        for name, low, high in (("shadow_requests", 0, None), ("canary_requests", 0, None),
                                ("min_agreement", 0, 1), ("canary_share", 0, 1), ("max_error_rate", 0, 1),
                                ("max_p99_ratio", 1, None)):
            value = getattr(policy, name)
            if value < low or (high is not None and value > high):
                bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
                raise BundleError(f"{path}: rollout.{name} = {value!r} must be {bounds}")
        if policy.canary_share > 0 and policy.canary_requests == 0 or policy.canary_share == 0 and \
                "canary_requests" in raw and policy.canary_requests > 0:
            raise BundleError(f"{path}: rollout.canary_share and rollout.canary_requests go together: "
                              f"both above 0 for a canary stage, or canary_share = 0 for none")
        return policy



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
