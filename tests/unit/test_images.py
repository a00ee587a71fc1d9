"""Image intake: hostile files are refused before decoding, good ones come out oriented with alpha handled."""

from __future__ import annotations

import hashlib
import io
import struct
import time
import warnings
import zipfile
import zlib

import pytest
from PIL import Image, ImageFile

from core.errors import PayloadTooLarge, ServiceError, UnsupportedMediaType, ValidationFailed
from core.images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, inspect_image, load_image, sniff_format


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    """``image`` saved in ``fmt``."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk with a correct CRC."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def declared_png(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG that declares ``width`` x ``height`` pixels but holds almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def gradient(size: tuple[int, int] = (64, 48), mode: str = "RGB") -> Image.Image:
    """A deterministic picture with structure (JPEG keeps it recognisable)."""
    image = Image.linear_gradient("L").resize(size)
    return Image.merge("RGB", (image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), image)).convert(mode)


def refused(data: bytes, error: type[ServiceError], **kwargs: object) -> ServiceError:
    """Assert intake refuses ``data`` with ``error`` naming the field, and return the error."""
    with pytest.raises(error) as info:
        inspect_image(data, **kwargs)  # type: ignore[arg-type]
    assert info.value.details and info.value.details[0]["field"] == kwargs.get("field", "file")
    return info.value


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any pixel decode fail loudly, to prove a refusal happened before one."""

    def load(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


# --- accepted files -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "name"), [("PNG", "png"), ("JPEG", "jpeg"), ("WEBP", "webp")])
def test_accepted_formats_are_described(fmt: str, name: str) -> None:
    data = encode(gradient(), fmt)
    info = inspect_image(data)
    assert (info.format, info.width, info.height) == (name, 64, 48)
    assert info.bytes == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.content_type == f"image/{name}"
    assert sniff_format(data) == name
    loaded = load_image(data)
    assert (loaded.mode, loaded.size) == ("RGB", (64, 48))


def test_pixel_limit_is_inclusive() -> None:
    data = encode(gradient((40, 25)), "PNG")
    assert inspect_image(data, max_pixels=1000).width == 40
    refused(data, PayloadTooLarge, max_pixels=999)


def test_default_limits_are_the_documented_ones() -> None:
    assert MAX_IMAGE_BYTES == 20 * 1024 * 1024
    assert MAX_IMAGE_PIXELS == 4096 * 4096


def test_animated_png_uses_its_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), color) for color in ("red", "blue")]
    data = encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    assert inspect_image(data).format == "png"
    assert load_image(data).getpixel((8, 8)) == (255, 0, 0)


# --- limits checked before decoding ---------------------------------------------------------------------


def test_declared_50000_square_png_is_refused_at_once(no_decoding: None) -> None:
    data = declared_png(50_000, 50_000)
    assert len(data) < 200
    started = time.perf_counter()
    error = refused(data, PayloadTooLarge)
    assert time.perf_counter() - started < 0.5
    assert "pixels" in error.message


@pytest.mark.parametrize(("width", "height"), [(5000, 5000), (10_000, 10_000), (4097, 4096), (1, 20_000_000)])
def test_declared_sizes_over_the_limit_are_refused_without_decoding(
    width: int, height: int, no_decoding: None
) -> None:
    # 25 Mpx: only our limit; 100 Mpx: Pillow's bomb *warning* range, which must not slip through as a warning.
    refused(declared_png(width, height), PayloadTooLarge)


@pytest.mark.parametrize("width", [10_000, 50_000])
def test_pillows_bomb_guard_stays_an_outer_bound(width: int, no_decoding: None) -> None:
    # Even with our own limit set above Pillow's, its guard refuses: the warning range (89-179 Mpx) as well
    # as the error range, whatever warning filters the process runs with.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refused(declared_png(width, width), PayloadTooLarge, max_pixels=10**10)


def test_declared_huge_jpeg_is_refused_without_decoding(no_decoding: None) -> None:
    data = bytearray(encode(gradient((16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60_000, 60_000)  # height, width in the frame header
    refused(bytes(data), PayloadTooLarge)


def test_declared_huge_webp_is_refused_without_decoding(no_decoding: None) -> None:
    data = bytearray(encode(gradient((16, 16)), "WEBP", lossless=False))
    start = data.index(b"\x9d\x01\x2a")  # VP8 key frame start code, then 14-bit width and height
    data[start + 3 : start + 7] = struct.pack("<HH", 0x3FFF, 0x3FFF)
    refused(bytes(data), PayloadTooLarge)


def test_oversized_file_is_refused_before_anything_else(no_decoding: None) -> None:
    data = encode(gradient(), "PNG")
    refused(data, PayloadTooLarge, max_bytes=len(data) - 1)


def test_empty_file_is_a_validation_error() -> None:
    assert "empty" in refused(b"", ValidationFailed).message


# --- formats by content ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "ICO", "PPM"])
def test_other_image_formats_are_unsupported(fmt: str) -> None:
    refused(encode(gradient((32, 32)), fmt), UnsupportedMediaType)


@pytest.mark.parametrize(
    "data",
    [b"hello, I am a text file named picture.png\n", b"<svg xmlns='http://www.w3.org/2000/svg'/>", b"\x89PN"],
)
def test_non_images_are_unsupported_whatever_their_name(data: bytes) -> None:
    refused(data, UnsupportedMediaType)


def test_png_magic_on_jpeg_content_is_corrupt_not_a_jpeg() -> None:
    data = b"\x89PNG\r\n\x1a\n" + encode(gradient(), "JPEG")
    refused(data, ValidationFailed)


# --- truncated and corrupt ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_truncated_files_are_refused(fmt: str, keep: float) -> None:
    data = encode(gradient((128, 96)), fmt)
    refused(data[: int(len(data) * keep)], ValidationFailed)


def test_jpeg_cut_inside_its_compressed_data_is_refused() -> None:
    data = encode(gradient((128, 96)), "JPEG")
    refused(data[:-2], ValidationFailed)  # everything but the end marker


def test_png_with_a_corrupt_pixel_chunk_is_refused() -> None:
    data = bytearray(encode(gradient((64, 64)), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 20] ^= 0xFF  # flips compressed bytes: the chunk's CRC no longer matches
    refused(bytes(data), ValidationFailed)


def test_png_with_valid_crc_but_garbage_pixels_is_refused() -> None:
    ihdr = struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"not zlib at all") + chunk(b"IEND", b"")
    refused(data, ValidationFailed)


# --- polyglots ------------------------------------------------------------------------------------------


def zip_bytes() -> bytes:
    """A small real ZIP archive."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("payload.txt", "not an image")
    return buffer.getvalue()


def test_png_followed_by_a_zip_is_refused() -> None:
    data = encode(gradient(), "PNG") + zip_bytes()
    assert zipfile.is_zipfile(io.BytesIO(data))  # the test file really is both
    assert "follow the end" in refused(data, ValidationFailed).message


def test_zip_hidden_inside_a_png_chunk_is_refused() -> None:
    png = encode(gradient(), "PNG")
    iend = png.rindex(b"IEND") - 4
    data = png[:iend] + chunk(b"zzZp", zip_bytes()) + png[iend:]
    assert zipfile.is_zipfile(io.BytesIO(data))  # valid as a PNG *and* as a ZIP
    assert Image.open(io.BytesIO(data)).size == (64, 48)
    assert "ZIP" in refused(data, ValidationFailed).message


def test_jpeg_followed_by_html_is_refused() -> None:
    data = encode(gradient(), "JPEG") + b"<html><script>alert(1)</script></html>"
    refused(data, ValidationFailed)


def test_webp_with_trailing_bytes_is_refused() -> None:
    refused(encode(gradient(), "WEBP") + b"PK\x03\x04trailing", ValidationFailed)


def test_markup_near_the_start_of_a_png_is_refused() -> None:
    png = encode(gradient(), "PNG")
    after_ihdr = 8 + 25
    data = png[:after_ihdr] + chunk(b"tEXt", b"Comment\0<script>alert(1)</script>") + png[after_ihdr:]
    assert Image.open(io.BytesIO(data)).size == (64, 48)
    refused(data, ValidationFailed)


def test_zero_padding_after_the_end_is_tolerated() -> None:
    assert inspect_image(encode(gradient(), "JPEG") + b"\0" * 512).format == "jpeg"


def mpf_jpeg(extra: bytes) -> bytes:
    """A JPEG with an MPF APP2 segment (as MPO and Ultra HDR files have), followed by ``extra``."""
    first = encode(gradient(), "JPEG")
    payload = b"MPF\x00" + b"MM\x00\x2a\x00\x00\x00\x08" + b"\x00" * 8
    app2 = b"\xff\xe2" + struct.pack(">H", len(payload) + 2) + payload
    return first[:2] + app2 + first[2:] + extra


def test_mpf_jpeg_may_carry_further_jpegs() -> None:
    data = mpf_jpeg(encode(gradient((16, 16)), "JPEG"))
    assert inspect_image(data).width == 64


def test_mpf_jpeg_followed_by_something_else_is_refused() -> None:
    refused(mpf_jpeg(b"ftypmp42 a motion photo video"), ValidationFailed)


def test_plain_jpeg_followed_by_another_jpeg_is_refused() -> None:
    refused(encode(gradient(), "JPEG") + encode(gradient((16, 16)), "JPEG"), ValidationFailed)


# --- orientation and alpha ------------------------------------------------------------------------------


def halves(size: tuple[int, int] = (40, 20)) -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new("RGB", size, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
    return image


def near(pixel: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 40) -> bool:
    """True when every channel is within ``tolerance`` (JPEG is lossy)."""
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


def test_exif_rotated_jpeg_comes_out_rotated() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encode(halves(), "JPEG", exif=exif.tobytes(), quality=95)
    info = inspect_image(data)
    assert (info.width, info.height, info.orientation) == (20, 40, 6)  # the size as displayed
    image = load_image(data)
    assert image.size == (20, 40)
    # Rotating clockwise brings the stored left (red) half to the top.
    assert near(image.getpixel((10, 5)), (255, 0, 0))
    assert near(image.getpixel((10, 35)), (0, 0, 255))


def test_unrotated_jpeg_keeps_its_layout() -> None:
    image = load_image(encode(halves(), "JPEG", quality=95))
    assert image.size == (40, 20)
    assert near(image.getpixel((5, 10)), (255, 0, 0))


def test_broken_exif_is_ignored_not_fatal() -> None:
    data = encode(halves(), "JPEG", exif=b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\xff")
    assert inspect_image(data).orientation == 1
    assert load_image(data).size == (40, 20)


def test_rgba_is_composited_on_white() -> None:
    image = Image.new("RGBA", (4, 1))
    image.putdata([(255, 0, 0, 255), (255, 0, 0, 0), (255, 0, 0, 128), (0, 0, 0, 0)])
    data = encode(image, "PNG")
    assert inspect_image(data).has_alpha
    out = load_image(data)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 0, 0)
    assert out.getpixel((1, 0)) == (255, 255, 255)
    assert near(out.getpixel((2, 0)), (255, 127, 127), tolerance=2)
    assert out.getpixel((3, 0)) == (255, 255, 255)


def test_la_and_palette_transparency_are_composited_on_white() -> None:
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 255), (0, 0)])
    assert load_image(encode(la, "PNG")).getpixel((1, 0)) == (255, 255, 255)
    assert load_image(encode(la, "PNG")).getpixel((0, 0)) == (0, 0, 0)
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 255, 0, 0, 0, 255])
    palette.putdata([0, 1])
    data = encode(palette, "PNG", transparency=1)
    assert inspect_image(data).has_alpha
    out = load_image(data)
    assert out.getpixel((0, 0)) == (0, 255, 0)
    assert out.getpixel((1, 0)) == (255, 255, 255)


def test_masks_are_grayscale_with_transparency_kept() -> None:
    image = Image.new("RGBA", (3, 1))
    image.putdata([(255, 255, 255, 255), (255, 255, 255, 0), (0, 0, 0, 255)])
    mask = load_image(encode(image, "PNG"), mask=True)
    assert mask.mode == "L"
    assert list(mask.getdata()) == [255, 0, 0]
    rgb = load_image(encode(halves(), "PNG"), mask=True)
    assert rgb.mode == "L" and rgb.size == (40, 20)


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped() -> None:
    image = Image.new("I;16", (4, 1))
    image.putdata([0, 1000, 32768, 65535])
    data = encode(image, "PNG")
    assert inspect_image(data).mode.startswith("I")
    out = load_image(data)
    assert [pixel[0] for pixel in out.getdata()] == [0, 3, 128, 255]
    assert list(load_image(data, mask=True).getdata()) == [0, 3, 128, 255]


def test_sixteen_bit_rgb_png_loads() -> None:
    raw = b"".join(b"\0" + struct.pack(">HHH", 65535, 0, 32768) * 8 for _ in range(8))
    ihdr = struct.pack(">IIBBBBB", 8, 8, 16, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    assert inspect_image(data).width == 8
    assert near(load_image(data).getpixel((3, 3)), (255, 0, 128), tolerance=1)


def test_cmyk_jpeg_loads_as_rgb() -> None:
    data = encode(gradient().convert("CMYK"), "JPEG")
    assert load_image(data).mode == "RGB"


def test_errors_name_the_callers_field() -> None:
    refused(b"GIF89a", UnsupportedMediaType, field="input_images.1.url")
    with pytest.raises(ValidationFailed) as info:
        load_image(b"", field="mask.url")
    assert info.value.details == [{"field": "mask.url", "message": "the file is empty"}]
