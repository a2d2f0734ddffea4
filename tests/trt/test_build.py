"""gazecam engines build with a FAKE tensorrt module and a FAKE GPU: the 10.x/11.x dispatch,
the engine cache (key, sidecar, EPContext wrapper, timing cache) and its refusals."""

from __future__ import annotations

import errno
import json
import sys
from dataclasses import replace
from pathlib import Path

import onnx
import pytest

from gazecam.cli import main
from gazecam.errors import ConfigError, MissingDependencyError
from gazecam.models import ModelSettings, sha256_of
from gazecam.perception import PerceptionSettings
from gazecam.trt import EngineError
from gazecam.trt.build import build_engines, import_tensorrt
from gazecam.trt.cache import check_engine, engine_key, engine_paths, input_profiles
from gazecam.trt.providers import open_session
from tests.trt import FAKE_GPU, FakeTensorRT, profiles_of, tiny_feeds, tiny_models, tiny_onnx

BOTH = ["ppocr-det", "ppocr-rec"]


@pytest.fixture
def models(tmp_path: Path) -> ModelSettings:
    return tiny_models(tmp_path)


def test_tensorrt_10_builds_the_fp32_graph_with_precision_flags(models: ModelSettings) -> None:
    trt = FakeTensorRT("10.3.0")
    results = build_engines(BOTH, "fp16", profiles_of, models, None, FAKE_GPU, trt)
    det, rec = trt.builds
    assert rec["flags"] == ["FP16"] and rec["initializer_types"] == ["FLOAT"]
    # PP-OCR's detector stays fp32: FP16 breaks its probability map (test_precision).
    assert det["flags"] == [] and det["initializer_types"] == ["FLOAT"]
    assert rec["network_flags"] == 0 and not rec["qdq"]
    assert rec["profiles"] == [{"x": [[1, 3, 48, 320], [6, 3, 48, 320], [6, 3, 48, 3584]]}]
    assert det["profiles"] == [{"x": [[1, 3, 32, 32], [1, 3, 448, 448], [1, 3, 448, 448]]}]
    lines = [r.line() for r in results]
    assert lines[0].startswith("ppocr-det: fp16 engine (its graph fp32) built in ")
    assert lines[1].startswith("ppocr-rec: fp16 engine built in ")

    engine, wrapper, sidecar = engine_paths(models.models_dir, "ppocr-rec", "fp16")
    meta = json.loads(sidecar.read_text())
    assert (
        meta["engine_sha256"] == sha256_of(engine) and meta["engine_bytes"] == results[1].size_bytes
    )
    assert (
        meta["key"]["tensorrt_version"] == "10.3.0" and meta["key"]["compute_capability"] == "8.7"
    )
    assert meta["key"]["model_sha256"] == sha256_of(
        models.model_path[0] / "ppocr-rec" / "ch_PP-OCRv4_rec_infer.onnx"
    )
    wrapper_model = onnx.load(str(wrapper))
    assert wrapper_model.ir_version == 8  # opset 17's: JetPack's onnxruntime reads it
    (node,) = wrapper_model.graph.node
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert (node.op_type, node.domain) == ("EPContext", "com.microsoft")
    assert attrs == {
        "embed_mode": 0,
        "ep_cache_context": engine.name.encode(),
        "hardware_architecture": b"87",
    }
    assert (list(node.input), list(node.output)) == (["x"], ["y"])

    # The timing cache persists: the second build read the first's.
    assert rec["timing_cache_in"] == "|timing"
    timing = models.models_dir / "trt-engines" / "timing-trt10.3.0-sm8.7.cache"
    assert timing.read_bytes() == b"|timing|timing"
    # Up to date: nothing rebuilt.
    again = build_engines(BOTH, "fp16", profiles_of, models, None, FAKE_GPU, trt)
    assert len(trt.builds) == 2 and [r.build_s for r in again] == [None, None]
    assert again[1].line().startswith("ppocr-rec: fp16 engine up to date (")


def test_tensorrt_11_is_strongly_typed_with_an_fp16_graph(models: ModelSettings) -> None:
    trt = FakeTensorRT("11.0.1")  # no BuilderFlag at all, as 11.x
    build_engines(["ppocr-rec"], "fp16", profiles_of, models, None, FAKE_GPU, trt)
    (rec,) = trt.builds
    assert rec["flags"] == [] and rec["network_flags"] == 0
    assert rec["initializer_types"] == ["FLOAT16"] and rec["input_types"] == ["FLOAT"]
    key = json.loads(engine_paths(models.models_dir, "ppocr-rec", "fp16")[2].read_text())["key"]
    assert key["tensorrt_version"] == "11.0.1"


def test_int8_is_explicit_qdq_on_10_and_11(models: ModelSettings) -> None:
    trt10 = FakeTensorRT("10.3.0")
    build_engines(BOTH, "int8", profiles_of, models, tiny_feeds, FAKE_GPU, trt10)
    assert [(b["flags"], b["qdq"]) for b in trt10.builds] == [(["INT8"], True)] * 2
    # 'best' quantizes only where Q/DQ keeps the results (the OCR detector), FP16 elsewhere.
    trt11 = FakeTensorRT("11.0.1")
    build_engines(BOTH, "best", profiles_of, models, tiny_feeds, FAKE_GPU, trt11)
    det, rec = trt11.builds
    assert det["qdq"] and det["flags"] == []
    assert not rec["qdq"] and rec["initializer_types"] == ["FLOAT16"]
    with pytest.raises(ConfigError, match="--precision int8 needs calibration crops"):
        build_engines(BOTH, "int8", profiles_of, models, None, FAKE_GPU, trt10)


def test_stale_foreign_and_corrupt_engines_are_refused_and_rebuilt(models: ModelSettings) -> None:
    trt = FakeTensorRT("10.3.0")
    build_engines(["ppocr-rec"], "fp16", profiles_of, models, None, FAKE_GPU, trt)
    onnx_path = models.model_path[0] / "ppocr-rec" / "ch_PP-OCRv4_rec_infer.onnx"
    key = engine_key("ppocr-rec", onnx_path, FAKE_GPU, "fp16", profiles_of("ppocr-rec"))
    engine, wrapper, _ = engine_paths(models.models_dir, "ppocr-rec", "fp16")
    assert check_engine(models.models_dir, key) == wrapper

    other_gpu = replace(FAKE_GPU, compute_capability="8.6")
    foreign = replace(key, compute_capability="8.6")
    with pytest.raises(
        EngineError,
        match=r"built with TensorRT 10.3.0 for sm 8.7, this is TensorRT 10.3.0 on sm 8.6 "
        r"\(foreign engine\); run 'gazecam engines build --precision fp16 --models ppocr-rec'",
    ):
        check_engine(models.models_dir, foreign)
    with pytest.raises(EngineError, match="built for other input shapes"):
        check_engine(
            models.models_dir, replace(key, profiles=input_profiles("ppocr-rec", 640, 2, 6))
        )
    with pytest.raises(EngineError, match="another version of the model file"):
        check_engine(models.models_dir, replace(key, model_sha256="0" * 64))
    build_engines(["ppocr-rec"], "fp16", profiles_of, models, None, other_gpu, trt)
    assert len(trt.builds) == 2 and check_engine(models.models_dir, foreign) == wrapper

    data = bytearray(engine.read_bytes())
    data[3] ^= 0xFF
    engine.write_bytes(bytes(data))
    with pytest.raises(EngineError, match=r"corrupt engine \(sha256 "):
        check_engine(models.models_dir, foreign)
    build_engines(["ppocr-rec"], "fp16", profiles_of, models, None, other_gpu, trt)
    assert len(trt.builds) == 3 and check_engine(models.models_dir, foreign) == wrapper


def test_no_gpu_no_tensorrt_and_too_old_are_one_line_errors(
    models: ModelSettings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    no_gpu = replace(FAKE_GPU, compute_capability=None, gpu_name=None, tensorrt_version=None)
    with pytest.raises(EngineError, match="no NVIDIA GPU found"):
        build_engines(BOTH, "fp16", profiles_of, models, None, no_gpu, FakeTensorRT("10.3.0"))
    with pytest.raises(
        EngineError, match=r"^TensorRT 8.6.1 is too old: gazecam builds with 10.0 or newer$"
    ):
        build_engines(BOTH, "fp16", profiles_of, models, None, FAKE_GPU, FakeTensorRT("8.6.1"))
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'gazecam\[trt\]'"):
        import_tensorrt()
    with pytest.raises(MissingDependencyError, match="Building TensorRT engines needs"):
        build_engines(BOTH, "fp16", profiles_of, models, None, FAKE_GPU)
    assert not (models.models_dir / "trt-engines").exists()

    monkeypatch.setattr("gazecam.trt.build.probe_platform", lambda: no_gpu)
    assert main(["engines", "build", "--precision", "fp16"]) == 2
    assert capsys.readouterr().err == (
        "gazecam: error: no NVIDIA GPU found (nvidia-smi lists none, and this is no Jetson)\n"
    )
    assert main(["engines", "build", "--models", "ppocr-det,nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gazecam: error: --models: nope unknown") and err.count("\n") == 1


def test_a_full_disk_while_writing_leaves_no_partial_files(
    models: ModelSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_bytes = Path.write_bytes

    def disk_full(self: Path, data: bytes) -> int:
        if self.suffix == ".engine":
            write_bytes(self, data[: len(data) // 2])  # half written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(
        EngineError,
        match=r"disk full while writing the ppocr-rec engine \(.* MB\); partial files removed$",
    ):
        build_engines(
            ["ppocr-rec"], "fp16", profiles_of, models, None, FAKE_GPU, FakeTensorRT("10.3.0")
        )
    left = sorted(p.name for p in (models.models_dir / "trt-engines").iterdir())
    assert left == ["timing-trt10.3.0-sm8.7.cache"]  # no engine, wrapper, sidecar or temporary


def test_the_vlm_encoders_get_fixed_shape_engines(
    models: ModelSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SmolVLM encoders (one graph per tile size, as its conversion has them: here a tiny
    stand-in) get engines at their fixed size; the runtime loads the fp32 graph's engine on a
    GPU and the CPU's int8 graph on the CPU."""
    fp32 = tiny_onnx(tmp_path / "conv" / "vision_32.onnx", input_name="pixel_values")
    int8 = tiny_onnx(tmp_path / "conv" / "vision_32.int8.onnx", 1, "pixel_values")
    monkeypatch.setattr("gazecam.trt.build.vlm_encoders", lambda m: {"smolvlm-vision-32": fp32})
    trt = FakeTensorRT("10.3.0")
    (result,) = build_engines(
        ["smolvlm-vision-32"], "fp16", profiles_of, models, None, FAKE_GPU, trt
    )
    assert result.graph == "fp16" and trt.builds[0]["profiles"] == []  # fixed: no profile
    key = json.loads(engine_paths(models.models_dir, "smolvlm-vision-32", "fp16")[2].read_text())
    assert key["key"]["profiles"] == [
        {
            "name": "pixel_values",
            "min_shape": [1, 3, 32, 32],
            "opt_shape": [1, 3, 32, 32],
            "max_shape": [1, 3, 32, 32],
        }
    ]
    settings = PerceptionSettings(onnx_providers="auto", trt_precision="fp16")
    opened: list[str] = []

    def create(target: str, sess_options: object, providers: list[object]) -> object:
        opened.append(target)
        return type(
            "S",
            (),
            {
                "get_providers": lambda self: (
                    ["CPUExecutionProvider"]
                    if target == str(int8)
                    else ["TensorrtExecutionProvider"]
                )
            },
        )()

    open_session(fp32, "smolvlm-vision-32", settings, models, FAKE_GPU, create, cpu_path=int8)
    no_gpu = replace(FAKE_GPU, compute_capability=None)
    open_session(fp32, "smolvlm-vision-32", settings, models, no_gpu, create, cpu_path=int8)
    wrapper = engine_paths(models.models_dir, "smolvlm-vision-32", "fp16")[1]
    assert opened == [str(wrapper), str(int8)]


def test_the_command_calibrates_on_a_source_and_prints_one_line_per_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    trt = FakeTensorRT("11.0.1")
    monkeypatch.setattr("gazecam.trt.command.build_tools", lambda *args: (FAKE_GPU, trt))
    monkeypatch.setenv("GAZECAM_MODELS_DIR", str(tmp_path / "cache"))
    argv = ["engines", "build", "--precision", "int8", "--models", "yolox-nano"]
    assert main([*argv, "--calibrate", "synthetic:demo"]) == 0
    out = capsys.readouterr().out.splitlines()
    engine = tmp_path / "cache" / "trt-engines" / "yolox-nano.int8.engine"
    assert len(out) == 1 and out[0].startswith("yolox-nano: int8 engine built in ")
    assert out[0].endswith(f" MB) {engine}")
    (build,) = trt.builds
    assert build["qdq"] and build["profiles"] == []  # calibrated on the demo; a fixed shape
    assert main(argv) == 2  # int8 without --calibrate
    assert "--precision int8 needs calibration crops" in capsys.readouterr().err


def test_a_full_disk_while_preparing_the_graph_is_one_line(
    models: ModelSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(model: object, path: str) -> None:
        Path(path).write_bytes(b"half a graph")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save", disk_full)
    with pytest.raises(
        EngineError,
        match=r"trt-engines: disk full while preparing the ppocr-rec fp16 graph; partial files "
        r"removed$",
    ):
        build_engines(
            ["ppocr-rec"], "fp16", profiles_of, models, None, FAKE_GPU, FakeTensorRT("11.0.1")
        )
    assert list((models.models_dir / "trt-engines").iterdir()) == []
