"""Bad input to the Neon simulator: on its command line one clear line and exit code 2; from a
client, a bad request costs that client its connection and nobody else anything."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pupil_labs.realtime_api.device import Device
from pupil_labs.realtime_api.streaming import receive_gaze_data, receive_video_frames
from pupil_labs.realtime_api.time_echo import TimeOffsetEstimator

from gazecam.cli import main
from tests.simulate.test_neon_simulator import require_gstreamer, simulator

SCENE_VIDEO = "Neon Scene Camera v1 ps1.mp4"


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line the command wrote to stderr."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("gazecam: error: ")
    return lines[0]


@pytest.mark.parametrize("video", [None, b"not a video at all"], ids=["no-video", "garbage-video"])
def test_a_recording_it_cannot_play_is_one_line_and_exit_2(
    neon_demo: Path, tmp_path: Path, video: bytes | None
) -> None:
    """Run as the user runs it (its own process, logging as the command sets it up): FFmpeg's
    own complaint about the garbage is not a second line."""
    recording = tmp_path / "broken"
    shutil.copytree(neon_demo, recording)
    (recording / SCENE_VIDEO).unlink()
    if video is not None:
        (recording / SCENE_VIDEO).write_bytes(video)
    script = Path(sys.executable).parent / "gazecam"
    result = subprocess.run(
        [str(script), "simulate-neon", str(recording), "--port", "0", "--no-mdns"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gazecam: error: {recording}: "), lines


def test_a_folder_that_is_no_recording_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate-neon", str(tmp_path), "--port", "0", "--no-mdns"]) == 2
    assert str(tmp_path) in error_line(capsys)


def test_a_port_in_use_is_one_line_and_exit_2(
    neon_demo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_gstreamer()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["simulate-neon", str(neon_demo), "--port", str(port), "--no-mdns"])
    assert code == 2
    line = error_line(capsys)
    assert f"127.0.0.1:{port}" in line and "port in use" in line


def test_no_gstreamer_python_is_one_line_and_exit_2(
    neon_demo: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GAZECAM_SIM_GST_PYTHON", "/nonexistent/python3")
    assert main(["simulate-neon", str(neon_demo), "--port", "0", "--no-mdns"]) == 2
    assert "/nonexistent/python3" in error_line(capsys)


async def send_garbage(port: int, garbage: bytes) -> asyncio.StreamWriter:
    """Connect, send ``garbage`` and keep the connection open (the caller closes it)."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(garbage)
    await writer.drain()
    return writer


async def test_garbage_from_one_client_does_not_stop_the_others(neon_demo: Path) -> None:
    """Malformed HTTP, garbage on both RTSP ports and a cut-short Time Echo request, their
    connections left open: the realtime client still reads status, the clock, frames and gaze."""
    async with simulator(neon_demo, sim_loop=True) as sim:
        world, gaze = sim.rtsp_ports
        junk = bytes(range(256)) * 4
        writers = [
            await send_garbage(sim.http_port, b"GET /api/status HTTP/9.9\r\nHost\r\n\r\n"),
            await send_garbage(sim.http_port, junk),
            await send_garbage(world, b"DESCRIBE nonsense RTSP/1.0\r\nCSeq: x\r\n\r\n"),
            await send_garbage(world, junk),
            await send_garbage(gaze, junk + b"\r\n\r\n"),
            await send_garbage(sim.time_echo_port, b"\x01\x02\x03"),  # 3 of the 8 bytes
        ]
        # A Time Echo client that sends half a request and goes away.
        (await send_garbage(sim.time_echo_port, b"\x00" * 4)).close()
        await asyncio.sleep(0.5)  # the servers have read it all
        try:
            device = Device("127.0.0.1", sim.http_port)
            try:
                status = await device.get_status()
            finally:
                await device.close()
            assert status.phone.time_echo_port == sim.time_echo_port
            estimate = await TimeOffsetEstimator("127.0.0.1", sim.time_echo_port).estimate(
                number_of_measurements=5
            )
            frames, samples = await asyncio.wait_for(
                received(f"rtsp://127.0.0.1:{world}/?camera=world",
                         f"rtsp://127.0.0.1:{gaze}/?camera=gaze"),
                30,
            )  # fmt: skip
        finally:
            for writer in writers:
                writer.close()
    assert estimate is not None and abs(estimate.time_offset_ms.median) <= 1
    assert frames >= 10 and samples >= 60, (frames, samples)


async def received(world_url: str, gaze_url: str) -> tuple[int, int]:
    """Frames and gaze samples the realtime client yields until it has 10 frames and 60
    samples (the caller times out)."""
    counts = [0, 0]

    async def read_video() -> None:
        async for _ in receive_video_frames(world_url):
            counts[0] += 1
            if counts[0] >= 10:
                return

    async def read_gaze() -> None:
        async for _ in receive_gaze_data(gaze_url):
            counts[1] += 1
            if counts[1] >= 60:
                return

    await asyncio.gather(read_video(), read_gaze())
    return counts[0], counts[1]
