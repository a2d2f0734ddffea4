"""Reading the CSV files of a Pupil Cloud export: typed columns, every cell checked.

A cell that is not what its column holds is a SourceError naming the file, the line and the
column. Integers are checked to fit numpy's int64 (timestamps also to be non-negative), floats
to be finite. A last line cut short (no line end) that does not read is what a recording killed
mid-write leaves: it is left out with a warning instead.
"""

from __future__ import annotations

import csv
import logging
import math
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gazecam.errors import SourceError
from gazecam.sources.base import INT64_MAX

log = logging.getLogger(__name__)

_WORN = {"1": 1, "1.0": 1, "true": 1, "0": 0, "0.0": 0, "false": 0}


def parse_worn(text: str) -> int:
    """The worn flag as 1 or 0, from any of the spellings exports use."""
    key = text.strip().lower()
    if key not in _WORN:
        raise ValueError(text)
    return _WORN[key]


def parse_finite(text: str) -> float:
    """A finite float (NaN and infinities are refused)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def parse_timestamp(text: str) -> int:
    """Nanoseconds since the epoch: an integer that fits int64 and is not negative."""
    value = int(text)
    if not 0 <= value <= INT64_MAX:
        raise ValueError(text)
    return value


def parse_fixation_id(text: str) -> int:
    """An id (pandas-written exports may say ``12.0``); empty, i.e. no fixation, is -1."""
    if not text.strip():
        return -1
    value = float(text)
    # Checked as a float first: int() of inf raises OverflowError, and 1e30 is "integral".
    if not (math.isfinite(value) and 0 <= value <= INT64_MAX and value == int(value)):
        raise ValueError(text)
    return int(value)


# What each parser accepts, for the error message when a cell is not that.
_EXPECTED: dict[Callable[[str], Any], str] = {
    parse_timestamp: f"a timestamp (an integer from 0 to {INT64_MAX} nanoseconds)",
    parse_finite: "a finite number",
    parse_worn: "1/0, 1.0/0.0 or True/False",
    parse_fixation_id: f"an integer id from 0 to {INT64_MAX}, or nothing",
}


@dataclass(frozen=True, slots=True)
class Col:
    """One CSV column to read: its header name, parser and storage type."""

    name: str
    parse: Callable[[str], Any]
    typecode: str  # array typecode ("q" int64, "d" float64, "b" int8), "" keeps Python strings
    required: bool = True


def _ends_cut_short(path: Path) -> bool:
    """Whether the file's last line has no line end: its writer stopped in the middle of it."""
    with path.open("rb") as f:
        if f.seek(0, 2) == 0:
            return False
        f.seek(-1, 2)
        return f.read(1) != b"\n"


def read_csv(path: Path, cols: Sequence[Col], ordered_by: str | None = None) -> dict[str, Any]:
    """Read the given columns of a CSV file, checking that ``ordered_by`` never decreases.

    Returns a numpy array (a list for string columns) per column found; optional columns
    missing from the header are left out. A last line that has no line end and does not read
    is what a recording killed mid-write leaves: it is left out with a warning.
    """
    if not path.is_file():
        raise SourceError(f"{path}: missing file")
    try:
        cut_short = _ends_cut_short(path)
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [name.strip() for name in next(reader, [])]
            if not header:
                raise SourceError(f"{path}: empty file (no header row)")
            for col in cols:
                if col.required and col.name not in header:
                    raise SourceError(f"{path}: missing column '{col.name}'")
            present = [col for col in cols if col.name in header]
            index = [header.index(col.name) for col in present]
            store: dict[str, Any] = {
                c.name: array(c.typecode) if c.typecode else [] for c in present
            }
            lists = [store[c.name] for c in present]
            ordered = next((k for k, c in enumerate(present) if c.name == ordered_by), None)
            previous: Any = None
            for row in reader:
                if not row:
                    continue  # blank line, e.g. a trailing newline
                try:
                    values = _check_row(path, reader.line_num, present, index, header, row)
                    if ordered is not None and previous is not None and values[ordered] < previous:
                        raise SourceError(
                            f"{path} line {reader.line_num}: '{present[ordered].name}' "
                            f"{values[ordered]} is out of order (the row before has {previous})"
                        )
                except SourceError as exc:
                    if not cut_short or next(reader, None) is not None:
                        raise
                    log.warning("%s; it is the last line and is cut short: left out", exc)
                    break
                if ordered is not None:
                    previous = values[ordered]
                for values_of_col, value in zip(lists, values, strict=True):
                    values_of_col.append(value)
        return {name: np.asarray(v) if isinstance(v, array) else v for name, v in store.items()}
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SourceError(f"{path}: cannot read the file ({exc})") from exc


def _check_row(
    path: Path,
    line: int,
    cols: Sequence[Col],
    index: Sequence[int],
    header: Sequence[str],
    row: list[str],
) -> list[Any]:
    """The parsed values of one data row; SourceError naming the line and column if it is bad."""
    if len(row) < len(header):
        raise SourceError(f"{path} line {line}: {len(row)} fields, the header has {len(header)}")
    return _parse_row(f"{path} line {line}", cols, index, row)


def _parse_row(where: str, cols: Sequence[Col], index: Sequence[int], row: list[str]) -> list[Any]:
    values = []
    for col, i in zip(cols, index, strict=True):
        try:
            values.append(col.parse(row[i]))
        except ValueError as exc:
            raise SourceError(
                f"{where}: column '{col.name}': {row[i]!r} is not {_EXPECTED[col.parse]}"
            ) from exc
    return values
