"""pipeline/bench_memory.py: what it measures is the process tree's memory, attributed to
the stage running at the time."""

from __future__ import annotations

import subprocess
import sys
import time

from pipeline.bench_memory import STAGES, current_stage, to_markdown, tree_rss_mb


def test_tree_rss_counts_children():
    # A parent that starts a child holding 300 MB: the tree's memory includes the child's.
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            "'import time; b = bytearray(300 * 2**20); b[::4096] = b\"x\" * len(b[::4096]); "
            "time.sleep(30)']); time.sleep(30)")
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        seen = 0.0
        deadline = time.time() + 20
        while time.time() < deadline and seen < 300:
            seen = tree_rss_mb(parent.pid)
            time.sleep(0.2)
        assert seen >= 300
    finally:
        subprocess.run(["pkill", "-P", str(parent.pid)], check=False)
        parent.kill()
        parent.wait()
    assert tree_rss_mb(parent.pid) == 0  # gone


def test_current_stage_is_the_first_without_an_artifact(tmp_path):
    assert current_stage(tmp_path, "a/b") == "detect"
    for stage in STAGES[:3]:
        (tmp_path / stage / "a/b").mkdir(parents=True)
        (tmp_path / stage / "a/b" / "meta.json").write_text("{}")
    assert current_stage(tmp_path, "a/b") == STAGES[3]
    for stage in STAGES[3:]:
        (tmp_path / stage / "a/b").mkdir(parents=True)
        (tmp_path / stage / "a/b" / "meta.json").write_text("{}")
    assert current_stage(tmp_path, "a/b") == "done"


def test_markdown_names_each_stage_and_the_peak():
    run = {"minutes": 10.0, "frames": 7200, "width": 320, "height": 240, "fps": 12.0,
           "exit_code": 0, "peak_rss_mb": 1500, "wall_seconds": 100.0, "pipeline_fps": 72.0,
           "stages": {s: {"fps": 10.0, "seconds": 1.0, "peak_rss_mb": 1000 + i}
                      for i, s in enumerate(STAGES)}}
    md = to_markdown([run], {"machine": "x86_64", "cpus": 2, "device": "cpu"})
    assert "peak 1500 MB" in md and "7200 frames" in md
    assert all(f"| {s} | 10.0 | 1.0 | {1000 + i} |" in md for i, s in enumerate(STAGES))
