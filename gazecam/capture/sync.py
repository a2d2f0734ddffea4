"""Match gaze to scene frames by timestamp.

``match_frames`` is a pure, vectorised function over sorted gaze arrays. ``GazeBuffer`` keeps the
recent gaze of a stream in a bounded ring, and ``FrameMatcher`` holds each frame back only until
the gaze around its timestamp has arrived, then matches it with ``match_frames``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from gazecam.records import GazeSample, GazeStatus, MatchedFrame, SceneFrame

MatchMethod = Literal["interpolate", "nearest"]

STATUS_OK, STATUS_NO_GAZE, STATUS_NOT_WORN = 0, 1, 2
_STATUS_NAMES: tuple[GazeStatus, ...] = ("ok", "no_gaze", "not_worn")


@dataclass(frozen=True, slots=True)
class Matches:
    """Gaze matched to N frames; arrays of shape (N,). x/y/time are meaningless unless status 0."""

    status: NDArray[np.int8]  # STATUS_OK / STATUS_NO_GAZE / STATUS_NOT_WORN
    gaze_timestamp_ns: NDArray[np.int64]
    x_px: NDArray[np.float64]
    y_px: NDArray[np.float64]


def match_frames(
    frame_ts_ns: NDArray[np.int64],
    gaze_ts_ns: NDArray[np.int64],
    gaze_x_px: NDArray[np.float64],
    gaze_y_px: NDArray[np.float64],
    gaze_worn: NDArray[np.bool_],
    tolerance_ns: int,
    method: MatchMethod = "interpolate",
) -> Matches:
    """Match each frame time to the gaze around it.

    Gaze arrays are sorted by time, shape (M,). 'nearest' takes the closest sample within
    ``tolerance_ns``; 'interpolate' interpolates linearly between the samples just before and
    just after the frame when both are within tolerance, and otherwise falls back to 'nearest'.
    A frame with no sample within tolerance is STATUS_NO_GAZE; one whose matched sample(s) say
    the glasses were not worn is STATUS_NOT_WORN.
    """
    n = frame_ts_ns.shape[0]
    status = np.full(n, STATUS_NO_GAZE, dtype=np.int8)
    out_ts = np.zeros(n, dtype=np.int64)
    out_x = np.full(n, np.nan)
    out_y = np.full(n, np.nan)
    if gaze_ts_ns.shape[0] == 0 or n == 0:
        return Matches(status, out_ts, out_x, out_y)

    last = gaze_ts_ns.shape[0] - 1
    after = np.searchsorted(gaze_ts_ns, frame_ts_ns, side="left")  # first sample >= frame
    before = after - 1
    has_after = after <= last
    has_before = before >= 0
    a = np.minimum(after, last)
    b = np.maximum(before, 0)
    dt_after = np.where(has_after, gaze_ts_ns[a] - frame_ts_ns, np.iinfo(np.int64).max)
    dt_before = np.where(has_before, frame_ts_ns - gaze_ts_ns[b], np.iinfo(np.int64).max)
    ok_after = dt_after <= tolerance_ns
    ok_before = dt_before <= tolerance_ns

    nearest = np.where(dt_after <= dt_before, a, b)
    use_nearest = ok_after | ok_before
    out_ts = np.where(use_nearest, gaze_ts_ns[nearest], 0)
    out_x = np.where(use_nearest, gaze_x_px[nearest], np.nan)
    out_y = np.where(use_nearest, gaze_y_px[nearest], np.nan)
    worn = np.where(use_nearest, gaze_worn[nearest], False)

    if method == "interpolate":
        both = ok_after & ok_before & (dt_after > 0)
        span = np.where(both, gaze_ts_ns[a] - gaze_ts_ns[b], 1).astype(np.float64)
        w = np.where(both, dt_before / span, 0.0)  # weight of the sample after the frame
        out_x = np.where(both, gaze_x_px[b] + w * (gaze_x_px[a] - gaze_x_px[b]), out_x)
        out_y = np.where(both, gaze_y_px[b] + w * (gaze_y_px[a] - gaze_y_px[b]), out_y)
        out_ts = np.where(both, frame_ts_ns, out_ts)
        # Interpolating across a take-off or put-on would invent a gaze point: both must be worn.
        worn = np.where(both, gaze_worn[a] & gaze_worn[b], worn)

    status[use_nearest & worn] = STATUS_OK
    status[use_nearest & ~worn] = STATUS_NOT_WORN
    return Matches(status, out_ts.astype(np.int64), out_x, out_y)


class GazeBuffer:
    """The most recent gaze samples of a stream, in time order, in a bounded ring.

    Samples that arrive out of order (at or before the newest one) are dropped and counted:
    the matcher needs sorted times, and a late sample is older than what it already used.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        # Twice the capacity, so that appends are O(1) and the live window is one slice.
        self._ts = np.zeros(2 * capacity, dtype=np.int64)
        self._x = np.zeros(2 * capacity)
        self._y = np.zeros(2 * capacity)
        self._worn = np.zeros(2 * capacity, dtype=np.bool_)
        self._start = 0
        self._end = 0
        self.out_of_order = 0

    def __len__(self) -> int:
        return self._end - self._start

    @property
    def newest_ns(self) -> int | None:
        """Timestamp of the newest sample, or None when empty."""
        return int(self._ts[self._end - 1]) if self._end > self._start else None

    def append(self, sample: GazeSample) -> None:
        """Add one sample (dropped and counted if it is not newer than the newest)."""
        if self._end > self._start and sample.timestamp_ns <= self._ts[self._end - 1]:
            self.out_of_order += 1
            return
        if self._end == self._ts.shape[0]:
            keep = self.capacity - 1
            for arr in (self._ts, self._x, self._y, self._worn):
                arr[:keep] = arr[self._end - keep : self._end]
            self._start, self._end = 0, keep
        elif self._end - self._start == self.capacity:
            self._start += 1
        i = self._end
        self._ts[i] = sample.timestamp_ns
        self._x[i] = sample.x_px
        self._y[i] = sample.y_px
        self._worn[i] = sample.worn
        self._end += 1

    def match(
        self, frame_ts_ns: NDArray[np.int64], tolerance_ns: int, method: MatchMethod
    ) -> Matches:
        """Match frame times against the buffered samples (see ``match_frames``)."""
        s = slice(self._start, self._end)
        return match_frames(
            frame_ts_ns, self._ts[s], self._x[s], self._y[s], self._worn[s], tolerance_ns, method
        )


class FrameMatcher:
    """Matches a stream of frames to a stream of gaze, holding a frame only as long as needed.

    A frame is matched once a gaze sample at or after its time has arrived (so both samples
    around it are known), or once a frame more than the tolerance newer has arrived (the gaze
    for it is late or missing), or at ``flush()``. At most ``max_pending`` frames wait; beyond
    that the oldest is matched with what is there, so a stalled gaze stream cannot grow memory.
    """

    def __init__(
        self,
        tolerance_ns: int,
        method: MatchMethod = "interpolate",
        buffer: GazeBuffer | None = None,
        max_pending: int = 16,
    ) -> None:
        self.tolerance_ns = tolerance_ns
        self.method: MatchMethod = method
        self.gaze = buffer or GazeBuffer()
        self.max_pending = max_pending
        self._pending: deque[SceneFrame] = deque()

    def push_gaze(self, sample: GazeSample) -> list[MatchedFrame]:
        """Add a gaze sample; return the frames it completes (fixation_id still None)."""
        self.gaze.append(sample)
        newest = self.gaze.newest_ns
        ready = 0
        while ready < len(self._pending) and newest is not None:
            if self._pending[ready].timestamp_ns > newest:
                break
            ready += 1
        return self._match_first(ready)

    def push_frame(self, frame: SceneFrame) -> list[MatchedFrame]:
        """Add a frame; return the frames now matched (possibly this one), in order."""
        self._pending.append(frame)
        newest_gaze = self.gaze.newest_ns
        ready = 0
        for pending in self._pending:
            gaze_arrived = newest_gaze is not None and newest_gaze >= pending.timestamp_ns
            gaze_late = frame.timestamp_ns - pending.timestamp_ns > self.tolerance_ns
            if not (gaze_arrived or gaze_late):
                break
            ready += 1
        ready = max(ready, len(self._pending) - self.max_pending)
        return self._match_first(ready)

    def flush(self) -> list[MatchedFrame]:
        """Match every frame still waiting (end of stream)."""
        return self._match_first(len(self._pending))

    def _match_first(self, count: int) -> list[MatchedFrame]:
        if count <= 0:
            return []
        frames = [self._pending.popleft() for _ in range(count)]
        ts = np.fromiter((f.timestamp_ns for f in frames), dtype=np.int64, count=count)
        m = self.gaze.match(ts, self.tolerance_ns, self.method)
        out = []
        for i, frame in enumerate(frames):
            ok = m.status[i] == STATUS_OK
            out.append(
                MatchedFrame(
                    frame=frame,
                    status=_STATUS_NAMES[m.status[i]],
                    gaze_timestamp_ns=int(m.gaze_timestamp_ns[i]) if ok else None,
                    gaze_x_px=float(m.x_px[i]) if ok else None,
                    gaze_y_px=float(m.y_px[i]) if ok else None,
                    fixation_id=None,
                )
            )
        return out
