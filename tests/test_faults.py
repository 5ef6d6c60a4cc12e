"""Faults: `avatarize run` killed with SIGKILL at random points and resumed; a full disk and
an unwritable folder give a clear error and leave finished artifacts intact."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import EXIT_STORAGE, EXIT_USAGE, main
from pipeline.config import Section
from pipeline.stage import Stage, VideoJob
from pipeline.store import META
from pipeline.video import VideoWriter, count_frames, iter_chunks

# Small and fast, like the other end-to-end tests (the results change, not the code paths).
FAST = ["fit.iterations_global=10", "fit.iterations_full=20", "detect.tiles=1", "detect.pad=0"]


# ---- comparing and checking artifacts (also used by test_executor_ray) ---------------
def decoded(path: Path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        out = []
        for frame in container.decode(video=0):
            try:
                out.append(frame.to_ndarray())
            except ValueError:  # formats numpy conversion lacks (bgr0): compare as RGB
                out.append(frame.to_ndarray(format="rgb24"))
        return out


def same_artifact(a: Path, b: Path) -> None:
    """Arrays and JSON exactly equal; videos equal frame by frame after decoding (our FFV1
    and H.264 settings are deterministic; container headers may differ)."""
    if a.suffix == ".npz":
        x, y = np.load(a), np.load(b)
        assert sorted(x.files) == sorted(y.files), a
        for k in x.files:
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"{a}:{k}")
    elif a.suffix in (".mkv", ".mp4"):
        fa, fb = decoded(a), decoded(b)
        assert len(fa) == len(fb) > 0, a
        for i, (x, y) in enumerate(zip(fa, fb, strict=True)):
            np.testing.assert_array_equal(x, y, err_msg=f"{a} frame {i}")
    elif a.suffix == ".json" and a.name != META:
        assert json.loads(a.read_text()) == json.loads(b.read_text()), a


def finished_entries(work: Path) -> dict[Path, int]:
    """Every finished entry (a folder with meta.json), with meta.json's mtime. The run
    may be working while we look: its temporary folders (.tmp/) come and go, so they are
    not walked, and a listing that raced with a rename is taken again."""
    for _ in range(20):
        try:
            stages = [d for d in work.iterdir() if d.is_dir() and d.name != ".tmp"] \
                if work.is_dir() else []
            return {p.parent: p.stat().st_mtime_ns
                    for d in stages for p in d.glob(f"**/{META}")}
        except FileNotFoundError:
            time.sleep(0.01)
    raise AssertionError(f"{work}: could not list the finished entries")


def assert_loads(path: Path) -> None:
    """A file that looks finished is complete: it parses or decodes to the end."""
    if path.suffix == ".npz":
        with np.load(path) as z:
            for k in z.files:
                z[k]  # noqa: B018 - reading is the check
    elif path.suffix in (".mkv", ".mp4"):
        assert count_frames(path) > 0, path
    elif path.suffix == ".json":
        json.loads(path.read_text())


# ---- SIGKILL at random points, then resume ------------------------------------------------
def _cli(src: Path, out: Path, work: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "run", "--input", str(src), "--output",
            str(out), "--workdir", str(work), "--no-progress",
            *[a for s in FAST for a in ("--set", s)]]


def _counts(stdout: str) -> tuple[int, int]:
    m = re.search(r"(\d+) stage results computed, (\d+) reused", stdout)
    assert m, stdout
    return int(m.group(1)), int(m.group(2))


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(tmp_path):
    from stages.sample_data import generate_sample

    src = tmp_path / "in"
    generate_sample(src, videos=2, seed=5, width=128, height=96, frames=8, progress=False)
    ref = subprocess.run(_cli(src, tmp_path / "ref_out", tmp_path / "ref_work"),
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    total = _counts(ref.stdout)[0]

    out, work = tmp_path / "out", tmp_path / "work"
    rng = random.Random(11)
    kept: dict[Path, int] = {}  # finished entries and the mtime they had when first seen
    kills = 0
    # Kill once the run reached a random number of finished entries, plus a random
    # moment: the kills land mid-work (not during start-up), at different stages, and
    # always leave the later stages to the resumed run.
    # The targets lie in the first half: late stages (motion, export, train) finish in
    # milliseconds on these tiny videos, so a kill aimed near the end overshoots it.
    for target in sorted(rng.sample(range(1, total // 2), 3)):
        target = max(target, len(finished_entries(work)) + 1)
        proc = subprocess.Popen(_cli(src, out, work), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while proc.poll() is None and len(finished_entries(work)) < target \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        # A random moment more, cut short before the run gets near its end: small videos
        # finish the cheap late stages (motion, export, train) within that moment.
        until = time.monotonic() + rng.uniform(0.0, 0.3)
        while proc.poll() is None and time.monotonic() < until \
                and len(finished_entries(work)) < min(target + 2, total - 2):
            time.sleep(0.01)
        if proc.poll() is None:
            proc.kill()  # SIGKILL
            kills += 1
        proc.wait()
        now = finished_entries(work)
        for entry, mtime in now.items():
            for f in entry.iterdir():
                assert_loads(f)
            assert kept.setdefault(entry, mtime) == mtime, f"{entry} was recomputed"
        for f in out.rglob("*"):
            if f.is_file() and not f.name.startswith("."):
                assert_loads(f)
    print(f"{kills} kills; {len(kept)} of {total} entries finished before the resume")
    assert kills == 3
    assert 0 < len(kept) < total

    resumed = subprocess.run(_cli(src, out, work), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    computed, reused = _counts(resumed.stdout)
    assert (computed, reused) == (total - len(kept), len(kept))
    final = finished_entries(work)
    assert all(final[e] == m for e, m in kept.items())  # nothing finished was redone
    assert not (work / ".tmp").exists() or not any((work / ".tmp").iterdir())
    for entry in final:
        twin = tmp_path / "ref_work" / entry.relative_to(work)
        for f in entry.iterdir():
            same_artifact(f, twin / f.name)
    for f in (tmp_path / "ref_out").rglob("*"):
        if f.is_file() and f.name != "dataset.json":
            same_artifact(f, out / f.relative_to(tmp_path / "ref_out"))
    # No temporary file of a killed export is left in the dataset.
    files = sorted(f.relative_to(out) for f in out.rglob("*") if f.is_file())
    assert files == sorted(f.relative_to(tmp_path / "ref_out")
                           for f in (tmp_path / "ref_out").rglob("*") if f.is_file())


def test_orphaned_export_tmp_files_are_swept(tmp_path):
    from stages.export import _tmp_for, sweep_orphaned_tmp

    out = tmp_path / "out"
    (out / "wave").mkdir(parents=True)
    (out / "other").mkdir()
    final = out / "wave" / "a.mp4"
    final.write_bytes(b"finished")
    orphans = [_tmp_for(final), _tmp_for(out / "wave" / "a.mask.mp4"),
               out / "wave" / f".a.json.{'0' * 32}.tmp", out / f".dataset.json.{'f' * 32}.tmp"]
    for f in orphans:
        f.write_bytes(b"half")
    keep = [final, out / "wave" / ".hidden_user_file", out / "wave" / "b.tmp.mp4",
            out / "other" / _tmp_for(out / "other" / "z.mp4").name]  # not this run's folder
    for f in keep[1:]:
        f.write_bytes(b"user")
    removed = sweep_orphaned_tmp(out, ["wave/a", "wave/b"])
    assert sorted(removed) == sorted(orphans)
    assert all(f.exists() for f in keep) and not any(f.exists() for f in orphans)


# ---- disk full and unwritable folders ---------------------------------------------------
class Copy(Stage):
    """Writes the source's frame means (a small npz) per video."""

    name = "copy"

    def process(self, job: VideoJob) -> dict:
        means = np.concatenate([c.reshape(len(c), -1).mean(1) for c in
                                iter_chunks(job.video.path, 4)])
        np.savez(job.out_dir / "means.npz", means=means)
        return {"frames": len(means)}


def _toy_dataset(tmp_path: Path, monkeypatch) -> list[str]:
    src = tmp_path / "in"
    src.mkdir()
    for name, level in (("a", 30), ("b", 60), ("c", 90)):
        with VideoWriter(src / f"{name}.mkv", Fraction(10), 16, 16, "gray") as out:
            for _ in range(3):
                out.write(np.full((16, 16), level, np.uint8))
    # The CLI with this one toy stage instead of the real pipeline.
    monkeypatch.setattr("stages.stage_classes", lambda: [Copy])
    monkeypatch.setattr("stages.section_models", lambda: {"copy": Section})
    return ["run", "--input", str(src), "--output", str(tmp_path / "out"), "--workdir",
            str(tmp_path / "work"), "--no-progress", "--config", str(tmp_path / "none.yaml")]


def test_disk_full_stops_the_run_with_a_clear_error(tmp_path, monkeypatch, capsys):
    args = _toy_dataset(tmp_path, monkeypatch)
    (tmp_path / "none.yaml").write_text("{}\n")
    real_replace = os.replace
    work = tmp_path / "work"

    def full_after_first_entry(src, dst, *a, **k):
        # The disk fills up once the first entry is in place.
        if any(work.glob(f"copy/*/{META}")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", full_after_first_entry)
    assert main(args) == EXIT_STORAGE
    err = capsys.readouterr().err
    assert "No space left on device" in err and str(work / ".tmp") in err
    done = finished_entries(work)
    assert [e.name for e in done] == ["a"]
    assert np.load(work / "copy/a/means.npz")["means"].shape == (3,)
    assert not (work / "copy" / ".failed").exists()  # not blamed on the videos

    monkeypatch.setattr(os, "replace", real_replace)  # space freed
    capsys.readouterr()
    assert main(args) == 0
    assert "2 stage results computed, 1 reused" in capsys.readouterr().out
    assert finished_entries(work)[work / "copy/a"] == done[work / "copy/a"]


@pytest.mark.parametrize("key", ["workdir", "output"])
def test_unwritable_folder_is_a_clear_error(tmp_path, monkeypatch, capsys, key):
    args = _toy_dataset(tmp_path, monkeypatch)
    (tmp_path / "none.yaml").write_text("{}\n")
    # Root ignores permission bits, so make the folder impossible: its parent is a file.
    (tmp_path / "a-file").write_text("not a folder")
    bad = tmp_path / "a-file" / key
    args[args.index(f"--{key}") + 1] = str(bad)
    assert main(args) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"run.{key}: cannot write to {bad}" in err


# ---- retries ---------------------------------------------------------------------------
class Flaky(Copy):
    """Raises an unexpected error on its first attempts at video b (`fails` of them)."""

    name = "copy"
    fails = 0
    attempts: list[str] = []

    def process(self, job: VideoJob) -> dict:
        Flaky.attempts.append(job.video.id)
        if job.video.id == "b" and Flaky.attempts.count("b") <= Flaky.fails:
            raise RuntimeError("flaky")
        return super().process(job)


@pytest.mark.parametrize("fails,ok", [(2, True), (3, False)])
def test_unexpected_errors_are_retried_locally(tmp_path, monkeypatch, capsys, fails, ok):
    args = _toy_dataset(tmp_path, monkeypatch)
    (tmp_path / "none.yaml").write_text("{}\n")
    monkeypatch.setattr("stages.stage_classes", lambda: [Flaky])
    Flaky.fails, Flaky.attempts = fails, []
    assert main(args) == (0 if ok else 1)
    assert sorted(Flaky.attempts) == ["a", "b", "b", "b", "c"]  # run.retries defaults to 2
    out = capsys.readouterr().out
    assert ("FAILED" in out) != ok
    if not ok:
        assert "b.mkv: copy: RuntimeError: flaky (after 3 attempts)" in out
