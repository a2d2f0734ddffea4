"""The Neon simulator against Pupil Labs' own realtime client, unmodified.

The simulator plays the real neon-demo recording (its scene video rendered at the real frame
timestamps, each frame carrying its index as a frame code) through GStreamer's RTSP server;
the client reads status, calibration, Time Echo and both RTSP streams as from real glasses.
Nothing is faked.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
from pupil_labs.neon_recording.calib import Calibration
from pupil_labs.realtime_api.device import Device
from pupil_labs.realtime_api.streaming import receive_gaze_data, receive_video_frames
from pupil_labs.realtime_api.time_echo import TimeOffsetEstimator

from gazecam.capture import CaptureResult, capture
from gazecam.records import GazeSample, SceneFrame, SourceInfo, SourceItem
from gazecam.settings import CaptureSettings
from gazecam.simulate.neon_simulator import NeonSimulator, SimulatorSettings
from gazecam.sources import Source, open_source
from gazecam.sources.synthetic import read_frame_code
from tests.conftest import missing

MAX_LISTEN_S = 9.0  # the recording's gaze lasts 9 s


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


FRAME_NS = 33_333_333


class Window:
    """A source's gaze and frames from given times on; notes the first of each it passes."""

    def __init__(self, source: Source, gaze_from_ns: int = 0, frames_from_ns: int = 0) -> None:
        self.source, self.uri, self.stats = source, source.uri, source.stats
        self.start_ns = {GazeSample: gaze_from_ns, SceneFrame: frames_from_ns}
        self.first_ns: dict[type, int] = {}

    async def open(self) -> SourceInfo:
        return await self.source.open()

    async def stream(self) -> AsyncIterator[SourceItem]:
        async for item in self.source.stream():
            kind = type(item)
            if isinstance(item, GazeSample | SceneFrame):
                if item.timestamp_ns < self.start_ns[kind]:
                    continue
                self.first_ns.setdefault(kind, item.timestamp_ns)
            yield item

    async def close(self) -> None:
        await self.source.close()


async def keyframes(source: Source, stop: asyncio.Event | None = None) -> list[int]:
    """The frame times of the keyframes the capture pipeline picks (until ``stop`` is set)."""
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
    return found


async def test_capture_through_the_simulator_picks_the_keyframes_of_the_direct_replay(
    neon_demo: Path,
) -> None:
    """The live path (simulator, RTSP, the realtime client, NeonLiveSource) picks the same
    keyframes as replaying the recording from the moment the live streams began."""
    rec_gaze, rec_frames = await recorded(neon_demo)
    first_ns = min(rec_gaze[0].timestamp_ns, rec_frames[0].timestamp_ns)
    async with simulator(neon_demo) as sim:
        end = asyncio.Event()
        played = asyncio.create_task(sim.wait())
        played.add_done_callback(lambda _: asyncio.get_running_loop().call_later(1, end.set))
        live_source = Window(open_source(sim.uri))
        live = await keyframes(live_source, end)
        await played
        start_ns = sim.started_wall_ns
    # The same moments, as times since the recording's first item.
    live_first = {kind: t - start_ns + first_ns for kind, t in live_source.first_ns.items()}
    direct = await keyframes(
        Window(open_source(str(neon_demo)), live_first[GazeSample], live_first[SceneFrame])
    )
    live_s = [(t - start_ns) / 1e9 for t in live]
    direct_s = [(t - first_ns) / 1e9 for t in direct]
    assert len(live_s) == len(direct_s) >= 5, (live_s, direct_s)
    gaps_s = [abs(a - b) for a, b in zip(live_s, direct_s, strict=True)]
    assert max(gaps_s) <= FRAME_NS / 1e9, (live_s, direct_s)
