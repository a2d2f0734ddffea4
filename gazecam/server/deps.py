"""The routes' dependencies, as ``Annotated`` aliases: the app's parts, and access checks.

With a token set, HTTP routes need ``Authorization: Bearer <token>`` and websockets need the
header or ``?token=`` (a browser cannot set headers on a websocket). Two browser attacks on a
service on localhost are refused whether or not a token is set: a page of another site
talking to it (a websocket is not bound by CORS, and a form may POST anywhere), so a request
whose ``Origin`` is not the service itself is refused; and DNS rebinding (another site's
name resolving to 127.0.0.1), so without a token only loopback host names are served.

A websocket is accepted before it is checked, so that a refused client learns why from the
close code (1008: not allowed, 1013: too many clients) instead of a bare failed handshake.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, WebSocket, WebSocketException, status
from starlette.requests import HTTPConnection

from gazecam.server.errors import ClientError
from gazecam.server.metrics import Metrics
from gazecam.server.protocol import RateLimiter
from gazecam.server.runtime import Runtime
from gazecam.server.settings import ServerSettings, is_loopback


def get_runtime(connection: HTTPConnection) -> Runtime:
    """The running service (set up by the app's lifespan)."""
    runtime: Runtime = connection.app.state.runtime
    return runtime


def get_settings(connection: HTTPConnection) -> ServerSettings:
    """The app's server settings."""
    settings: ServerSettings = connection.app.state.settings
    return settings


def get_metrics(connection: HTTPConnection) -> Metrics:
    """The app's metrics."""
    metrics: Metrics = connection.app.state.metrics
    return metrics


def get_rate_limiter(connection: HTTPConnection) -> RateLimiter:
    """The app's limit on asks per client."""
    limiter: RateLimiter = connection.app.state.rate_limiter
    return limiter


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SettingsDep = Annotated[ServerSettings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RateLimiterDep = Annotated[RateLimiter, Depends(get_rate_limiter)]


def _bearer(connection: HTTPConnection) -> str | None:
    scheme, _, credentials = connection.headers.get("authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else None


def _token_ok(settings: ServerSettings, presented: str | None) -> bool:
    if settings.token is None:
        return True
    expected = settings.token.get_secret_value()
    # Constant time: the comparison must not tell how much of a guess was right.
    return presented is not None and secrets.compare_digest(presented.encode(), expected.encode())


def _foreign(connection: HTTPConnection, settings: ServerSettings) -> str | None:
    """Why a browser request from elsewhere is refused, or None when it is not."""
    host = connection.headers.get("host", "")
    origin = connection.headers.get("origin")
    # Browsers send Origin with websockets and POSTs; other clients send none.
    if origin is not None and urlsplit(origin).netloc != host:
        return f"requests from {origin} are refused (not this service's page)"
    if settings.token is None and not is_loopback(urlsplit(f"//{host}").hostname or ""):
        return f"host {host!r} is not this machine: without a token only loopback is served"
    return None


def require_token(connection: HTTPConnection, settings: SettingsDep) -> None:
    """Refuse an HTTP request from another site, or without the right token (when set)."""
    foreign = _foreign(connection, settings)
    if foreign is not None:
        raise ClientError("forbidden", foreign)
    if not _token_ok(settings, _bearer(connection)):
        raise ClientError("unauthorized", "missing or wrong token: send Authorization: Bearer")


async def open_websocket(
    websocket: WebSocket, settings: SettingsDep, metrics: MetricsDep
) -> AsyncIterator[WebSocket]:
    """Accept a websocket, check it, and count it as a connected client while it is open."""
    await websocket.accept()
    foreign = _foreign(websocket, settings)
    if foreign is not None:
        raise WebSocketException(status.WS_1008_POLICY_VIOLATION, foreign[:120])
    presented = _bearer(websocket) or websocket.query_params.get("token")
    if not _token_ok(settings, presented):
        raise WebSocketException(status.WS_1008_POLICY_VIOLATION, "missing or wrong token")
    if metrics.clients >= settings.max_clients:
        raise WebSocketException(status.WS_1013_TRY_AGAIN_LATER, "too many clients")
    metrics.client_connected()
    try:
        yield websocket
    finally:
        metrics.client_left()


TokenChecked = Depends(require_token)
OpenWebSocket = Annotated[WebSocket, Depends(open_websocket)]
