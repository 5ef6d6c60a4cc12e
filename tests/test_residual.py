"""The residual measures on a real video: the source against itself finds the person, a
frame-filling avatar hides everything."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from pipeline.residual import residual_report
from pipeline.video import VideoWriter, probe


@pytest.mark.real
def test_residual_sees_the_person_unless_an_avatar_covers_it(real_videos, tmp_path):
    src = real_videos / "intel__asl_help.mkv"
    same = residual_report(src, src, None, stride=10)
    assert same["source_people"] >= 0.8 and same["source_faces"] >= 0.8
    assert same["residual_people"] == same["source_people"]
    assert same["residual_person_fraction"] == pytest.approx(same["source_person_fraction"])
    assert 0.05 < same["source_person_fraction"] < 0.6

    info = probe(src)
    cover = tmp_path / "cover.mkv"
    with VideoWriter(cover, Fraction(info.fps_num, info.fps_den), info.width, info.height,
                     "rgba") as out:
        for _ in range(same["frames"]):
            out.write(np.full((info.height, info.width, 4), 255, np.uint8))
    hidden = residual_report(src, src, cover, stride=10)
    assert hidden["residual_person_fraction"] == 0.0
    assert hidden["residual_people"] == 0.0 and hidden["residual_faces"] == 0.0
    assert hidden["source_people"] == same["source_people"]
