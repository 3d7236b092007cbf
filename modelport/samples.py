"""Real photos with known content, from images that scikit-image and scikit-learn ship.

Used by the tests, the benchmarks and ``modelport samples``: ``chelsea`` is a cat (ImageNet
281-285) and ``coffee`` an espresso (967). ``photo_set`` cuts a deterministic set of JPEGs of
200-640 px from every colour and grey photo the two packages carry, for pipeline comparisons.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from modelport.errors import MissingExtra

KNOWN = {"chelsea": (281, 282, 283, 284, 285), "coffee": (967,)}
_SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field",
                   "retina", "camera", "brick", "clock", "coins", "grass", "gravel", "moon", "page", "text")


def photo(name: str) -> np.ndarray:
    try:
        from skimage import data
    except ImportError:
        raise MissingExtra("sample photos need scikit-image: pip install 'modelport[test]'") from None
    array = getattr(data, name)()
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return np.ascontiguousarray(array[..., :3]).astype(np.uint8)


def jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# Photos of things ImageNet has a class for (a cat, an espresso, a space shuttle, a wall clock,
# and scikit-learn's pagoda and daisy): a set on which an ImageNet model is often sure of itself.
OBJECT_PHOTOS = ("chelsea", "coffee", "rocket", "astronaut", "clock")


def sources(names: tuple[str, ...] = _SKIMAGE_PHOTOS) -> list[np.ndarray]:
    arrays = [photo(name) for name in names]
    try:
        from sklearn.datasets import load_sample_images

        arrays.extend(load_sample_images().images)
    except ImportError:
        pass
    return arrays


def photo_set(count: int, *, seed: int = 0, min_side: int = 200, max_side: int = 640,
              objects: bool = False) -> list[bytes]:
    """``count`` JPEGs: random crops of real photos, rescaled so the longer side is 200-640 px.

    ``objects``: only photos of ImageNet objects (OBJECT_PHOTOS and scikit-learn's two).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    arrays = sources(OBJECT_PHOTOS if objects else _SKIMAGE_PHOTOS)
    out = []
    for i in range(count):
        array = arrays[i % len(arrays)]
        h, w = array.shape[:2]
        frac = rng.uniform(0.6, 1.0)
        ch, cw = max(32, int(h * frac)), max(32, int(w * rng.uniform(0.6, 1.0)))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = Image.fromarray(array[top:top + ch, left:left + cw])
        longer = int(rng.integers(min_side, max_side + 1))
        scale = longer / max(crop.size)
        size = (max(1, round(crop.size[0] * scale)), max(1, round(crop.size[1] * scale)))
        crop = crop.resize(size, Image.BICUBIC)
        out.append(jpeg(np.asarray(crop), quality=int(rng.integers(75, 96))))
    return out


def write_samples(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, filename in (("chelsea", "cat.jpg"), ("coffee", "espresso.jpg")):
        path = directory / filename
        path.write_bytes(jpeg(photo(name)))
        paths.append(path)
    return paths


LABELLED_SOURCES = ("chelsea", "coffee", "rocket", "astronaut", "hubble_deep_field", "retina",
                    "immunohistochemistry", "camera", "coins", "moon")


def labelled_folder(root: Path, *, classes: int = 4, per_class: int = 12, seed: int = 0,
                    sources: tuple[str, ...] = LABELLED_SOURCES) -> list[str]:
    """A retraining dataset: ``root/<class>/<n>.jpg``, random crops of one real photo per class.

    Honest caveat: every image of a class comes from the same photo, so the classes are far
    easier to tell apart than real ones; it exercises the machinery, not the backbone.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = list(sources[:classes])
    for name in names:
        array = photo(name)
        h, w = array.shape[:2]
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            frac = rng.uniform(0.45, 0.9)
            ch, cw = int(h * frac), int(w * rng.uniform(0.45, 0.9))
            top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            crop = array[top:top + ch, left:left + cw]
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            Image.fromarray(np.ascontiguousarray(crop)).save(root / name / f"{seed}-{i:04d}.jpg",
                                                             quality=int(rng.integers(70, 95)))
    return names
