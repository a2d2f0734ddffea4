"""gazecam.vlm.preprocess: the pixel values transformers' Idefics3 image processor makes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engines.random_smolvlm import PREPROCESSOR
from gazecam.models import ModelError
from gazecam.records import BGRImage
from gazecam.sources.synthetic import DemoScene
from gazecam.vlm.preprocess import PreprocessConfig, crop_pixels, frame_pixels

transformers = pytest.importorskip("transformers", reason="needs the vlm-build extra")
Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def frame() -> BGRImage:
    """A 1600×1200 scene frame (shelves, tools, labels: edges a resampler can get wrong)."""
    return DemoScene(duration_s=5).render(30, 1.0)


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with SmolVLM-256M-Instruct's preprocessor_config.json."""
    folder = tmp_path_factory.mktemp("pre")
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return folder


def processor_pixels(bgr: BGRImage, **kwargs: object) -> np.ndarray:
    """pixel_values of transformers' (PIL-backend) Idefics3 image processor, tiles first."""
    processor = transformers.Idefics3ImageProcessorPil(**PREPROCESSOR)
    image = Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))
    return np.asarray(processor(images=[image], return_tensors="np", **kwargs)["pixel_values"][0])


def test_stock_tiling_of_a_frame_equals_the_processor(frame: BGRImage, config_dir: Path) -> None:
    tiles = frame_pixels(frame, PreprocessConfig.load(config_dir))
    expected = processor_pixels(frame)
    # 1600×1200 → 2048×1536: 3 rows × 4 columns of 512 tiles, and the global image.
    assert (tiles.rows, tiles.cols) == (3, 4)
    assert tiles.pixel_values.shape == expected.shape == (13, 3, 512, 512)
    assert tiles.pixel_values.dtype == np.float32
    assert float(np.abs(tiles.pixel_values - expected).max()) < 1e-6


@pytest.mark.parametrize("crop_px", [448, 512, 300])
def test_a_crop_is_one_tile_as_the_processor_makes_it(
    frame: BGRImage, config_dir: Path, crop_px: int
) -> None:
    crop = np.ascontiguousarray(frame[200 : 200 + crop_px, 500 : 500 + crop_px])
    ours = crop_pixels(crop, PreprocessConfig.load(config_dir))
    # The processor without its upscaling and splitting resizes straight to one 512 tile.
    expected = processor_pixels(crop, do_resize=False, do_image_splitting=False)
    assert ours.shape == expected.shape == (1, 3, 512, 512)
    assert float(np.abs(ours - expected).max()) < 1e-6


def test_a_448_crop_at_its_native_size(frame: BGRImage, config_dir: Path) -> None:
    crop = np.ascontiguousarray(frame[200:648, 500:948])
    ours = crop_pixels(crop, PreprocessConfig.load(config_dir), tile_px=448)
    expected = processor_pixels(
        crop, do_resize=False, do_image_splitting=False, max_image_size={"longest_edge": 448}
    )
    assert ours.shape == expected.shape == (1, 3, 448, 448)
    assert float(np.abs(ours - expected).max()) < 1e-6
    # Not resized: the pixels are the crop's own, normalised to [-1, 1].
    assert np.allclose(ours[0, 0], crop[:, :, 2] / 127.5 - 1, atol=1e-6)


def test_an_unusable_config_names_its_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"preprocessor_config\.json"):
        PreprocessConfig.load(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**PREPROCESSOR, "resample": 3}))
    with pytest.raises(ModelError, match=r"preprocessor_config\.json.*resample 3"):
        PreprocessConfig.load(tmp_path)


def test_the_runtime_needs_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, gazecam.vlm.preprocess; "
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
