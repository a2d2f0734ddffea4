"""The REST routes of a running service on the looped demo: health, status, metrics, the
latest crop, task cards and step events; and a service whose source keeps failing."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import cv2
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from tests.server.conftest import DEMO_CARD, LOCAL, WS, card_upload, first_crop, wait_for


@pytest.fixture(scope="module")
def client(make_app: Callable[..., FastAPI]) -> Iterator[TestClient]:
    with TestClient(make_app(max_task_bytes=2048), base_url=LOCAL) as client:
        first_crop(client)
        yield client


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in the metrics"
    return float(match.group(1))


def test_healthz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_status_says_what_is_served_and_counts_frames(client: TestClient) -> None:
    status = client.get("/v1/status").json()
    source = status["source"]
    assert {key: source[key] for key in ("address", "kind", "state", "last_error")} == {
        "address": "synthetic:demo",
        "kind": "synthetic",
        "state": "running",
        "last_error": None,
    }
    # A replay has no device clock, and no reconnects or frames off the clock.
    assert source["clock"] is None and 0 <= source["latest_frame_age_s"] < 5
    assert source["live"]["frames_in"] > 0
    assert source["live"]["reconnects"] == source["live"]["frames_stale"] == 0
    assert status["model"]["language_model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert status["task"] == {
        "name": "Reset the control box",
        "steps": 6,
        "photos": 6,
        "warning": None,
    }
    assert status["step"]["total"] == 6 and 1 <= status["step"]["index"] <= 6
    frames = status["frames"]
    assert frames["frames_in"] >= frames["frames_processed"] - 1 > 0
    # A real-time replay drops frames only when the machine falls behind (a loaded test run).
    assert frames["frames_dropped"] < frames["frames_in"] and frames["source_restarts"] == 0
    assert status["uptime_s"] > 0
    # Where each vision model's session really runs (here and in CI: the CPU, with the reasons
    # the better tiers were skipped).
    tiers = {"engine": "TensorrtExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
    tiers |= {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
    vision = status["vision_providers"]
    assert {"ppocr-det", "ppocr-rec", "yolox-nano", "efficientnet-lite0"} <= set(vision)
    assert all(c["providers"][0] == tiers[c["tier"]] for c in vision.values())
    later = wait_for(
        lambda: (
            (s := client.get("/v1/status").json())["frames"]["frames_processed"]
            > frames["frames_processed"]
            and s
        ),
        what="more frames",
    )
    assert later["uptime_s"] > status["uptime_s"]


def test_metrics_are_prometheus_text_with_gazecam_names(client: TestClient) -> None:
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in (
        "gazecam_time_to_first_token_seconds_count",
        'gazecam_frames_dropped_total{stage="source"}',
        'gazecam_frames_dropped_total{stage="perception"}',
        "gazecam_keyframes_perceived_total",
        "gazecam_clients_connected",
    ):
        metric(text, name)
    processed = metric(text, "gazecam_frames_processed_total")
    assert processed > 0
    wait_for(
        lambda: metric(client.get("/metrics").text, "gazecam_frames_processed_total") > processed,
        what="the frames counter to increase",
    )


def test_the_latest_crop_is_a_448_px_jpeg(client: TestClient) -> None:
    response = client.get("/v1/crop.jpg")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.headers["cache-control"] == "no-store"
    assert int(response.headers["x-crop-timestamp-ns"]) > 0
    image = cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape == (448, 448, 3)


def test_step_events_move_the_step(client: TestClient) -> None:
    assert client.post("/v1/events", json={"name": "step.set:4"}).json()["step"]["index"] == 4
    moved = client.post("/v1/events", json={"name": "step.next"}).json()["step"]
    assert moved == {"index": 5, "title": "Press reset", "total": 6, "confidence": 1.0}
    assert client.post("/v1/events", json={"name": "step.back"}).json()["step"]["index"] == 4


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"name": "step.set:9"}, "expected step.next, step.back or step.set:N with N in 1..6"),
        ({"name": "recording.begin"}, "only step.next, step.back and step.set:N are taken"),
        ({"event": "step.next"}, "name: Field required"),
    ],
)
def test_bad_events_are_refused(client: TestClient, body: dict[str, str], message: str) -> None:
    response = client.post("/v1/events", json=body)
    assert response.status_code == 400
    error = response.json()
    assert error["type"] == "error" and error["code"] == "bad_request"
    assert message in error["message"]


CARD = """
name: Brew tea
steps:
  - title: Boil water
    instruction: Fill the kettle and switch it on.
    cues: {objects: ["cup"]}
  - title: Steep
    instruction: Three minutes.
"""


def test_a_task_card_is_loaded_from_yaml_text(client: TestClient) -> None:
    response = client.post("/v1/task", content=CARD, headers={"content-type": "text/yaml"})
    assert response.status_code == 200
    assert response.json()["name"] == "Brew tea" and response.json()["steps"] == 2
    status = client.get("/v1/status").json()
    assert status["task"] == {"name": "Brew tea", "steps": 2, "photos": 0, "warning": None}
    assert status["step"]["total"] == 2
    # The demo card again, for the tests that follow.
    demo = card_upload(DEMO_CARD)
    assert client.post("/v1/task", files=demo).json()["name"] == "Reset the control box"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ("name: x\n", 400, "task card: steps: Field required"),
        ("name: [unclosed\n", 400, "task card: YAML syntax error at line 2"),
        ("", 400, "task card: the task card is empty"),
        (b"\xff\xfe", 400, "task card: not UTF-8 text (byte 0)"),
        ("x" * 3000, 413, "body longer than 2048 bytes"),
    ],
)
def test_bad_task_cards_are_refused_in_one_line(
    client: TestClient, body: str | bytes, status: int, message: str
) -> None:
    response = client.post("/v1/task", content=body)
    assert response.status_code == status
    error = response.json()
    assert error["message"].startswith(message) and "\n" not in error["message"]


def test_unknown_routes_answer_with_the_error_object(client: TestClient) -> None:
    response = client.get("/v1/nothing")
    assert response.status_code == 404
    assert response.json() == {
        "type": "error",
        "id": None,
        "code": "not_found",
        "message": "Not Found",
    }


@pytest.mark.parametrize(
    ("method", "route", "allow"),
    [
        ("GET", "/v1/task", "POST"),
        ("DELETE", "/v1/status", "GET"),
        ("TRACE", "/v1/events", "POST"),
        ("TRACE", "/healthz", "GET"),
        ("POST", "/static/app.js", "GET, HEAD"),
    ],
)
def test_a_wrong_method_is_405_with_allow(
    client: TestClient, method: str, route: str, allow: str
) -> None:
    response = client.request(method, route)
    assert response.status_code == 405  # it was 400
    assert response.headers["allow"] == allow
    assert response.json() == {
        "type": "error",
        "id": None,
        "code": "method_not_allowed",
        "message": "Method Not Allowed",
    }


def test_a_body_announced_over_the_limit_is_refused_before_it_is_read(client: TestClient) -> None:
    # The 20 bytes sent are within the limit: the announced length alone refuses it.
    response = client.post("/v1/task", content=b"x" * 20, headers={"content-length": "10" * 5})
    assert response.status_code == 413
    assert response.json()["message"] == "body longer than 2048 bytes"


def test_pages_of_other_sites_are_refused(client: TestClient) -> None:
    evil = {"Origin": "http://evil.example"}
    response = client.post("/v1/events", json={"name": "step.next"}, headers=evil)
    assert response.status_code == 403
    assert response.json()["code"] == "forbidden"
    assert "http://evil.example" in response.json()["message"]
    with (
        client.websocket_connect(f"{WS}/v1/ask", headers=evil) as socket,
        pytest.raises(WebSocketDisconnect) as closed,
    ):
        socket.receive_json()
    assert closed.value.code == 1008
    # The service's own page is welcome.
    own = {"Origin": "http://127.0.0.1"}
    assert client.post("/v1/events", json={"name": "step.next"}, headers=own).status_code == 200


def test_without_a_token_only_loopback_names_are_served(client: TestClient) -> None:
    # DNS rebinding: another site's name that resolves to 127.0.0.1.
    response = client.get("/v1/status", headers={"Host": "evil.example:8000"})
    assert response.status_code == 403
    assert "without a token only loopback is served" in response.json()["message"]
    for host in ("localhost:8000", "LOCALHOST", "LocalHost.:80", "127.3.2.1", "[::ffff:127.0.0.1]"):
        assert client.get("/v1/status", headers={"Host": host}).status_code == 200, host


def test_the_web_client_is_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "<title>gazecam</title>" in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200


def test_a_failing_source_is_restarted_and_the_service_survives(
    make_app: Callable[..., FastAPI],
) -> None:
    app = make_app(source="neon://127.0.0.1:9", restart_backoff_s=0.05, restart_backoff_max_s=0.2)
    with TestClient(app, base_url=LOCAL) as client:
        status = wait_for(
            lambda: (s := client.get("/v1/status").json())["frames"]["source_restarts"] >= 3 and s,
            what="the source to be restarted",
        )
        assert status["source"]["state"] in ("starting", "restarting")
        assert "neon://127.0.0.1:9: device unreachable" in status["source"]["last_error"]
        assert client.get("/healthz").status_code == 200
        response = client.get("/v1/crop.jpg")
        assert response.status_code == 503
        assert response.json()["code"] == "not_ready"
        # Asks do not wait for capture: they are told at once that the glasses are not
        # connected (tests/server/test_outage.py).
        with client.websocket_connect(f"{WS}/v1/ask") as socket:
            socket.send_json({"type": "ask", "id": "a", "question": "what step am I on?"})
            assert socket.receive_json()["code"] == "not_ready"
