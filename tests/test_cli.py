"""The command line as a user runs it: outputs on disk, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from gazecam.cli import main

REQUIRED = {
    "frame_timestamp_ns",
    "gaze_timestamp_ns",
    "gaze_x",
    "gaze_y",
    "box",
    "fixation",
    "worn",
}


@pytest.fixture(autouse=True)
def short_synthetic_scene(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GAZECAM_SYNTHETIC_DURATION_S", "6")


def read_jsonl(path: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_crops_writes_images_jsonl_and_contact_sheet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["crops", "synthetic:demo", "--out", str(out)]) == 0
    records = read_jsonl(out / "crops.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert 3 <= len(records) == summary["crops"] <= 6
    assert summary["frames"] == 180 and summary["error"] is None
    for i, r in enumerate(records, start=1):
        assert r.keys() >= REQUIRED and r["index"] == i and r["worn"] is True
        image = cv2.imread(str(out / r["file"]))
        assert image.shape == (448, 448, 3)
        x0, y0, x1, y1 = r["box"]
        assert (x1 - x0, y1 - y0) == (448, 448)
        assert abs((x0 + x1) / 2 - r["gaze_x"]) <= 0.5 or x0 in (0, 1600 - 448)
    assert [r["frame_timestamp_ns"] for r in records] == sorted(
        r["frame_timestamp_ns"] for r in records
    )
    sheet = cv2.imread(str(out / "contact_sheet.jpg"))
    assert sheet.shape[1] == 192 * min(8, len(records))
    assert f"{len(records)} crops from 180 frames" in capsys.readouterr().out


def test_crops_flags_reach_the_settings(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [
        "crops",
        "synthetic:demo",
        "--out",
        str(out),
        "--size",
        "256",
        "--fps",
        "2",
        "--mode",
        "center",
        "--thumbnail",
        "160",
    ]
    assert main(args) == 0
    records = read_jsonl(out / "crops.jsonl")
    assert all(r["box"] == [672, 472, 928, 728] and r["mode"] == "center" for r in records)
    assert cv2.imread(str(out / records[0]["thumbnail"])).shape == (120, 160, 3)
    assert json.loads((out / "summary.json").read_text())["settings"]["keyframes_per_s"] == 2.0


def test_crops_on_the_real_neon_recording(tmp_path: Path, neon_demo: Path) -> None:
    out = tmp_path / "out"
    assert main(["crops", str(neon_demo), "--out", str(out)]) == 0
    records = read_jsonl(out / "crops.jsonl")
    assert len(records) >= 8
    # Source fixations: Neon's own fixation ids (1-based, in onset order).
    assert all(r["fixation"] >= 1 for r in records)
    assert json.loads((out / "summary.json").read_text())["no_gaze"] > 20


def test_existing_output_is_kept_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["crops", "synthetic:demo", "--out", str(out)]) == 0
    before = (out / "crops.jsonl").read_text()
    assert main(["crops", "synthetic:demo", "--out", str(out), "--mode", "full"]) == 2
    assert "already holds" in capsys.readouterr().err
    assert (out / "crops.jsonl").read_text() == before
    assert main(["crops", "synthetic:demo", "--out", str(out), "--mode", "full", "--force"]) == 0
    assert read_jsonl(out / "crops.jsonl")[0]["mode"] == "full"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["crops", "/no/such/recording", "--out", "{tmp}"],
            "/no/such/recording: no such file or folder",
        ),
        (["crops", "synthetic:nope", "--out", "{tmp}"], "synthetic:nope: unknown synthetic scene"),
        (["crops", "ftp://x", "--out", "{tmp}"], "ftp://x: unknown source address"),
        (
            ["crops", "synthetic:demo", "--out", "{tmp}", "--size", "2"],
            "--size / GAZECAM_CROP_SIZE_PX:",
        ),
        (
            ["crops", "synthetic:demo", "--out", "{tmp}", "--fps", "0"],
            "--fps / GAZECAM_KEYFRAMES_PER_S:",
        ),
        (["crops", "{tmp}", "--out", "{tmp}/o"], "neither a Neon recording"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main([a.replace("{tmp}", str(tmp_path)) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gazecam: error: ") and message in err
    assert len(err.splitlines()) == 1


def test_console_script_reports_errors_without_a_traceback(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "gazecam"
    result = subprocess.run(
        [str(script), "crops", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip() == f"gazecam: error: {tmp_path / 'missing'}: no such file or folder"
    )


def test_record_then_replay_the_recording(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GAZECAM_SYNTHETIC_DURATION_S", "2")
    rec = tmp_path / "session"
    assert main(["record", "synthetic:demo", "--out", str(rec), "--pace", "fast"]) == 0
    assert (rec / "gaze.csv").is_file() and (rec / "scene.mp4").is_file()
    out = tmp_path / "crops"
    assert main(["crops", str(rec), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["source_kind"] == "cloud-export" and summary["frames"] == 60
    assert summary["crops"] >= 1
