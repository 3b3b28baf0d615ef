"""The client side of the `k5serve` command: `generate`, `videos list|show|watch|cancel|delete|download` and
`models`, talking to a gateway over HTTP with service.console.client (shared helpers: service.console.terminal).

Human output (progress, tables, errors) goes to stderr through rich; stdout carries only what a script wants
(the path of a download, JSON with --json), so `mpv "$(k5serve generate ...)"` works.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
from rich.table import Table
from rich.text import Text

from service.console.client import TERMINAL, Variant
from service.console.terminal import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    _client,
    _client_errors,
    _fail,
    _image_model,
    _on_interrupt,
    _output_path,
    _print_json,
    _server_options,
    _status_text,
    _when,
    err,
    follow,
    out,
)


@click.command()
@click.argument("prompt")
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="First frame (i2v).")
@click.option(
    "--model",
    help="Model id (default: the server's default text-to-video model; with --image, its first online "
    "image-to-video model).",
)
@click.option("--size", help="WIDTHxHEIGHT, one of the model's sizes.")
@click.option("--seconds", help="Duration, one of the model's durations.")
@click.option("--seed", type=click.IntRange(min=0), help="Same seed and request, same video.")
@click.option("--negative-prompt", help="What to steer away from.")
@click.option("--steps", type=click.IntRange(min=1), help="Denoising steps.")
@click.option("--guidance", type=click.FloatRange(min=0), help="Classifier-free guidance scale.")
@click.option("--metadata", "metadata", multiple=True, metavar="KEY=VALUE", help="Stored on the video; repeatable.")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Where to save the MP4 (a file or a directory; default ./VIDEO_ID.mp4).",
)
@_server_options
@_client_errors
def generate(
    prompt: str,
    image: Path | None,
    model: str | None,
    size: str | None,
    seconds: str | None,
    seed: int | None,
    negative_prompt: str | None,
    steps: int | None,
    guidance: float | None,
    metadata: tuple[str, ...],
    output: Path | None,
    server: str,
    api_key: str | None,
) -> None:
    """Generate a video from PROMPT, show its progress, and download the MP4.

    Ctrl-C offers to cancel the job on the server (it cancels without asking when stdin is not a terminal).
    """
    pairs: dict[str, str] = {}
    for item in metadata:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"'{item}' is not KEY=VALUE", param_hint="--metadata")
        pairs[key] = value
    # Refuse a destination we cannot write before spending GPU time on it.
    if output is not None and not output.is_dir() and not output.absolute().parent.is_dir():
        raise click.BadParameter(f"directory {output.absolute().parent} does not exist", param_hint="--output")

    with _client(server, api_key) as client:
        started = time.monotonic()
        if image is not None and model is None:
            model = _image_model(client)
        video = client.create_video(
            prompt,
            model=model,
            size=size,
            seconds=seconds,
            image=image,
            negative_prompt=negative_prompt,
            seed=seed,
            num_inference_steps=steps,
            guidance_scale=guidance,
            metadata=pairs or None,
        )
        video_id = video["id"]
        err.print(
            f"submitted {video_id} ({video['model']}, {video['size']}, {video['seconds']} s, seed {video['seed']})"
        )
        try:
            video = follow(client, video)
        except KeyboardInterrupt:
            _on_interrupt(client, video_id)
        if video["status"] != "completed":
            error = video.get("error") or {}
            _fail(f"{video_id} failed: {error.get('message', 'unknown error')} (code: {error.get('code')})")
        dest = _output_path(output, video_id)
        try:
            size_bytes = client.download(video_id, dest)
        except KeyboardInterrupt:
            _fail(f"download interrupted; {video_id} is done: `k5serve videos download {video_id}`", EXIT_INTERRUPTED)
        took = time.monotonic() - started
        saved = f" {video_id} in {took:.1f} s: saved {dest} ({size_bytes / 1024:.0f} KiB)"
        err.print(Text.assemble(("done", "green"), saved))
        click.echo(str(dest.absolute()))


@click.group()
def videos() -> None:
    """List, inspect, follow, cancel, delete and download videos."""


@videos.command("list")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="How many videos.")
@click.option("--all", "everything", is_flag=True, help="Every video, page after page.")
@click.option("--order", type=click.Choice(["desc", "asc"]), default="desc", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="The video objects as JSON.")
@_server_options
@_client_errors
def list_videos(limit: int, everything: bool, order: str, as_json: bool, server: str, api_key: str | None) -> None:
    """Your videos, newest first."""
    with _client(server, api_key) as client:
        items = list(client.iter_videos(limit=None if everything else limit, order=order))
    if as_json:
        _print_json(items)
        return
    if not items:
        err.print("no videos yet")
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("ID", no_wrap=True)
    table.add_column("STATUS", no_wrap=True)
    table.add_column("%", justify="right")
    table.add_column("MODEL", no_wrap=True)
    table.add_column("SIZE")
    table.add_column("SEC", justify="right")
    table.add_column("CREATED", no_wrap=True)
    table.add_column("PROMPT", no_wrap=True, overflow="ellipsis", ratio=1, min_width=10)
    for v in items:
        table.add_row(
            v["id"],
            _status_text(v),
            str(v["progress"]),
            v["model"],
            v["size"],
            v["seconds"],
            _when(v["created_at"]),
            v.get("prompt") or "",
        )
    out.print(table)


@videos.command("show")
@click.argument("video_id")
@click.option("--json", "as_json", is_flag=True, help="The video object as JSON.")
@_server_options
@_client_errors
def show_video(video_id: str, as_json: bool, server: str, api_key: str | None) -> None:
    """One video: status, progress, parameters, error."""
    with _client(server, api_key) as client:
        video = client.get_video(video_id)
    if as_json:
        _print_json(video)
        return
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    rows: list[tuple[str, str | Text]] = [
        ("id", video["id"]),
        ("status", _status_text(video)),
        ("progress", f"{video['progress']}%"),
    ]
    if video.get("queue_position") is not None:
        rows.append(("queue position", str(video["queue_position"])))
    if video.get("estimated_completion_at"):
        rows.append(("estimated completion", _when(video["estimated_completion_at"])))
    rows += [
        ("model", video["model"]),
        ("size", video["size"]),
        ("seconds", video["seconds"]),
        ("prompt", video.get("prompt") or ""),
        ("negative prompt", video.get("negative_prompt") or "-"),
        ("seed", str(video.get("seed"))),
        ("steps", str(video.get("num_inference_steps"))),
        ("guidance", str(video.get("guidance_scale"))),
        ("created", _when(video.get("created_at"))),
        ("completed", _when(video.get("completed_at"))),
        ("expires", _when(video.get("expires_at"))),
    ]
    if video.get("metadata"):
        rows.append(("metadata", json.dumps(video["metadata"])))
    if video.get("error"):
        rows.append(("error", Text(f"{video['error']['code']}: {video['error']['message']}", style="red")))
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)


@videos.command("watch")
@click.argument("video_id")
@_server_options
@_client_errors
def watch_video(video_id: str, server: str, api_key: str | None) -> None:
    """Follow a job's progress until it ends (Ctrl-C offers to cancel it)."""
    with _client(server, api_key) as client:
        video = client.get_video(video_id)
        if video["status"] not in TERMINAL:
            try:
                video = follow(client, video)
            except KeyboardInterrupt:
                _on_interrupt(client, video_id)
    err.print(Text.assemble(f"{video_id}: ", _status_text(video)))
    if video["status"] != "completed":
        sys.exit(EXIT_ERROR)


@videos.command("cancel")
@click.argument("video_ids", nargs=-1, required=True, metavar="VIDEO_ID...")
@_server_options
@_client_errors
def cancel_videos(video_ids: tuple[str, ...], server: str, api_key: str | None) -> None:
    """Cancel queued or running jobs (they end failed, code 'cancelled')."""
    with _client(server, api_key) as client:
        for video_id in video_ids:
            video = client.cancel_video(video_id)
            err.print(Text.assemble(f"{video_id}: ", _status_text(video)))


@videos.command("delete")
@click.argument("video_ids", nargs=-1, required=True, metavar="VIDEO_ID...")
@_server_options
@_client_errors
def delete_videos(video_ids: tuple[str, ...], server: str, api_key: str | None) -> None:
    """Delete videos and their files (a running job is cancelled first)."""
    with _client(server, api_key) as client:
        for video_id in video_ids:
            client.delete_video(video_id)
            err.print(f"deleted {video_id}")


@videos.command("download")
@click.argument("video_id")
@click.option(
    "--variant",
    type=click.Choice(["video", "thumbnail", "spritesheet"]),
    default="video",
    show_default=True,
    help="The MP4, a WebP thumbnail, or a JPEG grid of frames.",
)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="File or directory (default ./VIDEO_ID.EXT).")
@_server_options
@_client_errors
def download_video(video_id: str, variant: Variant, output: Path | None, server: str, api_key: str | None) -> None:
    """Download a finished video (or its thumbnail or spritesheet)."""
    dest = _output_path(output, video_id, variant)
    with _client(server, api_key) as client:
        size_bytes = client.download(video_id, dest, variant)
    err.print(f"saved {dest} ({size_bytes / 1024:.0f} KiB)")
    click.echo(str(dest.absolute()))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="The model objects as JSON.")
@_server_options
@_client_errors
def models(as_json: bool, server: str, api_key: str | None) -> None:
    """The models this deployment serves, with their sizes and durations."""
    with _client(server, api_key) as client:
        data = client.list_models()
    if as_json:
        _print_json(data)
        return
    table = Table(box=None, header_style="bold", pad_edge=False, caption="* default", caption_justify="left")
    for name in ("ID", "TASK", "ONLINE", "SIZES", "SECONDS", "STEPS", "GUIDANCE"):
        table.add_column(name, no_wrap=name in ("ID", "ONLINE"))
    for m in data:
        online = Text(f"yes ({m['workers']})", style="green") if m["online"] else Text("no", style="dim")
        # The default size and duration come first in the server's lists; mark them.
        sizes = ", ".join(f"{s}*" if s == m["default_size"] else s for s in m["sizes"])
        secs = ", ".join(f"{s}*" if s == m["default_seconds"] else s for s in m["seconds"])
        table.add_row(
            m["id"],
            m["task"],
            online,
            sizes,
            secs,
            str(m["default_num_inference_steps"]),
            str(m["default_guidance_scale"]),
        )
    out.print(table)


COMMANDS: tuple[click.Command, ...] = (generate, videos, models)
