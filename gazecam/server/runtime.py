"""The service's state: the assistant, the capture pipeline feeding it, and asks against it.

Threads and what they share: the perception worker runs ``observe_keyframe`` and client
events run ``observe_event``, each under the tracker lock, so a step event can never be lost
to a keyframe update running at the same time. Answers are generated in one generation
thread, one at a time across all clients (the CPU can run one at a time): an asyncio lock
queues asks fairly, and each answer's pieces reach the event loop as they come. Reading the
current step needs no lock (the tracker replaces its belief in one assignment). While a local
engine generates an answer, perception leaves the cores to it: the newest keyframe waits (up
to ``perception_yield_s``) and is perceived when the answer ends.

The queue in front of the generation thread is bounded in length and in wait: an ask that
would wait longer than ``ask_queue_wait_s`` (the asks ahead of it times the median of the
recent answers' times), that finds ``ask_queue_max`` asks waiting already, or that has waited
``ask_queue_wait_s`` without starting, is refused as ``busy`` with its queue position, so no
client waits silently. While the source is down, an ask is told so instead of being answered
from what was seen before the outage.

Memory: every decoding step gathers the attended KV entries into new arrays of megabytes, and
ONNX Runtime returns the new keys and values in as many. glibc's malloc raises its mmap
threshold to the largest block freed (up to 32 MiB), so after the first few steps these blocks
come from the heap, where their holes are kept: a soak of the service grew by ~5 MB/min. With
a fixed threshold of 1 MiB they are mmapped and given back when freed, and the service's RSS
levels off (benchmarks/bench_soak.py; ``MALLOC_MMAP_THRESHOLD_`` set in the environment wins).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import platform
import statistics
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import cv2

from gazecam.assist.answers import Conversation
from gazecam.assist.assistant import Answer, Assistant, AssistantSettings, Engines, crop_json
from gazecam.assist.steps import StepEstimate
from gazecam.assist.tasks import TaskCard
from gazecam.records import Crop, SourceEvent
from gazecam.server.errors import ClientError
from gazecam.server.pipeline import Pipeline, PipelineStats
from gazecam.server.settings import ServerSettings
from gazecam.settings import CaptureSettings, SourceSettings
from gazecam.sources import check_address, open_source
from gazecam.sources.base import Source
from gazecam.sources.looped import LoopedSource
from gazecam.trt.providers import choices as provider_choices

logger = logging.getLogger("gazecam.server")

_JPEG_QUALITY = 85
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
_MMAP_THRESHOLD_BYTES = 1 << 20
_END = object()  # the generation thread's last item
_RECENT_ANSWERS = 16  # the answer times the queue's wait estimate is taken from


class QueueFullError(ClientError):
    """An ask that cannot start within the queue's wait: ``busy``, with its place in line."""

    def __init__(self, position: int, reason: str) -> None:
        # The error object has ``queue_position``: the asks that were ahead of it.
        super().__init__(
            "busy",
            f"{position} asks ahead of yours in the answer queue: {reason}; ask again later",
            extra={"queue_position": position},
        )


def return_large_blocks_to_the_os() -> None:
    """Fix glibc's mmap threshold at 1 MiB, so large freed arrays go back to the OS (see the
    module docstring); nothing elsewhere, or where the environment sets it already."""
    if platform.libc_ver()[0] != "glibc" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    if not ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES):
        logger.warning("mallopt(M_MMAP_THRESHOLD) failed: the service's memory may grow")


def source_factory(address: str, settings: SourceSettings) -> Callable[[], Source]:
    """What the capture loop (re)opens: live glasses as they are, anything else looped.

    A malformed address is refused here, before the service starts (ConfigError/SourceError).
    """
    check_address(address)
    if address.startswith("neon://"):
        return lambda: open_source(address, settings)
    # The loop paces in real time; each pass is read as fast as the loop pulls it.
    inner = settings.model_copy(update={"pace": "fast"})
    return lambda: LoopedSource(lambda: open_source(address, inner))


class Runtime:
    """One assistant, its capture pipeline, and the generation thread."""

    def __init__(
        self,
        server: ServerSettings,
        card: TaskCard,
        engines: Engines,
        stats: PipelineStats,
        *,
        make_source: Callable[[], Source],
        capture: CaptureSettings,
        assistant: AssistantSettings,
    ) -> None:
        return_large_blocks_to_the_os()
        self.server = server
        self.engines = engines
        self.assistant = Assistant(card, engines.perception, engines.model, assistant)
        self._tracker_lock = threading.Lock()
        self._generation_lock = asyncio.Lock()
        self._generation = ThreadPoolExecutor(1, thread_name_prefix="gazecam-generate")
        self.pipeline = Pipeline(
            make_source,
            capture.with_thumbnail(engines.model.thumbnail_px),
            server,
            self._observe_keyframe,
            self._observe_source_event,
            stats,
        )
        self.started = time.monotonic()
        self._jpeg: tuple[Crop, bytes] | None = None
        self._waiting: list[object] = []  # asks waiting for the generation lock, in order
        self._answer_s: deque[float] = deque(maxlen=_RECENT_ANSWERS)  # generation lock held

    def start(self) -> None:
        """Start capture and perception in the background."""
        self.pipeline.start()

    async def stop(self) -> None:
        """Stop capture, wait for work under way, and take what the keyframes showed out of
        the model's KV cache (the model outlives this runtime)."""
        await self.pipeline.stop()
        await asyncio.to_thread(self._generation.shutdown, True)
        self.engines.model.clear_memory()

    def _observe_keyframe(self, crop: Crop) -> None:
        with self._tracker_lock:
            self.assistant.observe_keyframe(crop)

    def _observe_event(self, event: SourceEvent) -> StepEstimate:
        with self._tracker_lock:
            self.assistant.observe_event(event)
            return self.assistant.tracker.current()

    async def _observe_source_event(self, event: SourceEvent) -> None:
        await asyncio.to_thread(self._observe_event, event)

    async def apply_event(self, name: str) -> StepEstimate:
        """Apply a client's step event (``step.next``, ``step.back``, ``step.set:N``)."""
        if not name.startswith("step."):
            raise ClientError(
                "bad_request", f"event {name!r}: only step.next, step.back and step.set:N are taken"
            )
        latest = self.pipeline.latest
        timestamp_ns = latest.frame.timestamp_ns if latest is not None else 0
        return await asyncio.to_thread(self._observe_event, SourceEvent(timestamp_ns, name))

    async def load_card(self, card: TaskCard) -> None:
        """Work on a new task card from now on; what was seen stays in memory.

        The card's context is prefilled here (at most ``context_max_tokens``); a card that
        cannot be taken leaves the one before in place.
        """
        async with self._generation_lock:  # not in the middle of someone's answer
            await asyncio.to_thread(self._swap_card, card)

    def _swap_card(self, card: TaskCard) -> None:
        with self._tracker_lock:
            old = self.assistant
            # Raises before anything changes if the card cannot be taken.
            new = Assistant(card, old.perception, old.model, old.settings, old.memory.settings)
            # The memory's regions are in the model's KV cache: the new assistant keeps them
            # (and drops them in its turn), and answers from the latest keyframe at once.
            new.memory, new.latest_crop = old.memory, old.latest_crop
            new.latest_regions, new.perception_ms = old.latest_regions, old.perception_ms
            self.assistant = new

    @property
    def asks_waiting(self) -> int:
        """Asks waiting for the generation thread (not counting the answer under way)."""
        return len(self._waiting)

    def _source_down(self) -> str | None:
        """Why answers cannot rest on the scene now (the source is down), or None."""
        pipeline, now = self.pipeline, time.monotonic()
        age_s = now - (pipeline.latest_at_s or self.started)
        if pipeline.state == "running" and age_s <= self.server.source_stale_s:
            return None
        what = (
            "the glasses are not connected"
            if self.server.source.startswith("neon://")
            else "the source is not running"
        )
        since = "no frame yet" if pipeline.latest_at_s is None else "no frame"
        error = f"; last error: {pipeline.last_error}" if pipeline.last_error else ""
        return (
            f"{what} ({self.server.source}: {pipeline.state}, {since} for {age_s:.0f} s{error}); "
            "ask again once it is back"
        )

    async def _wait_turn(self) -> None:
        """Take the generation lock, or raise QueueFullError (see the module docstring)."""
        wait_s, lock = self.server.ask_queue_wait_s, self._generation_lock
        if not lock.locked() and not self._waiting:
            # Nothing under way and nobody in line: start now. acquire() takes a free lock
            # without suspending, so an ask arriving next finds this one under way, not waiting
            # (through wait_for it would sit in the line for a few loop turns, and a burst of asks
            # at an idle service found the line full and was refused but for the first).
            await lock.acquire()
            return
        ahead = len(self._waiting) + lock.locked()
        if len(self._waiting) >= self.server.ask_queue_max:
            raise QueueFullError(ahead, f"at most {self.server.ask_queue_max} asks wait")
        if ahead and self._answer_s:
            estimate_s = ahead * statistics.median(self._answer_s)
            if estimate_s > wait_s:
                raise QueueFullError(ahead, f"about {estimate_s:.1f} s to wait, over {wait_s:g} s")
        me = object()
        self._waiting.append(me)
        try:
            await asyncio.wait_for(lock.acquire(), wait_s)
        except asyncio.TimeoutError:  # TimeoutError itself only from Python 3.11 on
            ahead = self._waiting.index(me) + lock.locked()
            raise QueueFullError(ahead, f"not started within {wait_s:g} s") from None
        finally:
            self._waiting.remove(me)

    async def ask(
        self,
        question: str,
        started: Callable[[float], object] | None = None,
        conversation: Conversation | None = None,
    ) -> AsyncGenerator[str | Answer, None]:
        """The answer's pieces as the generation thread makes them, then the Answer; a
        follow-up resolves against the ``conversation`` (the asking socket's).

        Waits its turn behind other clients' answers, or raises QueueFullError; ``started`` is told
        the seconds waited when the answer starts. Refused as ``not_ready`` while the source is
        down. Closing the iterator early (the client left) stops the generation at its next
        token.
        """
        down = self._source_down()
        if down is not None:
            raise ClientError("not_ready", down)
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[object] = asyncio.Queue()  # at most answer_max_tokens + 2 items
        stop = threading.Event()

        def generate(assistant: Assistant) -> None:
            def put(item: object) -> None:
                loop.call_soon_threadsafe(pieces.put_nowait, item)

            try:
                # Leaving the loop early drops the answer's generator, which closes it.
                for item in assistant.ask(question, conversation=conversation, stop=stop):
                    if stop.is_set():
                        break
                    put(item)
            except BaseException as exc:  # raised again in the asking coroutine
                put(exc)
            else:
                put(_END)

        queued = time.monotonic()
        await self._wait_turn()
        began = time.monotonic()
        # A local engine's answer needs the cores perception would take; a remote one does not.
        self.pipeline.answering(self.engines.model.info.engine != "remote")
        try:
            if started is not None:
                started(began - queued)
            done = loop.run_in_executor(self._generation, generate, self.assistant)
            try:
                while (item := await pieces.get()) is not _END:
                    if isinstance(item, BaseException):
                        raise item
                    assert isinstance(item, str | Answer)
                    yield item
            finally:
                stop.set()
                # The next answer must not start while this thread still runs.
                await asyncio.shield(done)
        finally:
            self.pipeline.answering(False)
            self._answer_s.append(time.monotonic() - began)
            self._generation_lock.release()

    def step(self) -> StepEstimate:
        """The step the tracker thinks is under way."""
        return self.assistant.tracker.current()

    def live_state(self) -> dict[str, Any]:
        """What ``/v1/live`` pushes: gaze, fixation, step, latest crop, source state."""
        latest = self.pipeline.latest
        gaze = None
        if latest is not None and latest.gaze_x_px is not None and latest.gaze_y_px is not None:
            gaze = [round(latest.gaze_x_px, 1), round(latest.gaze_y_px, 1)]
        return {
            "type": "state",
            "frame_timestamp_ns": latest.frame.timestamp_ns if latest is not None else None,
            "gaze": gaze,
            "gaze_status": latest.status if latest is not None else None,
            "fixation": latest.fixation_id if latest is not None else None,
            "step": asdict(self.step()),
            "crop": crop_json(self.pipeline.latest_crop),
            "source": self.pipeline.state,
        }

    def status(self) -> dict[str, Any]:
        """What ``/v1/status`` answers."""
        pipeline, info = self.pipeline, self.pipeline.info
        return {
            "source": {
                "address": self.server.source,
                "kind": info.kind if info is not None else None,
                "state": pipeline.state,
                "last_error": pipeline.last_error,
                **self._source_live(),
            },
            "model": {
                **self.engines.model.info.to_json(),
                "language_model": self.engines.model.config.get("source"),
                "regions_in_memory": len(self.assistant.memory),
                "warning": self.engines.warning,
            },
            "task": {
                "name": self.assistant.card.name,
                "steps": len(self.assistant.card.steps),
                "photos": sum(map(len, self.assistant.card.photos)),
                "warning": self.assistant.warning,
            },
            "step": asdict(self.step()),
            # Each vision model's session: the tier it really runs on, why better ones were not.
            "vision_providers": {name: c.to_json() for name, c in provider_choices().items()},
            "frames": asdict(pipeline.stats),
            "uptime_s": round(time.monotonic() - self.started, 3),
        }

    def _source_live(self) -> dict[str, Any]:
        """The running source's own view: how old the latest frame is, and for live glasses
        the clock offset, the drops and the reconnects."""
        pipeline, stats = self.pipeline, self.pipeline.source_stats
        latest_at_s = pipeline.latest_at_s
        view: dict[str, Any] = {
            "latest_frame_age_s": None
            if latest_at_s is None
            else round(time.monotonic() - latest_at_s, 3),
            "clock": None,
            "live": None,
        }
        if stats is None:
            return view
        if stats.clock is not None:
            view["clock"] = {
                "offset_ms": round(stats.clock.offset_ns / 1e6, 3),
                "spread_ms": round(stats.clock.spread_ns / 1e6, 3),
                "samples": stats.clock.samples,
                "estimates": stats.clock_estimates,
            }
        view["live"] = {
            "frames_in": stats.frames_in,
            "frames_dropped": stats.frames_dropped,
            "frames_stale": stats.frames_stale,
            "gaze_in": stats.gaze_in,
            "gaze_dropped": stats.gaze_dropped,
            "reconnects": stats.reconnects,
        }
        return view

    async def crop_jpeg(self) -> tuple[Crop, bytes]:
        """The latest keyframe crop as JPEG (encoded once per crop)."""
        crop = self.pipeline.latest_crop
        if crop is None:
            raise ClientError("not_ready", "no crop yet: the first keyframe has not come")
        if self._jpeg is None or self._jpeg[0] is not crop:
            ok, buffer = await asyncio.to_thread(
                cv2.imencode, ".jpg", crop.pixels, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY]
            )
            if not ok:
                raise ClientError("internal", "the crop could not be encoded as JPEG")
            self._jpeg = (crop, buffer.tobytes())
        return self._jpeg
