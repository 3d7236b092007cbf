"""Encoded image bytes -> the uint8 HxWx3 crop a model takes.

The fast path does what a naive server does in a fraction of the CPU:
- JPEGs are decoded at a reduced DCT scale (1/2, 1/4, 1/8) that still covers the target size,
  so a 640 px photo for a 224 px model is never decoded at full resolution;
- resize and centre crop are one resampling step over the crop box (no full-size resize);
- everything stays uint8; normalisation happens once per batch (or inside the ONNX graph).
``load`` and ``crop`` are ``decode``'s two halves, for a pipeline that feeds one image to models of
different input sizes. ``reference`` is the textbook pipeline, kept for tests and benchmarks to
compare against.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from modelport.repository.bundle import ImageInput
from modelport.errors import BadInput

DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: larger than any phone photo, far below a bomb.
# JPEGs are decoded at a DCT scale that still leaves this many times the resized size, so the
# final bilinear step does real anti-aliasing. Measured on 200 photos of 1000-3000 px: margin 1
# agrees with the reference top-1 on 92 %, 2 on 98 %, 3 on 99.5 % at half the reference's time.
_DRAFT_MARGIN = 3
_DECODE_NICE = 10

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, UnidentifiedImageError,
                  Image.DecompressionBombError, Image.DecompressionBombWarning)


class Decoded(NamedTuple):
    """An image decoded but not yet resized: what the crops of several input sizes can share."""

    image: Image.Image  # loaded, RGB or L
    width: int  # the source's size, which the crop geometry is computed from
    height: int
    scale: float  # source pixels per decoded pixel: a JPEG's DCT scale, else 1

    @property
    def nbytes(self) -> int:
        return self.image.width * self.image.height * len(self.image.getbands())


def decode(data: bytes, spec: ImageInput, *, max_pixels: int = DEFAULT_MAX_PIXELS,
           input_name: str | None = None) -> np.ndarray:
    """Decode ``data`` into a (height, width, 3) uint8 array in the bundle's channel order."""
    return crop(load(data, spec, max_pixels=max_pixels, input_name=input_name), spec, input_name=input_name)


def load(data: bytes, spec: ImageInput, *, max_pixels: int = DEFAULT_MAX_PIXELS, input_name: str | None = None,
         reuse: Decoded | None = None) -> Decoded:
    """Decode ``data`` at the scale ``spec``'s crop needs; return ``reuse`` (``data`` decoded for
    another input size) instead where that scale is the same, so that its pixels are too.

    Input sizes close to each other mostly share the DCT scale (Lite0's 256 px resize and Lite2's
    297 px do on every photo under 1536 px on its shorter side). Where they do not, decoding once at the finer
    scale would change the coarser model's crops; decoding again keeps every crop what ``decode``
    gives, and the header alone tells which case it is.
    """
    image = _open(data, max_pixels, input_name)
    try:
        width, height = image.size
        resized_w, resized_h, _ = _geometry(width, height, spec)
        scale = 1.0  # source pixels per decoded pixel
        if image.format == "JPEG":
            # draft() picks the largest DCT scale (1/2, 1/4, 1/8) whose output still covers this.
            drafted = image.draft("RGB", (resized_w * _DRAFT_MARGIN, resized_h * _DRAFT_MARGIN))
            if drafted is not None:
                scale = width / drafted[1][2]
        if reuse is not None and reuse.scale == scale:
            return reuse
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        image.load()
    except _DECODE_ERRORS as exc:
        raise BadInput(f"cannot decode image: {exc}", input_name=input_name) from None
    return Decoded(image, width, height, scale)


def crop(decoded: Decoded, spec: ImageInput, *, input_name: str | None = None) -> np.ndarray:
    """Resize and centre-crop a decoded image into ``spec``'s (height, width, 3) uint8 array."""
    resized_w, resized_h, (left, top, right, bottom) = _geometry(decoded.width, decoded.height, spec)
    # The crop box of the reference pipeline (resize to resized_w x resized_h, then crop),
    # mapped back to decoded pixels: one resampling step gives the same filter taps.
    fx = decoded.width / resized_w / decoded.scale
    fy = decoded.height / resized_h / decoded.scale
    try:
        image = decoded.image.resize((spec.width, spec.height), Image.BILINEAR,
                                     box=(left * fx, top * fy, right * fx, bottom * fy))
        if image.mode != "RGB":
            image = image.convert("RGB")
        array = np.asarray(image)
    except _DECODE_ERRORS as exc:
        raise BadInput(f"cannot decode image: {exc}", input_name=input_name) from None
    return array[..., ::-1] if spec.channel_order == "BGR" else array


def reference(data: bytes, spec: ImageInput, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The textbook pipeline: full decode, bilinear resize of the shorter side, centre crop."""
    image = _open(data, max_pixels, None).convert("RGB")
    resized_w, resized_h, crop = _geometry(*image.size, spec)
    image = image.resize((resized_w, resized_h), Image.BILINEAR).crop(crop)
    array = np.asarray(image)
    return array[..., ::-1] if spec.channel_order == "BGR" else array


def to_model_input(batch: np.ndarray, spec: ImageInput) -> np.ndarray:
    """A (N, H, W, 3) uint8 batch -> the layout and dtype the graph takes, once per batch."""
    if spec.dtype == "float32":
        mean = np.asarray(spec.mean, dtype=np.float32)
        inv_std = 1.0 / np.asarray(spec.std, dtype=np.float32)
        batch = (batch.astype(np.float32) - mean) * inv_std
    if spec.layout == "NCHW":
        batch = np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
    return batch


def lower_priority() -> None:
    """Thread initializer for decode workers: yield the cores to the runtime's threads first.

    ONNX Runtime splits each operator over its threads and waits for the slowest, so a decode
    thread holding a core stalls the whole batch; at a lower priority, decoding takes the gaps.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _DECODE_NICE)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        pass


def _open(data: bytes, max_pixels: int, input_name: str | None) -> Image.Image:
    if not data:
        raise BadInput("empty image", input_name=input_name)
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns, then raises at 2x its global limit; ours is the one
            # that applies, and it runs on the header before any pixel is decoded.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except _DECODE_ERRORS as exc:
        raise BadInput(f"cannot decode image: {_describe(exc)}", input_name=input_name) from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadInput(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
                       input_name=input_name)
    if width < 1 or height < 1:
        raise BadInput(f"image has no pixels ({width}x{height})", input_name=input_name)
    return image


def _geometry(width: int, height: int, spec: ImageInput) -> tuple[int, int, tuple[int, int, int, int]]:
    """The reference pipeline's resized size and integer crop box within it."""
    if not spec.resize_shorter:
        return spec.width, spec.height, (0, 0, spec.width, spec.height)
    scale = spec.resize_shorter / min(width, height)
    resized_w, resized_h = max(spec.width, round(width * scale)), max(spec.height, round(height * scale))
    left, top = (resized_w - spec.width) // 2, (resized_h - spec.height) // 2
    return resized_w, resized_h, (left, top, left + spec.width, top + spec.height)


def _describe(exc: Exception) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not a known image format"
    return str(exc)
