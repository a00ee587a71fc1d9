"""The PNG writer: every pixel and every text chunk survives a round trip through Pillow, at every level."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from worker.png import SIGNATURE, filtered_rows, write_png


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # Pillow checks every chunk's CRC while loading
    return image


@pytest.mark.parametrize(("shape", "mode"), [((1, 1), "L"), ((7, 5), "L"), ((33, 17, 3), "RGB"), ((16, 9, 4), "RGBA")])
@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_every_pixel_survives_a_round_trip(shape: tuple[int, ...], mode: str, level: int) -> None:
    pixels = np.random.default_rng(sum(shape) + level).integers(0, 256, shape, dtype=np.uint8)
    image = decode(write_png(pixels, level=level))
    assert image.format == "PNG" and image.mode == mode
    assert image.size == (shape[1], shape[0])
    assert np.array_equal(np.asarray(image), pixels)


def test_one_channel_arrays_are_grayscale() -> None:
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
    assert np.array_equal(np.asarray(decode(write_png(pixels))), pixels[:, :, 0])


def test_text_is_stored_as_utf8_itxt_chunks_pillow_reads() -> None:
    text = {"prompt": "一名穿著紅色漢服的年輕中國女子", "seed": "42", "empty": ""}
    data = write_png(np.zeros((2, 2, 3), dtype=np.uint8), text=text)
    assert data.startswith(SIGNATURE) and data.count(b"iTXt") == 3
    assert {k: str(v) for k, v in decode(data).text.items()} == text


def test_the_up_filter_wraps_modulo_256() -> None:
    pixels = np.array([[[250]], [[3]]], dtype=np.uint8)  # 3 - 250 = 9 (mod 256)
    assert filtered_rows(pixels) == bytes([2, 250, 2, 9])


def test_flat_regions_and_gradients_compress() -> None:
    y, x = np.mgrid[0:128, 0:128]
    flat = np.zeros((128, 128, 3), dtype=np.uint8)
    flat[32:96, 32:96] = (200, 30, 90)  # a plain background with a block of colour
    gradient = np.stack([x * 2, y * 2, x + y], axis=-1).astype(np.uint8)
    for pixels, at_most in ((flat, 1 / 50), (gradient, 1 / 3)):
        data = write_png(pixels)
        assert len(data) < pixels.nbytes * at_most
        idat = data[data.index(b"IDAT") + 4 : data.index(b"IEND") - 8]
        assert len(zlib.decompress(idat)) == 128 * (128 * 3 + 1)


@pytest.mark.parametrize(
    ("pixels", "kwargs", "message"),
    [
        (np.zeros((2, 2, 3), dtype=np.float32), {}, "uint8"),
        (np.zeros((2, 2, 2), dtype=np.uint8), {}, "shape"),
        (np.zeros((0, 2, 3), dtype=np.uint8), {}, "shape"),
        (np.zeros((2, 2, 3, 1), dtype=np.uint8), {}, "shape"),
        (np.zeros((2, 2, 3), dtype=np.uint8), {"level": 10}, "level"),
        (np.zeros((2, 2, 3), dtype=np.uint8), {"text": {"": "x"}}, "keys"),
        (np.zeros((2, 2, 3), dtype=np.uint8), {"text": {"k" * 80: "x"}}, "keys"),
    ],
)
def test_bad_input_is_refused(pixels: np.ndarray, kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=message):
        write_png(pixels, **kwargs)
