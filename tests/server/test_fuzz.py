"""Both websockets fuzzed with generated frames on the service on uvicorn: random JSON, deep
nesting, messages over the size limit, binary and bad UTF-8, escaped lone surrogates, asks
with wrong types, and valid asks mixed in. After every frame the server has answered with a
well-formed frame (on /v1/ask) or goes on pushing states (/v1/live), on the same socket; at
the end the service still answers an ask."""

from __future__ import annotations

import json
import typing
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import ClientConnection, connect

from gazecam.server.errors import ErrorCode
from tests.server.conftest import first_keyframe, uvicorn_server, wait_for

CODES = set(typing.get_args(ErrorCode))
QUESTIONS = ("What step am I on?", "What am I looking at?", "What's next?")
# A valid ask costs an answer (~0.1-0.5 s): one kind of frame in nine below is one.
FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
Frame = str | bytes

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
surrogate = st.integers(0xD800, 0xDFFF).map(lambda code: f"\\u{code:04x}")
junk: list[st.SearchStrategy[Frame]] = [
    json_values.map(json.dumps),
    st.text(max_size=300),
    # Asks whose fields have the wrong types, or none.
    st.fixed_dictionaries(
        {},
        optional={"type": st.just("ask") | json_values, "id": json_values, "question": json_values},
    ).map(json.dumps),
    # Nesting, closed or not: json.loads recursed until RecursionError on it.
    st.tuples(
        st.sampled_from([("[", "]"), ('{"a":', "}")]), st.integers(1, 800), st.booleans()
    ).map(lambda t: t[0][0] * t[1] + ("0" + t[0][1] * t[1] if t[2] else "")),
    # Over the message limit (4096 bytes) but under the transport's (1 MiB, which closes).
    st.integers(4097, 200_000).map(lambda n: json.dumps({"type": "ask", "id": "h", "q": "x" * n})),
    st.binary(max_size=300),  # bad UTF-8 among them: binary frames are refused whatever
    # Escaped lone surrogates (not text), in the id or the question.
    st.tuples(surrogate, st.booleans()).map(
        lambda t: json.dumps({"type": "ask", "id": "s", "question": "hi"}).replace(
            '"s"' if t[1] else '"hi"', f'"{t[0]}"'
        )
    ),
]
valid_ask = st.fixed_dictionaries(
    {
        "type": st.just("ask"),
        "id": st.text(min_size=1, max_size=100),
        "question": st.sampled_from(QUESTIONS),
    }
).map(json.dumps)
# (whether it is a valid ask, the frame); each kind of frame equally likely.
frames = st.one_of(
    *(kind.map(lambda frame: (False, frame)) for kind in junk),
    valid_ask.map(lambda frame: (True, frame)),
)


@pytest.fixture(scope="module")
def server(make_app: Callable[..., FastAPI]) -> Iterator[str]:
    # The rate limit lifted: the valid asks among the frames are answered.
    with uvicorn_server(make_app(asks_per_minute=100_000)) as address:
        first_keyframe(address)  # a valid ask before it is refused as not_ready
        yield address


def open_socket(server: str, route: str) -> ClientConnection:
    return connect(f"ws://{server}{route}", max_size=None, proxy=None)


def check_error(frame: dict[str, Any]) -> None:
    assert set(frame) == {"type", "id", "code", "message"}, frame
    assert frame["code"] in CODES and isinstance(frame["message"], str) and frame["message"]
    assert frame["id"] is None or isinstance(frame["id"], str)


def replies(socket: ClientConnection) -> list[dict[str, Any]]:
    """The frames that answer one message: an error, or tokens and the answer."""
    received: list[dict[str, Any]] = []
    while not received or received[-1]["type"] == "token":
        frame = json.loads(socket.recv(timeout=60))
        if frame["type"] == "error":
            check_error(frame)
        elif frame["type"] == "token":
            assert set(frame) == {"type", "id", "text"} and isinstance(frame["text"], str)
        else:
            assert frame["type"] == "answer", frame
            assert {"text", "step", "timings", "crop"} <= set(frame), frame
        received.append(frame)
    return received


def ask_is_answered(socket: ClientConnection, request_id: str) -> None:
    socket.send(json.dumps({"type": "ask", "id": request_id, "question": QUESTIONS[0]}))
    answer = replies(socket)[-1]
    assert answer["type"] == "answer" and answer["id"] == request_id, answer


def test_ask_answers_every_generated_frame_on_the_same_socket(server: str) -> None:
    with open_socket(server, "/v1/ask") as socket:

        @settings(FUZZ, max_examples=200)
        @given(tagged=frames)
        def answers(tagged: tuple[bool, Frame]) -> None:
            valid, frame = tagged
            socket.send(frame)
            received = replies(socket)
            last = received[-1]
            if last["type"] == "error":
                # Never "internal": whatever a client sends is its own bad request.
                assert len(received) == 1 and last["code"] == "bad_request", (frame, received)
            else:  # an ask that was one (some generated asks with random fields are)
                assert isinstance(frame, str) and last["id"] == json.loads(frame)["id"]
                assert {f["id"] for f in received} == {last["id"]}
            if valid:
                assert last["type"] == "answer", (frame, received)

        answers()
        ask_is_answered(socket, "after-the-fuzz")
    with open_socket(server, "/v1/ask") as fresh:
        ask_is_answered(fresh, "a-new-socket")


def test_live_goes_on_pushing_whatever_it_is_sent(server: str) -> None:
    with open_socket(server, "/v1/live") as socket:

        @settings(FUZZ, max_examples=100)
        @given(tagged=frames)
        def goes_on(tagged: tuple[bool, Frame]) -> None:
            socket.send(tagged[1])
            # What was pushed before the frame, then one state pushed after it.
            while True:
                try:
                    socket.recv(timeout=0)
                except TimeoutError:
                    break
            assert json.loads(socket.recv(timeout=10))["type"] == "state"

        goes_on()
    with open_socket(server, "/v1/ask") as fresh:
        ask_is_answered(fresh, "after-live")


def test_a_text_frame_that_is_not_utf8_closes_only_its_socket(server: str) -> None:
    # The websocket protocol requires this close (1007); the service goes on.
    with open_socket(server, "/v1/ask") as socket:
        socket.send(b'{"type": "ask", "id": "\xff", "question": "hi"}', text=True)
        closed = wait_for(lambda: socket.close_code, 10, "the socket to close")
        assert closed == 1007
    with open_socket(server, "/v1/ask") as fresh:
        ask_is_answered(fresh, "after-bad-utf8")
