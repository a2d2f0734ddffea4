"""A recording played as a Neon Companion device presents it on the network.

What the realtime client (``pupil_labs.realtime_api``, unmodified) reads from a Companion app:

- the HTTP API (aiohttp): ``/api/status`` (phone, hardware, the gaze and scene-camera sensors
  with their RTSP URLs), the recording and event endpoints, and ``/calibration.bin``;
- the RTSP streams (GStreamer's RTSP server, in a child process: see ``gst_rtsp``): the scene
  video as H.264 (the recording's own where it can be streamed as it is, else re-encoded: see
  ``scene_video``) and gaze as Neon's own RTP payload, with RTCP sender reports;
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
import logging
import socket
import struct
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gazecam.errors import ConfigError, MissingDependencyError, SimulatorError
from gazecam.records import GazeSample, SceneFrame, SourceInfo
from gazecam.settings import SourceSettings
from gazecam.simulate import gst_rtsp
from gazecam.simulate.faults import Faults, FaultStep, parse_fault
from gazecam.simulate.rtsp_child import RtspChild
from gazecam.simulate.scene_video import H264Track, Passthrough, Reencode, probe_passthrough
from gazecam.sources import open_source, scene_video_files
from gazecam.sources.base import Source

logger = logging.getLogger(__name__)

# A gap between the passes of a looped recording: one scene frame at 30 Hz.
_PASS_GAP_NS = 33_333_333


class SimulatorSettings(BaseSettings):
    """How ``gazecam simulate-neon`` presents itself."""

    model_config = SettingsConfigDict(env_prefix="GAZECAM_", extra="ignore")

    sim_host: str = Field(
        "127.0.0.1",
        description="Address the HTTP API, RTSP and Time Echo listen on (loopback by default: "
        "the simulator has no authentication, as the Companion app has none).",
    )
    sim_port: int = Field(8080, ge=0, le=65535, description="HTTP API port (0: any free port).")
    sim_rate: float = Field(1.0, gt=0, le=16, description="Playback speed; 1 is real time.")
    sim_loop: bool = Field(False, description="Play the recording again and again.")
    sim_mdns: bool = Field(True, description="Announce the device by mDNS (for neon://auto).")
    sim_reencode: bool = Field(
        False,
        description="Decode the scene video and encode it again (x264, a keyframe a second) "
        "even where the recording's own H.264 can be sent as it is, which costs several "
        "times the CPU.",
    )
    sim_gst_python: str = Field(
        "/usr/bin/python3",
        description="The Python that has PyGObject and GStreamer's RTSP server (Debian's "
        "python3-gi, gir1.2-gst-rtsp-server-1.0); runs the RTSP streams.",
    )
    sim_device_name: str = Field("Neon Simulator", description="The phone's name in status/mDNS.")
    sim_faults: list[str] = Field(
        default_factory=list,
        description="Fault plan: KIND@AT[:SECONDS] steps (see gazecam.simulate.faults).",
    )

    @field_validator("sim_faults")
    @classmethod
    def _parse_faults(cls, steps: list[str]) -> list[str]:
        for step in steps:
            parse_fault(step)  # its ValueError names the step
        return steps


@dataclass
class SimulatorStats:
    """What the simulator has sent (mutable)."""

    frames_sent: int = 0
    gaze_sent: int = 0
    frames_skipped: int = 0  # not sent: stalled, away, or nobody could have seen them
    drops: int = 0
    passes: int = 0
    max_lag_ns: int = 0  # the most an item went out after it was due: whether it keeps up


def gaze_payload(sample: GazeSample) -> bytes:
    """Neon's gaze RTP payload as the client parses it (``GazeData.from_raw``): x, y in scene
    pixels as big-endian floats, then 255 when the glasses are worn, else 0."""
    return struct.pack("!ffB", sample.x_px, sample.y_px, 255 if sample.worn else 0)


class NeonSimulator:
    """Serves one recording as a Neon Companion device; ``async with`` starts and stops it."""

    def __init__(self, address: str, settings: SimulatorSettings | None = None) -> None:
        self.address = address
        self.settings = settings or SimulatorSettings()
        self.faults = Faults()
        self.stats = SimulatorStats()
        self.http_port = 0
        self.time_echo_port = 0
        self.device_id = uuid.uuid5(uuid.NAMESPACE_URL, address).hex[:16]
        self._video: Passthrough | Reencode | None = None
        self.video_mode = ""  # how the scene video is sent, in words
        self._child = RtspChild(self.settings.sim_gst_python, self.settings.sim_host)
        self.started_wall_ns = 0  # device time of the first item (before any clock jump)
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: Any = None  # aiohttp's AppRunner
        self._time_echo: asyncio.Server | None = None
        self._zeroconf: Any = None
        self._done = asyncio.Event()

    @property
    def rtsp_ports(self) -> tuple[int, int]:
        """The RTSP servers' ports: scene video, gaze."""
        return self._child.ports

    @property
    def uri(self) -> str:
        """The simulated device's source address, ``neon://HOST:PORT``."""
        return f"neon://{self.settings.sim_host}:{self.http_port}"

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
        info = await source.open()  # an unplayable recording fails here
        await source.close()
        width, height = info.frame_width_px, info.frame_height_px
        if width % 2 or height % 2:  # I420 halves both (a Neon scene camera's are 1600×1200)
            raise SimulatorError(
                f"{self.address}: a {width}×{height} scene video; the simulator "
                "streams even sizes only"
            )
        track = (
            "asked to"
            if self.settings.sim_reencode
            else await asyncio.to_thread(probe_passthrough, scene_video_files(self.address), info)
        )
        if isinstance(track, H264Track):
            self._video, self.video_mode = Passthrough(track), "the recording's H.264 as it is"
        else:
            self._video, self.video_mode = Reencode(self.address, info), f"re-encoded ({track})"
        logger.info("%s: scene video %s", self.address, self.video_mode)
        try:
            await self._child.start(width, height, self._video.codec_data)
            await self._start_time_echo()
            await self._start_http(info)
            if self.settings.sim_mdns:
                await self._announce()
        except BaseException:
            await self.stop()
            raise
        self._tasks.append(asyncio.create_task(self._play()))
        plan = [parse_fault(step) for step in self.settings.sim_faults]
        if plan:
            self._tasks.append(asyncio.create_task(self._inject(plan)))

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
        await self._child.stop()

    # -- faults ---------------------------------------------------------------------------

    async def drop_connections(self) -> None:
        """Close every RTSP client's connection, as a Wi-Fi hiccup does."""
        self.stats.drops += 1
        await self._child.send(gst_rtsp.KIND_COMMAND, 0, b"drop")

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

    def late_gaze(self, seconds: float, reorder: bool = False) -> None:
        """Hold gaze back ``seconds`` and send it in bursts (newest first with ``reorder``)."""
        self.faults.gaze_delay_ns = round(seconds * 1e9)
        self.faults.gaze_reorder = reorder

    async def _inject(self, plan: list[FaultStep]) -> None:
        start_ns = time.monotonic_ns()
        for step in sorted(plan, key=lambda step: step.at_s):
            await asyncio.sleep(max(0.0, step.at_s - (time.monotonic_ns() - start_ns) / 1e9))
            logger.warning("injecting %s (%g s)", step.kind, step.value_s)
            if step.kind == "drop":
                await self.drop_connections()
            elif step.kind in ("stall-video", "stall-gaze"):
                self.stall(step.kind.removeprefix("stall-"), step.value_s)
            elif step.kind == "jump":
                self.jump_clock(step.value_s)
            elif step.kind == "away":
                await self.go_away(step.value_s)
            else:
                self.late_gaze(step.value_s, reorder=step.kind == "reorder-gaze")

    # -- the parts ------------------------------------------------------------------------

    async def _start_time_echo(self) -> None:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # The protocol (pupil_labs.realtime_api.time_echo): the client sends its time in
            # ms as !Q; the device answers with it and its own time in ms, !QQ.
            try:
                while True:
                    request = await reader.readexactly(8)
                    if self.away():
                        break
                    writer.write(request + struct.pack("!Q", self.device_ns() // 1_000_000))
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass  # the client is done: it closes the connection after its measurements
            finally:
                writer.close()

        try:
            self._time_echo = await asyncio.start_server(echo, self.settings.sim_host, 0)
        except OSError as exc:
            raise SimulatorError(
                f"Time Echo: cannot listen on {self.settings.sim_host}: {exc}"
            ) from exc
        self.time_echo_port = self._time_echo.sockets[0].getsockname()[1]

    async def _start_http(self, info: SourceInfo) -> None:
        from aiohttp import web

        from gazecam.simulate.companion_api import CompanionAPI

        self._runner = web.AppRunner(CompanionAPI(self, info).app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.sim_host, self.settings.sim_port)
        try:
            await site.start()
        except OSError as exc:
            why = "port in use" if exc.errno == errno.EADDRINUSE else str(exc)
            where = f"{self.settings.sim_host}:{self.settings.sim_port}"
            raise SimulatorError(
                f"{where}: cannot serve the HTTP API ({why}; --port 0 picks a free one)"
            ) from exc
        self.http_port = self._runner.addresses[0][1]

    async def _announce(self) -> None:
        from zeroconf import ServiceInfo
        from zeroconf.asyncio import AsyncZeroconf

        # The name the client's discovery keeps: 'PI monitor:<phone name>:<id>'.
        info = ServiceInfo(
            "_http._tcp.local.",
            f"PI monitor:{self.settings.sim_device_name}:{self.device_id}._http._tcp.local.",
            addresses=[socket.inet_aton(self.settings.sim_host)],
            port=self.http_port,
            server=f"neon-{self.device_id}.local.",
        )
        self._zeroconf = AsyncZeroconf(interfaces=[self.settings.sim_host])
        try:
            await self._zeroconf.async_register_service(info)
        except OSError as exc:
            raise SimulatorError(
                f"mDNS: cannot announce on {self.settings.sim_host} ({exc}); --no-mdns turns it off"
            ) from exc

    def away(self) -> bool:
        """Whether the device is away now (a simulated fault)."""
        return time.monotonic_ns() < self.faults.away_until_ns

    # -- playing --------------------------------------------------------------------------

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
            if not self.settings.sim_loop or first_ns is None:
                return
            offset_ns += last_ns + _PASS_GAP_NS

    async def _play(self) -> None:
        """Send each item when its time comes, stamped with the device clock."""
        rate = self.settings.sim_rate
        start_mono_ns = time.monotonic_ns()
        self.started_wall_ns = time.time_ns()
        faults = self.faults
        held: list[tuple[int, bytes]] = []  # gaze held back by Faults.gaze_delay_ns
        video = self._video
        assert video is not None
        try:
            async for elapsed_ns, item in self._items():
                due_ns = start_mono_ns + round(elapsed_ns / rate)
                wait_ns = due_ns - time.monotonic_ns()
                if wait_ns > 0:
                    await asyncio.sleep(wait_ns / 1e9)
                now_ns = time.monotonic_ns()
                self.stats.max_lag_ns = max(self.stats.max_lag_ns, now_ns - due_ns)
                # The device stamps an item when it is captured: when it was due, on its clock.
                device_ns = self.started_wall_ns + (due_ns - start_mono_ns) + faults.clock_jump_ns
                if self.away():
                    if isinstance(item, SceneFrame):
                        self._skip_frame()
                    continue
                if isinstance(item, GazeSample):
                    if now_ns < self.faults.stall_gaze_until_ns:
                        continue
                    held.append((device_ns, gaze_payload(item)))
                    if device_ns - held[0][0] >= self.faults.gaze_delay_ns:
                        burst = held[::-1] if self.faults.gaze_reorder else held
                        for stamp_ns, payload in burst:
                            await self._child.send(gst_rtsp.KIND_GAZE, stamp_ns, payload)
                        self.stats.gaze_sent += len(held)
                        held = []
                elif now_ns < self.faults.stall_video_until_ns:
                    self._skip_frame()
                elif sent := await video.payload(item):
                    kind, data = sent
                    await self._child.send(kind, device_ns, data)
                    self.stats.frames_sent += 1
                else:
                    self.stats.frames_skipped += 1  # not a keyframe, after one was skipped
        finally:
            video.close()
            self._done.set()

    def _skip_frame(self) -> None:
        assert self._video is not None
        self._video.skipped()
        self.stats.frames_skipped += 1


async def serve_forever(simulator: NeonSimulator) -> None:
    """Run a simulator until its recording ends (or forever with ``loop``), printing where."""
    async with simulator:
        world_port, gaze_port = simulator.rtsp_ports
        print(
            f"simulating a Neon from {simulator.address} at {simulator.uri} "
            f"(HTTP http://{simulator.settings.sim_host}:{simulator.http_port}/api/status, "
            f"RTSP ports {world_port} and {gaze_port}, Time Echo {simulator.time_echo_port}; "
            f"scene video {simulator.video_mode})",
            file=sys.stderr,
            flush=True,
        )
        await simulator.wait()
