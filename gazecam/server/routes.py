"""The HTTP routes: health, status, the latest crop, task cards, step events, metrics, the
OpenAPI schema, and the web client (see docs/protocol.md)."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from gazecam.server.deps import MetricsDep, RuntimeDep, SettingsDep, TokenChecked, get_settings
from gazecam.server.errors import ClientError, error_responses
from gazecam.server.protocol import EventMessage
from gazecam.tasks import TaskCard

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


@api.post(
    "/v1/task",
    responses=_BODY_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "A task card's YAML text (UTF-8), at most GAZECAM_MAX_TASK_BYTES.",
            "content": {
                media: {"schema": {"type": "string"}}
                for media in ("application/yaml", "text/plain")
            },
        }
    },
)
async def load_task(request: Request, runtime: RuntimeDep, settings: SettingsDep) -> dict[str, Any]:
    """Load a task card sent as YAML text (the body; never a path on the server)."""
    body = await read_body(request, settings.max_task_bytes)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ClientError("bad_request", f"task card: not UTF-8 text (byte {exc.start})") from exc
    # Parsing up to max_task_bytes of YAML takes a while: not on the event loop.
    card = await asyncio.to_thread(TaskCard.from_yaml_text, text, "task card")
    await runtime.load_card(card)
    return {"name": card.name, "steps": len(card.steps), "step": asdict(runtime.step())}


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
