"""The command line as a user runs it: outputs on disk, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from subprocess import PIPE

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
    assert summary["off_frame"] == 0  # the synthetic gaze stays on the frame
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
    out_line = capsys.readouterr().out
    assert f"{len(records)} crops from 180 frames" in out_line
    assert "0 with gaze off the frame" in out_line


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


@pytest.mark.parametrize(
    ("variable", "args", "where"),
    [
        # crops has flags for both settings; ask has none (its replay runs at full speed).
        ("GAZECAM_PACE", ["crops", "synthetic:demo", "--out", "{tmp}"], "--pace / GAZECAM_PACE"),
        (
            "GAZECAM_KEYFRAMES_PER_S",
            ["crops", "synthetic:demo", "--out", "{tmp}"],
            "--fps / GAZECAM_KEYFRAMES_PER_S",
        ),
        (
            "GAZECAM_KEYFRAMES_PER_S",
            ["ask", "synthetic:demo", "what step am I on?", "--at", "1"],
            "GAZECAM_KEYFRAMES_PER_S",
        ),
    ],
)
def test_a_bad_environment_setting_names_the_flag_only_where_the_command_has_it(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    args: list[str],
    where: str,
) -> None:
    monkeypatch.setenv(variable, "0" if variable.endswith("_S") else "bad")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gazecam: error: {where}: ") and len(err.splitlines()) == 1


def test_unparsable_environment_setting_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GAZECAM_MODEL_PATH", "/models")  # a list setting takes JSON
    assert main(["models", "list"]) == 2
    assert capsys.readouterr().err == (
        'gazecam: error: error parsing value for field "model_path" from source '
        '"EnvSettingsSource" (Expecting value: line 1 column 1 (char 0))\n'
    )


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


BAD_ADDRESSES = {
    "neon://": "neon://: not a Neon address (no host;",
    "neon://:8080": "neon://:8080: not a Neon address (no host;",
    "neon://glasses:0": "port '0' is not a number from 1 to 65535",
    "neon://glasses:65536": "port '65536' is not a number from 1 to 65535",
    "neon://glasses:http": "port 'http' is not a number from 1 to 65535",
    "neon://auto:8080": "neon://auto takes no port",
    "neon://-glasses": "'-glasses' is not a host name or IPv4 address",
    "neon://two words": "'two words' is not a host name or IPv4 address",
    "neon://glasses/path": "expected neon://auto or neon://HOST[:PORT]",
    "synthetic:": "synthetic:: unknown synthetic scene (known: demo, demo-notext)",
    "synthetic:nope": "synthetic:nope: unknown synthetic scene (known: demo, demo-notext)",
    "rtsp://camera": "rtsp://camera: unknown source address",
    "": "empty source address",
    "/no/such/recording": "/no/such/recording: no such file or folder",
    "{tmp}": "neither a Neon recording",
}
COMMANDS = {
    "serve": ["serve", "--source", "{address}", "--port", "0"],
    "record": ["record", "{address}", "--out", "{tmp}/rec"],
    "crops": ["crops", "{address}", "--out", "{tmp}/crops"],
    "ask": ["ask", "{address}", "what step am I on?", "--at", "1"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("address", list(BAD_ADDRESSES))
def test_malformed_address_is_refused_before_anything_starts(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    address: str,
) -> None:
    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("started despite a malformed address")

    # Nothing may start: no models loaded, no service bound, no source opened.
    monkeypatch.setattr("gazecam.assist.assistant.load_engines", must_not_run)
    monkeypatch.setattr("gazecam.server.app.serve", must_not_run)
    monkeypatch.setattr("gazecam.cli.open_source", must_not_run)
    address = address.replace("{tmp}", str(tmp_path))
    args = [
        a.replace("{address}", address).replace("{tmp}", str(tmp_path)) for a in COMMANDS[command]
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("gazecam: error: ") and len(err.splitlines()) == 1
    assert BAD_ADDRESSES[address if address != str(tmp_path) else "{tmp}"] in err
    assert not (tmp_path / "rec").exists() and not (tmp_path / "crops").exists()


def test_serve_with_a_malformed_neon_address_exits_at_once(tmp_path: Path) -> None:
    # As a user runs it: before this was refused, the service started and retried forever.
    result = subprocess.run(
        [str(Path(sys.executable).parent / "gazecam"), "serve", "--source", "neon://"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("gazecam: error: neon://: not a Neon address (no host;")


# --- record ended by a signal, or killed --------------------------------------------------

GAZECAM = Path(sys.executable).parent / "gazecam"


@pytest.fixture
def recording(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """``gazecam record synthetic:demo --pace realtime`` as a process of its own (8 s scene),
    killed at the end of the test if it still runs."""
    rec = tmp_path / "rec"
    env = {**os.environ, "GAZECAM_SYNTHETIC_DURATION_S": "8"}
    args = [str(GAZECAM), "record", "synthetic:demo", "--out", str(rec), "--pace", "realtime"]
    process = subprocess.Popen(args, env=env, stdout=PIPE, stderr=PIPE, text=True)
    yield process, rec
    if process.poll() is None:
        process.kill()
        process.communicate()


def wait_until_recorded(process: subprocess.Popen[str], rec: Path, seconds: float) -> None:
    """Until info.json (rewritten at each flush) says ``seconds`` of data are on disk."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if json.loads((rec / "info.json").read_text())["duration"] >= seconds * 1e9:
                return
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"the recording did not reach {seconds} s: {process.communicate()}")


def replayed_frames(rec: Path, out: Path) -> int:
    assert main(["crops", str(rec), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["source_kind"] == "cloud-export" and summary["error"] is None
    return int(summary["frames"])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_stop_signal_finishes_the_recording(
    tmp_path: Path, recording: tuple[subprocess.Popen[str], Path], signum: signal.Signals
) -> None:
    process, rec = recording
    wait_until_recorded(process, rec, 1.0)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    found = re.fullmatch(
        rf"recorded (\d+) frames .* -> {rec} \(stopped by {signum.name}\)\n", stdout
    )
    assert found is not None, stdout
    frames = int(found[1])
    assert 30 <= frames < 240  # at least the 1 s waited for, less than the whole scene
    # Finished cleanly: every frame replays, nothing is cut short.
    assert replayed_frames(rec, tmp_path / "crops") == frames
    assert "warning" not in stderr


def test_killed_recording_replays_up_to_its_last_flush(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    recording: tuple[subprocess.Popen[str], Path],
) -> None:
    process, rec = recording
    wait_until_recorded(process, rec, 2.0)
    listed = len((rec / "world_timestamps.csv").read_text().splitlines()) - 1
    assert process.poll() is None, "the recording ended before it was killed"
    process.kill()  # SIGKILL: no chance to finish anything
    process.communicate(timeout=60)
    # At 2 s the first one-second fragment (30 frames) is on disk; a frame listed then is
    # in the video.
    assert listed >= 30
    assert listed <= replayed_frames(rec, tmp_path / "crops") < 240
    # A fragment written after the last flush of world_timestamps.csv may be there too: said so.
    err = capsys.readouterr().err
    assert all(
        line.startswith("gazecam: warning: ") and "world_timestamps.csv lists" in line
        for line in err.splitlines()
    ), err


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_early_ctrl_c_claims_nothing_it_did_not_write(
    tmp_path: Path, recording: tuple[subprocess.Popen[str], Path]
) -> None:
    process, rec = recording
    # Once its stop handlers are in (SIGTERM is caught), the recording is being set up.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        caught = int(
            re.findall(r"SigCgt:\s*(\w+)", Path(f"/proc/{process.pid}/status").read_text())[0], 16
        )
        if caught >> (signal.SIGTERM - 1) & 1:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    if process.returncode == 130:  # before the source opened: nothing written, nothing claimed
        assert stderr.strip().endswith("SIGINT before the recording began; nothing was written")
        assert not rec.exists()
    else:  # the recording had begun: the folder holds what it says, and replays
        assert process.returncode == 0 and "(stopped by SIGINT)" in stdout
        frames = int(re.findall(r"recorded (\d+) frames", stdout)[0])
        assert replayed_frames(rec, tmp_path / "crops") == frames
