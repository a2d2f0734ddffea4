"""Task cards: a procedure as YAML, its steps and the cues that show which step is under way.

A card looks like this::

    name: Replace the fuse
    steps:
      - title: Remove the cover
        instruction: Undo the four screws and lift the cover off.
        cues:
          text: ["remove cover"]      # OCR text that shows this step (case/space-insensitive)
          objects: ["screwdriver"]    # COCO class names the detector reports
      - title: Check the fuse
        instruction: Pull the fuse and hold it against the light.

Cues are optional. A bad card is refused with a one-line ``ConfigError`` that names the file,
the field path and the problem; list positions in the path count from 1, as steps do everywhere
else (``step.set:2`` is the second step, and so is ``steps.2``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from gazecam.errors import ConfigError


def normalise_cue(text: str) -> str:
    """Case-fold ``text`` and keep only letters and digits: "2 Check-Fuse" -> "2checkfuse".

    OCR splits, joins and punctuates words unpredictably, so cues and OCR text are compared in
    this form (a text cue matches when its form is contained in the OCR line's form).
    """
    return "".join(ch for ch in text.casefold() if ch.isalnum())


def _has_letter_or_digit(cue: str) -> str:
    # A cue with no letters or digits normalises to "", which every OCR line would contain.
    if not normalise_cue(cue):
        raise ValueError("a cue needs at least one letter or digit")
    return cue


NonEmptyText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
Cue = Annotated[NonEmptyText, AfterValidator(_has_letter_or_digit)]
_FROZEN = ConfigDict(frozen=True, extra="forbid")


class Cues(BaseModel):
    """What perception may see while a step is under way."""

    model_config = _FROZEN

    text: tuple[Cue, ...] = Field(
        (), description="Text that shows this step (OCR; compared case- and space-insensitively)."
    )
    objects: tuple[Cue, ...] = Field(
        (), description="Object class names (COCO, e.g. 'stop sign') that show this step."
    )


class Step(BaseModel):
    """One step of a procedure."""

    model_config = _FROZEN

    title: NonEmptyText = Field(description="Short name of the step, shown to the wearer.")
    instruction: str = Field(description="What to do in this step, in a sentence or two.")
    cues: Cues = Field(Cues(), description="Evidence that this step is under way (optional).")


class TaskCard(BaseModel):
    """A procedure: its name and its steps in order."""

    model_config = _FROZEN

    name: NonEmptyText = Field(description="Name of the procedure.")
    steps: tuple[Step, ...] = Field(min_length=1, description="The steps, in order.")

    @classmethod
    def from_yaml_text(cls, text: str, source_name: str) -> TaskCard:
        """Parse and validate a card; ``source_name`` (a file name) starts any error message."""
        try:
            data: Any = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source_name}: {_yaml_problem(exc)}") from exc
        if data is None:
            raise ConfigError(f"{source_name}: the task card is empty (needs name and steps)")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{source_name}: {_first_problem(exc)}") from exc


def load_task_card(path: str | Path) -> TaskCard:
    """Read and validate the task card at ``path``; any problem raises a one-line ConfigError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the task card ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    return TaskCard.from_yaml_text(text, str(path))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
    return "YAML syntax error: " + " ".join(str(exc).split())


def _first_problem(exc: ValidationError) -> str:
    """The first error as ``field.path: message``, counting list positions from 1."""
    locs = [error["loc"] for error in exc.errors()]
    # A list that fails only because an item in it did ("at least 1 item after validation")
    # is no problem of its own: keep errors whose path is not the start of another's.
    errors = [
        error
        for error in exc.errors()
        if not any(
            len(o) > len(error["loc"]) and o[: len(error["loc"])] == error["loc"] for o in locs
        )
    ]
    first = errors[0]
    path = ".".join(str(part + 1) if isinstance(part, int) else part for part in first["loc"])
    line = f"{path or 'top level'}: {first['msg']}"
    more = len(errors) - 1
    if more:
        line += f" (and {more} more problem{'s' if more > 1 else ''})"
    return line
