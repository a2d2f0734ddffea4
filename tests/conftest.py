"""Shared fixtures: the real neon-demo recording, with a scene video rendered at its timestamps.

The recording in ../shared/recordings/neon-demo lost its videos; as its SOURCE.md says, we render
frames at the real scene timestamps (same 1600×1200 geometry) so that the gaze, fixation and
timing data stay real. Each frame carries its index as a frame code (see
``gazecam.sources.synthetic.draw_frame_code``), so tests can check which frame they got.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from gazecam.llm import LanguageModel, LLMSettings
from gazecam.llm.converted import converted_model_dir
from gazecam.models import ModelError, ModelSettings, model_path
from gazecam.sources.synthetic import DemoScene
from gazecam.sources.video import VideoWriter

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
NEON_DEMO = SHARED / "recordings" / "neon-demo"
SCENE_TIME = "Neon Scene Camera v1 ps1.time"
SCENE_VIDEO = "Neon Scene Camera v1 ps1.mp4"


def missing(reason: str) -> None:
    """Skip a test whose data or model is missing here; in CI (CI=true), fail it instead."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must provide it)")
    pytest.skip(reason)


def copy_recording(dest: Path) -> Path:
    """A writable copy of the neon-demo recording (the shared one is read-only)."""
    if not NEON_DEMO.is_dir():
        missing(f"{NEON_DEMO} is missing (../shared belongs beside the repo)")
    shutil.copytree(NEON_DEMO, dest, copy_function=shutil.copyfile)
    return dest


def render_scene_video(
    recording: Path, frames: int | None = None, part: int = 1, first_index: int = 0
) -> None:
    """Write part ``part``'s scene video: DemoScene frames at that part's scene timestamps.

    ``first_index`` is the index of the part's first frame in the whole recording.
    """
    ts = np.fromfile(recording / SCENE_TIME.replace("ps1", f"ps{part}"), dtype="<i8")
    scene = DemoScene(duration_s=(ts[-1] - ts[0]) / 1e9 + 1)
    # A plain MP4, as the Companion app writes it (see VideoWriter).
    video = recording / SCENE_VIDEO.replace("ps1", f"ps{part}")
    with VideoWriter(video, scene.width_px, scene.height_px, fps=30, fragmented=False) as writer:
        for i, t in enumerate(ts[:frames].tolist()):
            writer.write(scene.render(first_index + i, (t - ts[0]) / 1e9))


def two_part_recording(dest: Path, recording: Path, split: int) -> Path:
    """A copy of ``recording`` in two parts (ps1, ps2), the second from frame ``split`` on."""
    shutil.copytree(recording, dest, copy_function=shutil.copyfile)
    ts = np.fromfile(dest / SCENE_TIME, "<i8")
    ts[:split].tofile(dest / SCENE_TIME)
    ts[split:].tofile(dest / SCENE_TIME.replace("ps1", "ps2"))
    (dest / SCENE_VIDEO).unlink()
    render_scene_video(dest, part=1)
    render_scene_video(dest, part=2, first_index=split)
    return dest


@pytest.fixture(scope="session")
def neon_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The neon-demo recording with a rendered scene video (made once per test session)."""
    recording = copy_recording(tmp_path_factory.mktemp("neon") / "neon-demo")
    render_scene_video(recording)
    return recording


def gguf_path() -> Path:
    """The real SmolLM2 GGUF (in the models cache: 'gazecam models fetch' puts it there)."""
    try:
        return model_path("smollm2-135m-gguf")
    except ModelError as exc:
        missing(str(exc))
        raise


@pytest.fixture(scope="session")
def tiny_smolvlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """random-smolvlm-tiny in the Hugging Face layout (SmolLM2's tokenizer from the GGUF)."""
    pytest.importorskip("transformers", reason="needs the vlm-build extra (torch, transformers)")
    from engines.random_smolvlm import write_random_checkpoint

    out = tmp_path_factory.mktemp("smolvlm") / "random-smolvlm-tiny"
    return write_random_checkpoint(out, "tiny", seed=0, tokenizer_gguf=gguf_path())


@pytest.fixture(scope="session")
def tiny_smolvlm_onnx(tiny_smolvlm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_smolvlm converted (about 5 s): vision encoders (fp32 and int8) at every tile size,
    and the decoder with Q8_0 weights and fp32 activations (accuracy_level 0), for parity."""
    from engines.smolvlm_onnx import convert

    out = tmp_path_factory.mktemp("smolvlm-onnx") / "random-smolvlm-tiny-onnx"
    return convert(tiny_smolvlm, out, bits=8, accuracy_level=0)


def use_tiny_smolvlm(monkeypatch: pytest.MonkeyPatch, converted: Path, *models: str) -> None:
    """Commands in this test find the tiny checkpoint's conversion (``converted``, from
    ``tiny_smolvlm_onnx``) where the cache keeps conversions, the other ``models`` in the real
    cache (a skip naming any missing), and an 8 s synthetic demo."""
    from tests.perception import require_models  # it imports this module

    cache = require_models(*models).models_dir
    monkeypatch.setenv("GAZECAM_MODELS_DIR", str(converted.parent))
    monkeypatch.setenv("GAZECAM_MODEL_PATH", json.dumps([str(cache)]))
    monkeypatch.setenv("GAZECAM_SYNTHETIC_DURATION_S", "8")


@pytest.fixture(scope="session")
def real_models(tmp_path_factory: pytest.TempPathFactory) -> ModelSettings:
    """Model settings whose cache is a fresh folder and whose model path holds the GGUF."""
    cache = tmp_path_factory.mktemp("models")
    return ModelSettings(models_dir=cache, model_path=[gguf_path().parent])


@pytest.fixture(scope="session")
def real_dir(real_models: ModelSettings) -> Path:
    """SmolLM2-135M-Instruct converted from its GGUF into the fresh cache (about 3 s), through
    the runtime's convert-on-first-use path."""
    return converted_model_dir(LLMSettings(), real_models)


@pytest.fixture(scope="session")
def real_lm(real_dir: Path) -> LanguageModel:
    """One LanguageModel on the real model for the session."""
    return LanguageModel(LLMSettings(llm_model_dir=real_dir))
