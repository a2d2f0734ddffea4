"""The real SmolLM2-135M-Instruct, converted from its GGUF: it answers, stops, and is
deterministic when greedy."""

from __future__ import annotations

from gazecam.llm import LanguageModel
from gazecam.llm.tokenizer import question_prompt
from tests.llm.conftest import answer

FRANCE = "What is the capital of France?"


def test_knows_the_capital_of_france(real_lm: LanguageModel) -> None:
    real_lm.set_context("You are a helpful assistant.")
    text, stats = answer(real_lm, FRANCE, max_tokens=24, temperature=0)
    assert "Paris" in text
    assert stats.stop_reason == "eos" and stats.generated_tokens < 24
    assert stats.ttft_ms > 0 and stats.tpot_ms > 0 and stats.prompt_tokens > 5


def test_answers_from_the_context(real_lm: LanguageModel) -> None:
    # The 135M model often gets the step NUMBER wrong ("You're on step 2 of 6: Connect
    # cable."), but it does repeat the step from the context.
    real_lm.set_context("The wearer is on step 3 of 6: Connect cable.")
    text, _ = answer(real_lm, "What step am I on?", max_tokens=32, temperature=0)
    assert "cable" in text.lower()


def test_stop_strings_and_max_tokens_end_generation(real_lm: LanguageModel) -> None:
    real_lm.set_context("You are a helpful assistant.")
    text, stats = answer(real_lm, FRANCE, max_tokens=24, temperature=0, stop=["Paris"])
    assert "Paris" not in text and stats.stop_reason == "stop"
    assert text.startswith("The capital of France is")
    text, stats = answer(real_lm, FRANCE, max_tokens=3, temperature=0)
    assert stats.generated_tokens == 3 and stats.stop_reason == "max_tokens"
    assert len(stats.attended_visual_kv) == 3  # the question's pass and two decoding steps


def test_greedy_is_deterministic_and_sampling_follows_the_seed(real_lm: LanguageModel) -> None:
    real_lm.set_context("You are a helpful assistant.")
    question = "Write one sentence about cats."
    greedy = {answer(real_lm, question, max_tokens=16, temperature=0)[0] for _ in range(2)}
    assert len(greedy) == 1
    seeded = {
        answer(real_lm, question, max_tokens=16, temperature=0.8, top_p=0.9, seed=7)[0]
        for _ in range(2)
    }
    assert len(seeded) == 1


def test_the_region_a_question_is_about_is_chosen(real_lm: LanguageModel) -> None:
    real_lm.set_context("The wearer is replacing a fuse. What the wearer sees:")
    lines = {
        "exit": "- text 'EXIT', 300 px from the gaze point",
        "cup": "- a cup, 250 px from the gaze point",
        "fuse": "- text 'FUSE F3 15A', 200 px from the gaze point",
        "laptop": "- a laptop, 350 px from the gaze point",
        "door": "- text 'DOOR 12B', 320 px from the gaze point",
        "chair": "- a chair, 500 px from the gaze point",
    }
    for region_id, line in lines.items():
        real_lm.add_region(region_id, line, 0.0)
    try:
        _, stats = answer(real_lm, "Which fuse rating is written?", top_k_regions=2, max_tokens=4)
        assert "fuse" in stats.selected_regions
        assert all(n < stats.visual_kv_total / 2 for n in stats.attended_visual_kv[1:])
    finally:
        for region_id in lines:
            real_lm.drop_region(region_id)


def test_the_model_continues_an_answer_prefix(real_lm: LanguageModel) -> None:
    real_lm.set_context("You are a helpful assistant.")
    for prefix in ("The capital of France is", "The capital of France is "):
        text, stats = answer(real_lm, FRANCE, answer_prefix=prefix, max_tokens=8, temperature=0)
        assert "Paris" in text and "capital" not in text
        assert (prefix + text).startswith("The capital of France is Paris")
        prompt = (*question_prompt(FRANCE), prefix.rstrip())  # prefilled with the question
        assert stats.prompt_tokens == len(real_lm.tokenizer.encode_prompt(prompt))
