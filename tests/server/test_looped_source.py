"""LoopedSource: the synthetic demo replayed pass after pass, time always increasing, in real
time, stale frames dropped when the consumer falls behind."""

from __future__ import annotations

import asyncio
import contextlib
import time

from gazecam.records import GazeSample, SceneFrame, SourceItem
from gazecam.settings import SourceSettings
from gazecam.sources import open_source
from gazecam.sources.base import Source, item_time_ns
from gazecam.sources.looped import LoopedSource
from gazecam.sources.synthetic import START_NS, read_frame_code

SCENE_S = 0.5  # 15 frames and 100 gaze samples a pass
FRAMES_PER_PASS = 15


def demo() -> Source:
    return open_source("synthetic:demo", SourceSettings(synthetic_duration_s=SCENE_S, pace="fast"))


async def take(source: LoopedSource, count: int) -> list[SourceItem]:
    items: list[SourceItem] = []
    async with contextlib.aclosing(source.stream()) as stream:
        async for item in stream:
            items.append(item)
            if len(items) == count:
                break
    return items


async def test_passes_follow_each_other_in_time_and_in_real_time() -> None:
    source = LoopedSource(demo)
    info = await source.open()
    assert info.kind == "synthetic" and info.frame_count is None and info.duration_ns is None
    started = time.monotonic()
    try:
        items = await take(source, 3 * (FRAMES_PER_PASS + 100) - 10)  # into the third pass
    finally:
        await source.close()
    elapsed_s = time.monotonic() - started
    times = [item_time_ns(item) for item in items]
    assert times == sorted(times)
    assert times[0] == START_NS and times[-1] - times[0] > 2 * SCENE_S * 1e9
    # Paced in real time: a bit over two passes of the scene took as long to stream.
    assert 2 * SCENE_S - 0.05 < elapsed_s < 2 * SCENE_S + 1.0
    frames = [item for item in items if isinstance(item, SceneFrame)]
    assert [f.index for f in frames] == list(range(len(frames)))
    # Each pass is the scene again: the next pass's first frame shows frame 0, one scene later.
    again = frames[FRAMES_PER_PASS]
    assert read_frame_code(again.bgr()) == 0
    assert again.timestamp_ns - frames[0].timestamp_ns == int(SCENE_S * 1e9)
    gaze = [item for item in items if isinstance(item, GazeSample)]
    assert source.passes == 2
    assert source.stats.frames_in == len(frames) and source.stats.gaze_in == len(gaze)
    assert source.stats.frames_dropped == 0


async def test_a_consumer_behind_real_time_gets_no_stale_frames() -> None:
    source = LoopedSource(demo, max_lag_s=0.1)
    await source.open()
    try:
        async with contextlib.aclosing(source.stream()) as stream:
            first = await anext(stream)
            await asyncio.sleep(0.3)  # busy elsewhere: 9 frames' time passes
            behind: list[SourceItem] = [first]
            async for item in stream:
                behind.append(item)
                if item_time_ns(item) - item_time_ns(first) > 0.3e9:
                    break
    finally:
        await source.close()
    frames = [item for item in behind if isinstance(item, SceneFrame)]
    # The frames of the first 0.2 s (more than 0.1 s late) were dropped; all gaze came.
    assert source.stats.frames_dropped >= 5
    assert all(f.timestamp_ns - START_NS > 0.15e9 for f in frames[1:])
    assert sum(isinstance(item, GazeSample) for item in behind) >= 60
