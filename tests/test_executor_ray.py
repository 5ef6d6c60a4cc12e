"""The Ray executor on a local two-CPU Ray: a worker killed mid-task is retried, a video
that keeps killing its worker is recorded as failed, and the generated sample gives the
same artifacts and outputs as the local executor, video by video."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from test_faults import FAST, _toy_dataset, same_artifact

from pipeline.config import Section, load_config
from pipeline.dataset import discover
from pipeline.executors.local import LocalExecutor
from pipeline.runner import Runner
from pipeline.stage import Stage, VideoJob
from pipeline.video import VideoWriter, iter_chunks

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'avatarize[ray]')")

from pipeline.executors.ray import RayExecutor, start_local_ray  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    start_local_ray(num_cpus=2)
    yield
    ray.shutdown()


# ---- a worker killed mid-task -------------------------------------------------------
class DyingConfig(Section):
    marker_dir: str = ""  # where the stage notes that it already died once
    always: bool = False  # die on every attempt (for the recorded-failure test)


class DiesOnceOnB(Stage):
    """Sums the frames; for video `b` the worker process dies halfway through, on the
    first attempt (or on every attempt with `always`)."""

    name = "dies"
    config_model = DyingConfig

    def process(self, job: VideoJob) -> dict:
        sums = [float(c.sum()) for c in iter_chunks(job.video.path, 2)]
        np.save(job.out_dir / "sums.npy", np.array(sums))
        marker = Path(self.config.marker_dir) / job.video.id
        if job.video.id == "b" and (self.config.always or not marker.exists()):
            marker.write_text(str(os.getpid()))
            os._exit(1)  # no exception, no cleanup: like a node lost or an OOM kill
        return {"sum": sum(sums)}


class Reads(Stage):
    name = "reads"
    requires = ("dies",)

    def process(self, job: VideoJob) -> dict:
        return {"sum": float(np.load(job.inputs["dies"] / "sums.npy").sum())}


def _toy_runner(tmp_path: Path, executor, *overrides: str) -> tuple[Runner, list]:
    src = tmp_path / "in"
    src.mkdir(exist_ok=True)
    for name, level in (("a", 40), ("b", 90), ("c", 140)):
        with VideoWriter(src / f"{name}.mkv", Fraction(10), 16, 16, "gray") as out:
            for _ in range(4):
                out.write(np.full((16, 16), level, np.uint8))
    models = {"dies": DyingConfig, "reads": Section}
    cfg = load_config(None, models, [
        f"run.input={src}", f"run.workdir={tmp_path / 'work'}", f"run.output={tmp_path / 'o'}",
        "run.progress=false", f"dies.marker_dir={tmp_path}", *overrides])
    return Runner(cfg, [DiesOnceOnB, Reads], executor), discover(src)


@pytest.fixture()
def executor(local_ray):
    with RayExecutor() as ex:  # its actors hold the cluster's CPUs until closed
        yield ex


def test_killed_worker_is_retried_and_the_run_completes(executor, tmp_path):
    runner, videos = _toy_runner(tmp_path, executor)
    report = runner.run(videos)
    assert (tmp_path / "b").is_file()  # the worker really died once
    assert report.exit_code == 0
    assert [o.computed for o in report.outcomes] == [["dies", "reads"]] * 3
    assert runner.store.get("reads", "b").summary["sum"] == pytest.approx(4 * 256 * 3 * 90)  # RGB
    # The dead attempt's half-written folder stays in .tmp, never in the entry's place;
    # the next run drops it and recomputes nothing.
    assert len(list(runner.store.tmp_root.glob("dies-*"))) == 1
    report = runner.run(videos)
    assert [o.reused for o in report.outcomes] == [["dies", "reads"]] * 3
    assert not any(runner.store.tmp_root.glob("dies-*"))


def test_video_that_always_kills_its_worker_is_recorded_failed(executor, tmp_path):
    runner, videos = _toy_runner(tmp_path, executor, "dies.always=true")
    report = runner.run(videos)
    assert report.exit_code == 1
    failed = {o.video.id: o for o in report.failed}
    assert set(failed) == {"b"}
    assert failed["b"].failed_stage == "dies"
    assert "worker died" in failed["b"].reason and "after 3 attempts" in failed["b"].reason
    assert runner.store.get_failure("dies", "b")["reason"] == failed["b"].reason
    assert runner.store.get("reads", "a") is not None and runner.store.get("dies", "b") is None


# ---- the generated sample, local vs Ray -----------------------------------------------
def _reads_run_settings(runner: Runner, stage: str) -> bool:
    cls = runner.classes[stage]
    return bool(cls.fingerprint_run_keys) or any(
        _reads_run_settings(runner, d) for d in cls.requires)


@pytest.mark.slow
def test_sample_on_ray_equals_local(local_ray, tmp_path):
    from stages import section_models, stage_classes
    from stages.sample_data import generate_sample

    src = tmp_path / "in"
    generate_sample(src, videos=2, seed=3, width=128, height=96, frames=8, progress=False)
    videos = discover(src)
    runs = {}
    for name, make in (("local", LocalExecutor), ("ray", lambda: RayExecutor(workers=2))):
        cfg = load_config(None, section_models(), [
            f"run.input={src}", f"run.workdir={tmp_path / name / 'work'}",
            f"run.output={tmp_path / name / 'out'}", "run.progress=false", *FAST])
        with make() as executor:
            runner = Runner(cfg, stage_classes(), executor)
            runs[name] = (runner, runner.run(videos))
    (local, local_report), (on_ray, ray_report) = runs["local"], runs["ray"]
    assert local_report.exit_code == ray_report.exit_code == 0
    # The runner's books are the same: per video, what was computed, in which order.
    assert [(o.video.id, o.status, o.computed, o.reused) for o in local_report.outcomes] == \
        [(o.video.id, o.status, o.computed, o.reused) for o in ray_report.outcomes]
    compared = 0
    for video in videos:
        for stage in local.order:
            a, b = local.store.get(stage, video.id), on_ray.store.get(stage, video.id)
            if not _reads_run_settings(local, stage):  # export's holds run.output
                assert a.fingerprint == b.fingerprint, (stage, video.id)
                assert a.summary == b.summary, (stage, video.id)
            for f in sorted(a.path.iterdir()):
                same_artifact(f, b.path / f.name)
                compared += 1
        for suffix in (".mp4", ".mask.mp4", ".json"):
            rel = f"{video.id}{suffix}"
            same_artifact(tmp_path / "local/out" / rel, tmp_path / "ray/out" / rel)
    assert compared >= 2 * 12


def test_cli_runs_on_ray(local_ray, tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    args = _toy_dataset(tmp_path, monkeypatch)
    (tmp_path / "none.yaml").write_text("{}\n")
    assert main([*args, "--executor", "ray", "--ray-workers", "2"]) == 0
    assert "3/3 videos ok, 0 failed; 3 stage results computed, 0 reused" in \
        capsys.readouterr().out
    assert np.load(tmp_path / "work/copy/c/means.npz")["means"].shape == (3,)
    assert ray.is_initialized()  # a cluster the executor joined is not shut down by it
