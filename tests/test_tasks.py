"""Task cards: a valid card loads; every kind of bad card gives one line naming file and field."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from gazecam.errors import ConfigError
from gazecam.tasks import TaskCard, load_task_card, normalise_cue

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
    with pytest.raises(ConfigError) as caught:
        load_task_card(path)
    assert str(caught.value) == f"{path}: {problem}"
    assert "\n" not in str(caught.value)


def test_missing_or_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read the task card"):
        load_task_card(missing)
    binary = tmp_path / "card.yaml"
    binary.write_bytes(b"name: \xff\n")
    with pytest.raises(ConfigError, match=r"card\.yaml: not UTF-8 text \(byte 6\)"):
        load_task_card(binary)


def test_normalise_cue_ignores_case_spaces_and_punctuation() -> None:
    assert normalise_cue("2 Check-Fuse.") == "2checkfuse"
    assert normalise_cue("STOP  sign") == "stopsign"
