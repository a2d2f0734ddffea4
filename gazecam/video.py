"""Scene video files through PyAV: sequential decoding and crash-safe H.264 writing."""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import av.error

from gazecam.errors import SourceError
from gazecam.records import BGRImage


def probe_video(path: Path) -> tuple[int, int, int | None]:
    """Return (width_px, height_px, frame count or None where the container does not say)."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise SourceError(f"{path}: has no video stream")
            stream = container.streams.video[0]
            frames = int(stream.frames) or None
            return int(stream.codec_context.width), int(stream.codec_context.height), frames
    except (av.error.FFmpegError, OSError) as exc:
        raise SourceError(f"{path}: cannot open the video ({exc})") from exc


def decode_frames(path: Path) -> Iterator[av.VideoFrame]:
    """Decode a video's frames in order; a corrupt stream becomes a SourceError naming the file.

    The frames are left in their decoded pixel format: converting one to BGR
    (``frame.to_ndarray(format="bgr24")``) costs milliseconds and is done only for frames
    that are cropped.
    """
    try:
        with av.open(str(path)) as container:
            # Default slice threading only: frame threading ("AUTO") adds a frame of latency per
            # thread and can deadlock when a decoder is freed mid-stream (PyAV issues #909, #367).
            yield from container.decode(container.streams.video[0])
    except (av.error.FFmpegError, OSError) as exc:
        raise SourceError(f"{path}: cannot decode the video ({exc})") from exc


class VideoWriter:
    """Write BGR frames to an H.264 MP4 that stays readable if the process dies mid-write.

    By default the MP4 is fragmented (``frag_keyframe+empty_moov``): each keyframe starts a
    fragment that is complete on disk, so a crash loses at most the last second, not the whole
    file. ``fragmented=False`` writes a plain MP4 as the Neon Companion app does (Pupil Labs'
    video reader seeks to the wrong frame in fragmented files).
    """

    def __init__(
        self, path: Path, width_px: int, height_px: int, fps: float = 30.0, fragmented: bool = True
    ) -> None:
        self.path = path
        self.frames_written = 0
        options = {"movflags": "frag_keyframe+empty_moov"} if fragmented else {}
        self._container = av.open(str(path), mode="w", options=options)
        self._stream = self._container.add_stream(
            "libx264", rate=Fraction(fps).limit_denominator(1000)
        )
        self._stream.width = width_px
        self._stream.height = height_px
        self._stream.pix_fmt = "yuv420p"
        # One keyframe a second bounds what a crash can lose.
        self._stream.options = {"g": str(max(1, round(fps))), "preset": "veryfast", "crf": "20"}

    def write(self, bgr: BGRImage) -> None:
        """Append one frame, (height_px, width_px, 3) BGR uint8."""
        frame = av.VideoFrame.from_ndarray(bgr, format="bgr24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames_written += 1

    def close(self) -> None:
        """Flush the encoder and finish the file."""
        if self._container is None:
            return
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        self._container = None  # type: ignore[assignment]

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
