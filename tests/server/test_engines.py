"""The service with either answer engine: the vlm engine (tiny RANDOM-weight SmolVLM) answers
through the same protocol, and a vlm engine that cannot load leaves the text engine answering
with a warning in /v1/status."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fastapi.testclient import TestClient

from gazecam.assist.assistant import AssistantSettings, Engines, load_engines
from gazecam.llm import LLMSettings
from gazecam.models import ModelSettings
from gazecam.server.app import create_app
from gazecam.server.settings import ServerSettings
from gazecam.settings import SourceSettings
from gazecam.vlm.checkpoint import check_checkpoint
from gazecam.vlm.engine import VisionLanguageModel
from tests.perception import require_models
from tests.server.conftest import DEMO_S, LOCAL, WS, first_crop
from tests.server.test_ask import answer, ask


def serve(engines: Engines) -> TestClient:
    app = create_app(
        ServerSettings(),
        source=SourceSettings(synthetic_duration_s=DEMO_S),
        assistant=AssistantSettings(answer_max_tokens=6),
        engines=engines,
    )
    return TestClient(app, base_url=LOCAL)


def test_the_vlm_engine_answers_through_the_same_protocol(
    engines: Engines, tiny_smolvlm: Path, tiny_smolvlm_onnx: Path
) -> None:
    models = ModelSettings(models_dir=tiny_smolvlm_onnx.parent)
    vlm = VisionLanguageModel(check_checkpoint(tiny_smolvlm), models=models)
    with serve(Engines(engines.perception, vlm)) as client:
        first_crop(client)
        status = client.get("/v1/status").json()["model"]
        assert (status["engine"], status["model"], status["random_weights"]) == (
            "vlm", "random-smolvlm-tiny", True,
        )  # fmt: skip
        assert status["warning"] is None
        with client.websocket_connect(f"{WS}/v1/ask") as socket:
            ask(socket, "q1", "What step am I on?")
            _, frame = answer(socket, "q1")
    # The fact sentence (then the random model's words where they add no fact); the crop.
    assert frame["text"].startswith(f"You are on step {frame['step']['index']} of 6")
    assert frame["engine"]["engine"] == "vlm" and frame["crop"]["box"]
    assert frame["timings"]["visual_kv"] > 49  # a keyframe's blocks and its frame group
    assert not vlm.cache.of_kind("region")  # the stopped service took its keyframes out


def test_a_vlm_engine_that_cannot_load_falls_back_to_text_with_a_warning(
    engines: Engines, tiny_smolvlm: Path, tmp_path: Path
) -> None:
    broken = Path(shutil.copytree(tiny_smolvlm, tmp_path / "SmolVLM-256M-Instruct"))
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    cache = require_models("ppocr-det", "ppocr-rec", "smollm2-135m-gguf").models_dir
    models = ModelSettings(models_dir=tmp_path, model_path=[cache], vlm=broken)
    fallen = load_engines(LLMSettings(engine="vlm"), models, fallback=True)
    with serve(fallen) as client:
        first_crop(client)
        status = client.get("/v1/status").json()["model"]
        with client.websocket_connect(f"{WS}/v1/ask") as socket:
            ask(socket, "q1", "What step am I on?")
            _, frame = answer(socket, "q1")
    assert status["engine"] == "text" and frame["engine"]["engine"] == "text"
    assert str(broken / "model.safetensors") in status["warning"]
    assert status["warning"].startswith("the vlm engine could not load, the text engine answers")
    json.dumps(status)
