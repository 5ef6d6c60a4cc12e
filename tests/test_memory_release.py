"""Freed heap handed back to the OS: between stages and chunk by chunk within a video."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import executors
from pipeline.config import RunSection
from pipeline.dataset import VideoItem
from pipeline.executors import StageTask, run_task
from pipeline.memory import _malloc_trim, release_freed_memory
from pipeline.stage import Stage, VideoJob
from pipeline.store import ArtifactStore

glibc = pytest.mark.skipif(_malloc_trim() is None, reason="malloc_trim needs glibc")

# A process whose freed numpy buffers stay in malloc's heap (mmap threshold raised, as
# glibc does by itself once large blocks have been freed), pinned by a small
# allocation made after each, so only a trim can give their pages back.
FRAGMENTED = """
import ctypes, sys
import numpy as np
libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD: 1 MB blocks come from the heap
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024
blocks, pins = [], []
for _ in range(300):
    blocks.append(np.ones(1 << 20, np.uint8))
    pins.append(np.ones(4000, np.uint8))  # between the blocks: no free block meets the top
del blocks
before = rss_mb()
from pipeline.memory import release_freed_memory
assert release_freed_memory(collect=sys.argv[1] == "1")
print(before, rss_mb())
"""


@glibc
@pytest.mark.parametrize("collect", ["0", "1"])
def test_release_gives_freed_heap_back(collect):
    out = subprocess.run([sys.executable, "-c", FRAGMENTED, collect], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    before, after = map(float, out.stdout.split())
    assert before - after > 200, (before, after)  # 300 MB were free in the heap


@glibc
def test_release_returns_true_on_glibc():
    assert release_freed_memory(collect=False) is True


class Chunked(Stage):
    name = "chunked"

    def process(self, job: VideoJob) -> dict:
        for _ in range(10):
            job.advance(3)  # 30 frames in chunks of 3
        return {}


def test_run_task_trims_once_per_chunk_frames(tmp_path, monkeypatch):
    trims: list[bool] = []
    monkeypatch.setattr(executors, "release_freed_memory", lambda collect: trims.append(collect))
    video = VideoItem(path=tmp_path / "v.mp4", rel_path=Path("v.mp4"), id="v")
    store = ArtifactStore(tmp_path / "work")
    run = RunSection(chunk_frames=8)
    advanced: list[int] = []
    task = StageTask(video=video, fingerprint="f", inputs={}, upstream={})
    result = run_task(Chunked({}, run), store, task, run, advanced.append)
    assert result.status == "ok"
    assert advanced == [3] * 10
    # At 9, 18 and 27 frames: each time at least chunk_frames (8) since the last trim,
    # without the full garbage collection.
    assert trims == [False, False, False]
