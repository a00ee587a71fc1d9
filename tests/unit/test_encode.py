"""Image encoding: lossless PNG with UTF-8 metadata, JPEG/WEBP that honour quality."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngImageFile

from worker.encode import CONTENT_TYPES, EXTENSIONS, encode_image, read_text

METADATA = {
    "job_id": "job_01HZX3",
    "prompt": "一名穿著紅色漢服的年輕中國女子, golden phoenix headdress",
    "seed": "42",
    "model": "Tongyi-MAI/Z-Image-Turbo",
}


@pytest.fixture
def picture() -> Image.Image:
    """A detailed 96x64 image: smooth gradients plus noise, so quality changes the size."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:64, 0:96]
    base = np.stack([x * 2.5, y * 4.0, (x + y) * 1.5], axis=-1)
    pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def decode(data: bytes) -> Image.Image:
    """Decode bytes fully into a PIL image."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_png_is_lossless_and_keeps_utf8_text(picture: Image.Image) -> None:
    data = encode_image(picture, "png", text=METADATA)
    image = decode(data)
    assert isinstance(image, PngImageFile)
    assert np.array_equal(np.asarray(image), np.asarray(picture))
    assert {key: str(value) for key, value in image.text.items()} == METADATA
    assert b"iTXt" in data  # UTF-8 chunks: tEXt cannot hold the Chinese prompt
    assert read_text(data) == METADATA


def test_png_without_text_has_no_text_chunks(picture: Image.Image) -> None:
    data = encode_image(picture, "png")
    assert b"iTXt" not in data and b"tEXt" not in data
    assert read_text(data) == {}


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_lossy_formats_decode_at_the_right_size(picture: Image.Image, fmt: str) -> None:
    data = encode_image(picture, fmt, text=METADATA)  # type: ignore[arg-type]
    image = decode(data)
    assert image.format == fmt.upper()
    assert image.size == picture.size
    assert image.mode == "RGB"
    # Lossy, but close to the source.
    error = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(picture, dtype=np.int16)).mean()
    assert error < 20
    assert read_text(data) == METADATA
    description = image.getexif()[0x010E]
    assert json.loads(description)["prompt"] == METADATA["prompt"]


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_lower_quality_gives_fewer_bytes(picture: Image.Image, fmt: str) -> None:
    low = encode_image(picture, fmt, quality=30)  # type: ignore[arg-type]
    high = encode_image(picture, fmt, quality=95)  # type: ignore[arg-type]
    assert len(low) < 0.8 * len(high)


def test_alpha_is_dropped_for_jpeg(picture: Image.Image) -> None:
    image = decode(encode_image(picture.convert("RGBA"), "jpeg"))
    assert image.mode == "RGB" and image.size == picture.size


def test_bad_arguments_are_refused(picture: Image.Image) -> None:
    with pytest.raises(ValueError, match="format"):
        encode_image(picture, "gif")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="quality"):
        encode_image(picture, "jpeg", quality=0)


def test_content_types_and_extensions_cover_every_format() -> None:
    assert CONTENT_TYPES == {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
    assert EXTENSIONS == {"png": "png", "jpeg": "jpg", "webp": "webp"}


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "I;16"])
def test_png_keeps_the_pixels_of_any_mode(picture: Image.Image, mode: str) -> None:
    source = picture.convert(mode)
    image = decode(encode_image(source, "png"))
    expected = source if mode in ("RGB", "RGBA", "L") else source.convert("RGB")
    assert image.mode == expected.mode
    assert np.array_equal(np.asarray(image), np.asarray(expected))
