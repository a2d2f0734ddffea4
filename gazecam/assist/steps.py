"""Which step of a task card is under way: cue evidence, step order and explicit events.

The tracker is a forward filter (an HMM) over the card's steps. At each keyframe it

1. moves the belief by the transition prior: stay on a step (likely), advance by one
   (moderate), skip ahead or go back (each unlikely; their mass is spread evenly over the
   steps they can reach, and each row is renormalised at the ends of the procedure);
2. weighs it by the evidence: every region whose text contains one of a step's text cues, or
   whose class is one of its object cues, adds ``confidence × exp(-gaze_distance_px / scale)``
   to that step's evidence (the best such region per step and keyframe, so that five detected
   bottles count as one); evidence halves every ``half_life`` and each step's likelihood is
   ``exp(gain × evidence)``. A cue seen once keeps nudging the belief for a few keyframes, a
   cue seen for seconds outweighs the prior against skipping, and stale evidence stops counting.
   Where the card's steps have reference photos and an image encoder is at hand, the
   keyframe's feature adds visual evidence too: its cosine similarity to each step's photos
   (the best of them), turned into a probability over the steps with photos by a softmax at
   ``step_photo_temperature``, is added to the evidence like one more cue (so a crop that
   looks like one step's photos counts as that step's cue at the gaze point, and one that
   looks like all of them alike adds the same to each, which moves nothing). A crop less
   similar than ``step_photo_min_similarity`` to every photo shows none of them and adds none.

Events (``step.next``, ``step.back``, ``step.set:N``) come from a person and set the belief to
one step outright; they also clear the evidence, which they supersede. Deterministic, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from gazecam.assist.tasks import TaskCard, normalise_cue
from gazecam.errors import ConfigError
from gazecam.records import BGRImage, Region


class StepSettings(BaseSettings):
    """The step tracker's transition prior and evidence model."""

    model_config = SettingsConfigDict(env_prefix="GAZECAM_", extra="ignore")

    step_stay_prob: float = Field(
        0.90,
        gt=0,
        le=1,
        description="Prior probability, per keyframe, of staying on the current step. The four "
        "transition probabilities are renormalised per step, so they need not sum to 1.",
    )
    step_advance_prob: float = Field(
        0.08, ge=0, le=1, description="Prior probability, per keyframe, of moving to the next step."
    )
    step_skip_prob: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Prior probability, per keyframe, of skipping ahead by two or more steps "
        "(spread evenly over the steps ahead).",
    )
    step_back_prob: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Prior probability, per keyframe, of going back to an earlier step "
        "(spread evenly over the earlier steps).",
    )
    step_evidence_half_life_s: float = Field(
        1.0, gt=0, description="Cue evidence counts half as much after this many seconds."
    )
    step_gaze_scale_px: float = Field(
        150.0,
        gt=0,
        description="A cue this far from the gaze point counts 1/e as much as one at the gaze.",
    )
    step_evidence_gain: float = Field(
        4.0,
        gt=0,
        description="Log-likelihood a step gains per unit of evidence (one full-confidence cue "
        "at the gaze point is one unit).",
    )
    # Measured on the demo (EfficientNet-Lite0, tests/assist/test_photo_cues.py): the best step's
    # photo beats the second by 0.02-0.36 (5th-95th percentile), and the tracker's accuracy on the
    # textless demo is the same (0.88) from 0.01 to 0.03 and lower from 0.05 on.
    step_photo_temperature: float = Field(
        0.03,
        gt=0,
        description="Softmax temperature over the steps' photo similarities (cosine): a crop "
        "this much more similar to one step's photos than to another's counts e times as "
        "much for it.",
    )
    # Measured on the demo: crops of a panel are 0.62-0.85 similar to its photo (5th-95th
    # percentile), crops of the background beside the panels at most 0.56 to any photo.
    step_photo_min_similarity: float = Field(
        0.6,
        ge=-1,
        le=1,
        description="A keyframe whose feature is less similar (cosine) than this to every "
        "step photo adds no visual evidence: it shows none of them.",
    )


class ImageEncoder(Protocol):
    """Turns an image into a feature vector (the vision encoder of perception)."""

    def embed(self, image_bgr: BGRImage) -> NDArray[np.float32]:
        """The image's L2-normalised feature vector."""
        ...


@dataclass(frozen=True, slots=True)
class StepEstimate:
    """The most probable step: 1-based ``index`` of ``total``, and its posterior probability."""

    index: int
    title: str
    total: int
    confidence: float  # 0..1


def transition_matrix(total: int, settings: StepSettings) -> NDArray[np.float64]:
    """Row i: prior probabilities of moving from step i to each step in one keyframe."""
    matrix = np.zeros((total, total))
    for i in range(total):
        matrix[i, i] = settings.step_stay_prob
        if i + 1 < total:
            matrix[i, i + 1] = settings.step_advance_prob
        if i + 2 < total:
            matrix[i, i + 2 :] = settings.step_skip_prob / (total - i - 2)
        if i > 0:
            matrix[i, :i] = settings.step_back_prob / i
    normalised: NDArray[np.float64] = matrix / matrix.sum(axis=1, keepdims=True)
    return normalised


class StepTracker:
    """Tracks the step of ``card`` under way from keyframe regions and explicit events.

    With an ``encoder``, each step's photos are embedded here, once.
    """

    def __init__(
        self, card: TaskCard, settings: StepSettings, encoder: ImageEncoder | None = None
    ) -> None:
        self.card = card
        self._settings = settings
        self._transition = transition_matrix(len(card.steps), settings)
        self._text_cues = [tuple(normalise_cue(c) for c in s.cues.text) for s in card.steps]
        self._object_cues = [
            frozenset(normalise_cue(c) for c in s.cues.objects) for s in card.steps
        ]
        # Row j: the features of step j's photos, (photos, dimensions); None without photos.
        self._photo_features = [
            np.stack([encoder.embed(photo.image_bgr) for photo in photos])
            if photos and encoder is not None
            else None
            for photos in card.photos
        ]
        # A procedure starts at its first step.
        self._belief = self._one_hot(0)
        self._evidence = np.zeros(len(card.steps))
        self._evidence_ns: int | None = None  # time the evidence was last brought up to date
        # The most probable step, since when it is, and the latest time seen (for time on step).
        self._step = 0
        self._step_since_ns: int | None = None
        self._latest_ns: int | None = None

    @property
    def posterior(self) -> tuple[float, ...]:
        """The probability of each step (in card order); they sum to 1."""
        return tuple(self._belief.tolist())

    def current(self) -> StepEstimate:
        """The most probable step (the earlier one on a tie)."""
        i = int(np.argmax(self._belief))
        total = len(self.card.steps)
        return StepEstimate(i + 1, self.card.steps[i].title, total, float(self._belief[i]))

    @property
    def uses_photos(self) -> bool:
        """Whether the card's photos were embedded (there were photos and an encoder)."""
        return any(features is not None for features in self._photo_features)

    def observe(
        self,
        regions: list[Region],
        timestamp_ns: int,
        feature: NDArray[np.float32] | None = None,
    ) -> None:
        """Update with one keyframe's regions and crop ``feature``, taken at ``timestamp_ns``.

        Timestamps should not go backwards; one that does is treated as the latest seen.
        """
        now_ns = self._decay_to(timestamp_ns)
        best = np.zeros(len(self.card.steps))
        for region in regions:
            weight = self._weight(region, now_ns)
            for step in self._matching_steps(region):
                best[step] = max(best[step], weight)
        self._evidence += best
        if feature is not None:
            self._evidence += self.photo_evidence(feature)
        log_likelihood = self._settings.step_evidence_gain * self._evidence
        # Subtracting the maximum keeps exp() finite; only ratios between steps matter.
        likelihood = np.exp(log_likelihood - log_likelihood.max())
        predicted = self._belief @ self._transition
        belief = predicted * likelihood
        # With zero skip/back priors, evidence can point only at unreachable steps: keep the
        # prediction rather than divide by zero.
        self._belief = belief / belief.sum() if belief.sum() > 0 else predicted
        self._note_step(now_ns)

    def photo_similarities(self, feature: NDArray[np.float32]) -> NDArray[np.float64]:
        """Each step's best cosine similarity of its photos to ``feature``; NaN without photos."""
        return np.array(
            [
                np.nan if features is None else float(np.max(features @ feature))
                for features in self._photo_features
            ]
        )

    def photo_evidence(self, feature: NDArray[np.float32]) -> NDArray[np.float64]:
        """The visual evidence of one keyframe's ``feature`` for each step (0 without photos).

        A softmax over the steps with photos of similarity / temperature, where the best
        similarity reaches ``step_photo_min_similarity``.
        """
        similarity = self.photo_similarities(feature)
        evidence = np.zeros(len(self.card.steps))
        with_photos = ~np.isnan(similarity)
        if (
            not with_photos.any()
            or similarity[with_photos].max() < self._settings.step_photo_min_similarity
        ):
            return evidence
        logits = similarity[with_photos] / self._settings.step_photo_temperature
        weights = np.exp(logits - logits.max())
        evidence[with_photos] = weights / weights.sum()
        return evidence

    def event(self, name: str, timestamp_ns: int) -> None:
        """Apply ``step.next``, ``step.back`` or ``step.set:N`` (N from 1); ignore other events.

        ``next`` and ``back`` stop at the first and last step. A malformed step event, or
        ``step.set:N`` outside 1..total, raises ConfigError.
        """
        if not name.startswith("step."):
            return
        total = len(self.card.steps)
        current = self.current().index - 1
        action, _, argument = name.removeprefix("step.").partition(":")
        if action == "next" and not argument:
            target = min(current + 1, total - 1)
        elif action == "back" and not argument:
            target = max(current - 1, 0)
        elif action == "set" and argument.isdecimal() and 1 <= int(argument) <= total:
            target = int(argument) - 1
        else:
            raise ConfigError(
                f"event {name!r}: expected step.next, step.back or step.set:N with N in 1..{total}"
            )
        self._belief = self._one_hot(target)
        # What was seen before a person said where they are must not pull the belief back.
        self._evidence[:] = 0.0
        self._note_step(self._decay_to(timestamp_ns))

    def time_on_step_s(self) -> float | None:
        """Seconds from when the current step became the most probable one to the latest
        keyframe or event; None before the first."""
        if self._step_since_ns is None or self._latest_ns is None:
            return None
        return (self._latest_ns - self._step_since_ns) / 1e9

    def _note_step(self, now_ns: int) -> None:
        step = int(np.argmax(self._belief))
        if step != self._step or self._step_since_ns is None:
            self._step, self._step_since_ns = step, now_ns
        self._latest_ns = now_ns

    def _one_hot(self, index: int) -> NDArray[np.float64]:
        belief = np.zeros(len(self.card.steps))
        belief[index] = 1.0
        return belief

    def _decay_to(self, timestamp_ns: int) -> int:
        """Age the evidence to ``timestamp_ns`` (or the latest time seen) and return that time."""
        last_ns = timestamp_ns if self._evidence_ns is None else self._evidence_ns
        now_ns = max(timestamp_ns, last_ns)
        self._evidence *= self._decay(now_ns - last_ns)
        self._evidence_ns = now_ns
        return now_ns

    def _decay(self, age_ns: int) -> float:
        half_life_ns = self._settings.step_evidence_half_life_s * 1e9
        # A region stamped after the latest time seen is not older than zero.
        return float(0.5 ** (max(age_ns, 0) / half_life_ns))

    def _weight(self, region: Region, now_ns: int) -> float:
        """Evidence of one region: its confidence, less away from the gaze and with age."""
        gaze = math.exp(-region.gaze_distance_px / self._settings.step_gaze_scale_px)
        return region.confidence * gaze * self._decay(now_ns - region.frame_timestamp_ns)

    def _matching_steps(self, region: Region) -> list[int]:
        label = normalise_cue(region.label)
        if region.kind == "text":
            return [i for i, cues in enumerate(self._text_cues) if any(c in label for c in cues)]
        return [i for i, cues in enumerate(self._object_cues) if label in cues]
