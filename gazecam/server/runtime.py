"""The service's state: the assistant, the capture pipeline feeding it, and asks against it.

Threads and what they share: the perception worker runs ``observe_keyframe`` and client
events run ``observe_event``, each under the tracker lock, so a step event can never be lost
to a keyframe update running at the same time. Answers are generated in one generation
thread, one at a time across all clients (the CPU can run one at a time): an asyncio lock
queues asks fairly, and each answer's pieces reach the event loop as they come. Reading the
current step needs no lock (the tracker replaces its belief in one assignment).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import cv2

from gazecam.assistant import Answer, Assistant, AssistantSettings, Engines, crop_json
from gazecam.records import Crop, SourceEvent
from gazecam.server.errors import ClientError
from gazecam.server.pipeline import Pipeline, PipelineStats
from gazecam.server.settings import ServerSettings
from gazecam.settings import CaptureSettings, SourceSettings
from gazecam.sources import check_address, open_source
from gazecam.sources.base import Source
from gazecam.sources.looped import LoopedSource
from gazecam.steps import StepEstimate
from gazecam.tasks import TaskCard

_JPEG_QUALITY = 85
_END = object()  # the generation thread's last item


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
        self.server = server
        self.engines = engines
        self.assistant = Assistant(card, engines.perception, engines.model, assistant)
        self._tracker_lock = threading.Lock()
        self._generation_lock = asyncio.Lock()
        self._generation = ThreadPoolExecutor(1, thread_name_prefix="gazecam-generate")
        self.pipeline = Pipeline(
            make_source,
            capture,
            server,
            self._observe_keyframe,
            self._observe_source_event,
            stats,
        )
        self.started = time.monotonic()
        self._jpeg: tuple[Crop, bytes] | None = None

    def start(self) -> None:
        """Start capture and perception in the background."""
        self.pipeline.start()

    async def stop(self) -> None:
        """Stop capture, wait for work under way, and take this assistant's regions out of
        the model (the model outlives it)."""
        await self.pipeline.stop()
        await asyncio.to_thread(self._generation.shutdown, True)
        for entry in self.assistant.memory.regions():
            self.engines.model.drop_region(entry.region_id)

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

    async def ask(self, question: str) -> AsyncGenerator[str | Answer, None]:
        """The answer's pieces as the generation thread makes them, then the Answer.

        Waits its turn behind other clients' answers. Closing the iterator early (the client
        left) stops the generation at its next token.
        """
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[object] = asyncio.Queue()  # at most answer_max_tokens + 2 items
        stop = threading.Event()

        def generate(assistant: Assistant) -> None:
            def put(item: object) -> None:
                loop.call_soon_threadsafe(pieces.put_nowait, item)

            try:
                # Leaving the loop early drops the answer's generator, which closes it.
                for item in assistant.ask(question):
                    if stop.is_set():
                        break
                    put(item)
            except BaseException as exc:  # raised again in the asking coroutine
                put(exc)
            else:
                put(_END)

        async with self._generation_lock:
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
            },
            "model": {
                "language_model": self.engines.model.config.get("source"),
                "regions_in_memory": len(self.assistant.memory),
            },
            "task": {"name": self.assistant.card.name, "steps": len(self.assistant.card.steps)},
            "step": asdict(self.step()),
            "frames": asdict(pipeline.stats),
            "uptime_s": round(time.monotonic() - self.started, 3),
        }

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
