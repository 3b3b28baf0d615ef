"""/playground: a browser page for trying the API, served by the gateway itself from service/gateway/static.

Plain files with no build step. Everything the page loads ships in the package, and the Content-Security-Policy
says so to the browser: scripts, styles and fonts only from this origin, so a page served behind a firewall
works and never pulls code from a CDN. The page calls the same /v1 API as any client, with the key the user
types; these routes need no key because they serve nothing but the static page.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from service.contract.problems import NotFound

router = APIRouter(tags=["playground"], include_in_schema=False)

STATIC = Path(__file__).resolve().parent.parent / "static"
# The files the page is made of, by name: a fixed list, so no request path ever reaches the filesystem.
MEDIA_TYPES = {
    "playground.css": "text/css; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        # Thumbnails and the player use blob: URLs of content fetched with the key; the image preview too.
        "img-src 'self' blob: data:",
        "media-src 'self' blob:",
        # The content route redirects to the object store's presigned URL, which is another origin.
        "connect-src 'self' http: https:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files that change with each release: revalidate rather than run a stale script against a new API.
    "Cache-Control": "no-cache",
}


@router.get("/playground")
def playground_redirect() -> RedirectResponse:
    # The page links its files and the API relatively, so it must live at a path ending in a slash; that
    # keeps it working behind a proxy that mounts the gateway under a prefix.
    return RedirectResponse("playground/", status_code=307)


@router.get("/playground/")
def playground_page() -> FileResponse:
    return FileResponse(STATIC / "playground.html", media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/playground/{name}")
def playground_file(name: str) -> FileResponse:
    media_type = MEDIA_TYPES.get(name)
    if media_type is None:
        raise NotFound(f"No playground file '{name}'.", code="not_found")
    return FileResponse(STATIC / name, media_type=media_type, headers=HEADERS)
