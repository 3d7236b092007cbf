"""A folder of labelled images: ``<root>/<class>/<image>``, split deterministically."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelport.errors import BadInput
from modelport.folders import IMAGE_SUFFIXES



@dataclass(frozen=True)
class Example:
    path: Path
    label: int


@dataclass(frozen=True)
class Dataset:
    classes: tuple[str, ...]
    train: tuple[Example, ...]
    val: tuple[Example, ...]

    def counts(self) -> dict[str, int]:
        counts = {c: 0 for c in self.classes}
        for example in self.train + self.val:
            counts[self.classes[example.label]] += 1
        return counts


def scan(root: Path, *, val_fraction: float = 0.1, seed: int = 0, min_per_class: int = 5) -> Dataset:
    """Find the classes and images and split each class, the same way on every run.

    Checked before any image is read: the folder exists, holds at least two class folders, and
    every class has at least ``min_per_class`` image files.
    """
    if not root.is_dir():
        raise BadInput(f"{root}: not a directory (expected one sub-directory per class)")
    if not 0 < val_fraction < 1:
        raise BadInput(f"val fraction must be between 0 and 1, got {val_fraction}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise BadInput(f"{root}: found {len(class_dirs)} class folder(s); retraining needs at least 2 "
                       f"(one sub-directory of images per class)")
    files = {d.name: sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                            and not f.name.startswith(".")) for d in class_dirs}
    too_small = {name: len(paths) for name, paths in files.items() if len(paths) < min_per_class}
    if too_small:
        detail = ", ".join(f"{name!r} has {n}" for name, n in too_small.items())
        raise BadInput(f"{root}: every class needs at least {min_per_class} images; {detail}")

    rng = np.random.default_rng(seed)
    train, val = [], []
    for label, paths in enumerate(files.values()):
        order = rng.permutation(len(paths))
        n_val = max(1, round(len(paths) * val_fraction))
        for rank, index in enumerate(order):
            (val if rank < n_val else train).append(Example(paths[index], label))
    return Dataset(tuple(files), tuple(train), tuple(val))
