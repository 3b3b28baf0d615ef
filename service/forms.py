"""POST /v1/videos bodies: JSON, or multipart/form-data as the official openai SDK always sends.

Both become the same `VideoCreate`. In forms, numbers arrive as strings (pydantic's lax mode converts them),
nested objects arrive flattened (`metadata[user]`, `input_reference[image_url]`), and `input_reference` may be
an uploaded file, whose bytes travel beside the model.
"""

from __future__ import annotations

import copy
import json
import re

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from service.problems import InvalidParameter, TooLarge, UnsupportedMedia
from service.schemas import VideoCreate
from service.settings import Settings

_NESTED = re.compile(r"^([a-z_]+)\[([^\]]*)\]$")
_MAX_FIELDS = 64


def form_schema(video_create: dict) -> dict:
    """The multipart/form-data schema of POST /v1/videos, derived from VideoCreate's JSON schema so the two
    cannot drift: the same fields and limits, with input_reference as an uploaded file."""
    schema = copy.deepcopy(video_create)
    schema["title"] = "VideoCreateForm"
    schema["description"] = "POST /v1/videos as multipart/form-data, as the openai SDK sends it."
    # Nested fields arrive flattened (metadata[KEY], input_reference[image_url]): not a closed set of names.
    schema.pop("additionalProperties", None)
    schema["properties"]["input_reference"] = {
        "type": "string",
        "format": "binary",
        "description": "Image-to-video: the first frame as a PNG, JPEG or WebP file. "
        "Alternatively a field input_reference[image_url] with a data URL.",
    }
    schema["properties"]["metadata"]["description"] += " In a form: fields metadata[KEY]=VALUE."
    return schema


def body_limit(settings: Settings) -> int:
    # An image as base64 is 4/3 of its size; the rest of a request is small.
    return settings.max_image_bytes * 4 // 3 + 256 * 1024


async def parse_create(request: Request, settings: Settings) -> tuple[VideoCreate, bytes | None]:
    limit = body_limit(settings)
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise TooLarge(f"The request body is {length} bytes; the limit is {limit}.", code="body_too_large")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        body = await request.body()
        if len(body) > limit:
            raise TooLarge("The request body is too large.", code="body_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidParameter("The request body is not valid JSON.", code="invalid_json") from e
        if not isinstance(data, dict):
            raise InvalidParameter("The request body must be a JSON object.", code="invalid_json")
        return _validate(data), None
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return await _parse_form(request, settings, limit)
    raise UnsupportedMedia(
        "Send the request as application/json or multipart/form-data (application/x-www-form-urlencoded also works).",
        code="unsupported_media_type",
    )


async def _parse_form(request: Request, settings: Settings, limit: int) -> tuple[VideoCreate, bytes | None]:
    try:
        form = await request.form(max_files=1, max_fields=_MAX_FIELDS, max_part_size=limit)
    except MultiPartException as e:
        raise InvalidParameter(f"Malformed multipart body: {e.message}", code="invalid_multipart") from e
    except HTTPException as e:  # Starlette wraps multipart parse errors in a 400 of its own
        raise InvalidParameter(f"Malformed form body: {e.detail}", code="invalid_multipart") from e
    data: dict[str, object] = {}
    image: bytes | None = None
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "input_reference":
                    raise InvalidParameter(f"Unexpected file field '{key}'.", param=key)
                image = await value.read(settings.max_image_bytes + 1)
                if len(image) > settings.max_image_bytes:
                    raise TooLarge(
                        f"The image is larger than {settings.max_image_bytes} bytes.",
                        param="input_reference",
                        code="image_too_large",
                    )
                continue
            nested = _NESTED.match(key)
            if nested:
                outer, inner = nested.groups()
                sub = data.setdefault(outer, {})
                if not isinstance(sub, dict):
                    raise InvalidParameter(f"'{outer}' is given twice.", param=outer)
                sub[inner] = value
            elif key == "input_reference":
                # A plain string in place of a file: a data URL, as in JSON's input_reference.image_url.
                data[key] = {"image_url": value}
            elif value != "" or key == "prompt":
                # An empty optional form field means "not given".
                data[key] = value
    finally:
        await form.close()
    return _validate(data), image


def _validate(data: dict) -> VideoCreate:
    try:
        return VideoCreate.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]
        ) from e
