"""Faults injected by the Neon simulator, seen through NeonLiveSource and the realtime client.

The live source (Pupil Labs' client underneath, unmodified) must come back within 5 s after a
dropped connection or a device that went away, never hand over a stale frame, and keep one
stream while the other stalls. The recording loops: its gaze lasts only 9 s.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from gazecam.records import GazeSample, SceneFrame
from gazecam.settings import SourceSettings
from gazecam.simulate.neon_simulator import NeonSimulator
from gazecam.sources import open_source
from tests.simulate.test_neon_simulator import simulator

Arrival = tuple[int, str, int]  # local arrival time, 'gaze' or 'frame', item timestamp


async def live_arrivals(
    sim: NeonSimulator, fault: Callable[[], Awaitable[None]], listen_s: float, **settings: float
) -> tuple[list[Arrival], float, int]:
    """What a NeonLiveSource yields: ``fault()`` runs once frames and gaze flow; returns the
    arrivals, the local time of the fault (s) and the source's reconnect count. A stream that
    never comes back fails the test after 90 s instead of hanging it."""
    return await asyncio.wait_for(_live_arrivals(sim, fault, listen_s, **settings), 90)


async def _live_arrivals(
    sim: NeonSimulator, fault: Callable[[], Awaitable[None]], listen_s: float, **settings: float
) -> tuple[list[Arrival], float, int]:
    source = open_source(sim.uri, SourceSettings(neon_reconnect_backoff_s=0.2, **settings))  # type: ignore[arg-type]
    await source.open()
    arrivals: list[Arrival] = []
    fault_at_s = 0.0
    try:
        deadline = time.monotonic() + 30
        async for item in source.stream():
            kind = "gaze" if isinstance(item, GazeSample) else "frame"
            if isinstance(item, GazeSample | SceneFrame):
                arrivals.append((time.time_ns(), kind, item.timestamp_ns))
            kinds = {k for _, k, _ in arrivals}
            if not fault_at_s and kinds == {"gaze", "frame"}:
                fault_at_s = time.time()
                await fault()
                deadline = time.monotonic() + listen_s
            if time.monotonic() > deadline:
                break
    finally:
        await source.close()
    return arrivals, fault_at_s, source.stats.reconnects


def gap_after_s(arrivals: list[Arrival], kind: str, at_s: float) -> float:
    """The longest pause in arrivals of ``kind`` from ``at_s`` on, in seconds."""
    times = [at_s] + [t / 1e9 for t, k, _ in arrivals if k == kind and t / 1e9 >= at_s]
    return max((b - a for a, b in itertools.pairwise(times)), default=float("inf"))


def oldest_frame_s(arrivals: list[Arrival]) -> float:
    """The age of the stalest frame when it arrived (local clock = device clock here)."""
    return max((t - ts) / 1e9 for t, k, ts in arrivals if k == "frame")


# Open (issue 12): after the device comes back, or after the video pump's reconnect, the
# first frames of the new RTSP session can carry timestamps hours in the past, and a stalled
# video stream has been seen not to come back within the window. The dropped-connection test
# passed alone but failed once on a loaded machine; all three document what is still wrong.
_REJOIN_OPEN = pytest.mark.xfail(
    reason="stale frame timestamps / no video after a rejoined RTSP session (open)", strict=False
)


@_REJOIN_OPEN
async def test_after_a_dropped_connection_frames_and_gaze_return_within_5_s(
    neon_demo: Path,
) -> None:
    async with simulator(neon_demo, sim_loop=True) as sim:
        arrivals, at_s, _ = await live_arrivals(sim, sim.drop_connections, listen_s=6)
    assert sim.stats.drops == 1
    assert gap_after_s(arrivals, "frame", at_s) < 5
    assert gap_after_s(arrivals, "gaze", at_s) < 5
    assert [t for t, k, _ in arrivals if k == "frame" and t / 1e9 > at_s + 1]  # came back
    assert oldest_frame_s(arrivals) < 0.5  # nothing stale was handed over


@_REJOIN_OPEN
async def test_a_device_that_goes_away_answers_nothing_and_comes_back(neon_demo: Path) -> None:
    async with simulator(neon_demo, sim_loop=True) as sim:
        status = f"http://127.0.0.1:{sim.http_port}/api/status"

        async def away() -> None:
            await sim.go_away(2)
            async with aiohttp.ClientSession() as http, http.get(status) as response:
                assert response.status == 503

        arrivals, at_s, _ = await live_arrivals(sim, away, listen_s=8)
        async with aiohttp.ClientSession() as http, http.get(status) as response:
            assert response.status == 200
    assert 2 <= gap_after_s(arrivals, "frame", at_s) < 2 + 5
    assert [t for t, k, _ in arrivals if k == "frame" and t / 1e9 > at_s + 4]
    assert oldest_frame_s(arrivals) < 0.5


@_REJOIN_OPEN
async def test_a_stalled_video_stream_is_reconnected_while_gaze_flows_on(
    neon_demo: Path,
) -> None:
    async with simulator(neon_demo, sim_loop=True) as sim:

        async def stall() -> None:
            sim.stall("video", 2.5)

        arrivals, at_s, reconnects = await live_arrivals(
            sim, stall, listen_s=6, neon_connect_timeout_s=1.0
        )
    assert reconnects >= 1  # the video pump's watchdog: no frame for 1 s
    assert 2 <= gap_after_s(arrivals, "frame", at_s) < 2.5 + 5
    assert gap_after_s(arrivals, "gaze", at_s) < 0.5
    assert oldest_frame_s(arrivals) < 0.5
