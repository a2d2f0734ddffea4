"""NeonLiveSource against fake glasses: real realtime-API records, a real Time Echo server.

Only the hardware is faked (``FakeLink`` replaces discovery, the HTTP status, the calibration
and the RTSP streams); the clock offset goes through the library's Time Echo client against a
TCP server on 127.0.0.1 whose clock runs ahead by a known amount.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import av
import numpy as np
import pytest
from aiohttp import web
from pupil_labs.neon_recording.calib import Calibration
from pupil_labs.realtime_api.models import Hardware, Phone, Sensor, Status
from pupil_labs.realtime_api.streaming.gaze import DualMonocularGazeData, GazeData, Point
from pupil_labs.realtime_api.streaming.video import VideoFrame

from gazecam.errors import ConfigError, DeviceUnreachableError, MissingDependencyError, SourceError
from gazecam.records import CameraIntrinsics, GazeSample, SceneFrame, SourceItem
from gazecam.settings import SourceSettings
from gazecam.sources import neon_live, open_source
from gazecam.sources.neon_link import NeonLink
from gazecam.sources.neon_live import GAZE_QUEUE_LEN, NeonLiveSource, parse_neon_address

ADDRESS = "neon://127.0.0.1:8080"
DEVICE_AHEAD_MS = 1234  # the fake glasses' clock runs this far ahead of ours
CLOCK_JUMP_MS = [0]  # and then this much more: a test sets the glasses' clock (as NTP does)
T0_S = 1_700_000_000.0  # device time of the first synthetic gaze sample
# Scene frames are stamped with the time they are made (the source drops a frame whose time
# is further than neon_max_frame_age_s from its arrival).


def settings(**overrides: float) -> SourceSettings:
    """Small timeouts and backoffs so that failures show within milliseconds."""
    values: dict[str, float] = {
        "neon_discovery_timeout_s": 0.1,
        "neon_connect_timeout_s": 2.0,
        "neon_reconnect_attempts": 3,
        "neon_reconnect_backoff_s": 0.01,
        "neon_time_echo_samples": 5,
    }
    values.update(overrides)
    return SourceSettings(**values)  # type: ignore[arg-type]


def video_frame(value: int, ts_s: float) -> VideoFrame:
    """A 64x48 frame filled with ``value``, as the realtime API hands it over."""
    img = np.full((48, 64, 3), value, dtype=np.uint8)
    return VideoFrame(av.VideoFrame.from_ndarray(img, format="bgr24"), ts_s)


def status(time_echo_port: int | None = None, world_connected: bool = True) -> Status:
    """A Companion app status with direct gaze and world sensors on 127.0.0.1."""
    phone = Phone(100, "OK", "id", "Neon Companion", "127.0.0.1", 1 << 30, "OK", time_echo_port)
    sensors = [
        Sensor("gaze", "DIRECT", True, "127.0.0.1", "camera=gaze", 8086),
        Sensor("world", "DIRECT", world_connected, "127.0.0.1", "camera=world", 8086),
    ]
    return Status(phone, Hardware(), sensors, None)


async def stay_silent() -> None:
    """What a connected stream does between items: wait (here, until cancelled)."""
    await asyncio.Event().wait()


async def hang() -> AsyncGenerator[object, None]:
    """A stream that stays open and silent."""
    await stay_silent()
    yield None


Session = Callable[[], AsyncGenerator[object, None]]


class FakeLink(NeonLink):
    """Fake glasses: each receive_* call plays the next scripted session, then stays silent."""

    def __init__(
        self,
        device_status: Status | None = None,
        gaze: list[Session] | None = None,
        video: list[Session] | None = None,
        found: tuple[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.status = device_status or status()
        self.gaze_sessions = list(gaze or [])
        self.video_sessions = list(video or [])
        self.found = found
        self.connected_to: tuple[str, int] | None = None
        self.closed = 0

    async def discover(self, timeout_s: float) -> tuple[str, int] | None:
        return self.found

    async def connect(self, host: str, port: int) -> Status:
        self.connected_to = (host, port)
        return self.status

    async def scene_camera(self) -> CameraIntrinsics:
        return CameraIntrinsics.from_raw(np.eye(3), np.zeros(8))

    def receive_gaze(self, url: str, timeout_s: float) -> AsyncGenerator[GazeData, None]:
        return (self.gaze_sessions.pop(0) if self.gaze_sessions else hang)()  # type: ignore[return-value]

    def receive_video(self, url: str, timeout_s: float) -> AsyncGenerator[VideoFrame, None]:
        return (self.video_sessions.pop(0) if self.video_sessions else hang)()  # type: ignore[return-value]

    async def close(self) -> None:
        self.closed += 1


@pytest.fixture
async def time_echo_port() -> AsyncIterator[int]:
    """A Time Echo server on 127.0.0.1 whose clock is DEVICE_AHEAD_MS ahead of ours."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while request := await reader.read(8):
                (client_ms,) = struct.unpack("!Q", request)
                host_ms = time.time_ns() // 1_000_000 + DEVICE_AHEAD_MS + CLOCK_JUMP_MS[0]
                writer.write(struct.pack("!QQ", client_ms, host_ms))
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]
    CLOCK_JUMP_MS[0] = 0


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def pull(stream: AsyncGenerator[SourceItem, None], n: int) -> list[SourceItem]:
    """The next n items, failing the test instead of hanging."""
    return [await asyncio.wait_for(anext(stream), 2.0) for _ in range(n)]


# --- addresses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("neon://auto", None),
        ("neon://192.168.1.20", ("192.168.1.20", 8080)),
        ("neon://neon.local:8081", ("neon.local", 8081)),
        ("neon://127.0.0.1:8080/", ("127.0.0.1", 8080)),
        ("neon://AUTO", None),
        ("neon://neon-1.local:65535", ("neon-1.local", 65535)),
    ],
)
def test_parse_address(address: str, expected: tuple[str, int] | None) -> None:
    assert parse_neon_address(address) == expected


@pytest.mark.parametrize(
    "address",
    [
        *("neon://", "neon://host:port", "neon://host:70000", "neon://a b", "neon://h/x"),
        *("neon://:8080", "neon://host:0", "neon://auto:8080", "neon://-host", "neon://a..b"),
    ],
)
def test_bad_address_is_config_error(address: str) -> None:
    with pytest.raises(ConfigError, match="not a Neon address") as err:
        NeonLiveSource(address, settings())
    assert str(err.value).startswith(address + ":")


def test_open_source_makes_a_live_source() -> None:
    assert isinstance(open_source("neon://auto", settings()), NeonLiveSource)


def test_missing_library_is_missing_dependency(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pupil_labs.realtime_api.device", None)
    with pytest.raises(MissingDependencyError, match="pupil-labs-realtime-api"):
        NeonLiveSource("neon://auto", settings())


# --- open ----------------------------------------------------------------------------------


async def test_open_estimates_offset_and_stream_converts_to_local_time(
    time_echo_port: int,
) -> None:
    device_ts_s = time.time() + DEVICE_AHEAD_MS / 1000  # the glasses' clock now

    async def gaze() -> AsyncGenerator[object, None]:
        yield GazeData(812.5, 600.25, True, device_ts_s)
        yield DualMonocularGazeData(Point(10.0, 20.0), Point(30.0, 40.0), False, device_ts_s)
        await stay_silent()

    async def video() -> AsyncGenerator[object, None]:
        await asyncio.sleep(0.05)  # after the gaze, so the order below is fixed
        yield video_frame(77, device_ts_s + 0.01)
        await stay_silent()

    link = FakeLink(status(time_echo_port), [gaze], [video])
    source = NeonLiveSource(ADDRESS, settings(), link)
    info = await source.open()
    assert link.connected_to == ("127.0.0.1", 8080)
    assert (info.uri, info.kind, info.frame_width_px, info.frame_height_px) == (
        ADDRESS,
        "neon-live",
        1600,
        1200,
    )
    assert info.frame_count is None and not info.has_fixations
    assert info.camera == CameraIntrinsics.from_raw(np.eye(3), np.zeros(8))
    offset = info.clock_offset
    assert offset is not None and offset.samples == 5
    # ClockOffset is device - local: positive for glasses that run ahead (Time Echo is in ms).
    assert abs(offset.offset_ns - DEVICE_AHEAD_MS * 1_000_000) <= 2_000_000 + offset.spread_ns

    stream = source.stream()
    g1, g2, frame = await pull(stream, 3)
    assert g1 == GazeSample(
        GazeData(0, 0, True, device_ts_s).timestamp_unix_ns - offset.offset_ns, 812.5, 600.25, True
    )
    # Dual-monocular gaze has no binocular point: the left eye's is used.
    assert isinstance(g2, GazeSample) and (g2.x_px, g2.y_px, g2.worn) == (10.0, 20.0, False)
    assert isinstance(frame, SceneFrame)
    assert frame.timestamp_ns == video_frame(0, device_ts_s + 0.01).timestamp_unix_ns - (
        offset.offset_ns
    )
    assert (frame.index, frame.width_px, frame.height_px) == (0, 64, 48)
    pixels = frame.bgr()
    assert pixels.shape == (48, 64, 3) and (pixels == 77).all()
    assert (source.stats.gaze_in, source.stats.frames_in, source.stats.reconnects) == (2, 1, 0)
    await stream.aclose()
    await source.close()
    await source.close()  # safe twice
    assert link.closed == 2


async def test_no_time_echo_port_means_no_offset(caplog: pytest.LogCaptureFixture) -> None:
    async def gaze() -> AsyncGenerator[object, None]:
        yield GazeData(1.0, 2.0, True, T0_S)
        await stay_silent()

    source = NeonLiveSource(ADDRESS, settings(), FakeLink(status(None), [gaze]))
    with caplog.at_level(logging.WARNING):
        info = await source.open()
    assert info.clock_offset is None
    assert f"{ADDRESS}: no clock offset" in caplog.text
    stream = source.stream()
    (sample,) = await pull(stream, 1)
    assert isinstance(sample, GazeSample)
    assert sample.timestamp_ns == GazeData(0, 0, True, T0_S).timestamp_unix_ns  # unchanged
    await stream.aclose()
    await source.close()


async def test_failed_time_echo_means_no_offset(caplog: pytest.LogCaptureFixture) -> None:
    source = NeonLiveSource(ADDRESS, settings(), FakeLink(status(closed_port())))
    with caplog.at_level(logging.WARNING):
        info = await source.open()
    assert info.clock_offset is None
    assert "no clock offset" in caplog.text
    await source.close()


async def test_auto_uses_the_discovered_device() -> None:
    link = FakeLink(found=("127.0.0.1", 8081))
    source = NeonLiveSource("neon://auto", settings(), link)
    info = await source.open()
    assert link.connected_to == ("127.0.0.1", 8081) and info.uri == "neon://auto"
    await source.close()


async def test_auto_with_nothing_found_is_unreachable() -> None:
    source = NeonLiveSource("neon://auto", settings(), FakeLink(found=None))
    with pytest.raises(DeviceUnreachableError) as err:
        await source.open()
    assert str(err.value) == "neon://auto: no Neon found on the network within 0.1 s"


async def test_unconnected_sensor_is_source_error() -> None:
    link = FakeLink(status(world_connected=False))
    with pytest.raises(SourceError, match=r"^neon://127\.0\.0\.1:8080: scene camera sensor not"):
        await NeonLiveSource(ADDRESS, settings(), link).open()
    assert link.closed == 1


async def test_refused_connection_is_unreachable_quickly() -> None:
    port = closed_port()
    source = NeonLiveSource(f"neon://127.0.0.1:{port}", settings(neon_connect_timeout_s=1.0))
    t0 = time.monotonic()
    with pytest.raises(DeviceUnreachableError) as err:
        await source.open()
    assert time.monotonic() - t0 < 1.0
    message = str(err.value)
    assert message.startswith(f"neon://127.0.0.1:{port}: device unreachable (")
    assert "\n" not in message
    await source.close()


async def test_silent_device_times_out() -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        source = NeonLiveSource(f"neon://127.0.0.1:{port}", settings(neon_connect_timeout_s=0.2))
        with pytest.raises(DeviceUnreachableError) as err:
            await source.open()
        assert str(err.value) == (
            f"neon://127.0.0.1:{port}: device unreachable (no answer within 0.2 s)"
        )


async def serve_companion_api(time_echo_port: int, calibration: bytes | None) -> web.AppRunner:
    """The Companion app's HTTP API on 127.0.0.1: /api/status and /calibration.bin."""
    components = [
        {"model": "Phone", "data": status(time_echo_port).phone._asdict()},
        *({"model": "Sensor", "data": sensor._asdict()} for sensor in status().sensors),
    ]

    async def get_status(request: web.Request) -> web.Response:
        return web.json_response({"result": components})

    async def get_calibration(request: web.Request) -> web.Response:
        if calibration is None:
            return web.Response(status=404)
        return web.Response(body=calibration)

    app = web.Application()
    app.router.add_get("/api/status", get_status)
    app.router.add_get("/calibration.bin", get_calibration)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


@pytest.mark.parametrize("has_calibration", [True, False])
async def test_open_through_the_real_client(
    time_echo_port: int, has_calibration: bool, caplog: pytest.LogCaptureFixture
) -> None:
    record = np.zeros(1, dtype=Calibration.dtype)
    record["scene_camera_matrix"][0] = [[890.0, 0.0, 800.0], [0.0, 890.0, 600.0], [0.0, 0.0, 1.0]]
    record["scene_distortion_coefficients"][0] = np.arange(8) / 100
    calibration = record.tobytes() if has_calibration else None
    runner = await serve_companion_api(time_echo_port, calibration)
    port = runner.addresses[0][1]
    source = NeonLiveSource(f"neon://127.0.0.1:{port}", settings())
    try:
        with caplog.at_level(logging.WARNING):
            info = await source.open()
    finally:
        await source.close()
        await runner.cleanup()
    assert info.clock_offset is not None
    if has_calibration:
        assert info.camera == CameraIntrinsics(
            ((890.0, 0.0, 800.0), (0.0, 890.0, 600.0), (0.0, 0.0, 1.0)),
            tuple(n / 100 for n in range(8)),
        )
    else:
        assert info.camera is None
        assert f"neon://127.0.0.1:{port}: no scene camera calibration (" in caplog.text


# --- stream --------------------------------------------------------------------------------


async def test_slow_consumer_gets_the_newest_frame_and_drops_are_counted() -> None:
    release = asyncio.Event()

    async def video() -> AsyncGenerator[object, None]:
        t0_s = time.time()
        yield video_frame(0, t0_s)
        await release.wait()
        for n in range(1, 5):
            yield video_frame(n, t0_s + n / 30)
        await stay_silent()

    source = NeonLiveSource(ADDRESS, settings(), FakeLink(status(), video=[video]))
    await source.open()
    stream = source.stream()
    (first,) = await pull(stream, 1)
    release.set()
    await asyncio.sleep(0.1)  # the consumer is busy while frames 1-4 arrive
    (second,) = await pull(stream, 1)
    assert isinstance(first, SceneFrame) and isinstance(second, SceneFrame)
    assert (first.index, second.index) == (0, 4)
    assert (second.bgr() == 4).all()
    assert (source.stats.frames_in, source.stats.frames_dropped) == (5, 3)
    await stream.aclose()
    await source.close()


async def test_frames_off_the_clock_are_dropped_and_the_clock_measured_again(
    time_echo_port: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A frame whose time is far from its arrival is never handed over: its stamp is wrong
    (a new RTSP session mapped with the last one's clock), or the glasses' clock was set."""
    monkeypatch.setattr(neon_live, "CLOCK_RECHECK_S", 0.0)  # not 5 s: the test is short

    def device_now_s() -> float:
        return time.time() + (DEVICE_AHEAD_MS + CLOCK_JUMP_MS[0]) / 1000

    async def video() -> AsyncGenerator[object, None]:
        yield video_frame(1, device_now_s())
        yield video_frame(2, device_now_s() - 7 * 3600)  # stamped hours in the past
        CLOCK_JUMP_MS[0] = 3000  # the glasses' clock moves 3 s on
        for value in range(3, 40):
            yield video_frame(value, device_now_s())
            await asyncio.sleep(0.01)
        await stay_silent()

    source = NeonLiveSource(ADDRESS, settings(), FakeLink(status(time_echo_port), video=[video]))
    info = await source.open()
    assert info.clock_offset is not None
    stream = source.stream()
    with caplog.at_level(logging.WARNING):
        frames = await pull(stream, 2)
    values = [int(f.bgr()[0, 0, 0]) for f in frames if isinstance(f, SceneFrame)]
    # Frame 2 and those after the jump are dropped until the clock has been measured again.
    assert values[0] == 1 and values[1] > 3
    for frame in frames:
        assert isinstance(frame, SceneFrame)
        assert abs(time.time_ns() - frame.timestamp_ns) < 1e9
    assert source.stats.frames_stale == values[1] - 2
    assert source.stats.clock_estimates == 2
    assert f"{ADDRESS}: a scene frame arrived late by 2.52e+04 s" in caplog.text
    await stream.aclose()
    await source.close()


async def test_close_stops_a_busy_stream_at_once() -> None:
    """Regression: the pumps waited for each item with asyncio.wait_for, which (before Python
    3.12) can swallow the cancellation close() sends as an item comes; a pump then went on
    streaming, and close() waited for it as long as the glasses sent."""
    sending = True

    async def gaze() -> AsyncGenerator[object, None]:
        while sending:  # an item whenever the loop comes round: the race, every time
            yield GazeData(1.0, 2.0, True, T0_S)
            await asyncio.sleep(0)

    for _ in range(20):
        # No reconnects: a pump that missed its cancellation ends when its stream does.
        source = NeonLiveSource(
            ADDRESS, settings(neon_reconnect_attempts=0), FakeLink(status(), gaze=[gaze])
        )
        await source.open()
        stream = source.stream()
        await pull(stream, 50)
        closing = asyncio.create_task(source.close())
        done, _ = await asyncio.wait({closing}, timeout=2)
        sending = bool(done)  # else end the stream, so that the test fails instead of hanging
        await closing
        await stream.aclose()
        assert done, "close() waited for a pump that went on streaming"


async def test_gaze_queue_drops_the_oldest_when_full() -> None:
    release = asyncio.Event()
    n_sent = GAZE_QUEUE_LEN + 50

    async def gaze() -> AsyncGenerator[object, None]:
        yield GazeData(-1.0, -1.0, True, T0_S)
        await release.wait()
        for n in range(n_sent):
            yield GazeData(float(n), 0.0, True, T0_S + (n + 1) / 200)
        await stay_silent()

    source = NeonLiveSource(ADDRESS, settings(), FakeLink(status(), gaze=[gaze]))
    await source.open()
    stream = source.stream()
    await pull(stream, 1)
    release.set()
    await asyncio.sleep(0.2)
    rest = await pull(stream, GAZE_QUEUE_LEN)
    assert [s.x_px for s in rest if isinstance(s, GazeSample)] == [
        float(n) for n in range(50, n_sent)
    ]
    assert (source.stats.gaze_in, source.stats.gaze_dropped) == (n_sent + 1, 50)
    await stream.aclose()
    await source.close()


async def test_reconnects_after_a_dropped_stream(caplog: pytest.LogCaptureFixture) -> None:
    async def dropped() -> AsyncGenerator[object, None]:
        yield video_frame(1, time.time())
        raise ConnectionResetError("Connection reset by peer")

    async def resumed() -> AsyncGenerator[object, None]:
        yield video_frame(2, time.time())
        await stay_silent()

    source = NeonLiveSource(ADDRESS, settings(), FakeLink(status(), video=[dropped, resumed]))
    await source.open()
    stream = source.stream()
    with caplog.at_level(logging.WARNING):
        frames = await pull(stream, 2)
    assert [f.bgr()[0, 0, 0] for f in frames if isinstance(f, SceneFrame)] == [1, 2]
    assert source.stats.reconnects == 1
    assert f"{ADDRESS}: scene video: Connection reset by peer; reconnecting" in caplog.text
    await stream.aclose()
    await source.close()


async def test_gives_up_after_the_allowed_reconnects() -> None:
    async def refused() -> AsyncGenerator[object, None]:
        raise ConnectionRefusedError("Connection refused")
        yield  # an async generator that fails on its first item

    link = FakeLink(status(), gaze=[refused] * 3)
    source = NeonLiveSource(ADDRESS, settings(neon_reconnect_attempts=2), link)
    await source.open()
    with pytest.raises(DeviceUnreachableError) as err:
        await pull(source.stream(), 1)
    assert str(err.value) == (
        f"{ADDRESS}: stream lost after 2 reconnects (gaze: Connection refused)"
    )
    assert source.stats.reconnects == 2
    await source.close()


async def test_a_silent_stream_counts_as_lost() -> None:
    source = NeonLiveSource(
        ADDRESS,
        settings(neon_connect_timeout_s=0.1, neon_reconnect_attempts=0),
        FakeLink(status()),
    )
    await source.open()
    lost = r"^neon://127\.0\.0\.1:8080: stream lost after 0 reconnects \(no (gaze|scene video) "
    lost += r"for 0\.1 s\)$"
    with pytest.raises(DeviceUnreachableError, match=lost):
        await pull(source.stream(), 1)
    await source.close()


async def test_stream_before_open_is_source_error() -> None:
    source = NeonLiveSource(ADDRESS, settings(), FakeLink(status()))
    with pytest.raises(SourceError, match="before open"):
        await anext(source.stream())


async def test_real_rtsp_receiver_to_a_dead_port_counts_as_lost() -> None:
    """The library's own RTSP gaze receiver, pointed at a closed port, is stopped cleanly."""

    class RealGazeLink(FakeLink):
        receive_gaze = NeonLink.receive_gaze  # type: ignore[assignment]

    async def video() -> AsyncGenerator[object, None]:
        for _ in range(1000):  # the scene camera keeps delivering meanwhile
            yield video_frame(0, time.time())
            await asyncio.sleep(1 / 30)

    dead = status()
    dead.sensors[:] = [s._replace(port=closed_port()) for s in dead.sensors]
    source = NeonLiveSource(
        ADDRESS,
        settings(neon_connect_timeout_s=0.3, neon_reconnect_attempts=1),
        RealGazeLink(dead, video=[video]),
    )
    await source.open()
    with pytest.raises(DeviceUnreachableError) as err:
        async for _ in source.stream():
            pass
    # The session's own error, not only that it ended.
    assert str(err.value) == (
        f"{ADDRESS}: stream lost after 1 reconnects (gaze: Unable to connect to "
        f"127.0.0.1:{dead.sensors[0].port})"
    )
    assert source.stats.reconnects == 1 and source.stats.frames_in > 0
    await source.close()
