"""The Neon simulator against Pupil Labs' own realtime client, unmodified.

The simulator plays the real neon-demo recording (its scene video rendered at the real frame
timestamps, each frame carrying its index as a frame code) through GStreamer's RTSP server;
the client reads status, calibration, Time Echo and both RTSP streams as from real glasses.
Nothing is faked.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import logging
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from pupil_labs.neon_recording.calib import Calibration
from pupil_labs.realtime_api.device import Device
from pupil_labs.realtime_api.streaming import receive_gaze_data, receive_video_frames
from pupil_labs.realtime_api.time_echo import TimeOffsetEstimator

from gazecam.capture.pipeline import CaptureResult, capture
from gazecam.records import GazeSample, SceneFrame, SourceInfo, SourceItem
from gazecam.settings import CaptureSettings, SourceSettings
from gazecam.simulate.neon_simulator import NeonSimulator, SimulatorSettings
from gazecam.sources import Source, open_source
from gazecam.sources.synthetic import read_frame_code
from tests.conftest import missing

MAX_LISTEN_S = 9.0  # the recording's gaze lasts 9 s
_R = TypeVar("_R")


def require_gstreamer() -> None:
    """Skip (fail in CI) where Debian's GStreamer RTSP server is not installed."""
    probe = "import gi; gi.require_version('GstRtspServer', '1.0')"
    python = SimulatorSettings().sim_gst_python
    try:
        found = subprocess.run([python, "-c", probe], capture_output=True).returncode == 0
    except OSError:
        found = False
    if not found:
        missing(f"{python} has no GStreamer RTSP server (apt install gir1.2-gst-rtsp-server-1.0)")


def simulator(address: str | Path, **settings: object) -> NeonSimulator:
    """A simulator on free loopback ports, without mDNS (the tests name its address)."""
    require_gstreamer()
    values: dict[str, object] = {"sim_port": 0, "sim_mdns": False, **settings}
    return NeonSimulator(str(address), SimulatorSettings(**values))  # type: ignore[arg-type]


@contextmanager
def simulator_thread(address: str | Path, **settings: object) -> Iterator[SimulatorThread]:
    """A simulator serving from its own event loop in a thread, for a service or a command
    line under test (each with a loop of its own); stopped on the way out."""
    sim = simulator(address, **settings)
    started: concurrent.futures.Future[asyncio.AbstractEventLoop] = concurrent.futures.Future()

    async def serve() -> None:
        stop = asyncio.Event()
        async with sim:
            started.set_result(asyncio.get_running_loop())
            thread.stop = stop.set
            await stop.wait()

    def run() -> None:
        try:
            asyncio.run(serve())
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            raise

    thread = SimulatorThread(sim, run)
    thread.start()
    try:
        thread.loop = started.result(timeout=60)
        yield thread
    finally:
        if thread.loop is not None:
            thread.loop.call_soon_threadsafe(thread.stop)
        thread.join(timeout=30)
        assert not thread.is_alive(), "the simulator did not stop"


class SimulatorThread(threading.Thread):
    """A simulator running in a thread: ``call`` runs one of its coroutines there."""

    def __init__(self, sim: NeonSimulator, run: Callable[[], None]) -> None:
        super().__init__(target=run, name="neon-simulator", daemon=True)
        self.sim = sim
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop: Callable[[], None] = lambda: None

    def call(self, coroutine: Coroutine[Any, Any, _R]) -> _R:
        """Run ``coroutine`` (e.g. ``sim.drop_connections()``) on the simulator's loop."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)


async def recorded(address: str | Path) -> tuple[list[GazeSample], list[SceneFrame]]:
    """The recording's gaze samples and scene frames, read directly."""
    source = open_source(str(address))
    await source.open()
    gaze: list[GazeSample] = []
    frames: list[SceneFrame] = []
    try:
        async for item in source.stream():
            if isinstance(item, GazeSample):
                gaze.append(item)
            elif isinstance(item, SceneFrame):
                frames.append(item)
    finally:
        await source.close()
    return gaze, frames


async def test_the_realtime_client_reads_status_calibration_and_clock(neon_demo: Path) -> None:
    async with simulator(neon_demo) as sim:
        device = Device("127.0.0.1", sim.http_port)
        try:
            status = await device.get_status()
            calibration = await device.get_calibration()
        finally:
            await device.close()
        estimate = await TimeOffsetEstimator("127.0.0.1", status.phone.time_echo_port).estimate(
            number_of_measurements=10
        )
    world, gaze = status.direct_world_sensor(), status.direct_gaze_sensor()
    assert world is not None and gaze is not None
    assert world.url == f"rtsp://127.0.0.1:{sim.rtsp_ports[0]}/?camera=world"
    assert gaze.url == f"rtsp://127.0.0.1:{sim.rtsp_ports[1]}/?camera=gaze"
    own = Calibration.from_buffer((neon_demo / "calibration.bin").read_bytes())
    np.testing.assert_array_equal(calibration.scene_camera_matrix, own.scene_camera_matrix)
    assert estimate is not None
    assert abs(estimate.time_offset_ms.median) <= 1  # the same machine's clock


async def test_neon_auto_finds_the_simulator_by_mdns(caplog: pytest.LogCaptureFixture) -> None:
    """``neon://auto``: the realtime client's mDNS discovery finds the announcement (on
    loopback; a machine whose network has real glasses may find those first)."""
    caplog.set_level(logging.INFO, logger="gazecam.sources.neon_live")
    async with simulator("synthetic:demo", sim_mdns=True) as sim:
        source = open_source("neon://auto", SourceSettings(neon_discovery_timeout_s=10))
        info = await source.open()
        await source.close()
    assert info.kind == "neon-live"
    assert f"neon://auto: found a Neon at 127.0.0.1:{sim.http_port}" in caplog.messages


async def test_gaze_and_frames_arrive_with_the_device_timestamps(neon_demo: Path) -> None:
    """Every sample and frame the client yields is one of the recording's, stamped with the
    time the simulated device captured it: its recorded time since the first item, from the
    simulator's start."""
    rec_gaze, rec_frames = await recorded(neon_demo)
    first_ns = min(rec_gaze[0].timestamp_ns, rec_frames[0].timestamp_ns)
    rec_gaze_ns = [g.timestamp_ns - first_ns for g in rec_gaze]
    async with simulator(neon_demo) as sim:
        world, gaze = sim.rtsp_ports
        got_gaze, got_frames = [], []

        async def read_gaze() -> None:
            async for datum in receive_gaze_data(f"rtsp://127.0.0.1:{gaze}/?camera=gaze"):
                got_gaze.append(datum)

        async def read_video() -> None:
            async for frame in receive_video_frames(f"rtsp://127.0.0.1:{world}/?camera=world"):
                got_frames.append((frame.timestamp_unix_ns, read_frame_code(frame.bgr_buffer())))

        readers = [asyncio.create_task(read_gaze()), asyncio.create_task(read_video())]
        for _ in range(int(MAX_LISTEN_S / 0.1)):
            if len(got_gaze) >= 400 and len(got_frames) >= 60:  # 2 s of each
                break
            await asyncio.sleep(0.1)
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        start_ns = sim.started_wall_ns
    assert len(got_gaze) >= 400
    # Each sample the client yields is a recorded one (its payload is Neon's float32 x, y):
    # its timestamp is that sample's recorded time since the first item, from the start.
    by_payload: dict[tuple[float, float], list[int]] = {}
    for i, g in enumerate(rec_gaze):
        by_payload.setdefault((float(np.float32(g.x_px)), float(np.float32(g.y_px))), []).append(i)
    gaze_errors_ms = []
    for datum in got_gaze:
        elapsed_ns = datum.timestamp_unix_ns - start_ns
        i = min(by_payload[datum.x, datum.y], key=lambda j: abs(rec_gaze_ns[j] - elapsed_ns))
        gaze_errors_ms.append((elapsed_ns - rec_gaze_ns[i]) / 1e6)
        assert datum.worn == rec_gaze[i].worn
    # RTP time at 90 kHz, mapped to wall time by the RTCP sender reports: to within 0.1 ms.
    assert max(map(abs, gaze_errors_ms)) < 1, [
        (i, e) for i, e in enumerate(gaze_errors_ms) if abs(e) > 1
    ]
    assert len(got_frames) >= 60
    frame_errors_ms = [
        (t_ns - start_ns - (rec_frames[index].timestamp_ns - first_ns)) / 1e6
        for t_ns, index in got_frames
    ]
    assert max(map(abs, frame_errors_ms)) < 1, frame_errors_ms
    indices = [index for _, index in got_frames]
    assert indices == sorted(indices) and len(set(indices)) == len(indices)


class Window:
    """A source with only the gaze samples and frames at the given times (where None: the
    frames from ``settle_ns`` after the first gaze sample on); notes the times of those it
    passes."""

    def __init__(
        self, source: Source, keep_ns: dict[type, list[int]] | None = None, settle_ns: int = 0
    ) -> None:
        self.source, self.uri, self.stats = source, source.uri, source.stats
        self.keep_ns, self.settle_ns = keep_ns, settle_ns
        self.passed_ns: dict[type, list[int]] = {GazeSample: [], SceneFrame: []}

    async def open(self) -> SourceInfo:
        return await self.source.open()

    async def stream(self) -> AsyncIterator[SourceItem]:
        async for item in self.source.stream():
            if isinstance(item, GazeSample | SceneFrame):
                if self.keep_ns is not None and not near(self.keep_ns[type(item)], item):
                    continue
                gaze_ns = self.passed_ns[GazeSample]
                if isinstance(item, SceneFrame) and (
                    not gaze_ns or item.timestamp_ns < gaze_ns[0] + self.settle_ns
                ):
                    continue
                self.passed_ns[type(item)].append(item.timestamp_ns)
            yield item

    async def close(self) -> None:
        await self.source.close()


def near(times_ns: list[int], item: GazeSample | SceneFrame) -> bool:
    """Whether a time in the sorted ``times_ns`` is within 1 ms of the item's."""
    i = bisect.bisect(times_ns, item.timestamp_ns)
    return any(abs(t - item.timestamp_ns) < 1_000_000 for t in times_ns[max(0, i - 1) : i + 1])


async def keyframes(
    source: Source, stop: asyncio.Event | None = None
) -> tuple[list[int], SourceInfo]:
    """The frame times of the keyframes the capture pipeline picks (until ``stop`` is set),
    and the source's info."""
    info = await source.open()
    settings = CaptureSettings(fixation_detector="ivt")  # the live source has no fixations
    found: list[int] = []

    async def run() -> None:
        async for result in capture(source, info, settings):
            if isinstance(result, CaptureResult) and result.crop is not None:
                found.append(result.matched.frame.timestamp_ns)

    try:
        if stop is None:
            await run()
        else:
            running = asyncio.create_task(run())
            await stop.wait()
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
    finally:
        await source.close()
    return found, info


async def test_capture_through_the_simulator_picks_the_keyframes_of_the_direct_replay(
    neon_demo: Path,
) -> None:
    """The live path (simulator, RTSP, the realtime client, NeonLiveSource) picks the same
    keyframes as replaying the same frames and gaze samples directly."""
    rec_gaze, rec_frames = await recorded(neon_demo)
    first_ns = min(rec_gaze[0].timestamp_ns, rec_frames[0].timestamp_ns)
    async with simulator(neon_demo) as sim:
        end = asyncio.Event()
        played = asyncio.create_task(sim.wait())
        played.add_done_callback(lambda _: asyncio.get_running_loop().call_later(1, end.set))
        # Frames from when gaze has flowed for a while: the first gaze comes with the gaze
        # stream's first sender report, and frames before it have no gaze to match live.
        live_source = Window(open_source(sim.uri), settle_ns=500_000_000)
        live, info = await keyframes(live_source, end)
        await played
        start_ns = sim.started_wall_ns
    # The direct replay gets what reached the live consumer: not the gaze sent before the
    # first sender report, nor what the live source dropped (stale frames, a full gaze queue:
    # a slow consumer, a busy machine).
    # Live times are local: the device's less the clock offset Time Echo measured (its error
    # under load is the test's to undo, not the pipeline's).
    offset_ns = info.clock_offset.offset_ns if info.clock_offset is not None else 0
    to_recording_ns = first_ns - start_ns + offset_ns
    keep_ns = {
        kind: [t + to_recording_ns for t in times] for kind, times in live_source.passed_ns.items()
    }
    direct, _ = await keyframes(Window(open_source(str(neon_demo)), keep_ns))
    rec_frames_ns = [f.timestamp_ns for f in rec_frames]

    def index(recording_ns: int) -> int:
        """The recorded frame at a time."""
        i = bisect.bisect(rec_frames_ns, recording_ns)
        return min(
            (i - 1, i), key=lambda j: abs(rec_frames_ns[min(j, len(rec_frames) - 1)] - recording_ns)
        )

    live_frames = [index(t + to_recording_ns) for t in live]
    direct_frames = [index(t) for t in direct]
    assert len(live_frames) == len(direct_frames) >= 5, (live_frames, direct_frames, offset_ns)
    steps = [abs(a - b) for a, b in zip(live_frames, direct_frames, strict=True)]
    # Within one frame (issue 12). A keyframe one frame off moves the ones after it by as much
    # (keyframes come at most once a second, counted from the one before): seen in one run of
    # five, [0, 0, 0, 0, 1, 1, 1, 1]. The 3 frames off once seen before did not recur in 7
    # runs (2 of them with two busy loops beside); their cause was not isolated.
    assert max(steps) <= 1, (live_frames, direct_frames)
