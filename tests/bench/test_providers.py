"""gazecam bench's providers axis: the vision models timed per provider tier over the same
crops; on a machine without a GPU (this one, CI: the platform is pinned to none, so that a GPU
machine gives the same answer) only the CPU is measured and each other tier says why not."""

from __future__ import annotations

from pathlib import Path

import pytest

from gazecam.bench.providers import bench_providers, format_providers
from gazecam.cli import main
from gazecam.perception import PerceptionSettings
from gazecam.trt import providers
from tests.perception import require_models
from tests.trt import NO_GPU


def test_each_tier_is_timed_or_says_why_not(monkeypatch: pytest.MonkeyPatch) -> None:
    models = require_models("efficientnet-lite0", "ppocr-det", "ppocr-rec", "yolox-nano")
    monkeypatch.setattr(providers, "this_platform", lambda: NO_GPU)
    report = bench_providers("synthetic:demo", "auto", PerceptionSettings(), models, crops=3)
    assert report["crops"] == 3
    tiers = report["tiers"]
    assert list(tiers) == ["engine", "tensorrt", "cuda", "cpu"]
    for tier in ("engine", "tensorrt", "cuda"):
        assert tiers[tier]["not_run"].endswith(": no NVIDIA GPU found"), tiers[tier]
        assert "perceive_ms" not in tiers[tier]
    cpu = tiers["cpu"]
    assert {c["tier"] for c in cpu["runs_on"].values()} == {"cpu"}
    assert 0 < cpu["perceive_ms"]["p50"] <= cpu["perceive_ms"]["max"]
    assert set(cpu["models_ms"]) == {"ppocr-det", "ppocr-rec", "yolox-nano", "efficientnet-lite0"}
    # Each model ran on each timed crop (the recogniser: once per batch of lines, where any).
    assert all(v["p50"] > 0 for v in cpu["models_ms"].values())
    assert report["speedup_vs_cpu"] == {"cpu": 1.0}
    lines = format_providers(report).splitlines()
    assert lines[0] == "providers (3 crops):"
    assert lines[1] == "  engine    not run: ppocr-det: no NVIDIA GPU found"
    assert lines[4].startswith("  cpu       perceive p50 ")


def test_an_unknown_tier_is_refused_before_measuring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.json"
    assert main(["bench", "synthetic:demo", "--out", str(out), "--providers", "gpu"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("gazecam: error: onnx_providers='gpu': gpu unknown") and err.count("\n") == 1
    )
