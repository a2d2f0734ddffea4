"""The simulator's side of its RTSP server: starts ``gst_rtsp`` under the system Python, feeds
it frames, gaze and commands through a pipe, and turns its failures into one-line errors."""

from __future__ import annotations

import asyncio
import fcntl
import logging
from collections import deque
from pathlib import Path
from typing import Any

from gazecam.errors import SimulatorError
from gazecam.simulate import gst_rtsp

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 20.0


class RtspChild:
    """The RTSP server process; ``start()`` it, ``send()`` to it, ``stop()`` it (twice is safe)."""

    def __init__(self, python: str, host: str) -> None:
        self.python = python
        self.host = host
        self.ports = (0, 0)  # scene video, gaze
        self._process: asyncio.subprocess.Process | None = None
        self._errors: deque[str] = deque(maxlen=20)
        self._started = False
        self._logging: asyncio.Task[None] | None = None

    async def start(self, width_px: int, height_px: int, codec_data: bytes | None) -> None:
        """Start it: raw I420 frames to encode, or H.264 with this ``avcC`` (``codec_data``)."""
        try:
            self._process = process = await asyncio.create_subprocess_exec(
                self.python,
                gst_rtsp.__file__,
                "--host",
                self.host,
                "--width",
                str(width_px),
                "--height",
                str(height_px),
                *(["--codec-data", codec_data.hex()] if codec_data else []),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                # Its own session: a Ctrl-C at the terminal is the parent's to handle; the
                # child ends when its input closes.
                start_new_session=True,
            )
        except OSError as exc:
            raise SimulatorError(
                f"{self.python}: cannot run it for the RTSP server "
                f"({exc.strerror}; set GAZECAM_SIM_GST_PYTHON)"
            ) from exc
        assert process.stdin is not None and process.stdout is not None
        assert process.stderr is not None
        _widen_pipe(process.stdin.get_extra_info("pipe"))
        self._logging = asyncio.create_task(self._log(process.stderr))
        try:
            line = await asyncio.wait_for(process.stdout.readline(), _START_TIMEOUT_S)
        except asyncio.TimeoutError:
            line = b""
        words = line.decode(errors="replace").split()
        if len(words) != 3 or words[0] != "ready":
            await asyncio.wait_for(process.wait(), 5)
            await asyncio.sleep(0)  # let the stderr reader take the last lines
            why = self._errors[-1] if self._errors else "no answer"
            raise SimulatorError(f"RTSP server did not start: {why}")
        self.ports = (int(words[1]), int(words[2]))
        self._started = True

    async def _log(self, stderr: asyncio.StreamReader) -> None:
        while line := await stderr.readline():
            text = line.decode(errors="replace").strip()
            if text and "has no property named 'pt'" not in text:  # GStreamer's own nag
                self._errors.append(text)
                # Before it started, its last line becomes the SimulatorError.
                if self._started:
                    logger.warning("RTSP server: %s", text)

    async def send(self, kind: int, device_ns: int, payload: bytes | memoryview) -> None:
        """One message (``gst_rtsp``'s kinds), waiting while the pipe is full."""
        process = self._process
        if process is None or process.stdin is None:
            raise SimulatorError("the RTSP server is not running")
        try:
            process.stdin.write(gst_rtsp.HEADER.pack(kind, device_ns, len(payload)))
            process.stdin.write(payload)
            await process.stdin.drain()
        except ConnectionError as exc:
            why = self._errors[-1] if self._errors else "it exited"
            raise SimulatorError(f"the RTSP server stopped: {why}") from exc

    async def stop(self) -> None:
        """Close its input (it ends then), killing it after 5 s."""
        if self._process is not None:
            process, self._process = self._process, None
            if process.stdin is not None:
                process.stdin.close()
            try:
                await asyncio.wait_for(process.wait(), 5)
            except asyncio.TimeoutError:
                process.kill()
                await process.wait()
        if self._logging is not None:
            logging_task, self._logging = self._logging, None
            logging_task.cancel()
            await asyncio.gather(logging_task, return_exceptions=True)


def _widen_pipe(pipe: Any) -> None:
    """Give the pipe to the child 1 MiB (or the system's most): a 2.9 MB frame through the
    default 64 KiB is 45 writes and as many wake-ups of both processes."""
    most = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    fcntl.fcntl(pipe, fcntl.F_SETPIPE_SZ, min(most, 2**20))
