"""The step tracker: cue evidence, the order prior, gaze proximity, decay and explicit events."""

from __future__ import annotations

import numpy as np
import pytest

from gazecam.assist.steps import StepEstimate, StepSettings, StepTracker, transition_matrix
from gazecam.assist.tasks import Cues, Step, TaskCard
from gazecam.errors import ConfigError
from gazecam.records import Box, Region, RegionKind
from gazecam.sources.synthetic import DEMO_PANELS

S_NS = 1_000_000_000
T0_NS = 1_760_000_000_000_000_000

# The numbers below were worked out for this evidence model; the defaults are tuned on the
# synthetic demo (tests/assist/test_assistant.py checks the tracker's accuracy there).
SETTINGS = StepSettings(step_evidence_half_life_s=3.0, step_evidence_gain=2.0)


def demo_card() -> TaskCard:
    """The synthetic demo's six panels as steps; each panel's text is its step's cue."""
    steps = [
        Step(title=panel[2:].title(), instruction="", cues=Cues(text=(panel[2:],)))
        for panel in DEMO_PANELS
    ]
    steps[1] = steps[1].model_copy(update={"cues": Cues(text=("check fuse",), objects=("bottle",))})
    return TaskCard(name="demo", steps=tuple(steps))


def region(
    label: str,
    at_s: float,
    confidence: float = 0.9,
    gaze_distance_px: float = 0.0,
    kind: RegionKind = "text",
) -> Region:
    return Region(
        kind, label, confidence, Box(0, 0, 100, 30), gaze_distance_px, T0_NS + round(at_s * S_NS)
    )


def tracker() -> StepTracker:
    return StepTracker(demo_card(), SETTINGS)


def feed(
    t: StepTracker,
    label: str,
    seconds: range,
    confidence: float = 0.9,
    gaze_distance_px: float = 0.0,
) -> None:
    """One keyframe per second showing ``label``."""
    for s in seconds:
        t.observe([region(label, s, confidence, gaze_distance_px)], T0_NS + s * S_NS)


def test_default_transition_prior() -> None:
    matrix = transition_matrix(6, SETTINGS)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0)
    # From step 1: stay 0.90, next 0.08, skip 0.01 over steps 3..6, renormalised by 0.99.
    np.testing.assert_allclose(
        matrix[0], np.array([0.90, 0.08, 0.0025, 0.0025, 0.0025, 0.0025]) / 0.99
    )
    # From step 4: back 0.01 over steps 1..3, stay, next, skip to step 6.
    np.testing.assert_allclose(matrix[3], [0.01 / 3, 0.01 / 3, 0.01 / 3, 0.90, 0.08, 0.01])
    # The last step can only stay or go back.
    np.testing.assert_allclose(matrix[5], np.array([0.002] * 5 + [0.90]) / 0.91)


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GAZECAM_STEP_EVIDENCE_HALF_LIFE_S", "7.5")
    assert StepSettings().step_evidence_half_life_s == 7.5


def test_starts_at_step_one() -> None:
    assert tracker().current() == StepEstimate(1, "Remove Cover", 6, 1.0)


def test_cue_of_step_two_moves_there_in_a_couple_of_keyframes() -> None:
    t = tracker()
    feed(t, "2 CHECK FUSE", range(1))
    assert t.current().index == 1  # one keyframe is not yet enough against the prior to stay
    assert t.posterior[1] == pytest.approx(0.347, abs=0.005)
    feed(t, "2 CHECK FUSE", range(1, 2))
    estimate = t.current()
    assert (estimate.index, estimate.title, estimate.total) == (2, "Check Fuse", 6)
    assert estimate.confidence > 0.9
    assert sum(t.posterior) == pytest.approx(1.0)


def test_no_jump_to_step_five_on_one_weak_cue_but_after_sustained_strong_evidence() -> None:
    t = tracker()
    feed(t, "5 PRESS RESET", range(1), confidence=0.5, gaze_distance_px=100.0)
    assert t.current().index == 1
    assert t.posterior[4] < 0.01
    feed(t, "5 PRESS RESET", range(1, 3), confidence=0.95)
    assert t.current().index == 5 and t.current().confidence > 0.7
    feed(t, "5 PRESS RESET", range(3, 4), confidence=0.95)
    assert t.current().confidence > 0.99


def test_evidence_at_the_gaze_counts_more_than_at_the_crop_edge() -> None:
    near, far = tracker(), tracker()
    feed(near, "check fuse", range(2), gaze_distance_px=0.0)
    feed(far, "check fuse", range(2), gaze_distance_px=220.0)
    assert near.posterior[1] > 0.9
    assert far.posterior[1] < 0.6
    assert near.posterior[1] - far.posterior[1] > 0.3


def test_cues_are_case_and_space_insensitive() -> None:
    for label in ("2cHeCk   FuSe", "CHECKFUSE", "check-fuse."):
        t = tracker()
        feed(t, label, range(2))
        assert t.current().index == 2, label
    t = tracker()
    feed(t, "check fuze", range(5))  # a misread that is not the cue
    assert t.current().index == 1


def test_object_cues_match_class_names_once_per_keyframe() -> None:
    one, five = tracker(), tracker()
    one.observe([region("Bottle", 0, kind="object")], T0_NS)
    five.observe([region("bottle", 0, kind="object")] * 5, T0_NS)
    assert one.posterior == five.posterior
    assert one.posterior[1] == pytest.approx(0.347, abs=0.005)
    # An object label never matches a text cue, nor a text line an object cue.
    t = tracker()
    t.observe([region("check fuse", 0, kind="object"), region("bottle", 0)], T0_NS)
    assert t.posterior[1] == pytest.approx(transition_matrix(6, SETTINGS)[0, 1])


def test_stale_evidence_decays() -> None:
    fresh, stale = tracker(), tracker()
    for t in (fresh, stale):
        feed(t, "check fuse", range(1))
    # An empty keyframe one second on still carries the cue; a minute on it carries nothing.
    fresh.observe([], T0_NS + 1 * S_NS)
    stale.observe([], T0_NS + 60 * S_NS)
    assert fresh.posterior[1] > 0.7
    assert stale.posterior[1] == pytest.approx(0.347 * 0.9 + 0.653 * 0.08, abs=0.01)
    # A region from a frame long before the keyframe counts for as little.
    old = tracker()
    old.observe([region("check fuse", 0)], T0_NS + 60 * S_NS)
    assert old.posterior[1] == pytest.approx(transition_matrix(6, SETTINGS)[0, 1], abs=1e-6)


def test_events_set_the_step_and_clamp_at_the_ends() -> None:
    t = tracker()
    t.event("step.back", T0_NS)
    assert t.current() == StepEstimate(1, "Remove Cover", 6, 1.0)
    t.event("step.next", T0_NS)
    assert t.current() == StepEstimate(2, "Check Fuse", 6, 1.0)
    t.event("step.set:6", T0_NS)
    t.event("step.next", T0_NS)
    assert t.current() == StepEstimate(6, "Close Cover", 6, 1.0)
    t.event("step.back", T0_NS)
    assert t.current().index == 5
    t.event("recording.begin", T0_NS)  # not a step event: ignored
    assert t.current().index == 5


def test_event_overrides_evidence_seen_before_it() -> None:
    t = tracker()
    feed(t, "check fuse", range(5))
    t.event("step.set:4", T0_NS + 5 * S_NS)
    t.observe([], T0_NS + 6 * S_NS)
    assert t.current().index == 4 and t.current().confidence > 0.85


@pytest.mark.parametrize(
    "name", ["step.set:0", "step.set:7", "step.set:x", "step.jump", "step.next:2"]
)
def test_bad_step_event_names_the_event_and_the_range(name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        tracker().event(name, T0_NS)
    assert str(caught.value) == (
        f"event {name!r}: expected step.next, step.back or step.set:N with N in 1..6"
    )


def test_time_on_step_counts_from_when_the_step_became_the_most_probable() -> None:
    tracker = StepTracker(demo_card(), SETTINGS)
    assert tracker.time_on_step_s() is None  # nothing seen yet
    for k in range(4):
        tracker.observe([region("REMOVE COVER", k * 0.5)], T0_NS + round(k * 0.5 * S_NS))
    assert tracker.current().index == 1 and tracker.time_on_step_s() == 1.5
    k = 4
    while tracker.current().index == 1:
        tracker.observe([region("CHECK FUSE", k * 0.5)], T0_NS + round(k * 0.5 * S_NS))
        k += 1
    moved_s = (k - 1) * 0.5
    assert tracker.time_on_step_s() == 0.0
    tracker.observe([region("CHECK FUSE", moved_s + 2)], T0_NS + round((moved_s + 2) * S_NS))
    assert tracker.current().index == 2 and tracker.time_on_step_s() == 2.0
    tracker.event("step.next", T0_NS + round((moved_s + 3) * S_NS))
    assert tracker.current().index == 3 and tracker.time_on_step_s() == 0.0
