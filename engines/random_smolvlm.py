"""A RANDOM-weight SmolVLM checkpoint in the Hugging Face layout, for tests and latency figures.

``python -m engines.random_smolvlm --size tiny|256m|500m --out DIR [--seed N]`` writes what
``HuggingFaceTB/SmolVLM-256M-Instruct`` ships (Idefics3ForConditionalGeneration): config.json,
generation_config.json, model.safetensors (bf16, as the real one), tokenizer.json,
tokenizer_config.json, special_tokens_map.json, preprocessor_config.json, processor_config.json
and chat_template.json. ``256m`` and ``500m`` have the real models' hyper-parameters (SigLIP
base patch-16 at 512, pixel shuffle 4, 64 tokens per tile; SmolLM2-135M resp. -360M as the
language backbone); ``tiny`` keeps that structure (512 tiles, patch 16, shuffle 4, the full
vocabulary) with small widths and two layers, a few MB for tests.

The weights are transformers' own seeded initialisation: NOT a trained model, and the config
says so (``"gazecam_random_weights": true``, ``"gazecam_name": "random-smolvlm-SIZE"``). The
tokenizer is SmolLM2's (read from the SmolLM2 GGUF gazecam already fetches) plus SmolVLM's
added tokens at their real ids, so prompts tokenize as with the real checkpoint.

Build-time only (the ``vlm-build`` extra: torch, transformers); the runtime never imports it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGUFReader
from tokenizers import AddedToken, Tokenizer

from engines.smollm2_onnx import make_tokenizer
from gazecam.models import ModelError, folder_written_atomically, model_path

BASE_VOCAB = 49152  # SmolLM2's tokens; SmolVLM's added tokens follow
VOCAB = 49280  # the real checkpoints' embedding rows (added tokens padded to a multiple of 128)
IMAGE_TOKEN_ID = 49190
END_OF_UTTERANCE = "<end_of_utterance>"
# SmolVLM's added tokens at their real ids: <global-img> 49152, <row_1_col_1>..<row_6_col_6>,
# <fake_token_around_image> 49189, <image> 49190, 88 reserved tokens, <end_of_utterance> 49279.
ADDED_TOKENS = (
    ["<global-img>"]
    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    + ["<fake_token_around_image>", "<image>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(88)]
    + [END_OF_UTTERANCE]
)
# SmolVLM-256M-Instruct's chat template ("User:<image>question<end_of_utterance>\nAssistant:").
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
PREPROCESSOR = {
    "do_convert_rgb": True,
    "do_image_splitting": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "Idefics3ImageProcessor",
    "image_std": [0.5, 0.5, 0.5],
    "max_image_size": {"longest_edge": 512},
    "processor_class": "Idefics3Processor",
    "resample": 1,  # PIL LANCZOS
    "rescale_factor": 1 / 255,
    "size": {"longest_edge": 2048},
}


@dataclass(frozen=True, slots=True)
class Size:
    """Hyper-parameters of one checkpoint size (the rest is common to all)."""

    vision_hidden: int
    vision_ffn: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_ffn: int
    text_layers: int
    text_heads: int
    text_kv_heads: int


SIZES = {
    # Same structure as the real ones, small widths: 512 tiles of 16-px patches, shuffle 4.
    "tiny": Size(32, 64, 2, 2, 64, 128, 2, 2, 1),
    # SmolVLM-256M-Instruct: SigLIP-B/16 at 512 + SmolLM2-135M.
    "256m": Size(768, 3072, 12, 12, 576, 1536, 30, 9, 3),
    # SmolVLM-500M-Instruct: the same encoder + SmolLM2-360M.
    "500m": Size(768, 3072, 12, 12, 960, 2560, 32, 15, 5),
}


def hf_config(size: str) -> dict[str, Any]:
    """config.json of a random checkpoint of that size (the real layout, marked random)."""
    s = SIZES[size]
    text = {
        "model_type": "llama",
        "hidden_size": s.text_hidden,
        "intermediate_size": s.text_ffn,
        "num_hidden_layers": s.text_layers,
        "num_attention_heads": s.text_heads,
        "num_key_value_heads": s.text_kv_heads,
        "head_dim": s.text_hidden // s.text_heads,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "vocab_size": VOCAB,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "tie_word_embeddings": False,
    }
    vision = {
        "model_type": "idefics3_vision",
        "hidden_size": s.vision_hidden,
        "intermediate_size": s.vision_ffn,
        "num_hidden_layers": s.vision_layers,
        "num_attention_heads": s.vision_heads,
        "image_size": 512,
        "patch_size": 16,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    }
    return {
        "architectures": ["Idefics3ForConditionalGeneration"],
        "model_type": "idefics3",
        "image_token_id": IMAGE_TOKEN_ID,
        "scale_factor": 4,
        "tie_word_embeddings": False,
        "vocab_size": VOCAB,
        "pad_token_id": 2,
        "text_config": text,
        "vision_config": vision,
    }


def smolvlm_tokenizer(gguf_path: Path) -> Tokenizer:
    """SmolLM2's byte-level BPE (from its GGUF) plus SmolVLM's added tokens at their real ids."""
    try:
        reader = GGUFReader(gguf_path)
        tokens = [str(t) for t in reader.fields["tokenizer.ggml.tokens"].contents()]
        types = list(reader.fields["tokenizer.ggml.token_type"].contents())
        merges = [str(m) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    except (OSError, KeyError, ValueError) as exc:
        raise ModelError(f"{gguf_path}: cannot read the SmolLM2 tokenizer ({exc})") from exc
    if len(tokens) != BASE_VOCAB:
        raise ModelError(f"{gguf_path}: {len(tokens)} tokens, SmolLM2 has {BASE_VOCAB}")
    control = [t for t, kind in zip(tokens, types, strict=True) if kind == 3]  # 3: CONTROL
    tokenizer = make_tokenizer(tokens, merges, control)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ADDED_TOKENS]
    )
    assert tokenizer.token_to_id("<image>") == IMAGE_TOKEN_ID  # ids as the real checkpoint's
    assert tokenizer.get_vocab_size(with_added_tokens=True) == VOCAB
    return tokenizer


def _tokenizer_files(out: Path, tokenizer: Tokenizer) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    special = {
        "additional_special_tokens": ["<fake_token_around_image>", "<image>", END_OF_UTTERANCE],
        "bos_token": "<|im_start|>",
        "eos_token": END_OF_UTTERANCE,
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
    }
    config = {
        **special,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "processor_class": "Idefics3Processor",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "truncation_side": "left",
    }
    _write_json(out / "special_tokens_map.json", special)
    _write_json(out / "tokenizer_config.json", config)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def write_random_checkpoint(
    out_dir: Path, size: str = "tiny", seed: int = 0, tokenizer_gguf: Path | None = None
) -> Path:
    """Write a random-weight SmolVLM checkpoint of ``size`` into out_dir (atomically).

    ``tokenizer_gguf`` is the SmolLM2 GGUF whose tokenizer is used (default: gazecam's cached
    ``smollm2-135m-gguf``; ModelError saying how to fetch it when it is missing).
    """
    import torch  # build-time only; imported here so `--help` and ModelError need no torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    if size not in SIZES:
        raise ModelError(f"unknown size {size!r} (known: {', '.join(SIZES)})")
    tokenizer = smolvlm_tokenizer(tokenizer_gguf or model_path("smollm2-135m-gguf"))
    config = hf_config(size)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(Idefics3Config(**config)).to(torch.bfloat16).eval()

    with folder_written_atomically(out_dir) as tmp:
        model.save_pretrained(tmp)
        # Our own config.json (transformers adds its defaults); marked random, named random.
        config.update(
            gazecam_random_weights=True,
            gazecam_name=f"random-smolvlm-{size}",
            gazecam_seed=seed,
            torch_dtype="bfloat16",
        )
        _write_json(tmp / "config.json", config)
        _write_json(
            tmp / "generation_config.json",
            {"bos_token_id": 1, "eos_token_id": [2, VOCAB - 1], "pad_token_id": 2},
        )
        _tokenizer_files(tmp, tokenizer)
        _write_json(tmp / "preprocessor_config.json", PREPROCESSOR)
        _write_json(
            tmp / "processor_config.json",
            {"image_seq_len": 64, "processor_class": "Idefics3Processor"},
        )
        _write_json(tmp / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """Command line: write a random checkpoint and say where."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-gguf", type=Path, help="SmolLM2 GGUF (default: the cache)")
    args = parser.parse_args(argv)
    try:
        out = write_random_checkpoint(args.out, args.size, args.seed, args.tokenizer_gguf)
    except ModelError as exc:
        parser.exit(2, f"error: {exc}\n")
    size_b = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote random-smolvlm-{args.size} (RANDOM weights, seed {args.seed}) to {out}: "
          f"{size_b / 1e6:.1f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
