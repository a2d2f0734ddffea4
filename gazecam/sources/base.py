"""The source role: one async interface for recordings, exports, live glasses and synthetic scenes.

A source is opened (which reads and checks its metadata), then pulled as an async iterator of
time-stamped items, then closed::

    source = open_source("path/to/recording", settings)
    info = await source.open()          # metadata before the first item
    try:
        async for item in source.stream():   # GazeSample | SceneFrame | Fixation | SourceEvent
            ...
    finally:
        await source.close()

Recorded sources yield items in timestamp order. Live sources yield them as they arrive, which
is nearly, but not exactly, in order; downstream stages allow for that.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from gazecam.errors import SourceError
from gazecam.records import ClockOffset, Fixation, GazeSample, SceneFrame, SourceInfo, SourceItem
from gazecam.settings import Pace

log = logging.getLogger(__name__)

# A recording's data begins within seconds of its start time (the scene camera takes a moment
# to start). A start time further away than this is a wrong phone clock or an edited file.
START_TOLERANCE_NS = 60 * 10**9


@dataclass
class SourceStats:
    """Counters a source keeps while it streams (mutable: updated in place)."""

    frames_in: int = 0
    frames_dropped: int = 0  # live: stale frames replaced by a newer one before being pulled
    gaze_in: int = 0
    gaze_dropped: int = 0  # live: oldest gaze dropped from a full queue (consumer too slow)
    reconnects: int = 0
    frames_stale: int = 0  # live: dropped, their time too far from their arrival (wrong clock)
    clock_estimates: int = 0  # live: Time Echo estimates of the clock offset (open's included)
    clock: ClockOffset | None = None  # live: the latest estimate (device - local)


class Source(Protocol):
    """Anything that yields time-stamped scene frames and gaze samples."""

    uri: str
    stats: SourceStats

    async def open(self) -> SourceInfo:
        """Read and check the metadata; raise SourceError naming what is wrong."""
        ...

    def stream(self) -> AsyncIterator[SourceItem]:
        """The items, pulled by the caller. Only valid after ``open()``."""
        ...

    async def close(self) -> None:
        """Release files, decoders and connections. Safe to call twice."""
        ...


def item_time_ns(item: SourceItem) -> int:
    """The time an item is ordered by: a fixation's start, everything else's timestamp."""
    if isinstance(item, Fixation):
        return item.start_ns
    return item.timestamp_ns


INT64_MAX = 2**63 - 1  # timestamps are stored as numpy int64


def info_ns(info: Mapping[str, Any], key: str, where: str) -> int | None:
    """An info.json field in nanoseconds (``start_time``, ``duration``), None where absent.

    SourceError naming ``where`` unless it is an integer from 0 to ``INT64_MAX``.
    """
    value = info.get(key)
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT64_MAX
    ):
        raise SourceError(
            f"{where}: '{key}' is {value!r}, expected integer nanoseconds from 0 to {INT64_MAX}"
        )
    return value


def recording_span(
    info: Mapping[str, Any], where: str, first_ns: int, last_ns: int
) -> tuple[int, int]:
    """``(start_ns, duration_ns)`` of a recording whose data runs from ``first_ns`` to
    ``last_ns``, from its info.json (read from ``where``) where that says and agrees.

    A ``start_time`` further than ``START_TOLERANCE_NS`` from the first data timestamp (a
    wrong phone clock, an edited file) is not used: the first data timestamp is the start,
    with a warning, and the duration is the data's.
    """
    start_ns = info_ns(info, "start_time", where)
    duration_ns = info_ns(info, "duration", where)
    if start_ns is not None and abs(start_ns - first_ns) > START_TOLERANCE_NS:
        log.warning(
            "%s: 'start_time' is %.1f s %s the first data timestamp; using the first data "
            "timestamp as the start",
            where,
            abs(start_ns - first_ns) / 1e9,
            "before" if start_ns < first_ns else "after",
        )
        start_ns = duration_ns = None
    if start_ns is None:
        start_ns = first_ns
    if duration_ns is None:
        duration_ns = last_ns - start_ns
    return start_ns, duration_ns


def merge_by_time(*streams: Iterable[SourceItem]) -> Iterator[SourceItem]:
    """Merge streams that are each sorted by time into one sorted stream (lazily)."""
    return heapq.merge(*streams, key=item_time_ns)


# The replay hands control back to the event loop at least every this many items, so a
# server's other tasks (websockets, perception) and signal handlers run during a replay.
_YIELD_EVERY_ITEMS = 64


async def replay(
    items: Iterable[SourceItem], pace: Pace, stats: SourceStats
) -> AsyncIterator[SourceItem]:
    """Turn a time-sorted iterable into an async stream, paced in real time or as fast as possible.

    In 'realtime' pacing an item is released when as much wall time has passed since the first
    item as recording time has; a consumer that falls behind is not waited for (but the event
    loop still gets its turn every ``_YIELD_EVERY_ITEMS`` items). Frames and gaze samples are
    counted in ``stats``.
    """
    t0_item_ns: int | None = None
    t0_wall_ns = 0
    for n, item in enumerate(items):
        wait_ns = 0
        if pace == "realtime":
            t_ns = item_time_ns(item)
            if t0_item_ns is None:
                t0_item_ns, t0_wall_ns = t_ns, time.monotonic_ns()
            wait_ns = (t_ns - t0_item_ns) - (time.monotonic_ns() - t0_wall_ns)
        if wait_ns > 0:
            await asyncio.sleep(wait_ns / 1e9)
        elif n % _YIELD_EVERY_ITEMS == 0:
            await asyncio.sleep(0)
        if isinstance(item, GazeSample):
            stats.gaze_in += 1
        elif isinstance(item, SceneFrame):
            stats.frames_in += 1
        yield item
