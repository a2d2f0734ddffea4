"""The HTTP routes: health, status, the latest crop, task cards, step events, metrics, the
OpenAPI schema, and the web client (see docs/protocol.md)."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncGenerator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from gazecam.assist.tasks import MAX_STEP_PHOTOS, MAX_STEPS, TaskCard
from gazecam.server.deps import MetricsDep, RuntimeDep, SettingsDep, TokenChecked, get_settings
from gazecam.server.errors import ClientError, error_responses
from gazecam.server.protocol import EventMessage

STATIC_DIR = Path(__file__).parent / "static"

public = APIRouter()
api = APIRouter(
    dependencies=[TokenChecked], responses=error_responses("unauthorized", "forbidden", "internal")
)
# What the routes that take a body may answer besides their result.
_BODY_ERRORS = error_responses("bad_request", "timeout", "too_large")


@public.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process serves requests."""
    return {"status": "ok"}


@public.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The web client (code only; every piece of data it shows comes through the API)."""
    return FileResponse(STATIC_DIR / "index.html")


@api.get("/v1/status")
async def status(runtime: RuntimeDep) -> dict[str, Any]:
    """Source, model, task, step, frame counters and uptime."""
    return runtime.status()


@api.get(
    "/v1/crop.jpg",
    response_class=Response,
    responses={
        200: {"content": {"image/jpeg": {}}, "description": "The crop (448×448 JPEG)."},
        **error_responses("not_ready"),
    },
)
async def crop_jpeg(runtime: RuntimeDep) -> Response:
    """The latest keyframe's foveal crop (503 before the first)."""
    crop, jpeg = await runtime.crop_jpeg()
    headers = {
        "Cache-Control": "no-store",
        "X-Crop-Timestamp-Ns": str(crop.matched.frame.timestamp_ns),
    }
    return Response(jpeg, media_type="image/jpeg", headers=headers)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused as soon as it is longer than ``max_bytes`` (before reading a
    byte where its Content-Length says so), or when it has not all come within the body
    timeout (a client announcing more than it sends would hold the connection for ever)."""
    timeout_s = get_settings(request).body_timeout_s
    # The rest of a body refused is not read: the connection closes with the answer.
    close = {"Connection": "close"}
    too_large = ClientError("too_large", f"body longer than {max_bytes} bytes", close)
    announced = request.headers.get("content-length", "")
    if announced.isdigit() and int(announced) > max_bytes:
        raise too_large
    body = bytearray()
    with anyio.move_on_after(timeout_s) as reading:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise too_large
    if reading.cancelled_caught:
        raise ClientError("timeout", f"body not received within {timeout_s:g} s", close)
    return bytes(body)


_CARD_PART = "card"


@api.post(
    "/v1/task",
    responses=_BODY_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "A task card's YAML text (UTF-8), at most GAZECAM_MAX_TASK_BYTES; "
            "or, as multipart/form-data, the card in the part 'card' and each photo it names "
            "in a part named as the card names it, at most GAZECAM_MAX_TASK_UPLOAD_BYTES.",
            "content": {
                **{
                    media: {"schema": {"type": "string"}}
                    for media in ("application/yaml", "text/plain")
                },
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {_CARD_PART: {"type": "string"}},
                        "required": [_CARD_PART],
                        "additionalProperties": {"type": "string", "format": "binary"},
                    }
                },
            },
        }
    },
)
async def load_task(request: Request, runtime: RuntimeDep, settings: SettingsDep) -> dict[str, Any]:
    """Load a task card sent as YAML text, or with its photos as multipart/form-data (never a
    path on the server)."""
    photos: dict[str, bytes] = {}
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        body = await read_body(request, settings.max_task_upload_bytes)
        body, photos = await _card_and_photos(request, body, settings.max_task_bytes)
    else:
        body = await read_body(request, settings.max_task_bytes)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ClientError("bad_request", f"task card: not UTF-8 text (byte {exc.start})") from exc

    def read_photo(name: str) -> bytes:
        if name not in photos:
            raise FileNotFoundError(errno.ENOENT, "no uploaded part of that name")
        return photos[name]

    # Parsing up to max_task_bytes of YAML, and decoding photos, take a while: not on the loop.
    card = await asyncio.to_thread(TaskCard.from_yaml_text, text, "task card", read_photo)
    unnamed = sorted(set(photos) - {name for step in card.steps for name in step.cues.images})
    if unnamed:
        raise ClientError("bad_request", f"task card: no step names the photo {unnamed[0]!r}")
    await runtime.load_card(card)
    return {"name": card.name, "steps": len(card.steps), "step": asdict(runtime.step())}


async def _card_and_photos(
    request: Request, body: bytes, max_card_bytes: int
) -> tuple[bytes, dict[str, bytes]]:
    """The card's YAML and the photos, by part name, of a multipart/form-data ``body``."""

    async def chunks() -> AsyncGenerator[bytes, None]:
        yield body

    parser = MultiPartParser(
        request.headers,
        chunks(),
        max_files=MAX_STEPS * MAX_STEP_PHOTOS,
        max_fields=1,
        max_part_size=max_card_bytes,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ClientError("bad_request", f"task card upload: {exc.message}") from exc
    parts: dict[str, bytes] = {}
    try:
        for name, value in form.multi_items():
            if name in parts:
                raise ClientError("bad_request", f"task card upload: two parts named {name!r}")
            parts[name] = await value.read() if isinstance(value, UploadFile) else value.encode()
    finally:
        await form.close()
    card = parts.pop(_CARD_PART, None)
    if card is None:
        raise ClientError("bad_request", f"task card upload: no part named {_CARD_PART!r}")
    if len(card) > max_card_bytes:
        raise ClientError("too_large", f"task card: longer than {max_card_bytes} bytes")
    return card, parts


@api.post(
    "/v1/events",
    responses=_BODY_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": EventMessage.model_json_schema()}},
        }
    },
)
async def post_event(
    request: Request, runtime: RuntimeDep, settings: SettingsDep
) -> dict[str, Any]:
    """Apply a step event, ``{"name": "step.next"}``: step.next, step.back or step.set:N."""
    body = await read_body(request, settings.max_message_bytes)
    event = EventMessage.model_validate_json(body)
    return {"step": asdict(await runtime.apply_event(event.name))}


@api.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
)
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus metrics (text exposition format)."""
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


@api.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> JSONResponse:
    """This service's OpenAPI schema (behind the token like the routes it describes)."""
    return JSONResponse(request.app.openapi())
