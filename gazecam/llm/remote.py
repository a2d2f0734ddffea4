"""RemoteModel: answers from an OpenAI-compatible server (vLLM, llama.cpp's server, Ollama, ...).

The box keeps capture, perception, step tracking and the visual memory; only the answer comes
from the server. Each ask sends one chat-completions request with what the local text engine
would have had in its KV cache, as text: the system message is the context (the assistant's
role and the task card) followed by the region lines in memory; the user message is the
question with the current step's line, and (``GAZECAM_REMOTE_IMAGES``) the latest gaze crop
and whole-frame thumbnail as base64 JPEG ``image_url`` parts, the message format vLLM takes
for multimodal models. Each RemoteModel keeps its own copy of that state, so that one
wearer's session never reaches another's request.

The reply is streamed (the official ``openai`` SDK: SSE parsing, timeouts, retries with
backoff and Retry-After). A worker thread reads the stream into a bounded queue, so that the
first-token budget (``GAZECAM_REMOTE_BUDGET_MS``) holds however the server stalls. When the
server is down, slow, refuses the request (429, 5xx, an unknown model) or sends something
that is not a chat-completions stream, the local text engine answers instead (it has been
kept up to date with every keyframe), continuing whatever the server had already said, and
the answer's ``engine.fallback`` says why; with ``GAZECAM_REMOTE_FALLBACK=false`` the ask
fails with a RemoteError. A circuit breaker stops asking a failing server for a while.
"""

from __future__ import annotations

import base64
import logging
import queue
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import cv2

from gazecam.assist.memory import MemoryRegion, MemorySettings
from gazecam.errors import GazecamError, MissingDependencyError
from gazecam.llm.decoder import LanguageModel
from gazecam.llm.records import EngineInfo, GenerationStats
from gazecam.llm.settings import LLMSettings
from gazecam.llm.tokenizer import Prompt
from gazecam.records import BGRImage, Crop

if TYPE_CHECKING:
    from openai import OpenAI
    from openai.types.chat import ChatCompletionChunk

logger = logging.getLogger(__name__)
# The whole-frame thumbnail sent beside the crop: as wide as vLLM's SmolVLM and Qwen2.5-VL
# processors tile an image anyway.
THUMBNAIL_PX = 448
JPEG_QUALITY = 85
QUEUE_ITEMS = 256  # chunks read ahead of the consumer (a few answers' worth)


class RemoteError(GazecamError):
    """The remote engine could not answer: a one-line reason that names the server."""


class RemoteStatusError(RemoteError):
    """The server answered the request with an HTTP error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class TooSlowError(RemoteError):
    """No first token within the budget, or no next token within the timeout."""


@dataclass(frozen=True, slots=True)
class _End:
    """The stream ended; ``finished``: with a finish_reason (not cut off mid-answer)."""

    finished: bool
    prompt_tokens: int | None
    token_times: list[float] = field(default_factory=list)  # perf_counter() of each piece


class CircuitBreaker:
    """Closed: requests go through. After ``failures`` failures in a row it opens: requests
    are refused for ``reset_s``; then one trial goes through (half-open), and its outcome
    closes or reopens it. A few lines, so no dependency for it."""

    def __init__(self, failures: int, reset_s: float) -> None:
        self.failures, self.reset_s = failures, reset_s
        self.failed = 0
        self.opened_at: float | None = None
        self._lock = threading.Lock()

    def check(self) -> None:
        """Raise RemoteError while open; let a trial through once ``reset_s`` have passed."""
        with self._lock:
            if self.opened_at is None:
                return
            wait_s = self.opened_at + self.reset_s - time.monotonic()
            if wait_s > 0:
                raise RemoteError(
                    f"circuit open after {self.failed} failures in a row, next try in "
                    f"{wait_s:.0f} s"
                )
            self.opened_at = time.monotonic()  # half-open: this trial; others wait again

    def record(self, ok: bool) -> None:
        """The outcome of a request that went through."""
        with self._lock:
            self.failed = 0 if ok else self.failed + 1
            if ok:
                self.opened_at = None
            elif self.failed >= self.failures:
                self.opened_at = time.monotonic()


def data_url(image: BGRImage) -> str:
    """An image as a base64 JPEG data URL (an ``image_url`` the OpenAI API takes inline)."""
    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RemoteError(f"cannot encode a {image.shape} image as JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(jpeg.tobytes()).decode("ascii")


class RemoteModel:
    """The decoder role (``gazecam.assist.assistant.Model``), answered by an OpenAI-compatible
    server.

    ``settings``: the remote engine's (``GAZECAM_REMOTE_*``); unset: ``local``'s.
    ``local``: the text engine, for counting tokens (the prompt's bounds are the local
    model's) and, with ``GAZECAM_REMOTE_FALLBACK``, for answering when the server does not.
    Without fallback ``local`` is only read, so one can serve many RemoteModels.
    """

    def __init__(
        self,
        local: LanguageModel,
        settings: LLMSettings | None = None,
        fallback: bool | None = None,
    ) -> None:
        try:
            from openai import OpenAI
        except ImportError as exc:
            raise MissingDependencyError("openai", "remote", "the remote engine") from exc
        s = settings or local.settings
        assert s.remote_url is not None  # LLMSettings refuses the remote engine without it
        self.settings, self.local = s, local
        self.fallback = s.remote_fallback if fallback is None else fallback
        self.url = str(s.remote_url).rstrip("/")
        self.max_positions, self.chat, self.config = local.max_positions, local.chat, local.config
        self.thumbnail_px = 0 if s.remote_images == "off" else THUMBNAIL_PX
        self.last_encode_ms = 0.0
        self.client: OpenAI = OpenAI(
            base_url=self.url,
            # The SDK wants a key; servers without one ignore it. Never logged: the SDK
            # redacts the Authorization header in its debug logs.
            api_key=s.remote_api_key.get_secret_value() if s.remote_api_key else "none",
            timeout=s.remote_timeout_s,
            max_retries=s.remote_retries,
        )
        self.breaker = CircuitBreaker(s.remote_breaker_failures, s.remote_breaker_reset_s)
        self.model_name = s.remote_model
        self.info = EngineInfo("remote", self.model_name or self.url, False)
        self.images = s.remote_images != "off"
        self._images_confirmed = s.remote_images == "on"
        # What this session's requests are made of: its own copy, never shared.
        self._context = ""
        self._regions: dict[str, str] = {}  # region id -> its line, oldest first
        self._crop: Crop | None = None
        self.last_body: dict[str, Any] | None = None  # the latest request's (for the bench)

    def memory_tokens(self, memory: MemorySettings) -> tuple[int, str]:
        """As the local model's: the prompt is bounded as if it answered."""
        return self.local.memory_tokens(memory)

    def count_tokens(self, text: str | Prompt) -> int:
        """Tokens in the local model's tokenizer (the server's may differ a little)."""
        return self.local.count_tokens(text)

    def set_context(self, text: str) -> None:
        """Keep the context for the requests (and the fallback's KV)."""
        self._context = text
        if self.fallback:
            self.local.set_context(text)

    def observe(self, crop: Crop, added: Sequence[MemoryRegion], dropped: Sequence[str]) -> None:
        """Keep the region lines in memory and the latest crop (and the fallback's KV)."""
        for region_id in dropped:
            self._regions.pop(region_id, None)
        self._regions.update((e.region_id, e.text.strip()) for e in added)
        self._crop = crop
        if self.fallback:
            self.local.observe(crop, added, dropped)

    def clear_memory(self) -> None:
        """Forget the regions and the crop (the context stays)."""
        self._regions.clear()
        self._crop = None
        if self.fallback:
            self.local.clear_memory()

    def messages(self, question: str, answer_prefix: str, images: bool) -> list[dict[str, Any]]:
        """The request's messages: context and regions, then the question (and images)."""
        system = "\n".join([self._context, *self._regions.values()])
        text = question
        if answer_prefix:
            text += f"\nYour answer begins: {answer_prefix.strip()}\nContinue it."
        crop = self._crop
        if not images or crop is None:  # a plain string: some chat templates take no parts
            return [{"role": "system", "content": system}, {"role": "user", "content": text}]
        pictures = [crop.pixels, *([] if crop.thumbnail is None else [crop.thumbnail])]
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]
        content += [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in pictures]
        return [{"role": "system", "content": system}, {"role": "user", "content": content}]

    def generate(
        self, question: str, *, answer_prefix: str = "", top_k_regions: Any = None,
        max_tokens: int | None = None, stop: tuple[str, ...] = (),
    ) -> Iterator[str | GenerationStats]:  # fmt: skip
        """Answer from the server: text pieces, then one GenerationStats; on failure the
        local text engine continues (or, without fallback, RemoteError). ``top_k_regions``
        is the local engine's (the server gets every region in memory)."""
        started = time.perf_counter()
        deadline = started + self.settings.remote_budget_ms / 1e3
        said: list[str] = []
        try:
            self.breaker.check()
            try:
                stats = yield from self._remote(
                    question, answer_prefix, max_tokens, stop, deadline, said
                )
            except RemoteError:
                self.breaker.record(False)
                raise
        except RemoteError as exc:
            reason = f"remote: {self.url}: {exc}"
            if not self.fallback:
                raise RemoteError(f"the remote engine at {self.url}: {exc}") from exc
            logger.warning("%s; the local text engine answers", reason)
            self.info = replace(self.local.info, fallback=reason)
            yield from self._local(question, answer_prefix + "".join(said), max_tokens, stop,
                                   started, bool(said))  # fmt: skip
            return
        self.breaker.record(True)
        self.info = EngineInfo("remote", self.model_name or self.url, False)
        yield stats

    def _local(
        self, question: str, prefix: str, max_tokens: int | None, stop: tuple[str, ...],
        started: float, continued: bool,
    ) -> Iterator[str | GenerationStats]:  # fmt: skip
        """The local engine's answer, continuing ``prefix``; TTFT counted from the ask."""
        offset_ms = (time.perf_counter() - started) * 1e3
        for item in self.local.generate(
            question, answer_prefix=prefix, max_tokens=max_tokens, stop=stop
        ):
            if isinstance(item, GenerationStats) and not continued:
                item = replace(item, ttft_ms=item.ttft_ms + offset_ms)
            yield item

    def served_model(self) -> str:
        """The model to ask for: the setting, or the first the server lists (asked once)."""
        if self.model_name is None:
            import openai

            try:
                listed = [m.id for m in self.client.models.list()]
            except openai.APIError as exc:
                raise _error(exc) from exc
            if not listed:
                raise RemoteError("the server lists no model (GAZECAM_REMOTE_MODEL)")
            self.model_name = listed[0]
        return self.model_name

    def _remote(
        self, question: str, prefix: str, max_tokens: int | None, stop: tuple[str, ...],
        deadline: float, said: list[str],
    ) -> Generator[str, None, GenerationStats]:  # fmt: skip
        """Stream the server's answer into ``said`` (and out); return its GenerationStats.
        The first token must come before ``deadline`` (``time.perf_counter()``)."""
        s = self.settings
        started = time.perf_counter()
        images = self.images and self._crop is not None
        body = {
            "model": self.served_model(),
            "messages": self.messages(question, prefix, images),
            "max_tokens": max_tokens or s.llm_max_tokens,
            "temperature": s.llm_temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
            **({"stop": list(stop)} if stop else {}),
        }
        # Until a server has taken images, a request with them that fails before its first
        # token (refused, or an empty stream: llama.cpp's server with a text-only chat
        # template) is not retried with them: auto sends text only from then on.
        probe = images and not self._images_confirmed and s.remote_images == "auto"
        try:
            end = yield from self._stream(body, prefix, deadline, said, probe)
        except RemoteError as exc:
            if not probe or said or isinstance(exc, TooSlowError):
                raise
            logger.warning("%s: a request with images failed (%s); text only", self.url, exc)
            self.images = False
            body["messages"] = self.messages(question, prefix, images=False)
            end = yield from self._stream(body, prefix, deadline, said, False)
        self._images_confirmed = self._images_confirmed or images
        prompt_tokens = end.prompt_tokens
        if prompt_tokens is None:  # a server that does not report usage: the question's
            prompt_tokens = self.count_tokens(question)
        times = end.token_times
        return GenerationStats(
            prompt_tokens, len(times), (times[0] - started) * 1e3,
            (times[-1] - times[0]) * 1e3 / (len(times) - 1) if len(times) > 1 else 0.0,
            [0], 0, stop_reason="stop" if stop else "eos",
        )  # fmt: skip

    def _stream(
        self, body: dict[str, Any], prefix: str, deadline: float, said: list[str], probe: bool
    ) -> Generator[str, None, _End]:
        """Send ``body``; yield the reply's text pieces (kept in ``said``); return its _End."""
        s = self.settings
        self.last_body = body
        items: queue.Queue[ChatCompletionChunk | _End | RemoteError] = queue.Queue(QUEUE_ITEMS)
        cancel = threading.Event()
        worker = threading.Thread(
            target=self._read, args=(body, items, cancel, probe), daemon=True,
            name="gazecam-remote",
        )  # fmt: skip
        worker.start()
        times: list[float] = []
        try:
            while True:
                wait_s = deadline - time.perf_counter() if not times else s.remote_timeout_s
                try:
                    item = items.get(timeout=max(wait_s, 0.0))
                except queue.Empty:
                    if times:
                        raise TooSlowError(f"no token for {s.remote_timeout_s:g} s") from None
                    budget = f"{s.remote_budget_ms:g} ms (GAZECAM_REMOTE_BUDGET_MS)"
                    raise TooSlowError(f"no first token within {budget}") from None
                if isinstance(item, RemoteError):
                    raise item
                if isinstance(item, _End):
                    break
                piece = _content(item)
                if piece:
                    if not said and prefix and not piece[0].isspace():
                        piece = " " + piece  # the lead sentence and the answer are two words
                    times.append(time.perf_counter())
                    said.append(piece)
                    yield piece
        finally:
            cancel.set()
        if not item.finished or not times:
            raise RemoteError(
                "the stream stopped mid-answer (no finish_reason)"
                if times
                else "the reply is not a chat-completions stream (no text)"
            )
        return replace(item, token_times=times)

    def _read(
        self,
        body: dict[str, Any],
        items: queue.Queue[ChatCompletionChunk | _End | RemoteError],
        cancel: threading.Event,
        probe: bool,
    ) -> None:
        """The worker: the stream's chunks into ``items``, then an _End or a RemoteError."""
        import openai

        def put(item: ChatCompletionChunk | _End | RemoteError) -> bool:
            while not cancel.is_set():
                try:
                    items.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        client = self.client.with_options(max_retries=0) if probe else self.client
        finished, prompt_tokens = False, None
        try:
            with client.chat.completions.create(**body) as stream:
                for chunk in stream:
                    if cancel.is_set() or not put(chunk):
                        return
                    finished = finished or any(c.finish_reason for c in chunk.choices or ())
                    if chunk.usage is not None:
                        prompt_tokens = chunk.usage.prompt_tokens
        except openai.APIError as exc:
            put(_error(exc))
            return
        except (ValueError, AttributeError, TypeError) as exc:  # JSON, or not the chunk's shape
            put(RemoteError(f"a malformed stream ({type(exc).__name__}: {exc})"))
            return
        put(_End(finished, prompt_tokens))


def _content(chunk: ChatCompletionChunk) -> str:
    """A chunk's text; RemoteError for a chunk that is not a chat-completions chunk."""
    try:
        return "".join(c.delta.content or "" for c in chunk.choices or ())
    except (AttributeError, TypeError) as exc:
        raise RemoteError(f"a malformed stream chunk ({exc})") from exc


def _error(exc: Exception) -> RemoteError:
    """One line for an SDK error: what the server said, or why it could not be reached."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        # The server's own message ({"error": {"message": ...}}), else the SDK's summary.
        body = exc.body.get("error", exc.body) if isinstance(exc.body, dict) else None
        said = body.get("message") if isinstance(body, dict) else None
        lines = str(said or exc.message or exc).strip().splitlines() or [type(exc).__name__]
        return RemoteStatusError(exc.status_code, lines[0][:200])
    if isinstance(exc, openai.APITimeoutError):
        return RemoteError("timed out")
    if isinstance(exc, openai.APIConnectionError):
        return RemoteError(f"cannot connect ({exc.__cause__ or exc})")
    return RemoteError(f"{type(exc).__name__}: {exc}")
