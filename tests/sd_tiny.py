"""A tiny random Stable Diffusion inpainting pipeline (and ControlNet) built from config.

The components have the architecture of SD 1.x inpainting (a 9-channel UNet, a KL
autoencoder, a CLIP text encoder with its BPE tokenizer) at toy sizes and random weights,
so tests can run the real diffusers code paths on a CPU in a fraction of a second per
step. The tokenizer vocabulary is written here (byte-level BPE over the 256 byte symbols,
no merges beyond a few), so nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Side of the square images the tiny pipeline works at (latents are half of it).
TINY_SIZE = 32
CROSS_DIM = 32


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes that CLIP's byte-level BPE uses (GPT-2's map)."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def write_clip_tokenizer(folder: Path):
    """vocab.json and merges.txt of a minimal CLIP BPE tokenizer, saved as a tokenizer."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    merges = [("a", "n"), ("p", "e"), ("o", "n</w>")]
    vocab_list = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    vocab_list += ["".join(m) for m in merges]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    raw = folder / "raw"
    raw.mkdir(exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    # Loading from the two files works with both tokenizer back-ends of transformers.
    return CLIPTokenizer.from_pretrained(raw, model_max_length=77)


def build_components(seed: int = 0) -> dict:
    """The tiny pipeline's components with random weights (fixed by `seed`)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        sample_size=TINY_SIZE // 2, in_channels=9, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CROSS_DIM, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, sample_size=TINY_SIZE,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=CROSS_DIM,
        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=600, max_position_embeddings=77, layer_norm_eps=1e-5,
    ))
    return {"unet": unet, "vae": vae, "scheduler": scheduler, "text_encoder": text_encoder}


def save_tiny_inpaint(folder: Path, seed: int = 0) -> Path:
    """Save the tiny inpainting pipeline in diffusers layout (what users point model at)."""
    from diffusers import StableDiffusionInpaintPipeline

    parts = build_components(seed)
    tokenizer = write_clip_tokenizer(folder.parent / f"{folder.name}_tokenizer_src")
    pipe = StableDiffusionInpaintPipeline(
        **parts, tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


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
    # ControlNet's output convolutions start at zero (it adds nothing until trained); give
    # them random weights so tests can see the conditioning reach the result.
    with torch.no_grad():
        for block in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            for param in block.parameters():
                param.normal_(0.0, 0.2)
    net.save_pretrained(folder, safe_serialization=True)
    return folder
