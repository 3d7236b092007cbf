"""The fast image pipeline: same answers as the textbook pipeline, clear errors on bad bytes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from modelport import samples

from modelport.engine import imaging
from modelport.repository.bundle import ImageInput
from modelport.errors import BadInput

SPEC = ImageInput()


def _predict_all(model, crops):
    return np.concatenate([model.predict(np.stack(crops[i:i + 16])) for i in range(0, len(crops), 16)])


def test_top1_agrees_with_reference_pipeline(default_model):
    photos = samples.photo_set(200, seed=11)
    fast = _predict_all(default_model, [default_model.decode(d) for d in photos])
    ref = _predict_all(default_model, [imaging.reference(d, default_model.spec) for d in photos])
    agreement = float(np.mean(fast.argmax(1) == ref.argmax(1)))
    assert agreement >= 0.99, agreement


def test_large_jpegs_use_scaled_decoding_and_still_agree(default_model):
    photos = samples.photo_set(40, seed=12, min_side=1500, max_side=2500)
    fast = _predict_all(default_model, [default_model.decode(d) for d in photos])
    ref = _predict_all(default_model, [imaging.reference(d, default_model.spec) for d in photos])
    assert float(np.mean(fast.argmax(1) == ref.argmax(1))) >= 0.95
    # Scaled decoding really happened: the decoder was asked for a smaller image.
    image = Image.open(io.BytesIO(photos[0]))
    assert image.draft("RGB", (600, 600)) is not None


def test_small_images_match_reference_pixels():
    for data in samples.photo_set(20, seed=5):
        diff = np.abs(imaging.decode(data, SPEC).astype(int) - imaging.reference(data, SPEC))
        assert diff.max() <= 1


def test_output_shape_and_dtype():
    crop = imaging.decode(samples.jpeg(samples.photo("coffee")), SPEC)
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "1"])
def test_any_pillow_mode_becomes_rgb(mode):
    image = Image.fromarray(samples.photo("chelsea")).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if mode in ("L", "CMYK") else "PNG")
    crop = imaging.decode(buffer.getvalue(), SPEC)
    assert crop.shape == (224, 224, 3)


def test_tiny_image_is_upscaled():
    buffer = io.BytesIO()
    Image.new("RGB", (3, 5), (10, 20, 30)).save(buffer, format="PNG")
    crop = imaging.decode(buffer.getvalue(), SPEC)
    assert crop.shape == (224, 224, 3) and (crop == (10, 20, 30)).all()


def test_bgr_channel_order():
    buffer = io.BytesIO()
    Image.new("RGB", (300, 300), (255, 0, 0)).save(buffer, format="PNG")
    crop = imaging.decode(buffer.getvalue(), ImageInput(channel_order="BGR"))
    assert tuple(crop[0, 0]) == (0, 0, 255)


def test_truncated_jpeg_is_bad_input():
    data = samples.jpeg(samples.photo("coffee"))
    with pytest.raises(BadInput) as info:
        imaging.decode(data[: len(data) // 2], SPEC, input_name="data")
    assert "cannot decode image" in info.value.message and info.value.input_name == "data"


@pytest.mark.parametrize("data", [b"", b"hello, not an image", b"\xff\xd8\xff" + b"\x00" * 50])
def test_non_image_bytes_are_bad_input(data):
    with pytest.raises(BadInput):
        imaging.decode(data, SPEC)


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares width x height pixels: a decompression bomb's header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_rejected_from_header():
    bomb = _png_header_only(50_000, 50_000)
    assert len(bomb) < 200
    with pytest.raises(BadInput) as info:
        imaging.decode(bomb, SPEC)
    assert "over the limit" in info.value.message or "decompression bomb" in info.value.message


def test_pixel_limit_boundary():
    buffer = io.BytesIO()
    Image.new("RGB", (100, 100)).save(buffer, format="PNG")
    imaging.decode(buffer.getvalue(), SPEC, max_pixels=10_000)  # exactly at the limit: fine
    with pytest.raises(BadInput, match="over the limit of 9999"):
        imaging.decode(buffer.getvalue(), SPEC, max_pixels=9_999)


def test_float_nchw_normalisation_once_per_batch():
    batch = np.full((2, 4, 4, 3), 255, dtype=np.uint8)
    spec = ImageInput(height=4, width=4, dtype="float32", layout="NCHW", mean=(127.5,) * 3, std=(127.5,) * 3)
    out = imaging.to_model_input(batch, spec)
    assert out.shape == (2, 3, 4, 4) and out.dtype == np.float32 and np.allclose(out, 1.0)
