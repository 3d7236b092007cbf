"""``<repository>/<name>/pipeline.toml``: what a pipeline is, read and checked without loading anything.

    kind = "cascade"                                        # or "chain", "ensemble"
    steps = ["efficientnet-lite0", "efficientnet-lite2"]    # model names; "name:3" or "name:stable" pins a version
    escalate_below = 0.55                                   # cascade: one threshold, or one per step but the last
    confidence = "top1"                                     # cascade: "top1" probability, or "margin" (top-1 - top-2)
    feed = ["features"]                                     # chain: the output of each step that feeds the next
                                                            #   (default: the step's primary output)
    weights = [0.5, 0.5]                                    # ensemble: optional, default equal

Checks that need the steps themselves (label sets, shapes and dtypes along a chain) happen when
the pipeline is loaded (:mod:`modelport.pipeline.service`); cycles and depth are checked here,
from the files, so that a cycle is reported as a cycle and not as "step not loaded".
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from modelport import untrusted
from modelport.errors import BundleError, ModelportError
from modelport.repository.layout import check_name

PIPELINE_FILE = "pipeline.toml"
KINDS = ("cascade", "chain", "ensemble")
CONFIDENCES = ("top1", "margin")
MAX_DEPTH = 4  # a pipeline whose steps are pipelines, and so on: at most this many levels


@dataclass(frozen=True)
class Step:
    model: str
    version: str | None = None  # a number or a label; None: the model's newest READY version

    @property
    def ref(self) -> str:
        return self.model if self.version is None else f"{self.model}:{self.version}"


@dataclass(frozen=True)
class PipelineConfig:
    path: Path
    kind: str
    steps: tuple[Step, ...]
    escalate_below: tuple[float, ...] = ()  # cascade: one per step but the last
    confidence: str = "top1"
    feed: tuple[str | None, ...] = ()  # chain: one per step but the last; None = that step's primary output
    weights: tuple[float, ...] = ()  # ensemble: one per step, summing to 1


def read_pipeline(path: Path) -> PipelineConfig:
    """Read ``pipeline.toml`` (the file itself); every mistake is a BundleError naming file and field."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise BundleError(f"{path}: cannot read it: {exc.strerror}") from None
    known = {"kind", "steps", "escalate_below", "confidence", "feed", "weights", "description"}
    if unknown := sorted(set(raw) - known):
        raise BundleError(f"{path}: unknown key {unknown[0]!r}; expected {', '.join(sorted(known))}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise BundleError(f"{path}: kind = {untrusted.show(kind)}; expected one of {', '.join(KINDS)}")
    steps = _steps(path, raw.get("steps"), kind)
    between = len(steps) - 1
    config = dict(path=path, kind=kind, steps=steps)
    _only_for(path, raw, kind, {"escalate_below": "cascade", "confidence": "cascade", "feed": "chain",
                                "weights": "ensemble"})
    if kind == "cascade":
        config["confidence"] = raw.get("confidence", "top1")
        if config["confidence"] not in CONFIDENCES:
            raise BundleError(f"{path}: confidence = {untrusted.show(config['confidence'])}; expected "
                              f"{' or '.join(CONFIDENCES)}")
        thresholds = raw.get("escalate_below")
        if thresholds is None:
            raise BundleError(f"{path}: a cascade needs escalate_below (the confidence under which the next step "
                              f"runs), for example escalate_below = 0.55")
        thresholds = thresholds if isinstance(thresholds, list) else [thresholds] * between
        if len(thresholds) != between or not all(_number(t) and 0 <= t <= 1 for t in thresholds):
            raise BundleError(f"{path}: escalate_below must be a number from 0 to 1, or a list of {between} such "
                              f"numbers (one per step but the last), got {untrusted.show(raw['escalate_below'])}")
        config["escalate_below"] = tuple(float(t) for t in thresholds)
    elif kind == "chain":
        feed = raw.get("feed", [None] * between)
        if not isinstance(feed, list) or len(feed) != between or \
                not all(f is None or (isinstance(f, str) and f) for f in feed):
            raise BundleError(f"{path}: feed must list {between} output name(s), one per step but the last "
                              f"(the output that feeds the next step), got {untrusted.show(raw.get('feed'))}")
        config["feed"] = tuple(feed)
    else:
        weights = raw.get("weights", [1.0 / len(steps)] * len(steps))
        if not isinstance(weights, list) or len(weights) != len(steps) or \
                not all(_number(w) and w >= 0 for w in weights) or sum(weights) <= 0:
            raise BundleError(f"{path}: weights must be {len(steps)} non-negative numbers, one per step, "
                              f"got {untrusted.show(raw.get('weights'))}")
        total = float(sum(weights))
        config["weights"] = tuple(float(w) / total for w in weights)
    return PipelineConfig(**config)


def check_graph(name: str, config: PipelineConfig, pipeline_of: Callable[[str], PipelineConfig | None]) -> None:
    """Refuse cycles and pipelines nested deeper than MAX_DEPTH; ``pipeline_of(model)`` reads a step's
    own pipeline.toml, or None when the step is a model."""

    def walk(current: str, cfg: PipelineConfig, trail: tuple[str, ...]) -> None:
        if len(trail) > MAX_DEPTH:
            raise BundleError(f"{config.path}: pipelines nested deeper than {MAX_DEPTH} levels: "
                              f"{' -> '.join(trail)}")
        for step in cfg.steps:
            if step.model in trail:
                raise BundleError(f"{config.path}: steps form a cycle: {' -> '.join(trail + (step.model,))}")
            try:
                inner = pipeline_of(step.model)
            except ModelportError as exc:
                raise BundleError(f"{config.path}: step {step.model!r} is a broken pipeline: {exc.message}") from None
            if inner is not None:
                walk(step.model, inner, trail + (step.model,))

    walk(name, config, (name,))


def _steps(path: Path, raw, kind: str) -> tuple[Step, ...]:
    if not isinstance(raw, list) or not raw:
        raise BundleError(f"{path}: steps must be a list of model names, got {untrusted.show(raw)}")
    steps = []
    for entry in raw:
        if not isinstance(entry, str):
            raise BundleError(f"{path}: steps must be model names (\"name\" or \"name:version\"), got "
                              f"{untrusted.show(entry)}")
        model, _, version = entry.partition(":")
        try:
            check_name(model, "step model name")
            if version:
                check_name(version, "step version")
        except ModelportError as exc:
            raise BundleError(f"{path}: steps: {exc.message}") from None
        steps.append(Step(model, version or None))
    if kind != "chain" and len({s.ref for s in steps}) != len(steps):
        raise BundleError(f"{path}: a {kind} names the same step twice")
    return tuple(steps)


def _only_for(path: Path, raw: dict, kind: str, owners: dict[str, str]) -> None:
    for key, owner in owners.items():
        if key in raw and owner != kind:
            raise BundleError(f"{path}: {key} applies to a {owner}, not to a {kind}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
