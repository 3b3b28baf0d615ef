"""A small HTTP client of the k5serve API (httpx), used by the `k5serve` CLI commands.

It speaks the public contract only (openapi.yaml), so it works against any k5serve deployment, and it turns
every failure into one exception type with a message fit to show a person: the server's error envelope, or
what went wrong on the way there.
"""

from __future__ import annotations

import json
import mimetypes
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

TERMINAL = frozenset({"completed", "failed"})
Variant = Literal["video", "thumbnail", "spritesheet"]
EXTENSIONS: dict[str, str] = {"video": ".mp4", "thumbnail": ".webp", "spritesheet": ".jpg"}

# Between polls when the server sends no openai-poll-after-ms header (the openai SDK waits 1 s too).
DEFAULT_POLL_S = 1.0
# An SSE stream with no byte (event or keep-alive) for this long is treated as stalled and reopened.
STREAM_READ_TIMEOUT_S = 60.0


class ClientError(Exception):
    """Anything that stops a request: an error answer from the server or no answer at all."""


class ConnectionFailed(ClientError):
    pass


@dataclass(eq=False)
class APIError(ClientError):
    """The server's error envelope {"error": {message, type, param, code}} and the HTTP status."""

    status: int
    message: str
    type: str | None = None
    param: str | None = None
    code: str | None = None

    def __str__(self) -> str:
        return f"{self.message} (param: {self.param})" if self.param else self.message


def _api_error(resp: httpx.Response) -> APIError:
    try:
        body = resp.json()["error"]
        return APIError(resp.status_code, body["message"], body.get("type"), body.get("param"), body.get("code"))
    except (ValueError, KeyError, TypeError):
        # Not our envelope (a proxy's HTML page, say): the status line is the best we have.
        text = resp.text.strip().splitlines()[0][:200] if resp.text.strip() else resp.reason_phrase
        return APIError(resp.status_code, f"HTTP {resp.status_code}: {text}")


class K5Client:
    """The k5serve API. Methods return the JSON objects of the contract as dicts."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"User-Agent": "k5serve-cli"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        # httpx drops the Authorization header when a redirect leaves the origin, so following the content
        # route's 302 to a presigned object-store URL never leaks the key there.
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)
        # How the last watch() learned of progress: "events" (SSE) or "polling"; shown to users, checked in tests.
        self.progress_source: Literal["events", "polling"] | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> K5Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ConnectionFailed(f"{self.base_url} did not answer in time ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"cannot reach {self.base_url}: {exc}") from exc
        if resp.status_code >= 400:
            raise _api_error(resp)
        return resp

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return self._request(method, path, **kwargs).json()

    # -- the API -------------------------------------------------------------------------------------------

    def create_video(
        self,
        prompt: str,
        *,
        model: str | None = None,
        size: str | None = None,
        seconds: str | None = None,
        image: Path | None = None,
        negative_prompt: str | None = None,
        seed: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "prompt": prompt,
            "model": model,
            "size": size,
            "seconds": seconds,
            "negative_prompt": negative_prompt,
            "seed": seed,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
        }
        fields = {k: v for k, v in fields.items() if v is not None}
        if image is None:
            if metadata:
                fields["metadata"] = metadata
            return self._json("POST", "/v1/videos", json=fields)
        # With an image, multipart: the file goes as it is, with no base64 inflation. Numbers travel as
        # strings and metadata as metadata[KEY] fields, as the openai SDK sends them.
        form = {k: str(v) for k, v in fields.items()}
        form.update({f"metadata[{k}]": v for k, v in (metadata or {}).items()})
        try:
            data = image.read_bytes()
        except OSError as exc:
            raise ClientError(f"cannot read image {image}: {exc.strerror or exc}") from exc
        mime = mimetypes.guess_type(image.name)[0] or "application/octet-stream"
        return self._json("POST", "/v1/videos", data=form, files={"input_reference": (image.name, data, mime)})

    def get_video(self, video_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/videos/{video_id}")

    def list_videos(self, *, after: str | None = None, limit: int = 20, order: str = "desc") -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, "order": order}
        if after:
            params["after"] = after
        return self._json("GET", "/v1/videos", params=params)

    def iter_videos(self, *, limit: int | None = None, order: str = "desc") -> Iterator[dict[str, Any]]:
        """Every video (or the first `limit`), following the list cursor page by page."""
        after: str | None = None
        seen = 0
        while True:
            page = self.list_videos(after=after, limit=min(100, limit - seen) if limit else 100, order=order)
            for video in page["data"]:
                yield video
                seen += 1
                if limit and seen >= limit:
                    return
            if not page["has_more"] or not page["data"]:
                return
            after = page["last_id"]

    def cancel_video(self, video_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/videos/{video_id}/cancel")

    def delete_video(self, video_id: str) -> dict[str, Any]:
        return self._json("DELETE", f"/v1/videos/{video_id}")

    def list_models(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/models")["data"]

    def download(self, video_id: str, dest: Path, variant: Variant = "video") -> int:
        """Write a finished video's asset to dest (through a partial file, so an interrupted download never
        leaves a truncated MP4 under the real name). Returns the byte count."""
        part = dest.with_name(dest.name + ".part")
        try:
            with self._http.stream(
                "GET", f"/v1/videos/{video_id}/content", params={"variant": variant}, follow_redirects=True
            ) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise _api_error(resp)
                size = 0
                with part.open("wb") as f:
                    for chunk in resp.iter_bytes():
                        f.write(chunk)
                        size += len(chunk)
            part.replace(dest)
            return size
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"download of {video_id} failed: {exc}") from exc
        except OSError as exc:
            raise ClientError(f"cannot write {dest}: {exc.strerror or exc}") from exc
        finally:
            part.unlink(missing_ok=True)

    # -- following a job -----------------------------------------------------------------------------------

    def watch(self, video_id: str) -> Iterator[dict[str, Any]]:
        """Yield the video object each time it changes, until it is completed or failed.

        Server-Sent Events from /events when the server has them; polling at the server's
        openai-poll-after-ms pace when it does not (404) or when a stream breaks off.
        """
        use_events = True
        while True:
            if use_events:
                try:
                    for video in self._events(video_id):
                        self.progress_source = "events"
                        yield video
                        if video["status"] in TERMINAL:
                            return
                except _NoEvents:
                    use_events = False
                except httpx.TransportError:
                    # A stalled or broken stream (or a server gone): the poll below either reports the server
                    # unreachable or carries on, and the stream is reopened after it.
                    pass
            resp = self._request("GET", f"/v1/videos/{video_id}")
            video = resp.json()
            if not use_events:
                self.progress_source = "polling"
            yield video
            if video["status"] in TERMINAL:
                return
            time.sleep(_poll_after_s(resp))

    def _events(self, video_id: str) -> Iterator[dict[str, Any]]:
        timeout = httpx.Timeout(self._http.timeout.connect, read=STREAM_READ_TIMEOUT_S)
        with self._http.stream(
            "GET", f"/v1/videos/{video_id}/events", headers={"Accept": "text/event-stream"}, timeout=timeout
        ) as resp:
            if resp.status_code >= 400:
                resp.read()
                err = _api_error(resp)
                # A 404 without our video_not_found code means the route is missing: an older server.
                if resp.status_code in (404, 405) and err.code != "video_not_found":
                    raise _NoEvents()
                raise err
            if not resp.headers.get("content-type", "").startswith("text/event-stream"):
                raise _NoEvents()
            for event, data in parse_sse(resp.iter_lines()):
                if event not in ("video", "message") or not data:
                    continue
                try:
                    yield json.loads(data)
                except ValueError:
                    continue  # a garbled event: the next one, or the poll after the stream, has the state


class _NoEvents(Exception):
    """The server has no event stream for videos."""


def _poll_after_s(resp: httpx.Response) -> float:
    try:
        return max(0.05, int(resp.headers["openai-poll-after-ms"]) / 1000)
    except (KeyError, ValueError):
        return DEFAULT_POLL_S


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event, data) pairs of a text/event-stream, per the WHATWG rules: fields until a blank line, `data`
    lines joined by newlines, comment lines (keep-alives) ignored, event name "message" by default."""
    event = "message"
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
    if data:
        yield event, "\n".join(data)
