"""/v1/ask and /v1/live through FastAPI's TestClient: streamed answers, errors that keep the
socket open, busy sockets, the token, and the rate limit."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketTestSession
from starlette.websockets import WebSocketDisconnect

from tests.server.conftest import LOCAL, TOKEN, WS, first_crop


@pytest.fixture(scope="module")
def client(make_app: Callable[..., FastAPI]) -> Iterator[TestClient]:
    with TestClient(make_app(), base_url=LOCAL) as client:
        first_crop(client)
        yield client


def answer(socket: WebSocketTestSession, request_id: str) -> tuple[list[str], dict[str, Any]]:
    """The token texts and the answer frame of one ask, every frame checked for its id."""
    tokens: list[str] = []
    while True:
        frame = socket.receive_json()
        assert frame["id"] == request_id, frame
        if frame["type"] == "answer":
            return tokens, frame
        assert frame["type"] == "token", frame
        tokens.append(frame["text"])


def ask(socket: WebSocketTestSession, request_id: str, question: str) -> None:
    socket.send_json({"type": "ask", "id": request_id, "question": question})


def test_an_answer_streams_tokens_then_the_answer(client: TestClient) -> None:
    before = client.get("/v1/status").json()["step"]["index"]
    with client.websocket_connect(f"{WS}/v1/ask") as socket:
        ask(socket, "q1", "What step am I on?")
        tokens, frame = answer(socket, "q1")
    after = client.get("/v1/status").json()["step"]["index"]
    # The fact sentence, then the model's words where they add no fact.
    assert tokens[0] == f"You are on step {frame['step']['index']} of 6: {frame['step']['title']}."
    assert "".join(tokens).strip() == frame["text"]
    assert frame["intent"] == "current_step" and frame["sources"] == ["tracker", "card"]
    step = frame["step"]
    assert step["index"] in (before, after) and step["total"] == 6
    assert set(frame["timings"]) >= {"ttft_ms", "tpot_ms", "e2e_ms", "prompt_tokens"}
    crop = frame["crop"]
    x0, y0, x1, y1 = crop["box"]
    assert (x1 - x0, y1 - y0) == (448, 448) and crop["timestamp_ns"] > 0
    assert x0 <= crop["gaze"][0] <= x1 and y0 <= crop["gaze"][1] <= y1


def test_the_answer_reports_the_step_an_event_set(client: TestClient) -> None:
    client.post("/v1/events", json={"name": "step.set:6"})
    with client.websocket_connect(f"{WS}/v1/ask") as socket:
        ask(socket, "next", "what's next?")
        _, frame = answer(socket, "next")
    tracker = client.get("/v1/status").json()["step"]
    if frame["step"]["index"] == 6:  # a keyframe may have moved it since: then it says so
        assert frame["text"].startswith("Step 6 of 6, Close cover, is the last step.")
    assert frame["step"]["index"] in (6, tracker["index"])


def about_step(text: str) -> int:
    """The step an answer is about: the first "step N of 6" it names."""
    match = re.search(r"[Ss]tep (\d) of 6", text)
    assert match is not None, text
    return int(match[1])


def test_each_socket_is_its_own_conversation(client: TestClient) -> None:
    client.post("/v1/events", json={"name": "step.set:3"})
    with (
        client.websocket_connect(f"{WS}/v1/ask") as first,
        client.websocket_connect(f"{WS}/v1/ask") as second,
    ):
        ask(first, "a1", "what's next?")
        ask(second, "b1", "what was the previous step?")
        abouts = [about_step(answer(first, "a1")[1]["text"])]
        abouts.append(about_step(answer(second, "b1")[1]["text"]))
        assert abouts[0] > abouts[1]  # next and previous of (about) the same step
        for socket, request_id, about in zip((first, second), ("a2", "b2"), abouts, strict=True):
            ask(socket, request_id, "and after that?")
            _, frame = answer(socket, request_id)
            # Each follows its own socket's previous answer, not the other's.
            assert frame["text"].startswith(f"After step {about} comes step {about + 1} of 6")
            assert frame["intent"] == "follow_up" and frame["sources"] == ["conversation", "card"]
    with client.websocket_connect(f"{WS}/v1/ask") as fresh:  # a new socket has no history
        ask(fresh, "c1", "why?")
        assert answer(fresh, "c1")[1]["text"] == "I can't tell from what I've seen."


@pytest.mark.parametrize(
    ("message", "request_id", "error"),
    [
        ("{not json", None, "not JSON"),
        ('{"type": "hello", "id": "h1"}', "h1", "unknown message type 'hello': expected 'ask'"),
        ('{"type": "ask", "id": "m1"}', "m1", "question: Field required"),
        ('{"type": "ask", "question": "hi"}', None, "id: Field required"),
        (json.dumps({"type": "ask", "id": "o1", "question": "x" * 5000}), None, "at most 4096"),
        ('{"type": "ask", "id": "e1", "question": "   "}', "e1", "question: empty"),
        (
            json.dumps({"type": "ask", "id": "l1", "question": "w" * 600}),
            "l1",
            "question: 600 characters, at most 500 are taken",
        ),
        # Nesting that made json.loads raise RecursionError, which dropped the socket (1006).
        ("[" * 4000, None, "not JSON: recursion limit exceeded"),
        # Escaped lone surrogates: an id that could not be echoed dropped the socket; a
        # question got "internal" after its first token. The id is not echoed: it is not text.
        ('{"type": "ask", "id": "\\ud800", "question": "hi"}', None, "escapes come in pairs"),
        ('{"type": "ask", "id": "s1", "question": "hi \\ud800"}', None, "escapes come in pairs"),
    ],
)
def test_bad_messages_get_an_error_and_the_socket_stays_open(
    client: TestClient, message: str, request_id: str | None, error: str
) -> None:
    with client.websocket_connect(f"{WS}/v1/ask") as socket:
        socket.send_text(message)
        frame = socket.receive_json()
        assert frame["type"] == "error" and frame["code"] == "bad_request", frame
        assert frame["id"] == request_id and error in frame["message"]
        socket.send_bytes(b"\x00")
        assert "send JSON text messages" in socket.receive_json()["message"]
        ask(socket, "after", "what step am I on?")
        _, frame = answer(socket, "after")
        assert frame["text"].startswith("You are on step")


def test_a_second_ask_on_a_busy_socket_is_refused(client: TestClient) -> None:
    with client.websocket_connect(f"{WS}/v1/ask") as socket:
        ask(socket, "first", "what step am I on?")
        ask(socket, "second", "what am I looking at?")
        frames = [socket.receive_json()]
        while frames[-1]["type"] != "answer":
            frames.append(socket.receive_json())
        busy = [f for f in frames if f["id"] == "second"]
        assert busy == [
            {
                "type": "error",
                "id": "second",
                "code": "busy",
                "message": "an answer on this socket is under way: wait for it",
            }
        ]
        assert {f["id"] for f in frames if f["type"] != "error"} == {"first"}
        # Once the answer is out, the socket takes the next ask.
        ask(socket, "third", "what step am I on?")
        assert answer(socket, "third")[1]["type"] == "answer"


def test_live_pushes_states_several_times_a_second(client: TestClient) -> None:
    with client.websocket_connect(f"{WS}/v1/live") as socket:
        started = time.monotonic()
        states = [socket.receive_json() for _ in range(3)]
        elapsed_s = time.monotonic() - started
    assert elapsed_s < 1.0
    assert all(s["type"] == "state" and s["source"] == "running" for s in states)
    times = [s["frame_timestamp_ns"] for s in states]
    assert times == sorted(times) and len(set(times)) == 3
    last = states[-1]
    assert set(last) >= {"gaze", "gaze_status", "fixation", "step", "crop"}
    assert last["step"]["total"] == 6 and last["crop"]["timestamp_ns"] <= times[-1]


BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def guarded(make_app: Callable[..., FastAPI]) -> Iterator[TestClient]:
    """A service with a token, and at most two asks a minute per client; ready to answer
    (an ask before its first perceived keyframe is refused as not_ready)."""
    with TestClient(make_app(token=TOKEN, asks_per_minute=2)) as client:
        first_crop(client, headers=BEARER)
        yield client


@pytest.mark.parametrize("route", ["/v1/status", "/v1/crop.jpg", "/metrics", "/openapi.json"])
def test_a_token_is_needed_for_every_route_but_health(guarded: TestClient, route: str) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token-0123456789"},
        {"Authorization": TOKEN},
    ):
        response = guarded.get(route, headers=headers)
        assert response.status_code == 401
        assert response.json()["code"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
    assert guarded.get(route, headers=BEARER).status_code in (200, 503)  # 503: no crop yet
    assert guarded.post("/v1/events", json={"name": "step.next"}).status_code == 401
    assert guarded.post("/v1/task", content="name: x").status_code == 401
    assert guarded.get("/healthz").status_code == 200


@pytest.mark.parametrize("route", ["/docs", "/redoc", "/docs/oauth2-redirect"])
def test_the_docs_pages_are_off(guarded: TestClient, route: str) -> None:
    # They answered without the token; the schema they showed is behind it (above).
    for headers in ({}, BEARER):
        response = guarded.get(route, headers=headers)
        assert response.status_code == 404 and response.json()["code"] == "not_found"
    assert guarded.get("/openapi.json", headers=BEARER).json()["info"]["title"] == "gazecam"


@pytest.mark.parametrize("route", ["/v1/ask", "/v1/live"])
def test_websockets_without_the_token_are_closed_with_1008(guarded: TestClient, route: str) -> None:
    for query in ("", "?token=wrong-token-0123456789"):
        with (
            guarded.websocket_connect(route + query) as socket,
            pytest.raises(WebSocketDisconnect) as closed,
        ):
            socket.receive_json()
        assert closed.value.code == 1008


def test_the_token_may_come_as_a_header_or_in_the_query(guarded: TestClient) -> None:
    with guarded.websocket_connect("/v1/live", headers=BEARER) as socket:
        assert socket.receive_json()["type"] == "state"
    with guarded.websocket_connect(f"/v1/live?token={TOKEN}") as socket:
        assert socket.receive_json()["type"] == "state"


def test_asks_beyond_the_rate_limit_are_refused(guarded: TestClient) -> None:
    with guarded.websocket_connect(f"/v1/ask?token={TOKEN}") as socket:
        for n in range(2):
            ask(socket, f"ok{n}", "what step am I on?")
            answer(socket, f"ok{n}")
        ask(socket, "over", "what step am I on?")
        frame = socket.receive_json()
        assert frame["code"] == "rate_limited" and frame["id"] == "over"
        assert frame["message"].startswith("at most 2 asks a minute: try again in")
    metrics = guarded.get("/metrics", headers=BEARER).text
    assert 'gazecam_asks_total{outcome="rate_limited"} 1.0' in metrics
    assert 'gazecam_asks_total{outcome="answered"} 2.0' in metrics
