"""create_app(settings): the FastAPI gateway."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from service import errors
from service.jobs import JobStore, connect_redis
from service.routes import health, videos
from service.settings import Settings
from service.storage import open_storage

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(
        title="k5serve",
        version="0.1.0",
        summary="Kandinsky 5.0 video generation behind an OpenAI-videos-compatible API.",
    )
    app.state.settings = settings
    app.state.store = JobStore(connect_redis(settings), settings)
    app.state.storage = open_storage(settings)
    errors.install(app)
    app.include_router(health.router)
    app.include_router(videos.router)
    return app
