"""A tiny random Stable Diffusion inpainting pipeline (and ControlNet) built from config.

The components have the architecture of SD 1.x inpainting (a 9-channel UNet, a KL
autoencoder, a CLIP text encoder with its BPE tokenizer) at toy sizes and random weights,
so tests can run the real diffusers code paths on a CPU in a fraction of a second per
step. The tokenizer vocabulary is written locally (byte-level BPE over the 256 byte symbols,
no merges beyond a few), so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

# The builders are shared with the SD benchmark (pipeline/bench_sd.py), which also builds
# the full-size SD 1.5 architecture the same way.
from pipeline.bench_sd import (  # noqa: F401  (write_clip_tokenizer: for other tests)
    save_inpaint_pipeline,
    tiny_components,
    write_clip_tokenizer,
)

# Side of the square images the tiny pipeline works at (latents are half of it).
TINY_SIZE = 32
CROSS_DIM = 32


def build_components(seed: int = 0) -> dict:
    """The tiny pipeline's components with random weights (fixed by `seed`)."""
    return tiny_components(seed)


def save_tiny_inpaint(folder: Path, seed: int = 0) -> Path:
    """Save the tiny inpainting pipeline in diffusers layout (what users point model at)."""
    return save_inpaint_pipeline(folder, tiny_components(seed))


def save_tiny_controlnet(folder: Path, seed: int = 1) -> Path:
    """A tiny ControlNet matching the tiny UNet (conditioning at the image resolution)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel(
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, in_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        cross_attention_dim=CROSS_DIM, attention_head_dim=8,
        conditioning_embedding_out_channels=(8, 16),
    )
    # ControlNet's output convolutions, and the last one of its conditioning-image encoder,
    # start at zero (the image changes nothing until trained); give them random weights so
    # tests can see the control image reach the result.
    with torch.no_grad():
        for block in [*net.controlnet_down_blocks, net.controlnet_mid_block,
                      net.controlnet_cond_embedding.conv_out]:
            for param in block.parameters():
                param.normal_(0.0, 0.2)
    net.save_pretrained(folder, safe_serialization=True)
    return folder
