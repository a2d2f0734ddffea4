"""A source that replays another one forever, in real time: the service's demo and recordings.

Each pass re-creates the wrapped source (from a factory, in a worker thread: a synthetic scene
is rendered when it is created), opens it and streams it with its timestamps shifted by the
duration of the passes before, so time only ever increases, as it does with live glasses.
Frame indices continue the same way.

The stream is paced in real time across all passes (the wrapped source should replay as fast
as possible). A consumer that falls behind real time by more than ``max_lag_s`` gets no stale
scene frames: they are dropped and counted, as live glasses drop them. Gaze samples, fixations
and events are never dropped: they are cheap, and the frames after them need them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncGenerator, Callable

from gazecam.errors import SourceError
from gazecam.records import Fixation, GazeSample, SceneFrame, SourceInfo, SourceItem
from gazecam.sources.base import Source, SourceStats, item_time_ns

# Between the last item of one pass and the first of the next, when the source does not say
# how long it lasts: one scene frame at 30 Hz.
_PASS_GAP_NS = 33_333_333


def shift_item(item: SourceItem, offset_ns: int, index_offset: int) -> SourceItem:
    """The item ``offset_ns`` later; a scene frame's index also moves on by ``index_offset``."""
    if isinstance(item, Fixation):
        return dataclasses.replace(
            item, start_ns=item.start_ns + offset_ns, end_ns=item.end_ns + offset_ns
        )
    if isinstance(item, SceneFrame):
        return dataclasses.replace(
            item, timestamp_ns=item.timestamp_ns + offset_ns, index=item.index + index_offset
        )
    return dataclasses.replace(item, timestamp_ns=item.timestamp_ns + offset_ns)


class LoopedSource:
    """Replays the source that ``factory`` creates, pass after pass, until closed."""

    def __init__(self, factory: Callable[[], Source], max_lag_s: float = 0.2) -> None:
        self._factory = factory
        self._max_lag_ns = int(max_lag_s * 1e9)
        self.uri = "loop"
        self.stats = SourceStats()
        self.passes = 0  # passes streamed to the end
        self._current: Source | None = None
        # The pass before stays open while the next one starts: the capture pipeline may still
        # decode its last frames (matched only once the next pass's gaze arrives).
        self._previous: Source | None = None
        self._info: SourceInfo | None = None

    async def _open_pass(self) -> tuple[Source, SourceInfo]:
        source = await asyncio.to_thread(self._factory)
        try:
            info = await source.open()
        except BaseException:
            await source.close()
            raise
        return source, info

    async def open(self) -> SourceInfo:
        """Open the first pass; the metadata is the wrapped source's, with no end."""
        self._current, self._info = await self._open_pass()
        self.uri = self._current.uri
        return dataclasses.replace(self._info, frame_count=None, duration_ns=None)

    async def stream(self) -> AsyncGenerator[SourceItem, None]:
        """Every pass's items, shifted and paced in real time; never ends by itself."""
        if self._current is None or self._info is None:
            raise SourceError(f"{self.uri}: stream() before open()")
        offset_ns = 0
        index_offset = 0
        anchor: tuple[int, int] | None = None  # (first item's time, wall clock then)
        while True:
            source = self._current
            first_ns: int | None = None
            last_ns = 0
            frames = 0
            async for item in source.stream():
                last_ns = item_time_ns(item)
                first_ns = last_ns if first_ns is None else first_ns
                shifted = shift_item(item, offset_ns, index_offset)
                t_ns = item_time_ns(shifted)
                if anchor is None:
                    anchor = (t_ns, time.monotonic_ns())
                ahead_ns = (t_ns - anchor[0]) - (time.monotonic_ns() - anchor[1])
                if ahead_ns > 0:
                    await asyncio.sleep(ahead_ns / 1e9)
                if isinstance(shifted, SceneFrame):
                    frames += 1
                    if ahead_ns < -self._max_lag_ns:
                        self.stats.frames_dropped += 1
                        continue
                    self.stats.frames_in += 1
                elif isinstance(shifted, GazeSample):
                    self.stats.gaze_in += 1
                yield shifted
            if first_ns is None:
                raise SourceError(f"{self.uri}: a pass of the source has no items to loop")
            span_ns = last_ns - first_ns
            duration_ns = self._info.duration_ns or 0
            offset_ns += duration_ns if duration_ns > span_ns else span_ns + _PASS_GAP_NS
            index_offset += frames
            self.passes += 1
            self.stats.frames_dropped += source.stats.frames_dropped
            if self._previous is not None:
                await self._previous.close()
            self._previous = source
            self._current, self._info = await self._open_pass()

    async def close(self) -> None:
        """Close the open passes. Safe to call twice."""
        for source in (self._previous, self._current):
            if source is not None:
                await source.close()
        self._previous = self._current = None
