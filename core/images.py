"""Safe intake of untrusted image files: every limit checked before pixels are decoded, then one verified decode.

Policy, in the order it is applied:

- size: 1 byte to 20 MiB (``PayloadTooLarge`` over; an empty file is a ``ValidationFailed``);
- format: PNG, JPEG or WEBP by the magic bytes at offset 0, never by file name or declared content type;
  Pillow is then allowed to parse the file as that one format only (``UnsupportedMediaType`` otherwise);
- dimensions: read from the header by Pillow's lazy open, at most 4096 x 4096 (16 Mi) pixels
  (``PayloadTooLarge``); Pillow's own decompression-bomb guard (``MAX_IMAGE_PIXELS``) fires inside that open
  for absurd sizes and is answered the same way, its warning turned into an error rather than ignored;
- structure: the container is walked without decoding (PNG chunks to IEND, JPEG markers to EOI, the WEBP
  RIFF length): a truncated structure, or any byte after the image's end, is refused. Only an MPF JPEG
  (MPO, Ultra HDR gain maps) may be followed by further complete JPEGs; zero padding is tolerated;
- polyglots: a file that is also a ZIP (JAR, DOCX, ...: an end-of-central-directory record pointing at a
  central directory) or that starts with markup or a PDF header in its first KiB is refused, so no stored
  original can be interpreted as something other than the image it was accepted as;
- decode: ``verify()`` (PNG chunk CRCs), then a full load of the first frame; Pillow's
  ``LOAD_TRUNCATED_IMAGES`` stays off, so a truncated or corrupt pixel stream is a ``ValidationFailed``.
  Animated PNG / WEBP and multi-picture JPEG are accepted; their first frame is the image.

Orientation and alpha (``load_image``): the EXIF orientation is applied, so widths and heights everywhere are
the image as displayed. Images come out RGB with any transparency composited on white (the colour a viewer
shows behind a transparent PNG); masks come out as 8-bit grayscale ("L": white repaints, black keeps) with
transparent pixels counted as black, i.e. kept. 16-bit images are scaled to 8 bits, never clipped.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image, ImageOps

from core.errors import PayloadTooLarge, ServiceError, UnsupportedMediaType, ValidationFailed

ImageFormat = Literal["png", "jpeg", "webp"]

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096

CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_PIL_FORMATS: dict[str, str] = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_ORIENTATION_TAG = 0x0112
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}  # transpose / rotate 90 / transverse / rotate 270
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
_MAX_PNG_CHUNKS = 65_536
_MAX_MPF_IMAGES = 16
_ZIP_EOCD = b"PK\x05\x06"
_ZIP_CENTRAL = b"PK\x01\x02"
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP_EOCD_WINDOW = 22 + 0xFFFF  # the record plus the longest comment: where every ZIP reader looks
_MARKUP_WINDOW = 1024  # browsers sniff HTML, and PDF readers find their header, within the first KiB
_MARKUP = (b"<html", b"<script", b"<!doctype", b"<?php", b"<svg", b"<iframe", b"<body", b"%pdf-")


@dataclass(frozen=True)
class ImageInfo:
    """What intake learned about an accepted image; width and height are as displayed (EXIF applied)."""

    format: ImageFormat
    width: int
    height: int
    bytes: int
    sha256: str
    mode: str
    has_alpha: bool
    orientation: int

    @property
    def content_type(self) -> str:
        """The MIME type of the format."""
        return CONTENT_TYPES[self.format]

    @property
    def ext(self) -> str:
        """The file extension the original is stored under."""
        return self.format


def sniff_format(data: bytes) -> ImageFormat | None:
    """The accepted format whose magic bytes open ``data``, or None."""
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 12 and data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "webp"
    return None


def inspect_image(
    data: bytes, *, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS, field: str = "file"
) -> ImageInfo:
    """Check untrusted image bytes against every intake rule and describe them; raises a ServiceError."""
    image, info = _decode(data, max_bytes=max_bytes, max_pixels=max_pixels, field=field)
    image.close()
    return info


def load_image(
    data: bytes,
    *,
    mask: bool = False,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
    field: str = "file",
) -> Image.Image:
    """Decode untrusted image bytes (same checks as inspect_image), oriented: RGB, or "L" for a mask."""
    image, _ = _decode(data, max_bytes=max_bytes, max_pixels=max_pixels, field=field)
    with image:
        oriented = _oriented(image)
        return _as_mask(oriented) if mask else _as_rgb(oriented)


def _decode(data: bytes, *, max_bytes: int, max_pixels: int, field: str) -> tuple[Image.Image, ImageInfo]:
    """Apply the intake policy in order and return the loaded first frame with its description."""
    if not data:
        raise _invalid(field, "the file is empty")
    if len(data) > max_bytes:
        raise _too_large(field, f"the file is {len(data)} bytes; the limit is {max_bytes}")
    fmt = sniff_format(data)
    if fmt is None:
        raise _unsupported(field, "the file is not a PNG, JPEG or WEBP image (judged by its content)")
    pil_format = _PIL_FORMATS[fmt]
    try:
        with warnings.catch_warnings():
            # Pillow warns (and only over 2x its limit raises) on huge declared sizes: refuse both the same way.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[pil_format]) as probe:
                width, height = probe.size  # from the header: nothing is decoded yet
                _check_dimensions(width, height, max_pixels, field)
                _check_structure(fmt, data, field)
                _check_not_polyglot(data, field)
                probe.verify()
            image = Image.open(io.BytesIO(data), formats=[pil_format])
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_large(field, f"the image declares too many pixels ({exc})") from None
    except ServiceError:
        raise
    except Exception as exc:
        # Pillow reports hostile input through many exception types (OSError, SyntaxError, ValueError,
        # struct.error, EOFError, zlib.error, ...): every one of them means this file cannot be decoded.
        reason = f"{type(exc).__name__}: {exc}"
        raise _invalid(field, f"the {fmt.upper()} file is corrupt or truncated ({reason})") from None
    orientation = _orientation(image)
    shown_w, shown_h = (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)
    info = ImageInfo(
        format=fmt,
        width=shown_w,
        height=shown_h,
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        mode=image.mode,
        has_alpha=_has_alpha(image),
        orientation=orientation,
    )
    return image, info


def _check_dimensions(width: int, height: int, max_pixels: int, field: str) -> None:
    if width <= 0 or height <= 0:
        raise _invalid(field, f"the image declares an empty size {width}x{height}")
    if width * height > max_pixels:
        raise _too_large(
            field, f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )


def _check_structure(fmt: ImageFormat, data: bytes, field: str) -> None:
    """Walk the container to the image's end without decoding; refuse truncation and trailing content."""
    if fmt == "png":
        end = _png_end(data, field)
    elif fmt == "jpeg":
        end = _jpeg_end(data, field)
    else:
        end = _webp_end(data, field)
    trailing = data[end:]
    # Zero padding (sector-aligned writers) cannot carry a second file; anything else can.
    if trailing.strip(b"\x00"):
        raise _invalid(
            field, f"{len(trailing)} bytes follow the end of the {fmt.upper()} image (a polyglot or damaged file)"
        )


def _png_end(data: bytes, field: str) -> int:
    """Offset just after the IEND chunk; every chunk length is checked against the file."""
    pos, chunks = len(_PNG_MAGIC), 0
    while True:
        if pos + 12 > len(data):
            raise _invalid(field, "the PNG is truncated before its IEND chunk")
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        if chunks == 0 and kind != b"IHDR":
            raise _invalid(field, "the PNG does not start with an IHDR chunk")
        if length > 0x7FFFFFFF or pos + 12 + length > len(data):
            raise _invalid(field, f"the PNG chunk {kind!r} runs past the end of the file")
        pos += 12 + length
        chunks += 1
        if kind == b"IEND":
            return pos
        if chunks > _MAX_PNG_CHUNKS:
            raise _invalid(field, f"the PNG has more than {_MAX_PNG_CHUNKS} chunks")


def _jpeg_end(data: bytes, field: str) -> int:
    """Offset just after the last image's EOI: one JPEG, or an MPF JPEG and the JPEGs it carries."""
    end, has_mpf = _one_jpeg_end(data, 0, field)
    images = 1
    # MPF (CIPA DC-007: MPO stereo pairs, Ultra HDR gain maps) appends further complete JPEGs.
    while has_mpf and end < len(data) and data.startswith(b"\xff\xd8", end):
        images += 1
        if images > _MAX_MPF_IMAGES:
            raise _invalid(field, f"the JPEG carries more than {_MAX_MPF_IMAGES} images")
        end, _ = _one_jpeg_end(data, end, field)
    return end


def _one_jpeg_end(data: bytes, start: int, field: str) -> tuple[int, bool]:
    """Offset after the EOI of the JPEG at ``start``, and whether it has an MPF segment."""
    n, pos, has_mpf = len(data), start + 2, False
    while True:
        if pos >= n:
            raise _invalid(field, "the JPEG is truncated before its end marker")
        if data[pos] != 0xFF:
            raise _invalid(field, f"the JPEG has no marker where one must be (offset {pos})")
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            raise _invalid(field, "the JPEG is truncated before its end marker")
        marker = data[pos]
        pos += 1
        if marker == 0xD9:  # EOI
            return pos, has_mpf
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no payload
            continue
        if marker in (0x00, 0xD8):
            raise _invalid(field, f"the JPEG has a misplaced marker 0x{marker:02X} (offset {pos - 1})")
        if pos + 2 > n:
            raise _invalid(field, "the JPEG is truncated inside a segment header")
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2 or pos + length > n:
            raise _invalid(field, f"the JPEG segment 0x{marker:02X} runs past the end of the file")
        if marker == 0xE2 and data[pos + 2 : pos + 6] == b"MPF\x00":
            has_mpf = True
        pos += length
        if marker == 0xDA:  # SOS: entropy-coded data runs to the next marker that is not FF00 or RSTn
            pos = _entropy_end(data, pos, field)


def _entropy_end(data: bytes, pos: int, field: str) -> int:
    n = len(data)
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= n:
            raise _invalid(field, "the JPEG is truncated inside its compressed data")
        follower = data[pos + 1]
        if follower == 0xFF:  # fill byte before a marker
            pos += 1
        elif follower == 0x00 or 0xD0 <= follower <= 0xD7:  # stuffed FF, restart marker
            pos += 2
        else:
            return pos


def _webp_end(data: bytes, field: str) -> int:
    """Offset of the end of the RIFF container; every chunk must fit inside it exactly."""
    declared = int.from_bytes(data[4:8], "little")
    end = 8 + declared
    if end > len(data):
        raise _invalid(field, "the WEBP is truncated (shorter than its RIFF header says)")
    pos, first = 12, True
    while pos < end:
        if pos + 8 > end:
            raise _invalid(field, "the WEBP has a partial chunk header")
        kind = data[pos : pos + 4]
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        if first and kind not in (b"VP8 ", b"VP8L", b"VP8X"):
            raise _invalid(field, f"the WEBP starts with an unknown chunk {kind!r}")
        first = False
        pos += 8 + size + (size & 1)  # chunks are padded to even lengths
        if pos > end:
            raise _invalid(field, f"the WEBP chunk {kind!r} runs past the end of its container")
    if first:
        raise _invalid(field, "the WEBP has no image chunk")
    return end


def _check_not_polyglot(data: bytes, field: str) -> None:
    """Refuse files that another program would read as a ZIP, an HTML page or a PDF."""
    if _is_zip(data):
        raise _invalid(field, "the file is also a ZIP archive (a polyglot); refused")
    head = data[:_MARKUP_WINDOW].lower()
    for marker in _MARKUP:
        if marker in head:
            raise _invalid(field, f"the file carries {marker.decode()!r} near its start (a polyglot); refused")


def _is_zip(data: bytes) -> bool:
    """True when an end-of-central-directory record near the end points at a central directory."""
    window_start = max(0, len(data) - _ZIP_EOCD_WINDOW)
    pos = data.rfind(_ZIP_EOCD, window_start)
    while pos >= 0:
        if pos + 22 <= len(data):
            size = int.from_bytes(data[pos + 12 : pos + 16], "little")
            if size == 0xFFFFFFFF or (pos >= 20 and data[pos - 20 : pos - 16] == _ZIP64_LOCATOR):
                return True
            # Readers locate the directory as ``record - size`` whatever precedes the archive.
            if 0 < size <= pos and data[pos - size : pos - size + 4] == _ZIP_CENTRAL:
                return True
        pos = data.rfind(_ZIP_EOCD, window_start, pos)
    return False


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8), 1 when absent or unreadable."""
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:
        # Pillow's EXIF parser raises many types on hostile metadata; orientation is optional, so ignore it.
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _oriented(image: Image.Image) -> Image.Image:
    """The image as displayed: EXIF orientation applied (unreadable EXIF leaves it as stored)."""
    if _orientation(image) == 1:
        return image
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        # Same reason as _orientation: a broken EXIF block must not sink an otherwise valid image.
        return image


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def _eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image scaled to 8 bits (Pillow's own conversion clips at 255 instead)."""
    return image.convert("I").point(lambda value: value * (1 / 256)).convert("L")


def _as_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited on white."""
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _eight_bit(image)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _as_mask(image: Image.Image) -> Image.Image:
    """8-bit grayscale, with transparent pixels counted as black (kept)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        return _eight_bit(image)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("L")
    return image.convert("L")


def _detail(field: str, message: str) -> list[dict[str, Any]]:
    return [{"field": field, "message": message}]


def _invalid(field: str, message: str) -> ValidationFailed:
    return ValidationFailed(f"{field}: {message}", _detail(field, message))


def _too_large(field: str, message: str) -> PayloadTooLarge:
    return PayloadTooLarge(f"{field}: {message}", _detail(field, message))


def _unsupported(field: str, message: str) -> UnsupportedMediaType:
    return UnsupportedMediaType(f"{field}: {message}", _detail(field, message))
