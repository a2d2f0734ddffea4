"""Task cards: a valid card loads; every kind of bad card gives one line naming file and field."""

from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np
import pydantic
import pytest

from gazecam.assist.tasks import (
    MAX_CARD_BYTES,
    MAX_PHOTO_BYTES,
    MAX_PHOTO_SIDE_PX,
    MAX_STEP_PHOTOS,
    MAX_STEPS,
    MAX_YAML_DEPTH,
    CardTooLargeError,
    TaskCard,
    load_task_card,
    normalise_cue,
)
from gazecam.errors import ConfigError
from gazecam.server.settings import ServerSettings

VALID = """\
name: Replace the fuse
steps:
  - title: Remove cover
    instruction: Undo the four screws.
    cues:
      text: ["remove cover"]
      objects: ["screwdriver"]
  - title: Check fuse
    instruction: Hold the fuse against the light.
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "card.yaml"
    path.write_text(text)
    return path


def refusal(path: Path) -> ConfigError:
    """The error that refuses the card at ``path``."""
    with pytest.raises(ConfigError) as caught:
        load_task_card(path)
    return caught.value


def test_valid_card_loads(tmp_path: Path) -> None:
    card = load_task_card(write(tmp_path, VALID))
    assert card.name == "Replace the fuse"
    assert [s.title for s in card.steps] == ["Remove cover", "Check fuse"]
    assert card.steps[0].cues.text == ("remove cover",)
    assert card.steps[0].cues.objects == ("screwdriver",)
    # Cues are optional.
    assert card.steps[1].cues.text == () and card.steps[1].cues.objects == ()
    assert TaskCard.from_yaml_text(VALID, "inline") == card


def test_card_is_frozen() -> None:
    card = TaskCard.from_yaml_text(VALID, "inline")
    with pytest.raises(pydantic.ValidationError):
        card.name = "other"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "name: x\nsteps:\n  - {title: a, instruction: b}\n  - {instruction: c}\n",
            "steps.2.title: Field required",
        ),
        (
            "name: x\nsteps: []\n",
            "steps: Tuple should have at least 1 item after validation, not 0",
        ),
        ("steps:\n  - {title: a, instruction: b}\n", "name: Field required"),
        (
            "name: x\nsteps:\n  - {title: '  ', instruction: b}\n",
            "steps.1.title: String should have at least 1 character",
        ),
        (
            "name: x\nsteps:\n  - {title: a, instruction: b, cue: {text: [a]}}\n",
            "steps.1.cue: Extra inputs are not permitted",
        ),
        (
            "name: x\nsteps:\n  - {title: a, instruction: b, cues: {text: [ok, '--']}}\n",
            "steps.1.cues.text.2: Value error, a cue needs at least one letter or digit",
        ),
        (
            "name: x\nsteps:\n  - {title: a, instruction: b, cues: {words: [a]}}\n",
            "steps.1.cues.words: Extra inputs are not permitted",
        ),
        (
            "name: x\nsteps:\n  - {title: a}\n  - {title: 7, instruction: b}\n",
            "steps.1.instruction: Field required (and 1 more problem)",
        ),
        (
            "- just\n- a list\n",
            "top level: Input should be a valid dictionary or instance of TaskCard",
        ),
        ("", "the task card is empty (needs name and steps)"),
        (
            "name: x\nsteps:\n  - title: [a\n",
            "YAML syntax error at line 4, column 1: expected ',' or ']', but got '<stream end>'",
        ),
        (
            "name: x\n  steps: 1\n",
            "YAML syntax error at line 2, column 8: mapping values are not allowed here",
        ),
    ],
)
def test_bad_card_gives_one_line_naming_file_and_field(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = write(tmp_path, text)
    error = refusal(path)
    assert str(error) == f"{path}: {problem}"
    assert "\n" not in str(error)


def test_missing_or_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read the task card"):
        load_task_card(missing)
    binary = tmp_path / "card.yaml"
    binary.write_bytes(b"name: \xff\n")
    with pytest.raises(ConfigError, match=r"card\.yaml: not UTF-8 text \(byte 6\)"):
        load_task_card(binary)


def test_a_card_file_over_the_size_limit_is_refused_unread(tmp_path: Path) -> None:
    card = tmp_path / "card.yaml"
    text = "name: Fill\nsteps:\n  - {title: One, instruction: Do it.}\n# "
    card.write_text(text + "x" * (MAX_CARD_BYTES - len(text)))
    assert card.stat().st_size == MAX_CARD_BYTES
    assert load_task_card(card).name == "Fill"
    message = rf"^{card}: a task card file may be at most 65536 bytes$"
    with card.open("a") as file:
        file.write("x")
    with pytest.raises(CardTooLargeError, match=message):
        load_task_card(card)
    with card.open("r+b") as file:
        file.truncate(1 << 30)  # sparse: 1 GiB of zeros that is never read
    with pytest.raises(CardTooLargeError, match=message):
        load_task_card(card)
    assert ServerSettings().max_task_bytes == MAX_CARD_BYTES  # the same default limit


def test_normalise_cue_ignores_case_spaces_and_punctuation() -> None:
    assert normalise_cue("2 Check-Fuse.") == "2checkfuse"
    assert normalise_cue("STOP  sign") == "stopsign"


def steps_yaml(count: int, title: str = "Step") -> str:
    return "".join(f"  - {{title: {title} {i}, instruction: Do it.}}\n" for i in range(count))


def test_a_card_at_its_size_limits_loads() -> None:
    card = TaskCard.from_yaml_text(
        f"name: {'n' * 120}\nsteps:\n{steps_yaml(MAX_STEPS, 't' * 77)}", "inline"
    )
    assert len(card.steps) == MAX_STEPS and len(card.steps[-1].title) == 80
    # Instructions have no length limit: the assistant cuts them to its context budget.
    long = TaskCard.from_yaml_text(
        f"name: x\nsteps:\n  - {{title: a, instruction: {'w ' * 20_000}}}\n", "inline"
    )
    assert len(long.steps[0].instruction) > 39_000


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            f"name: x\nsteps:\n{steps_yaml(MAX_STEPS + 1)}",
            f"steps: Tuple should have at most {MAX_STEPS} items after validation, not 51",
        ),
        (
            f"name: x\nsteps:\n  - {{title: {'t' * 81}, instruction: b}}\n",
            "steps.1.title: String should have at most 80 characters",
        ),
        (
            f"name: {'n' * 121}\nsteps:\n  - {{title: a, instruction: b}}\n",
            "name: String should have at most 120 characters",
        ),
    ],
)
def test_a_card_over_a_size_limit_is_refused_as_too_large(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = write(tmp_path, text)
    error = refusal(path)
    assert isinstance(error, CardTooLargeError)
    assert str(error) == f"{path}: {problem}"


NESTED = f"nested deeper than {MAX_YAML_DEPTH} levels (a task card needs 6)"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[" * 10_000 + "]" * 10_000, f"YAML at line 1, column 17: {NESTED}"),
        ("{a: " * 10_000 + "1" + "}" * 10_000, f"YAML at line 1, column 62: {NESTED}"),
        (
            "".join(f"{'  ' * i}k{i}:\n" for i in range(200)) + "  " * 200 + "x\n",
            f"YAML at line 16, column 31: {NESTED}",
        ),
        (
            # "Billion laughs": nine levels of nine aliases would be 9^9 values to validate.
            "a: &a [l, l, l, l, l, l, l, l, l]\n"
            + "".join(
                f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n"
                for i in range(8)
            )
            + "name: *i\nsteps: [{title: a, instruction: b}]\n",
            "YAML at line 2, column 8: aliases (*name) are not allowed in a task card",
        ),
    ],
)
def test_deep_nesting_and_aliases_are_refused_in_one_line(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = write(tmp_path, text)
    assert str(refusal(path)) == f"{path}: {problem}"


def long_card_yaml(steps: int = 6, instruction_chars: int = 5000) -> str:
    """A valid card of long steps: by default about 30 KB, 7,400 tokens of SmolLM2."""
    rng = random.Random(0)
    text = (
        "undo the four screws on front cover lift it off and set aside a clean cloth so "
        "gaskets stay free of dust check each thread for damage before you go on"
    )
    words = text.split()
    lines = []
    for i in range(1, steps + 1):
        sentences = []
        while sum(len(s) + 1 for s in sentences) < instruction_chars:
            sentences.append(" ".join(rng.choices(words, k=12)).capitalize() + ".")
        lines.append(f"  - title: Long step {i}\n    instruction: {' '.join(sentences)}\n")
    return "name: A long procedure\nsteps:\n" + "".join(lines)


def test_a_long_card_is_valid() -> None:
    text = long_card_yaml()
    assert 29_000 < len(text.encode()) < 32_000
    card = TaskCard.from_yaml_text(text, "inline")
    assert len(card.steps) == 6 and all(len(s.instruction) >= 5000 for s in card.steps)


PHOTO_CARD = """\
name: Replace the fuse
steps:
  - title: Remove cover
    instruction: Undo the four screws.
    cues: {images: [photos/cover.png, wide.jpg]}
  - title: Check fuse
    instruction: Hold the fuse against the light.
"""


def png(width_px: int, height_px: int) -> bytes:
    """A PNG of a gradient, so that its pixels tell where they came from."""
    image = np.zeros((height_px, width_px, 3), np.uint8)
    image[..., 2] = np.linspace(0, 255, width_px, dtype=np.uint8)
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def photo_card(tmp_path: Path, photos: dict[str, bytes], text: str = PHOTO_CARD) -> Path:
    for name, data in photos.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    return write(tmp_path, text)


def test_a_card_s_photos_are_read_from_its_folder_and_decoded(tmp_path: Path) -> None:
    wide = cv2.imencode(".jpg", np.full((1000, 2000, 3), 90, np.uint8))[1].tobytes()
    card = load_task_card(photo_card(tmp_path, {"photos/cover.png": png(64, 48), "wide.jpg": wide}))
    assert card.steps[0].cues.images == ("photos/cover.png", "wide.jpg")
    cover, wide_photo = card.photos[0]
    assert card.photos[1] == ()
    assert cover.name == "photos/cover.png" and cover.image_bgr.shape == (48, 64, 3)
    assert cover.image_bgr[0, -1, 2] == 255  # decoded as BGR, the red ramp kept
    # A big photo is kept at the crop's size: 448 px on its long side.
    assert wide_photo.image_bgr.shape == (224, 448, 3)
    assert abs(int(wide_photo.image_bgr[100, 200, 0]) - 90) <= 2
    # The same card from text, with the photos from elsewhere (as the service gets them).
    uploaded = {"photos/cover.png": png(64, 48), "wide.jpg": wide}
    assert TaskCard.from_yaml_text(PHOTO_CARD, "inline", uploaded.__getitem__) == card


def test_photo_paths_must_be_relative() -> None:
    with pytest.raises(ConfigError) as caught:
        TaskCard.from_yaml_text(PHOTO_CARD.replace("wide.jpg", "/etc/passwd"), "c.yaml")
    assert str(caught.value) == (
        "c.yaml: steps.1.cues.images.2: Value error, a photo path must be relative to the card"
    )


@pytest.mark.parametrize(
    ("wide", "error", "problem"),
    [
        (None, ConfigError, "'wide.jpg': cannot read it (No such file or directory)"),
        (b"name: not a photo\n", ConfigError, "'wide.jpg': not an image"),
        (png(64, 48)[:80], ConfigError, "'wide.jpg': not an image (it cannot be decoded)"),
        (
            png(64, 48) + b"\0" * MAX_PHOTO_BYTES,
            CardTooLargeError,
            f"'wide.jpg': a photo may be at most {MAX_PHOTO_BYTES} bytes",
        ),
        (
            png(MAX_PHOTO_SIDE_PX + 1, 2),
            CardTooLargeError,
            f"'wide.jpg': {MAX_PHOTO_SIDE_PX + 1}×2 px, a photo may be at most "
            f"{MAX_PHOTO_SIDE_PX} px on a side",
        ),
    ],
    ids=["missing", "not-an-image", "truncated", "too-many-bytes", "too-many-pixels"],
)
def test_a_bad_photo_gives_one_line_naming_its_field(
    tmp_path: Path, wide: bytes | None, error: type[ConfigError], problem: str
) -> None:
    photos = {"photos/cover.png": png(64, 48)} | ({} if wide is None else {"wide.jpg": wide})
    path = photo_card(tmp_path, photos)
    refused = refusal(path)
    assert type(refused) is error
    assert str(refused) == f"{path}: steps.1.cues.images.2 {problem}"


def test_a_photo_that_is_a_folder_is_unreadable(tmp_path: Path) -> None:
    path = photo_card(tmp_path, {"photos/cover.png": png(64, 48)})
    (tmp_path / "wide.jpg").mkdir()
    with pytest.raises(ConfigError, match=r"steps\.1\.cues\.images\.2 'wide.jpg': cannot read it"):
        load_task_card(path)


def test_a_card_naming_photos_needs_them() -> None:
    with pytest.raises(ConfigError) as caught:
        TaskCard.from_yaml_text(PHOTO_CARD, "task card")
    assert str(caught.value) == (
        "task card: steps.1.cues.images.1 'photos/cover.png': cannot read it "
        "(no photos come with this card)"
    )


def test_a_step_may_have_at_most_eight_photos() -> None:
    names = ", ".join(f"p{i}.png" for i in range(MAX_STEP_PHOTOS + 1))
    text = f"name: x\nsteps:\n  - {{title: t, instruction: i, cues: {{images: [{names}]}}}}\n"
    with pytest.raises(CardTooLargeError, match=r"^c: steps\.1\.cues\.images: Tuple should have"):
        TaskCard.from_yaml_text(text, "c")
