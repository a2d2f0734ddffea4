"""The service on live glasses: ``gazecam serve --source neon://127.0.0.1:PORT`` against the
Neon simulator playing the synthetic demo, read through Pupil Labs' own realtime client.

Its status shows the live source, its clock offset and counters; an answer rests on a fresh
crop of the demo's frame with the demo's gaze.
A dropped connection is rejoined within 5 s, and no crop is cut from a frame older than the
live source's tolerance.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from gazecam.records import GazeSample
from gazecam.settings import SourceSettings
from gazecam.sources import open_source
from gazecam.sources.synthetic import START_NS
from tests.server.conftest import LOCAL, WS, first_crop, wait_for
from tests.simulate.test_neon_simulator import SimulatorThread, simulator_thread

MAX_AGE_NS = round(SourceSettings().neon_max_frame_age_s * 1e9)

Live = tuple[SimulatorThread, TestClient]


@pytest.fixture(scope="module")
def live(make_app: Callable[..., FastAPI]) -> Iterator[Live]:
    """The service on the simulated glasses, once it has perceived its first keyframe."""
    with simulator_thread("synthetic:demo", sim_loop=True) as sim_thread:
        app = make_app(source=sim_thread.sim.uri, restart_backoff_s=0.2)
        with TestClient(app, base_url=LOCAL) as client:
            first_crop(client)
            yield sim_thread, client


def scene_ns(sim_thread: SimulatorThread, local_ns: int, offset_ms: float) -> int:
    """A live local time as the demo's own timestamp: the simulator plays the demo's first
    item (at START_NS) when it starts, stamping items with its device clock."""
    return local_ns + round(offset_ms * 1e6) - sim_thread.sim.started_wall_ns + START_NS


def test_status_shows_the_live_source_its_clock_and_counters(live: Live) -> None:
    _, client = live
    source = client.get("/v1/status").json()["source"]
    assert source["kind"] == "neon-live" and source["state"] == "running", source
    clock = source["clock"]
    # The simulator's clock is this machine's: Time Echo measures an offset of about 0.
    assert abs(clock["offset_ms"]) < 5 and 0 <= clock["spread_ms"] < 5, clock
    assert clock["samples"] == SourceSettings().neon_time_echo_samples
    # Measured again only after frames came over a second late (a very busy machine).
    assert clock["estimates"] >= 1
    counters = source["live"]
    assert counters["frames_in"] > 0 and counters["gaze_in"] > 0
    assert counters["frames_stale"] < counters["frames_in"] and counters["reconnects"] == 0
    assert 0 <= source["latest_frame_age_s"] < 1


def ask_live(client: TestClient, question: str) -> dict[str, Any]:
    """The answer frame of one ask on /v1/ask."""
    with client.websocket_connect(f"{WS}/v1/ask") as socket:
        socket.send_json({"type": "ask", "id": "q", "question": question})
        while (frame := socket.receive_json())["type"] == "token":
            pass
    assert frame["type"] == "answer", frame
    return dict(frame)


def test_an_answer_through_the_simulator_rests_on_a_fresh_live_crop(live: Live) -> None:
    """An answer on live glasses cites the latest keyframe: a frame of the demo seconds ago at
    most, with the demo's own gaze at that frame inside its crop. (That its step is the direct
    replay's is checked for ``gazecam ask`` in tests/simulate/test_live_commands.py.)"""
    sim_thread, client = live
    asked_ns = time.time_ns()
    answer = ask_live(client, "What step am I on?")
    assert answer["intent"] == "current_step" and answer["step"]["total"] == 6
    crop = answer["crop"]
    assert 0 <= asked_ns - crop["timestamp_ns"] < 3 * 10**9, crop  # keyframes: ~1 per second
    offset_ms = client.get("/v1/status").json()["source"]["clock"]["offset_ms"]
    demo_ns = scene_ns(sim_thread, crop["timestamp_ns"], offset_ms)
    demo_gaze = asyncio.run(gaze_at(demo_ns))
    assert demo_gaze is not None
    assert np.allclose(crop["gaze"], demo_gaze, atol=1.0), (crop, demo_gaze, demo_ns)
    x0, y0, x1, y1 = crop["box"]
    assert x0 <= crop["gaze"][0] <= x1 and y0 <= crop["gaze"][1] <= y1


async def gaze_at(demo_ns: int) -> tuple[float, float] | None:
    """The demo's gaze at one of its times, interpolated as the capture stage does."""
    source = open_source("synthetic:demo")
    await source.open()
    before: GazeSample | None = None
    try:
        async for item in source.stream():
            if not isinstance(item, GazeSample):
                continue
            if item.timestamp_ns >= demo_ns and before is not None:
                w = (demo_ns - before.timestamp_ns) / (item.timestamp_ns - before.timestamp_ns)
                return (
                    before.x_px + w * (item.x_px - before.x_px),
                    before.y_px + w * (item.y_px - before.y_px),
                )
            before = item
    finally:
        await source.close()
    return None


def test_a_dropped_connection_is_rejoined_within_5_s_and_no_stale_crop_is_cut(
    live: Live,
) -> None:
    sim_thread, client = live
    before = client.get("/v1/status").json()["source"]["live"]["reconnects"]
    first_seen_ns: dict[int, int] = {}  # crop frame time -> when /v1/crop.jpg first served it

    def note_crop() -> None:
        stamp = int(client.get("/v1/crop.jpg").headers["X-Crop-Timestamp-Ns"])
        first_seen_ns.setdefault(stamp, time.time_ns())

    note_crop()
    sim_thread.call(sim_thread.sim.drop_connections())
    dropped_s = time.monotonic()

    def back() -> bool:
        note_crop()
        source = client.get("/v1/status").json()["source"]
        rejoined = source["live"]["reconnects"] >= before + 2  # gaze and scene video
        return rejoined and source["latest_frame_age_s"] < 1

    wait_for(back, timeout_s=5, what="frames after the reconnect")
    assert time.monotonic() - dropped_s < 5
    while time.monotonic() - dropped_s < 6:  # crops keep coming, each fresh when cut
        note_crop()
        time.sleep(0.05)
    assert len(first_seen_ns) >= 3, first_seen_ns
    ages_ns = [seen - stamp for stamp, seen in first_seen_ns.items()][1:]  # after the drop
    assert max(ages_ns) < MAX_AGE_NS, ages_ns
