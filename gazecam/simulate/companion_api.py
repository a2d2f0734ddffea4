"""The Companion app's HTTP API, as the realtime client reads it, for a simulated device.

Routes (``pupil_labs.realtime_api.models.APIPath``): ``GET /api/status``, ``POST
/api/recording:start|stop_and_save|cancel``, ``POST /api/event`` and ``GET /calibration.bin``.
Answers are the app's envelope, ``{"message": ..., "result": ...}``; a bad request gets a 400
with a one-line message, and the server goes on serving.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gazecam.records import SourceInfo
from gazecam.sources import detect_folder_format

if TYPE_CHECKING:
    from gazecam.simulate.neon_simulator import NeonSimulator


def _reply(result: Any, status: int = 200, message: str = "Success") -> web.Response:
    return web.json_response({"message": message, "result": result}, status=status)


def calibration_bytes(address: str, info: SourceInfo) -> bytes | None:
    """A recording's own calibration.bin, or one written from its scene camera intrinsics
    (None where it has neither)."""
    own = Path(address).expanduser() / "calibration.bin"
    if (
        not address.startswith("synthetic:")
        and detect_folder_format(own.parent) == "neon-recording"
        and own.is_file()
    ):
        return own.read_bytes()
    if info.camera is None:
        return None
    import numpy as np
    from pupil_labs.neon_recording.calib import Calibration

    record = np.zeros((), dtype=Calibration.dtype)
    record["version"] = 1
    record["serial"] = b"sim000"
    record["scene_camera_matrix"] = info.camera.camera_matrix
    record["scene_distortion_coefficients"][: len(info.camera.distortion)] = info.camera.distortion
    return record.tobytes()


class CompanionAPI:
    """The HTTP API of one simulated device (its recording state lives here)."""

    def __init__(self, sim: NeonSimulator, info: SourceInfo) -> None:
        self.sim = sim
        self.calibration = calibration_bytes(sim.address, info)
        self.recording_id: str | None = None
        self.recording_start_ns = 0

    def app(self) -> web.Application:
        """The aiohttp application: the routes, and no answer while the device is away."""

        @web.middleware
        async def away(request: web.Request, handler: Any) -> web.StreamResponse:
            if self.sim.away():
                raise web.HTTPServiceUnavailable(text="the device is away (simulated fault)")
            response: web.StreamResponse = await handler(request)
            return response

        app = web.Application(middlewares=[away])
        app.router.add_get("/api/status", self.status)
        app.router.add_post("/api/recording:start", self.recording_start)
        app.router.add_post("/api/recording:stop_and_save", self.recording_stop)
        app.router.add_post("/api/recording:cancel", self.recording_stop)
        app.router.add_post("/api/event", self.event)
        app.router.add_get("/calibration.bin", self.calibration_bin)
        return app

    async def status(self, _request: web.Request) -> web.Response:
        """Phone, hardware, the two direct sensors with their RTSP URLs, the recording."""
        sim = self.sim
        host = sim.settings.sim_host
        components: list[dict[str, Any]] = [
            {
                "model": "Phone",
                "data": {
                    "battery_level": 100,
                    "battery_state": "OK",
                    "device_id": sim.device_id,
                    "device_name": sim.settings.sim_device_name,
                    "ip": host,
                    "memory": 64 * 2**30,
                    "memory_state": "OK",
                    "time_echo_port": sim.time_echo_port,
                },
            },
            {"model": "Hardware", "data": {"version": "2.0", "module_serial": "simulated"}},
        ]
        for sensor, port in zip(("world", "gaze"), sim.rtsp_ports, strict=True):
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
        if self.recording_id is not None:
            components.append(
                {
                    "model": "Recording",
                    "data": {
                        "action": "START",
                        "id": self.recording_id,
                        "message": "",
                        "rec_duration_ns": sim.device_ns() - self.recording_start_ns,
                    },
                }
            )
        return _reply(components)

    async def recording_start(self, _request: web.Request) -> web.Response:
        """Start a (simulated) recording; 400 while one runs."""
        if self.recording_id is not None:
            return _reply(None, 400, "Recording already running")
        self.recording_id = str(uuid.uuid4())
        self.recording_start_ns = self.sim.device_ns()
        return _reply({"id": self.recording_id})

    async def recording_stop(self, _request: web.Request) -> web.Response:
        """Stop (and save, or cancel) the recording; 400 when none runs."""
        if self.recording_id is None:
            return _reply(None, 400, "Recording not running")
        self.recording_id = None
        return _reply({})

    async def event(self, request: web.Request) -> web.Response:
        """An event: ``{"name": str, "timestamp": Unix ns (optional)}``."""
        try:
            body = json.loads(await request.read())
        except ValueError as exc:
            return _reply(None, 400, f"event: the body is not JSON ({exc})")
        if not isinstance(body, dict):
            return _reply(None, 400, "event: the body must be a JSON object")
        name, timestamp = body.get("name"), body.get("timestamp", self.sim.device_ns())
        if not isinstance(name, str) or not name:
            return _reply(None, 400, "event: 'name' must be a non-empty string")
        if isinstance(timestamp, bool) or not isinstance(timestamp, int) or timestamp < 0:
            return _reply(None, 400, "event: 'timestamp' must be integer Unix nanoseconds")
        return _reply({"recording_id": self.recording_id, "timestamp": timestamp})

    async def calibration_bin(self, _request: web.Request) -> web.Response:
        """The scene camera calibration in Neon's binary format; 404 where there is none."""
        if self.calibration is None:
            raise web.HTTPNotFound(text="the recording has no scene camera calibration")
        return web.Response(body=self.calibration, content_type="application/octet-stream")
