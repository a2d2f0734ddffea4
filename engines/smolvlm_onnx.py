"""A SmolVLM checkpoint (Hugging Face layout) → ONNX vision encoders for ONNX Runtime CPU.

``python -m engines.smolvlm_onnx CHECKPOINT OUT`` writes, for each tile size S (512: the
native tile; 448: the gaze crop at its native size):

- ``vision_S.onnx``: the SigLIP encoder and the connector (pixel shuffle + linear projection)
  as ONE graph. Input ``pixel_values`` float32 [tiles, 3, S, S] (rescaled and normalised as
  ``gazecam.vlm.preprocess`` does); output ``visual_tokens`` float32 [tiles, T, hidden] with
  T = (S / patch / scale_factor)²: 64 at 512, 49 at 448 (patch 16, shuffle 4).
- ``vision_S.int8.onnx``: the same graph with int8 weights (dynamic quantisation of the
  MatMuls: per-channel int8 weights, activations quantised per call; the CPU's VNNI kernels).
- ``vision.json``: what the runtime needs (tile sizes, tokens per tile, hidden size, the
  preprocessor's mean/std and rescale factor, the source checkpoint and whether it is random).

At 448 the 28×28 patch grid takes its position embeddings the way transformers' Idefics3 does
for any grid smaller than the 32×32 table: each patch's fractional position is bucketed into
the table (NaViT-style), so the graph equals ``Idefics3Model.get_image_features`` on a 448
image. Positions are constants of each graph; only the tile count is dynamic.

Build-time only (the ``vlm-build`` extra: torch, transformers); the runtime needs neither.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

from gazecam.models import ModelError, folder_written_atomically, progress
from gazecam.vlm.checkpoint import check_checkpoint
from gazecam.vlm.preprocess import PreprocessConfig

FORMAT_VERSION = 1
TILE_SIZES = (512, 448)
OPSET = 17


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


def convert(
    checkpoint: Path, out_dir: Path, tile_sizes: tuple[int, ...] = TILE_SIZES, int8: bool = True
) -> Path:
    """Convert a SmolVLM checkpoint folder into out_dir (vision_S[.int8].onnx, vision.json).

    Written into a hidden temporary folder beside out_dir, renamed last: a failed conversion
    leaves the earlier out_dir (or none), never a partial one.
    """
    # The same check as `gazecam models import`: files, config, safetensors headers, key shapes.
    checked = check_checkpoint(checkpoint)
    pre = PreprocessConfig.load(checkpoint)
    counts = {s: checked.tokens_at(s) for s in tile_sizes}
    name = json.loads((checkpoint / "config.json").read_text()).get("gazecam_name", checkpoint.name)
    steps = len(tile_sizes) * (2 if int8 else 1) + 1
    with progress(f"converting {checkpoint.name} to ONNX", total=steps, unit="stage") as bar:
        bar.set_postfix_str("loading the checkpoint")
        model = load_model(checkpoint)
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
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """Command line: convert a checkpoint folder; one line and exit 2 on a bad one."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="SmolVLM folder (Hugging Face layout)")
    parser.add_argument("out", type=Path, help="folder to write the ONNX encoders into")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(TILE_SIZES))
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 variants")
    args = parser.parse_args(argv)
    try:
        out = convert(args.checkpoint, args.out, tuple(args.sizes), int8=not args.no_int8)
    except ModelError as exc:
        parser.exit(2, f"error: {exc}\n")
    for path in sorted(out.iterdir()):
        print(f"{path}  {path.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
