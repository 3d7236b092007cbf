"""Folders of images as the commands take them: flat, or one ``<class>/`` folder per label."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from modelport.errors import BadInput, NotFound

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def find_images(folder: Path) -> tuple[list[Path], list[str] | None]:
    """Images under ``folder``; with ``<class>/`` subfolders, each image's class too."""
    if not folder.is_dir():
        raise NotFound(f"{folder}: not a directory of images")
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        paths, labels = [], []
        for directory in classes:
            for path in sorted(directory.rglob("*")):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    paths.append(path)
                    labels.append(directory.name)
        found = (paths, labels)
    else:
        found = (sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), None)
    if not found[0]:
        raise NotFound(f"{folder}: no images (.jpg, .png, ...) here or in class folders")
    return found


def truth_from_labels(labels: Sequence[str], class_names: Sequence[str]) -> np.ndarray:
    """Folder names -> class indices of the model (case and ' '/'_' insensitive)."""
    def key(text: str) -> str:
        return text.lower().replace("_", " ").strip()

    index = {key(label): i for i, label in enumerate(class_names)}
    unknown = sorted({name for name in labels if key(name) not in index})
    if unknown:
        raise BadInput(f"class folder(s) {', '.join(map(repr, unknown[:5]))} name no label of the model; "
                       f"name the folders after its labels, or put the images in one flat folder")
    return np.array([index[key(name)] for name in labels])
