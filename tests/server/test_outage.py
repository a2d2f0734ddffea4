"""During a source outage an ask is told that the glasses are not connected (since when, and
the last error), instead of being answered from what was seen before."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from gazecam.server.runtime import Runtime
from tests.server.conftest import LOCAL, WS, first_crop, wait_for


def ask_once(client: TestClient, request_id: str) -> dict[str, Any]:
    """The final frame (answer or error) of one ask on a new socket."""
    with client.websocket_connect(f"{WS}/v1/ask") as socket:
        socket.send_json({"type": "ask", "id": request_id, "question": "What step am I on?"})
        frame: dict[str, Any] = socket.receive_json()
        while frame["type"] == "token":
            frame = socket.receive_json()
    return frame


def test_unreachable_glasses_are_said_to_be_not_connected(
    make_app: Callable[..., FastAPI],
) -> None:
    app = make_app(source="neon://127.0.0.1:9", restart_backoff_s=0.05, restart_backoff_max_s=0.2)
    with TestClient(app, base_url=LOCAL) as client:
        wait_for(
            lambda: client.get("/v1/status").json()["frames"]["source_restarts"] >= 2,
            what="the source to be restarted",
        )
        frame = ask_once(client, "a")
        assert frame["type"] == "error" and frame["code"] == "not_ready" and frame["id"] == "a"
        assert re.match(
            r"the glasses are not connected \(neon://127\.0\.0\.1:9: (starting|restarting), "
            r"no frame yet for \d+ s; last error: neon://127\.0\.0\.1:9: device unreachable",
            frame["message"],
        ), frame["message"]
        assert frame["message"].endswith("ask again once it is back")
        metrics = client.get("/metrics").text
        assert 'gazecam_asks_total{outcome="not_ready"} 1.0' in metrics


def test_a_source_that_went_down_is_not_answered_from_stale_memory(
    make_app: Callable[..., FastAPI],
) -> None:
    app = make_app()
    with TestClient(app, base_url=LOCAL) as client:
        first_crop(client)
        assert ask_once(client, "up")["type"] == "answer"
        runtime: Runtime = app.state.runtime
        assert client.portal is not None  # set while the client runs the app
        client.portal.call(runtime.pipeline.stop)
        status = client.get("/v1/status").json()
        assert status["source"]["state"] == "stopped"
        assert status["model"]["regions_in_memory"] > 0  # what it could have answered from
        frame = ask_once(client, "down")
        assert frame["code"] == "not_ready", frame
        assert re.match(
            r"the source is not running \(synthetic:demo: stopped, no frame for \d+ s\)",
            frame["message"],
        ), frame["message"]
