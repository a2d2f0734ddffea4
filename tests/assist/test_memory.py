"""Visual memory: one entry per thing seen, a time horizon, a size bound, gaze priors."""

from __future__ import annotations

import math

import pytest

from gazecam.assist.memory import MemorySettings, VisualMemory, describe
from gazecam.records import Box, Region

S = 1_000_000_000


def region(label: str, t_s: float, distance_px: float = 0.0, kind: str = "text") -> Region:
    return Region(kind, label, 0.9, Box(0, 0, 10, 10), distance_px, int(t_s * S))  # type: ignore[arg-type]


def test_regions_get_ids_text_and_gaze_priors() -> None:
    memory = VisualMemory(MemorySettings(gaze_prior_scale_px=100))
    added, dropped = memory.add_keyframe(
        0, [region("CHECK FUSE", 0), region("clock", 0, 100, "object")]
    )
    assert dropped == [] and [a.region_id for a in added] == ["r0", "r1"]
    assert added[0].text == "- text 'CHECK FUSE', at the gaze point\n"
    assert added[1].text == "- a clock, 100 px from the gaze point\n"
    assert added[0].gaze_prior == 1.0
    assert added[1].gaze_prior == pytest.approx(math.exp(-1))
    assert describe(region("x", 0, 0.4)) == "- text 'x', at the gaze point\n"


def test_seeing_the_same_thing_again_replaces_the_old_sighting() -> None:
    memory = VisualMemory()
    memory.add_keyframe(0, [region("Check  Fuse", 0), region("clock", 0, kind="object")])
    added, dropped = memory.add_keyframe(1 * S, [region("check fuse", 1)])
    assert dropped == ["r0"] and [a.region_id for a in added] == ["r2"]
    assert [m.region.label for m in memory.regions()] == ["clock", "check fuse"]


def test_old_regions_are_forgotten_after_the_horizon() -> None:
    memory = VisualMemory(MemorySettings(memory_horizon_s=10))
    memory.add_keyframe(0, [region("A", 0)])
    memory.add_keyframe(5 * S, [region("B", 5)])
    _, dropped = memory.add_keyframe(12 * S, [region("C", 12)])
    assert dropped == ["r0"]
    assert [m.region.label for m in memory.regions()] == ["B", "C"]


def test_memory_is_bounded_and_never_returns_a_region_it_dropped_at_once() -> None:
    memory = VisualMemory(MemorySettings(memory_max_regions=3))
    memory.add_keyframe(0, [region("A", 0), region("B", 0)])
    added, dropped = memory.add_keyframe(S, [region(c, 1) for c in "CDEF"])
    assert len(memory) == 3
    assert [m.region.label for m in memory.regions()] == ["D", "E", "F"]
    assert dropped == ["r0", "r1"]  # A and B; C was added and evicted in the same call
    assert [a.region.label for a in added] == ["D", "E", "F"]
