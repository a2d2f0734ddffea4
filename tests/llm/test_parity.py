"""The real SmolLM2-135M's greedy answers to the parity prompts are today's, token for token
(``tests/llm/parity.py`` recorded them), and attending to all regions is the dense path."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from gazecam.llm import LanguageModel
from tests.llm.parity import CASES, GOLDEN, MAX_TOKENS, Case, greedy


@pytest.fixture(scope="module")
def golden() -> dict[str, dict[str, Any]]:
    """The recorded answers by case name."""
    data = json.loads(GOLDEN.read_text())
    assert data["max_tokens"] == MAX_TOKENS and set(data["answers"]) == {c.name for c in CASES}
    answers: dict[str, dict[str, Any]] = data["answers"]
    return answers


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_greedy_answers_equal_the_goldens(
    real_lm: LanguageModel, golden: dict[str, dict[str, Any]], case: Case
) -> None:
    got = greedy(real_lm, case)
    assert got["ids"] == golden[case.name]["ids"]
    assert got["text"] == golden[case.name]["text"]


def test_k_equal_to_all_regions_answers_as_dense(
    real_lm: LanguageModel, golden: dict[str, dict[str, Any]]
) -> None:
    case = next(c for c in CASES if c.name == "bench40_dense")
    assert case.k is None and len(case.regions) == 40
    for k in (40, 99):
        assert greedy(real_lm, replace(case, k=k))["ids"] == golden[case.name]["ids"]
