"""Tests of the TensorRT engines and the provider chain: a FAKE tensorrt module and fake
GPUs where no GPU is present (they test gazecam's dispatch and cache logic, never an engine),
real models on the CPU for the FP16 and Q/DQ graphs, and GPU parity where one is present."""

from __future__ import annotations

import json
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from gazecam.models import MODELS, ModelSettings
from gazecam.trt import Platform
from gazecam.trt.cache import InputProfile, input_profiles

# A FAKE GPU: what a Jetson Orin with JetPack 6 would report.
FAKE_GPU = Platform(
    ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    "8.7",
    "FAKE Orin",
    "10.3.0",
    "libnvinfer.so.10",
)
# This machine's ONNX Runtime with no GPU at all (pinned, so a GPU machine answers the same).
NO_GPU = Platform(tuple(ort.get_available_providers()), None, None, None, None)


def profiles_of(name: str) -> tuple[InputProfile, ...]:
    """The profiles of a 448 crop, 2 classifier images and 6 recogniser lines."""
    return input_profiles(name, 448, 2, 6)


def tiny_onnx(path: Path, seed: int = 0, input_name: str = "x") -> Path:
    """A small generated model (conv, relu, conv) with PP-OCR's input name (or another) and a
    dynamic shape."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((2, 4, 1, 1)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", [input_name, "w1"], ["a"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["a"], ["b"]),
            helper.make_node("Conv", ["b", "w2"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, "H", "W"])],
        [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def tiny_models(root: Path) -> ModelSettings:
    """Model settings whose model path holds tiny models in place of the two PP-OCR files
    (the model path is not checked against the pinned sha256), and whose cache is empty."""
    for name in ("ppocr-det", "ppocr-rec"):
        tiny_onnx(root / "models" / name / MODELS[name].filename)
    return ModelSettings(models_dir=root / "cache", model_path=[root / "models"])


def tiny_feeds(names: Any) -> dict[str, list[dict[str, Any]]]:
    """Calibration inputs for the tiny models: four random images."""
    rng = np.random.default_rng(1)
    return {
        n: [{"x": rng.random((1, 3, 32, 64), dtype=np.float32)} for _ in range(4)] for n in names
    }


class FakeTensorRT(types.ModuleType):
    """A FAKE ``tensorrt`` module: it reports a version, records what gazecam asks of the
    builder (network flags, builder flags, profiles, the graph it parses: its initializers'
    types and whether it has Q/DQ nodes) and "builds" bytes that describe that record. It
    tests gazecam's dispatch and cache logic; it is never a real engine and runs nothing."""

    def __init__(self, version: str) -> None:
        super().__init__("tensorrt")
        self.__version__ = version
        self.builds: list[dict[str, Any]] = []
        self.Logger = _Logger
        if int(version.split(".")[0]) < 11:  # 11.x removed the precision flags
            self.BuilderFlag = SimpleNamespace(FP16="FP16", INT8="INT8")
        self.IProgressMonitor = _Monitor
        self.OnnxParser = _Parser
        self.Builder = lambda logger: _Builder(self)


class _Logger:
    WARNING = "WARNING"

    def __init__(self, severity: str) -> None:
        self.severity = severity


class _Monitor:
    def __init__(self) -> None:
        pass


class _Parser:
    num_errors = 0

    def __init__(self, network: dict[str, Any], logger: Any) -> None:
        self.network = network

    def parse_from_file(self, path: str) -> bool:
        graph = onnx.load(path).graph
        self.network["initializer_types"] = sorted(
            {TensorProto.DataType.Name(i.data_type) for i in graph.initializer}
        )
        self.network["qdq"] = any(n.op_type == "QuantizeLinear" for n in graph.node)
        self.network["input_types"] = [
            TensorProto.DataType.Name(i.type.tensor_type.elem_type) for i in graph.input
        ]
        return True


class _Config:
    def __init__(self) -> None:
        self.flags: list[str] = []
        self.profiles: list[_Profile] = []
        self.timing = b""
        self.progress_monitor: Any = None

    def set_flag(self, flag: str) -> None:
        self.flags.append(flag)

    def create_timing_cache(self, data: bytes) -> bytes:
        return data

    def set_timing_cache(self, cache: bytes, ignore_mismatch: bool) -> None:
        self.timing = cache

    def get_timing_cache(self) -> Any:
        return SimpleNamespace(serialize=lambda: self.timing + b"|timing")

    def add_optimization_profile(self, profile: _Profile) -> None:
        self.profiles.append(profile)


class _Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, list[list[int]]] = {}

    def set_shape(
        self, name: str, lo: tuple[int, ...], opt: tuple[int, ...], hi: tuple[int, ...]
    ) -> None:
        self.shapes[name] = [list(lo), list(opt), list(hi)]


class _Builder:
    def __init__(self, tensorrt: FakeTensorRT) -> None:
        self.tensorrt = tensorrt

    def create_network(self, flags: int) -> dict[str, Any]:
        return {"network_flags": flags}

    def create_builder_config(self) -> _Config:
        return _Config()

    def create_optimization_profile(self) -> _Profile:
        return _Profile()

    def build_serialized_network(self, network: dict[str, Any], config: _Config) -> bytes:
        monitor = config.progress_monitor
        monitor.phase_start("Building engine", None, 2)
        assert monitor.step_complete("Building engine", 0) and monitor.step_complete("", 1)
        monitor.phase_finish("Building engine")
        record = {
            **network,
            "flags": config.flags,
            "profiles": [p.shapes for p in config.profiles],
            "timing_cache_in": config.timing.decode(),
        }
        self.tensorrt.builds.append(record)
        return b"FAKE ENGINE " + json.dumps(record).encode()
