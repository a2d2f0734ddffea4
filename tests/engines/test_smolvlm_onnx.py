"""engines/smolvlm_onnx.py: the ONNX vision encoder gives transformers' visual tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from engines.smolvlm_onnx import convert, main
from gazecam.models import ModelError
from gazecam.sources.synthetic import DemoScene
from gazecam.vlm.preprocess import PreprocessConfig, crop_pixels, frame_pixels

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def encoders(tiny_smolvlm_onnx: Path) -> Path:
    """The tiny checkpoint's encoders at 512, 448 and 256, fp32 and int8."""
    return tiny_smolvlm_onnx


@pytest.fixture(scope="module")
def model(tiny_smolvlm: Path) -> object:
    from transformers import Idefics3ForConditionalGeneration

    return Idefics3ForConditionalGeneration.from_pretrained(tiny_smolvlm, dtype=torch.float32)


def reference(model: object, pixel_values: np.ndarray) -> np.ndarray:
    """transformers' visual tokens [tiles, T, hidden] for [tiles, 3, S, S] pixel values."""
    with torch.no_grad():
        tokens = model.model.get_image_features(torch.from_numpy(pixel_values)[None])  # type: ignore[attr-defined]
    flat = tokens.pooler_output[0].numpy()
    return flat.reshape(len(pixel_values), -1, flat.shape[-1])


def encode(path: Path, pixel_values: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"pixel_values": pixel_values})[0])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each visual token of a with the same token of b."""
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_the_encoders_and_what_they_say_about_themselves(encoders: Path) -> None:
    assert {p.name for p in encoders.iterdir()} == {
        "vision.json", "vision_512.onnx", "vision_512.int8.onnx",
        "vision_448.onnx", "vision_448.int8.onnx", "vision_256.onnx", "vision_256.int8.onnx",
        "model.onnx", "model.onnx.data", "embed_tokens.npz", "tokenizer.json", "config.json",
    }  # fmt: skip
    info = json.loads((encoders / "vision.json").read_text())
    assert info["random_weights"] is True and info["name"] == "random-smolvlm-tiny"
    assert info["tiles"] == {"512": {"tokens": 64}, "448": {"tokens": 49}, "256": {"tokens": 16}}
    assert info["hidden"] == 64 and info["image_mean"] == [0.5, 0.5, 0.5]


@pytest.mark.parametrize(("tile_px", "tokens"), [(512, 64), (448, 49), (256, 16)])
def test_fp32_encoder_equals_transformers(
    encoders: Path, model: object, tile_px: int, tokens: int
) -> None:
    pixels = np.random.default_rng(tile_px).uniform(-1, 1, (2, 3, tile_px, tile_px))
    pixels = pixels.astype(np.float32)
    ours, expected = encode(encoders / f"vision_{tile_px}.onnx", pixels), reference(model, pixels)
    assert ours.shape == expected.shape == (2, tokens, 64)
    assert float(np.abs(ours - expected).max()) <= 1e-4


@pytest.mark.parametrize("tile_px", [512, 448, 256])
def test_int8_encoder_is_close(
    encoders: Path, model: object, tiny_smolvlm: Path, tile_px: int
) -> None:
    frame = DemoScene(duration_s=5).render(30, 1.0)
    crop = np.ascontiguousarray(frame[300 : 300 + tile_px, 600 : 600 + tile_px])
    pixels = crop_pixels(crop, PreprocessConfig.load(tiny_smolvlm), tile_px)
    ours = encode(encoders / f"vision_{tile_px}.int8.onnx", pixels)
    assert float(cosines(ours, reference(model, pixels)).min()) >= 0.99


def test_a_frame_end_to_end_equals_transformers_processor_and_model(
    encoders: Path, model: object, tiny_smolvlm: Path
) -> None:
    """Our stock tiling + ONNX encoder against Idefics3Processor + get_image_features."""
    from PIL import Image
    from transformers import AutoProcessor

    frame = DemoScene(duration_s=5).render(60, 2.0)
    tiles = frame_pixels(frame, PreprocessConfig.load(tiny_smolvlm))
    ours = encode(encoders / "vision_512.onnx", tiles.pixel_values)
    processor = AutoProcessor.from_pretrained(tiny_smolvlm)
    image = Image.fromarray(np.ascontiguousarray(frame[:, :, ::-1]))
    inputs = processor(text="<image>", images=[image], return_tensors="pt")
    with torch.no_grad():
        expected = model.model.get_image_features(  # type: ignore[attr-defined]
            inputs["pixel_values"], inputs["pixel_attention_mask"]
        ).pooler_output[0]
    assert ours.shape == (13, 64, 64)
    assert float(np.abs(ours.reshape(-1, 64) - expected.numpy()).max()) <= 1e-4


def test_a_checkpoint_of_another_architecture_is_one_line_and_exit_2(
    tiny_smolvlm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "llava"
    shutil.copytree(tiny_smolvlm, other)
    config = json.loads((other / "config.json").read_text())
    other_arch = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]}
    (other / "config.json").write_text(json.dumps({**config, **other_arch}))
    with pytest.raises(SystemExit) as exit_:
        main([str(other), str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {other / 'config.json'}: a LlavaForConditionalGeneration checkpoint, "
        "not SmolVLM (Idefics3)"
    )
    assert not (tmp_path / "out").exists()


def test_missing_and_corrupt_weights_are_refused(tiny_smolvlm: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file  # bf16: no numpy dtype

    broken = tmp_path / "broken"
    shutil.copytree(tiny_smolvlm, broken)
    weights = broken / "model.safetensors"
    state = load_file(weights)
    # A key tensor is missing: the checkpoint check (as for `gazecam models import`) says so.
    projection = state.pop("model.connector.modality_projection.proj.weight")
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(
        ModelError, match=r"tensor model\.connector\.modality_projection\.proj\.weight is missing"
    ):
        convert(broken, tmp_path / "out")
    # Any other tensor: transformers would fill it with random weights; refused instead.
    state["model.connector.modality_projection.proj.weight"] = projection
    del state["model.vision_model.encoder.layers.1.mlp.fc1.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"no tensor model\.vision_model\.encoder\.layers\.1\.mlp"):
        convert(broken, tmp_path / "out")
    shutil.copy(tiny_smolvlm / "model.safetensors", weights)
    config = json.loads((broken / "config.json").read_text())
    config["vision_config"]["intermediate_size"] = 96  # the checkpoint's MLPs are 64 wide
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="broken: cannot load the checkpoint"):
        convert(broken, tmp_path / "out")
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelError, match=r"model\.safetensors: header length \d+ does not fit"):
        convert(broken, tmp_path / "out")
    weights.unlink()
    with pytest.raises(ModelError, match=r"broken: missing model\.safetensors"):
        convert(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()
