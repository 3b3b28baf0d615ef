"""The client side of the `k5serve` command: `generate`, `videos list|show|watch|cancel|delete|download` and
`models`, talking to a gateway over HTTP with service.console.client.

Human output (progress, tables, errors) goes to stderr through rich; stdout carries only what a script wants
(the path of a download, JSON with --json), so `mpv "$(k5serve generate ...)"` works.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, ParamSpec, TypeVar

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from service.console.client import EXTENSIONS, TERMINAL, APIError, ClientError, K5Client, Variant

DEFAULT_SERVER = "http://127.0.0.1:8000"
# What a gateway bound to every interface is reached at from this machine.
_ANY_HOST = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # what shells report for a command ended by SIGINT

P = ParamSpec("P")
R = TypeVar("R")


def _console(stderr: bool) -> Console:
    # soft_wrap: an error or a log line stays one line however long. Off a terminal (a pipe, a CI log) rich
    # would lay tables out for 80 columns and cut ids short; a wide virtual width keeps rows whole.
    # markup=False: prompts, paths and server messages are printed as they are ("metadata[k]" is no style tag);
    # styles come from Text objects.
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 1000
    return Console(stderr=stderr, highlight=False, markup=False, soft_wrap=True, width=width)


err = _console(stderr=True)
out = _console(stderr=False)


# -- shared options and error handling -------------------------------------------------------------------------


def default_server() -> str:
    """The gateway this machine's `k5serve gateway` or `k5serve dev` would serve: K5_HOST and K5_PORT (as the
    server reads them), else 127.0.0.1:8000. K5_SERVER or --server override it."""
    host = os.environ.get("K5_HOST", "127.0.0.1").strip()
    host = _ANY_HOST.get(host, host)
    port = os.environ.get("K5_PORT", "8000").strip() or "8000"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _server_options(command: Callable[P, R]) -> Callable[P, R]:
    """--server and --api-key on every command (the gateway group `main` takes no options of its own)."""
    command = click.option(
        "--api-key",
        envvar="K5_API_KEY",
        show_envvar=True,
        help="API key, sent as 'Authorization: Bearer KEY'.",
    )(command)
    return click.option(
        "--server",
        envvar="K5_SERVER",
        default=default_server,
        show_default="http://K5_HOST:K5_PORT, i.e. " + DEFAULT_SERVER + " unless those are set",
        show_envvar=True,
        help="Base URL of the k5serve gateway.",
    )(command)


def _fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    err.print(Text(f"error: {message}", style="bold red"))
    sys.exit(code)


def _client_errors(command: Callable[P, R]) -> Callable[P, R]:
    """One clear line on stderr and a non-zero exit for anything the server or the network says, instead of a
    traceback: these are the user's problems to fix (a bad size, a wrong key, a server that is down)."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except ClientError as exc:
            _fail(str(exc))

    return wrapper


def _client(server: str, api_key: str | None) -> K5Client:
    if not server.startswith(("http://", "https://")):
        raise click.BadParameter(f"'{server}' is not an http(s) URL", param_hint="--server")
    return K5Client(server, api_key)


def _print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2))


def _when(ts: int | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _status_text(video: dict[str, Any]) -> Text:
    status = video["status"]
    if status == "failed" and video.get("error"):
        code = video["error"].get("code") or "error"
        return Text(f"failed ({code})", style="red")
    style = {"completed": "green", "in_progress": "yellow", "queued": "cyan"}.get(status, "")
    return Text(status, style=style)


# -- live progress ---------------------------------------------------------------------------------------------


class _EtaColumn(ProgressColumn):
    """Time left: the server's estimated_completion_at while it lies ahead, else rich's estimate from the rate
    at which progress has been moving."""

    def render(self, task: Task) -> Text:
        eta_at = task.fields.get("eta_at")
        if eta_at and eta_at > time.time():
            left = eta_at - time.time()
        elif task.total is not None and task.completed > 0 and task.time_remaining is not None:
            left = task.time_remaining
        else:
            return Text("eta -:--", style="progress.remaining")
        minutes, seconds = divmod(int(left + 0.5), 60)
        return Text(f"eta {minutes}:{seconds:02d}", style="progress.remaining")


def _describe(video: dict[str, Any]) -> str:
    if video["status"] == "queued":
        position = video.get("queue_position")
        if position is None:
            return "queued"
        return "queued, next in line" if position == 0 else f"queued, {position} ahead"
    if video["status"] == "in_progress":
        return "generating"
    return video["status"]


def follow(client: K5Client, video: dict[str, Any]) -> dict[str, Any]:
    """Show a job's progress until it ends; returns its last video object.

    On a terminal, a live rich progress bar (it pulses while the job is queued, then fills with the denoising
    progress). Elsewhere (CI logs, pipes), one line each time the state changes, since a live bar would
    print nothing useful there."""
    updates = client.watch(video["id"])
    if not err.is_terminal:
        return _follow_plain(updates, video)
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        TaskProgressColumn(),
        _EtaColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task(_describe(video), total=None, eta_at=video.get("estimated_completion_at"))
        for video in updates:
            running = video["status"] != "queued"
            progress.update(
                task,
                description=_describe(video),
                # No total while queued: the bar pulses instead of pretending to know the wait.
                total=100 if running else None,
                completed=video.get("progress", 0),
                eta_at=video.get("estimated_completion_at"),
            )
    return video


def _follow_plain(updates: Iterator[dict[str, Any]], video: dict[str, Any]) -> dict[str, Any]:
    last: tuple[str, int] | None = None
    for video in updates:
        # Progress in quarters keeps a log readable for a 50-step job.
        state = (_describe(video), video.get("progress", 0) // 25 * 25)
        if state != last:
            err.print(f"{video['id']}: {state[0]} {video.get('progress', 0)}%")
            last = state
    return video


def _on_interrupt(client: K5Client, video_id: str) -> NoReturn:
    """Ctrl-C while a job runs: cancel it on the server, asking first when someone is there to answer."""
    if sys.stdin.isatty():
        try:
            cancel = click.confirm(f"\nCancel {video_id} on the server?", default=False, err=True)
        except click.Abort:  # a second Ctrl-C (or end of input) at the question: leave the job alone
            cancel = False
    else:
        err.print(f"interrupted: cancelling {video_id} (stdin is not a terminal, so not asking)")
        cancel = True
    if not cancel:
        err.print(f"{video_id} keeps running; follow it with `k5serve videos watch {video_id}`")
        sys.exit(EXIT_INTERRUPTED)
    try:
        video = client.cancel_video(video_id)
    except APIError as exc:
        if exc.status == 409:  # finished in the meantime: nothing to cancel
            _fail(f"{video_id} had already finished: {exc}", EXIT_INTERRUPTED)
        raise
    err.print(Text.assemble(f"{video_id}: ", _status_text(video)))
    sys.exit(EXIT_INTERRUPTED)


def _image_model(client: K5Client) -> str:
    """The model for --image without --model: the first online image-to-video model the server lists (the
    server's own default is a text-to-video model, which refuses an image)."""
    listed = client.list_models()
    for m in listed:
        if m["task"] == "image-to-video" and m["online"]:
            return m["id"]
    known = ", ".join(m["id"] for m in listed if m["task"] == "image-to-video") or "none"
    _fail(
        f"no image-to-video model is online at {client.base_url} (image-to-video models it knows: {known}); "
        "start a worker for one, or name one with --model"
    )


def _output_path(output: Path | None, video_id: str, variant: Variant = "video") -> Path:
    name = f"{video_id}{EXTENSIONS[variant]}"
    if output is None:
        return Path(name)
    return output / name if output.is_dir() else output


# -- commands --------------------------------------------------------------------------------------------------


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
