"""The answer-quality suite: question wordings per intent, the facts each answer must state,
and the accuracy per intent.

``python -m tests.assist.answer_quality [text|vlm]`` replays the 60 s synthetic demo and prints the
accuracy per intent at three moments (mid-step 2, 4 and 6); the vlm engine is the tiny
random-weight SmolVLM (needs the vlm-build extra), whose fact answers must be the text
engine's.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gazecam.assist.answers import CANT_TELL, Conversation, Intent
from gazecam.assist.assistant import Answer, Assistant
from gazecam.capture.pipeline import CaptureResult, capture
from gazecam.records import SourceEvent
from gazecam.settings import CaptureSettings
from gazecam.sources import Source
from gazecam.sources.synthetic import DEMO_PANEL_OBJECTS, DEMO_PANELS

# {object} and {text} stand for the true step's panel object and label (the synthetic demo).
WORDINGS: dict[Intent, tuple[str, ...]] = {
    "current_step": (
        "What step am I on?", "which step is this?", "Where am I in the procedure?",
        "what am I doing right now?", "What's this step?",
    ),
    "next_step": (
        "What's next?", "what comes after this step?", "What should I do next?",
        "what is the upcoming step?", "Next step please",
    ),
    "previous_step": (
        "What was the previous step?", "what did I just finish?",
        "Which step came before this one?", "what was the step before?",
        "what was I doing before?",
    ),
    "instruction": (
        "What should I do now?", "what do I do?", "How do I do this?",
        "What are the instructions?", "What am I supposed to do?", "tell me what to do",
    ),
    "steps_left": (
        "How many steps are left?", "how many more steps?", "Am I almost done?",
        "how many steps to go?", "How many steps remain?", "how much longer?",
    ),
    "procedure": (
        "What is the whole procedure?", "List all the steps", "How many steps are there?",
        "what are the steps?",
    ),
    "step_confidence": ("How sure are you?", "how confident is the tracker about my step?"),
    "time_on_step": ("How long have I been on this step?", "how much time on this step so far?"),
    "looking_at": (
        "What am I looking at?", "what do you see?", "What is this?", "what's in front of me?",
    ),
    "read": (
        "What did I just read?", "what does it say?", "What does the label say?",
        "what is written here?",
    ),
    "seen": (
        "Did I see a {object} in the last 10 seconds?", "have I seen the {object}?",
        "Was a {object} seen in the last 30 s, and where?", "where did I see the {object}?",
        "where was the {text}?",
    ),
}  # fmt: skip
# Follow-ups after a first question: (first, follow-up, steps from the true step that the
# first answer is about, and from that step the follow-up's).
FOLLOW_UPS = (
    ("What's next?", "and after that?", 1, 1),
    ("What's next?", "And before that?", 1, -1),
    ("What was the previous step?", "and before that?", -1, -1),
    ("What step am I on?", "then what?", 0, 1),
    ("how many steps are left?", "what comes after that?", 0, 1),
)
# Nothing seen or on the card answers these.
CANT_TELL_QUESTIONS = (
    "Is the front cover open?", "is the cover removed?", "What colour is the sky?",
    "What time is it in Tokyo?", "Is the fuse dark?", "why is the fuse dark?",
    "Who made this control box?", "is it safe to touch?", "What's the weather like?",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Graded:
    """One answer and whether it states the expected facts."""

    intent: str  # the intent asked for, or "cant_tell" for CANT_TELL_QUESTIONS
    question: str
    text: str
    expected: tuple[str, ...]
    ok: bool
    sentence: str  # the answer's first piece: its facts
    answer: Answer


def ask(
    assistant: Assistant, question: str, conversation: Conversation | None = None
) -> tuple[str, Answer]:
    """The answer's first piece (its fact sentence) and the finished answer, whose text is
    checked to be its pieces joined."""
    items = list(assistant.ask(question, conversation=conversation or Conversation()))
    answer = items.pop()
    assert isinstance(answer, Answer) and "".join(map(str, items)).strip() == answer.text
    return str(items[0]), answer


def step_facts(assistant: Assistant, intent: Intent, k: int, since_s: float) -> tuple[str, ...]:
    """What an answer of ``intent`` must say when the wearer is on step ``k``; ``since_s``: the
    most seconds they can have been on it."""
    card = assistant.card
    n, steps = len(card.steps), card.steps

    def line(i: int) -> str:
        return f"step {i} of {n}: {steps[i - 1].title}"

    if intent == "current_step":
        return (line(k),)
    if intent == "next_step":
        last = f"Step {n} of {n}, {steps[-1].title}, is the last step"
        return (line(k + 1), steps[k].instruction) if k < n else (last,)
    if intent == "previous_step":
        return (line(k - 1),) if k > 1 else (f"Step 1 of {n}, {steps[0].title}, is the first",)
    if intent == "instruction":
        return (f"Step {k} of {n}, {steps[k - 1].title}", steps[k - 1].instruction)
    if intent == "steps_left":
        left = n - k
        return (f"{left} step{' is' if left == 1 else 's are'} left",) if left else ("No steps",)
    if intent == "procedure":
        return (f"has {n} steps", *(f"{i}. {s.title}" for i, s in enumerate(steps, 1)))
    if intent == "step_confidence":
        return (f"step {k} of {n}, {steps[k - 1].title}", "% confidence")
    if intent == "time_on_step":
        return (f"step {k} of {n}, {steps[k - 1].title}, for", f"<={since_s:.0f} s")
    raise ValueError(intent)


def states(text: str, facts: Sequence[str]) -> bool:
    """Whether ``text`` contains every fact; "<=N s" means some "M s" with M <= N."""
    for fact in facts:
        if fact.startswith("<="):
            said = re.search(r"for (\d+) s\.", text)
            if said is None or int(said[1]) > float(fact[2:-2]):
                return False
        elif fact not in text:
            return False
    return True


def seen_facts(assistant: Assistant, thing: str, window_s: float) -> tuple[str, ...]:
    """The newest sighting of ``thing`` in memory in the last ``window_s``, with its box."""
    assert assistant.latest_crop is not None
    now_ns = assistant.latest_crop.matched.frame.timestamp_ns
    sightings = [
        m.region
        for m in assistant.memory.regions()
        if thing in m.region.label.lower()
        and now_ns - m.region.frame_timestamp_ns <= window_s * 1e9
    ]
    if not sightings:
        return ("No: nothing I saw in the last",)
    r = max(sightings, key=lambda r: (r.frame_timestamp_ns, -r.gaze_distance_px))
    box = r.box
    return ("Yes: ", r.label, f"(box {box.x0},{box.y0} to {box.x1},{box.y1} in the scene frame)")


def looked_at_facts(assistant: Assistant, intent: Intent) -> tuple[str, ...]:
    """What perception found nearest the gaze in the latest keyframe (a text, to read)."""
    nearest = sorted(assistant.latest_regions, key=lambda r: r.gaze_distance_px)
    if intent == "read":
        texts = [r.label for r in nearest if r.kind == "text"]
        return (f"You just read '{texts[0]}'.",) if texts else ("You last read '",)
    if not nearest:
        return (CANT_TELL,)
    r = nearest[0]
    return (
        f"You are looking at {f'the text {r.label!r}' if r.kind == 'text' else 'a ' + r.label}.",
    )


def grade(assistant: Assistant, k: int, since_s: float) -> list[Graded]:
    """Ask every wording, follow-up and can't-tell question with the wearer on step ``k``."""
    graded = []
    panel = DEMO_PANELS[k - 1]
    thing, text = DEMO_PANEL_OBJECTS[panel], panel.split(" ", 1)[1].lower()
    for intent, wordings in WORDINGS.items():
        for wording in wordings:
            question = wording.format(object=thing, text=text)
            if intent in ("looking_at", "read"):
                facts = looked_at_facts(assistant, intent)
            elif intent == "seen":
                window_s = 10 if "10 seconds" in question else 30 if "30 s" in question else 60
                facts = seen_facts(assistant, text if "{text}" in wording else thing, window_s)
            else:
                facts = step_facts(assistant, intent, k, since_s)
            sentence, answer = ask(assistant, question)
            ok = answer.intent == intent and states(answer.text, facts)
            graded.append(Graded(intent, question, answer.text, facts, ok, sentence, answer))
    n = len(assistant.card.steps)
    for first, follow_up, first_by, then_by in FOLLOW_UPS:
        conversation = Conversation()
        ask(assistant, first, conversation)
        about = min(max(k + first_by, 1), n)
        target = about + then_by
        if 1 <= target <= n:
            facts = (f"step {target} of {n}: {assistant.card.steps[target - 1].title}",)
        else:
            facts = (f"Step {about} of {n}, {assistant.card.steps[about - 1].title}, is the",)
        sentence, answer = ask(assistant, follow_up, conversation)
        ok = answer.intent == "follow_up" and states(answer.text, facts)
        question = f"{first} / {follow_up}"
        graded.append(Graded("follow_up", question, answer.text, facts, ok, sentence, answer))
    for question in CANT_TELL_QUESTIONS:
        sentence, answer = ask(assistant, question)
        ok = answer.text == CANT_TELL and answer.intent == "unknown"
        graded.append(
            Graded("cant_tell", question, answer.text, (CANT_TELL,), ok, sentence, answer)
        )
    return graded


def accuracy(graded: Sequence[Graded]) -> dict[str, tuple[int, int]]:
    """(right, asked) per intent."""
    counts: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0])
    for g in graded:
        counts[g.intent][0] += g.ok
        counts[g.intent][1] += 1
    return {intent: (right, asked) for intent, (right, asked) in counts.items()}


def table(counts: dict[str, tuple[int, int]]) -> str:
    """The per-intent accuracy as lines of text."""
    return "\n".join(f"{i:16} {r:3}/{a:<3} {r / a:6.0%}" for i, (r, a) in sorted(counts.items()))


async def replay(
    source: Source, assistants: Sequence[Assistant], at_s: Sequence[float],
    then: Callable[[float], None],
) -> None:  # fmt: skip
    """Replay ``source`` into the assistants (each keyframe, each event); at the first
    keyframe from each of ``at_s`` seconds in, call ``then`` with that time."""
    info = await source.open()
    pending, start_ns = sorted(at_s), info.start_ns
    try:
        async for result in capture(source, info, CaptureSettings()):
            if isinstance(result, SourceEvent):
                for assistant in assistants:
                    assistant.observe_event(result)
                continue
            if not isinstance(result, CaptureResult) or result.crop is None:
                continue
            t_ns = result.matched.frame.timestamp_ns
            start_ns = t_ns if start_ns is None else start_ns
            for assistant in assistants:
                assistant.observe_keyframe(result.crop)
            while pending and (t_ns - start_ns) / 1e9 >= pending[0]:
                then(pending.pop(0))
    finally:
        await source.close()


def main(engine: str = "text") -> None:
    """Print the per-intent accuracy on the 60 s demo with ``engine``'s answers."""
    from gazecam.assist.assistant import AssistantSettings, load_engines, load_task
    from gazecam.llm import LLMSettings
    from gazecam.settings import SourceSettings
    from gazecam.sources import open_source
    from gazecam.sources.synthetic import SyntheticSource

    engines = load_engines(LLMSettings(engine=engine))  # type: ignore[arg-type]
    assistant = Assistant(
        load_task("demo"), engines.perception, engines.model, AssistantSettings(answer_max_tokens=8)
    )
    source = open_source("synthetic:demo", SourceSettings(synthetic_duration_s=60))
    assert isinstance(source, SyntheticSource)
    graded: list[Graded] = []

    def at(t_s: float) -> None:
        k = source.scene.step_at(t_s)
        graded.extend(grade(assistant, k, t_s - (k - 1) * 10 + 1))

    asyncio.run(replay(source, [assistant], [15, 35, 55], at))
    print(f"engine {engines.model.info.engine} ({engines.model.info.model})")
    print(table(accuracy(graded)))
    for g in graded:
        if not g.ok:
            print(f"WRONG {g.intent}: {g.question!r} -> {g.text!r} (expected {g.expected})")


if __name__ == "__main__":
    main(*sys.argv[1:2])
