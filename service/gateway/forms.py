"""POST /v1/videos bodies: JSON, or multipart/form-data as the official openai SDK always sends.

Both become the same `VideoCreate`. In forms, numbers arrive as strings (pydantic's lax mode converts them),
nested objects arrive flattened (`metadata[user]`, `input_reference[image_url]`), and `input_reference` may be
an uploaded file, whose bytes travel beside the model.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.types import Message, Receive

from service.contract.problems import InvalidParameter, TooLarge, UnsupportedMedia
from service.contract.schemas import MAX_PROMPT_CHARS, VideoCreate, VideoRemix
from service.contract.settings import Settings

_NESTED = re.compile(r"^([a-z_]+)\[([^\]]*)\]$")
_MAX_FIELDS = 64
# Far deeper than any valid request (metadata and input_reference are one level down); json.loads and the
# validation error's traceback recurse once per level, and ~1000 levels reach Python's recursion limit.
_MAX_JSON_DEPTH = 16


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


def too_large(limit: int) -> TooLarge:
    return TooLarge(f"The request body is larger than {limit} bytes.", code="body_too_large")


def capped(request: Request, limit: int) -> Request:
    """The request with a body that stops at `limit` bytes: a chunked body has no Content-Length to check first,
    so the count is kept while it streams and nothing past the limit is read, buffered or spooled to disk."""
    seen = 0
    receive: Receive = request.receive

    async def counted() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise too_large(limit)
        return message

    return Request(request.scope, counted)


async def parse_create(request: Request, settings: Settings) -> tuple[VideoCreate, bytes | None]:
    limit = body_limit(settings)
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise TooLarge(f"The request body is {length} bytes; the limit is {limit}.", code="body_too_large")
    request = capped(request, limit)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        return _validate(parse_json(await request.body())), None
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return await _parse_form(request, settings, limit)
    raise UnsupportedMedia(
        "Send the request as application/json or multipart/form-data (application/x-www-form-urlencoded also works).",
        code="unsupported_media_type",
    )


async def parse_remix(request: Request) -> VideoRemix:
    """A remix body: JSON with a prompt (the openai SDK sends JSON here), capped like a create body."""
    limit = MAX_PROMPT_CHARS * 4 + 64 * 1024  # a prompt of 4-byte characters and room for JSON escapes
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise too_large(limit)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise UnsupportedMedia("Send the remix as application/json.", code="unsupported_media_type")
    return _validate(parse_json(await capped(request, limit).body()), VideoRemix)


def parse_json(body: bytes) -> dict:
    """A JSON object body, or a 400: malformed, nested too deeply, or with an integer past Python's 4300 digits."""
    try:
        data = json.loads(body)
    except RecursionError as e:
        raise InvalidParameter(_too_deep(), code="invalid_json") from e
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, and int() of a huge number
        raise InvalidParameter(f"The request body is not valid JSON: {_reason(e)}", code="invalid_json") from e
    if not isinstance(data, dict):
        raise InvalidParameter("The request body must be a JSON object.", code="invalid_json")
    if _depth(data) > _MAX_JSON_DEPTH:
        raise InvalidParameter(_too_deep(), code="invalid_json")
    return data


def _too_deep() -> str:
    return f"The request body is nested more than {_MAX_JSON_DEPTH} levels deep."


def _reason(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at line {e.lineno} column {e.colno}."
    if "digits" in str(e):
        return "a number has too many digits."
    return "it is not UTF-8 text." if isinstance(e, UnicodeDecodeError) else "it could not be parsed."


def _depth(data: object) -> int:
    """How deeply containers nest, counted without recursion and given up past the limit."""
    deepest, level = 0, [(data, 1)]
    while level:
        node, depth = level.pop()
        deepest = max(deepest, depth)
        if depth > _MAX_JSON_DEPTH:
            break
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        level.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return deepest


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


def _validate(data: dict, model: type[VideoCreate] | type[VideoRemix] = VideoCreate) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]
        ) from e
