"""The `k5serve` command: gateway, worker, the whole local stack, and the tiny test checkpoints.

This is the composition root: the worker and tiny-model commands import the `worker` package lazily, so the
gateway (and an install without torch) never loads torch or diffusers.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import click

from service.contract.logs import setup_logging
from service.contract.settings import Settings

if TYPE_CHECKING:
    import uvicorn


def _settings() -> Settings:
    settings = Settings()
    setup_logging(settings.log_level, settings.log_format)
    return settings


def _shown_url(url: str) -> str:
    """A URL fit for a message: its password, if any, replaced by ***."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}"))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """k5serve: Kandinsky 5.0 video generation as an OpenAI-videos-compatible service."""


@main.command()
@click.option("--workers", default=1, show_default=True, help="Gateway processes sharing the port.")
def gateway(workers: int) -> None:
    """Run the HTTP gateway (K5_HOST:K5_PORT)."""
    import os
    import tempfile

    import uvicorn

    from service.console.localstack import port_busy_message
    from service.gateway.server import GatewayProtocol

    settings = _settings()
    if message := port_busy_message(settings.host, settings.port):
        raise SystemExit(f"k5serve gateway: {message}")
    options: dict[str, Any] = {
        "factory": True,
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "proxy_headers": True,
        "timeout_graceful_shutdown": 10,
        # h11 with header and body deadlines and a per-client connection bound (service/gateway/server.py).
        "http": GatewayProtocol.configure(settings),
    }
    if workers == 1:
        uvicorn.run("service.gateway.app:create_app", **options)
        return
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Several processes behind one port: /metrics must add up all of them, through files in a shared dir.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="k5-metrics-")
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config("service.gateway.app:create_app", workers=workers, **options)
    Multiprocess(config, sockets=[_tcp_listener(config)]).run()


def _tcp_listener(config: uvicorn.Config) -> socket.socket:
    """The shared listening socket, bound as uvicorn binds it but with its protocol set to IPPROTO_TCP.

    uvicorn's own bind leaves proto 0 (uvicorn issue 3149). Accepted sockets inherit it, and asyncio sets
    TCP_NODELAY only on sockets whose proto is IPPROTO_TCP: with Nagle on, each response's second write waited
    for the client's delayed ACK, ~40 ms per request that one process (which binds through asyncio) never had."""
    bound = config.bind_socket()
    return socket.socket(bound.family, bound.type, socket.IPPROTO_TCP, fileno=bound.detach())


@main.command()
def worker() -> None:
    """Run a GPU worker for the model in K5_MODEL (loads and warms it, then takes jobs one at a time)."""
    import os

    from worker.speed import configure_allocator

    # Before anything initialises CUDA: the allocator reads it once (worker/speed.py says why expandable segments).
    configure_allocator(os.environ)
    settings = _settings()
    if settings.layout.world > 1:  # one video on several GPUs: a supervisor and one process per GPU
        from worker.ranks import serve

        raise SystemExit(serve(settings))
    from worker.main import run

    run(settings)


@main.command()
@click.option("--device-memory", type=float, default=None, help="GiB to budget against (default: the GPU's).")
def doctor(device_memory: float | None) -> None:
    """Preflight of this host for a worker of K5_MODEL: one table; exit 1 on a blocker (its fix is named)."""
    from worker import doctor as checks

    rows = checks.run(_settings(), device_memory)
    click.echo(checks.table(rows))
    if any(r.status == "FAIL" for r in rows):
        raise SystemExit(1)


@main.command()
def webhooks() -> None:
    """Deliver signed webhooks from the Redis delivery queue (retries, backoff; run one or more)."""
    import signal

    from service.contract import metrics
    from service.contract.jobs import connect_redis
    from service.delivery.deliverer import Deliverer

    settings = _settings()
    deliverer = Deliverer(settings, connect_redis(settings))
    metrics.serve(settings.host, settings.metrics_port, lambda: True)
    # SIGTERM/SIGINT: finish the attempts in flight, then stop; unfinished ones are retried after their lease.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: deliverer.stopped.set())
    deliverer.run()


@main.command()
@click.argument("video_id")
def deliveries(video_id: str) -> None:
    """Show the webhook deliveries of VIDEO_ID: endpoint, state, attempts, last status (for operators).

    Reads the Redis in K5_REDIS_URL; exits 1 when it holds no delivery of VIDEO_ID."""
    import redis

    from service.contract.jobs import connect_redis
    from service.contract.webhooks import deliveries_of

    settings = _settings()
    where = f"the Redis at {_shown_url(settings.redis_url)} (K5_REDIS_URL)"
    try:
        conn = connect_redis(settings)
    except ValueError as exc:  # not a redis:// URL
        _fail(f"K5_REDIS_URL {_shown_url(settings.redis_url)!r}: {exc}")
    try:
        found = deliveries_of(conn, video_id)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        _fail(f"cannot reach {where}: {exc}")
    if not found:
        # Nothing printed and exit 0 would look like "no webhooks"; most often it is the wrong Redis or id.
        click.echo(f"no webhook deliveries for {video_id} in {where}", err=True)
        sys.exit(1)
    for d in found:
        click.echo(d.model_dump_json(exclude={"body"}))


@main.command("tiny-model")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
def tiny_model(directory: Path, seed: int) -> None:
    """Build the tiny random-weight checkpoints into DIRECTORY/t2v and DIRECTORY/i2v."""
    from worker.tiny import save_tiny_models

    for path in save_tiny_models(directory, seed=seed).values():
        click.echo(str(path))


@main.command()
@click.option("--s3", is_flag=True, help="Store videos in a local SeaweedFS S3 endpoint instead of a directory.")
@click.option(
    "--state-dir",
    default=".k5",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Where the local stack keeps its data and the tiny checkpoints.",
)
def dev(s3: bool, state_dir: Path) -> None:
    """Run everything locally: Redis, storage, gateway, workers (tiny models unless K5_MODEL is set)."""
    from service.console.dev import run_dev

    sys.exit(run_dev(_settings(), state_dir.absolute(), use_s3=s3))


@main.command()
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path), required=False)
def openapi(output: Path | None) -> None:
    """Write the gateway's OpenAPI document as YAML (to OUTPUT or stdout)."""
    from service.gateway.openapi import openapi_yaml

    text = openapi_yaml()
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)


@main.command()
@click.argument("model")
def resolve(model: str) -> None:
    """Show the spec a worker would serve for MODEL (catalogue id, hub repo id or local directory)."""
    from service.contract.models import TINY, UnknownModelError, resolve_model

    try:
        spec = resolve_model(model)
    except UnknownModelError as exc:
        if model in TINY:
            # No published checkpoint: the tiny models exist only as directories that k5serve builds.
            task = model.removeprefix("k5-tiny-")
            _fail(
                f"{model} is a tiny test model with no published checkpoint: build it with `k5serve tiny-model DIR` "
                f"(`k5serve dev` builds it into .k5/tiny) and pass its directory, e.g. `k5serve resolve DIR/{task}`"
            )
        _fail(str(exc))
    click.echo(json.dumps(spec.model_dump(), indent=2))


# The client commands (generate, videos, models) talk to a gateway over HTTP; they live in console/cli_client, and
# console/terminal holds the one-line error report (`_fail`) that the operator commands above use too.
from service.console import cli_client  # noqa: E402
from service.console.terminal import _fail  # noqa: E402

for _command in cli_client.COMMANDS:
    main.add_command(_command)


if __name__ == "__main__":
    main()
