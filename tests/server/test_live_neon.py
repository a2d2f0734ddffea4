"""The service on live glasses: ``gazecam serve --source neon://127.0.0.1:PORT`` against the
Neon simulator playing the synthetic demo, read through Pupil Labs' own realtime client.

Its status shows the live source, its clock offset and counters; an answer names the step
that replaying the demo directly (``gazecam ask synthetic:demo``) names at the same scene time.
A dropped connection is rejoined within 5 s, and no crop is cut from a frame older than the
live source's tolerance.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from gazecam.settings import SourceSettings
from gazecam.sources.synthetic import START_NS
from tests.conftest import REPO
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
    assert clock["estimates"] == 1
    counters = source["live"]
    assert counters["frames_in"] > 0 and counters["gaze_in"] > 0
    assert counters["frames_stale"] == 0
    assert 0 <= source["latest_frame_age_s"] < 1


def ask_live(client: TestClient, question: str) -> dict[str, Any]:
    """The answer frame of one ask on /v1/ask."""
    with client.websocket_connect(f"{WS}/v1/ask") as socket:
        socket.send_json({"type": "ask", "id": "q", "question": question})
        while (frame := socket.receive_json())["type"] == "token":
            pass
    assert frame["type"] == "answer", frame
    return dict(frame)


def ask_direct(at_s: float, question: str) -> dict[str, Any]:
    """``gazecam ask synthetic:demo --at AT_S QUESTION --json``'s answer."""
    command = ["ask", "synthetic:demo", "--at", f"{at_s:.3f}", question, "--json"]
    done = subprocess.run(
        [sys.executable, "-m", "gazecam", *command, "--engine", "text"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.splitlines()[-1]))


def test_an_answer_through_the_simulator_names_the_direct_replays_step(live: Live) -> None:
    sim_thread, client = live
    offset_ms = client.get("/v1/status").json()["source"]["clock"]["offset_ms"]

    def crop_s() -> float:
        stamp = int(client.get("/v1/crop.jpg").headers["X-Crop-Timestamp-Ns"])
        return (scene_ns(sim_thread, stamp, offset_ms) - START_NS) / 1e9

    # Mid-way through the demo's first step (0-10 s): the trackers of both have seen a few
    # seconds of it (the live stream starts about 1 s in), and neither is near a change.
    wait_for(lambda: crop_s() >= 5, timeout_s=20, what="a keyframe 5 s into the demo")
    live_answer = ask_live(client, "What step am I on?")
    live_ns = scene_ns(sim_thread, live_answer["crop"]["timestamp_ns"], offset_ms)
    assert 5 <= (live_ns - START_NS) / 1e9 < 7.5, live_answer
    # The direct replay, up to just past the live keyframe's scene time.
    direct = ask_direct((live_ns - START_NS) / 1e9 + 0.01, "What step am I on?")
    assert live_answer["step"]["index"] == direct["step"]["index"], (live_answer, direct)
    assert live_answer["text"].split(".")[0] == direct["text"].split(".")[0]
    # Not the same keyframe: keyframes come at most once a second, counted from the first,
    # and the live stream starts later than the replay (see the simulator's capture test for
    # keyframes compared frame by frame).
    assert abs(direct["crop"]["timestamp_ns"] - live_ns) < 10**9, (live_answer, direct)


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
        return rejoined and source["latest_frame_age_s"] < 0.5

    wait_for(back, timeout_s=5, what="frames after the reconnect")
    assert time.monotonic() - dropped_s < 5
    while time.monotonic() - dropped_s < 6:  # crops keep coming, each fresh when cut
        note_crop()
        time.sleep(0.05)
    assert len(first_seen_ns) >= 3, first_seen_ns
    ages_ns = [seen - stamp for stamp, seen in first_seen_ns.items()][1:]  # after the drop
    assert max(ages_ns) < MAX_AGE_NS, ages_ns
    assert client.get("/v1/status").json()["source"]["live"]["frames_stale"] == 0
