"""How pixels become the imported model's input: presets, flags, and what a source says itself.

A preset is a normalisation and a crop rule, named for where such models come from:

| preset | x = (pixel - mean) / std | crop | from |
|---|---|---|---|
| ``inception`` | mean 128, std 128 (-1..1) | whole image resized | the retrain guide's graph, TF-Slim Inception |
| ``keras-mobilenet`` | mean 127.5, std 127.5 (-1..1) | shorter side to size / 0.875, centre | keras.applications mobilenet*, efficientnetv2 (tf mode) |
| ``torchvision`` | ImageNet mean/std of 0..1 pixels, times 255 | shorter side to size / 0.875, centre | torchvision.models |
| ``caffe`` | BGR, ImageNet mean, std 1 | shorter side to size / 0.875, centre | keras.applications resnet50, vgg* |
| ``unit`` | mean 0, std 255 (0..1) | shorter side to size / 0.875, centre | many hand-made models |
| ``raw`` | mean 0, std 1 (0..255) | shorter side to size / 0.875, centre | keras.applications efficientnet, convnext (normalise inside) |
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modelport.errors import BadInput

CROP_FRACTION = 0.875  # ImageNet evaluation: 224 of 256


@dataclass(frozen=True)
class Preprocessing:
    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: str = "RGB"
    whole_image: bool = False  # resize the whole image to the input size (no crop)

    def geometry(self, height: int, width: int) -> int:
        """``resize_shorter`` for an input of this size (0: the whole image is resized)."""
        return 0 if self.whole_image else round(min(height, width) / CROP_FRACTION)

    def apply(self, crops: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 crops, already in ``channel_order`` -> float32 input, NHWC."""
        return (crops.astype(np.float32) - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


_IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
PRESETS = {p.name: p for p in (
    Preprocessing("inception", (128.0, 128.0, 128.0), (128.0, 128.0, 128.0), whole_image=True),
    Preprocessing("keras-mobilenet", (127.5, 127.5, 127.5), (127.5, 127.5, 127.5)),
    Preprocessing("torchvision", _IMAGENET_MEAN, _IMAGENET_STD),
    Preprocessing("caffe", (103.939, 116.779, 123.68), (1.0, 1.0, 1.0), channel_order="BGR"),
    Preprocessing("unit", (0.0, 0.0, 0.0), (255.0, 255.0, 255.0)),
    Preprocessing("raw", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
)}

# keras.applications model names (``model.name``) -> the preset its preprocess_input applies.
_KERAS_FAMILIES = (
    ("mobilenetv3", "raw"),  # MobileNetV3 normalises inside the model
    ("mobilenet", "keras-mobilenet"), ("inception", "keras-mobilenet"), ("xception", "keras-mobilenet"),
    ("nasnet", "keras-mobilenet"), ("resnet50v2", "keras-mobilenet"), ("resnet101v2", "keras-mobilenet"),
    ("resnet152v2", "keras-mobilenet"), ("efficientnetv2", "raw"), ("efficientnet", "raw"), ("convnext", "raw"),
    ("regnet", "raw"), ("resnet", "caffe"), ("vgg", "caffe"), ("densenet", "torchvision"),
)


def preset(name: str) -> Preprocessing:
    if name not in PRESETS:
        raise BadInput(f"unknown preprocessing {name!r}; the presets are {', '.join(PRESETS)}")
    return PRESETS[name]


def from_keras_name(model_name: str) -> Preprocessing | None:
    """The preprocessing a keras.applications model was trained with, from its name, if it is one."""
    name = model_name.lower()
    for family, preset_name in _KERAS_FAMILIES:
        if name.startswith(family):
            return PRESETS[preset_name]
    return None


def custom(mean: tuple[float, float, float], std: tuple[float, float, float], channel_order: str = "RGB") -> Preprocessing:
    if any(s <= 0 for s in std):
        raise BadInput(f"std must be above 0, got {list(std)}")
    return Preprocessing("custom", tuple(mean), tuple(std), channel_order)
