"""Scene video files through PyAV: sequential decoding and crash-safe H.264 writing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

import av
import av.error
import numpy as np

from gazecam.errors import SourceError
from gazecam.records import BGRImage, I420Image


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


def lazy_pixels(frame: av.VideoFrame) -> tuple[Callable[[], BGRImage], Callable[[], I420Image]]:
    """A decoded frame's pixels, converted only when asked for: as BGR (milliseconds, so only
    frames that are cropped pay for it) and as I420 (a copy of the planes where the frame is
    yuv420p already, as H.264 is; a conversion otherwise)."""
    return (
        lambda: np.asarray(frame.to_ndarray(format="bgr24"), dtype=np.uint8),
        lambda: np.asarray(frame.to_ndarray(format="yuv420p"), dtype=np.uint8),
    )


def decode_frames(path: Path) -> Iterator[av.VideoFrame]:
    """Decode a video's frames in order; a corrupt stream becomes a SourceError naming the file.

    Where the stream is damaged part way (a recording cut off mid-write), every frame before
    the damage is yielded first, the SourceError comes after them. The frames are left in their
    decoded pixel format: converting one to BGR (``frame.to_ndarray(format="bgr24")``) costs
    milliseconds and is done only for frames that are cropped.
    """
    try:
        with av.open(str(path)) as container:
            # Default slice threading only: frame threading ("AUTO") adds a frame of latency per
            # thread and can deadlock when a decoder is freed mid-stream (PyAV issues #909, #367).
            stream = container.streams.video[0]
            damage = None
            for packet in container.demux(stream):
                if packet.is_corrupt:  # the demuxer found less data than the index promised
                    damage = f"frame data cut short at byte {packet.pos}"
                    break
                try:
                    yield from stream.decode(packet)
                except av.error.InvalidDataError as exc:
                    damage = str(exc)
                    break
            if damage is not None:
                yield from stream.decode(None)  # the frames still in the decoder are whole
                raise SourceError(f"{path}: the video is damaged from here on: {damage}")
    except (av.error.FFmpegError, OSError) as exc:
        raise SourceError(f"{path}: cannot decode the video ({exc})") from exc


class VideoWriter:
    """Write BGR frames to an H.264 MP4 that stays readable if the process dies mid-write.

    By default the MP4 is fragmented (``frag_keyframe+empty_moov``): each keyframe starts a
    fragment that is complete on disk, so a crash loses at most the last second, not the whole
    file. ``frames_on_disk`` says how many frames are in complete fragments (handed to the
    operating system, so they survive the process being killed). ``fragmented=False`` writes a
    plain MP4 as the Neon Companion app does (Pupil Labs' video reader seeks to the wrong frame
    in fragmented files); its frames are on disk only once it is closed.
    """

    def __init__(
        self, path: Path, width_px: int, height_px: int, fps: float = 30.0, fragmented: bool = True
    ) -> None:
        self.path = path
        self.frames_written = 0
        self.frames_on_disk = 0
        self._fragmented = fragmented
        # flush_packets: a finished fragment goes to the operating system at once, not when
        # the 32 KiB I/O buffer next fills.
        options = (
            {"movflags": "frag_keyframe+empty_moov", "flush_packets": "1"} if fragmented else {}
        )
        self._container = av.open(str(path), mode="w", options=options)
        self._stream = self._container.add_stream(
            "libx264", rate=Fraction(fps).limit_denominator(1000)
        )
        self._stream.width = width_px
        self._stream.height = height_px
        self._stream.pix_fmt = "yuv420p"
        # Frame threads, not PyAV's default slice threads: one slice per frame, as a phone's
        # encoder writes (Pupil Labs' client decodes a first multi-slice frame twice, once
        # only half).
        self._stream.codec_context.thread_type = "FRAME"
        # One keyframe a second bounds what a crash can lose. No B-frames: frames coded in the
        # order they are shown, as a phone's hardware encoder writes them, so the video can be
        # streamed as it is (``gazecam simulate-neon``; Pupil Labs' client decodes no B-frames).
        self._stream.options = {
            "g": str(max(1, round(fps))),
            "bf": "0",
            "preset": "veryfast",
            "crf": "20",
        }
        # The header now, not at the first frame: a recording stopped before its first frame
        # still has a video (a readable, empty one when fragmented).
        self._container.start_encoding()

    def write(self, bgr: BGRImage) -> None:
        """Append one frame, (height_px, width_px, 3) BGR uint8."""
        frame = av.VideoFrame.from_ndarray(bgr, format="bgr24")
        frame.pts = self.frames_written  # in 1/fps: a packet's pts is its frame's index
        self._mux(self._stream.encode(frame))
        self.frames_written += 1

    def _mux(self, packets: list[av.Packet[Any]]) -> None:
        for packet in packets:
            # Read before muxing, which rescales the pts to the stream's time base.
            keyframe_index = packet.pts if packet.is_keyframe else None
            self._container.mux(packet)
            # A keyframe starts a new fragment, which wrote out the one before: every frame
            # before this one (the GOP is closed: none comes after it in coding order).
            if self._fragmented and keyframe_index is not None:
                self.frames_on_disk = max(self.frames_on_disk, int(keyframe_index))

    def close(self) -> None:
        """Flush the encoder and finish the file."""
        if self._container is None:
            return
        self._mux(self._stream.encode())
        self._container.close()
        self._container = None  # type: ignore[assignment]
        self.frames_on_disk = self.frames_written

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
