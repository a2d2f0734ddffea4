"""Live Neon glasses over the network: ``neon://auto`` or ``neon://HOST[:PORT]``.

Uses the async API of ``pupil-labs-realtime-api``; its ``simple`` API runs its own event loop
and cannot live inside a server. Every call that reaches the glasses goes through
``NeonLink`` (``neon_link``), so tests swap the hardware for fakes and keep the source's own logic.

Live data is bounded on its way in. Scene frames go into a one-slot holder where a newer
frame replaces one the consumer has not pulled yet (counted in ``stats.frames_dropped``);
gaze goes into a queue of about 2 s that drops its oldest sample when full (counted in
``gaze_dropped``). Frames and gaze are not matched here: the capture stage does that, so the
library's own matcher, which drops frames, is not used. A frame whose time (on the local clock)
is further than ``neon_max_frame_age_s`` from its arrival is never handed over: it is counted
in ``frames_stale``, and the glasses' clock offset is measured again.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from gazecam.errors import ConfigError, DeviceUnreachableError, SourceError
from gazecam.records import (
    CameraIntrinsics,
    ClockOffset,
    GazeSample,
    SceneFrame,
    SourceInfo,
    SourceItem,
)
from gazecam.settings import SourceSettings
from gazecam.sources.base import SourceStats
from gazecam.sources.neon_link import NeonLink

if TYPE_CHECKING:
    from pupil_labs.realtime_api.models import Phone, Sensor, Status
    from pupil_labs.realtime_api.streaming.gaze import GazeDataType
    from pupil_labs.realtime_api.streaming.video import VideoFrame

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8080
SCENE_WIDTH_PX, SCENE_HEIGHT_PX = 1600, 1200  # the Neon scene camera
GAZE_QUEUE_LEN = 400  # 2 s of gaze at Neon's highest rate, 200 Hz
MAX_BACKOFF_S = 10.0
# Stale frames lead to a new Time Echo estimate at most this often: frames that stay stale
# with a fresh estimate come late over a slow link, and measuring again would not help.
CLOCK_RECHECK_S = 5.0

_ADDRESS = re.compile(r"neon://(?P<host>[^:/]*)(?::(?P<port>[^/]*))?/?")
# A DNS name or IPv4 address: dot-separated labels of letters, digits and inner hyphens.
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")

_T = TypeVar("_T")


def parse_neon_address(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``neon://HOST[:PORT]``, or None for ``neon://auto``.

    Pure: nothing is looked up. Raises ConfigError naming what is wrong with the address.
    """
    match = _ADDRESS.fullmatch(address)
    problem = None
    if match is None:
        problem = "expected neon://auto or neon://HOST[:PORT]"
    elif not match["host"]:
        problem = "no host"
    elif len(match["host"]) > 253 or not all(
        _HOST_LABEL.fullmatch(label) for label in match["host"].split(".")
    ):
        problem = f"{match['host']!r} is not a host name or IPv4 address"
    elif match["port"] is not None and not (
        match["port"].isascii() and match["port"].isdigit() and 0 < int(match["port"]) < 65536
    ):
        problem = f"port {match['port']!r} is not a number from 1 to 65535"
    elif match["host"].lower() == "auto" and match["port"] is not None:
        problem = "neon://auto takes no port"
    if problem is not None or match is None:
        raise ConfigError(
            f"{address}: not a Neon address ({problem}; use neon://auto or neon://HOST[:PORT])"
        )
    if match["host"].lower() == "auto":
        return None
    return match["host"], int(match["port"] or DEFAULT_PORT)


def _describe(exc: BaseException, timeout_s: float) -> str:
    """One line saying why a call to the device failed."""
    if isinstance(exc, asyncio.TimeoutError) and not str(exc):
        return f"no answer within {timeout_s:g} s"
    return " ".join(str(exc).split()) or type(exc).__name__


async def _next_within(items: AsyncIterator[_T], timeout_s: float) -> _T:
    """The next item, or asyncio.TimeoutError after ``timeout_s``.

    Not asyncio.wait_for: before Python 3.12 it can swallow a cancellation that comes just as
    the item does (with gaze at 200 Hz, often), and a pump then streamed on after close().
    """
    step = asyncio.ensure_future(anext(items))
    try:
        done, _ = await asyncio.wait({step}, timeout=timeout_s)
    finally:
        if not step.done():
            step.cancel()
            await asyncio.wait({step})  # the generator must be idle before it is closed
    if not done:
        raise asyncio.TimeoutError
    return step.result()


class NeonLiveSource:
    """Scene frames and gaze from live Neon glasses, yielded as they arrive."""

    def __init__(
        self, address: str, settings: SourceSettings, link: NeonLink | None = None
    ) -> None:
        self.uri = address
        self.stats = SourceStats()
        self._endpoint = parse_neon_address(address)
        self._settings = settings
        self._link = link or NeonLink()
        self._where = address  # becomes neon://HOST:PORT once the device is known
        self._urls: tuple[str, str] | None = None  # gaze, scene video
        self._clock: ClockOffset | None = None
        self._phone: Phone | None = None  # where Time Echo answers
        self._clock_check: asyncio.Task[None] | None = None
        self._clock_checked_s = 0.0  # time.monotonic() of the latest estimate
        self._gaze: deque[GazeSample] = deque(maxlen=GAZE_QUEUE_LEN)
        self._frame: SceneFrame | None = None
        self._wake = asyncio.Event()
        self._pumps: list[asyncio.Task[None]] = []
        self._closed = False

    async def open(self) -> SourceInfo:
        """Find and connect to the glasses; read the scene calibration and the clock offset."""
        host, port = self._endpoint or await self._discover()
        self._where = f"neon://{host}:{port}"
        try:
            status = await self._connect(host, port)
            self._urls = (
                self._sensor_url(status.direct_gaze_sensor(), "gaze"),
                self._sensor_url(status.direct_world_sensor(), "scene camera"),
            )
            camera = await self._scene_camera()
            self._phone = status.phone
            self._clock = await self._estimate_clock(status.phone)
        except BaseException:
            await self._link.close()  # the caller closes only a source that opened
            raise
        return SourceInfo(
            uri=self.uri,
            kind="neon-live",
            frame_width_px=SCENE_WIDTH_PX,
            frame_height_px=SCENE_HEIGHT_PX,
            camera=camera,
            frame_count=None,
            has_fixations=False,
            clock_offset=self._clock,
        )

    async def stream(self) -> AsyncGenerator[SourceItem, None]:
        """Gaze samples and scene frames as they arrive; gaze received before a frame first."""
        if self._urls is None:
            raise SourceError(f"{self.uri}: stream() called before open()")
        gaze_url, video_url = self._urls
        receive_gaze, receive_video = self._link.receive_gaze, self._link.receive_video
        timeout_s = self._settings.neon_connect_timeout_s
        self._pumps = [
            asyncio.create_task(
                self._pump("gaze", self._put_gaze, partial(receive_gaze, gaze_url, timeout_s))
            ),
            asyncio.create_task(
                self._pump(
                    "scene video", self._put_frame, partial(receive_video, video_url, timeout_s)
                )
            ),
        ]
        for pump in self._pumps:
            pump.add_done_callback(lambda _: self._wake.set())
        try:
            while not self._closed:
                self._wake.clear()
                while self._gaze or self._frame is not None:
                    # The gaze queued now arrived before the frame in the holder.
                    for _ in range(len(self._gaze)):
                        yield self._gaze.popleft()
                    if self._frame is not None:
                        frame, self._frame = self._frame, None
                        yield frame
                for pump in self._pumps:
                    if pump.done():
                        pump.result()  # a pump only ends by failing: raise its error
                await self._wake.wait()
        finally:
            await self._stop_pumps()

    async def close(self) -> None:
        """Stop receiving and close the connection. Safe to call twice."""
        self._closed = True
        self._wake.set()
        await self._stop_pumps()
        if self._clock_check is not None:
            self._clock_check.cancel()
            await asyncio.gather(self._clock_check, return_exceptions=True)
        await self._link.close()

    async def _discover(self) -> tuple[str, int]:
        timeout_s = self._settings.neon_discovery_timeout_s
        try:
            found = await self._link.discover(timeout_s)
        except self._link.errors as exc:
            raise DeviceUnreachableError(
                f"{self.uri}: network discovery failed ({_describe(exc, timeout_s)})"
            ) from exc
        if found is None:
            raise DeviceUnreachableError(
                f"{self.uri}: no Neon found on the network within {timeout_s:g} s"
            )
        logger.info("%s: found a Neon at %s:%d", self.uri, *found)
        return found

    async def _connect(self, host: str, port: int) -> Status:
        timeout_s = self._settings.neon_connect_timeout_s
        try:
            return await asyncio.wait_for(self._link.connect(host, port), timeout_s)
        except self._link.errors as exc:
            raise DeviceUnreachableError(
                f"{self._where}: device unreachable ({_describe(exc, timeout_s)})"
            ) from exc

    def _sensor_url(self, sensor: Sensor | None, name: str) -> str:
        url = sensor.url if sensor is not None else None
        if url is None:
            raise SourceError(
                f"{self._where}: {name} sensor not connected (are the glasses plugged into "
                "the Companion phone?)"
            )
        return url

    async def _scene_camera(self) -> CameraIntrinsics | None:
        timeout_s = self._settings.neon_connect_timeout_s
        try:
            return await asyncio.wait_for(self._link.scene_camera(), timeout_s)
        except self._link.errors as exc:
            logger.warning(
                "%s: no scene camera calibration (%s); going on without it",
                self._where,
                _describe(exc, timeout_s),
            )
            return None

    async def _estimate_clock(self, phone: Phone) -> ClockOffset | None:
        timeout_s = self._settings.neon_connect_timeout_s
        offset = None
        self._clock_checked_s = time.monotonic()
        self.stats.clock_estimates += 1
        if phone.time_echo_port is None:
            reason = "the Companion app has no Time Echo port; update it"
        else:
            try:
                offset = await asyncio.wait_for(
                    self._link.clock_offset(
                        phone.ip, phone.time_echo_port, self._settings.neon_time_echo_samples
                    ),
                    timeout_s,
                )
                reason = "Time Echo estimation failed"
            except self._link.errors as exc:
                reason = f"Time Echo: {_describe(exc, timeout_s)}"
        self.stats.clock = offset or self.stats.clock
        if offset is None:
            logger.warning(
                "%s: no clock offset (%s); taking the glasses' timestamps as local time",
                self._where,
                reason,
            )
        else:
            logger.info(
                "%s: glasses clock is %+.1f ms (±%.1f ms) from the local clock",
                self._where,
                offset.offset_ns / 1e6,
                offset.spread_ns / 1e6,
            )
        return offset

    async def _pump(
        self,
        what: str,
        put: Callable[[_T], None],
        receive: Callable[[], AsyncGenerator[_T, None]],
    ) -> None:
        """Feed one device stream into the buffers; reconnect with backoff when it drops.

        A stream that delivers nothing for the connect timeout counts as dropped: gaze and
        scene video flow without pause while the glasses are connected, worn or not.
        """
        stall_s = self._settings.neon_connect_timeout_s
        attempts = self._settings.neon_reconnect_attempts
        failures = 0
        while True:
            items = receive()
            try:
                while True:
                    try:
                        datum = await _next_within(items, stall_s)
                    except StopAsyncIteration:
                        reason = f"{what} stream ended"
                        break
                    except asyncio.TimeoutError:
                        reason = f"no {what} for {stall_s:g} s"
                        break
                    except Exception as exc:  # a dropped link or a corrupt packet alike
                        reason = f"{what}: {_describe(exc, stall_s)}"
                        break
                    put(datum)
                    failures = 0
            finally:
                await items.aclose()
            if failures >= attempts:
                raise DeviceUnreachableError(
                    f"{self._where}: stream lost after {failures} reconnects ({reason})"
                )
            delay_s = min(self._settings.neon_reconnect_backoff_s * 2**failures, MAX_BACKOFF_S)
            failures += 1
            self.stats.reconnects += 1
            logger.warning(
                "%s: %s; reconnecting in %.2g s (attempt %d of %d)",
                self._where,
                reason,
                delay_s,
                failures,
                attempts,
            )
            await asyncio.sleep(delay_s)

    def _put_gaze(self, datum: GazeDataType) -> None:
        from pupil_labs.realtime_api.streaming.gaze import DualMonocularGazeData

        # Dual-monocular mode sends no binocular point; the left eye's stands in for it.
        x_px, y_px = datum.left if isinstance(datum, DualMonocularGazeData) else (datum.x, datum.y)
        if len(self._gaze) == GAZE_QUEUE_LEN:
            if self.stats.gaze_dropped == 0:
                logger.warning(
                    "%s: the consumer is falling behind; dropping the oldest gaze (counted in "
                    "gaze_dropped)",
                    self._where,
                )
            self.stats.gaze_dropped += 1
        timestamp_ns = self._local_ns(datum.timestamp_unix_ns)
        self._gaze.append(GazeSample(timestamp_ns, x_px, y_px, datum.worn))
        self.stats.gaze_in += 1
        self._wake.set()

    def _put_frame(self, frame: VideoFrame) -> None:
        timestamp_ns = self._local_ns(frame.timestamp_unix_ns)
        age_s = (time.time_ns() - timestamp_ns) / 1e9
        if abs(age_s) > self._settings.neon_max_frame_age_s:
            self._drop_stale_frame(age_s)
            return
        if self._frame is not None:
            self.stats.frames_dropped += 1  # newest wins: the consumer never saw this one
        self._frame = SceneFrame(
            timestamp_ns=timestamp_ns,
            index=self.stats.frames_in,
            width_px=frame.av_frame.width,
            height_px=frame.av_frame.height,
            decode=frame.bgr_buffer,
        )
        self.stats.frames_in += 1
        self._wake.set()

    def _drop_stale_frame(self, age_s: float) -> None:
        """Drop a frame whose time is off the local clock by more than the tolerance; measure
        the clock again (the glasses' clock may have been set, e.g. by NTP)."""
        self.stats.frames_stale += 1
        checking = self._clock_check is not None and not self._clock_check.done()
        if checking or time.monotonic() - self._clock_checked_s < CLOCK_RECHECK_S:
            return
        logger.warning(
            "%s: a scene frame %s by %.3g s (over the %g s allowed); dropping such frames "
            "(frames_stale) and measuring the glasses' clock again",
            self._where,
            "arrived late" if age_s > 0 else "is from the future",
            abs(age_s),
            self._settings.neon_max_frame_age_s,
        )
        self._clock_check = asyncio.create_task(self._check_clock())

    async def _check_clock(self) -> None:
        if self._phone is None:
            raise RuntimeError("NeonLiveSource._check_clock() called before open()")
        offset = await self._estimate_clock(self._phone)
        if offset is not None:  # else the estimator said why; the old offset stays
            self._clock = offset

    def _local_ns(self, device_ns: int) -> int:
        return self._clock.to_local_ns(device_ns) if self._clock is not None else device_ns

    async def _stop_pumps(self) -> None:
        pumps, self._pumps = self._pumps, []
        for pump in pumps:
            pump.cancel()
        # A pump's own error reached the consumer through stream(), or the consumer is gone.
        await asyncio.gather(*pumps, return_exceptions=True)
