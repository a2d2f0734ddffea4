"""A SmolVLM checkpoint (Hugging Face layout) → ONNX vision encoders and decoder for ORT CPU.

``python -m engines.smolvlm_onnx CHECKPOINT OUT [--bits 4|8]`` writes, for each tile size S
(512: the native tile; 448: the gaze crop at its native size; 256: the low-resolution
whole-frame thumbnail):

- ``vision_S.onnx``: the SigLIP encoder and the connector (pixel shuffle + linear projection)
  as ONE graph. Input ``pixel_values`` float32 [tiles, 3, S, S] (rescaled and normalised as
  ``gazecam.vlm.preprocess`` does); output ``visual_tokens`` float32 [tiles, T, hidden] with
  T = (S / patch / scale_factor)²: 64 at 512, 49 at 448, 16 at 256 (patch 16, shuffle 4).
- ``vision_S.int8.onnx``: the same graph with int8 weights (dynamic quantisation of the
  MatMuls: per-channel int8 weights, activations quantised per call; the CPU's VNNI kernels).
- ``vision.json``: what the runtime needs (tile sizes, tokens per tile, hidden size, the
  preprocessor's mean/std and rescale factor, the source checkpoint and whether it is random).

and the language model (``model.text_model`` + ``lm_head``) as ``engines.llama_graph``'s decoder:
``model.onnx`` (+ ``.data``), ``embed_tokens.npz``, ``tokenizer.json`` (the checkpoint's) and
``config.json`` (``chat_format`` "smolvlm", ``image_token_id``, ``weight_bits``, ...). Its
linear layers are quantised by gguf's numpy quantiser, as llama.cpp would: Q4_1 (``--bits 4``)
or Q8_0 (``--bits 8``); the embedding and the (untied) head are Q8_0. HF's q/k rows are permuted
as llama.cpp's converter does, for the graph's adjacent-pair RoPE.

At 448 and 256 the 28×28 (16×16) patch grid takes its position embeddings the way
transformers' Idefics3 does for any grid smaller than the 32×32 table: each patch's fractional
position is bucketed into the table (NaViT-style), so the graph equals
``Idefics3Model.get_image_features`` on a 448 (256) image. Positions are constants of each
graph; only the tile count is dynamic.

Build-time only (the ``vlm-build`` extra: torch, transformers); the runtime needs neither.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from engines.llama_graph import (
    F32,
    Q80,
    Arch,
    Layer,
    Linear,
    Weights,
    q41_from_gguf,
    q80_from_gguf,
    write,
)
from gazecam.models import ModelError, folder_written_atomically, progress
from gazecam.vlm.checkpoint import check_checkpoint
from gazecam.vlm.preprocess import PreprocessConfig

FORMAT_VERSION = 1  # of vision.json and the vision graphs (the decoder's: llama_graph's)
TILE_SIZES = (512, 448, 256)
OPSET = 17
CHAT_FORMAT = "smolvlm"  # "User:…<end_of_utterance>\nAssistant:", the checkpoint's template


def load_model(folder: Path) -> Any:
    """Idefics3ForConditionalGeneration in fp32 (bf16 checkpoints upcast) from a folder that
    ``check_checkpoint`` passed; ModelError if transformers cannot load all of it."""
    import torch
    from safetensors import SafetensorError
    from transformers import Idefics3ForConditionalGeneration

    try:
        model, info = Idefics3ForConditionalGeneration.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # corrupt, wrong shapes
        raise ModelError(f"{folder}: cannot load the checkpoint ({exc})") from exc
    # transformers fills missing weights with random ones and only warns: refuse instead.
    missing = sorted(info["missing_keys"])
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelError(f"{folder / 'model.safetensors'}: no tensor {missing[0]}{more}")
    return model.eval()


def bucketed_position_ids(grid: int, table_side: int) -> Any:
    """Position-table rows of a grid×grid patch grid, as Idefics3VisionEmbeddings computes them.

    Patch i of n sits at i/n of the image; its row is the bucket of that fraction among
    table_side equal buckets. At grid == table_side this is the identity.
    """
    import torch

    boundaries = torch.arange(1 / table_side, 1.0, 1 / table_side)
    frac = torch.clamp(torch.arange(grid, dtype=torch.float32) / grid, max=1.0 - 1e-6)
    bucket = torch.bucketize(frac, boundaries, right=True)
    return (bucket[:, None] * table_side + bucket[None, :]).reshape(-1)


def vision_tower(model: Any, tile_px: int) -> Any:
    """A torch module: pixel values [tiles, 3, S, S] → visual tokens [tiles, T, hidden].

    The same layers as ``get_image_features`` (patch embedding, positions, encoder, post
    layer norm, connector) without its padding-tile and mask handling: every tile is whole.
    """
    import torch

    vision, connector = model.model.vision_model, model.model.connector
    embeddings = vision.embeddings
    grid = tile_px // embeddings.patch_size
    positions = bucketed_position_ids(grid, embeddings.num_patches_per_side)

    class VisionTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision, self.connector = vision, connector
            self.register_buffer("positions", positions, persistent=False)

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            patches = self.vision.embeddings.patch_embedding(pixel_values)
            hidden = patches.flatten(2).transpose(1, 2)
            hidden = hidden + self.vision.embeddings.position_embedding(self.positions)
            hidden = self.vision.encoder(inputs_embeds=hidden).last_hidden_state
            return self.connector(self.vision.post_layernorm(hidden))

    return VisionTower().eval()


def export_vision(model: Any, tile_px: int, path: Path) -> None:
    """Export the vision tower at tile size S to path (fp32, dynamic tile count)."""
    import torch

    tower = vision_tower(model, tile_px)
    example = torch.zeros(1, 3, tile_px, tile_px)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns that the pixel shuffle's sizes become constants: they are, per tile
        # size (one graph each); and that this exporter is the legacy one (see the README).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            tower,
            (example,),
            str(path),
            input_names=["pixel_values"],
            output_names=["visual_tokens"],
            dynamic_axes={"pixel_values": {0: "tiles"}, "visual_tokens": {0: "tiles"}},
            opset_version=OPSET,
            dynamo=False,  # the TorchScript exporter: a plain graph ORT's CPU fuses well
        )


def quantize_int8(src: Path, dst: Path) -> None:
    """int8 weights for the MatMuls (per output channel), activations quantised per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        src, dst, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"]
    )


def decoder_weights(model: Any, bits: int, accuracy_level: int) -> Weights:
    """The language model's weights in the decoder graph's form, quantised as llama.cpp would
    (Q4_1 or Q8_0 linear layers; Q8_0 embedding and head; norms in fp32)."""
    text, c = model.model.text_model, model.config.text_config
    kind = GGMLQuantizationType.Q4_1 if bits == 4 else GGMLQuantizationType.Q8_0

    def array(tensor: Any) -> F32:
        return np.asarray(tensor.detach().float().numpy(), np.float32)

    def q80(tensor: Any) -> Q80:
        return q80_from_gguf(quantize(array(tensor), GGMLQuantizationType.Q8_0))

    def linear(module: Any, rope_heads: int = 0) -> Linear:
        w = array(module.weight)
        if rope_heads:  # HF rotates halves (i, i + d/2); the graph adjacent pairs (2i, 2i + 1)
            rows = w.shape[0] // rope_heads // 2
            w = w.reshape(rope_heads, 2, rows, -1).swapaxes(1, 2).reshape(w.shape)
        raw = quantize(np.ascontiguousarray(w), kind)
        return q41_from_gguf(raw) if bits == 4 else q80_from_gguf(raw)

    heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
    layers = [
        Layer(
            array(block.input_layernorm.weight),
            array(block.post_attention_layernorm.weight),
            linear(block.self_attn.q_proj, heads),
            linear(block.self_attn.k_proj, kv_heads),
            linear(block.self_attn.v_proj),
            linear(block.self_attn.o_proj),
            linear(block.mlp.gate_proj),
            linear(block.mlp.up_proj),
            linear(block.mlp.down_proj),
        )
        for block in text.layers
    ]
    arch = Arch(
        layers=c.num_hidden_layers,
        hidden=c.hidden_size,
        heads=heads,
        kv_heads=kv_heads,
        ffn=c.intermediate_size,
        vocab=c.vocab_size,
        rope_base=float(c.rope_parameters["rope_theta"]),
        rms_eps=float(c.rms_norm_eps),
        max_positions=c.max_position_embeddings,
        head_dim=c.head_dim,
        probe_layer=c.num_hidden_layers // 2,
        accuracy_level=accuracy_level,
    )
    embedding = text.embed_tokens.weight
    # Tied exactly where transformers ties them (SmolVLM's are not: its head is lm_head).
    tied = model.lm_head.weight.data_ptr() == embedding.data_ptr()
    head = None if tied else q80(model.lm_head.weight)
    return Weights(arch, q80(embedding), layers, array(text.norm.weight), head)


def convert(
    checkpoint: Path,
    out_dir: Path,
    tile_sizes: tuple[int, ...] = TILE_SIZES,
    int8: bool = True,
    bits: int = 4,
    accuracy_level: int = 4,
) -> Path:
    """Convert a SmolVLM checkpoint folder into out_dir: vision_S[.int8].onnx, vision.json and
    the decoder (model.onnx, embed_tokens.npz, tokenizer.json, config.json).

    ``bits``: the decoder's linear layers as Q4_1 (4) or Q8_0 (8); ``accuracy_level`` 4 lets
    its CPU kernels quantise activations to int8 per block, 0 keeps fp32.

    Written into a hidden temporary folder beside out_dir, renamed last: a failed conversion
    leaves the earlier out_dir (or none), never a partial one.
    """
    # The same check as `gazecam models import`: files, config, safetensors headers, key shapes.
    checked = check_checkpoint(checkpoint)
    pre = PreprocessConfig.load(checkpoint)
    counts = {s: checked.tokens_at(s) for s in tile_sizes}
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    name = json.loads((checkpoint / "config.json").read_text()).get("gazecam_name", checkpoint.name)
    steps = len(tile_sizes) * (2 if int8 else 1) + 3
    with progress(f"converting {checkpoint.name} to ONNX", total=steps, unit="stage") as bar:
        bar.set_postfix_str("loading the checkpoint")
        model = load_model(checkpoint)
        text = model.config.text_config
        if text.attention_bias or text.mlp_bias or text.rope_parameters["rope_type"] != "default":
            # The decoder graph has neither: it would convert into wrong answers.
            raise ModelError(
                f"{checkpoint / 'config.json'}: a text model with biases or scaled RoPE "
                "is not supported"
            )
        bar.update()
        with folder_written_atomically(out_dir) as tmp:
            for s in tile_sizes:
                bar.set_postfix_str(f"exporting the {s} encoder")
                export_vision(model, s, tmp / f"vision_{s}.onnx")
                bar.update()
                if int8:
                    bar.set_postfix_str(f"quantising the {s} encoder")
                    quantize_int8(tmp / f"vision_{s}.onnx", tmp / f"vision_{s}.int8.onnx")
                    bar.update()
            info = {
                "format_version": FORMAT_VERSION,
                "source": str(checkpoint.resolve()),
                "name": name,
                "random_weights": checked.random_weights,
                "tiles": {str(s): {"tokens": n} for s, n in counts.items()},
                "hidden": checked.text.hidden_size,
                "int8": int8,
                "image_mean": list(pre.image_mean),
                "image_std": list(pre.image_std),
                "rescale_factor": pre.rescale_factor,
            }
            (tmp / "vision.json").write_text(json.dumps(info, indent=2) + "\n")
            bar.set_postfix_str(f"quantising the decoder ({bits} bits)")
            weights = decoder_weights(model, bits, accuracy_level)
            bar.update()
            bar.set_postfix_str("writing the decoder")
            config = {
                "source": info["source"],
                "name": name,
                "random_weights": checked.random_weights,
                "chat_format": CHAT_FORMAT,
                "image_token_id": model.config.image_token_id,
            }
            write(weights, (checkpoint / "tokenizer.json").read_text(), tmp, config)
            bar.update()
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """Command line: convert a checkpoint folder; one line and exit 2 on a bad one."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="SmolVLM folder (Hugging Face layout)")
    parser.add_argument("out", type=Path, help="folder to write the ONNX graphs into")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(TILE_SIZES))
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 encoders")
    parser.add_argument(
        "--bits", type=int, choices=(4, 8), default=4, help="decoder weights: Q4_1 or Q8_0"
    )
    parser.add_argument(
        "--accuracy-level",
        type=int,
        choices=(0, 1, 2, 3, 4),
        default=4,
        help="MatMulNBits accuracy_level of the decoder (4: int8 activations, 0: fp32)",
    )
    args = parser.parse_args(argv)
    try:
        out = convert(
            args.checkpoint,
            args.out,
            tuple(args.sizes),
            int8=not args.no_int8,
            bits=args.bits,
            accuracy_level=args.accuracy_level,
        )
    except ModelError as exc:
        parser.exit(2, f"error: {exc}\n")
    for path in sorted(out.iterdir()):
        print(f"{path}  {path.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
