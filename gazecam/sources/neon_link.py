"""The hardware boundary of the live Neon source: every call that goes to the glasses or the
network, through Pupil Labs' realtime API (imported where used: it is the ``neon`` extra)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, TypeVar, cast

from gazecam.errors import MissingDependencyError
from gazecam.records import CameraIntrinsics, ClockOffset

if TYPE_CHECKING:
    from pupil_labs.realtime_api.device import Device
    from pupil_labs.realtime_api.models import DiscoveredDeviceInfo, Status
    from pupil_labs.realtime_api.streaming.base import RTSPRawStreamer
    from pupil_labs.realtime_api.streaming.gaze import GazeDataType
    from pupil_labs.realtime_api.streaming.video import VideoFrame

_T = TypeVar("_T")


class NeonLink:
    """The hardware boundary: every call that goes to the glasses or the network.

    Thin wrappers around the realtime API; timeouts, retries and error messages are the
    source's business. Tests pass a subclass with fakes to ``NeonLiveSource``.
    """

    def __init__(self) -> None:
        try:
            import aiohttp
            from pupil_labs.realtime_api.device import DeviceError
        except ImportError as exc:
            raise MissingDependencyError(
                "pupil-labs-realtime-api", "neon", "Live Neon glasses (neon://)"
            ) from exc
        # What a failed exchange with the device raises. asyncio's timeout is an OSError only
        # from Python 3.11 on; ValueError is a malformed answer.
        self.errors: tuple[type[Exception], ...] = (
            OSError,
            asyncio.TimeoutError,
            aiohttp.ClientError,
            DeviceError,
            ValueError,
        )
        self._device: Device | None = None

    async def discover(self, timeout_s: float) -> tuple[str, int] | None:
        """Address and port of the first Neon Companion app found by mDNS, or None."""
        from pupil_labs.realtime_api.discovery import discover_devices

        # aclosing: leaving the loop early must still close the mDNS browser.
        found_devices = cast(
            "AsyncGenerator[DiscoveredDeviceInfo, None]",
            discover_devices(timeout_seconds=timeout_s),
        )
        async with contextlib.aclosing(found_devices) as found:
            async for device in found:
                if device.addresses:
                    return device.addresses[0], device.port
        return None

    async def connect(self, host: str, port: int) -> Status:
        """Open an HTTP session to the Companion app and fetch its status."""
        from pupil_labs.realtime_api.device import Device

        await self.close()
        self._device = Device(host, port)
        return await self._device.get_status()

    async def scene_camera(self) -> CameraIntrinsics:
        """The scene camera's intrinsics from the connected device's calibration."""
        if self._device is None:
            raise RuntimeError("NeonLink.scene_camera() called before connect()")
        calibration = await self._device.get_calibration()
        return CameraIntrinsics.from_raw(
            calibration.scene_camera_matrix, calibration.scene_distortion_coefficients
        )

    async def clock_offset(self, host: str, port: int, samples: int) -> ClockOffset | None:
        """Estimate the device clock's offset with Time Echo; None if the estimator failed."""
        from pupil_labs.realtime_api.time_echo import TimeOffsetEstimator

        estimate = await TimeOffsetEstimator(host, port).estimate(number_of_measurements=samples)
        if estimate is None:
            return None  # the estimator has logged why
        offset_ms = estimate.time_offset_ms
        # Pupil Labs' offset is client - host; ClockOffset's is device - local.
        return ClockOffset(
            offset_ns=-round(offset_ms.median * 1e6),
            spread_ns=round(offset_ms.std * 1e6),
            samples=len(offset_ms.measurements),
        )

    def receive_gaze(self, url: str, timeout_s: float) -> AsyncGenerator[GazeDataType, None]:
        """Gaze data from one RTSP session of the device's gaze stream."""
        from pupil_labs.realtime_api.streaming.gaze import RTSPGazeStreamer

        return _one_session(RTSPGazeStreamer(url, timeout=timeout_s, log_level=logging.WARNING))

    def receive_video(self, url: str, timeout_s: float) -> AsyncGenerator[VideoFrame, None]:
        """Decoded scene camera frames from one RTSP session of the device's video stream."""
        from pupil_labs.realtime_api.streaming.video import RTSPVideoFrameStreamer

        streamer = RTSPVideoFrameStreamer(url, timeout=timeout_s, log_level=logging.WARNING)
        return _one_session(streamer)

    async def close(self) -> None:
        """Close the HTTP session, if one is open."""
        device, self._device = self._device, None
        if device is not None:
            await device.close()


async def _one_session(streamer: RTSPRawStreamer) -> AsyncGenerator[_T, None]:
    """What one RTSP session yields; raises its error when it failed (a dropped link).

    One session per call: the source's pump reconnects. Not aiortsp's ``run_loop``: the client
    keeps its RTP-to-wall-clock offset across the sessions of a loop, and a new session's RTP
    clock starts elsewhere (RFC 3550: at random), so until the new session's first sender
    report its frames were stamped hours off.
    """
    async with streamer:
        # The gaze and video streamers override receive() with their own item types.
        async for datum in cast("AsyncIterator[_T]", streamer.receive()):
            yield datum
        # aiortsp's reader ends its packets when its session task ends, and leaves that task's
        # error there: raise it, or the reason of the drop would be lost.
        session = streamer.reader._runner
        if session is not None and session.done() and not session.cancelled():
            session.result()
