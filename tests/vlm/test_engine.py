"""The vision-language engine on the tiny RANDOM-weight SmolVLM: transformers' answers from our
preprocessing, encoder and decoder; keyframes as gaze-region KV groups; engine choice."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gazecam.assist.assistant import load_engines
from gazecam.assist.memory import MemorySettings
from gazecam.cli import main
from gazecam.llm import LLMSettings
from gazecam.llm.decoder import LanguageModel
from gazecam.llm.records import GenerationStats
from gazecam.models import ModelSettings
from gazecam.records import BGRImage, Box
from gazecam.sources.synthetic import DemoScene
from gazecam.vlm.checkpoint import CheckpointError, check_checkpoint
from gazecam.vlm.engine import ImageTokens, VisionLanguageModel, VLMSettings, converted_vlm_dir
from gazecam.vlm.install import import_checkpoint
from gazecam.vlm.preprocess import crop_pixels, frame_pixels
from tests.conftest import use_tiny_smolvlm
from tests.llm.conftest import answer
from tests.perception import make_crop, require_models

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONTEXT = "You help a person who wears eye-tracking glasses. Task: check the pump."
QUESTION = "What am I looking at?"
GAZE = (900.0, 500.0)
CROP_BOX = Box(676, 276, 1124, 724)  # 448 px around the gaze point


@pytest.fixture(scope="module")
def frame() -> BGRImage:
    return DemoScene(duration_s=5).render(30, 1.0)  # 1600×1200: shelves, tools, labels


@pytest.fixture(scope="module")
def vlm(tiny_smolvlm: Path, tiny_smolvlm_onnx: Path) -> VisionLanguageModel:
    """The engine on the converted tiny checkpoint (found where the cache keeps conversions);
    fp32 encoders, so that its visual tokens are transformers' own."""
    models = ModelSettings(models_dir=tiny_smolvlm_onnx.parent)
    return VisionLanguageModel(
        check_checkpoint(tiny_smolvlm), VLMSettings(vlm_int8=False), models=models
    )


@pytest.fixture(scope="module")
def reference(tiny_smolvlm: Path) -> tuple[Any, Any]:
    from transformers import Idefics3ForConditionalGeneration, Idefics3Processor

    model = Idefics3ForConditionalGeneration.from_pretrained(tiny_smolvlm, dtype=torch.float32)
    return Idefics3Processor.from_pretrained(tiny_smolvlm), model.eval()


def hf_greedy(reference: tuple[Any, Any], image: BGRImage, **kwargs: Any) -> tuple[str, Any]:
    """transformers' greedy 20 tokens and first-token logits, for the chat template's prompt
    (system: CONTEXT; user: the image, then QUESTION)."""
    from PIL import Image

    processor, model = reference
    messages = [
        {"role": "system", "content": [{"type": "text", "text": CONTEXT}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    rgb = Image.fromarray(np.ascontiguousarray(image[:, :, ::-1]))
    inputs = processor(text=prompt, images=[[rgb]], return_tensors="pt", **kwargs)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].numpy()
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False, eos_token_id=[])
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    return processor.tokenizer.decode(new, skip_special_tokens=True), logits


def ours_greedy(vlm: VisionLanguageModel, image: ImageTokens) -> tuple[str, Any, GenerationStats]:
    """Our engine's greedy 20 tokens (dense) and first-token logits for the same prompt."""
    first: list[np.ndarray] = []
    forward = vlm._forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        step = forward(*args, **kwargs)
        first.append(step.logits)
        return step

    vlm.clear_memory()
    vlm.set_context(CONTEXT)
    vlm.add_image("parity", image, None)
    vlm._forward = spy  # type: ignore[method-assign]
    try:
        vlm.tokenizer.stop_ids = frozenset()  # as transformers', run all 20 tokens
        text, stats = answer(vlm, QUESTION, top_k_regions=None, max_tokens=20, temperature=0)
    finally:
        del vlm._forward
        vlm.tokenizer.stop_ids = frozenset(vlm.tokenizer.special_id(t) for t in vlm.chat.stop)
    return text, first[0], stats


def test_a_single_tile_answers_as_transformers(
    vlm: VisionLanguageModel, reference: tuple[Any, Any], frame: BGRImage
) -> None:
    crop = np.ascontiguousarray(frame[276:724, 676:1124])
    # Our crop as one 512 tile: the processor's single image without its upscaling.
    expected, expected_logits = hf_greedy(
        reference, crop, do_resize=False, do_image_splitting=False
    )
    tokens = vlm.encoder.encode(crop_pixels(crop, vlm.preprocess, 512))
    image = ImageTokens(tokens[:0], 0, 0, (), tokens[0], 0.0)
    text, logits, stats = ours_greedy(vlm, image)
    assert stats.generated_tokens == 20 and text == expected
    # Q8_0 weights: small next to the logits' spread.
    assert float(np.abs(logits - expected_logits).max()) < 0.02 * float(np.ptp(expected_logits))


def test_the_stock_tiling_answers_as_transformers(
    vlm: VisionLanguageModel, reference: tuple[Any, Any], frame: BGRImage
) -> None:
    expected, expected_logits = hf_greedy(reference, frame)
    tiles = frame_pixels(frame, vlm.preprocess)
    tokens = vlm.encoder.encode(tiles.pixel_values)  # 12 tiles and the global image
    boxes = tuple(Box(0, 0, 1, 1) for _ in range(len(tokens) - 1))
    image = ImageTokens(tokens[:-1], tiles.rows, tiles.cols, boxes, tokens[-1], 0.0)
    text, logits, stats = ours_greedy(vlm, image)
    assert (tiles.rows, tiles.cols) == (3, 4)
    assert stats.visual_kv_total > 13 * 64  # every tile's tokens and the markers
    assert text == expected
    assert float(np.abs(logits - expected_logits).max()) < 0.02 * float(np.ptp(expected_logits))


def test_a_keyframe_becomes_gaze_region_groups_and_a_frame_group(
    vlm: VisionLanguageModel, frame: BGRImage
) -> None:
    vlm.clear_memory()
    vlm.set_context(CONTEXT)
    vlm.observe(make_crop(frame, CROP_BOX, GAZE), [], [])
    (unit,) = vlm.cache.units(("frame", "region")).values()
    regions = [g for g in unit if g.kind == "region"]
    (frame_group,) = [g for g in unit if g.kind == "frame"]
    # 448 px: a 7×7 token grid in 2×2 blocks (the last row and column of blocks are 1 wide).
    assert len(regions) == 16 and sum(g.size for g in regions) == 49
    assert sorted({g.size for g in regions}) == [1, 2, 4]
    # The thumbnail's 16 tokens and the markers; all of it within one keyframe's positions.
    positions = np.concatenate([g.positions for g in unit])
    assert frame_group.size > 16 and len(set(positions.tolist())) == positions.size
    assert positions.size == positions.max() - positions.min() + 1
    assert vlm.memory_tokens(MemorySettings())[0] == vlm.vlm.vlm_keyframes * positions.size
    # The block holding the gaze point (the crop's centre, token (3, 3)) has the highest prior:
    # its centre is 2/7 of 448 px = 128 px from the crop's corner, 32 px from the gaze in x, y.
    best = max(regions, key=lambda g: g.gaze_prior)
    assert best.group_id.endswith("/r1c1")
    assert math.isclose(best.gaze_prior, math.exp(-math.hypot(32, 32) / 150), rel_tol=1e-6)
    corner = next(g for g in regions if g.group_id.endswith("/r0c0"))
    assert math.isclose(corner.gaze_prior, math.exp(-math.hypot(160, 160) / 150), rel_tol=1e-6)


def test_sparse_with_k_all_is_dense_and_k_attends_the_frame_and_k_blocks(
    vlm: VisionLanguageModel, frame: BGRImage
) -> None:
    vlm.clear_memory()
    vlm.set_context(CONTEXT)
    for t in (0, 1):
        vlm.observe(make_crop(frame, CROP_BOX, GAZE, timestamp_ns=t), [], [])
    regions = vlm.cache.of_kind("region")
    frame_kv = vlm.cache.entries("frame")
    dense = answer(vlm, QUESTION, top_k_regions=None, max_tokens=8, temperature=0)
    every = answer(vlm, QUESTION, top_k_regions=len(regions), max_tokens=8, temperature=0)
    assert dense[0] == every[0] and dense[1].attended_visual_kv == every[1].attended_visual_kv
    assert set(dense[1].attended_visual_kv) == {frame_kv + 98}  # 2 × 49 tokens in blocks
    _, sparse = answer(vlm, QUESTION, top_k_regions=4, max_tokens=8, temperature=0)
    assert all(frame_kv + 4 <= kv <= frame_kv + 16 for kv in sparse.attended_visual_kv[1:])
    assert sparse.visual_kv_total == frame_kv + 98 == vlm.cache.entries("region") + frame_kv


def test_the_memory_keeps_the_last_keyframes(
    tiny_smolvlm: Path, tiny_smolvlm_onnx: Path, frame: BGRImage
) -> None:
    models = ModelSettings(models_dir=tiny_smolvlm_onnx.parent)
    vlm = VisionLanguageModel(
        check_checkpoint(tiny_smolvlm), VLMSettings(vlm_keyframes=2), models=models
    )
    vlm.set_context(CONTEXT)
    for t in range(4):
        vlm.observe(make_crop(frame, CROP_BOX, GAZE, timestamp_ns=t), [], [])
    assert list(vlm.cache.units(("frame", "region"))) == ["k3", "k4"]
    assert vlm.last_encode_ms > 0 and vlm.thumbnail_px == 512
    vlm.clear_memory()
    assert set(vlm.cache.groups) <= {"context", "local"}


def test_engine_choice_and_the_text_fallback(
    tiny_smolvlm: Path, tiny_smolvlm_onnx: Path, tmp_path: Path
) -> None:
    cache = require_models("ppocr-det", "ppocr-rec", "smollm2-135m-gguf").models_dir
    # The converted tiny checkpoint is where the cache keeps conversions.
    models = ModelSettings(models_dir=tiny_smolvlm_onnx.parent, model_path=[cache])
    vlm = load_engines(LLMSettings(engine="vlm"), models.model_copy(update={"vlm": tiny_smolvlm}))
    assert isinstance(vlm.model, VisionLanguageModel) and vlm.warning is None
    assert (vlm.model.info.engine, vlm.model.info.model) == ("vlm", "random-smolvlm-tiny")
    assert vlm.model.info.random_weights
    # A checkpoint of another architecture: an error by name, the text engine (with why) where
    # falling back.
    broken = Path(shutil.copytree(tiny_smolvlm, tmp_path / "broken"))
    (broken / "config.json").write_text('{"model_type": "llama"}')
    bad = models.model_copy(update={"vlm": broken})
    with pytest.raises(CheckpointError, match=str(broken / "config.json")):
        load_engines(LLMSettings(engine="vlm"), bad)
    for llm, fallback in ((LLMSettings(engine="vlm"), True), (LLMSettings(), False)):
        text = load_engines(llm, bad, fallback=fallback)
        assert type(text.model) is LanguageModel and text.model.info.engine == "text"
        assert text.warning is not None and str(broken / "config.json") in text.warning
    # No checkpoint installed and none asked for: the text engine, nothing to warn about.
    plain = load_engines(LLMSettings(), ModelSettings(models_dir=tmp_path, model_path=[cache]))
    assert type(plain.model) is LanguageModel and plain.warning is None


def test_a_conversion_is_found_beside_its_checkpoint_and_an_import_drops_it(
    tiny_smolvlm: Path, tiny_smolvlm_onnx: Path, tmp_path: Path
) -> None:
    cache = ModelSettings(models_dir=tmp_path / "cache")
    checkpoint = import_checkpoint("smolvlm-256m", tiny_smolvlm, cache)  # a custom size
    converted = Path(shutil.copytree(tiny_smolvlm_onnx, cache.models_dir / "smolvlm-256m-onnx"))
    assert converted_vlm_dir(checkpoint, cache) == converted
    # A field engineer's folder (GAZECAM_MODEL_PATH) comes first.
    elsewhere = Path(shutil.copytree(converted, tmp_path / "field" / "smolvlm-256m-onnx"))
    field = cache.model_copy(update={"model_path": [elsewhere.parent]})
    assert converted_vlm_dir(checkpoint, field) == elsewhere
    # Importing a checkpoint anew drops the conversion of the one it replaces.
    import_checkpoint("smolvlm-256m", tiny_smolvlm, cache)
    assert not converted.exists() and elsewhere.exists()


def test_ask_with_either_engine_from_the_command_line(
    tiny_smolvlm: Path,
    tiny_smolvlm_onnx: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    use_tiny_smolvlm(monkeypatch, tiny_smolvlm_onnx, "ppocr-det", "ppocr-rec", "smollm2-135m-gguf")
    args = ["ask", "synthetic:demo", "What am I looking at?", "--at", "4", "--json"]
    assert main([*args, "--engine", "vlm", "--vlm", str(tiny_smolvlm)]) == 0
    blob = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert blob["engine"] == {
        "engine": "vlm",
        "model": "random-smolvlm-tiny",
        "random_weights": True,
    }
    assert blob["timings"]["visual_kv"] > 49 and blob["crop"] is not None
    # No checkpoint anywhere: vlm asked for by name is one line and exit 2.
    monkeypatch.setenv("GAZECAM_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("GAZECAM_ENGINE", "vlm")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("gazecam: error: engine vlm: no SmolVLM checkpoint is installed")
    assert len(err.splitlines()) == 1
