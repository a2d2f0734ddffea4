"""engines/smolvlm_onnx.py's decoder: our graph on transformers' merged embeddings (text + an
image's visual tokens) gives Idefics3ForConditionalGeneration's logits and greedy answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from engines.llama_graph import FORMAT_VERSION
from engines.smolvlm_onnx import convert
from gazecam.sources.synthetic import DemoScene

torch = pytest.importorskip("torch")

NEW_TOKENS = 20


@pytest.fixture(scope="module")
def model(tiny_smolvlm: Path) -> Any:
    from transformers import Idefics3ForConditionalGeneration

    return Idefics3ForConditionalGeneration.from_pretrained(
        tiny_smolvlm, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module")
def inputs(tiny_smolvlm: Path) -> Any:
    """The processor's inputs for a chat prompt with one image (stock tiling: 13 tiles)."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_smolvlm)
    frame = DemoScene(duration_s=5).render(60, 2.0)
    image = Image.fromarray(np.ascontiguousarray(frame[:, :, ::-1]))
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What is on the screen?"}],
        }
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=prompt, images=[image], return_tensors="pt")


def merged_embeddings(model: Any, inputs: Any) -> tuple[np.ndarray, np.ndarray]:
    """The language model's input embeddings (text tokens with the image features merged in,
    by transformers' own code path) and the last-token logits, from one forward pass."""
    seen: dict[str, Any] = {}

    def capture(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()

    hook = model.model.text_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1].numpy()
    finally:
        hook.remove()
    return seen["embeds"].numpy(), logits


class Decoder:
    """Our decoder graph, run as the runtime does: prefill at P = 0, then one token a step with
    all present KV fed back as past; new tokens embedded from embed_tokens.npz."""

    def __init__(self, folder: Path) -> None:
        self.config = json.loads((folder / "config.json").read_text())
        self.session = ort.InferenceSession(
            str(folder / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        table = np.load(folder / "embed_tokens.npz")
        self.table = (table["q"] * table["scales"][..., None]).reshape(len(table["q"]), -1)
        c = self.config
        empty = np.zeros((1, c["kv_heads"], 0, c["head_dim"]), np.float32)
        self.past = {f"past_{k}_{i}": empty for k in ("key", "value") for i in range(c["layers"])}
        self.position = 0

    def step(self, embeds: np.ndarray) -> np.ndarray:
        """Feed [T, hidden] embeddings; the last token's logits [V]."""
        t = len(embeds)
        positions = np.arange(self.position, self.position + t, dtype=np.int64)[None]
        feed = {"inputs_embeds": embeds[None].astype(np.float32), "position_ids": positions}
        feed["past_length"] = np.array([self.position], np.int64)
        names = [o.name for o in self.session.get_outputs()]
        out = dict(zip(names, self.session.run(None, {**feed, **self.past}), strict=True))
        for name in self.past:  # fed exact arrays, present is the past then the new entries
            self.past[name] = out[name.replace("past_", "present_")]
        self.position += t
        return np.asarray(out["logits"][0, -1])

    def greedy(self, embeds: np.ndarray, tokens: int) -> list[int]:
        """Greedy decoding of ``tokens`` new tokens after a prompt of embeddings."""
        ids = [int(np.argmax(self.step(embeds)))]
        while len(ids) < tokens:
            ids.append(int(np.argmax(self.step(self.table[ids[-1]][None]))))
        return ids


def margin(logits: np.ndarray) -> float:
    """Top-1 minus top-2 logit: how far the greedy choice is from flipping."""
    top = np.sort(logits)[-2:]
    return float(top[1] - top[0])


def test_the_decoder_folder_says_what_it_is(tiny_smolvlm_onnx: Path) -> None:
    config = json.loads((tiny_smolvlm_onnx / "config.json").read_text())
    assert config["format_version"] == FORMAT_VERSION and config["chat_format"] == "smolvlm"
    assert config["weight_bits"] == 8 and config["accuracy_level"] == 0
    assert config["image_token_id"] == 49190 and config["random_weights"] is True
    assert config["name"] == "random-smolvlm-tiny"
    assert [config[k] for k in ("layers", "hidden", "heads", "kv_heads")] == [2, 64, 2, 1]
    assert (config["head_dim"], config["vocab"], config["rope_base"]) == (32, 49280, 100000.0)
    assert config["probe_layer"] == 1 and config["max_positions"] == 8192
    table = np.load(tiny_smolvlm_onnx / "embed_tokens.npz")
    assert table["q"].shape == (49280, 2, 32) and table["scales"].shape == (49280, 2)


def as_quantised(model: Any, bits: int) -> Any:
    """A copy of model whose language-model linears and head hold the weights the converter
    quantised (gguf's dequantize of its quantize): what our decoder computes with."""
    import copy

    from gguf import GGMLQuantizationType, dequantize, quantize

    def requantise(linear: Any, kind: GGMLQuantizationType) -> None:
        w = linear.weight.detach().numpy()
        linear.weight.copy_(torch.from_numpy(dequantize(quantize(w, kind), kind)))

    kind = GGMLQuantizationType.Q4_1 if bits == 4 else GGMLQuantizationType.Q8_0
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for module in copied.model.text_model.modules():
            if isinstance(module, torch.nn.Linear):
                requantise(module, kind)
        requantise(copied.lm_head, GGMLQuantizationType.Q8_0)
    return copied


@pytest.fixture(scope="module")
def q4_folder(tiny_smolvlm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint's decoder with Q4_1 weights (no vision graphs), fp32 activations."""
    out = tmp_path_factory.mktemp("q4") / "decoder"
    return convert(tiny_smolvlm, out, tile_sizes=(), bits=4, accuracy_level=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_the_graph_computes_exactly_what_transformers_does_with_its_weights(
    tiny_smolvlm_onnx: Path, q4_folder: Path, model: Any, inputs: Any, bits: int
) -> None:
    """Against transformers with the same quantised weights, on transformers' merged
    embeddings of an image prompt: only fp32 rounding differs (checks the q/k row permutation
    for the graph's RoPE, the untied head, GQA with 32-wide heads)."""
    folder = tiny_smolvlm_onnx if bits == 8 else q4_folder
    assert json.loads((folder / "config.json").read_text())["weight_bits"] == bits
    embeds, expected = merged_embeddings(as_quantised(model, bits), inputs)
    assert embeds.shape[1] == inputs["input_ids"].shape[1] > 13 * 64  # 13 tiles of 64 tokens
    logits = Decoder(folder).step(embeds[0])
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_decoder_against_transformers_fp32(
    tiny_smolvlm_onnx: Path, q4_folder: Path, model: Any, inputs: Any, bits: int
) -> None:
    """Against the checkpoint's own fp32 weights: the quantisation error (measured; random
    weights give logits within ±1 and top-2 margins of ~1e-2, far below a trained model's)."""
    embeds, expected = merged_embeddings(model, inputs)
    logits = Decoder(tiny_smolvlm_onnx if bits == 8 else q4_folder).step(embeds[0])
    diff = float(np.abs(logits - expected).max())
    print(f"bits {bits}: max |logit diff| {diff:.2e}, top-2 margin {margin(expected):.2e}")
    assert diff <= {8: 0.01, 4: 0.1}[bits] * float(np.abs(expected).max())


@pytest.mark.parametrize("weights", ["checkpoint", "quantised"])
def test_greedy_answer_equals_transformers_generate(
    tiny_smolvlm_onnx: Path, model: Any, inputs: Any, weights: str
) -> None:
    """20 tokens through our Q8_0 graph (present KV fed back as past, new tokens embedded from
    embed_tokens.npz) against ``model.generate``, with the checkpoint's fp32 weights and with
    the converter's quantised ones."""
    reference = model if weights == "checkpoint" else as_quantised(model, 8)
    embeds, _ = merged_embeddings(reference, inputs)
    with torch.no_grad():
        generated = reference.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS)
    answer = generated[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(answer) == NEW_TOKENS
    assert Decoder(tiny_smolvlm_onnx).greedy(embeds[0], NEW_TOKENS) == answer


def test_a_text_model_with_scaled_rope_is_refused(tiny_smolvlm: Path, tmp_path: Path) -> None:
    """The graph's RoPE is the plain one: a checkpoint with scaled RoPE would load and convert
    into wrong answers; refused in one line instead."""
    import shutil

    from gazecam.models import ModelError

    scaled = tmp_path / "scaled"
    shutil.copytree(tiny_smolvlm, scaled)
    config = json.loads((scaled / "config.json").read_text())
    config["text_config"]["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    (scaled / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"scaled/config\.json: a text model with biases or"):
        convert(scaled, tmp_path / "out", tile_sizes=())
    assert not (tmp_path / "out").exists()
