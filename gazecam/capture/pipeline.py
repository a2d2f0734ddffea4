"""The capture pipeline: source items in; matched frames, fixations, keyframes and crops out.

``Capture`` is the synchronous core (sync → fixations → keyframe choice), pushed one source
item at a time, so it can be tested and benchmarked without an event loop or a video decoder.
``capture()`` drives it from a source and cuts the keyframes' crops in a worker thread, so
decoding a frame never blocks the event loop that serves clients.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from gazecam.capture.crop import KeyframeSelector, gaze_on_frame, make_crop
from gazecam.capture.fixations import FixationTracker, GazeAngles
from gazecam.capture.sync import FrameMatcher
from gazecam.errors import ConfigError
from gazecam.records import (
    Crop,
    Fixation,
    GazeSample,
    MatchedFrame,
    SceneFrame,
    SourceEvent,
    SourceInfo,
    SourceItem,
)
from gazecam.settings import CaptureSettings
from gazecam.sources.base import Source


@dataclass(frozen=True, slots=True)
class FrameResult:
    """A matched frame, and whether it was chosen as a keyframe."""

    matched: MatchedFrame
    keyframe: bool


@dataclass(frozen=True, slots=True)
class CaptureResult:
    """What ``capture()`` yields per frame: the matched frame and, on keyframes, its crop."""

    matched: MatchedFrame
    crop: Crop | None


@dataclass
class CaptureCounts:
    """Running totals of what the pipeline saw (mutable: updated in place)."""

    frames: int = 0
    gaze_ok: int = 0
    no_gaze: int = 0
    not_worn: int = 0
    off_frame: int = 0  # gaze matched but too far outside the frame to centre a crop
    in_fixation: int = 0
    keyframes: int = 0


def fixation_mode(info: SourceInfo, settings: CaptureSettings) -> str:
    """'source' or 'ivt', resolving 'auto' from what the source carries."""
    if settings.fixation_detector == "ivt":
        return "ivt"
    if info.has_fixations:
        return "source"
    if settings.fixation_detector == "source":
        raise ConfigError(
            f"{info.uri}: has no fixation stream of its own (use the 'ivt' fixation detector)"
        )
    return "ivt"


class Capture:
    """The synchronous core of the pipeline; push source items, get matched frames back."""

    def __init__(self, info: SourceInfo, settings: CaptureSettings) -> None:
        self.settings = settings
        self.matcher = FrameMatcher(
            tolerance_ns=int(settings.match_tolerance_ms * 1e6), method=settings.match_method
        )
        angles = GazeAngles(info.frame_width_px, info.frame_height_px, info.camera)
        self.fixations = FixationTracker(fixation_mode(info, settings), settings, angles)
        self.keyframes = KeyframeSelector(settings.keyframes_per_s)
        self.counts = CaptureCounts()

    def push(self, item: SourceItem) -> list[FrameResult | SourceEvent]:
        """Feed one source item; return the frames it completes, or the event itself."""
        if isinstance(item, GazeSample):
            # The fixation tracker sees a sample before the frames it completes are labelled.
            self.fixations.push_gaze(item)
            return self._label(self.matcher.push_gaze(item))
        if isinstance(item, SceneFrame):
            return self._label(self.matcher.push_frame(item))
        if isinstance(item, Fixation):
            self.fixations.push_fixation(item)
            return []
        return [item]

    def flush(self) -> list[FrameResult | SourceEvent]:
        """Complete the frames still waiting for gaze (end of the stream)."""
        return self._label(self.matcher.flush())

    def _on_frame(self, m: MatchedFrame) -> bool:
        x_px, y_px, frame = m.gaze_x_px, m.gaze_y_px, m.frame
        return (
            x_px is not None
            and y_px is not None
            and gaze_on_frame(
                x_px, y_px, frame.width_px, frame.height_px, self.settings.crop_size_px
            )
        )

    def _label(self, matched: list[MatchedFrame]) -> list[FrameResult | SourceEvent]:
        out: list[FrameResult | SourceEvent] = []
        counts = self.counts
        for m in matched:
            counts.frames += 1
            if m.status == "ok" and not self._on_frame(m):
                m = MatchedFrame(m.frame, "off_frame", None, None, None, None)
            if m.status == "ok" and m.gaze_timestamp_ns is not None:
                counts.gaze_ok += 1
                fixation_id = self.fixations.fixation_at(m.gaze_timestamp_ns)
                if fixation_id is not None:
                    counts.in_fixation += 1
                    m = MatchedFrame(
                        m.frame,
                        m.status,
                        m.gaze_timestamp_ns,
                        m.gaze_x_px,
                        m.gaze_y_px,
                        fixation_id,
                    )
            elif m.status == "no_gaze":
                counts.no_gaze += 1
            elif m.status == "not_worn":
                counts.not_worn += 1
            else:
                counts.off_frame += 1
            keyframe = self.keyframes.select(m)
            counts.keyframes += keyframe
            out.append(FrameResult(m, keyframe))
        return out


async def capture(
    source: Source, info: SourceInfo, settings: CaptureSettings, core: Capture | None = None
) -> AsyncIterator[CaptureResult | SourceEvent]:
    """Run an opened source through the pipeline; yields every frame (with a crop on keyframes)
    and every event, in order. Pass ``core`` to read its counters while it runs."""
    core = core or Capture(info, settings)

    async def finish(result: FrameResult | SourceEvent) -> CaptureResult | SourceEvent:
        if isinstance(result, SourceEvent):
            return result
        crop = None
        if result.keyframe:
            matched = result.matched
            crop = await asyncio.to_thread(
                lambda: make_crop(
                    matched,
                    matched.frame.bgr(),
                    settings.crop_mode,
                    settings.crop_size_px,
                    settings.thumbnail_px,
                )
            )
        return CaptureResult(result.matched, crop)

    async for item in source.stream():
        for result in core.push(item):
            yield await finish(result)
    for result in core.flush():
        yield await finish(result)
