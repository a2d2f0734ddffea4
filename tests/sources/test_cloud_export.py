"""CloudExportSource on small generated exports: values, order, fixations and every bad input."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TypeVar

import av
import numpy as np
import pytest
from numpy.typing import NDArray

from gazecam.errors import SourceError
from gazecam.records import (
    CameraIntrinsics,
    Fixation,
    GazeSample,
    SceneFrame,
    SourceEvent,
    SourceInfo,
    SourceItem,
)
from gazecam.settings import SourceSettings
from gazecam.sources import open_source
from gazecam.sources.base import item_time_ns
from gazecam.sources.cloud_export import CloudExportSource
from gazecam.sources.video import VideoWriter
from tests.sources.test_neon_recording import i420_error

T = TypeVar("T")
WIDTH_PX, HEIGHT_PX = 320, 240
START_NS = 1_700_000_000_000_000_000
FRAME_STEP_NS = 33_333_333  # 30 Hz
GAZE_STEP_NS = 5_000_000  # 200 Hz
FIRST_FRAME_NS = START_NS + 10_000_000
CAMERA_MATRIX = [[200.0, 0.0, 160.0], [0.0, 200.0, 120.0], [0.0, 0.0, 1.0]]
DISTORTION = [0.0] * 8
EVENTS = [(START_NS + 300_000_000, "step.next"), (START_NS + 100_000_000, "recording.begin")]
FIXATION_RUNS = {1: range(10, 30), 2: range(60, 80)}  # fixation id -> gaze sample indices
NOT_WORN = range(30, 40)


STRIPE_PX = WIDTH_PX // 5  # frame i shows i in binary: 5 stripes, black 0 / white 1


def frame_image(index: int) -> NDArray[np.uint8]:
    """Frame ``index`` carries its index as a code that survives H.264 and colour conversion."""
    image = np.zeros((HEIGHT_PX, WIDTH_PX, 3), dtype=np.uint8)
    for bit in range(5):
        if index >> bit & 1:
            image[:, bit * STRIPE_PX : (bit + 1) * STRIPE_PX] = 255
    return image


def frame_code(image: NDArray[np.uint8]) -> int:
    """The index a decoded frame shows, read from the middle of each stripe."""
    middles = [image[:, bit * STRIPE_PX + STRIPE_PX // 2].mean() for bit in range(5)]
    return sum(1 << bit for bit, level in enumerate(middles) if level > 128)


@dataclass
class Export:
    """What was written, to compare the source's output against."""

    folder: Path
    frame_ns: list[int]
    gaze_ns: list[int]
    gaze_x_px: list[float]
    gaze_y_px: list[float]
    worn: list[bool]


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_plain_mp4(path: Path, frames: int) -> None:
    """An ordinary (not fragmented) MP4, whose container knows its frame count."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(30))
        stream.width, stream.height, stream.pix_fmt = WIDTH_PX, HEIGHT_PX, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_image(i), format="bgr24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_export(
    folder: Path,
    *,
    frames: int = 20,
    video_frames: int | None = None,
    plain_mp4: bool = False,
    worn_text: tuple[str, str] = ("1", "0"),
    fixation_ids: bool = True,
    fixations_csv: bool = False,
    info_json: bool = True,
    camera_json: bool = True,
) -> Export:
    """A Cloud export of ``frames`` frames at 30 Hz and 200 Hz gaze spanning the same time."""
    folder.mkdir(parents=True, exist_ok=True)
    frame_ns = [FIRST_FRAME_NS + i * FRAME_STEP_NS for i in range(frames)]
    n_gaze = (frame_ns[-1] - START_NS) // GAZE_STEP_NS + 2
    gaze_ns = [START_NS + i * GAZE_STEP_NS for i in range(n_gaze)]
    x_px = [100.0 + i * 0.5 for i in range(n_gaze)]
    y_px = [50.0 + i * 0.25 for i in range(n_gaze)]
    worn = [i not in NOT_WORN for i in range(n_gaze)]
    fixation_of = {i: fid for fid, run in FIXATION_RUNS.items() for i in run}
    rec = "4f1c-rec"
    write_csv(
        folder / "gaze.csv",
        [
            *("section id", "recording id", "timestamp [ns]", "gaze x [px]", "gaze y [px]"),
            *("worn", "fixation id", "blink id", "azimuth [deg]", "elevation [deg]"),
        ],
        [
            [
                *(rec, rec, gaze_ns[i], x_px[i], y_px[i]),
                worn_text[0] if worn[i] else worn_text[1],
                *(fixation_of.get(i, "") if fixation_ids else "", "", 1.5, -2.5),
            ]
            for i in range(n_gaze)
        ],
    )
    write_csv(
        folder / "world_timestamps.csv",
        ["section id", "recording id", "timestamp [ns]"],
        [[rec, rec, t] for t in frame_ns],
    )
    write_csv(
        folder / "events.csv",
        ["recording id", "timestamp [ns]", "name", "type"],
        [[rec, t, name, "recording"] for t, name in EVENTS],
    )
    if fixations_csv:
        write_csv(
            folder / "fixations.csv",
            [
                *("section id", "recording id", "fixation id", "start timestamp [ns]"),
                *("end timestamp [ns]", "duration [ms]", "fixation x [px]", "fixation y [px]"),
            ],
            [
                [rec, rec, 2, START_NS + 500_000_000, START_NS + 600_000_000, 100, 30.5, 40.5],
                [rec, rec, 1, START_NS + 200_000_000, START_NS + 350_000_000, 150, 10.0, 20.0],
            ],
        )
    if info_json:
        info = {"recording_id": rec, "start_time": START_NS, "duration": 700_000_000}
        (folder / "info.json").write_text(json.dumps(info))
    if camera_json:
        camera = {"camera_matrix": CAMERA_MATRIX, "distortion_coefficients": [DISTORTION]}
        (folder / "scene_camera.json").write_text(json.dumps(camera))
    n_video = frames if video_frames is None else video_frames
    video = folder / "Neon Scene Camera v1 ps1.mp4"
    if plain_mp4:
        write_plain_mp4(video, n_video)
    else:
        with VideoWriter(video, WIDTH_PX, HEIGHT_PX) as writer:
            for i in range(n_video):
                writer.write(frame_image(i))
    return Export(folder, frame_ns, gaze_ns, x_px, y_px, worn)


async def read_all(
    source: CloudExportSource,
) -> tuple[SourceInfo, list[SourceItem], list[NDArray[np.uint8]]]:
    """Open, stream and close; also decode every frame while the stream runs (and check its
    I420 pixels are the same)."""
    info = await source.open()
    items: list[SourceItem] = []
    pixels: list[NDArray[np.uint8]] = []
    try:
        async for item in source.stream():
            items.append(item)
            if isinstance(item, SceneFrame):
                pixels.append(item.bgr())
                assert i420_error(item) < 2
    finally:
        await source.close()
    return info, items, pixels


def of_type(items: list[SourceItem], kind: type[T]) -> list[T]:
    return [item for item in items if isinstance(item, kind)]


def fast() -> SourceSettings:
    return SourceSettings(pace="fast")


async def test_info_items_and_frames(tmp_path: Path) -> None:
    export = write_export(tmp_path / "export")
    source = CloudExportSource(export.folder, fast())
    info, items, pixels = await read_all(source)

    assert info == SourceInfo(
        uri=str(export.folder),
        kind="cloud-export",
        frame_width_px=WIDTH_PX,
        frame_height_px=HEIGHT_PX,
        camera=CameraIntrinsics.from_raw(np.array(CAMERA_MATRIX), np.array(DISTORTION)),
        gaze_rate_hz=pytest.approx(200.0),  # type: ignore[arg-type]
        frame_count=20,
        start_ns=START_NS,
        duration_ns=700_000_000,
        has_fixations=True,
    )
    times = [item_time_ns(item) for item in items]
    assert times == sorted(times)

    gaze = of_type(items, GazeSample)
    assert [g.timestamp_ns for g in gaze] == export.gaze_ns
    assert [g.x_px for g in gaze] == export.gaze_x_px
    assert [g.y_px for g in gaze] == export.gaze_y_px
    assert [g.worn for g in gaze] == export.worn
    assert source.stats.gaze_in == len(export.gaze_ns)

    frames = of_type(items, SceneFrame)
    assert [f.timestamp_ns for f in frames] == export.frame_ns
    assert [f.index for f in frames] == list(range(20))
    assert {(f.width_px, f.height_px) for f in frames} == {(WIDTH_PX, HEIGHT_PX)}
    assert source.stats.frames_in == 20
    for i, image in enumerate(pixels):
        assert image.shape == (HEIGHT_PX, WIDTH_PX, 3) and image.dtype == np.uint8
        assert frame_code(image) == i

    assert of_type(items, SourceEvent) == [SourceEvent(t, name) for t, name in sorted(EVENTS)]


async def test_info_without_optional_files(tmp_path: Path) -> None:
    export = write_export(
        tmp_path / "export", info_json=False, camera_json=False, fixation_ids=False
    )
    (export.folder / "events.csv").unlink()
    info, items, _ = await read_all(CloudExportSource(export.folder, fast()))
    assert info.camera is None
    assert info.start_ns == START_NS  # the first gaze sample comes before the first frame
    assert info.duration_ns == export.gaze_ns[-1] - START_NS
    assert not info.has_fixations
    assert of_type(items, Fixation) == []
    assert of_type(items, SourceEvent) == []


@pytest.mark.parametrize("worn_text", [("1", "0"), ("1.0", "0.0"), ("True", "False")])
async def test_worn_formats(tmp_path: Path, worn_text: tuple[str, str]) -> None:
    export = write_export(tmp_path / "export", frames=3, worn_text=worn_text)
    _, items, _ = await read_all(CloudExportSource(export.folder, fast()))
    assert [g.worn for g in of_type(items, GazeSample)] == export.worn


async def test_fixations_from_gaze_fixation_ids(tmp_path: Path) -> None:
    export = write_export(tmp_path / "export")
    _, items, _ = await read_all(CloudExportSource(export.folder, fast()))
    expected = [
        Fixation(
            export.gaze_ns[run[0]],
            export.gaze_ns[run[-1]],
            pytest.approx(float(np.mean([export.gaze_x_px[i] for i in run]))),  # type: ignore[arg-type]
            pytest.approx(float(np.mean([export.gaze_y_px[i] for i in run]))),  # type: ignore[arg-type]
        )
        for run in FIXATION_RUNS.values()
    ]
    assert of_type(items, Fixation) == expected


async def test_fixations_from_fixations_csv(tmp_path: Path) -> None:
    export = write_export(tmp_path / "export", fixations_csv=True)
    info, items, _ = await read_all(CloudExportSource(export.folder, fast()))
    assert info.has_fixations
    assert of_type(items, Fixation) == [  # sorted by start; gaze.csv's fixation ids unused
        Fixation(START_NS + 200_000_000, START_NS + 350_000_000, 10.0, 20.0),
        Fixation(START_NS + 500_000_000, START_NS + 600_000_000, 30.5, 40.5),
    ]


async def test_open_source_picks_cloud_export(tmp_path: Path) -> None:
    export = write_export(tmp_path / "export", frames=2)
    source = open_source(str(export.folder), fast())
    assert isinstance(source, CloudExportSource)
    assert (await source.open()).frame_count == 2


def _replace_in(name: str, old: str, new: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / name
        path.write_text(path.read_text().replace(old, new, 1))

    return edit


def _swap_data_rows(name: str, a: int, b: int) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / name
        lines = path.read_text().splitlines(keepends=True)
        lines[a], lines[b] = lines[b], lines[a]
        path.write_text("".join(lines))

    return edit


def _set_cell(name: str, line: int, column: int, value: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / name
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        rows[line - 1][column] = value
        write_csv(path, rows[0], rows[1:])

    return edit


def _truncate_row(name: str, line: int) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / name
        lines = path.read_text().splitlines(keepends=True)
        lines[line - 1] = ",".join(lines[line - 1].split(",")[:3]) + "\n"
        path.write_text("".join(lines))

    return edit


def _keep_header_only(name: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / name
        path.write_text(path.read_text().splitlines(keepends=True)[0])

    return edit


def _write(name: str, text: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        (folder / name).write_text(text)

    return edit


def _delete(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def _delete_video(folder: Path) -> None:
    next(folder.glob("*.mp4")).unlink()


def _add_second_video(folder: Path) -> None:
    (folder / "other.mp4").write_bytes(next(folder.glob("*.mp4")).read_bytes())


def _corrupt_video(folder: Path) -> None:
    next(folder.glob("*.mp4")).write_bytes(b"\x00not an mp4" * 100)


BAD_INPUTS: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "no gaze.csv": (_delete("gaze.csv"), ["gaze.csv", "missing file"]),
    "no world_timestamps.csv": (
        _delete("world_timestamps.csv"),
        ["world_timestamps.csv", "missing file"],
    ),
    "missing column": (
        _replace_in("gaze.csv", "gaze x [px]", "gaze_x"),
        ["gaze.csv", "missing column 'gaze x [px]'"],
    ),
    "missing world column": (
        _replace_in("world_timestamps.csv", "timestamp [ns]", "time"),
        ["world_timestamps.csv", "missing column 'timestamp [ns]'"],
    ),
    "bad gaze x": (
        _set_cell("gaze.csv", 5, 3, "12,5px"),
        ["gaze.csv line 5", "column 'gaze x [px]': '12,5px' is not a finite number"],
    ),
    "bad timestamp": (
        _set_cell("gaze.csv", 3, 2, "1.7e18"),
        ["gaze.csv line 3", "column 'timestamp [ns]'"],
    ),
    "bad worn": (_set_cell("gaze.csv", 7, 5, "maybe"), ["gaze.csv line 7", "column 'worn'"]),
    "nan gaze": (_set_cell("gaze.csv", 4, 4, "nan"), ["gaze.csv line 4", "column 'gaze y [px]'"]),
    "bad world timestamp": (
        _set_cell("world_timestamps.csv", 6, 2, "later"),
        ["world_timestamps.csv line 6", "column 'timestamp [ns]'"],
    ),
    "short row": (_truncate_row("gaze.csv", 9), ["gaze.csv line 9", "3 fields"]),
    "empty gaze.csv": (_keep_header_only("gaze.csv"), ["gaze.csv", "no gaze samples"]),
    "blank gaze.csv": (_write("gaze.csv", ""), ["gaze.csv", "empty file"]),
    "world out of order": (
        _swap_data_rows("world_timestamps.csv", 4, 5),
        ["world_timestamps.csv line 6", "out of order"],
    ),
    "gaze out of order": (
        _swap_data_rows("gaze.csv", 10, 11),
        ["gaze.csv line 12", "out of order"],
    ),
    "no video": (_delete_video, ["export", "exactly one scene .mp4", "found none"]),
    "two videos": (_add_second_video, ["export", "exactly one scene .mp4", "other.mp4"]),
    "corrupt video": (_corrupt_video, ["Neon Scene Camera v1 ps1.mp4", "cannot open the video"]),
    "bad info.json": (_write("info.json", "{start_time: 1"), ["info.json", "cannot read"]),
    "bad start_time": (
        _write("info.json", '{"start_time": "yesterday"}'),
        ["info.json", "'start_time'"],
    ),
    "camera without distortion": (
        _write("scene_camera.json", json.dumps({"camera_matrix": CAMERA_MATRIX})),
        ["scene_camera.json", "missing key 'distortion_coefficients'"],
    ),
    "camera 2x3": (
        _write(
            "scene_camera.json",
            json.dumps({"camera_matrix": CAMERA_MATRIX[:2], "distortion_coefficients": DISTORTION}),
        ),
        ["scene_camera.json", "'camera_matrix'"],
    ),
    "events without name": (
        _replace_in("events.csv", "name", "label"),
        ["events.csv", "missing column 'name'"],
    ),
    "bad event time": (
        _set_cell("events.csv", 2, 1, "soon"),
        ["events.csv line 2", "column 'timestamp [ns]'"],
    ),
    # Integers beyond int64 (stored as numpy int64), negative times and non-finite ids.
    "gaze time beyond int64": (
        _set_cell("gaze.csv", 4, 2, "99999999999999999999"),
        ["gaze.csv line 4", "column 'timestamp [ns]': '99999999999999999999' is not a timestamp"],
    ),
    "negative gaze time": (
        _set_cell("gaze.csv", 2, 2, "-5"),
        ["gaze.csv line 2", "column 'timestamp [ns]': '-5' is not a timestamp"],
    ),
    "world time beyond int64": (
        _set_cell("world_timestamps.csv", 9, 2, "9223372036854775808"),
        ["world_timestamps.csv line 9", "column 'timestamp [ns]'", "is not a timestamp"],
    ),
    "event time beyond int64": (
        _set_cell("events.csv", 3, 1, "1" * 30),
        ["events.csv line 3", "column 'timestamp [ns]'", "is not a timestamp"],
    ),
    "fixation id beyond int64": (
        _set_cell("gaze.csv", 12, 6, "1e30"),
        ["gaze.csv line 12", "column 'fixation id': '1e30' is not an integer id"],
    ),
    "fixation id inf": (
        _set_cell("gaze.csv", 12, 6, "inf"),
        ["gaze.csv line 12", "column 'fixation id': 'inf' is not an integer id"],
    ),
    "fixation id nan": (
        _set_cell("gaze.csv", 12, 6, "nan"),
        ["gaze.csv line 12", "column 'fixation id': 'nan' is not an integer id"],
    ),
    "start_time beyond int64": (
        _write("info.json", '{"start_time": 99999999999999999999}'),
        ["info.json", "'start_time' is 99999999999999999999, expected integer nanoseconds"],
    ),
    "negative duration": (
        _write("info.json", '{"duration": -1}'),
        ["info.json", "'duration' is -1"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
async def test_bad_input_is_one_line_source_error(tmp_path: Path, case: str) -> None:
    export = write_export(tmp_path / "export", frames=8)
    edit, expected = BAD_INPUTS[case]
    edit(export.folder)
    with pytest.raises(SourceError) as caught:
        await CloudExportSource(export.folder, fast()).open()
    message = str(caught.value)
    assert "\n" not in message
    for part in expected:
        assert part in message


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        (6, "left", r"line 3: column 'fixation x \[px\]': 'left' is not a finite number"),
        (3, "99999999999999999999", r"line 3: column 'start timestamp \[ns\]': .* not a timestamp"),
        (4, "-1", r"line 3: column 'end timestamp \[ns\]': '-1' is not a timestamp"),
    ],
)
async def test_bad_fixations_csv(tmp_path: Path, column: int, value: str, message: str) -> None:
    export = write_export(tmp_path / "export", frames=4, fixations_csv=True)
    _set_cell("fixations.csv", 3, column, value)(export.folder)
    with pytest.raises(SourceError, match=r"fixations\.csv " + message):
        await CloudExportSource(export.folder, fast()).open()


async def test_video_shorter_than_timestamps_known_up_front(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    export = write_export(tmp_path / "export", frames=20, video_frames=15, plain_mp4=True)
    info, items, pixels = await read_all(CloudExportSource(export.folder, fast()))
    assert caplog.messages == [
        f"{export.folder / 'Neon Scene Camera v1 ps1.mp4'}: the last 5 frames (0.17 s) do not "
        "decode; replaying up to 0.48 s"
    ]
    assert info.frame_count == 15
    assert [f.timestamp_ns for f in of_type(items, SceneFrame)] == export.frame_ns[:15]
    assert [frame_code(p) for p in pixels] == list(range(15))
    # Nothing after the last good frame: gaze, fixations and events end with the video.
    assert max(item_time_ns(i) for i in items) < export.frame_ns[15]
    assert [g.timestamp_ns for g in of_type(items, GazeSample)] == [
        t for t in export.gaze_ns if t < export.frame_ns[15]
    ]


async def test_video_longer_than_timestamps_known_up_front(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    export = write_export(tmp_path / "export", frames=5, video_frames=8, plain_mp4=True)
    info, items, pixels = await read_all(CloudExportSource(export.folder, fast()))
    assert "more frames than the 5 that world_timestamps.csv lists" in caplog.text
    assert info.frame_count == 5 and [frame_code(p) for p in pixels] == list(range(5))
    assert [g.timestamp_ns for g in of_type(items, GazeSample)] == export.gaze_ns


async def test_video_shorter_than_timestamps_found_while_decoding(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A fragmented MP4 does not tell its frame count, so the shortfall shows only on decoding.
    export = write_export(tmp_path / "export", frames=20, video_frames=12)
    source = CloudExportSource(export.folder, fast())
    info, items, pixels = await read_all(source)
    assert info.frame_count == 20
    assert "ps1.mp4: the last 8 frames (0.27 s) do not decode; replaying up to 0.38 s" in (
        caplog.text
    )
    assert [f.timestamp_ns for f in of_type(items, SceneFrame)] == export.frame_ns[:12]
    assert [frame_code(p) for p in pixels] == list(range(12))
    assert max(item_time_ns(i) for i in items) < export.frame_ns[12]


async def test_video_cut_off_mid_write_replays_to_its_last_whole_frame(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A fragmented MP4 whose last fragment is cut off in the middle of its frame data, as a
    # recording killed while writing it leaves it: its index promises more than there is.
    export = write_export(tmp_path / "export", frames=20)
    video = export.folder / "Neon Scene Camera v1 ps1.mp4"
    with av.open(str(video)) as container:
        offsets = [p.pos for p in container.demux(video=0) if p.size]
    cut_at = sorted(offsets)[-4] + 10  # inside the 4th-last packet in file order
    data = video.read_bytes()
    video.write_bytes(data[:cut_at])
    info, items, pixels = await read_all(CloudExportSource(export.folder, fast()))
    frames = of_type(items, SceneFrame)
    assert 10 <= len(frames) < 20 and info.frame_count == 20
    assert [frame_code(p) for p in pixels] == list(range(len(frames)))
    assert f"the last {20 - len(frames)} frames" in caplog.text
    assert "the video is damaged from here on" in caplog.text


async def test_cut_short_last_line_is_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A recording killed mid-write: each CSV's last line stops in the middle, with no line end.
    export = write_export(tmp_path / "export", frames=10)
    for name, keep in (("gaze.csv", 40), ("world_timestamps.csv", 30)):
        path = export.folder / name
        text = path.read_text()
        path.write_text(text[: text.rstrip("\n").rindex("\n") + 1 + keep])
    _, items, _ = await read_all(CloudExportSource(export.folder, fast()))
    assert [g.timestamp_ns for g in of_type(items, GazeSample)] == export.gaze_ns[:-1]
    assert [f.timestamp_ns for f in of_type(items, SceneFrame)] == export.frame_ns[:9]
    assert "gaze.csv line" in caplog.text and "world_timestamps.csv line" in caplog.text
    assert caplog.text.count("it is the last line and is cut short: left out") == 2


async def test_bad_last_line_with_a_line_end_is_still_an_error(tmp_path: Path) -> None:
    export = write_export(tmp_path / "export", frames=10)
    path = export.folder / "gaze.csv"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:40] + "\n")
    with pytest.raises(SourceError, match=rf"gaze\.csv line {len(lines)}: 4 fields"):
        await CloudExportSource(export.folder, fast()).open()


@pytest.mark.parametrize(
    ("start_ns", "says"),
    [(START_NS - 3 * 3600 * 10**9, "10800.0 s before"), (START_NS + 10**15, "1000000.0 s after")],
)
async def test_start_time_far_from_the_data_is_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, start_ns: int, says: str
) -> None:
    export = write_export(tmp_path / "export", frames=5)
    info_json = export.folder / "info.json"
    info_json.write_text(json.dumps({"start_time": start_ns, "duration": 700_000_000}))
    info = await CloudExportSource(export.folder, fast()).open()
    assert info.start_ns == START_NS  # the first gaze sample
    assert info.duration_ns == max(export.gaze_ns[-1], export.frame_ns[-1]) - START_NS
    assert caplog.messages == [
        f"{info_json}: 'start_time' is {says} the first data timestamp; using the first data "
        "timestamp as the start"
    ]


async def test_start_time_near_the_data_is_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    export = write_export(tmp_path / "export", frames=5)
    (export.folder / "info.json").write_text(json.dumps({"start_time": START_NS - 2 * 10**9}))
    info = await CloudExportSource(export.folder, fast()).open()
    assert info.start_ns == START_NS - 2 * 10**9 and not caplog.messages


async def test_close_mid_stream_and_twice(tmp_path: Path) -> None:
    export = write_export(tmp_path / "export", frames=10)
    source = CloudExportSource(export.folder, fast())
    await source.open()
    stream = source.stream()
    async for item in stream:
        if isinstance(item, SceneFrame):
            break
    await source.close()
    await source.close()
    assert source.stats.frames_in == 1
