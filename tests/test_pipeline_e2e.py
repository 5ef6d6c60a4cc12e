"""The whole pipeline through the CLI on the generated sample plus bad inputs."""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.video import VideoWriter, count_frames, iter_frames, probe

pytestmark = pytest.mark.slow


def _no_person_video(path: Path) -> None:
    """A room with a moving light and nobody in it."""
    h, w = 120, 160
    y, x = np.mgrid[0:h, 0:w]
    with VideoWriter(path, Fraction(12), w, h, "h264") as out:
        for t in range(10):
            base = (0.5 + 0.5 * np.sin((x + 4 * t) / 17.0)) * 120 + 60
            frame = np.stack([base, base * 0.9, (y / h) * 200], axis=-1)
            out.write(frame.astype(np.uint8))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    from stages.sample_data import generate_sample

    root = tmp_path_factory.mktemp("e2e")
    src = root / "input"
    generate_sample(src, videos=2, seed=3, width=256, height=192, frames=16, progress=False)
    (src / "manifest.csv").unlink()  # exercise class-per-folder discovery
    bad = src / "bad"
    bad.mkdir()
    (bad / "zero.mp4").write_bytes(b"")
    (bad / "text.mp4").write_text("definitely not a video\n" * 50)
    good = next(src.glob("*/*.mp4"))
    (bad / "truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 4])
    (bad / "dangling.mp4").symlink_to(root / "does-not-exist.mp4")
    (src / "empty_room").mkdir()
    _no_person_video(src / "empty_room" / "nobody.mp4")
    out, work = root / "output", root / "work"
    args = ["run", "--input", str(src), "--output", str(out), "--workdir", str(work),
            "--no-progress"]
    code = main(args)
    return {"src": src, "out": out, "work": work, "args": args, "code": code}


def test_exit_code_reports_failed_videos(dataset):
    assert dataset["code"] == 1


def test_dataset_json_records_every_video(dataset):
    meta = json.loads((dataset["out"] / "dataset.json").read_text())
    by_id = {v["id"]: v for v in meta["videos"]}
    for bad in ("bad/zero", "bad/text", "bad/truncated", "bad/dangling"):
        assert by_id[bad]["status"] == "failed", bad
        assert by_id[bad]["reason"], bad
    assert "empty file" in by_id["bad/zero"]["reason"]
    assert "does not exist" in by_id["bad/dangling"]["reason"]
    ok = [v for v in meta["videos"] if v["status"] == "ok"]
    assert len(ok) == 3
    assert by_id["empty_room/nobody"]["status"] == "ok"
    assert any("no person" in n for n in by_id["empty_room/nobody"]["notes"])
    assert meta["counts"] == {"total": 7, "ok": 3, "failed": 4}


def test_outputs_keep_fps_size_and_frame_count(dataset):
    src, out = dataset["src"], dataset["out"]
    for video in sorted(src.glob("*/*.mp4")):
        if video.parent.name == "bad":
            continue
        rel = video.relative_to(src).with_suffix("")
        result = out / f"{rel}.mp4"
        mask = out / f"{rel}.mask.mp4"
        assert result.is_file() and mask.is_file() and (out / f"{rel}.json").is_file()
        a, b = probe(video), probe(result)
        assert (a.width, a.height) == (b.width, b.height)
        assert abs(float(a.fps) - float(b.fps)) < 1e-3
        assert b.codec == "h264"
        assert count_frames(result) == count_frames(video) == count_frames(mask)


def test_people_are_masked_and_replaced(dataset):
    src, out = dataset["src"], dataset["out"]
    people = [v for v in src.glob("*/*.mp4") if v.parent.name not in ("bad", "empty_room")]
    assert people
    for video in people:
        rel = video.relative_to(src).with_suffix("")
        meta = json.loads((out / f"{rel}.json").read_text())
        assert meta["persons"], f"{rel}: nobody found"
        gt = np.load(video.with_name(video.stem + ".gt.npz"))
        masks = np.stack(list(iter_frames(out / f"{rel}.mask.mp4", "gray")))
        synthesized = masks < 128
        assert synthesized.mean() > 0.01
        # The person's ground-truth joints lie in the synthesized (black) region.
        joints = np.round(gt["joints2d"]).astype(int)
        t, j = np.meshgrid(np.arange(joints.shape[0]), [5, 6, 11, 12], indexing="ij")
        xs = np.clip(joints[t, j, 0], 0, masks.shape[2] - 1)
        ys = np.clip(joints[t, j, 1], 0, masks.shape[1] - 1)
        assert synthesized[t, ys, xs].mean() > 0.8
        # And the anonymized frames differ from the originals where the person was.
        orig = np.stack(list(iter_frames(video))).astype(int)
        anon = np.stack(list(iter_frames(out / f"{rel}.mp4"))).astype(int)
        inside = np.abs(orig - anon).sum(-1)[synthesized].mean()
        outside = np.abs(orig - anon).sum(-1)[~synthesized].mean()
        assert inside > 3 * outside


def test_video_without_person_is_exported_unchanged(dataset):
    src, out = dataset["src"], dataset["out"]
    mask = np.stack(list(iter_frames(out / "empty_room/nobody.mask.mp4", "gray")))
    assert (mask > 200).all()
    orig = np.stack(list(iter_frames(src / "empty_room/nobody.mp4"))).astype(int)
    anon = np.stack(list(iter_frames(out / "empty_room/nobody.mp4"))).astype(int)
    assert np.abs(orig - anon).mean() < 3


def test_second_run_recomputes_nothing(dataset, capsys):
    code = main(dataset["args"])
    assert code == 1
    printed = capsys.readouterr().out
    assert " 0 stage results computed" in printed


def test_changed_render_setting_reruns_render_and_downstream(dataset, capsys):
    work = dataset["work"]
    before = {p: p.stat().st_mtime_ns for p in work.glob("detect/*/*/meta.json")}
    main([*dataset["args"], "--stage", "render", "--set", "render.seed=7"])
    status_args = ["status", "--input", str(dataset["src"]), "--workdir", str(work),
                   "--output", str(dataset["out"]),
                   "--set", "render.seed=7"]
    capsys.readouterr()
    assert main(status_args) == 0
    table = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:]}
    assert rows["render"][0] == "3"  # done
    assert rows["harmonize"][1] == "3"  # stale: render changed
    after = {p: p.stat().st_mtime_ns for p in work.glob("detect/*/*/meta.json")}
    assert before == after  # upstream untouched
    main([*dataset["args"], "--set", "render.seed=7"])
    capsys.readouterr()
    main(status_args)
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["export"][0] == "3"


def test_preview_is_written_on_request(dataset, tmp_path):
    out = tmp_path / "preview-out"
    args = ["run", "--input", str(dataset["src"] / "empty_room"), "--output", str(out),
            "--workdir", str(tmp_path / "w"), "--no-progress", "--set", "export.preview=true"]
    assert main(args) == 0
    preview = out / "nobody.preview.mp4"
    assert probe(preview).width == 2 * probe(out / "nobody.mp4").width


@pytest.mark.parametrize("extra,message", [
    (["--set", "fit.no_such_key=1"], "fit.no_such_key: unknown key"),
    (["--set", "export.crf=high"], "export.crf"),
    (["--set", "nonsense.key=1"], "nonsense: unknown section"),
    (["--stage", "paint"], "--stage paint: unknown stage"),
])
def test_config_errors_exit_2(dataset, tmp_path, capsys, extra, message):
    args = ["run", "--input", str(dataset["src"]), "--output", str(tmp_path / "o"),
            "--workdir", str(tmp_path / "w"), "--no-progress", *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_output_inside_input_exits_2(dataset, capsys):
    args = ["run", "--input", str(dataset["src"]), "--output", str(dataset["src"] / "out"),
            "--workdir", str(dataset["work"]), "--no-progress"]
    assert main(args) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert not (dataset["src"] / "out").exists()


def test_missing_input_exits_2(tmp_path, capsys):
    args = ["run", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"),
            "--workdir", str(tmp_path / "w")]
    assert main(args) == 2
    assert "run.input" in capsys.readouterr().err
    shutil.rmtree(tmp_path, ignore_errors=True)
