"""Jetson health in /metrics: real tegrastats lines parsed, and a fake tegrastats on PATH (the
hardware is the one thing faked) read in the background, dying or printing garbage."""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest

from gazecam.server import jetson
from gazecam.server.jetson import jetson_health, parse_tegrastats
from tests.server.conftest import LOCAL

# A Jetson AGX Orin 32 GB developer kit, JetPack 6 (L4T r36, CUDA 12.6), idle: the docs of
# gt-crnch-rg/read-the-docs, docs/neuromorphic/rudi-jetson-dev-boards.rst ("rudi2$> tegrastats").
ORIN_JP6 = (
    "09-01-2025 10:55:25 RAM 1313/30697MB (lfb 37x4MB) SWAP 0/15348MB (cached 0MB) "
    "CPU [0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,off,off,off,off] "
    "GR3D_FREQ 0% cpu@43.343C soc2@39.812C soc0@40.312C tj@43.343C soc1@38.843C "
    "VDD_GPU_SOC 1995mW/1995mW VDD_CPU_CV 0mW/0mW VIN_SYS_5V0 2524mW/2524mW"
)
# A Jetson AGX Orin 64 GB developer kit, JetPack 7.2 (L4T r39.2), under load: rbonghi/jetson_stats,
# pull request #894 (its test's "real tegrastats line"). GR3D_FREQ gains the per-GPC clocks,
# temperatures their maximum, rails their maximum.
ORIN_JP7 = (
    "07-25-2026 09:08:28 RAM 20642/62817MB (lfb 1x2MB) "
    "CPU [23%@2201,10%@2201,4%@2201,14%@2201,30%@2201,18%@2201,10%@2201,10%@2201,33%@2201,"
    "7%@2201,5%@2201,27%@2201] "
    "EMC_FREQ 3%@3199 GR3D_FREQ 12%@[1300,1300] NVENC0 off NVDEC0 off NVJPG0 off NVJPG1 off "
    "VIC off OFA off NVDLA0 off NVDLA1 off PVA0_FREQ off APE 174 "
    "cpu@52.968C/52.968C soc2@48.406C/48.406C soc0@49.531C/49.531C gpu@47.625C/47.625C "
    "VDD_GPU_SOC 5139mW/5139mW/5139mW VDD_CPU_CV 3268mW/3268mW/3268mW "
    "VIN_SYS_5V0 5500mW/5500mW/5500mW"
)


def test_a_jetpack_6_line_gives_load_temperatures_and_power() -> None:
    sample = parse_tegrastats(ORIN_JP6)
    assert sample is not None
    assert sample.gpu_load_ratio == 0.0
    assert sample.temperatures_c == {
        "cpu": 43.343,
        "soc2": 39.812,
        "soc0": 40.312,
        "tj": 43.343,
        "soc1": 38.843,
    }
    assert sample.power_w == {"VDD_GPU_SOC": 1.995, "VDD_CPU_CV": 0.0, "VIN_SYS_5V0": 2.524}


def test_a_jetpack_7_line_and_sensors_that_are_off() -> None:
    sample = parse_tegrastats(ORIN_JP7)
    assert sample is not None
    assert sample.gpu_load_ratio == 0.12
    assert sample.temperatures_c["gpu"] == 47.625 and len(sample.temperatures_c) == 4
    assert sample.power_w == {"VDD_GPU_SOC": 5.139, "VDD_CPU_CV": 3.268, "VIN_SYS_5V0": 5.5}
    # JetPack 6 on an Orin Nano reports switched-off zones at -256C: left out, not a reading.
    off = parse_tegrastats(ORIN_JP6.replace("cpu@43.343C", "cv0@-256C cpu@43.343C"))
    assert off is not None and "cv0" not in off.temperatures_c


def test_a_line_without_gpu_load_is_not_a_sample() -> None:
    assert parse_tegrastats("Segmentation fault") is None
    assert parse_tegrastats("") is None


def fake_tegrastats(bin_dir: Path, script: str) -> None:
    path = bin_dir / "tegrastats"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder first on PATH, for a fake tegrastats."""
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def scrape(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def wait_for(condition: str, registry: CollectorRegistry, present: bool = True) -> str:
    deadline = time.monotonic() + 10
    while (condition in (text := scrape(registry))) != present:
        assert time.monotonic() < deadline, text
        time.sleep(0.05)
    return text


def test_tegrastats_lines_become_metrics(bin_dir: Path, registry: CollectorRegistry) -> None:
    # tegrastats streams a line per interval until it is stopped; the newest one is reported.
    fake_tegrastats(
        bin_dir,
        f'[ "$1 $2" = "--interval 1000" ] || exit 9\necho "{ORIN_JP7}"\n'
        f'while :; do echo "{ORIN_JP6}"; sleep 0.05; done',
    )
    with jetson_health(registry):
        text = wait_for("gazecam_jetson_gpu_load_ratio 0.0", registry)
        assert 'gazecam_jetson_temperature_celsius{zone="tj"} 43.343' in text
        assert 'gazecam_jetson_power_watts{rail="VIN_SYS_5V0"} 2.524' in text
    assert "gazecam_jetson" not in scrape(registry)  # stopped with the app


def test_no_tegrastats_no_metrics_and_nothing_said(
    tmp_path: Path,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # not a Jetson: no tegrastats anywhere on PATH
    with caplog.at_level(logging.DEBUG), jetson_health(registry):
        assert "gazecam_jetson" not in scrape(registry)
    assert caplog.records == []


def test_a_tegrastats_that_dies_is_logged_once(
    bin_dir: Path, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    fake_tegrastats(bin_dir, f'echo "{ORIN_JP6}"; sleep 0.5; exit 3')
    with caplog.at_level(logging.WARNING, "gazecam.server"), jetson_health(registry):
        wait_for("gazecam_jetson_gpu_load_ratio", registry)
        wait_for("gazecam_jetson", registry, present=False)
        deadline = time.monotonic() + 10
        while not caplog.records:  # the reader logs once tegrastats is gone
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert [r.getMessage() for r in caplog.records] == [
        "tegrastats ended (exit 3): no Jetson metrics"
    ]


def test_garbage_from_tegrastats_is_logged_once(
    bin_dir: Path, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    fake_tegrastats(bin_dir, 'while :; do echo "GR3D? what GR3D"; sleep 0.05; done')
    with caplog.at_level(logging.WARNING, "gazecam.server"), jetson_health(registry):
        deadline = time.monotonic() + 10
        while not caplog.records:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "gazecam_jetson" not in scrape(registry)
    (record,) = caplog.records
    assert record.getMessage() == (
        "tegrastats printed a line gazecam cannot read (b'GR3D? what GR3D\\n'): no Jetson metrics"
    )


def test_a_stalled_tegrastats_reports_nothing(
    bin_dir: Path, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jetson, "STALE_S", 0.3)
    fake_tegrastats(bin_dir, f'echo "{ORIN_JP6}"; exec sleep 60')
    with jetson_health(registry):
        wait_for("gazecam_jetson_gpu_load_ratio", registry)
        wait_for("gazecam_jetson", registry, present=False)  # still running, but silent


def test_the_service_reports_jetson_health_while_it_runs(
    bin_dir: Path, make_app: Callable[..., FastAPI]
) -> None:
    pid_file = bin_dir / "tegrastats.pid"
    fake_tegrastats(
        bin_dir, f'echo $$ > "{pid_file}"\nwhile :; do echo "{ORIN_JP7}"; sleep 0.05; done'
    )
    with TestClient(make_app(), base_url=LOCAL) as client:
        deadline = time.monotonic() + 10
        while "gazecam_jetson_gpu_load_ratio 0.12" not in (text := client.get("/metrics").text):
            assert time.monotonic() < deadline, text
            time.sleep(0.05)
        assert 'gazecam_jetson_power_watts{rail="VDD_GPU_SOC"} 5.139' in text
        assert "gazecam_frames_processed_total" in text  # beside the service's own metrics
    with pytest.raises(ProcessLookupError):  # stopped with the service
        os.kill(int(pid_file.read_text()), 0)
