"""Task cards: a procedure as YAML, its steps and the cues that show which step is under way.

A card looks like this::

    name: Replace the fuse
    steps:
      - title: Remove the cover
        instruction: Undo the four screws and lift the cover off.
        cues:
          text: ["remove cover"]      # OCR text that shows this step (case/space-insensitive)
          objects: ["screwdriver"]    # class names: COCO (detector) or ImageNet (classifier)
          images: [remove_cover.jpg]  # reference photos, paths relative to the card file
      - title: Check the fuse
        instruction: Pull the fuse and hold it against the light.

Cues are optional. A bad card is refused with a one-line ``ConfigError`` that names the file,
the field path and the problem; list positions in the path count from 1, as steps do everywhere
else (``step.set:2`` is the second step, and so is ``steps.2``).

A card has at most ``MAX_STEPS`` steps, and its name and titles are short: they are said in
answers' fact sentences, and the assistant's context must hold every step of the card at
least by the start of its title (``gazecam.assist.context.context_text``). A card over one of these
limits is refused as too large (``CardTooLargeError``). Instructions may be of any length: the
assistant cuts them to fit its context budget. The YAML may nest at most ``MAX_YAML_DEPTH``
levels and may not use aliases (``*name``): a card needs neither, and both could otherwise
exhaust the process (recursion, or the exponential expansion of nested aliases). A card file
larger than ``MAX_CARD_BYTES`` is refused before it is parsed (the service's default limit on a
posted card, GAZECAM_MAX_TASK_BYTES, is the same number): a card that size holds every step of
the largest card the assistant can use, and a file is read no further than that.

A card's photos are read and decoded when it is loaded (``TaskCard.photos``), so that nothing
later reads a file: from the card's folder for a card file, from the uploaded files for a card
posted to the service. A photo that is missing, unreadable or not an image is refused with a
``ConfigError`` naming its field (``card.yaml: steps.3.cues.images.1 'step3.jpg': not an
image``); one over ``MAX_PHOTO_BYTES`` or ``MAX_PHOTO_SIDE_PX``, or more than
``MAX_STEP_PHOTOS`` to a step, as too large. Its size is read from the file's header before
it is decoded: a small PNG can hold gigapixels of zeros.
"""

from __future__ import annotations

import errno
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

import cv2
import numpy as np
import yaml
from PIL import Image
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationError,
)

from gazecam.errors import ConfigError
from gazecam.records import BGRImage

MAX_STEPS = 50
MAX_NAME_CHARS = 120
MAX_TITLE_CHARS = 80
# A card's deepest value (a cue) is 6 levels down: card, steps, step, cues, text, cue.
MAX_YAML_DEPTH = 16
MAX_CARD_BYTES = 65_536
# A 12-megapixel phone photo (4032 × 3024) is 3-5 MB as a JPEG: the limits let it through and
# refuse what no camera takes (decoding 4096 × 4096 takes 50 MB for a moment).
MAX_PHOTO_BYTES = 8 << 20
MAX_PHOTO_SIDE_PX = 4096
MAX_STEP_PHOTOS = 8
# Photos are kept no larger than a keyframe's crop (448 px), which is what they are compared
# with: the encoder sees both at 224 px, and 50 steps of 8 full-size photos would take 15 GB.
PHOTO_KEEP_SIDE_PX = 448
# Reads a photo's bytes by its name in the card; OSError (its strerror says why) if it cannot.
PhotoReader = Callable[[str], bytes]


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


def _relative_path(name: str) -> str:
    if PurePosixPath(name).is_absolute() or Path(name).is_absolute():
        raise ValueError("a photo path must be relative to the card")
    return name


NonEmptyText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
Cue = Annotated[NonEmptyText, AfterValidator(_has_letter_or_digit)]
PhotoPath = Annotated[NonEmptyText, AfterValidator(_relative_path)]
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
    images: tuple[PhotoPath, ...] = Field(
        (),
        max_length=MAX_STEP_PHOTOS,
        description="Reference photos of what this step looks like: paths relative to the "
        "card file (or the names of the files uploaded with it).",
    )


@dataclass(frozen=True, slots=True)
class CardPhoto:
    """A step's reference photo, decoded: its name in the card and its pixels."""

    name: str
    image_bgr: BGRImage = field(repr=False, compare=False)  # long side <= PHOTO_KEEP_SIDE_PX


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
    _photos: tuple[tuple[CardPhoto, ...], ...] = PrivateAttr(())

    @property
    def photos(self) -> tuple[tuple[CardPhoto, ...], ...]:
        """Each step's decoded reference photos, in card order (empty where it has none)."""
        return self._photos

    @classmethod
    def from_yaml_text(
        cls, text: str, source_name: str, read_photo: PhotoReader | None = None
    ) -> TaskCard:
        """Parse and validate a card; ``source_name`` (a file name) starts any error message.

        ``read_photo`` gives the bytes of each photo the card names; without it, a card that
        names one is refused.
        """
        try:
            data: Any = yaml.load(text, _CardLoader)  # a SafeLoader: plain data only
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source_name}: {_yaml_problem(exc)}") from exc
        if data is None:
            raise ConfigError(f"{source_name}: the task card is empty (needs name and steps)")
        try:
            card = cls.model_validate(data)
        except ValidationError as exc:
            problem, too_long = _first_problem(exc)
            error = CardTooLargeError if too_long else ConfigError
            raise error(f"{source_name}: {problem}") from exc
        card._photos = tuple(
            tuple(
                _load_photo(name, read_photo, f"{source_name}: steps.{i}.cues.images.{j}")
                for j, name in enumerate(step.cues.images, 1)
            )
            for i, step in enumerate(card.steps, 1)
        )
        return card


def _no_photos(name: str) -> bytes:
    raise FileNotFoundError(errno.ENOENT, "no photos come with this card")


def _load_photo(name: str, read_photo: PhotoReader | None, field_path: str) -> CardPhoto:
    """Read and decode one photo; ``field_path`` (with the name) starts any error message."""
    where = f"{field_path} {name!r}"
    try:
        data = (read_photo or _no_photos)(name)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it ({exc.strerror or exc})") from exc
    if len(data) > MAX_PHOTO_BYTES:
        raise CardTooLargeError(f"{where}: a photo may be at most {MAX_PHOTO_BYTES} bytes")
    try:  # the header only: the size before any pixel is decoded
        with Image.open(io.BytesIO(data)) as header:
            width_px, height_px = header.size
    # Pillow raises OSError for what it cannot identify, and its own errors (a decompression
    # bomb, a malformed header) derive from Exception only.
    except Exception as exc:
        raise ConfigError(f"{where}: not an image") from exc
    if max(width_px, height_px) > MAX_PHOTO_SIDE_PX:
        raise CardTooLargeError(
            f"{where}: {width_px}×{height_px} px, a photo may be at most "
            f"{MAX_PHOTO_SIDE_PX} px on a side"
        )
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ConfigError(f"{where}: not an image (it cannot be decoded)")
    scale = PHOTO_KEEP_SIDE_PX / max(image.shape[:2])
    if scale < 1:
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return CardPhoto(name, np.ascontiguousarray(image))


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
    return TaskCard.from_yaml_text(text, str(path), partial(_read_file, Path(path).parent))


def _read_file(folder: Path, name: str) -> bytes:
    """A photo file's bytes, read no further than one past the limit."""
    with (folder / name).open("rb") as file:
        return file.read(MAX_PHOTO_BYTES + 1)


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
