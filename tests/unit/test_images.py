"""Image checks and decoding (core/images.py): the header checks Align shares with Score,
and EXIF orientation, ignored by default as in the method's reference code."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from align2.server.core.images import decode_image, open_image
from align2.server.errors import InvalidArgument

LIMITS = {"max_bytes": 1_000_000, "max_pixels": 1_000_000}
ROTATED_90_CW = 6  # EXIF orientation: display the stored pixels turned 90 degrees clockwise


def encoded(image: Image.Image, fmt: str, orientation: int | None = None) -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(buffer, format=fmt, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_ignored_by_default_and_applied_on_request(fmt: str) -> None:
    stored = Image.effect_noise((40, 20), 60).convert("RGB")
    data = encoded(stored, fmt, ROTATED_90_CW)
    as_stored = decode_image(data, **LIMITS)
    assert as_stored.size == (40, 20)
    turned = decode_image(data, **LIMITS, exif_transpose=True)
    assert turned.size == (20, 40)
    assert turned.tobytes() == as_stored.transpose(Image.Transpose.ROTATE_270).tobytes()
    plain = encoded(stored, fmt)  # no orientation tag: the option changes nothing
    assert decode_image(plain, **LIMITS, exif_transpose=True).tobytes() == (
        decode_image(plain, **LIMITS).tobytes()
    )


def test_open_image_checks_the_header_without_decoding() -> None:
    with pytest.raises(InvalidArgument, match=r"^image: not a readable JPEG, PNG or WebP image$"):
        open_image(b"xx", **LIMITS)
    with pytest.raises(InvalidArgument, match=r"pixels exceeds limits\.max_image_pixels 100"):
        open_image(encoded(Image.new("RGB", (20, 20)), "PNG"), max_bytes=10_000, max_pixels=100)
    truncated = encoded(Image.effect_noise((64, 64), 60).convert("RGB"), "PNG")[:-200]
    assert open_image(truncated, **LIMITS).size == (64, 64)  # only decoding finds the rest
    with pytest.raises(InvalidArgument, match=r"^image: corrupt PNG data"):
        decode_image(truncated, **LIMITS)


def test_a_padded_model_limits_the_square_not_the_image() -> None:
    # 20 x 8000 = 160,000 pixels, but padding makes an 8000 x 8000 square: 64 Mpx.
    thin = encoded(Image.new("RGB", (20, 8000), (9, 9, 9)), "PNG")
    assert len(thin) < 5_000  # a tiny file
    limits = {"max_bytes": 1_000_000, "max_pixels": 40_000_000}
    assert open_image(thin, **limits).size == (20, 8000)  # square mode: nothing is padded
    with pytest.raises(InvalidArgument, match=r"pads to a 8000x8000 square = 64000000 pixels"):
        decode_image(thin, **limits, padded=True)
    ordinary = encoded(Image.new("RGB", (640, 480)), "PNG")
    assert decode_image(ordinary, **limits, padded=True).size == (640, 480)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (no pixel data): what a bomb's looks like."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_a_header_past_pillows_own_bomb_limit_names_ours() -> None:
    """Pillow refuses over 2 x MAX_IMAGE_PIXELS itself; the message still names our limit.
    Fails on: Pillow's "exceeds limit of 178956970 pixels" passed through."""
    with pytest.raises(InvalidArgument) as info:
        open_image(png_header(20_000, 20_000), max_bytes=1_000, max_pixels=40_000_000)
    assert str(info.value).endswith("exceeds limits.max_image_pixels 40000000")
    assert "178956970" in str(info.value)
    with pytest.raises(InvalidArgument, match=r"9000x9000 = 81000000 pixels exceeds"):
        open_image(png_header(9_000, 9_000), max_bytes=1_000, max_pixels=40_000_000)
