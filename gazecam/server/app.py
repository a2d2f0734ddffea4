"""The stop-and-ask service: ``create_app(settings)`` builds the FastAPI app, ``serve`` runs
it on uvicorn.

The app's lifespan loads the models (fetched once where missing), starts the capture loop and
the perception worker in the background, and stops them at shutdown; requests are served
only in between.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from gazecam import __version__
from gazecam.assist.assistant import AssistantSettings, Engines, load_engines, load_task
from gazecam.llm.settings import LLMSettings
from gazecam.models import ModelSettings
from gazecam.server.chat import router as openai_compatible
from gazecam.server.errors import install_error_handlers
from gazecam.server.jetson import jetson_health
from gazecam.server.logs import redact_secrets_in_logs
from gazecam.server.metrics import Metrics
from gazecam.server.pipeline import PipelineStats
from gazecam.server.protocol import RateLimiter
from gazecam.server.routes import STATIC_DIR, api, public
from gazecam.server.runtime import Runtime, source_factory
from gazecam.server.settings import ServerSettings
from gazecam.server.ws import router as websockets
from gazecam.settings import CaptureSettings, SourceSettings

logger = logging.getLogger("gazecam.server")

# Websocket messages longer than this close the connection (1009) in uvicorn itself; shorter
# ones over the setting's limit get an error and the socket stays open.
WS_TRANSPORT_MAX_BYTES = 1 << 20


def create_app(
    settings: ServerSettings | None = None,
    *,
    source: SourceSettings | None = None,
    capture: CaptureSettings | None = None,
    assistant: AssistantSettings | None = None,
    engines: Engines | None = None,
) -> FastAPI:
    """The service for ``settings``; the other settings default to the environment's.

    ``engines``: models already loaded (tests share them between apps); unset, the lifespan
    loads them.
    """
    settings = settings or ServerSettings()
    redact_secrets_in_logs()
    # A bad task card or source address stops the service here, before anything starts.
    card = load_task(settings.task)
    make_source = source_factory(settings.source, source or SourceSettings())
    stats = PipelineStats()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = (
            engines
            if engines is not None
            else await asyncio.to_thread(partial(load_engines, fallback=True))
        )
        runtime = await asyncio.to_thread(
            Runtime,
            settings,
            card,
            loaded,
            stats,
            make_source=make_source,
            capture=capture or CaptureSettings(),
            assistant=assistant or AssistantSettings(),
        )
        runtime.start()
        app.state.runtime = runtime
        app.state.metrics.watch_queue(lambda: runtime.asks_waiting)
        logger.info("serving %s with task card %r", settings.source, card.name)
        try:
            with jetson_health(app.state.metrics.registry):
                yield
        finally:
            await runtime.stop()

    # FastAPI's own /openapi.json, /docs and /redoc would answer without the token: the schema
    # is served by the api router, behind it, and the docs pages are off (they load their code
    # from a CDN the box beside the glasses cannot reach, and a browser cannot send the token
    # with them; docs/protocol.md is the reference).
    app = FastAPI(
        title="gazecam",
        version=__version__,
        lifespan=lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = Metrics(stats)
    app.state.rate_limiter = RateLimiter(settings.asks_per_minute)
    install_error_handlers(app)
    app.include_router(public)
    app.include_router(api)
    app.include_router(openai_compatible)
    app.include_router(websockets)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def serve(
    settings: ServerSettings, llm: LLMSettings | None = None, models: ModelSettings | None = None
) -> None:
    """Run the service on uvicorn until interrupted (Ctrl-C, SIGTERM).

    ``llm``, ``models``: the answer engine's settings (``--engine``, ``--vlm``). Where the vlm
    engine cannot load, the text engine answers and ``/v1/status`` says why.
    """
    import uvicorn

    # Loaded before uvicorn starts, so that a missing model ends the command with one line.
    app = create_app(settings, engines=load_engines(llm, models, fallback=True))
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        ws_max_size=WS_TRANSPORT_MAX_BYTES,
        log_level="info",
    )
