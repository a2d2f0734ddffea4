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

from gazecam.records import GazeSample, SceneFrame
from gazecam.settings import SourceSettings
from gazecam.simulate.neon_simulator import NeonSimulator
from gazecam.sources import open_source
from gazecam.sources.neon_link import NeonLink
from tests.simulate.test_neon_simulator import simulator

# No frame older than the live source's tolerance (neon_max_frame_age_s) may come out; frames
# arrive ~0.06 s after capture on an idle machine, and up to ~0.4 s were seen under load.
MAX_AGE_S = SourceSettings().neon_max_frame_age_s
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


async def test_a_rejoined_rtsp_session_maps_its_frames_with_its_own_clock(neon_demo: Path) -> None:
    """The root of stale frames after a drop: the realtime client kept the last session's
    RTP-to-wall-clock offset for a rejoined one (aiortsp's run_loop), whose RTP clock starts
    elsewhere; its frames came stamped hours off. Now a session ends with its connection, and
    the next one maps its own clock from its own sender reports."""
    async with simulator(neon_demo, sim_loop=True) as sim:
        link = NeonLink()
        status = await link.connect("127.0.0.1", sim.http_port)
        await link.close()
        world = status.direct_world_sensor()
        assert world is not None and world.url is not None
        ages_s: list[list[float]] = [[], []]  # per session: arrival less frame time
        ended = None

        async def read(session: int) -> None:
            nonlocal ended
            try:
                async for frame in link.receive_video(world.url, 5.0):
                    ages_s[session].append((time.time_ns() - frame.timestamp_unix_ns) / 1e9)
                    if session == 0 and len(ages_s[0]) == 5:
                        await sim.go_away(1)  # a new media, with a new RTP clock, after it
                    if len(ages_s[session]) == 15:
                        return
            except link.errors as exc:
                ended = exc  # the connection the device dropped
            assert session == 0, "the second session ended early"

        await asyncio.wait_for(read(0), 10)  # ends with the dropped connection
        await asyncio.wait_for(read(1), 10)
    assert max(max(ages) for ages in ages_s) < MAX_AGE_S, ages_s
    assert 5 <= len(ages_s[0]) < 15 and len(ages_s[1]) == 15, (ages_s, ended)


async def test_after_a_dropped_connection_frames_and_gaze_return_within_5_s(
    neon_demo: Path,
) -> None:
    async with simulator(neon_demo, sim_loop=True) as sim:
        arrivals, at_s, reconnects = await live_arrivals(sim, sim.drop_connections, listen_s=6)
    assert sim.stats.drops == 1 and reconnects >= 2  # both streams
    assert gap_after_s(arrivals, "frame", at_s) < 5
    assert gap_after_s(arrivals, "gaze", at_s) < 5
    assert [t for t, k, _ in arrivals if k == "frame" and t / 1e9 > at_s + 1]  # came back
    assert oldest_frame_s(arrivals) < MAX_AGE_S  # nothing stale was handed over


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
    assert oldest_frame_s(arrivals) < MAX_AGE_S


async def test_a_stalled_video_stream_is_reconnected_while_gaze_flows_on(
    neon_demo: Path,
) -> None:
    async with simulator(neon_demo, sim_loop=True) as sim:

        async def stall() -> None:
            sim.stall("video", 2.5)

        # A watchdog of 2 s, not less: the client's first frame of a new session comes only
        # after its first sender report (~0.3 s) and the keyframe after it (one per second):
        # the client drops the packets before that report, the first keyframe among them.
        arrivals, at_s, reconnects = await live_arrivals(
            sim, stall, listen_s=6, neon_connect_timeout_s=2.0
        )
    assert reconnects >= 1  # the video pump's watchdog: no frame for 2 s
    assert 2 <= gap_after_s(arrivals, "frame", at_s) < 2.5 + 5
    assert gap_after_s(arrivals, "gaze", at_s) < 0.5
    assert oldest_frame_s(arrivals) < MAX_AGE_S
