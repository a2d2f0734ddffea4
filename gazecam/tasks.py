"""Task cards: a procedure as YAML, its steps and the cues that show which step is under way.

A card looks like this::

    name: Replace the fuse
    steps:
      - title: Remove the cover
        instruction: Undo the four screws and lift the cover off.
        cues:
          text: ["remove cover"]      # OCR text that shows this step (case/space-insensitive)
          objects: ["screwdriver"]    # class names: COCO (detector) or ImageNet (classifier)
      - title: Check the fuse
        instruction: Pull the fuse and hold it against the light.

Cues are optional. A bad card is refused with a one-line ``ConfigError`` that names the file,
the field path and the problem; list positions in the path count from 1, as steps do everywhere
else (``step.set:2`` is the second step, and so is ``steps.2``).

A card has at most ``MAX_STEPS`` steps, and its name and titles are short: they are said in
every answer's lead sentence, and the assistant's context must hold every step of the card at
least by the start of its title (``gazecam.assistant.context_text``). A card over one of these
limits is refused as too large (``CardTooLargeError``). Instructions may be of any length: the
assistant cuts them to fit its context budget. The YAML may nest at most ``MAX_YAML_DEPTH``
levels and may not use aliases (``*name``): a card needs neither, and both could otherwise
exhaust the process (recursion, or the exponential expansion of nested aliases). A card file
larger than ``MAX_CARD_BYTES`` is refused before it is parsed (the service's default limit on a
posted card, GAZECAM_MAX_TASK_BYTES, is the same number): a card that size holds every step of
the largest card the assistant can use, and a file is read no further than that.
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

MAX_STEPS = 50
MAX_NAME_CHARS = 120
MAX_TITLE_CHARS = 80
# A card's deepest value (a cue) is 6 levels down: card, steps, step, cues, text, cue.
MAX_YAML_DEPTH = 16
MAX_CARD_BYTES = 65_536


class CardTooLargeError(ConfigError):
    """A task card over one of its size limits (bytes, steps, name or title length)."""


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
        (),
        description="Object class names that show this step: COCO's (the detector, e.g. 'stop "
        "sign') or ImageNet's (the classifier, e.g. 'padlock'; gazecam/data/imagenet/classes.txt).",
    )


class Step(BaseModel):
    """One step of a procedure."""

    model_config = _FROZEN

    title: NonEmptyText = Field(
        max_length=MAX_TITLE_CHARS, description="Short name of the step, shown to the wearer."
    )
    instruction: str = Field(
        description="What to do in this step, in a sentence or two (a longer one is cut in "
        "the language model's prompt)."
    )
    cues: Cues = Field(Cues(), description="Evidence that this step is under way (optional).")


class TaskCard(BaseModel):
    """A procedure: its name and its steps in order."""

    model_config = _FROZEN

    name: NonEmptyText = Field(max_length=MAX_NAME_CHARS, description="Name of the procedure.")
    steps: tuple[Step, ...] = Field(
        min_length=1, max_length=MAX_STEPS, description="The steps, in order."
    )

    @classmethod
    def from_yaml_text(cls, text: str, source_name: str) -> TaskCard:
        """Parse and validate a card; ``source_name`` (a file name) starts any error message."""
        try:
            data: Any = yaml.load(text, _CardLoader)  # a SafeLoader: plain data only
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source_name}: {_yaml_problem(exc)}") from exc
        if data is None:
            raise ConfigError(f"{source_name}: the task card is empty (needs name and steps)")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problem, too_long = _first_problem(exc)
            error = CardTooLargeError if too_long else ConfigError
            raise error(f"{source_name}: {problem}") from exc


def load_task_card(path: str | Path) -> TaskCard:
    """Read and validate the task card at ``path``; any problem raises a one-line ConfigError."""
    try:
        with Path(path).open("rb") as file:
            data = file.read(MAX_CARD_BYTES + 1)  # a bigger file is not read any further
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the task card ({exc.strerror})") from exc
    if len(data) > MAX_CARD_BYTES:
        raise CardTooLargeError(f"{path}: a task card file may be at most {MAX_CARD_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    return TaskCard.from_yaml_text(text, str(path))


class _RefusedYAML(yaml.MarkedYAMLError):  # type: ignore[misc]  # yaml is untyped here
    """Well-formed YAML that a task card never needs and that could exhaust the process."""


class _CardLoader(yaml.SafeLoader):  # type: ignore[misc]
    """PyYAML's SafeLoader, refusing aliases and nesting deeper than ``MAX_YAML_DEPTH``.

    The composer builds nodes recursively, one Python frame per level, so ``[[[...]]]`` 10,000
    deep raised RecursionError; counting the depth here refuses it at its 17th level. Aliases
    are refused outright: ``safe_load`` shares the aliased node, but validating the card walks
    every reference, so nine nested levels of nine aliases each are 9^9 values.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            problem = "aliases (*name) are not allowed in a task card"
            raise _RefusedYAML(None, None, problem, event.start_mark)
        if self._depth == MAX_YAML_DEPTH:
            problem = f"nested deeper than {MAX_YAML_DEPTH} levels (a task card needs 6)"
            raise _RefusedYAML(None, None, problem, event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        kind = "YAML" if isinstance(exc, _RefusedYAML) else "YAML syntax error"
        return f"{kind} at line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
    return "YAML syntax error: " + " ".join(str(exc).split())


def _first_problem(exc: ValidationError) -> tuple[str, bool]:
    """The first error as ``field.path: message``, counting list positions from 1, and whether
    it is a value over its length limit."""
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
    return line, first["type"] in ("too_long", "string_too_long")
