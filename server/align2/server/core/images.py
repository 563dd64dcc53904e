"""Decode and check one image, off the event loop.

Checks run cheapest first and before decoding: byte size, then format and pixel count from
the header (a decompression bomb is refused, never decoded), then the full decode.
Errors are InvalidArgument naming the field ``image`` and the limit.

EXIF orientation is ignored by default, as in the method's reference code (PIL's
``Image.open`` keeps the stored pixel order): scores match the reward models' training.
``exif_transpose`` applies it instead (config ``score.image_exif_transpose``).
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from align2.server.errors import InvalidArgument

FORMATS = ("JPEG", "PNG", "WEBP")


def open_image(
    data: bytes, *, max_bytes: int, max_pixels: int, padded: bool = False
) -> Image.Image:
    """The image opened from its header, not decoded: the checks that need no pixels.
    Raises InvalidArgument. Align uses it alone (it never reads the pixels).

    ``padded``: a model will pad it to a square of its longer side (image_mode "pad"), so
    the limit applies to that square: what is allocated grows with the square of the long
    side (a 1.5 KB 20x8000 PNG becomes 64 Mpx), not with width x height."""
    if not data:
        raise InvalidArgument("image: empty; send JPEG, PNG or WebP bytes")
    if len(data) > max_bytes:
        raise InvalidArgument(
            f"image: {len(data)} bytes exceeds limits.max_image_bytes {max_bytes}"
        )
    with warnings.catch_warnings():
        # PIL warns (and at 2x raises) on large images; our own limit below decides.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=FORMATS)
        except Image.DecompressionBombError:
            # Pillow refuses before we see the size: over twice its own MAX_IMAGE_PIXELS.
            raise InvalidArgument(
                f"image: its header declares more than {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels "
                f"(width x height), exceeds limits.max_image_pixels {max_pixels}"
            ) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            raise InvalidArgument("image: not a readable JPEG, PNG or WebP image") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidArgument(f"image: invalid size {width}x{height}")
    if width * height > max_pixels:
        raise InvalidArgument(
            f"image: {width}x{height} = {width * height} pixels exceeds "
            f"limits.max_image_pixels {max_pixels}"
        )
    side = max(width, height)
    if padded and side * side > max_pixels:
        raise InvalidArgument(
            f"image: {width}x{height} pads to a {side}x{side} square = {side * side} pixels "
            f"(image_mode pad), exceeds limits.max_image_pixels {max_pixels}"
        )
    return image


_BYTES_PER_PIXEL = {"WEBP": 20}
"""Peak bytes a pixel while decoding, by format, measured (3000x3000, ru_maxrss): PNG and
JPEG at most 8.3 (the decode in its own mode, Pillow holding RGB as 4 bytes, and its RGB
copy); WebP up to 19.2 (libwebp's canvas buffers, a frame copy, then the RGB copy)."""


def decoded_bytes(image: Image.Image, *, padded: bool = False) -> int:
    """The memory decoding ``image`` (opened by :func:`open_image`, not yet decoded) takes,
    estimated from its header: the decode's peak (_BYTES_PER_PIXEL, 8 for PNG and JPEG),
    and the padded square (4 bytes a pixel) when ``padded`` and the image is not square.
    What limits.max_decoded_image_bytes counts."""
    width, height = image.size
    side = max(width, height)
    per_pixel = _BYTES_PER_PIXEL.get(image.format or "", 8)
    return per_pixel * width * height + (4 * side * side if padded and width != height else 0)


def decode_image(
    data: bytes,
    *,
    max_bytes: int,
    max_pixels: int,
    exif_transpose: bool = False,
    padded: bool = False,
) -> Image.Image:
    """Return the image as RGB, or raise InvalidArgument. ``exif_transpose``: turn it as
    its EXIF orientation says (a no-op without one); ``padded``: see :func:`open_image`."""
    image = open_image(data, max_bytes=max_bytes, max_pixels=max_pixels, padded=padded)
    return load_image(image, exif_transpose=exif_transpose)


def load_image(image: Image.Image, *, exif_transpose: bool = False) -> Image.Image:
    """Decode an image :func:`open_image` opened (and checked), as :func:`decode_image`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image.load()
        except Image.DecompressionBombError as exc:
            raise InvalidArgument(f"image: refused as a decompression bomb ({exc})") from None
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise InvalidArgument(f"image: corrupt {image.format} data ({exc})") from None
    if exif_transpose:
        image = ImageOps.exif_transpose(image)
    # A copy even of an RGB image: the decoded file object keeps its decoder (WebP: canvas
    # buffers of about 8 bytes a pixel) for as long as the image lives.
    return image.convert("RGB")
