"""What the client commands share: where the server is, how errors end a command (one line, an exit code), and how
a video is shown and followed on a terminal (rich progress on stderr, plain lines when stderr is not a terminal)."""

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
from rich.text import Text

from service.console.client import EXTENSIONS, APIError, ClientError, K5Client, Variant

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
