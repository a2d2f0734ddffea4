"""Soak test of the service: does its memory level off under a steady load of asks?

    .venv/bin/python benchmarks/bench_soak.py [--duration-s 1800] [--clients 4] [--think-s 2]
        [--warmup-s 300] [--sample-s 5] [--source synthetic:demo] [--out report.json]
        [--env NAME=VALUE ...]

Starts ``gazecam serve`` as a subprocess on 127.0.0.1 (a free port), waits for its first
perceived keyframe, then runs ``--clients`` websocket clients, each asking on its own socket in
a loop with ``--think-s`` between an answer and its next ask, for ``--duration-s``. Every
``--sample-s`` it reads the server's resident memory (``VmRSS``) and thread count from
``/proc/PID/status`` and the regions in memory from ``/v1/status``. At the end it stops the
server (SIGTERM), prints the RSS slope in MB/min after the warm-up window (a least-squares line),
the slopes of the first and last third of that window (whether it levels off: the target is at
most 1 MB/min, flat after 10 minutes), and writes a JSON report with every sample to ``--out``
(by default ``/tmp/gazecam-bench/soak.json``).

The service runs with its own settings from the environment, except that the per-client rate
limit is lifted (``GAZECAM_ASKS_PER_MINUTE``, ``--asks-per-minute``) so the soak measures
memory, not refusals; ``--env`` adds more (e.g. ``MALLOC_ARENA_MAX=2`` to compare allocators).
Linux only (``/proc``). The run is bounded: it stops by itself after the duration, and a server
that does not come up within ``--start-timeout-s`` ends it with an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import websockets
from common import machine_info, pct, write_report  # benchmarks/common.py

QUESTIONS = ("What step am I on?", "What am I looking at?", "What's next?", "What did I read?")
TARGET_MB_MIN = 1.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_status(pid: int) -> dict[str, float]:
    """The process's resident memory in MB and its thread count."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "threads": int(fields["Threads"])}


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def slope_mb_min(samples: list[dict[str, float]]) -> float:
    """The least-squares slope of RSS over time, MB per minute (NaN under 3 samples)."""
    if len(samples) < 3:
        return float("nan")
    t = np.array([s["t_s"] for s in samples]) / 60
    rss = np.array([s["rss_mb"] for s in samples])
    return float(np.polyfit(t, rss, 1)[0])


class Load:
    """The clients' tallies."""

    def __init__(self) -> None:
        self.answers = 0
        self.errors: Counter[str] = Counter()
        self.latency_s: list[float] = []


async def client(address: str, n: int, load: Load, think_s: float, until: float) -> None:
    """One client: asks on one socket until ``until``; reconnects if the socket closes."""
    asked = 0
    while time.monotonic() < until:
        try:
            async with websockets.connect(f"ws://{address}/v1/ask") as ws:
                while time.monotonic() < until:
                    request_id = f"c{n}-{asked}"
                    question = QUESTIONS[asked % len(QUESTIONS)]
                    asked += 1
                    sent = time.perf_counter()
                    await ws.send(
                        json.dumps({"type": "ask", "id": request_id, "question": question})
                    )
                    while True:
                        frame = json.loads(await asyncio.wait_for(ws.recv(), 120))
                        if frame["type"] == "answer":
                            load.answers += 1
                            load.latency_s.append(time.perf_counter() - sent)
                            break
                        if frame["type"] == "error":
                            load.errors[frame["code"]] += 1
                            break
                    await asyncio.sleep(think_s)
        except (OSError, TimeoutError, websockets.ConnectionClosed) as exc:
            load.errors[f"connection: {type(exc).__name__}"] += 1
            await asyncio.sleep(1.0)


async def sample(pid: int, address: str, every_s: float, until: float) -> list[dict[str, Any]]:
    """RSS, threads and regions in memory every ``every_s`` until ``until``."""
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    while (now := time.monotonic()) < until:
        status = await asyncio.to_thread(get_json, f"http://{address}/v1/status")
        row = {"t_s": round(now - started, 1), **proc_status(pid)}
        row["regions"] = status["model"]["regions_in_memory"]
        samples.append(row)
        print(
            f"  {row['t_s']:7.0f} s  RSS {row['rss_mb']:7.1f} MB  threads {row['threads']:3d}"
            f"  regions {row['regions']:3d}",
            flush=True,
        )
        await asyncio.sleep(every_s)
    return samples


async def soak(pid: int, address: str, args: argparse.Namespace, load: Load) -> list[Any]:
    until = time.monotonic() + args.duration_s
    clients = [client(address, n, load, args.think_s, until) for n in range(args.clients)]
    samples, *_ = await asyncio.gather(sample(pid, address, args.sample_s, until), *clients)
    return samples


def wait_ready(server: subprocess.Popen[bytes], address: str, timeout_s: float) -> None:
    """Until the server has perceived a keyframe (it answers from it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited with {server.returncode}")
        with contextlib.suppress(OSError, ValueError):
            if get_json(f"http://{address}/v1/status")["frames"]["keyframes_perceived"]:
                return
        time.sleep(0.5)
    sys.exit(f"the server did not come up within {timeout_s:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration-s", type=float, default=1800.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--think-s", type=float, default=2.0)
    parser.add_argument("--warmup-s", type=float, default=300.0)
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--source", default="synthetic:demo")
    parser.add_argument("--asks-per-minute", type=int, default=100_000)
    parser.add_argument("--start-timeout-s", type=float, default=300.0)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--out", type=Path, default=Path("/tmp/gazecam-bench/soak.json"))
    args = parser.parse_args()
    if not 1 <= args.clients <= 64 or not 0 < args.duration_s <= 4 * 3600:
        parser.error("--clients 1..64 and --duration-s up to 4 hours")
    started = time.perf_counter()

    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "GAZECAM_ASKS_PER_MINUTE": str(args.asks_per_minute)}
    env.update(item.split("=", 1) for item in args.env)
    command = [
        sys.executable,
        "-m",
        "gazecam",
        "serve",
        "--source",
        args.source,
        "--host",
        "127.0.0.1",
        "--port",
        address.rsplit(":", 1)[1],
    ]
    server = subprocess.Popen(command, env=env)
    load = Load()
    try:
        wait_ready(server, address, args.start_timeout_s)
        print(
            f"server {server.pid} on {address}: {args.clients} clients for {args.duration_s:.0f} s",
            flush=True,
        )
        samples = asyncio.run(soak(server.pid, address, args, load))
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    after = [s for s in samples if s["t_s"] >= args.warmup_s]
    third = len(after) // 3
    first_slope, last_slope = slope_mb_min(after[:third]), slope_mb_min(after[-third:])
    slope = slope_mb_min(after)
    at_warmup = after[0]["rss_mb"] if after else float("nan")
    report = {
        "machine": machine_info(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "answers": load.answers,
        "errors": dict(load.errors),
        "answer_latency_s": pct(load.latency_s, 50, 90, 99),
        "rss_mb": {
            "start": samples[0]["rss_mb"],
            "after_warmup": at_warmup,
            "end": samples[-1]["rss_mb"],
            "max": max(s["rss_mb"] for s in samples),
        },
        "slope_after_warmup_mb_min": slope,
        "slope_first_third_mb_min": first_slope,
        "slope_last_third_mb_min": last_slope,
        "levels_off": bool(last_slope <= TARGET_MB_MIN),
        "target_met": bool(slope <= TARGET_MB_MIN),
        "samples": samples,
    }
    rss = report["rss_mb"]
    print(
        f"\n{load.answers} answers, errors {dict(load.errors) or 'none'}; latency "
        + "  ".join(f"{k} {v:.2f} s" for k, v in report["answer_latency_s"].items())
    )
    print(
        f"RSS start {rss['start']:.1f} MB, after warm-up ({args.warmup_s:.0f} s) "
        f"{at_warmup:.1f} MB, end {rss['end']:.1f} MB, max {rss['max']:.1f} MB"
    )
    print(
        f"slope after warm-up {slope:+.2f} MB/min (first third {first_slope:+.2f}, last third "
        f"{last_slope:+.2f}); levels off: {report['levels_off']}; target "
        f"<= {TARGET_MB_MIN} MB/min met: {report['target_met']}"
    )
    write_report(report, args.out, started)


if __name__ == "__main__":
    main()
