"""Input images for image-to-video: decode, refuse what is unsafe, fit to the output size.

The pipeline would stretch any image to (height, width); we scale it to cover the target size keeping its
aspect ratio and crop the centre instead, so people and objects keep their proportions.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image, ImageOps

from service.problems import InvalidParameter, Rejected, TooLarge

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
    data: bytes, width: int, height: int, *, max_bytes: int, max_pixels: int, param: str = "input_reference"
) -> bytes:
    """Validate an uploaded image and return it as a PNG of exactly width x height."""
    if len(data) > max_bytes:
        raise TooLarge(
            f"The image is {len(data)} bytes; the limit is {max_bytes}.",
            param=param,
            code="image_too_large",
        )
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
            img.load()
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidParameter("The image is too large to decode.", param=param, code="image_too_large") from e
    except Exception as e:  # Pillow raises many types for corrupt data
        raise InvalidParameter("The image could not be decoded.", param=param, code="invalid_image") from e
    img = ImageOps.exif_transpose(img).convert("RGB")
    fitted = ImageOps.fit(img, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    out = io.BytesIO()
    fitted.save(out, format="PNG")
    return out.getvalue()
