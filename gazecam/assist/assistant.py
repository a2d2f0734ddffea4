"""The assistant: keyframe crops in (perception, step tracking, visual memory), answers out.

At each keyframe (a fixation onset) perception reads the crop; the regions it finds update the
step tracker and the visual memory, and each new region is prefilled into the language model
as its own KV group, all before anyone asks. An ask then only prefills the question and
decodes, attending to the context, the top-k regions and its own tokens.

Every fact in an answer comes from the card, the tracker, perception or the memory, never from
the model's imagination: ``gazecam.assist.answers`` routes the question and states its facts in
a fixed sentence, streamed at once; the model continues it, and its continuation is kept only
where it says nothing the sentence does not (see ``gazecam.assist.answers``).

Every piece of text the model gets has a bound in tokens, so that the context, a full memory
and an ask always fit the model's positions: the task card takes at most
``context_max_tokens`` (see ``gazecam.assist.context``), each region line at most
``REGION_MAX_TOKENS``, and the current step's line in the ask prompt and the fact sentence the
model continues at most ``STEP_PROMPT_MAX_TOKENS`` each (a longer sentence stands alone); the
question, that line, the sentence and the answer share the model's ``LOCAL_RESERVE``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from numpy.typing import NDArray
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from gazecam.assist import answers
from gazecam.assist.context import context_text, cut, longest_fit
from gazecam.assist.memory import MemoryRegion, MemorySettings, VisualMemory
from gazecam.assist.steps import StepEstimate, StepSettings, StepTracker
from gazecam.assist.tasks import TaskCard, load_task_card
from gazecam.errors import ConfigError, GazecamError
from gazecam.llm.decoder import LOCAL_RESERVE, REGION_MAX_TOKENS, LanguageModel
from gazecam.llm.records import EngineInfo, GenerationStats
from gazecam.llm.settings import LLMSettings
from gazecam.llm.tokenizer import ChatFormat, Prompt
from gazecam.models import ModelError, ModelSettings, fetch
from gazecam.perception import Perception
from gazecam.records import Crop, Region, SourceEvent

if TYPE_CHECKING:
    from gazecam.llm.remote import RemoteModel

ASSISTANT_MODELS = (
    "ppocr-det",
    "ppocr-rec",
    "yolox-nano",
    "efficientnet-lite0",
    "smollm2-135m-gguf",
)
logger = logging.getLogger(__name__)
BUNDLED_TASKS = {"demo": Path(__file__).parents[1] / "data" / "demo_task.yaml"}
# The current step's "title. instruction" in the ask prompt: a sentence or two.
STEP_PROMPT_MAX_TOKENS = 128
# The least context budget that holds any card: MAX_STEPS step lines cut to their first
# character take about 7 tokens each, the role and the headings about 40.
MIN_CONTEXT_TOKENS = 384


@dataclass(frozen=True, slots=True)
class Engines:
    """The loaded models, which outlive an assistant (a new task card, or each mode of
    ``gazecam bench``, reuses them)."""

    perception: Perception
    # The text engine, VisionLanguageModel (a subclass), or RemoteModel (its fallback: text).
    model: LanguageModel | RemoteModel
    warning: str | None = None  # why the vlm engine is not the one answering, where it is not


def load_task(task: str) -> TaskCard:
    """A task card: a YAML file, or a bundled card's name ('demo')."""
    return load_task_card(BUNDLED_TASKS.get(task, task))


def load_engines(
    llm: LLMSettings | None = None, models: ModelSettings | None = None, fallback: bool = False
) -> Engines:
    """Fetch the assistant's model files where missing (once, checksummed) and load them.

    The answer engine is ``llm.engine``'s; unset, vlm when a SmolVLM checkpoint is installed,
    else text. Where the vlm engine cannot load (no checkpoint, a broken one, no ONNX
    conversion and no build extra to make it), the text engine answers instead, with the
    reason in ``Engines.warning``, if ``fallback`` (the service) or if vlm was not asked for
    by name; otherwise the error is raised.
    """
    from gazecam.perception import PerceptionSettings, create_perception

    llm, models = llm or LLMSettings(), models or ModelSettings()
    for name in ASSISTANT_MODELS:
        fetch(name, models)
    perception = create_perception(PerceptionSettings(), models)
    if llm.engine == "text":
        return Engines(perception, LanguageModel(llm, models))
    if llm.engine == "remote":
        from gazecam.llm.remote import RemoteModel

        return Engines(perception, RemoteModel(LanguageModel(llm, models)))
    try:
        from gazecam.vlm.engine import VisionLanguageModel
        from gazecam.vlm.install import vlm_checkpoint

        checkpoint = vlm_checkpoint(models)
        if checkpoint is None:
            if llm.engine is None:
                return Engines(perception, LanguageModel(llm, models))
            raise ModelError(
                "engine vlm: no SmolVLM checkpoint is installed (gazecam models fetch "
                "smolvlm-256m, gazecam models import smolvlm-256m DIR, or --vlm DIR)"
            )
        return Engines(perception, VisionLanguageModel(checkpoint, llm=llm, models=models))
    except GazecamError as exc:
        if llm.engine == "vlm" and not fallback:
            raise
        warning = f"the vlm engine could not load, the text engine answers: {exc}"
        logger.warning("%s", warning)
        return Engines(perception, LanguageModel(llm, models), warning)


class QuestionError(GazecamError):
    """A question the assistant cannot take (empty, or too long)."""


class AssistantSettings(BaseSettings):
    """How questions are taken and answered."""

    model_config = SettingsConfigDict(env_prefix="GAZECAM_", extra="ignore")

    max_question_chars: int = Field(
        500, ge=1, description="Longer questions are refused with a clear error."
    )
    answer_max_tokens: int = Field(
        40, ge=1, le=512, description="At most this many tokens of model text per answer."
    )
    context_max_tokens: int = Field(
        512,
        ge=MIN_CONTEXT_TOKENS,
        description="The task card's share of the language model's context, in tokens: a card "
        "that fits is given verbatim, a longer one with each step's 'title: instruction' cut "
        "to the same length, the longest that fits. The context is prefilled once per card "
        "and attended at every answer token, so its length sets the card's load time, the "
        "prefill's peak memory (512 tokens: about 130 MB; a 7,400-token card took 1.7 GB) and "
        "the time per answer token. This, GAZECAM_MEMORY_MAX_REGIONS × "
        f"{REGION_MAX_TOKENS} and {LOCAL_RESERVE} for the ask must fit the model's positions "
        "(8192 for SmolLM2).",
    )


class Model(Protocol):
    """The decoder role: the context, what keyframes showed as KV groups, and streamed
    generation. Backends: ``LanguageModel`` (text regions) and ``VisionLanguageModel``."""

    max_positions: int
    chat: ChatFormat
    info: EngineInfo

    def memory_tokens(self, memory: MemorySettings) -> tuple[int, str]: ...
    def count_tokens(self, text: str | Prompt) -> int: ...
    def set_context(self, text: str) -> None: ...
    def observe(
        self, crop: Crop, added: Sequence[MemoryRegion], dropped: Sequence[str]
    ) -> None: ...
    def clear_memory(self) -> None: ...
    def generate(
        self, question: str, *, answer_prefix: str = "", top_k_regions: int | None = ...,
        max_tokens: int | None = None, stop: tuple[str, ...] = (),
    ) -> Iterator[str | GenerationStats]: ...  # fmt: skip


@dataclass(frozen=True, slots=True)
class Timings:
    """What an answer cost, in milliseconds and tokens."""

    perception_ms: float  # the latest keyframe's perception (done before the ask)
    facts_ms: float  # ask to the fact sentence (routing and look-up: the answer's first piece)
    ttft_ms: float  # ask to the model's first token (0 where the model was not asked)
    tpot_ms: float  # per output token after the first
    e2e_ms: float  # ask to the whole answer
    prompt_tokens: int  # tokens prefilled at ask time
    completion_tokens: int  # tokens the model generated, kept or not (facts are not generated)
    attended_kv: float  # visual KV entries attended per decoding step (mean)
    visual_kv: int  # visual KV entries in memory


@dataclass(frozen=True, slots=True)
class Answer:
    """A finished answer: its text, the tracker's step, its costs, the crop it rests on, and
    the question's intent with where the answer's facts came from."""

    text: str
    step: StepEstimate
    timings: Timings
    crop: Crop | None
    engine: EngineInfo  # which engine and weights answered
    intent: answers.Intent
    sources: tuple[answers.Source, ...]

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``gazecam ask --json`` and the server's answer frame."""
        return {
            "text": self.text,
            "intent": self.intent,
            "sources": list(self.sources),
            "engine": self.engine.to_json(),
            "step": asdict(self.step),
            "timings": asdict(self.timings),
            "crop": crop_json(self.crop),
        }


def crop_json(crop: Crop | None) -> dict[str, Any] | None:
    """A crop as clients see it: frame time, gaze point and box in frame pixels."""
    if crop is None:
        return None
    m = crop.matched
    return {
        "timestamp_ns": m.frame.timestamp_ns,
        "gaze": [m.gaze_x_px, m.gaze_y_px],
        "box": crop.box.as_list(),
    }


def check_positions(
    settings: AssistantSettings, memory_tokens: tuple[int, str], positions: int
) -> None:
    """Refuse settings under which the context, a full memory (``Model.memory_tokens``: its
    positions and what sets them) and an ask could overflow the model's ``positions``."""
    needed = settings.context_max_tokens + memory_tokens[0] + LOCAL_RESERVE
    if needed > positions:
        raise ConfigError(
            f"GAZECAM_CONTEXT_MAX_TOKENS ({settings.context_max_tokens}) + {memory_tokens[1]} "
            f"+ {LOCAL_RESERVE} for the ask need {needed} positions; the language model "
            f"has {positions}"
        )


class Assistant:
    """Keeps the tracker, memory and model up to date with keyframes, and answers questions."""

    def __init__(
        self,
        card: TaskCard,
        perception: Perception,
        model: Model,
        settings: AssistantSettings | None = None,
        memory: MemorySettings | None = None,
        steps: StepSettings | None = None,
    ) -> None:
        self.card = card
        self.settings = settings or AssistantSettings()
        self.perception = perception
        self.model = model
        # The card's photos are embedded here, once, by perception's classifier.
        self.tracker = StepTracker(card, steps or StepSettings(), perception.classifier)
        photos = sum(map(len, card.photos))
        # Why the card's photos count for nothing, said once per card (and in /v1/status).
        self.warning: str | None = None
        if photos and not self.tracker.uses_photos:
            self.warning = (
                f"task card {card.name!r}: its {photos} photos are ignored: no image encoder "
                "(the classifier is disabled or its model is missing)"
            )
            logger.warning("%s", self.warning)
        self.memory = VisualMemory(memory)
        self.latest_crop: Crop | None = None
        self.latest_regions: list[Region] = []
        self.latest_feature: NDArray[np.float32] | None = None  # the crop's image feature
        self.perception_ms = 0.0
        check_positions(
            self.settings, model.memory_tokens(self.memory.settings), model.max_positions
        )
        budget = self.settings.context_max_tokens
        self.context = context_text(
            card, lambda text: model.count_tokens(model.chat.context(text)) <= budget
        )
        self.context_tokens = model.count_tokens(model.chat.context(self.context))
        # Each step's line for the ask prompt, cut once per card rather than at every ask.
        self._step_lines = [
            self._cut(f"{s.title}. {s.instruction}", STEP_PROMPT_MAX_TOKENS) for s in card.steps
        ]
        model.set_context(self.context)

    def _cut(self, text: str, max_tokens: int) -> str:
        """``text``, cut with an ellipsis to the most characters that take ``max_tokens``."""
        return longest_fit(
            partial(cut, text), len(text), lambda t: self.model.count_tokens(t) <= max_tokens
        )

    def observe_keyframe(self, crop: Crop) -> list[Region]:
        """Perceive a keyframe's crop and bring tracker, memory and model KV up to date.

        Runs in a worker thread in the service (it takes tens of milliseconds), so that an ask
        never waits for it.
        """
        started = time.perf_counter()
        percept = self.perception.perceive(crop)
        regions = list(percept.regions)
        self.perception_ms = (time.perf_counter() - started) * 1e3
        timestamp_ns = crop.matched.frame.timestamp_ns
        self.tracker.observe(regions, timestamp_ns, percept.feature)
        added, dropped = self.memory.add_keyframe(timestamp_ns, regions)
        lines = [replace(e, text=self._cut(e.text, REGION_MAX_TOKENS)) for e in added]
        self.model.observe(crop, lines, dropped)
        self.latest_crop, self.latest_regions = crop, regions
        self.latest_feature = percept.feature
        return regions

    def observe_event(self, event: SourceEvent) -> None:
        """Apply a step event (``step.next``, ``step.back``, ``step.set:N``); ignore others."""
        if event.name.startswith("step."):
            self.tracker.event(event.name, event.timestamp_ns)

    def situation(self) -> answers.Situation:
        """What an answer may draw on now: card, tracker, latest regions and memory."""
        crop = self.latest_crop
        return answers.Situation(
            self.card,
            self.tracker.current(),
            self.tracker.time_on_step_s(),
            self.latest_regions,
            self.memory.regions(),
            crop.matched.frame.timestamp_ns if crop is not None else None,
            self.memory.settings.memory_horizon_s,
        )

    def ask(
        self,
        question: str,
        *,
        dense: bool = False,
        conversation: answers.Conversation | None = None,
        stop: threading.Event | None = None,
    ) -> Iterator[str | Answer]:
        """Stream the answer's text pieces, then the finished Answer.

        The fact sentence comes first, at once; the model's continuation follows where it
        passes ``supported`` (``stop`` set, e.g. by a client that left, ends the model's turn
        at its next token). A follow-up resolves against the ``conversation``'s previous
        answer, and this answer becomes its previous one. Each decoding step attends the
        model's top-k regions (its settings), or with ``dense`` every region in memory: the
        baseline that ``gazecam bench`` measures sparsity against.
        """
        question = " ".join(question.split())
        if not question:
            raise QuestionError("question: empty")
        if len(question) > self.settings.max_question_chars:
            raise QuestionError(
                f"question: {len(question)} characters, at most "
                f"{self.settings.max_question_chars} are taken"
            )
        started = time.perf_counter()
        now = self.situation()
        previous = conversation.previous(self.card) if conversation is not None else None
        routed = answers.answer(answers.route(question), now, previous)
        facts_ms = (time.perf_counter() - started) * 1e3
        yield routed.sentence
        if conversation is not None:
            conversation.remember(self.card, routed)
        continuation, stats = "", None
        if routed.phrase and self.model.count_tokens(routed.sentence) <= STEP_PROMPT_MAX_TOKENS:
            continuation, stats = self._phrase(question, now.step, routed, dense, stop)
            if continuation:
                yield continuation
        timings = Timings(
            perception_ms=round(self.perception_ms, 2),
            facts_ms=round(facts_ms, 3),
            ttft_ms=round(stats.ttft_ms, 2) if stats else 0.0,
            tpot_ms=round(stats.tpot_ms, 2) if stats else 0.0,
            e2e_ms=round((time.perf_counter() - started) * 1e3, 2),
            prompt_tokens=stats.prompt_tokens if stats else 0,
            completion_tokens=stats.generated_tokens if stats else 0,
            attended_kv=_mean_decode_kv(stats),
            visual_kv=stats.visual_kv_total if stats else 0,
        )
        text = (routed.sentence + continuation).strip()
        yield Answer(
            text, now.step, timings, self.latest_crop, self.model.info, routed.intent,
            routed.sources,
        )  # fmt: skip

    def _phrase(
        self,
        question: str,
        step: StepEstimate,
        routed: answers.RoutedAnswer,
        dense: bool,
        stop: threading.Event | None,
    ) -> tuple[str, GenerationStats | None]:
        """The model's continuation of the fact sentence, or "" where it is not ``supported``
        (it is held back until whole, since a fact in its last words drops all of it); no
        stats where ``stop`` ended it."""
        prompt = (
            f"{question}\n(The person is on step {step.index}: {self._step_lines[step.index - 1]})"
        )
        # Unset, top_k_regions means the model's own setting; None attends every region.
        generate = (
            partial(self.model.generate, top_k_regions=None) if dense else self.model.generate
        )
        generated: list[str] = []
        stats: GenerationStats | None = None
        for item in generate(
            prompt,
            answer_prefix=routed.sentence,
            max_tokens=self.settings.answer_max_tokens,
            stop=("\n",),
        ):
            if stop is not None and stop.is_set():
                return "", None  # leaving the loop closes the generation
            if isinstance(item, GenerationStats):
                stats = item
            else:
                generated.append(item)
        assert stats is not None  # generate always ends with its stats
        continuation = "".join(generated)
        return (continuation if answers.supported(continuation, routed) else ""), stats


def _mean_decode_kv(stats: GenerationStats | None) -> float:
    """Visual KV entries attended per decoding step (the prefill's where none came after)."""
    if stats is None:
        return 0.0
    decode_steps = stats.attended_visual_kv[1:] or stats.attended_visual_kv
    return round(sum(decode_steps) / len(decode_steps), 1)
