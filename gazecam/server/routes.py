"""The HTTP routes: health, status, the latest crop, task cards, step events, metrics, and the
web client (see docs/protocol.md)."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from prometheus_client import CONTENT_TYPE_LATEST

from gazecam.server.deps import MetricsDep, RuntimeDep, SettingsDep, TokenChecked
from gazecam.server.errors import ClientError
from gazecam.server.protocol import EventMessage
from gazecam.tasks import TaskCard

STATIC_DIR = Path(__file__).parent / "static"

public = APIRouter()
api = APIRouter(dependencies=[TokenChecked])


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


@api.get("/v1/crop.jpg", response_class=Response)
async def crop_jpeg(runtime: RuntimeDep) -> Response:
    """The latest keyframe's foveal crop (503 before the first)."""
    crop, jpeg = await runtime.crop_jpeg()
    headers = {
        "Cache-Control": "no-store",
        "X-Crop-Timestamp-Ns": str(crop.matched.frame.timestamp_ns),
    }
    return Response(jpeg, media_type="image/jpeg", headers=headers)


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused as soon as it is longer than ``max_bytes``."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise ClientError("too_large", f"body longer than {max_bytes} bytes")
    return bytes(body)


@api.post("/v1/task")
async def load_task(request: Request, runtime: RuntimeDep, settings: SettingsDep) -> dict[str, Any]:
    """Load a task card sent as YAML text (the body; never a path on the server)."""
    body = await _read_body(request, settings.max_task_bytes)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ClientError("bad_request", f"task card: not UTF-8 text (byte {exc.start})") from exc
    # Parsing up to max_task_bytes of YAML takes a while: not on the event loop.
    card = await asyncio.to_thread(TaskCard.from_yaml_text, text, "task card")
    await runtime.load_card(card)
    return {"name": card.name, "steps": len(card.steps), "step": asdict(runtime.step())}


@api.post("/v1/events")
async def post_event(
    request: Request, runtime: RuntimeDep, settings: SettingsDep
) -> dict[str, Any]:
    """Apply a step event, ``{"name": "step.next"}``: step.next, step.back or step.set:N."""
    body = await _read_body(request, settings.max_message_bytes)
    event = EventMessage.model_validate_json(body)
    return {"step": asdict(await runtime.apply_event(event.name))}


@api.get("/metrics", response_class=Response)
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus metrics (text exposition format)."""
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
