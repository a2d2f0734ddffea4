"""SmolVLM checkpoints: the check (hyper-parameters, sizes, one line per bad input), the import
into the cache (nothing left behind), ``gazecam models list`` and the engine's lookup.

The checkpoints are random-weight ones written by engines/random_smolvlm.py (no SmolVLM weights
can be had here); the released sizes' tensor shapes come from transformers' own model, built on
the meta device, in header-only safetensors files whose data is a hole (valid, all zeros).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import gazecam.vlm.install as install_module
from gazecam.cli import main
from gazecam.models import CHECKPOINT_LICENCE, ModelSettings
from gazecam.vlm.checkpoint import (
    SIZES,
    CheckpointError,
    TextParams,
    VisionParams,
    check_checkpoint,
    read_safetensors_header,
)
from gazecam.vlm.install import import_checkpoint, vlm_checkpoint
from tests.conftest import gguf_path, missing
from tests.test_models import gazecam_offline

TINY_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """random-smolvlm-tiny (engines/random_smolvlm.py), written once per session."""
    try:
        from engines.random_smolvlm import write_random_checkpoint
    except ImportError as exc:
        missing(f"engines/random_smolvlm.py needs the vlm-build extra ({exc})")
        raise
    out = tmp_path_factory.mktemp("smolvlm") / "random-smolvlm-tiny"
    return write_random_checkpoint(out, "tiny", seed=0, tokenizer_gguf=gguf_path())


@pytest.fixture
def tiny_copy(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A copy of the tiny checkpoint for a test to break."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint"))


def released_size(out: Path, size: str, tiny_checkpoint: Path) -> int:
    """A checkpoint folder with the released model's config and tensor shapes (zeros: the data
    is a hole in a sparse file), the tiny one's other files; returns the parameter count."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    from engines.random_smolvlm import hf_config

    shutil.copytree(tiny_checkpoint, out)
    config = hf_config(size)
    (out / "config.json").write_text(json.dumps(config))
    with torch.device("meta"):
        model = Idefics3ForConditionalGeneration(Idefics3Config(**config))
    header: dict[str, Any] = {}
    offset = 0
    for name, tensor in model.state_dict().items():
        size_b = tensor.numel() * 2
        span = [offset, offset + size_b]
        header[name] = {"dtype": "BF16", "shape": list(tensor.shape), "data_offsets": span}
        offset += size_b
    raw = json.dumps(header).encode()
    with (out / "model.safetensors").open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return sum(t.numel() for t in model.state_dict().values())


def test_the_tiny_random_checkpoint_is_read(tiny_checkpoint: Path) -> None:
    from safetensors import safe_open

    checkpoint = check_checkpoint(tiny_checkpoint)
    # engines/random_smolvlm.py's "tiny": SmolVLM's structure with small widths.
    assert checkpoint.size == "custom" and checkpoint.random_weights
    assert checkpoint.vision == VisionParams(32, 64, 2, 2, 512, 16)
    assert checkpoint.text == TextParams(64, 128, 2, 2, 1, 32, 49280)
    assert checkpoint.scale_factor == 4 and checkpoint.tokens_per_tile == 64
    assert not checkpoint.tied_embeddings
    assert set(checkpoint.files) == TINY_FILES
    # The header is read as the safetensors library reads it.
    with safe_open(tiny_checkpoint / "model.safetensors", "pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    assert read_safetensors_header(tiny_checkpoint / "model.safetensors") == shapes
    assert checkpoint.parameters == sum(math.prod(s) for s in shapes.values()) == 6_489_184
    assert checkpoint.summary() == (
        "custom size: vision 32×2 layers, text 64×2 layers, 6.5M parameters, random weights"
    )


@pytest.mark.parametrize(("size", "parameters"), [("256m", 256_484_928), ("500m", 507_482_304)])
def test_the_released_sizes_are_recognised(
    tmp_path: Path, tiny_checkpoint: Path, size: str, parameters: int
) -> None:
    from safetensors import safe_open

    assert released_size(tmp_path / size, size, tiny_checkpoint) == parameters
    with safe_open(tmp_path / size / "model.safetensors", "pt") as f:  # a valid file
        assert sum(math.prod(f.get_slice(n).get_shape()) for n in f.keys()) == parameters  # noqa: SIM118
    checkpoint = check_checkpoint(tmp_path / size)
    assert checkpoint.size == size and checkpoint.parameters == parameters
    assert (checkpoint.vision, checkpoint.text, checkpoint.scale_factor) == SIZES[size]
    assert checkpoint.tokens_per_tile == 64


def test_values_left_out_of_config_json_are_transformers_defaults(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """A saved config.json may leave out values equal to transformers' defaults (SmolVLM's has
    no vision num_hidden_layers): they are read as transformers reads them."""
    from transformers import Idefics3Config

    released_size(tmp_path / "256m", "256m", tiny_checkpoint)
    config = json.loads((tmp_path / "256m" / "config.json").read_text())
    del config["vision_config"]["num_hidden_layers"], config["vision_config"]["intermediate_size"]
    del config["text_config"]["head_dim"]
    (tmp_path / "256m" / "config.json").write_text(json.dumps(config))
    ours = check_checkpoint(tmp_path / "256m")
    theirs = Idefics3Config.from_pretrained(tmp_path / "256m")
    assert ours.size == "256m"
    v, t = theirs.vision_config, theirs.text_config
    assert ours.vision == VisionParams(
        v.hidden_size,
        v.intermediate_size,
        v.num_hidden_layers,
        v.num_attention_heads,
        v.image_size,
        v.patch_size,
    )
    assert ours.text == TextParams(
        t.hidden_size,
        t.intermediate_size,
        t.num_hidden_layers,
        t.num_attention_heads,
        t.num_key_value_heads,
        t.head_dim,
        t.vocab_size,
    )


def test_a_sharded_checkpoint_is_read(tiny_copy: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(tiny_copy / "model.safetensors")
    (tiny_copy / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[:10],
        "model-00002-of-00002.safetensors": names[10:],
    }
    for shard, members in shards.items():
        save_file({name: tensors[name] for name in members}, tiny_copy / shard)
    weight_map = {name: shard for shard, members in shards.items() for name in members}
    (tiny_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    checkpoint = check_checkpoint(tiny_copy)
    assert checkpoint.parameters == 6_489_184
    assert set(checkpoint.files) == TINY_FILES - {"model.safetensors"} | {
        "model.safetensors.index.json",
        *shards,
    }
    (tiny_copy / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r": missing model-00002-of-00002.safetensors \("):
        check_checkpoint(tiny_copy)


def rewrite_weights(folder: Path, change: Any) -> None:
    """Rewrite model.safetensors with ``change`` applied to its tensors (a dict)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors")


def corrupt(folder: Path, what: str) -> str:
    """Break the checkpoint in ``folder``; the one line it must be refused with (a regex)."""
    import torch

    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    if what == "folder":
        shutil.rmtree(folder)
        return rf"^{folder}: no such checkpoint folder$"
    if what.startswith("no "):
        (folder / what.removeprefix("no ")).unlink()
        listed = what.removeprefix("no ").replace(".", r"\.")
        return rf"^{folder}: missing {listed}\b.* Hugging Face layout, .* has them\)$"
    if what == "llama":
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
        (folder / "config.json").write_text(json.dumps(config))
        return rf"^{folder}/config.json: a LlamaForCausalLM checkpoint, not SmolVLM \(Idefics3\)$"
    if what == "config not JSON":
        (folder / "config.json").write_text("{'architectures': ")
        return rf"^{folder}/config.json: not JSON \(Expecting property name .*\)$"
    if what == "truncated":
        with weights.open("r+b") as f:
            f.truncate(size // 2)
        return rf"^{weights}: truncated: {size // 2} bytes, its header describes {size}$"
    if what == "garbage":
        with weights.open("r+b") as f:
            f.write(b"\x89PNG\r\n\x1a\n")
        length = struct.unpack("<Q", b"\x89PNG\r\n\x1a\n")[0]
        return rf"^{weights}: header length {length} does not fit the file's {size} bytes "
    if what == "header not JSON":
        with weights.open("r+b") as f:
            f.seek(8)
            f.write(b"\xff\xfe garbage")
        return rf"^{weights}: header is not JSON \(corrupt, or not safetensors\)$"
    connector = "model.connector.modality_projection.proj.weight"
    if what == "wrong shape":
        rewrite_weights(folder, lambda t: t.update({connector: torch.zeros(64, 256)}))
        return (
            rf"^{weights}: tensor {connector} has shape \[64, 256\], config.json needs \[64, 512\]$"
        )
    if what == "lm_head missing":
        rewrite_weights(folder, lambda t: t.pop("lm_head.weight"))
        return rf"^{weights}: tensor lm_head.weight is missing \(config.json does not tie it "
    assert what == "a layer short"
    layer = "model.text_model.layers.1."
    rewrite_weights(folder, lambda t: [t.pop(n) for n in list(t) if n.startswith(layer)])
    return rf"^{weights}: has 1 text layers, config.json says 2$"


BAD_INPUTS = [
    "folder",
    "no config.json",
    "no tokenizer.json",
    "no tokenizer_config.json",
    "no preprocessor_config.json",
    "no chat_template.json",
    "no model.safetensors",
    "llama",
    "config not JSON",
    "truncated",
    "garbage",
    "header not JSON",
    "wrong shape",
    "lm_head missing",
    "a layer short",
]


@pytest.mark.parametrize("what", BAD_INPUTS)
def test_a_bad_checkpoint_is_refused_with_one_line(
    what: str,
    tiny_copy: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    expected = corrupt(tiny_copy, what)
    with pytest.raises(CheckpointError, match=expected):
        check_checkpoint(tiny_copy)
    monkeypatch.setenv("GAZECAM_MODELS_DIR", str(tmp_path / "cache"))
    assert main(["models", "import", "smolvlm-256m", str(tiny_copy)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("gazecam: error: ")
    assert not (tmp_path / "cache").exists()  # refused before the cache is touched


def test_import_copies_the_checkpoint_into_the_cache_and_list_shows_it(
    tiny_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("GAZECAM_MODELS_DIR", str(cache))
    monkeypatch.delenv("GAZECAM_MODEL_PATH", raising=False)
    monkeypatch.delenv("GAZECAM_VLM", raising=False)
    settings = ModelSettings()
    assert vlm_checkpoint(settings) is None
    assert main(["models", "import", "smolvlm-256m", str(tiny_checkpoint)]) == 0
    installed = cache / "smolvlm-256m"
    summary = "custom size: vision 32×2 layers, text 64×2 layers, 6.5M parameters, random weights"
    out, err = capsys.readouterr()
    assert out == f"smolvlm-256m: {installed} ({summary})\n"
    # Not a terminal: the copy's progress is one line, with the size.
    assert err == f"smolvlm-256m: copying 9 files into {installed} (16.5MB)\n"
    assert [p.name for p in cache.iterdir()] == ["smolvlm-256m"]
    assert {p.name for p in installed.iterdir()} == TINY_FILES
    for name in TINY_FILES:
        assert (installed / name).read_bytes() == (tiny_checkpoint / name).read_bytes()

    assert main(["models", "list"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if "smolvlm" in line]
    assert listed == [
        f"{'smolvlm-256m':20} {CHECKPOINT_LICENCE:40} {installed} ({summary})",
        f"{'smolvlm-500m':20} {CHECKPOINT_LICENCE:40} not installed: gazecam models fetch "
        "smolvlm-500m, or gazecam models import smolvlm-500m DIR",
    ]

    found = vlm_checkpoint(settings)
    assert found is not None and found.path == installed and found.random_weights
    # fetch finds it installed: no download.
    assert main(["models", "fetch", "smolvlm-256m"]) == 0
    assert capsys.readouterr().out == f"smolvlm-256m: {installed} ({summary})\n"

    # Imported again: replaced, nothing else left in the cache.
    assert main(["models", "import", "smolvlm-256m", str(tiny_checkpoint)]) == 0
    assert [p.name for p in cache.iterdir()] == ["smolvlm-256m"]


def test_an_explicit_folder_wins_and_is_checked(
    tiny_checkpoint: Path, tiny_copy: Path, tmp_path: Path
) -> None:
    settings = ModelSettings(models_dir=tmp_path / "cache", model_path=[], vlm=tiny_copy)
    import_checkpoint("smolvlm-500m", tiny_checkpoint, settings)
    found = vlm_checkpoint(settings)
    assert found is not None and found.path == tiny_copy
    corrupt(tiny_copy, "truncated")
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated"):
        vlm_checkpoint(settings)
    # Without it: the installed smolvlm-500m (no smolvlm-256m).
    found = vlm_checkpoint(ModelSettings(models_dir=tmp_path / "cache", model_path=[]))
    assert found is not None and found.path == tmp_path / "cache" / "smolvlm-500m"


def test_the_other_released_size_is_refused(
    tmp_path: Path,
    tiny_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "SmolVLM-500M-Instruct"
    released_size(folder, "500m", tiny_checkpoint)
    monkeypatch.setenv("GAZECAM_MODELS_DIR", str(tmp_path / "cache"))
    assert main(["models", "import", "smolvlm-256m", str(folder)]) == 2
    assert capsys.readouterr().err == (
        f"gazecam: error: {folder}: a SmolVLM-500M checkpoint, not smolvlm-256m; "
        "import it as smolvlm-500m\n"
    )
    assert not (tmp_path / "cache").exists()


def test_an_interrupted_import_leaves_nothing(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while the weights are copied: no folder that could pass for a checkpoint."""
    settings = ModelSettings(models_dir=tmp_path / "cache", model_path=[])
    progress = install_module.progress

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        bar = progress(*args, **kwargs)

        def update(n: int) -> None:
            if bar.n > 1 << 20:  # past the first MiB
                raise KeyboardInterrupt
            bar.n += n

        bar.update = update
        return bar

    monkeypatch.setattr(install_module, "progress", interrupted)
    with pytest.raises(KeyboardInterrupt):
        import_checkpoint("smolvlm-256m", tiny_checkpoint, settings)
    assert list((tmp_path / "cache").iterdir()) == []
    assert vlm_checkpoint(settings) is None


REPO_ID = "HuggingFaceTB/SmolVLM-256M-Instruct"


@pytest.fixture
def local_hub(tiny_checkpoint: Path) -> Iterator[tuple[str, list[str], set[str]]]:
    """A Hugging Face Hub on 127.0.0.1 whose SmolVLM-256M-Instruct repository holds the tiny
    checkpoint's files plus the ONNX exports and README the real one has (the paths that
    ``gazecam models fetch`` must not download); yields its address, the paths requested, and
    the set of files whose download it cuts short (the connection drops halfway)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    files = {p.name: p.read_bytes() for p in tiny_checkpoint.iterdir()}
    files |= {"README.md": b"# SmolVLM\n", "onnx/vision_encoder.onnx": b"onnx " * 1000}
    requested: list[str] = []
    cut_short: set[str] = set()

    class Hub(BaseHTTPRequestHandler):
        # The three endpoints huggingface_hub's snapshot_download asks: the revision, its file
        # tree, and each file (HEAD for its metadata, then GET).
        def do_HEAD(self) -> None:
            self.answer(with_body=False)

        def do_GET(self) -> None:
            self.answer(with_body=True)

        def answer(self, with_body: bool) -> None:
            path = self.path.split("?")[0]
            requested.append(path)
            if path == f"/api/models/{REPO_ID}/revision/main":
                body = json.dumps({"id": REPO_ID, "sha": commit}).encode()
            elif path == f"/api/models/{REPO_ID}/tree/{commit}":
                tree = [
                    {"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for n, b in files.items()
                ]
                body = json.dumps(tree).encode()
            elif path.removeprefix(f"/{REPO_ID}/resolve/{commit}/") in files:
                body = files[path.removeprefix(f"/{REPO_ID}/resolve/{commit}/")]
            else:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
            self.send_header("X-Repo-Commit", commit)
            self.end_headers()
            if with_body:
                cut = path.rsplit("/", 1)[-1] in cut_short
                self.wfile.write(body[: len(body) // 2] if cut else body)

        def log_message(self, *args: Any) -> None:
            pass  # requests are recorded above

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested, cut_short
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def test_fetch_downloads_the_checkpoint_from_the_hub_and_imports_it(
    tiny_checkpoint: Path, tmp_path: Path, local_hub: tuple[str, list[str], set[str]]
) -> None:
    hub, requested, _ = local_hub
    cache = tmp_path / "cache"
    result = gazecam_offline(
        tmp_path, "models", "fetch", "smolvlm-256m", hub=hub, GAZECAM_MODELS_DIR=str(cache)
    )
    assert result.returncode == 0, result.stderr
    installed = cache / "smolvlm-256m"
    summary = "custom size: vision 32×2 layers, text 64×2 layers, 6.5M parameters, random weights"
    assert result.stdout == f"smolvlm-256m: {installed} ({summary})\n"
    assert result.stderr.startswith(f"smolvlm-256m: downloading {REPO_ID} from the Hugging Face")
    assert result.stderr.endswith(f"smolvlm-256m: copying 9 files into {installed} (16.5MB)\n")
    assert [p.name for p in cache.iterdir()] == ["smolvlm-256m"]  # no download folder left
    for name in TINY_FILES:
        assert (installed / name).read_bytes() == (tiny_checkpoint / name).read_bytes()
    downloaded = {p.rsplit("/", 1)[-1] for p in requested if "/resolve/" in p}
    assert downloaded == TINY_FILES  # not the ONNX exports, not the README


def test_a_download_cut_short_leaves_nothing_in_the_cache(
    tmp_path: Path, local_hub: tuple[str, list[str], set[str]]
) -> None:
    hub, _, cut_short = local_hub
    cut_short.add("model.safetensors")
    cache = tmp_path / "cache"
    result = gazecam_offline(
        tmp_path, "models", "fetch", "smolvlm-256m", hub=hub, GAZECAM_MODELS_DIR=str(cache)
    )
    assert result.returncode == 2 and result.stdout == ""
    error = result.stderr.splitlines()[-1]
    assert error.startswith("gazecam: error: smolvlm-256m: no download from the Hugging Face Hub (")
    assert error.endswith(
        f"); download {REPO_ID} on a connected machine, then run: "
        "gazecam models import smolvlm-256m DIR"
    )
    assert list(cache.iterdir()) == []
