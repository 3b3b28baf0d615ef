"""Input images for image-to-video: decode, refuse what is unsafe, fit to the output size.

The pipeline would stretch any image to (height, width); we scale it to cover the target size keeping its
aspect ratio and crop the centre instead, so people and objects keep their proportions.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import functools
import io
import re
import threading
import warnings

from PIL import Image, ImageOps

from service.contract.problems import InvalidParameter, Rejected, TooLarge, Unavailable

_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
_DATA_URL = re.compile(r"^data:(image/[a-z0-9.+-]+);base64,(.*)$", re.IGNORECASE | re.DOTALL)


def decode_data_url(url: str, param: str = "input_reference.image_url") -> bytes:
    m = _DATA_URL.match(url.strip())
    if not m:
        raise InvalidParameter(
            "input_reference.image_url must be a data URL: data:image/png;base64,... (PNG, JPEG or WebP).",
            param=param,
        )
    try:
        return base64.b64decode(m.group(2), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidParameter("input_reference.image_url has invalid base64 data.", param=param) from e


def prepare_image(
    data: bytes,
    width: int,
    height: int,
    *,
    max_bytes: int,
    max_pixels: int,
    max_decodes: int = 2,
    param: str = "input_reference",
) -> bytes:
    """Validate an uploaded image and return it as a PNG of exactly width x height.

    A small file can declare a large image (a 105 KB PNG of 6000x6000 decodes to 144 MB), so at most
    `max_decodes` run at once per process; one more is refused with Retry-After rather than queued in memory.
    """
    if len(data) > max_bytes:
        raise TooLarge(
            f"The image is {len(data)} bytes; the limit is {max_bytes}.",
            param=param,
            code="image_too_large",
        )
    slots = decode_slots(max_decodes)
    if not slots.acquire(blocking=False):
        raise Unavailable(
            "The gateway is decoding as many images as it can; retry in a moment.",
            param=param,
            code="image_decoder_busy",
            retry_after_s=1,
        )
    try:
        return _fit(data, width, height, max_pixels, param)
    finally:
        slots.release()
        _return_memory()


@functools.cache
def decode_slots(n: int) -> threading.BoundedSemaphore:
    """The process's decode slots (one semaphore per configured bound, so every request shares it)."""
    return threading.BoundedSemaphore(n)


def _fit(data: bytes, width: int, height: int, max_pixels: int, param: str) -> bytes:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data))
            # Check the declared size before decoding pixels: a small file can declare a huge image.
            if img.width * img.height > max_pixels:
                raise InvalidParameter(
                    f"The image is {img.width}x{img.height} pixels; the limit is {max_pixels} pixels.",
                    param=param,
                    code="image_too_large",
                )
            if img.format not in _FORMATS:
                raise InvalidParameter(
                    f"Unsupported image format {img.format}; use PNG, JPEG or WebP.",
                    param=param,
                    code="unsupported_image",
                )
            # The size needed before rotation by the EXIF orientation (5-8 swap the sides).
            need = (height, width) if img.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8) else (width, height)
            # JPEG decodes at 1/2, 1/4 or 1/8 scale directly (DCT scaling), never below `need`.
            img.draft("RGB", need)
            img.load()
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidParameter("The image is too large to decode.", param=param, code="image_too_large") from e
    except Exception as e:  # Pillow raises many types for corrupt data
        raise InvalidParameter("The image could not be decoded.", param=param, code="invalid_image") from e
    # Other formats decode in full; shrink by whole factors at once (box filter) so the copies below are small.
    factor = min(img.width // need[0], img.height // need[1]) // 2
    if factor >= 2:
        if img.mode not in _REDUCIBLE:  # palette, 1-bit and 16-bit images: reduce() takes none of them
            img = img.convert("RGB")
        img = img.reduce(factor)
    img = ImageOps.exif_transpose(img).convert("RGB")
    fitted = ImageOps.fit(img, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    del img
    out = io.BytesIO()
    fitted.save(out, format="PNG")
    return out.getvalue()


def _return_memory() -> None:
    """Give freed image memory back to the OS: glibc keeps large freed blocks in each thread's arena, so the
    gateway's threadpool held gigabytes after a burst of large images."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None  # glibc only


_LIBC = _libc()
ORIENTATION = 0x0112
_REDUCIBLE = frozenset({"L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F"})
