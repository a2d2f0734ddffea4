"""A recording played as a Neon Companion device presents it on the network.

What the realtime client (``pupil_labs.realtime_api``, unmodified) reads from a Companion app:

- the HTTP API (aiohttp): ``/api/status`` (phone, hardware, the gaze and scene-camera sensors
  with their RTSP URLs), the recording and event endpoints, and ``/calibration.bin``;
- the RTSP streams (GStreamer's RTSP server, in a child process: see ``gst_rtsp``): the scene
  video as H.264 and gaze as Neon's own RTP payload, with RTCP sender reports;
- Time Echo (the TCP protocol in ``pupil_labs.realtime_api.time_echo``);
- an mDNS announcement (zeroconf) under the name the client's discovery looks for.

The recording is read through the project's own sources (``open_source``: Neon native,
Cloud export or ``synthetic:NAME``) and played in real time times ``rate``: an item recorded
``t`` after the first is sent ``t / rate`` after the start, stamped with the device clock at
that moment (the wall clock plus ``Faults.clock_jump_ns``).

Faults (``Faults``) are injected while it plays, from the command line or from tests: drop
every RTSP connection, stall one stream, jump the device clock, hold gaze back and send it out
of order, or go away (no streams, no HTTP answers) for a while.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
import struct
import sys
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from gazecam.errors import ConfigError, GazecamError, MissingDependencyError, SourceError
from gazecam.records import BGRImage, GazeSample, SceneFrame, SourceInfo
from gazecam.settings import SourceSettings
from gazecam.simulate import gst_rtsp
from gazecam.sources import detect_folder_format, open_source
from gazecam.sources.base import Source

logger = logging.getLogger(__name__)

# A gap between the passes of a looped recording: one scene frame at 30 Hz.
_PASS_GAP_NS = 33_333_333
_CHILD_START_TIMEOUT_S = 20.0


class SimulatorError(GazecamError):
    """The simulator cannot start or stopped serving (port in use, no GStreamer, ...)."""


class SimulatorSettings(BaseSettings):
    """How ``gazecam simulate-neon`` presents itself."""

    model_config = SettingsConfigDict(env_prefix="GAZECAM_SIM_", extra="ignore")

    host: str = Field(
        "127.0.0.1",
        description="Address the HTTP API, RTSP and Time Echo listen on (loopback by default: "
        "the simulator has no authentication, as the Companion app has none).",
    )
    port: int = Field(8080, ge=0, le=65535, description="HTTP API port (0: any free port).")
    rate: float = Field(1.0, gt=0, le=16, description="Playback speed; 1 is real time.")
    loop: bool = Field(False, description="Play the recording again and again.")
    mdns: bool = Field(True, description="Announce the device by mDNS (for neon://auto).")
    gst_python: str = Field(
        "/usr/bin/python3",
        description="The Python that has PyGObject and GStreamer's RTSP server (Debian's "
        "python3-gi, gir1.2-gst-rtsp-server-1.0); runs the RTSP streams.",
    )
    device_name: str = Field("Neon Simulator", description="The phone's name in status/mDNS.")


@dataclass
class Faults:
    """Faults being injected now (mutable: changed while the simulator plays)."""

    stall_video_until_ns: int = 0  # monotonic: no scene frames before then
    stall_gaze_until_ns: int = 0
    away_until_ns: int = 0  # no streams and no HTTP answers before then
    clock_jump_ns: int = 0  # added to the device clock
    gaze_delay_ns: int = 0  # gaze is held back this long and sent in bursts
    gaze_reorder: bool = False  # a held-back burst is sent newest first


@dataclass
class SimulatorStats:
    """What the simulator has sent (mutable)."""

    frames_sent: int = 0
    gaze_sent: int = 0
    frames_skipped: int = 0  # not sent: stalled, away, or nobody could have seen them
    drops: int = 0
    passes: int = 0


def gaze_payload(sample: GazeSample) -> bytes:
    """Neon's gaze RTP payload as the client parses it (``GazeData.from_raw``): x, y in scene
    pixels as big-endian floats, then 255 when the glasses are worn, else 0."""
    return struct.pack("!ffB", sample.x_px, sample.y_px, 255 if sample.worn else 0)


def _reply(result: Any, status: int = 200, message: str = "Success") -> Any:
    from aiohttp import web

    return web.json_response({"message": message, "result": result}, status=status)


class NeonSimulator:
    """Serves one recording as a Neon Companion device; ``async with`` starts and stops it."""

    def __init__(self, address: str, settings: SimulatorSettings | None = None) -> None:
        self.address = address
        self.settings = settings or SimulatorSettings()
        self.faults = Faults()
        self.stats = SimulatorStats()
        self.http_port = 0
        self.rtsp_ports = (0, 0)  # scene video, gaze
        self.time_echo_port = 0
        self.device_id = uuid.uuid5(uuid.NAMESPACE_URL, address).hex[:16]
        self._info: SourceInfo | None = None
        self._child: asyncio.subprocess.Process | None = None
        self._child_errors: deque[str] = deque(maxlen=20)
        self._child_started = False
        self.started_wall_ns = 0  # device time of the first item (before any clock jump)
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: Any = None  # aiohttp's AppRunner
        self._time_echo: asyncio.Server | None = None
        self._zeroconf: Any = None
        self._recording_id: str | None = None
        self._recording_start_ns = 0
        self._done = asyncio.Event()

    @property
    def uri(self) -> str:
        """The simulated device's source address, ``neon://HOST:PORT``."""
        return f"neon://{self.settings.host}:{self.http_port}"

    def device_ns(self) -> int:
        """The simulated device's clock: Unix nanoseconds."""
        return time.time_ns() + self.faults.clock_jump_ns

    async def __aenter__(self) -> NeonSimulator:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Check the recording, then start the RTSP child, Time Echo, HTTP and mDNS."""
        try:
            import aiohttp  # noqa: F401
        except ImportError as exc:
            raise MissingDependencyError("aiohttp", "neon", "The Neon simulator") from exc
        source = open_source(self.address, SourceSettings(pace="fast"))
        self._info = await source.open()  # an unplayable recording fails here, with its name
        await source.close()
        try:
            await self._start_child(self._info)
            await self._start_time_echo()
            await self._start_http()
            if self.settings.mdns:
                await self._announce()
        except BaseException:
            await self.stop()
            raise
        self._tasks.append(asyncio.create_task(self._play()))

    async def wait(self) -> None:
        """Until the recording has been played to its end (never, with ``loop``)."""
        await self._done.wait()
        for task in self._tasks:
            if task.done():
                task.result()  # the player's error, if it failed

    async def stop(self) -> None:
        """Stop everything that was started. Safe to call twice."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._zeroconf is not None:
            zeroconf, self._zeroconf = self._zeroconf, None
            await zeroconf.async_unregister_all_services()
            await zeroconf.async_close()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        if self._time_echo is not None:
            self._time_echo.close()
            await self._time_echo.wait_closed()
            self._time_echo = None
        if self._child is not None:
            child, self._child = self._child, None
            if child.stdin is not None:
                child.stdin.close()  # the child ends when its input does
            try:
                await asyncio.wait_for(child.wait(), 5)
            except asyncio.TimeoutError:
                child.kill()
                await child.wait()

    # -- faults ---------------------------------------------------------------------------

    async def drop_connections(self) -> None:
        """Close every RTSP client's connection, as a Wi-Fi hiccup does."""
        self.stats.drops += 1
        await self._send(gst_rtsp.KIND_COMMAND, 0, b"drop")

    def stall(self, stream: str, seconds: float) -> None:
        """Send nothing on one stream ('video' or 'gaze') for ``seconds``."""
        until_ns = time.monotonic_ns() + round(seconds * 1e9)
        if stream == "video":
            self.faults.stall_video_until_ns = until_ns
        elif stream == "gaze":
            self.faults.stall_gaze_until_ns = until_ns
        else:
            raise ConfigError(f"stall: unknown stream {stream!r} (video or gaze)")

    def jump_clock(self, seconds: float) -> None:
        """Move the device clock by ``seconds`` (a phone's clock corrected by NTP)."""
        self.faults.clock_jump_ns += round(seconds * 1e9)

    async def go_away(self, seconds: float) -> None:
        """Vanish for ``seconds``: streams dropped, nothing sent, HTTP unanswered."""
        self.faults.away_until_ns = time.monotonic_ns() + round(seconds * 1e9)
        await self.drop_connections()

    # -- the parts ------------------------------------------------------------------------

    async def _start_child(self, info: SourceInfo) -> None:
        try:
            self._child = await asyncio.create_subprocess_exec(
                self.settings.gst_python,
                gst_rtsp.__file__,
                "--host",
                self.settings.host,
                "--width",
                str(info.frame_width_px),
                "--height",
                str(info.frame_height_px),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                # Its own session: a Ctrl-C at the terminal is the parent's to handle; the
                # child ends when its input closes.
                start_new_session=True,
            )
        except OSError as exc:
            raise SimulatorError(
                f"{self.settings.gst_python}: cannot run it for the RTSP server "
                f"({exc.strerror}; set GAZECAM_SIM_GST_PYTHON)"
            ) from exc
        assert self._child.stdout is not None and self._child.stderr is not None
        self._tasks.append(asyncio.create_task(self._log_child(self._child.stderr)))
        try:
            line = await asyncio.wait_for(self._child.stdout.readline(), _CHILD_START_TIMEOUT_S)
        except asyncio.TimeoutError:
            line = b""
        words = line.decode(errors="replace").split()
        if len(words) != 3 or words[0] != "ready":
            await asyncio.wait_for(self._child.wait(), 5)
            await asyncio.sleep(0)  # let the stderr reader take the last lines
            why = self._child_errors[-1] if self._child_errors else "no answer"
            raise SimulatorError(f"RTSP server did not start: {why}")
        self.rtsp_ports = (int(words[1]), int(words[2]))
        self._child_started = True

    async def _log_child(self, stderr: asyncio.StreamReader) -> None:
        while line := await stderr.readline():
            text = line.decode(errors="replace").strip()
            if text and "has no property named 'pt'" not in text:  # GStreamer's own nag
                self._child_errors.append(text)
                # Before it started, its last line becomes the SimulatorError.
                if self._child_started:
                    logger.warning("RTSP server: %s", text)

    async def _start_time_echo(self) -> None:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # The protocol (pupil_labs.realtime_api.time_echo): the client sends its time in
            # ms as !Q; the device answers with it and its own time in ms, !QQ.
            try:
                while True:
                    request = await reader.readexactly(8)
                    if self._away():
                        break
                    writer.write(request + struct.pack("!Q", self.device_ns() // 1_000_000))
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass  # the client is done: it closes the connection after its measurements
            finally:
                writer.close()

        try:
            self._time_echo = await asyncio.start_server(echo, self.settings.host, 0)
        except OSError as exc:
            raise SimulatorError(
                f"Time Echo: cannot listen on {self.settings.host}: {exc}"
            ) from exc
        self.time_echo_port = self._time_echo.sockets[0].getsockname()[1]

    async def _start_http(self) -> None:
        from aiohttp import web

        @web.middleware
        async def away(request: web.Request, handler: Any) -> web.StreamResponse:
            if self._away():
                raise web.HTTPServiceUnavailable(text="the device is away (simulated fault)")
            response: web.StreamResponse = await handler(request)
            return response

        app = web.Application(middlewares=[away])
        app.router.add_get("/api/status", self._status)
        app.router.add_post("/api/recording:start", self._recording_start)
        app.router.add_post("/api/recording:stop_and_save", self._recording_stop)
        app.router.add_post("/api/recording:cancel", self._recording_stop)
        app.router.add_post("/api/event", self._event)
        app.router.add_get("/calibration.bin", self._calibration)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port)
        try:
            await site.start()
        except OSError as exc:
            why = "port in use" if exc.errno == errno.EADDRINUSE else str(exc)
            raise SimulatorError(
                f"{self.settings.host}:{self.settings.port}: cannot serve the HTTP API ({why}; "
                "--port 0 picks a free one)"
            ) from exc
        self.http_port = self._runner.addresses[0][1]

    async def _announce(self) -> None:
        from zeroconf import ServiceInfo
        from zeroconf.asyncio import AsyncZeroconf

        # The name the client's discovery keeps: 'PI monitor:<phone name>:<id>'.
        info = ServiceInfo(
            "_http._tcp.local.",
            f"PI monitor:{self.settings.device_name}:{self.device_id}._http._tcp.local.",
            addresses=[socket.inet_aton(self.settings.host)],
            port=self.http_port,
            server=f"neon-{self.device_id}.local.",
        )
        self._zeroconf = AsyncZeroconf(interfaces=[self.settings.host])
        try:
            await self._zeroconf.async_register_service(info)
        except OSError as exc:
            raise SimulatorError(
                f"mDNS: cannot announce on {self.settings.host} ({exc}); --no-mdns turns it off"
            ) from exc

    # -- HTTP -----------------------------------------------------------------------------

    def _away(self) -> bool:
        return time.monotonic_ns() < self.faults.away_until_ns

    async def _status(self, _request: Any) -> Any:
        host = self.settings.host
        world_port, gaze_port = self.rtsp_ports
        components: list[dict[str, Any]] = [
            {
                "model": "Phone",
                "data": {
                    "battery_level": 100,
                    "battery_state": "OK",
                    "device_id": self.device_id,
                    "device_name": self.settings.device_name,
                    "ip": host,
                    "memory": 64 * 2**30,
                    "memory_state": "OK",
                    "time_echo_port": self.time_echo_port,
                },
            },
            {"model": "Hardware", "data": {"version": "2.0", "module_serial": "simulated"}},
        ]
        for sensor, port in (("world", world_port), ("gaze", gaze_port)):
            components.append(
                {
                    "model": "Sensor",
                    "data": {
                        "sensor": sensor,
                        "conn_type": "DIRECT",
                        "connected": True,
                        "ip": host,
                        "port": port,
                        "protocol": "rtsp",
                        "params": f"camera={sensor}",
                        "stream_error": False,
                    },
                }
            )
        if self._recording_id is not None:
            components.append(
                {
                    "model": "Recording",
                    "data": {
                        "action": "START",
                        "id": self._recording_id,
                        "message": "",
                        "rec_duration_ns": self.device_ns() - self._recording_start_ns,
                    },
                }
            )
        return _reply(components)

    async def _recording_start(self, _request: Any) -> Any:
        if self._recording_id is not None:
            return _reply(None, 400, "Recording already running")
        self._recording_id = str(uuid.uuid4())
        self._recording_start_ns = self.device_ns()
        return _reply({"id": self._recording_id})

    async def _recording_stop(self, _request: Any) -> Any:
        if self._recording_id is None:
            return _reply(None, 400, "Recording not running")
        self._recording_id = None
        return _reply({})

    async def _event(self, request: Any) -> Any:
        try:
            body = json.loads(await request.read())
        except ValueError as exc:
            return _reply(None, 400, f"event: the body is not JSON ({exc})")
        name = body.get("name") if isinstance(body, dict) else None
        timestamp = body.get("timestamp", self.device_ns()) if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            return _reply(None, 400, "event: 'name' must be a non-empty string")
        if isinstance(timestamp, bool) or not isinstance(timestamp, int) or timestamp < 0:
            return _reply(None, 400, "event: 'timestamp' must be integer Unix nanoseconds")
        return _reply({"recording_id": self._recording_id, "timestamp": timestamp})

    async def _calibration(self, _request: Any) -> Any:
        from aiohttp import web

        data = self._calibration_bytes()
        if data is None:
            raise web.HTTPNotFound(text="the recording has no scene camera calibration")
        return web.Response(body=data, content_type="application/octet-stream")

    def _calibration_bytes(self) -> bytes | None:
        """The recording's own calibration.bin, or one written from its scene intrinsics."""
        own = Path(self.address).expanduser() / "calibration.bin"
        if (
            not self.address.startswith("synthetic:")
            and detect_folder_format(own.parent) == "neon-recording"
            and own.is_file()
        ):
            return own.read_bytes()
        camera = self._info.camera if self._info is not None else None
        if camera is None:
            return None
        import numpy as np
        from pupil_labs.neon_recording.calib import Calibration

        record = np.zeros((), dtype=Calibration.dtype)
        record["version"] = 1
        record["serial"] = b"sim000"
        record["scene_camera_matrix"] = camera.camera_matrix
        distortion = record["scene_distortion_coefficients"]
        distortion[: len(camera.distortion)] = camera.distortion
        return record.tobytes()

    # -- playing --------------------------------------------------------------------------

    async def _send(self, kind: int, device_ns: int, payload: bytes | memoryview) -> None:
        child = self._child
        if child is None or child.stdin is None:
            raise SimulatorError("the RTSP server is not running")
        try:
            child.stdin.write(gst_rtsp.HEADER.pack(kind, device_ns, len(payload)))
            child.stdin.write(payload)
            await child.stdin.drain()
        except ConnectionError as exc:
            why = self._child_errors[-1] if self._child_errors else "it exited"
            raise SimulatorError(f"the RTSP server stopped: {why}") from exc

    async def _items(self) -> AsyncIterator[tuple[int, GazeSample | SceneFrame]]:
        """``(time since the start of the first pass, item)`` of every pass, in order."""
        offset_ns = 0
        while True:
            source: Source = open_source(self.address, SourceSettings(pace="fast"))
            await source.open()
            first_ns: int | None = None
            last_ns = 0
            try:
                async for item in source.stream():
                    if not isinstance(item, GazeSample | SceneFrame):
                        continue  # fixations and events are not streamed by the Companion
                    if first_ns is None:
                        first_ns = item.timestamp_ns
                    last_ns = item.timestamp_ns - first_ns
                    yield offset_ns + last_ns, item
            finally:
                await source.close()
            self.stats.passes += 1
            if not self.settings.loop or first_ns is None:
                return
            offset_ns += last_ns + _PASS_GAP_NS

    async def _play(self) -> None:
        """Send each item when its time comes, stamped with the device clock."""
        rate = self.settings.rate
        start_mono_ns = time.monotonic_ns()
        self.started_wall_ns = time.time_ns()
        held: list[tuple[int, bytes]] = []  # gaze held back by Faults.gaze_delay_ns
        try:
            async for elapsed_ns, item in self._items():
                due_ns = start_mono_ns + round(elapsed_ns / rate)
                wait_ns = due_ns - time.monotonic_ns()
                if wait_ns > 0:
                    await asyncio.sleep(wait_ns / 1e9)
                now_ns = time.monotonic_ns()
                # The device stamps an item when it is captured: now, on its clock.
                device_ns = self.device_ns() - (now_ns - due_ns)
                if self._away():
                    self.stats.frames_skipped += isinstance(item, SceneFrame)
                    continue
                if isinstance(item, GazeSample):
                    if now_ns < self.faults.stall_gaze_until_ns:
                        continue
                    held.append((device_ns, gaze_payload(item)))
                    if device_ns - held[0][0] >= self.faults.gaze_delay_ns:
                        burst = held[::-1] if self.faults.gaze_reorder else held
                        for stamp_ns, payload in burst:
                            await self._send(gst_rtsp.KIND_GAZE, stamp_ns, payload)
                        self.stats.gaze_sent += len(held)
                        held = []
                elif now_ns < self.faults.stall_video_until_ns:
                    self.stats.frames_skipped += 1
                else:
                    pixels = await _decode(item)
                    if pixels.shape != (self._height(), self._width(), 3):
                        raise SourceError(
                            f"{self.address}: frame {item.index} is {pixels.shape[1]}×"
                            f"{pixels.shape[0]}, not {self._width()}×{self._height()}"
                        )
                    await self._send(gst_rtsp.KIND_FRAME, device_ns, pixels.tobytes())
                    self.stats.frames_sent += 1
        finally:
            self._done.set()

    def _width(self) -> int:
        assert self._info is not None
        return self._info.frame_width_px

    def _height(self) -> int:
        assert self._info is not None
        return self._info.frame_height_px


async def _decode(frame: SceneFrame) -> BGRImage:
    """A frame's pixels, decoded in a worker thread. Cancelled, it still waits for the thread:
    the source must stay open while its decoder runs."""
    decoding = asyncio.ensure_future(asyncio.to_thread(frame.decode))
    try:
        return await asyncio.shield(decoding)
    except asyncio.CancelledError:
        await asyncio.wait([decoding])
        raise


async def serve_forever(simulator: NeonSimulator) -> None:
    """Run a simulator until its recording ends (or forever with ``loop``), printing where."""
    async with simulator:
        world_port, gaze_port = simulator.rtsp_ports
        print(
            f"simulating a Neon from {simulator.address} at {simulator.uri} "
            f"(HTTP http://{simulator.settings.host}:{simulator.http_port}/api/status, "
            f"RTSP ports {world_port} and {gaze_port}, Time Echo {simulator.time_echo_port})",
            file=sys.stderr,
            flush=True,
        )
        await simulator.wait()
