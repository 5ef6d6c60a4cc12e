"""The runner on two small real stages: fingerprints, reuse, staleness, force, failures."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from pydantic import Field

from pipeline.config import Section, load_config
from pipeline.dataset import discover
from pipeline.runner import Runner
from pipeline.stage import Stage, VideoFailed, VideoJob
from pipeline.video import VideoDecodeError, VideoWriter, iter_chunks


class MeanConfig(Section):
    scale: float = Field(1.0)


class FrameMeans(Stage):
    """Per-frame mean brightness of the source video, times a configured scale."""

    name = "means"
    config_model = MeanConfig
    calls: list[str] = []

    def process(self, job: VideoJob) -> dict:
        FrameMeans.calls.append(job.video.id)
        try:
            means = [c.reshape(len(c), -1).mean(1) for c in iter_chunks(job.video.path, 4)]
        except VideoDecodeError as exc:
            raise VideoFailed(str(exc)) from exc
        values = np.concatenate(means) * self.config.scale
        np.save(job.out_dir / "means.npy", values)
        job.advance(len(values))
        return {"frames": len(values)}


class TotalConfig(Section):
    offset: float = 0.0


class Total(Stage):
    name = "total"
    requires = ("means",)
    config_model = TotalConfig
    calls: list[str] = []

    def process(self, job: VideoJob) -> dict:
        Total.calls.append(job.video.id)
        values = np.load(job.inputs["means"] / "means.npy")
        assert job.upstream["means"]["frames"] == len(values)
        total = float(values.sum()) + self.config.offset
        (job.out_dir / "total.json").write_text(json.dumps(total))
        return {"total": total}


STAGES = [FrameMeans, Total]
MODELS = {"means": MeanConfig, "total": TotalConfig}


def make_videos(root: Path) -> None:
    for name, level in (("a", 50), ("b", 150)):
        with VideoWriter(root / f"{name}.mkv", Fraction(10), 16, 16, "gray") as out:
            for _ in range(6):
                out.write(np.full((16, 16), level, np.uint8))
    (root / "broken.mp4").write_text("not a video")


@pytest.fixture()
def setup(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    make_videos(src)
    FrameMeans.calls, Total.calls = [], []

    def runner(*overrides: str) -> Runner:
        cfg = load_config(None, MODELS, [
            f"run.input={src}", f"run.workdir={tmp_path / 'work'}",
            f"run.output={tmp_path / 'out'}", "run.progress=false", *overrides])
        return Runner(cfg, STAGES)

    return runner, discover(src)


def test_runs_everything_then_nothing(setup):
    make_runner, videos = setup
    report = make_runner().run(videos)
    assert report.exit_code == 1
    failed = {o.video.id: o for o in report.failed}
    assert set(failed) == {"broken"}
    assert failed["broken"].failed_stage == "means"
    assert "not a readable video" in failed["broken"].reason
    assert sorted(FrameMeans.calls) == ["a", "b", "broken"]
    assert sorted(Total.calls) == ["a", "b"]
    store = make_runner().store
    assert store.get("total", "a").summary["total"] == pytest.approx(300.0)
    assert store.get("means", "a").meta["frames"] == 6  # counted with progress bars off

    FrameMeans.calls, Total.calls = [], []
    report = make_runner().run(videos)
    assert FrameMeans.calls == ["broken"]  # failures are retried, finished work is not
    assert Total.calls == []
    assert all(set(o.reused) == {"means", "total"} for o in report.outcomes if o.status == "ok")


def test_config_change_makes_downstream_stale(setup):
    make_runner, videos = setup
    make_runner().run(videos)
    FrameMeans.calls, Total.calls = [], []
    runner = make_runner("means.scale=2.0")
    assert runner.status(videos)["total"]["stale"] == 2
    runner.run(videos)
    assert sorted(FrameMeans.calls) == ["a", "b", "broken"]
    assert sorted(Total.calls) == ["a", "b"]
    assert runner.store.get("total", "b").summary["total"] == pytest.approx(2 * 6 * 150)


def test_downstream_only_change_reuses_upstream(setup):
    make_runner, videos = setup
    make_runner().run(videos)
    FrameMeans.calls, Total.calls = [], []
    make_runner("total.offset=1").run(videos)
    assert FrameMeans.calls == ["broken"]
    assert sorted(Total.calls) == ["a", "b"]


def test_stage_selection_runs_missing_upstream_only(setup):
    make_runner, videos = setup
    runner = make_runner()
    runner.run(videos, selected=["means"])
    assert Total.calls == []
    assert runner.status(videos)["total"]["missing"] == 3
    FrameMeans.calls = []
    runner = make_runner()
    runner.run(videos, selected=["total"])
    assert FrameMeans.calls == ["broken"]
    assert sorted(Total.calls) == ["a", "b"]


def test_force_recomputes_selected_stage_only(setup):
    make_runner, videos = setup
    make_runner().run(videos)
    FrameMeans.calls, Total.calls = [], []
    make_runner().run(videos, selected=["total"], force=True)
    assert FrameMeans.calls == ["broken"]
    assert sorted(Total.calls) == ["a", "b"]


def test_source_change_is_noticed(setup, tmp_path):
    make_runner, videos = setup
    make_runner().run(videos)
    FrameMeans.calls = []
    with VideoWriter(tmp_path / "in" / "a.mkv", Fraction(10), 16, 16, "gray") as out:
        for _ in range(3):
            out.write(np.full((16, 16), 10, np.uint8))
    runner = make_runner()
    runner.run(discover(tmp_path / "in"))
    assert "a" in FrameMeans.calls
    assert runner.store.get("means", "a").summary["frames"] == 3


def test_crash_mid_write_leaves_no_finished_entry(setup):
    make_runner, videos = setup

    class Crashing(FrameMeans):
        def process(self, job: VideoJob) -> dict:
            (job.out_dir / "partial.npy").write_bytes(b"half")
            raise KeyboardInterrupt

    runner = make_runner()
    runner.classes["means"] = Crashing
    with pytest.raises(KeyboardInterrupt):
        runner.run(videos)
    assert runner.store.get("means", "a") is None
    assert not (runner.store.root / "means" / "a").exists()
    make_runner().run(videos)  # the next run cleans up and completes
    assert not (make_runner().store.tmp_root).exists() or not any(
        make_runner().store.tmp_root.iterdir())


class UnitsConfig(Section):
    factor: float = 1.0


class Scaled(Stage):
    """Reads a shared section (`units`) besides its own, like fit and render read `body`."""

    name = "scaled"
    requires = ("means",)
    config_model = TotalConfig
    shared_sections = ("units",)
    calls: list[str] = []

    def process(self, job: VideoJob) -> dict:
        Scaled.calls.append(job.video.id)
        values = np.load(job.inputs["means"] / "means.npy")
        return {"total": float(values.sum()) * self.shared["units"].factor}


def test_shared_section_enters_the_fingerprint_of_its_readers_only(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    make_videos(src)
    (src / "broken.mp4").unlink()

    def runner(*overrides: str) -> Runner:
        models = {"units": UnitsConfig, "means": MeanConfig, "scaled": TotalConfig}
        cfg = load_config(None, models, [
            f"run.input={src}", f"run.workdir={tmp_path / 'work'}",
            f"run.output={tmp_path / 'out'}", "run.progress=false", *overrides])
        return Runner(cfg, [FrameMeans, Scaled])

    videos = discover(src)
    runner().run(videos)
    FrameMeans.calls, Scaled.calls = [], []
    changed = runner("units.factor=3")
    assert changed.status(videos)["scaled"]["stale"] == 2
    assert changed.status(videos)["means"]["done"] == 2
    changed.run(videos)
    assert FrameMeans.calls == [] and sorted(Scaled.calls) == ["a", "b"]
    assert changed.store.get("scaled", "a").summary["total"] == pytest.approx(3 * 6 * 50)


def test_freed_memory_released_after_each_stage(setup, monkeypatch):
    from pipeline import runner as runner_module

    make_runner, videos = setup
    events: list[str] = []
    monkeypatch.setattr(runner_module, "release_freed_memory",
                        lambda: events.append("after total" if Total.calls else "after means"))
    make_runner().run(videos)
    # Once when means has run every video (before total starts), once after total.
    assert events == ["after means", "after total"]
