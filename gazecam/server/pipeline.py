"""The service's capture loop: the source runs through the capture core all the time, and
keyframe crops go to one perception worker through a one-slot, newest-wins hand-off.

Nothing queues without bound. The capture core keeps up with the source (it only matches
timestamps and cuts crops); a keyframe that arrives while perception is still busy with the
one before replaces the keyframe waiting in the slot, which is counted as dropped, so
perception always works on the newest view and an ask never waits for capture. While a
local engine generates an answer the slot holds its keyframe back (up to
``perception_yield_s``): the answer gets the cores, and perception takes the newest keyframe
when it ends. Stale scene frames are dropped by the source itself (live glasses, or a looped
replay behind real time) and counted. A source that fails or ends is logged and restarted
with a growing backoff: the service outlives its source.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from gazecam.capture.pipeline import Capture, CaptureResult, capture
from gazecam.errors import GazecamError
from gazecam.records import Crop, MatchedFrame, SourceEvent, SourceInfo
from gazecam.server.settings import ServerSettings
from gazecam.settings import CaptureSettings
from gazecam.sources.base import Source, SourceStats

logger = logging.getLogger("gazecam.server")

SourceState = Literal["starting", "running", "restarting", "stopped"]


@dataclass
class PipelineStats:
    """Running totals since the service started, over all source restarts (updated in place)."""

    frames_in: int = 0  # scene frames the source delivered
    frames_dropped: int = 0  # stale scene frames the source dropped (frames_stale included)
    frames_processed: int = 0  # frames through the capture core (matched with gaze or not)
    keyframes: int = 0  # keyframe crops cut
    keyframes_dropped: int = 0  # replaced in the hand-off before perception took them
    keyframes_perceived: int = 0
    perception_errors: int = 0
    source_restarts: int = 0


def _log_failure(task: asyncio.Task[None]) -> None:
    # Both loops handle their errors and end only when cancelled; anything else is a bug that
    # must not pass unseen (stop() does not raise it: the service is shutting down by then).
    if not task.cancelled() and task.exception() is not None:
        logger.error("%s stopped", task.get_name(), exc_info=task.exception())


class KeyframeSlot:
    """A one-slot hand-off between the capture loop and the perception worker; newest wins.

    While paused (an answer under way) a crop is held back, but for at most ``yield_s`` from
    the time the worker could have taken it: answers come first, yet back-to-back asks cannot
    starve perception.
    """

    def __init__(self, yield_s: float) -> None:
        self.yield_s = yield_s
        self.paused = False
        self._crop: Crop | None = None
        self._changed = asyncio.Event()

    def put(self, crop: Crop) -> bool:
        """Offer a crop; True when it replaced one the worker had not taken yet."""
        replaced = self._crop is not None
        self._crop = crop
        self._changed.set()
        return replaced

    def pause(self, paused: bool) -> None:
        """Hold crops back (True) or hand them out again (False)."""
        self.paused = paused
        self._changed.set()

    async def take(self) -> Crop:
        """Wait for the newest crop (and while paused, up to ``yield_s`` more); empty the slot."""
        held_since: float | None = None
        while True:
            wait_s: float | None = None
            if self._crop is not None:
                if not self.paused:
                    break
                held_since = time.monotonic() if held_since is None else held_since
                wait_s = self.yield_s - (time.monotonic() - held_since)
                if wait_s <= 0:
                    break
            self._changed.clear()
            # A timeout means held long enough: that is seen at the top again.
            with contextlib.suppress(asyncio.TimeoutError):  # TimeoutError only from 3.11 on
                await asyncio.wait_for(self._changed.wait(), wait_s)
        crop, self._crop = self._crop, None
        assert crop is not None  # the loop ends only with a crop
        return crop


class Pipeline:
    """Runs a source through capture and perception in the background until stopped."""

    def __init__(
        self,
        make_source: Callable[[], Source],
        capture_settings: CaptureSettings,
        server: ServerSettings,
        observe_keyframe: Callable[[Crop], object],
        observe_event: Callable[[SourceEvent], Awaitable[object]],
        stats: PipelineStats,
    ) -> None:
        self._make_source = make_source
        self._capture = capture_settings
        self._server = server
        self._observe_keyframe = observe_keyframe
        self._observe_event = observe_event
        self.stats = stats
        self.state: SourceState = "starting"
        self.info: SourceInfo | None = None
        self.last_error: str | None = None
        self.latest: MatchedFrame | None = None
        self.latest_at_s: float | None = None  # time.monotonic() when the latest frame came
        self.latest_crop: Crop | None = None
        self.source_stats: SourceStats | None = None  # the running source's own counters
        self._slot = KeyframeSlot(server.perception_yield_s)
        self._perception = ThreadPoolExecutor(1, thread_name_prefix="gazecam-perception")
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start the capture loop and the perception worker (on the running event loop)."""
        self._tasks = [
            asyncio.create_task(self._capture_forever(), name="gazecam-capture"),
            asyncio.create_task(self._perceive_forever(), name="gazecam-perceive"),
        ]
        for task in self._tasks:
            task.add_done_callback(_log_failure)

    def answering(self, under_way: bool) -> None:
        """A local answer started (True) or ended: while one is under way, keyframes wait."""
        self._slot.pause(under_way)

    async def stop(self) -> None:
        """Stop both, and wait for a perception under way to finish."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await asyncio.to_thread(self._perception.shutdown, True)
        self.state = "stopped"

    async def _capture_forever(self) -> None:
        backoff_s = self._server.restart_backoff_s
        while True:
            started = time.monotonic()
            await self._run_source()
            # A source that ran for a good while before it stopped starts over with short waits.
            if time.monotonic() - started > self._server.restart_backoff_max_s:
                backoff_s = self._server.restart_backoff_s
            self.state = "restarting"
            self.stats.source_restarts += 1
            await asyncio.sleep(backoff_s)
            backoff_s = min(2 * backoff_s, self._server.restart_backoff_max_s)

    async def _run_source(self) -> None:
        """Run one source from open to its end or failure; the failure is logged, not raised."""
        source: Source | None = None
        try:
            source = self._make_source()
            self.source_stats = source.stats
            info = await source.open()
            self.info, self.state, self.last_error = info, "running", None
            seen_in = seen_dropped = 0
            async for result in capture(source, info, self._capture, Capture(info, self._capture)):
                if isinstance(result, SourceEvent):
                    await self._event(result)
                    continue
                stats = source.stats
                # Both are stale: replaced by a newer frame, or off the clock (live glasses).
                dropped = stats.frames_dropped + stats.frames_stale
                self.stats.frames_in += stats.frames_in - seen_in
                self.stats.frames_dropped += dropped - seen_dropped
                seen_in, seen_dropped = stats.frames_in, dropped
                self._frame(result)
            self.last_error = "the source ended"
            logger.warning("%s: the source ended; restarting it", source.uri)
        except GazecamError as exc:
            self.last_error = str(exc)
            logger.error("%s; restarting the source", exc)
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            logger.exception("the source failed; restarting it")
        finally:
            if source is not None:
                await source.close()

    def _frame(self, result: CaptureResult) -> None:
        self.stats.frames_processed += 1
        self.latest, self.latest_at_s = result.matched, time.monotonic()
        if result.crop is not None:
            self.stats.keyframes += 1
            self.latest_crop = result.crop
            if self._slot.put(result.crop):
                self.stats.keyframes_dropped += 1

    async def _event(self, event: SourceEvent) -> None:
        try:
            await self._observe_event(event)
        except GazecamError as exc:  # a malformed annotation must not stop the capture
            logger.warning("ignoring the source's event %r: %s", event.name, exc)

    async def _perceive_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            crop = await self._slot.take()
            try:
                await loop.run_in_executor(self._perception, self._observe_keyframe, crop)
                self.stats.keyframes_perceived += 1
            except Exception:
                self.stats.perception_errors += 1
                logger.exception(
                    "perception of the keyframe at %d ns failed", crop.matched.frame.timestamp_ns
                )
