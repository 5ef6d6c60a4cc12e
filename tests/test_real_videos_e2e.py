"""The whole pipeline on the real videos of ../shared/data/videos (skipped where absent).

For each video: every stage ran, the output's fps and frame count equal the input's, and
the mask is not empty where a person was detected. The input folder holds symbolic links
to the shared files, never copies. The tiled small-person search is off here (`detect.tiles
1`): it quadruples detect's cost on these 2,400 frames, and tests/test_detect.py checks it
on a real frame of its own.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.video import count_frames, iter_frames, probe

pytestmark = [pytest.mark.slow, pytest.mark.real]

STAGES = ("detect", "fit", "render", "inpaint", "harmonize", "export")


@pytest.fixture(scope="module")
def real_run(real_videos, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("real")
    src = root / "input"
    src.mkdir()
    files = sorted(p for p in real_videos.iterdir() if p.is_file())
    for f in files:
        (src / f.name).symlink_to(f)
    out, work = root / "output", root / "work"
    code = main(["run", "--input", str(src), "--output", str(out), "--workdir", str(work),
                 "--no-progress", "--set", "detect.tiles=1"])
    return {"files": files, "src": src, "out": out, "work": work, "code": code}


def test_every_real_video_succeeds(real_run):
    meta = json.loads((real_run["out"] / "dataset.json").read_text())
    failed = {v["id"]: v.get("reason") for v in meta["videos"] if v["status"] != "ok"}
    assert failed == {}
    assert real_run["code"] == 0


@pytest.mark.parametrize("name", [
    "intel__asl_help.mkv", "intel__asl_walk.mkv", "intel__one-by-one-person-detection.mp4",
    "intel__preview_face-demographics-walking.gif", "mmaction2__S001C001P001R001A001_rgb.avi",
    "mmaction2__demo.mp4", "mmaction2__test_video_structuralize.mp4",
])
def test_real_video_output(real_run, name):
    source = real_run["src"] / name
    if not source.exists():
        pytest.skip(f"{name} not in the shared data")
    vid = source.stem
    out, work = real_run["out"], real_run["work"]
    for stage in STAGES:
        assert (work / stage / vid / "meta.json").is_file(), f"{stage} did not run on {name}"
    result, mask = out / f"{vid}.mp4", out / f"{vid}.mask.mp4"
    a, b = probe(source), probe(result)
    assert abs(float(a.fps) - float(b.fps)) < 1e-3
    assert (a.width, a.height) == (b.width, b.height)
    n = count_frames(source)
    assert count_frames(result) == n
    assert count_frames(mask) == n

    people = np.load(work / "detect" / vid / "people.npz")
    present = people["present"].any(axis=1)
    masks = np.stack(list(iter_frames(mask, "gray")))
    synthesized = (masks < 128).reshape(n, -1).sum(axis=1)
    if present.any():
        # Where a person was detected the avatar (black) covers part of the frame.
        assert (synthesized[present] > 0).mean() > 0.95
    meta = json.loads((out / f"{vid}.json").read_text())
    assert meta["frames"] == n
    assert set(meta["stages"]) == set(STAGES) - {"export"}
