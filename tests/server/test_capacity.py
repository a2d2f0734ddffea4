"""The service under load on uvicorn (127.0.0.1): the queue in front of the generation thread
refuses what it cannot start soon with ``busy`` and a queue position, no ask goes unanswered,
the queue shows in /metrics, and loopback clients do not share one rate-limit bucket."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import websockets
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.datastructures import Address

from gazecam.assist.assistant import Answer
from gazecam.server.errors import ClientError
from gazecam.server.protocol import RateLimiter
from gazecam.server.runtime import Runtime
from tests.server.conftest import LOCAL, WS, first_crop, first_keyframe, uvicorn_server, wait_for

CLIENTS = 10
ASKS = 3  # per client; the rate limit is 3 a minute per client, so none is rate_limited
QUEUE_MAX = 2
REPLY_TIMEOUT_S = 60.0  # a reply that takes longer counts as a silent, lost ask
QUEUE_REASONS = re.compile(
    r"^\d+ asks ahead of yours in the answer queue: (at most 2 asks wait|about [\d.]+ s to "
    r"wait, over 0.5 s|not started within 0.5 s); ask again later$"
)


def get(url: str) -> str:
    with urllib.request.urlopen(url) as response:
        return str(response.read().decode())


@pytest.fixture(scope="module")
def server(make_app: Callable[..., FastAPI]) -> Iterator[str]:
    app = make_app(ask_queue_wait_s=0.5, ask_queue_max=QUEUE_MAX, asks_per_minute=ASKS)
    with uvicorn_server(app) as address:
        first_keyframe(address)
        yield address


async def reply(socket: Any, request_id: str) -> dict[str, Any]:
    """The final frame of one ask (its answer or error), every frame checked for its id."""
    while True:
        frame = json.loads(await asyncio.wait_for(socket.recv(), REPLY_TIMEOUT_S))
        assert frame["id"] == request_id, frame
        if frame["type"] != "token":
            return frame


async def client(address: str, n: int, go: asyncio.Event) -> list[dict[str, Any]]:
    """Connect, wait for every client to be connected, then ask ASKS times in a row."""
    async with websockets.connect(f"ws://{address}/v1/ask") as socket:
        await go.wait()
        finals = []
        for k in range(ASKS):
            request_id = f"c{n}-{k}"
            await socket.send(
                json.dumps({"type": "ask", "id": request_id, "question": "What step am I on?"})
            )
            finals.append(await reply(socket, request_id))
        return finals


async def test_every_ask_is_answered_or_refused_busy_with_its_queue_position(server: str) -> None:
    go = asyncio.Event()
    clients = [asyncio.create_task(client(server, n, go)) for n in range(CLIENTS)]
    await asyncio.sleep(0.5)  # all connected: their first asks then come at once
    go.set()
    finals = [frame for frames in await asyncio.gather(*clients) for frame in frames]

    assert len(finals) == CLIENTS * ASKS  # every ask got its final frame: none lost or silent
    answers = [f for f in finals if f["type"] == "answer"]
    busy = [f for f in finals if f["type"] == "error"]
    assert len(answers) + len(busy) == len(finals)
    for frame in busy:
        assert frame["code"] == "busy", frame  # in particular, never rate_limited
        assert isinstance(frame["queue_position"], int) and frame["queue_position"] >= 1
        assert QUEUE_REASONS.match(frame["message"]), frame["message"]
    # Ten asks at once: one starts, QUEUE_MAX wait, the rest are refused at once.
    assert len(busy) >= CLIENTS - 1 - QUEUE_MAX
    assert answers and all(a["text"].startswith("You are on step") for a in answers)

    metrics = await asyncio.to_thread(get, f"http://{server}/metrics")
    assert "gazecam_ask_queue_length 0.0" in metrics  # all done: nobody waits
    assert f"gazecam_ask_queue_wait_seconds_count {len(answers)}.0" in metrics
    assert f'gazecam_asks_total{{outcome="answered"}} {len(answers)}.0' in metrics
    assert f'gazecam_asks_total{{outcome="busy"}} {len(busy)}.0' in metrics
    assert "rate_limited" not in metrics

    # The queue is free again: a lone ask starts at once.
    async with websockets.connect(f"ws://{server}/v1/ask") as socket:
        await socket.send(json.dumps({"type": "ask", "id": "after", "question": "What step?"}))
        assert (await reply(socket, "after"))["type"] == "answer"


def test_the_queue_refuses_past_its_length_and_after_its_wait_with_the_position(
    make_app: Callable[..., FastAPI],
) -> None:
    app = make_app(ask_queue_wait_s=0.5, ask_queue_max=1)
    with TestClient(app, base_url=LOCAL) as client:
        first_crop(client)
        runtime: Runtime = app.state.runtime
        assert client.portal is not None  # set while the client runs the app
        lock = runtime._generation_lock  # held, as by a long answer under way
        client.portal.call(lock.acquire)
        with (
            client.websocket_connect(f"{WS}/v1/ask") as waits,
            client.websocket_connect(f"{WS}/v1/ask") as refused,
        ):
            waits.send_json({"type": "ask", "id": "w", "question": "What step am I on?"})
            wait_for(lambda: runtime.asks_waiting == 1, what="the first ask to queue")
            assert "gazecam_ask_queue_length 1.0" in client.get("/metrics").text
            refused.send_json({"type": "ask", "id": "r", "question": "What step am I on?"})
            assert refused.receive_json() == {
                "type": "error",
                "id": "r",
                "code": "busy",
                "queue_position": 2,
                "message": "2 asks ahead of yours in the answer queue: at most 1 asks wait; "
                "ask again later",
            }
            assert waits.receive_json() == {
                "type": "error",
                "id": "w",
                "code": "busy",
                "queue_position": 1,
                "message": "1 asks ahead of yours in the answer queue: not started within "
                "0.5 s; ask again later",
            }
            client.portal.call(lock.release)
            waits.send_json({"type": "ask", "id": "again", "question": "What step am I on?"})
            while (frame := waits.receive_json())["type"] == "token":
                pass
            assert frame["type"] == "answer" and frame["id"] == "again"
        metrics = client.get("/metrics").text
        assert "gazecam_ask_queue_length 0.0" in metrics
        assert "gazecam_ask_queue_wait_seconds_count 1.0" in metrics
        assert 'gazecam_asks_total{outcome="busy"} 2.0' in metrics


def test_asks_arriving_together_at_an_idle_service_start_one_and_queue_the_next(
    make_app: Callable[..., FastAPI],
) -> None:
    # Both asks reach the queue in one turn of the event loop, as a burst from several clients
    # does: the first starts, and the second is the one that may wait (ask_queue_max=1), not
    # refused as if the first were waiting in line.
    app = make_app(ask_queue_max=1)
    with TestClient(app, base_url=LOCAL) as client:
        first_crop(client)
        runtime: Runtime = app.state.runtime
        waited_s: list[float] = []

        async def answer() -> Answer:
            pieces = [piece async for piece in runtime.ask("What step am I on?", waited_s.append)]
            assert isinstance(pieces[-1], Answer)
            return pieces[-1]

        async def two_at_once() -> list[Answer]:
            return await asyncio.gather(answer(), answer())

        assert client.portal is not None  # set while the client runs the app
        answers = client.portal.call(two_at_once)
        assert all(a.text.startswith("You are on step") for a in answers)
        # The second waited for the first's answer; the first did not wait.
        assert len(waited_s) == 2 and waited_s[0] < 0.05 < waited_s[1]
        assert runtime.asks_waiting == 0 and not runtime._generation_lock.locked()


def test_loopback_connections_are_clients_of_their_own_other_addresses_share_one() -> None:
    local = {RateLimiter.client_key(Address(host, port)) for host in ("127.0.0.1", "::1")
             for port in (50001, 50002)}  # fmt: skip
    assert len(local) == 4
    remote = {RateLimiter.client_key(Address("192.0.2.7", port)) for port in (50001, 50002)}
    assert remote == {"192.0.2.7"}
    limiter = RateLimiter(per_minute=1)
    limiter.take(RateLimiter.client_key(Address("127.0.0.1", 50001)))
    limiter.take(RateLimiter.client_key(Address("127.0.0.1", 50002)))
    limiter.take(RateLimiter.client_key(Address("192.0.2.7", 50001)))
    with pytest.raises(ClientError, match="at most 1 asks a minute"):
        limiter.take(RateLimiter.client_key(Address("192.0.2.7", 50002)))


# Run in a process of its own: in a heap with large free holes already (as the suite's, after
# loading models), malloc serves large blocks from those before it would mmap anything.
_LARGE_BLOCKS = """
import os, numpy as np
from gazecam.server.runtime import return_large_blocks_to_the_os
return_large_blocks_to_the_os()
# Freeing a large mmapped block raises glibc's own (dynamic) threshold to its size, after
# which blocks up to it come from the heap, whose holes it keeps (the soak's growth).
freed = np.ones(16 << 20, np.uint8)
del freed
blocks = [np.ones(4 << 20, np.uint8) for _ in range(4)]
# An mmapped block starts a page, after glibc's 16-byte chunk header; a block from the heap
# is 16-byte aligned only.
print([(b.ctypes.data - 16) % os.sysconf("SC_PAGE_SIZE") for b in blocks])
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_large_arrays_are_mmapped_so_their_memory_goes_back_to_the_os() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    run = subprocess.run(
        [sys.executable, "-c", _LARGE_BLOCKS], env=env, capture_output=True, text=True, check=True
    )
    assert run.stdout.split() == ["[0,", "0,", "0,", "0]"]
