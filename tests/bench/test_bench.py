"""``gazecam bench``: a real run on a short synthetic demo, its report, and ``--check``."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import pytest

from gazecam.bench import replay as bench
from gazecam.bench.report import METRICS, TARGETS
from gazecam.cli import main
from tests.conftest import use_tiny_smolvlm
from tests.perception import require_models

ATTENDED = "attended_kv.p50 full/gaze-sparse"


@dataclass
class Run:
    """The real run: where it wrote, its report, what it printed, and what it measured."""

    tmp: Path
    report: dict[str, Any]
    printed: str
    measured: bench.BenchRun


@pytest.fixture(scope="module")
def real_run(real_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """One real run (about 25 s): 20 s of the demo, 3 asks, full against gaze-sparse; checked
    against a floor baseline (sparse attends no more than dense), saving its own baseline."""
    require_models("ppocr-det", "ppocr-rec", "yolox-nano")
    tmp = tmp_path_factory.mktemp("bench")
    floor = tmp / "floor.json"
    floor.write_text(json.dumps({"ratios": {ATTENDED: {"value": 1.0, "tolerance": 0.0}}}))
    measured: list[bench.BenchRun] = []
    measure = bench.run_bench

    async def spy(*args: Any) -> bench.BenchRun:
        measured.append(await measure(*args))
        return measured[-1]

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, redirect_stdout(printed):
        mp.setenv("GAZECAM_LLM_MODEL_DIR", str(real_dir))
        mp.setenv("GAZECAM_SYNTHETIC_DURATION_S", "20")
        mp.setattr(bench, "run_bench", spy)
        args = ["bench", "synthetic:demo", "--modes", "full,gaze-sparse", "--asks", "3"]
        args += ["--out", str(tmp / "report.json"), "--check", str(floor)]
        assert main([*args, "--save-baseline", str(tmp / "baseline.json")]) == 0
    report = json.loads((tmp / "report.json").read_text())
    yield Run(tmp, report, printed.getvalue(), measured[0])


def test_the_report_has_every_stage_per_mode(real_run: Run) -> None:
    report = real_run.report
    assert list(report["modes"]) == ["full", "gaze-sparse"]
    assert report["run"]["asks"] == 3 and report["run"]["keyframes"] >= 10
    assert report["run"]["frames"] == 600 and report["run"]["frames_dropped"] == 0
    assert report["run"]["peak_rss_mb"] > 100
    for mode in report["modes"].values():
        assert mode["asks_timed"] == 3 and mode["keyframes_timed"] >= 9
        assert mode["vision_encode_ms"] is None  # the text engine has no vision encoder
        for metric in set(METRICS) - {"vision_encode_ms"}:
            p = mode[metric]
            assert p is not None, metric
            assert 0 <= p["p50"] <= p["p90"] <= p["p99"] <= p["max"], metric
        for key in ("step_accuracy", "step_accuracy_asks"):
            assert 0 <= mode[key] <= 1
        assert len(mode["answers"]) == 3 and all(a["text"] for a in mode["answers"])
    full, sparse = report["modes"]["full"], report["modes"]["gaze-sparse"]
    assert full["crop_mode"] == "full" and full["dense"]
    assert sparse["crop_mode"] == "gaze" and not sparse["dense"]
    # Sparse attends a few regions per step; dense attends its whole (larger) memory.
    assert sparse["attended_kv"]["max"] < sparse["visual_kv"]["p50"]
    assert sparse["attended_kv"]["p50"] < full["attended_kv"]["p50"]
    assert full["perception_ms"]["p50"] > sparse["perception_ms"]["p50"]
    assert sparse["step_accuracy"] >= 0.6  # the gaze crop follows the procedure
    assert report["ratios"][ATTENDED] > 1
    assert report["ratios"]["perception_ms.p50 full/gaze"] is None  # no gaze mode here
    assert set(report["targets"]) == {t.label for t in TARGETS["text"]}
    assert all(t["met"] in (True, False) for t in report["targets"].values())
    assert report["run"]["engine"]["engine"] == "text"
    machine = report["machine"]
    assert machine["cores"] >= 1 and "CPUExecutionProvider" in machine["providers"]["llm"]
    assert machine["packages"]["onnxruntime"]


def test_the_png_and_the_printed_table(real_run: Run) -> None:
    image = cv2.imread(str(real_run.tmp / "report.png"))
    assert image is not None and image.shape[0] > 300 and image.shape[1] > 600
    printed = real_run.printed
    assert "ttft_ms" in printed and "gaze-sparse" in printed and "target " in printed
    assert "check: passed" in printed  # against the floor baseline


def run_check(
    real_run: Run,
    baseline: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> tuple[int, str, str]:
    """``gazecam bench --check baseline`` on the real run's measurements (not measured again)."""

    async def measured(*_: Any) -> bench.BenchRun:
        return real_run.measured

    monkeypatch.setattr(bench, "run_bench", measured)
    args = ["bench", "synthetic:demo", "--modes", "full,gaze-sparse", "--check", str(baseline)]
    try:
        code = main([*args, "--out", str(real_run.tmp / "again" / "report.json")])
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_check_passes_on_its_own_baseline_and_fails_on_a_doctored_one(
    real_run: Run, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = real_run.tmp / "baseline.json"
    baseline = json.loads(saved.read_text())
    assert baseline["ratios"][ATTENDED]["value"] == real_run.report["ratios"][ATTENDED]
    code, out, _ = run_check(real_run, saved, monkeypatch, capsys)
    assert code == 0 and "check: passed" in out
    baseline["ratios"][ATTENDED]["value"] *= 10
    doctored = real_run.tmp / "doctored.json"
    doctored.write_text(json.dumps(baseline))
    code, out, _ = run_check(real_run, doctored, monkeypatch, capsys)
    assert code == 1
    regressed = [line for line in out.splitlines() if "REGRESSED" in line]
    assert len(regressed) == 1 and regressed[0].startswith(ATTENDED)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read the baseline"),
        ("{not json", "not a baseline"),
        ('{"ratios": {"ttft_ms.p50 a/b": {"value": 2, "tolerance": 0.1}}}', "unknown ratio"),
        ('{"ratios": {"' + ATTENDED + '": {"value": 2, "tolerance": 1.5}}}', "tolerance"),
        ('{"ratios": {"perception_ms.p50 full/gaze": {"value": 8, "tolerance": 0.3}}}', "'gaze'"),
    ],
)
def test_a_bad_baseline_is_one_line_and_exit_2_before_measuring(
    real_run: Run,
    content: str | None,
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = real_run.tmp / "bad.json"
    path.unlink(missing_ok=True)
    if content is not None:
        path.write_text(content)

    async def never(*_: Any) -> bench.BenchRun:
        raise AssertionError("measured despite a bad baseline")

    monkeypatch.setattr(bench, "run_bench", never)
    args = ["bench", "synthetic:demo", "--modes", "full,gaze-sparse", "--check", str(path)]
    assert main([*args, "--out", str(real_run.tmp / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and message in err


def test_unknown_modes_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "synthetic:demo", "--modes", "gaze,foveal", "--out", "/x.json"]) == 2
    assert "--modes" in capsys.readouterr().err


def test_the_vlm_engine_s_stages_and_targets(
    tiny_smolvlm: Path,
    tiny_smolvlm_onnx: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # On the tiny RANDOM-weight SmolVLM (its answers are noise; its stages are timed as the
    # real one's): the full frame's stock tiling against the gaze crop's one tile.
    use_tiny_smolvlm(monkeypatch, tiny_smolvlm_onnx, "ppocr-det", "ppocr-rec", "yolox-nano")
    out = tmp_path / "vlm.json"
    args = ["bench", "synthetic:demo", "--modes", "full,gaze-sparse", "--asks", "2"]
    assert main([*args, "--engine", "vlm", "--vlm", str(tiny_smolvlm), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["run"]["engine"] == {
        "engine": "vlm", "model": "random-smolvlm-tiny", "random_weights": True,
    }  # fmt: skip
    full, sparse = report["modes"]["full"], report["modes"]["gaze-sparse"]
    for mode in (full, sparse):
        assert mode["asks_timed"] == 2 and mode["vision_encode_ms"]["p50"] > 0
    # 12 tiles and the global image against one tile and the thumbnail.
    assert full["vision_encode_ms"]["p50"] > sparse["vision_encode_ms"]["p50"]
    assert full["visual_kv"]["p50"] > 10 * 64 > sparse["visual_kv"]["p50"]
    assert report["ratios"][ATTENDED] > 10
    assert set(report["targets"]) == {t.label for t in TARGETS["vlm"]}
    assert "vision_encode_ms" in capsys.readouterr().out
