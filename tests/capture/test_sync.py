"""Gaze-to-frame matching: the pure function, the ring buffer and the streaming matcher."""

from __future__ import annotations

import numpy as np
import pytest

from gazecam.capture.sync import (
    STATUS_NO_GAZE,
    STATUS_NOT_WORN,
    STATUS_OK,
    FrameMatcher,
    GazeBuffer,
    match_frames,
)
from gazecam.records import GazeSample, SceneFrame
from tests.conftest import NEON_DEMO, SCENE_TIME, missing

MS = 1_000_000


def gaze_arrays(ts_ms: list[float], worn: list[bool] | None = None):  # type: ignore[no-untyped-def]
    """Gaze on the line x = 10·t_ms, y = 1000 - 2·t_ms."""
    ts = (np.array(ts_ms) * MS).astype(np.int64)
    x = ts / MS * 10.0
    y = 1000.0 - ts / MS * 2.0
    w = np.array(worn if worn is not None else [True] * len(ts_ms))
    return ts, x, y, w


def frame(t_ms: float, index: int = 0) -> SceneFrame:
    return SceneFrame(
        int(t_ms * MS), index, 1600, 1200, decode=lambda: np.zeros((1, 1, 3), np.uint8)
    )


def test_interpolation_is_exact_on_a_linear_track() -> None:
    ts, x, y, w = gaze_arrays([0, 5, 10, 15, 20])
    frames = (np.array([2.5, 7.0, 10.0, 13.3]) * MS).astype(np.int64)
    m = match_frames(frames, ts, x, y, w, tolerance_ns=20 * MS, method="interpolate")
    assert m.status.tolist() == [STATUS_OK] * 4
    np.testing.assert_allclose(m.x_px, frames / MS * 10.0, atol=1e-9)
    np.testing.assert_allclose(m.y_px, 1000.0 - frames / MS * 2.0, atol=1e-9)
    # An interpolated point is at the frame's own time.
    assert m.gaze_timestamp_ns.tolist() == frames.tolist()


def test_nearest_takes_the_closer_sample_and_its_time() -> None:
    ts, x, y, w = gaze_arrays([0, 5, 10])
    frames = (np.array([1.0, 3.0, 9.0]) * MS).astype(np.int64)
    m = match_frames(frames, ts, x, y, w, tolerance_ns=20 * MS, method="nearest")
    assert (m.gaze_timestamp_ns // MS).tolist() == [0, 5, 10]
    assert m.x_px.tolist() == [0.0, 50.0, 100.0]


def test_frames_outside_tolerance_get_no_gaze_and_no_point() -> None:
    ts, x, y, w = gaze_arrays([100, 105, 200])
    frames = (np.array([50.0, 103.0, 150.0, 260.0]) * MS).astype(np.int64)
    m = match_frames(frames, ts, x, y, w, tolerance_ns=10 * MS, method="interpolate")
    assert m.status.tolist() == [STATUS_NO_GAZE, STATUS_OK, STATUS_NO_GAZE, STATUS_NO_GAZE]
    assert np.isnan(m.x_px[[0, 2, 3]]).all()
    # Only one neighbour in tolerance: nearest, not an interpolation across the 95 ms gap.
    m = match_frames(np.array([110 * MS]), ts, x, y, w, 10 * MS, "interpolate")
    assert m.status[0] == STATUS_OK and m.gaze_timestamp_ns[0] == 105 * MS


def test_not_worn_is_marked_and_interpolation_needs_both_worn() -> None:
    ts, x, y, w = gaze_arrays([0, 5, 10, 15], worn=[True, True, False, False])
    frames = (np.array([2.0, 7.0, 12.0]) * MS).astype(np.int64)
    m = match_frames(frames, ts, x, y, w, tolerance_ns=20 * MS, method="interpolate")
    assert m.status.tolist() == [STATUS_OK, STATUS_NOT_WORN, STATUS_NOT_WORN]


def test_empty_gaze_matches_nothing() -> None:
    empty = np.zeros(0, dtype=np.int64)
    m = match_frames(np.array([5]), empty, empty * 1.0, empty * 1.0, empty > 0, MS, "nearest")
    assert m.status.tolist() == [STATUS_NO_GAZE]


def test_gaze_buffer_wraps_and_keeps_the_newest_samples_in_order() -> None:
    buffer = GazeBuffer(capacity=8)
    for i in range(37):
        buffer.append(GazeSample(i * 5 * MS, float(i), 0.0, True))
    assert len(buffer) == 8
    assert buffer.newest_ns == 36 * 5 * MS
    m = buffer.match(np.array([29 * 5 * MS, 36 * 5 * MS, 28 * 5 * MS - MS]), MS // 2, "nearest")
    assert m.status.tolist() == [STATUS_OK, STATUS_OK, STATUS_NO_GAZE]  # sample 27 is gone
    assert m.x_px[:2].tolist() == [29.0, 36.0]


def test_gaze_buffer_drops_and_counts_samples_out_of_order() -> None:
    buffer = GazeBuffer(capacity=8)
    for t in (10, 20, 15, 20, 30):
        buffer.append(GazeSample(t * MS, float(t), 0.0, True))
    assert len(buffer) == 3 and buffer.out_of_order == 2


def test_matcher_holds_a_frame_until_the_gaze_after_it_arrives() -> None:
    matcher = FrameMatcher(tolerance_ns=20 * MS)
    assert matcher.push_gaze(GazeSample(0, 0.0, 0.0, True)) == []
    assert matcher.push_frame(frame(3.0)) == []  # gaze after t=3 ms not here yet
    done = matcher.push_gaze(GazeSample(5 * MS, 50.0, 0.0, True))
    assert len(done) == 1 and done[0].status == "ok"
    assert done[0].gaze_x_px == pytest.approx(30.0)


def test_matcher_gives_up_waiting_once_a_newer_frame_is_past_tolerance() -> None:
    matcher = FrameMatcher(tolerance_ns=20 * MS)
    matcher.push_gaze(GazeSample(0, 0.0, 0.0, True))
    assert matcher.push_frame(frame(10.0, 0)) == []
    done = matcher.push_frame(frame(40.0, 1))  # the gaze stream stalled
    assert [m.frame.index for m in done] == [0]
    assert done[0].status == "ok" and done[0].gaze_timestamp_ns == 0  # nearest, 10 ms away
    assert [(m.frame.index, m.status) for m in matcher.flush()] == [(1, "no_gaze")]


def test_matcher_bounds_frames_waiting_for_gaze() -> None:
    matcher = FrameMatcher(tolerance_ns=10_000 * MS, max_pending=4)
    released = []
    for i in range(10):
        released += matcher.push_frame(frame(float(i), i))
    assert [m.frame.index for m in released] == list(range(6))
    assert all(m.status == "no_gaze" for m in released)


def test_matching_error_on_real_neon_gaze_is_within_half_a_sample() -> None:
    if not NEON_DEMO.is_dir():
        missing(f"{NEON_DEMO} is missing")
    import pupil_labs.neon_recording as nr

    gaze = nr.open(NEON_DEMO).gaze
    ts = np.asarray(gaze.time, dtype=np.int64)
    xy = np.asarray(gaze.point, dtype=np.float64)
    frames = np.fromfile(NEON_DEMO / SCENE_TIME, dtype="<i8")
    m = match_frames(frames, ts, xy[:, 0], xy[:, 1], np.ones(ts.size, bool), 20 * MS, "nearest")
    ok = m.status == STATUS_OK
    # The scene camera starts 0.78 s before the gaze: those frames have no gaze.
    assert ok.sum() == np.count_nonzero((frames >= ts[0] - 20 * MS) & (frames <= ts[-1]))
    inside = ok & (frames >= ts[0]) & (frames <= ts[-1])
    error_ns = np.abs(m.gaze_timestamp_ns[inside] - frames[inside])
    after = np.searchsorted(ts, frames[inside])
    local_gap_ns = ts[after] - ts[np.maximum(after - 1, 0)]
    # Never more than half the gap between the two samples around the frame ...
    assert (error_ns <= local_gap_ns / 2).all()
    # ... which at Neon's 200 Hz is 2.5 ms, give or take the stream's jitter.
    assert np.median(np.diff(ts)) == pytest.approx(5 * MS, rel=0.01)
    assert np.percentile(error_ns, 99) <= 2.6 * MS
