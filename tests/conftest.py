"""Shared test set-up: offline, headless, one Anny cache per machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ANNY_CACHE_DIR", str(Path.home() / ".cache/avatarize/anny"))
os.environ.setdefault("GLOG_minloglevel", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REAL_VIDEOS = SHARED_DATA / "videos"


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: tiny networks run faster so, and CI's two cores
    are shared. Modules of tiny-network tests use it with pytest.mark.usefixtures."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def real_videos() -> Path:
    if not REAL_VIDEOS.is_dir():
        pytest.skip(f"real videos not present at {REAL_VIDEOS} (only on the project's machines)")
    return REAL_VIDEOS


@pytest.fixture(scope="session")
def smpl_model_dir(tmp_path_factory) -> Path:
    """A folder in smplx's layout with synthetic SMPL, SMPL-H and SMPL-X models
    (tests/smpl_synthetic.py): the real files are licensed and never ship."""
    from smpl_synthetic import write_model_folder

    return write_model_folder(tmp_path_factory.mktemp("body_models"))
