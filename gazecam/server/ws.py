"""The websockets: ``/v1/ask`` (questions in, streamed answers out) and ``/v1/live`` (state).

On ``/v1/ask`` a socket reads on while its answer streams, so a message that comes meanwhile
is answered at once: with an error, or ``busy`` for a second ask (each socket has at most one
ask under way; across sockets, asks wait their turn for the generation thread, within the
queue's bounds: beyond them an ask gets ``busy`` with its queue position, see runtime.py).
Each socket is one conversation: a follow-up resolves against that socket's previous answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from gazecam.assist.answers import Conversation
from gazecam.assist.assistant import Answer
from gazecam.server.deps import MetricsDep, OpenWebSocket, RateLimiterDep, RuntimeDep, SettingsDep
from gazecam.server.errors import ClientError, client_error
from gazecam.server.metrics import Metrics
from gazecam.server.protocol import (
    AskMessage,
    RateLimiter,
    decode_message,
    parse_ask,
    request_id,
)
from gazecam.server.runtime import Runtime
from gazecam.server.settings import ServerSettings

router = APIRouter()


class AskSession:
    """One ``/v1/ask`` socket: reads messages, runs at most one ask at a time, sends replies."""

    def __init__(
        self,
        websocket: WebSocket,
        runtime: Runtime,
        settings: ServerSettings,
        metrics: Metrics,
        limiter: RateLimiter,
    ) -> None:
        self._ws = websocket
        self._runtime = runtime
        self._settings = settings
        self._metrics = metrics
        self._limiter = limiter
        self._client = RateLimiter.client_key(websocket.client)
        self._send_lock = asyncio.Lock()  # replies of an answer and of errors never interleave
        # The ask whose answer (or error) is not out yet: the socket is busy until it is. Its
        # task may still be finishing after that, so tasks are kept apart.
        self._open_ask: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # The socket's own history: a follow-up ("and after that?") resolves against it.
        self._conversation = Conversation()

    async def run(self) -> None:
        """Serve the socket until the client leaves; an answer under way is then stopped."""
        try:
            while True:
                message = await self._ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                await self._take(message.get("text"), message.get("bytes"))
        except WebSocketDisconnect:
            return  # gone while we replied: nothing more to do for this client
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _send(self, frame: dict[str, Any]) -> None:
        async with self._send_lock:
            await self._ws.send_json(frame)

    async def _take(self, text: str | None, data: bytes | None) -> None:
        message_id: str | None = None
        try:
            message = decode_message(text, data, self._settings.max_message_bytes)
            message_id = request_id(message)
            ask = parse_ask(message)
            if self._open_ask is not None:
                raise ClientError("busy", "an answer on this socket is under way: wait for it")
            self._limiter.take(self._client)
        except (ClientError, ValidationError) as exc:
            error = client_error(exc)
            self._metrics.asks.labels(error.code).inc()
            await self._send(error.frame(message_id))
            return
        self._open_ask = ask.id
        task = asyncio.create_task(self._answer(ask))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, ask: AskMessage) -> None:
        answer = self._runtime.ask(
            ask.question, self._metrics.ask_queue_wait.observe, self._conversation
        )
        try:
            async with contextlib.aclosing(self._metrics.metered(answer)) as pieces:
                async for piece in pieces:
                    if isinstance(piece, Answer):
                        self._open_ask = None  # a client may ask again as soon as it has this
                        await self._send({"type": "answer", "id": ask.id, **piece.to_json()})
                    else:
                        await self._send({"type": "token", "id": ask.id, "text": piece})
        except WebSocketDisconnect:
            pass  # counted as disconnected, unless the answer was out already
        except Exception as exc:
            error = client_error(exc)
            self._open_ask = None
            with contextlib.suppress(WebSocketDisconnect):  # gone meanwhile: nobody to tell
                await self._send(error.frame(ask.id))


@router.websocket("/v1/ask")
async def ask_socket(
    websocket: OpenWebSocket,
    runtime: RuntimeDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    limiter: RateLimiterDep,
) -> None:
    """Questions in, streamed answers out (see docs/protocol.md)."""
    await AskSession(websocket, runtime, settings, metrics, limiter).run()


async def _until_closed(websocket: WebSocket) -> None:
    # Nothing is read from /v1/live but the close; what clients send is dropped unread.
    while (await websocket.receive())["type"] != "websocket.disconnect":
        pass


@router.websocket("/v1/live")
async def live_socket(websocket: OpenWebSocket, runtime: RuntimeDep, settings: SettingsDep) -> None:
    """The live state, pushed when it changes, at most ``live_rate_hz`` times a second."""
    period_s = 1.0 / settings.live_rate_hz
    closed = asyncio.create_task(_until_closed(websocket))
    sent: dict[str, Any] | None = None
    try:
        while not closed.done():
            state = runtime.live_state()
            if state != sent:
                await websocket.send_json(state)
                sent = state
            await asyncio.wait({closed}, timeout=period_s)
    except WebSocketDisconnect:
        return
    finally:
        closed.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await closed
