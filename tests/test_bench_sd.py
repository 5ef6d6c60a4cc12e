"""pipeline/bench_sd.py: the full-size model it times is SD 1.5 inpainting's architecture."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers", reason="the SD benchmark needs diffusers")
pytest.importorskip("transformers", reason="the SD benchmark needs transformers")


def test_full_size_components_have_sd15_inpainting_parameter_counts():
    import torch

    from pipeline.bench_sd import sd15_components

    with torch.device("meta"):  # shapes only: no memory, no random init
        parts = sd15_components()
    count = {k: sum(p.numel() for p in parts[k].parameters())
             for k in ("unet", "vae", "text_encoder")}
    # SD 1.5's UNet (859,520,964) plus 5 more input channels of its first 3x3 conv (320
    # filters); the SD KL autoencoder; CLIP ViT-L/14's text tower.
    assert count == {"unet": 859_520_964 + 5 * 320 * 9, "vae": 83_653_863,
                     "text_encoder": 123_060_480}
    assert parts["unet"].config.in_channels == 9
    assert parts["unet"].config.cross_attention_dim == 768
