"""The hand-off from capture to perception: newest wins, and keyframes wait for answers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np
from fastapi import FastAPI
from fastapi.testclient import TestClient

from gazecam.records import Box, Crop
from gazecam.server.pipeline import KeyframeSlot
from gazecam.server.runtime import Runtime
from tests.perception import make_crop
from tests.server.conftest import LOCAL, WS, first_crop, wait_for


def crop(timestamp_ns: int) -> Crop:
    image = np.zeros((64, 64, 3), np.uint8)
    return make_crop(image, Box(0, 0, 32, 32), (16.0, 16.0), timestamp_ns=timestamp_ns)


async def test_the_newest_crop_wins_and_a_waiting_worker_gets_it_at_once() -> None:
    slot = KeyframeSlot(yield_s=30)
    assert slot.put(crop(1)) is False
    assert slot.put(crop(2)) is True  # replaced one not taken: the caller counts a drop
    assert (await slot.take()).matched.frame.timestamp_ns == 2
    taking = asyncio.create_task(slot.take())
    await asyncio.sleep(0.01)
    assert not taking.done()  # nothing to take
    slot.put(crop(3))
    assert (await asyncio.wait_for(taking, 5)).matched.frame.timestamp_ns == 3


async def test_while_paused_the_newest_crop_waits_until_the_answer_ends() -> None:
    slot = KeyframeSlot(yield_s=30)
    taking = asyncio.create_task(slot.take())  # the worker waits before a crop is there
    slot.pause(True)
    slot.put(crop(1))
    await asyncio.sleep(0.05)
    assert not taking.done()
    assert slot.put(crop(2)) is True  # still newest wins while held
    await asyncio.sleep(0.05)
    assert not taking.done()
    slot.pause(False)
    assert (await asyncio.wait_for(taking, 5)).matched.frame.timestamp_ns == 2


async def test_a_held_crop_goes_after_yield_s_even_if_answers_go_on() -> None:
    slot = KeyframeSlot(yield_s=0.2)
    slot.pause(True)
    slot.put(crop(1))
    began = time.monotonic()
    taken = await asyncio.wait_for(slot.take(), 5)
    assert taken.matched.frame.timestamp_ns == 1
    assert time.monotonic() - began >= 0.2
    assert slot.paused  # the answer goes on; perception was not starved
    unheld = KeyframeSlot(yield_s=0)  # 0: perception never waits
    unheld.pause(True)
    unheld.put(crop(2))
    assert (await asyncio.wait_for(unheld.take(), 5)).matched.frame.timestamp_ns == 2


def test_the_service_holds_keyframes_back_while_it_answers(
    make_app: Callable[..., FastAPI],
) -> None:
    app = make_app()
    with TestClient(app, base_url=LOCAL) as client:
        first_crop(client)
        runtime: Runtime = app.state.runtime
        slot = runtime.pipeline._slot
        seen: list[bool] = []  # slot.paused whenever a frame of the answer came

        with client.websocket_connect(f"{WS}/v1/ask") as socket:
            socket.send_json({"type": "ask", "id": "a", "question": "What am I looking at?"})
            while (frame := socket.receive_json())["type"] == "token":
                seen.append(slot.paused)
        assert frame["type"] == "answer"
        assert seen and all(seen)  # held while the tokens streamed
        # The answer frame is sent before the generation thread is joined: then it resumes.
        wait_for(lambda: not slot.paused, what="perception to resume after the answer")
        perceived = client.get("/v1/status").json()["frames"]["keyframes_perceived"]
        wait_for(
            lambda: client.get("/v1/status").json()["frames"]["keyframes_perceived"] > perceived,
            what="a keyframe perceived after the answer",
        )
