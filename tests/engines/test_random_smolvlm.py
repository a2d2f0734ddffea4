"""engines/random_smolvlm.py: a random checkpoint that transformers loads and runs as SmolVLM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engines.random_smolvlm import ADDED_TOKENS, BASE_VOCAB, IMAGE_TOKEN_ID, VOCAB, main


def test_the_checkpoint_says_it_is_random(tiny_smolvlm: Path) -> None:
    config = json.loads((tiny_smolvlm / "config.json").read_text())
    assert config["gazecam_random_weights"] is True
    assert config["gazecam_name"] == "random-smolvlm-tiny"
    assert config["architectures"] == ["Idefics3ForConditionalGeneration"]
    assert {p.name for p in tiny_smolvlm.iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
        "processor_config.json", "chat_template.json",
    }  # fmt: skip


def test_transformers_loads_and_runs_it(tiny_smolvlm: Path) -> None:
    torch = pytest.importorskip("torch")
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, Idefics3Processor

    processor = AutoProcessor.from_pretrained(tiny_smolvlm)
    assert isinstance(processor, Idefics3Processor) and processor.image_seq_len == 64
    model = AutoModelForImageTextToText.from_pretrained(tiny_smolvlm, dtype=torch.float32)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "<|im_start|>User:<image>Hi?<end_of_utterance>\nAssistant:"
    frame = np.random.default_rng(0).integers(0, 256, (1200, 1600, 3), dtype=np.uint8)
    inputs = processor(text=prompt, images=[Image.fromarray(frame)], return_tensors="pt")
    # The stock tiling of a 1600×1200 frame: 2048×1536 → 3×4 tiles of 512 + the global image.
    assert tuple(inputs["pixel_values"].shape) == (1, 13, 3, 512, 512)
    ids = inputs["input_ids"][0]
    assert int((ids == IMAGE_TOKEN_ID).sum()) == 13 * 64
    with torch.no_grad():
        logits = model(**inputs).logits
    assert tuple(logits.shape) == (1, len(ids), VOCAB)
    assert bool(torch.isfinite(logits).all())


def test_the_tokenizer_is_smollm2_plus_the_image_tokens(tiny_smolvlm: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_smolvlm / "tokenizer.json"))
    assert [tokenizer.token_to_id(t) for t in ADDED_TOKENS] == list(range(BASE_VOCAB, VOCAB))
    assert tokenizer.token_to_id("<image>") == IMAGE_TOKEN_ID
    text = "Where is the 12 mm wrench?"
    ids = tokenizer.encode(text).ids
    assert max(ids) < BASE_VOCAB and tokenizer.decode(ids) == text
    assert tokenizer.encode("<row_2_col_3><image>").ids == [BASE_VOCAB + 1 + 6 + 2, IMAGE_TOKEN_ID]


def test_a_missing_tokenizer_gguf_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(SystemExit) as exit_:
        main(["--size", "tiny", "--out", str(tmp_path / "out"), "--tokenizer-gguf", str(missing)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err
    assert not (tmp_path / "out").exists()
