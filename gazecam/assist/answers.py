"""Answers grounded in facts: route a question to what can answer it, and state the facts.

A question is routed to one intent by keyword patterns over its normalised words (lower case,
contractions spelled out, punctuation dropped). No model is involved: the questions a wearer
asks about a procedure come in few shapes with many wordings, a pattern list says exactly
which wordings it takes (and a test lists them), and it cannot invent. Each intent pulls its
facts from the task card, the step tracker, the latest keyframe's regions (perception) or the
visual memory, and states them in a fixed sentence. What nothing can answer gets exactly
``CANT_TELL``.

The language model may only phrase: it continues the fixed sentence, and its continuation is
kept only where ``supported`` finds nothing in it that the sentence does not say (see there).
Engines that see pixels (vlm) get no more say: an open question ("is the cover open?") gets
``CANT_TELL`` from every engine, because no checker can tell a visual claim from an invented
one, so fact answers are the same whatever the engine.

Multi-turn: a ``Conversation`` (a websocket, or one ``gazecam ask`` run) keeps its previous
answer, and a follow-up ("and after that?", "and before?", "why?") resolves against it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from gazecam.assist.memory import MemoryRegion
from gazecam.assist.steps import StepEstimate
from gazecam.assist.tasks import TaskCard, normalise_cue
from gazecam.records import Region

CANT_TELL = "I can't tell from what I've seen."
Intent = Literal[
    "current_step",
    "next_step",
    "previous_step",
    "instruction",
    "steps_left",
    "procedure",
    "step_confidence",
    "time_on_step",
    "looking_at",
    "read",
    "seen",
    "follow_up",
    "unknown",
]
Source = Literal["card", "tracker", "perception", "memory", "conversation"]
FollowUp = Literal["after", "before", "why"]

_CONTRACTIONS = {
    "what's": "what is", "whats": "what is", "where's": "where is", "wheres": "where is",
    "i'm": "i am", "im": "i am", "that's": "that is", "it's": "it is", "there's": "there is",
    "i've": "i have", "didn't": "did not", "haven't": "have not", "isn't": "is not",
    "don't": "do not", "how's": "how is", "what're": "what are", "who's": "who is",
}  # fmt: skip
_NUMBERS = {
    "a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
    "seven": 7, "eight": 8, "nine": 9, "ten": 10, "fifteen": 15, "twenty": 20, "thirty": 30,
    "forty": 40, "fifty": 50, "sixty": 60,
}  # fmt: skip


def normalise(question: str) -> str:
    """Lower case, contractions spelled out, words and numbers only, single spaces."""
    words = re.findall(r"[a-z0-9']+(?:\.[0-9]+)?", question.casefold().replace("’", "'"))
    return " ".join(_CONTRACTIONS.get(w, w.strip("'")) for w in words)


# Follow-ups lean on the previous answer ("after that", "before it", "then what", "why?");
# "after this" is about the current step (next_step).
_FOLLOW_UPS: tuple[tuple[FollowUp, str], ...] = (
    ("after", r"^(and |so |ok |okay |then )*(what )?(\w+ ){0,3}(after|following) (that|it)\b"),
    ("after", r"^(and )?then what\b|^and (then|next|after)\b|^what about after\b"),
    ("before", r"^(and |so |ok |okay )*(what )?(\w+ ){0,3}before (that|it)\b"),
    ("before", r"^and before\b|^(and )?the one before\b|^what about before\b"),
    ("why", r"^(and |but |so )?why( is that| so| that| do you (say|think) (so|that))?$"
     r"|^how do you know\b|^what makes you (say|think)\b|^(are you )?sure$"),
)  # fmt: skip
# In order: the first intent one of whose patterns matches is taken.
_PATTERNS: tuple[tuple[Intent, str], ...] = (
    ("read", r"\b(read|reading)\b|\bwhat (does|did) (it|this|that|the \w+) (say|read)\b"
     r"|\bwhat is written\b|\bwhat (text|words?|label)\b|\bwritten (on|there|here)\b"),
    ("steps_left", r"\b(steps?|how many|how much)\b.*\b(left|remain|remaining|to go)\b"
     r"|^what (is )?(left|remains)\b|\bhow many more\b|\bhow much longer\b|\banything else\b"
     r"|\b(almost|nearly) (done|finished|there)\b|\bhow far (am i|is it) from\b"),
    ("procedure", r"\b(whole|entire|full|complete|overall) (procedure|process|task|list)\b"
     r"|\b(all|list) (the |of the )?steps\b|\bwhat are the steps\b|\boverview\b"
     r"|\bhow many steps\b|\bsteps (are there|in total|does it have)\b"
     r"|\bwhat is the (procedure|task|process)\b|\bwhich (procedure|task)\b"),
    ("time_on_step", r"\bhow long\b|\bhow much time\b|\bsince when\b|\btime (on|in|at)\b"),
    ("step_confidence", r"\b(sure|certain|confident|confidence|probability)\b"),
    ("previous_step", r"\b(previous|prior|preceding|earlier)\b|\bstep before\b"
     r"|\bbefore (this|the current|now)\b|\bwhat (did|have) i (just )?(do|did|done|finish|"
     r"finished|complete|completed)\b|\b(last|past) step i\b|\bwhat was i doing\b"),
    ("next_step", r"\bnext\b|\bafter (this|the current|i finish|i am done|that is done)\b"
     r"|\bwhat comes (after|then)\b|\bupcoming\b|\bfollowing step\b"),
    ("instruction", r"\bwhat (should|do|must|shall|can) i (do|be doing)\b|\bwhat now\b"
     r"|\bhow (do|should|can) i\b|\binstructions?\b|\bwhat (do|did) i (need|have) to do\b"
     r"|\bwhat am i (supposed|meant) to do\b|\bwhat to do\b|\bwhat is my (task|job)\b"
     r"|\bhow to (do|proceed)\b|\bwhat does (this|the) step (say|want)\b"),
    ("looking_at", r"\blook(ing)? at\b|\bwhat (do|can) you see\b|\bin front of me\b"
     r"|\bwhat (is|are) (this|that|these|those)\b(?! step)"
     r"|\bwhat am i (seeing|viewing|staring at)\b"
     r"|\bwhat (object|thing)\b|\bidentify\b|\bmy gaze\b|\bwhere am i looking\b"),
    ("current_step", r"\bstep\b|\bwhere am i\b|\bwhich (stage|phase|part)\b"
     r"|\bwhat am i (doing|on)\b|\bhow far along\b|\bmy progress\b"),
)  # fmt: skip
_SEEN_VERB = r"(see|seen|saw|spot|spotted|notice|noticed|look at|looked at|come across)"
_SEEN_FORMS = (  # each captures the thing asked about as "thing"
    rf"^(was|were|has|have|had) (been )?(?!(i|you|we) )(?P<thing>.+?) (been )?{_SEEN_VERB}\b",
    rf"\b(did|have|has|had|when|where) (i|you|we)( \w+)? {_SEEN_VERB} (?P<thing>.+)",
    r"^(is|was|are|were) there (?P<thing>(a|an|any) .+)",
    r"^where (is|was|are|were) (?P<thing>(the|a|an|my|that|this) .+)",
)
_THING_END = (
    r"\b(in|within|during|over|for) the (last|past)\b.*|\b(recently|lately|earlier|before|"
    r"just now|today|so far|anywhere|and where|at all)\b.*|\b(seen|spotted|noticed)\b.*"
)
_ARTICLES = r"^((a|an|the|any|my|that|this|some) )+"
_WINDOW = re.compile(
    rf"\b(last|past) (?P<n>[0-9.]+|{'|'.join(_NUMBERS)})? ?"
    r"(?P<unit>s|sec|secs|seconds?|m|mins?|minutes?)\b"
)


@dataclass(frozen=True, slots=True)
class Route:
    """What a question asks: its intent, and for 'seen' the thing and the window."""

    intent: Intent
    thing: str = ""  # seen: what was asked about ("cup"), normalised
    within_s: float | None = None  # seen: "in the last N seconds"; None: as far as memory goes
    follow_up: FollowUp | None = None


def route(question: str) -> Route:
    """The intent of ``question`` (see the module docstring)."""
    q = normalise(question)
    for kind, pattern in _FOLLOW_UPS:
        if re.search(pattern, q):
            return Route("follow_up", follow_up=kind)
    for form in _SEEN_FORMS:
        match = re.search(form, q)
        thing = match and re.sub(_ARTICLES, "", re.sub(_THING_END, "", match["thing"])).strip()
        if thing and "step" not in thing:
            return Route("seen", thing, _window_s(q))
    for intent, pattern in _PATTERNS:
        if re.search(pattern, q):
            return Route(intent)
    return Route("unknown")


def _window_s(q: str) -> float | None:
    match = _WINDOW.search(q)
    if match is None:
        return None
    n = match["n"] or "1"
    count = _NUMBERS[n] if n in _NUMBERS else float(n)
    return count * (60.0 if match["unit"].startswith("m") else 1.0)


@dataclass(frozen=True, slots=True)
class Situation:
    """Everything an answer may draw on, at the moment of the ask."""

    card: TaskCard
    step: StepEstimate
    time_on_step_s: float | None
    latest: Sequence[Region]  # the latest keyframe's regions
    memory: Sequence[MemoryRegion]  # oldest first
    now_ns: int | None  # the latest keyframe's time
    horizon_s: float  # how far back the memory goes


@dataclass(frozen=True, slots=True)
class RoutedAnswer:
    """The answer's facts, stated: its intent, the sentence, and where each fact came from."""

    intent: Intent
    sentence: str
    sources: tuple[Source, ...]
    about_step: int | None = None  # the step the answer is about (1-based), for follow-ups
    phrase: bool = True  # whether the model may continue the sentence

    @property
    def cant_tell(self) -> bool:
        """Nothing could answer."""
        return self.sentence == CANT_TELL


def cant_tell(intent: Intent = "unknown") -> RoutedAnswer:
    """The answer where nothing can answer (an intent whose source has nothing yet keeps its
    name: e.g. looking_at before the first keyframe)."""
    return RoutedAnswer(intent, CANT_TELL, (), phrase=False)


class Conversation:
    """One session's previous answer, which a follow-up resolves against. Sessions are kept
    apart: each websocket (and each ``gazecam ask`` run) has its own."""

    def __init__(self) -> None:
        self._previous: tuple[TaskCard, RoutedAnswer] | None = None

    def previous(self, card: TaskCard) -> RoutedAnswer | None:
        """The previous answer, if it was about ``card`` (a new card starts afresh)."""
        if self._previous is None or self._previous[0] is not card:
            return None
        return self._previous[1]

    def remember(self, card: TaskCard, answer: RoutedAnswer) -> None:
        """Keep ``answer`` as the one the next follow-up refers to."""
        self._previous = (card, answer)


def answer(question: Route, now: Situation, previous: RoutedAnswer | None = None) -> RoutedAnswer:
    """The facts for ``question`` from ``now`` (and the ``previous`` answer, for follow-ups)."""
    step, card = now.step, now.card
    i, n = step.index, step.total
    if question.intent == "follow_up":
        return _follow_up(question.follow_up, now, previous)
    if question.intent == "current_step":
        return _step_answer("current_step", f"You are on step {i} of {n}: {step.title}.", i)
    if question.intent == "next_step":
        return _neighbour(card, i, +1, f"Next is step {i + 1} of {n}", "next_step")
    if question.intent == "previous_step":
        return _neighbour(card, i, -1, f"Before this came step {i - 1} of {n}", "previous_step")
    if question.intent == "instruction":
        return _step_answer("instruction", f"Step {i} of {n}, {_instruction(card, i)}", i)
    if question.intent == "steps_left":
        left = n - i
        if left == 0:
            sentence = f"No steps are left after this one: step {n} of {n}, {step.title}, is last."
        else:
            sentence = (
                f"{left} step{' is' if left == 1 else 's are'} left after this one "
                f"(step {i} of {n}, {step.title})."
            )
        return _step_answer("steps_left", sentence, i)
    if question.intent == "procedure":
        steps = "; ".join(f"{k}. {s.title}" for k, s in enumerate(card.steps, 1))
        sentence = f"{card.name} has {n} step{'s' if n > 1 else ''}: {steps}."
        return RoutedAnswer("procedure", sentence, ("card",))
    if question.intent == "step_confidence":
        sentence = (
            f"The step tracker puts you on step {i} of {n}, {step.title}, "
            f"with {step.confidence:.0%} confidence."
        )
        return _step_answer("step_confidence", sentence, i)
    if question.intent == "time_on_step":
        if now.time_on_step_s is None:
            return cant_tell("time_on_step")
        sentence = (
            f"You have been on step {i} of {n}, {step.title}, for {now.time_on_step_s:.0f} s."
        )
        return _step_answer("time_on_step", sentence, i)
    if question.intent in ("looking_at", "read"):
        return _perceived(question.intent, now)
    if question.intent == "seen":
        return _seen(question, now)
    return cant_tell()


def _step_answer(intent: Intent, sentence: str, about: int) -> RoutedAnswer:
    return RoutedAnswer(intent, sentence, ("tracker", "card"), about)


def _instruction(card: TaskCard, index: int, between: str = ": ") -> str:
    """A step's title and instruction (the title alone where the card gives none)."""
    s = card.steps[index - 1]
    return f"{s.title}{between}{s.instruction}" if s.instruction.strip() else f"{s.title}."


def _neighbour(card: TaskCard, index: int, by: int, lead: str, intent: Intent) -> RoutedAnswer:
    """The step ``by`` away from step ``index``; ``lead`` opens the sentence when there is one."""
    n, target = len(card.steps), index + by
    if not 1 <= target <= n:
        where = "last" if by > 0 else "first"
        title = card.steps[index - 1].title
        sentence = f"Step {index} of {n}, {title}, is the {where} step."
        return _step_answer(intent, sentence, index)
    return _step_answer(intent, f"{lead}: {_instruction(card, target, '. ')}", target)


def _follow_up(
    kind: FollowUp | None, now: Situation, previous: RoutedAnswer | None
) -> RoutedAnswer:
    if kind == "why":
        if previous is None or previous.cant_tell:
            return cant_tell("follow_up")
        # A follow-up's own facts came from the card and the tracker, not from the chat.
        basis = tuple(dict.fromkeys(s for s in previous.sources if s != "conversation"))
        because = " and ".join(_because(source, now) for source in basis)
        sentence = f"I said so from {because}."
        return RoutedAnswer("follow_up", sentence, ("conversation", *basis))
    about = (
        now.step.index if previous is None or previous.about_step is None else previous.about_step
    )
    n = now.step.total
    by, lead = (1, f"After step {about} comes step {about + 1} of {n}") if kind == "after" else (
        -1, f"Before step {about} comes step {about - 1} of {n}"
    )  # fmt: skip
    routed = _neighbour(now.card, about, by, lead, "follow_up")
    sources: tuple[Source, ...] = ("card",) if previous is None else ("conversation", "card")
    return RoutedAnswer("follow_up", routed.sentence, sources, routed.about_step)


def _because(source: Source, now: Situation) -> str:
    step = now.step
    return {
        "card": "the task card",
        "tracker": f"the step tracker (step {step.index} of {step.total}, "
        f"{step.confidence:.0%} sure)",
        "perception": "what perception found in the latest keyframe",
        "memory": f"what I saw in the last {now.horizon_s:g} s",
        "conversation": "my previous answer",
    }[source]


def _thing(region: Region) -> str:
    return f"the text '{region.label}'" if region.kind == "text" else f"a {region.label}"


def _perceived(intent: Intent, now: Situation) -> RoutedAnswer:
    """The region nearest the gaze in the latest keyframe (a text one, to 'read'); for 'read'
    with no text there, the newest text in memory."""
    nearest = sorted(now.latest, key=lambda r: r.gaze_distance_px)
    if intent == "looking_at":
        if not nearest:
            return cant_tell(intent)
        return RoutedAnswer(intent, f"You are looking at {_thing(nearest[0])}.", ("perception",))
    texts = [r for r in nearest if r.kind == "text"]
    if texts:
        return RoutedAnswer(intent, f"You just read '{texts[0].label}'.", ("perception",))
    remembered = [m.region for m in now.memory if m.region.kind == "text"]
    if not remembered or now.now_ns is None:
        return cant_tell(intent)
    newest = max(remembered, key=lambda r: r.frame_timestamp_ns)
    age_s = (now.now_ns - newest.frame_timestamp_ns) / 1e9
    return RoutedAnswer(intent, f"You last read '{newest.label}', {age_s:.0f} s ago.", ("memory",))


def _seen(question: Route, now: Situation) -> RoutedAnswer:
    """Whether the thing was in a keyframe of the last N seconds, when and where."""
    window_s = min(question.within_s or now.horizon_s, now.horizon_s)
    if now.now_ns is None:
        return cant_tell("seen")
    thing = normalise_cue(question.thing)
    forms = {thing, thing.removesuffix("s")}
    since_ns = now.now_ns - window_s * 1e9
    sightings = [
        m.region
        for m in now.memory
        if m.region.frame_timestamp_ns >= since_ns
        and any(f and f in normalise_cue(m.region.label) for f in forms)
    ]
    if not sightings:
        sentence = f"No: nothing I saw in the last {window_s:g} s matches '{question.thing}'."
        return RoutedAnswer("seen", sentence, ("memory",))
    r = max(sightings, key=lambda r: (r.frame_timestamp_ns, -r.gaze_distance_px))
    age_s = (now.now_ns - r.frame_timestamp_ns) / 1e9
    where = (
        "at your gaze point"
        if r.gaze_distance_px < 1
        else f"{r.gaze_distance_px:.0f} px from your gaze point"
    )
    box = r.box
    sentence = (
        f"Yes: {_thing(r)}, {age_s:.0f} s ago, {where} "
        f"(box {box.x0},{box.y0} to {box.x1},{box.y1} in the scene frame)."
    )
    return RoutedAnswer("seen", sentence, ("memory",))


# Function words a rephrasing may add; every other word must be the sentence's own.
_FUNCTION_WORDS = frozenset({
    "a", "an", "the", "this", "that", "these", "those", "it", "its", "is", "are", "was", "were",
    "be", "been", "am", "do", "does", "did", "you", "your", "i", "me", "my", "we", "our", "to",
    "of", "in", "on", "at", "for", "from", "with", "by", "and", "or", "but", "so", "then", "now",
    "here", "there", "as", "than", "just", "also", "please", "should", "can", "will", "would",
    "could", "may", "might", "must", "step", "steps",
})  # fmt: skip
_YES_NO = frozenset({"yes", "no", "yeah", "yep", "nope", "not", "never", "none", "nothing"})


def supported(continuation: str, routed: RoutedAnswer) -> bool:
    """Whether the model's ``continuation`` of ``routed.sentence`` says nothing new: every
    number, quoted text and word in it is in the sentence (or a function word), it makes no
    yes/no claim, and it says something (at least one of the sentence's own words) without
    merely repeating part of the sentence word for word."""
    sentence = re.findall(r"[a-z0-9]+", routed.sentence.casefold())
    said = set(sentence)
    words = re.findall(r"[a-z0-9]+", continuation.casefold())
    if f" {' '.join(words)} " in f" {' '.join(sentence)} ":
        return False
    quoted = re.findall(r"'([^']+)'|\"([^\"]+)\"", continuation)
    if any(q and q not in routed.sentence for pair in quoted for q in pair):
        return False
    content = [w for w in words if w not in _FUNCTION_WORDS]
    if any(w in _YES_NO for w in words) or any(w not in said for w in content):
        return False
    return bool(content)
