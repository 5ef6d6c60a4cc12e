"""The `body` config section, shared by fit and render, and the body model it selects.

`body.model: anny` (the default) is embedded in the `anny` package. `smpl | smplh | smplx`
load the user's model files through smplx from `body.model_path` (the layout smplx
expects: `<model_path>/smpl/SMPL_NEUTRAL.pkl` or `.npz`, see stages/smpl_family.py); those
files are under non-commercial licences and never ship with avatarize.

Both kinds of body offer the same forward: pose (B, J, 3) axis-angle per joint, a shape
(B, K) (Anny: phenotype in [0, 1]; SMPL family: betas), root orientation and translation
in the OpenCV camera frame -> vertices and COCO-23 keypoints in camera coordinates.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from pipeline.config import Section


class BodySection(Section):
    model: Literal["anny", "smpl", "smplh", "smplx"] = Field(
        "anny", description="body model: anny (embedded) or an SMPL-family model whose files "
        "the user provides in body.model_path"
    )
    model_path: Path | None = Field(
        None, description="folder in smplx's layout (<path>/smpl/SMPL_NEUTRAL.pkl|npz) or one "
        "model file; relative to the config file; required for smpl, smplh and smplx"
    )
    gender: Literal["neutral", "male", "female"] = Field(
        "neutral", description="which SMPL-family model file to load (fit and render)"
    )
    num_betas: int = Field(10, ge=1, le=300, description="SMPL-family shape coefficients")

    @model_validator(mode="after")
    def _needs_path(self) -> BodySection:
        if self.model != "anny" and self.model_path is None:
            raise ValueError(f"body.model {self.model} needs body.model_path: the folder "
                             "holding the model files you downloaded (never shipped)")
        return self


def body_section(stage: Any) -> BodySection:
    """The stage's shared `body` section, or the defaults for a stage built by hand."""
    section = getattr(stage, "shared", {}).get("body")
    return section if isinstance(section, BodySection) else BodySection()


_lock = threading.Lock()


@functools.lru_cache(maxsize=4)
def _smpl_cached(model: str, path: str, gender: str, num_betas: int, device: str,
                 dtype: torch.dtype) -> Any:
    from stages.smpl_family import SmplFamilyBody

    return SmplFamilyBody(model, Path(path), gender, num_betas, device, dtype)  # type: ignore[arg-type]


def load_body_model(section: BodySection, device: str = "cpu",
                    dtype: torch.dtype = torch.float32) -> Any:
    """The process-wide body model the section selects (AnnyBody or SmplFamilyBody).

    A missing or malformed SMPL-family file raises ValueError / FileNotFoundError naming
    `body.model_path` and what is missing."""
    if section.model == "anny":
        from stages.body import load_body

        return load_body(device, dtype)
    with _lock:
        return _smpl_cached(section.model, str(section.model_path), section.gender,
                            section.num_betas, str(torch.device(device)), dtype)
