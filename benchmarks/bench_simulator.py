"""Benchmark of the Neon simulator: its throughput on one core, and live latency through it.

    .venv/bin/python benchmarks/bench_simulator.py [--out report.json] [--rates 1,4] [--asks 6]

The neon-demo recording (real 200 Hz gaze and scene timestamps) gets a rendered 1600×1200
scene video, as the tests give it (``tests.conftest.render_scene_video``), in a temporary folder.

1. Throughput: ``gazecam simulate-neon --loop --rate R`` runs as its own process pinned to one
   CPU (its GStreamer child inherits the pin); Pupil Labs' realtime client, unmodified, reads
   both RTSP streams in this process (on the other CPUs where there are any). Over a window,
   frames and gaze samples received per wall second, relative to the recording's own rates,
   are the simulator's speed as a multiple of real time (it cannot exceed R), once for each
   way of sending the scene video (``--video``: the recording's H.264 as it is, and
   re-encoded with ``--reencode``). The CPU time the simulator and its child spent per second
   of the recording they delivered says where the time goes and how fast one core could go
   (recording seconds per CPU second).
2. Live latency, at real time: ``neon://`` through the simulator into the capture pipeline.
   Glass-to-crop is a keyframe crop's availability less its frame's capture time (the device
   timestamp mapped to local time through the Time Echo clock offset, as ``NeonLiveSource``
   does), with its parts: the frame's arrival at the consumer (RTP, the client's H.264
   decoding), its conversion to BGR, and the crop. H.264 decoding is also timed on its own
   (PyAV on the same video). Glass-to-answer asks the demo task's assistant (the text engine)
   a question the moment a keyframe's crop is available, and times the finished answer from
   that frame's capture.
"""
# ruff: noqa: E402

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import cpus, fmt, machine_info, pct, write_report  # benchmarks/common.py

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.conftest renders the scene video as the tests do

from simulator_latency import MET, h264_decode_ms, live_latency, print_latency

from tests.conftest import NEON_DEMO, copy_recording, render_scene_video

TARGET_REALTIME = 2.0


def recording_with_video(tmp: Path) -> Path:
    """The neon-demo recording with its scene video rendered (about 10 s)."""
    if not NEON_DEMO.is_dir():
        sys.exit(f"bench_simulator: {NEON_DEMO} is missing (../shared belongs beside the repo)")
    recording = copy_recording(tmp / "neon-demo")
    render_scene_video(recording)
    return recording


def recording_rates(recording: Path) -> tuple[float, float, float]:
    """Scene frames and gaze samples per second of the recording, and its length in s."""
    import numpy as np

    frames = np.fromfile(recording / "Neon Scene Camera v1 ps1.time", dtype="<i8")
    gaze = np.fromfile(recording / "gaze_200hz.time", dtype="<i8")
    length_s = (max(frames[-1], gaze[-1]) - min(frames[0], gaze[0])) / 1e9
    return frames.size / length_s, gaze.size / length_s, length_s


# --- 1. throughput on one core ---------------------------------------------------------------


def own_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The direct children of a process."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cpu_split(pid: int) -> tuple[float, float]:
    """CPU seconds of the simulator's own process (the player) and of its RTSP child."""
    return own_cpu_s(pid), sum(own_cpu_s(child) for child in child_pids(pid))


class Simulator:
    """``gazecam simulate-neon`` (the package in ``tree``) as a subprocess, pinned to ``cpu``,
    on a free port."""

    def __init__(
        self, recording: Path, rate: float, cpu: int | None, tree: Path, reencode: bool = False
    ) -> None:
        self.env = {**os.environ, "PYTHONPATH": str(tree)}
        self.args = [
            sys.executable, "-m", "gazecam.cli", "simulate-neon", str(recording),
            "--port", "0", "--no-mdns", "--loop", "--rate", str(rate),
            *(["--reencode"] if reencode else []),
        ]  # fmt: skip
        self.cpu = cpu
        self.process: subprocess.Popen[str] | None = None
        self.port = 0
        self.video_mode = ""  # how it sends the scene video, as it says

    def __enter__(self) -> Simulator:
        cpu = self.cpu
        # Its output goes to a file: a pipe nobody reads would stall it once full.
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(
            self.args,
            stderr=self.log,
            text=True,
            env=self.env,
            preexec_fn=None if cpu is None else lambda: os.sched_setaffinity(0, {cpu}),
        )
        deadline = time.monotonic() + 60
        while (found := re.search(r"at neon://[^:]+:(\d+)", self.output())) is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                output = self.output()  # __exit__ closes the log
                self.__exit__()
                raise RuntimeError(f"simulate-neon did not start: {output}")
            time.sleep(0.1)
        self.port = int(found[1])
        mode = re.search(r"scene video (.*)\)$", self.output(), re.MULTILINE)
        self.video_mode = mode[1] if mode else "?"
        return self

    def output(self) -> str:
        """What it has written to stderr so far."""
        self.log.seek(0)
        return self.log.read()

    def __exit__(self, *_: object) -> None:
        assert self.process is not None
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if "Traceback" in self.output():
            print(self.output(), file=sys.stderr)
        self.log.close()


async def receive_for(port: int, pid: int, warmup_s: float, window_s: float) -> dict[str, Any]:
    """Read both streams with the realtime client; count what arrives within the window, how
    late (receive time less device timestamp, the same machine's clock), and the CPU seconds
    the simulator (pid) and its child spent in the window."""
    from pupil_labs.realtime_api.device import Device
    from pupil_labs.realtime_api.streaming import RTSPRawStreamer, receive_gaze_data

    device = Device("127.0.0.1", port)
    try:
        status = await device.get_status()
    finally:
        await device.close()
    world, gaze = status.direct_world_sensor(), status.direct_gaze_sensor()
    assert world is not None and gaze is not None
    world_url, gaze_url = world.url, gaze.url
    assert world_url is not None and gaze_url is not None
    window: dict[str, float] = {}
    counts = {"frames": 0, "gaze": 0}
    lags_ms: dict[str, list[float]] = {"frames": [], "gaze": []}

    def note(kind: str, timestamp_ns: int) -> None:
        now_ns = time.time_ns()
        if window and window["start"] <= now_ns < window["end"]:
            counts[kind] += 1
            lags_ms[kind].append((now_ns - timestamp_ns) / 1e6)

    async def read_video() -> None:
        # Raw RTP, undecoded, so that the client's own decoding does not limit what is
        # measured: a frame is counted at its first packet, the first with its RTP time (all
        # of a frame's packets carry the frame's time). The streamer yields payloads without
        # the RTP header, so the marker bit is not there to count by.
        last_ns = None
        async with RTSPRawStreamer(world_url, media_type="video") as streamer:
            async for datum in streamer.receive():
                if datum.timestamp_unix_ns != last_ns:
                    last_ns = datum.timestamp_unix_ns
                    note("frames", last_ns)

    async def read_gaze() -> None:
        async for datum in receive_gaze_data(gaze_url):
            note("gaze", datum.timestamp_unix_ns)

    readers = [asyncio.create_task(read_video()), asyncio.create_task(read_gaze())]
    try:
        await asyncio.sleep(warmup_s)
        cpu0 = cpu_split(pid)
        start_ns = time.time_ns()
        window.update(start=start_ns, end=start_ns + window_s * 1e9)
        await asyncio.sleep(window_s)
        cpu1 = cpu_split(pid)
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    return {
        "counts": counts,
        "lags_ms": lags_ms,
        "cpu_player_s": cpu1[0] - cpu0[0],
        "cpu_rtsp_child_s": cpu1[1] - cpu0[1],
    }


def throughput(
    recording: Path, rate: float, warmup_s: float, window_s: float, tree: Path, reencode: bool
) -> dict[str, Any]:
    """The simulator (gazecam from ``tree``) pinned to one CPU at ``rate``: what a client
    receives in the window, and the simulator's CPU time."""
    frame_hz, gaze_hz, _ = recording_rates(recording)
    allowed = sorted(cpus())
    sim_cpu = allowed[0]
    client_cpus = set(allowed[1:]) or {sim_cpu}
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, client_cpus)
    try:
        with Simulator(recording, rate, sim_cpu, tree, reencode) as sim:
            assert sim.process is not None
            got = asyncio.run(receive_for(sim.port, sim.process.pid, warmup_s, window_s))
            video_mode = sim.video_mode
    finally:
        os.sched_setaffinity(0, before)
    frames, gaze = got["counts"]["frames"], got["counts"]["gaze"]
    frames_x = frames / window_s / frame_hz
    gaze_x = gaze / window_s / gaze_hz
    delivered_s = min(frames / frame_hz, gaze / gaze_hz)  # seconds of the recording
    cpu = got["cpu_player_s"] + got["cpu_rtsp_child_s"]
    return {
        "tree": str(tree),
        "rate": rate,
        "scene_video": video_mode,
        "window_s": window_s,
        "frames": frames,
        "gaze": gaze,
        "frames_x_realtime": frames_x,
        "gaze_x_realtime": gaze_x,
        "x_realtime": min(frames_x, gaze_x),
        "cpu_s": cpu,
        "cpu_player_s": got["cpu_player_s"],
        "cpu_rtsp_child_s": got["cpu_rtsp_child_s"],
        "cpu_per_recording_s": cpu / delivered_s if delivered_s else float("nan"),
        "x_realtime_per_cpu": delivered_s / cpu if cpu else float("nan"),
        "frame_lag_ms": pct(got["lags_ms"]["frames"], 50, 99),
        "gaze_lag_ms": pct(got["lags_ms"]["gaze"], 50, 99),
    }


def print_throughput(r: dict[str, Any]) -> None:
    """One run's lines."""
    print(
        f"{r['tree']} rate {r['rate']:g}, scene video {r['scene_video']}:\n  "
        f"{r['frames']} frames, {r['gaze']} gaze in "
        f"{r['window_s']:g} s = "
        f"{r['frames_x_realtime']:.2f}x / {r['gaze_x_realtime']:.2f}x real time"
        # Judged only where the rate lets it reach the target.
        + (
            f" (target >= {TARGET_REALTIME:g}x: {MET[r['x_realtime'] >= TARGET_REALTIME]})"
            if r["rate"] >= TARGET_REALTIME
            else ""
        )
    )
    print(
        f"  CPU {r['cpu_s']:.2f} s (player {r['cpu_player_s']:.2f}, RTSP child "
        f"{r['cpu_rtsp_child_s']:.2f}) = {r['cpu_per_recording_s']:.3f} CPU s per recording s: "
        f"{r['x_realtime_per_cpu']:.2f}x real time per CPU second"
    )
    print(f"  frame lag ms: {fmt(r['frame_lag_ms'], '.1f')}")
    print(f"  gaze lag ms:  {fmt(r['gaze_lag_ms'], '.1f')}")


# --- 2. live latency through the simulator (its parts: simulator_latency.py) -----------------


def latency(recording: Path, crops_s: float, asks: int) -> dict[str, Any]:
    """The simulator at real time on its own CPU, the consumer on the others."""
    allowed = sorted(cpus())
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(allowed[1:]) or set(allowed))
    try:
        with Simulator(recording, 1.0, allowed[0], REPO) as sim:
            # Never a hang: the recording loops, a crop comes every second or two.
            timeout_s = crops_s + 60 + 30 * asks
            report = asyncio.run(asyncio.wait_for(live_latency(sim.port, crops_s, asks), timeout_s))
    finally:
        os.sched_setaffinity(0, before)
    report["h264_decode_ms"] = h264_decode_ms(recording / "Neon Scene Camera v1 ps1.mp4")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/gazecam-bench/simulator.json"))
    parser.add_argument("--rates", default="1,4", help="playback rates to run (comma-separated)")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--window-s", type=float, default=8.0)
    parser.add_argument(
        "--recording",
        type=Path,
        help="a Neon recording with its scene video (default: neon-demo, its video rendered)",
    )
    parser.add_argument(
        "--video",
        default="as-is,reencode",
        help="how the simulator sends the scene video (comma-separated runs): as-is (the "
        "recording's H.264 where it can be sent as it is) or reencode (--reencode)",
    )
    parser.add_argument("--crops-s", type=float, default=20.0, help="glass-to-crop window")
    parser.add_argument("--asks", type=int, default=6, help="glass-to-answer asks (0: none)")
    parser.add_argument(
        "--tree",
        type=Path,
        action="append",
        help="run the simulator of this source tree (repeatable, e.g. a 'git worktree' of the "
        "commit before a change, to compare in one run); default: this repository",
    )
    args = parser.parse_args()
    videos = args.video.split(",")
    if unknown := set(videos) - {"as-is", "reencode"}:
        parser.error(f"--video: {', '.join(sorted(unknown))}: neither as-is nor reencode")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        recording = args.recording or recording_with_video(Path(tmp))
        runs = []
        for rate in (float(r) for r in args.rates.split(",")):
            for video in videos:
                for tree in args.tree or [REPO]:
                    runs.append(
                        throughput(
                            recording, rate, args.warmup_s, args.window_s, tree, video == "reencode"
                        )
                    )
                    print_throughput(runs[-1])
        live = latency(recording, args.crops_s, args.asks)
        print_latency(live)
    report = {"machine": machine_info(), "throughput": runs, "latency": live}
    write_report(report, args.out, started)


if __name__ == "__main__":
    main()
