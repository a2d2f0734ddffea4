"""The scene video as the simulator sends it: the recording's own H.264, or frames re-encoded.

A Neon streams the H.264 its encoder writes, with no frame reordering: Pupil Labs' client
pairs each decoded frame with the RTP time of the packets before it, so a B-frame would get
another frame's time. Where the recording's video is such a stream (H.264, frames coded in the
order they are shown, a keyframe at least every ``MAX_KEYFRAME_GAP_S``, one packet per listed
frame), the simulator sends its packets as they are (``Passthrough``): nothing is decoded or
encoded, which is what lets one core serve 1600×1200 at several times real time. Otherwise
(a synthetic scene, a video with B-frames or sparse keyframes) each frame is decoded to I420
and the RTSP child encodes it (``Reencode``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import av.error
import cv2
import numpy as np
from numpy.typing import NDArray

from gazecam.errors import SourceError
from gazecam.records import SceneFrame, SourceInfo
from gazecam.simulate import gst_rtsp

logger = logging.getLogger(__name__)

# A client that joins (or rejoins after a drop) sees its first picture at the next keyframe.
MAX_KEYFRAME_GAP_S = 2.0


@dataclass(frozen=True, slots=True)
class H264Track:
    """A recording's scene video that can be sent as it is: its parts in order, and the
    ``avcC`` record (SPS and PPS) that all of them share."""

    parts: tuple[Path, ...]
    codec_data: bytes


def probe_passthrough(parts: list[Path], info: SourceInfo) -> H264Track | str:
    """The track where the video can be passed through, else why not (one phrase)."""
    if not parts:
        return "the source has no video file"
    codec_data: bytes | None = None
    packets = 0
    for part in parts:
        try:
            with av.open(str(part)) as container:
                stream = container.streams.video[0]
                context = stream.codec_context
                if context.name != "h264":
                    return f"{part.name} is {context.name}, not H.264"
                if not context.extradata or context.extradata[0] != 1:
                    return f"{part.name} has no avcC record (SPS and PPS)"
                if (context.width, context.height) != (info.frame_width_px, info.frame_height_px):
                    return f"{part.name} is {context.width}×{context.height}"
                if codec_data not in (None, context.extradata):
                    return f"{part.name} has other coding parameters than {parts[0].name}"
                codec_data = bytes(context.extradata)
                why = _check_order(container.demux(stream), stream.time_base, part.name)
        except (av.error.FFmpegError, OSError, IndexError) as exc:
            return f"cannot read {part.name} ({exc})"
        if isinstance(why, str):
            return why
        packets += why
    if packets != info.frame_count:
        return f"the video has {packets} frames, its timestamps list {info.frame_count}"
    assert codec_data is not None
    return H264Track(tuple(parts), codec_data)


def _check_order(
    packets: Iterator[av.Packet[Any]], time_base: Fraction | None, name: str
) -> int | str:
    """The number of frames, or why the packets cannot be streamed as they are."""
    count, last_pts, last_key_pts = 0, -1, None
    for packet in packets:
        if packet.size == 0:  # the demuxer's end-of-stream marker
            continue
        if packet.is_corrupt:
            return f"{name} is damaged at byte {packet.pos}"
        pts = packet.pts
        if pts is None or time_base is None:
            return f"{name} has packets without a presentation time"
        if pts <= last_pts:
            return f"{name} has B-frames (frames coded out of the order they are shown)"
        if packet.is_keyframe:
            last_key_pts = pts
        elif last_key_pts is None:
            return f"{name} does not start with a keyframe"
        elif float((pts - last_key_pts) * time_base) > MAX_KEYFRAME_GAP_S:
            return f"{name} has keyframes further apart than {MAX_KEYFRAME_GAP_S:g} s"
        last_pts = pts
        count += 1
    return count


class Passthrough:
    """Frame ``i`` of the recording as packet ``i`` of its video, undecoded.

    After a frame was not sent (a stall, the device away) the next one sent is a keyframe: a
    frame predicted from one the client never got would decode to garbage.
    """

    def __init__(self, track: H264Track) -> None:
        self.track = track
        self.codec_data: bytes | None = track.codec_data  # the RTSP child's H.264 parameters
        self._packets: Generator[tuple[bytes, bool], None, None] | None = None
        self._next_index = 0
        self._need_keyframe = True

    def _read(self) -> Generator[tuple[bytes, bool], None, None]:
        for part in self.track.parts:
            with av.open(str(part)) as container:
                for packet in container.demux(container.streams.video[0]):
                    if packet.size:
                        yield bytes(packet), packet.is_keyframe

    def _packet(self, index: int) -> tuple[bytes, bool]:
        if self._packets is None or index < self._next_index:  # a looped recording's next pass
            self.close()
            self._packets = self._read()
        try:
            while True:
                data, key = next(self._packets)
                self._next_index += 1
                if self._next_index > index:
                    return data, key
        except StopIteration:
            raise SourceError(f"{self.track.parts[-1]}: no packet for frame {index}") from None
        except (av.error.FFmpegError, OSError) as exc:
            where = self.track.parts[0].parent
            raise SourceError(f"{where}: cannot read scene frame {index} ({exc})") from exc

    def skipped(self) -> None:
        """A frame was not sent."""
        self._need_keyframe = True

    async def payload(self, frame: SceneFrame) -> tuple[int, bytes | memoryview] | None:
        """The message kind and payload for the RTSP child; None while waiting for a keyframe."""
        data, key = self._packet(frame.index)
        if self._need_keyframe and not key:
            return None
        self._need_keyframe = False
        return (gst_rtsp.KIND_H264_KEY if key else gst_rtsp.KIND_H264), data

    def close(self) -> None:
        """Close the video file being read."""
        if self._packets is not None:
            self._packets.close()
            self._packets = None
        self._next_index = 0


class Reencode:
    """Each frame's pixels as I420 (BT.601, limited range: the colours a decoder assumes for
    H.264 that does not say), for the RTSP child to encode. I420 as it is: a BGR frame would
    be twice the bytes through the pipe, and converting it there (GStreamer's videoconvert)
    cost more than encoding it."""

    def __init__(self, address: str, info: SourceInfo) -> None:
        self._address = address
        self._size = (info.frame_width_px, info.frame_height_px)
        self.codec_data: bytes | None = None  # the RTSP child encodes

    def skipped(self) -> None:
        """A frame was not sent (nothing to do: every encoded frame stands on its own)."""

    async def payload(self, frame: SceneFrame) -> tuple[int, bytes | memoryview] | None:
        """The message kind and payload, decoded and converted in a worker thread. Cancelled,
        it still waits for the thread: the source must stay open while its decoder runs."""
        decoding = asyncio.ensure_future(asyncio.to_thread(self._i420, frame))
        try:
            i420 = await asyncio.shield(decoding)
        except asyncio.CancelledError:
            await asyncio.wait([decoding])
            raise
        return gst_rtsp.KIND_FRAME, i420.reshape(-1).data

    def close(self) -> None:
        """Nothing is held open."""

    def _i420(self, frame: SceneFrame) -> NDArray[np.uint8]:
        # A video source's frames come as I420 straight from the decoder; the others' via BGR.
        if frame.decode_i420 is not None:
            i420 = frame.decode_i420()
            shape = (i420.shape[1], i420.shape[0] * 2 // 3)
        else:
            pixels = frame.decode()
            shape = (pixels.shape[1], pixels.shape[0])
            i420 = np.asarray(cv2.cvtColor(pixels, cv2.COLOR_BGR2YUV_I420), dtype=np.uint8)
        if shape != self._size:
            raise SourceError(
                f"{self._address}: frame {frame.index} is {shape[0]}×{shape[1]}, "
                f"not {self._size[0]}×{self._size[1]}"
            )
        return i420
