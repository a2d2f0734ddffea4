"""The service on uvicorn (127.0.0.1) with real websocket clients: eight clients asking at
once each get their own answer, the live state streams, oversized messages are handled; and
raw HTTP clients that lie about their bodies."""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import websockets
from fastapi import FastAPI

from tests.server.conftest import first_keyframe, uvicorn_server

CLIENTS = 8
QUESTIONS = (
    "What step am I on?",
    "What am I looking at?",
    "What's next?",
    "What did I just read?",
    "Is the fuse dark?",
    "What do you see?",
    "Which step comes after this one?",
    "Where is the cable?",
)


BODY_TIMEOUT_S = 1.0


def get(url: str) -> str:
    """The body of a GET, as text."""
    with urllib.request.urlopen(url) as response:
        return str(response.read().decode())


@pytest.fixture(scope="module")
def server(make_app: Callable[..., FastAPI]) -> Iterator[str]:
    # Every ask here must be answered, however slow the machine: the queue's bounds are
    # tested in test_capacity.py.
    with uvicorn_server(make_app(body_timeout_s=BODY_TIMEOUT_S, ask_queue_wait_s=600)) as address:
        first_keyframe(address)
        yield address


async def ask_once(address: str, request_id: str, question: str) -> dict[str, Any]:
    """One client: connect, ask, collect its frames; times in seconds from the ask."""
    async with websockets.connect(f"ws://{address}/v1/ask") as socket:
        sent = time.perf_counter()
        await socket.send(json.dumps({"type": "ask", "id": request_id, "question": question}))
        frames: list[dict[str, Any]] = []
        first_s = None
        while not frames or frames[-1]["type"] == "token":
            frames.append(json.loads(await asyncio.wait_for(socket.recv(), 60)))
            first_s = first_s or time.perf_counter() - sent
        return {"frames": frames, "first_s": first_s, "total_s": time.perf_counter() - sent}


async def test_eight_clients_at_once_each_get_their_own_answer(server: str) -> None:
    started = time.perf_counter()
    results = await asyncio.gather(
        *(ask_once(server, f"client-{n}", QUESTIONS[n]) for n in range(CLIENTS))
    )
    wall_s = time.perf_counter() - started
    for n, result in enumerate(results):
        frames = result["frames"]
        assert {f["id"] for f in frames} == {f"client-{n}"}, frames
        final = frames[-1]
        assert final["type"] == "answer", final
        assert "".join(f["text"] for f in frames[:-1]).strip() == final["text"]
    # One generation at a time: the answers came one after another, not interleaved.
    e2e_s = sorted(r["frames"][-1]["timings"]["e2e_ms"] / 1e3 for r in results)
    assert wall_s >= sum(e2e_s) * 0.9
    totals = sorted(r["total_s"] for r in results)
    firsts = [r["first_s"] for r in results]
    print(
        f"\n{CLIENTS} clients at once: wall {wall_s:.2f} s; first piece median "
        f"{statistics.median(firsts) * 1e3:.0f} ms, max {max(firsts) * 1e3:.0f} ms; answer "
        f"median {statistics.median(totals) * 1e3:.0f} ms, max {totals[-1] * 1e3:.0f} ms; "
        f"model e2e median {statistics.median(e2e_s) * 1e3:.0f} ms"
    )
    metrics = await asyncio.to_thread(get, f"http://{server}/metrics")
    assert f'gazecam_asks_total{{outcome="answered"}} {CLIENTS}.0' in metrics
    assert f"gazecam_time_to_first_token_seconds_count {CLIENTS}.0" in metrics


async def test_one_client_asking_alone(server: str) -> None:
    result = await ask_once(server, "solo", "What step am I on?")
    timings = result["frames"][-1]["timings"]
    print(
        f"\none client: first piece {result['first_s'] * 1e3:.0f} ms, answer "
        f"{result['total_s'] * 1e3:.0f} ms (model ttft {timings['ttft_ms']:.0f} ms, "
        f"e2e {timings['e2e_ms']:.0f} ms)"
    )
    assert result["frames"][-1]["type"] == "answer"


async def test_live_pushes_at_least_two_states_a_second(server: str) -> None:
    async with websockets.connect(f"ws://{server}/v1/live") as socket:
        states = []
        deadline = time.perf_counter() + 1.0
        while (left_s := deadline - time.perf_counter()) > 0:
            try:
                states.append(json.loads(await asyncio.wait_for(socket.recv(), left_s)))
            except TimeoutError:
                break
    assert 2 <= len(states) <= 11  # at most 10 a second, and the first at once
    assert all(s["type"] == "state" for s in states)
    assert states[-1]["frame_timestamp_ns"] > states[0]["frame_timestamp_ns"]


async def test_clients_see_the_connected_gauge(server: str) -> None:
    async with (
        websockets.connect(f"ws://{server}/v1/live"),
        websockets.connect(f"ws://{server}/v1/live"),
    ):
        await asyncio.sleep(0.1)
        metrics = await asyncio.to_thread(get, f"http://{server}/metrics")
        assert "gazecam_clients_connected 2.0" in metrics


async def test_a_huge_message_closes_only_its_own_socket(server: str) -> None:
    async with websockets.connect(f"ws://{server}/v1/ask", max_size=None) as socket:
        await socket.send("x" * (2 << 20))  # beyond uvicorn's transport limit
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(socket.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    result = await ask_once(server, "fine", "What step am I on?")
    assert result["frames"][-1]["type"] == "answer"


def raw_post(address: str, content_length: int, body: bytes) -> tuple[bytes, float]:
    """POST a task card whose Content-Length is ``content_length`` but send only ``body``;
    the whole reply until the server closes the connection, and the seconds that took."""
    host, port = address.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        started = time.perf_counter()
        connection.sendall(
            b"POST /v1/task HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
            + f"Content-Length: {content_length}\r\n\r\n".encode()
            + body
        )
        reply = b""
        while chunk := connection.recv(65536):  # until the server closes it
            reply += chunk
        return reply, time.perf_counter() - started


def test_a_body_announced_over_the_limit_is_refused_at_once(server: str) -> None:
    # 10 GB announced, 20 bytes sent: the connection was held open, waiting for the rest.
    reply, took_s = raw_post(server, 10_000_000_000, b"name: x\nsteps: []\n\n")
    assert reply.startswith(b"HTTP/1.1 413 "), reply
    assert b'"code":"too_large"' in reply and took_s < BODY_TIMEOUT_S


def test_a_body_that_does_not_come_is_refused_after_the_timeout(server: str) -> None:
    reply, took_s = raw_post(server, 1000, b"name: x\n")
    assert reply.startswith(b"HTTP/1.1 408 "), reply
    assert b'"code":"timeout"' in reply and b"body not received within 1 s" in reply
    assert BODY_TIMEOUT_S <= took_s < BODY_TIMEOUT_S + 5


def test_a_wrong_method_is_405_on_the_wire(server: str) -> None:
    for method in ("GET", "TRACE"):
        request = urllib.request.Request(f"http://{server}/v1/events", method=method)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request)
        assert refused.value.code == 405 and refused.value.headers["allow"] == "POST"
