"""The tubelet transformer anonymizer on a tiny synthetic benchmark.

Each video: a white square moving across a grey background (horizontally or vertically:
the action) and, in the top-right corner, a static patch whose colour is the person's
gender (the private attribute). Four people, two actions, six repetitions; repetitions
0-2 train, 3-5 test.

Torch runs on one thread here: on a shared 2-core machine two threads fighting other
processes made these tiny models ten times slower."""

from __future__ import annotations

import argparse
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.video import VideoWriter, count_frames, probe
from privacy import tubelet_anonymizer as ta
from privacy.labels import load_labels
from privacy.tubelet_model import (
    MaskedBlock,
    TubeletAnonymizer,
    TubeletModelConfig,
    keep_counts,
)
from privacy.video_attack import VideoAttackConfig
from privacy.video_data import ClipConfig
from training.data import DataConfig, load_dataset
from training.models import ModelConfig

PEOPLE = {"p0": "male", "p1": "male", "p2": "female", "p3": "female"}
PATCH = {"male": (230, 40, 40), "female": (40, 60, 230)}


def write_benchmark(root: Path, frames: int = 8, size: int = 32, reps: int = 6,
                    seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = ["path,label,split"]
    for action in ("horizontal", "vertical"):
        (root / action).mkdir(parents=True, exist_ok=True)
        for pid, gender in PEOPLE.items():
            for rep in range(reps):
                rel = f"{action}/{pid}_r{rep}"
                y0, x0 = (int(v) for v in rng.integers(10, size - 8, 2))
                base = np.full((size, size, 3), 120, np.uint8)
                base[:8, size - 8:] = PATCH[gender]
                with VideoWriter(root / f"{rel}.mp4", Fraction(10), size, size) as out:
                    for t in range(frames):
                        frame = base.copy()
                        d = (3 * t) % (size - 10 - 6)
                        y, x = (y0, 10 + d) if action == "horizontal" else (10 + d, x0)
                        frame[y:y + 6, x:x + 6] = 250
                        out.write(frame)
                (root / f"{rel}.json").write_text(json.dumps(
                    {"person": {"id": pid, "gender": gender}, "repetition": rep}))
                rows.append(f"{rel}.mp4,{action},{'train' if rep < reps // 2 else 'test'}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def tiny_model(**kw) -> TubeletModelConfig:
    base = dict(frames=8, size=32, tubelet=(2, 8), width=32, depth=3, heads=2,
                prune_after=(1, 2), scorer_width=16, keep_ratio=0.5)
    return TubeletModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return write_benchmark(tmp_path_factory.mktemp("tubelet_bench"))


pytestmark = pytest.mark.usefixtures("one_thread")


def test_masked_attention_ignores_dropped_tokens():
    torch.manual_seed(0)
    block = MaskedBlock(16, 2).eval()
    x = torch.randn(2, 10, 16)
    keep = torch.ones(2, 10)
    keep[:, [1, 4, 7]] = 0.0
    y = block(x, keep)
    x2 = x.clone()
    x2[:, [1, 4, 7]] = 100 * torch.randn(2, 3, 16)  # wildly different dropped tokens
    y2 = block(x2, keep)
    kept = keep[0].bool()
    assert torch.equal(y[:, kept], y2[:, kept])
    # Control: the same change to kept tokens does change the others.
    x3 = x.clone()
    x3[:, [0, 2]] += torch.randn(2, 2, 16)  # (a constant shift would vanish in LayerNorm)
    assert not torch.allclose(block(x3, keep)[:, 3], y[:, 3])


def test_top_k_keeps_exact_ratio_per_frame_and_zeroes_dropped_tubelets():
    torch.manual_seed(0)
    model = TubeletAnonymizer(tiny_model()).eval()
    x = torch.rand(3, 3, 8, 32, 48)  # non-square: positions are interpolated
    for ratio in (0.25, 0.5, 0.8):
        out, masks = model(x, keep_ratio=ratio)
        per_frame = 4 * 6
        assert masks[-1].sum(-1).eq(round(ratio * per_frame)).all()
        assert keep_counts(ratio, 2, per_frame)[-1] == round(ratio * per_frame)
        # Later stages keep a subset of earlier ones.
        assert (masks[1] <= masks[0]).all()
        pix = model.pixel_mask(masks[-1], (4, 4, 6))[:, None].expand_as(out)
        assert out[pix == 0].abs().max() == 0
        assert out[pix == 1].abs().min() > 0  # kept tubelets carry content (sigmoid > 0)
    # Training mode: Gumbel samples; dropped tubelets are zero there too.
    model.train()
    out, masks = model(x)
    pix = model.pixel_mask(masks[-1], (4, 4, 6))[:, None].expand_as(out)
    assert 0 < masks[-1].mean() < 1 and out[pix == 0].abs().max() == 0


def test_adversarial_training_tradeoff_and_apply_writes_dataset(bench, tmp_path):
    """A short adversarial training run holds the keep ratio; the trade-off report scores
    the attack ensemble trained fresh (which does read the attribute and the action on
    the originals); the trained model writes a dataset that training.data loads.

    Not asserted: that training hides the attribute from a FRESH attacker while the action
    survives. In a CPU test budget (400 steps) it did not do so reliably (fresh-attacker
    gender accuracy stayed 1.00 on the anonymized outputs in every setting tried; action
    top-1 varied between 0.50 and 1.00 across runs): see the report."""
    rec = ModelConfig(arch="transformer", width=32, depth=1, heads=2, tubelet=(2, 8))
    section = ta.TubeletSection(
        model=tiny_model(),
        train=ta.TubeletTrainConfig(steps=100, warmup_steps=30, batch=8, lr=2e-3,
                                    recognizer_lr=2e-3, recognizer=rec),
        evaluate=ta.TubeletEvalConfig(keep_ratios=(0.5,), attack=VideoAttackConfig(
            clip=ClipConfig(frames=8, stride=1, size=32, crop_margin=1.0, eval_clips=1),
            archs=("frame2d", "c3d"), width=8, min_steps=100, batch=8, lr=3e-3)))
    table = load_labels(bench)
    space = ta.label_space(table, section.train)
    assert list(space.attributes) == ["gender"]
    videos = ta.load_videos(bench, table, space, section.model)
    model, history = ta.train_anonymizer(videos, space, section)
    last = history[-1]
    assert last["kept"] == pytest.approx(0.5, abs=0.15)  # the ratio loss holds the ratio
    assert all(np.isfinite(v) for row in history for v in row.values())
    report = ta.tradeoff(model, videos, table, section.evaluate)
    orig, anon = report["results"]["original"], report["results"]["keep_0.5"]
    # The attack ensemble reads the attribute and the action off the originals.
    assert orig["attributes"]["gender"]["accuracy"] >= 0.9
    assert orig["attributes"]["gender"]["best"] in ("frame2d", "c3d")
    assert orig["cmap"] >= 0.9 and orig["action_chance"] == 0.5
    assert orig["action_top1"] >= 0.9
    assert set(orig["attributes"]) == {"identity", "gender"}
    assert (anon["train_videos"], anon["test_videos"]) == (24, 24)
    assert set(anon) >= {"cmap", "f1", "action_top1", "action_chance", "attributes"}
    assert "| keep_0.5 |" in ta.format_tradeoff(report)
    json.dumps(report)

    ckpt = tmp_path / "model.pt"
    ta.save_checkpoint(ckpt, model, section, space, history)
    loaded, _, _ = ta.load_checkpoint(ckpt)
    out = tmp_path / "anon"
    index = ta.apply_dataset(loaded, bench, out, keep_ratio=0.5)
    assert index["counts"] == {"total": 48, "ok": 48, "failed": 0}
    info = probe(out / "horizontal/p0_r0.mp4")
    assert (info.width, info.height, info.codec) == (32, 32, "h264")
    meta = json.loads((out / "horizontal/p0_r0.json").read_text())
    assert meta["anonymizer"]["kept_fraction"] == pytest.approx(0.5, abs=0.02)
    records, names = load_dataset(out, DataConfig(frames=8, stride=1, size=32,
                                                  crop_margin=1.0))
    assert names == ["horizontal", "vertical"] and len(records) == 48
    assert sum(r.split == "test" for r in records) == 24
    # Mask white where tubelets were kept: about the keep ratio of every frame.
    assert (records[0].mask >= 128).mean() == pytest.approx(0.5, abs=0.05)


def test_apply_long_non_square_video_clip_by_clip_and_cli(tmp_path):
    """21 frames (not a clip multiple) of 48x36: every frame comes back, at the model's
    resolution (short side 32, long side a tubelet multiple), through the CLI."""
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    with VideoWriter(src / "clip.mp4", Fraction(12), 48, 36) as out:
        for _ in range(21):
            out.write(rng.integers(0, 255, (36, 48, 3), np.uint8))
    (src / "broken.mp4").write_bytes(b"not a video")
    section = ta.TubeletSection(model=tiny_model())
    space = ta.LabelSpace(["a", "b"], {"gender": ["female", "male"]})
    ta.save_checkpoint(tmp_path / "m.pt", TubeletAnonymizer(section.model).eval(), section,
                       space, [])
    parser = argparse.ArgumentParser()
    ta.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tubelet", "apply", "--model", str(tmp_path / "m.pt"),
                              "--dataset", str(src), "--out", str(tmp_path / "out"),
                              "--keep-ratio", "0.25"])
    assert args.func(args) == 1  # one video failed
    index = json.loads((tmp_path / "out" / "dataset.json").read_text())
    status = {v["id"]: v["status"] for v in index["videos"]}
    assert status == {"broken": "failed", "clip": "ok"}
    info = probe(tmp_path / "out" / "clip.mp4")
    assert (info.width, info.height, info.fps) == (40, 32, 12)
    assert count_frames(tmp_path / "out" / "clip.mp4") == 21
    assert count_frames(tmp_path / "out" / "clip.mask.mp4") == 21
    meta = json.loads((tmp_path / "out" / "clip.json").read_text())
    # 5 x 4 tubelets a frame, 25 %: exactly 5 kept.
    assert meta["anonymizer"]["kept_fraction"] == pytest.approx(0.25, abs=0.01)
    with pytest.raises(ConfigError, match="outside"):
        ta.apply_dataset(TubeletAnonymizer(section.model).eval(), src, src / "out")


def test_section_overrides_and_validation(tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("export: {crf: 20}\ntubelet:\n  train: {steps: 7}\n")
    section = ta.load_section(cfg, ["tubelet.model.keep_ratio=0.5", "train.batch=3"])
    assert (section.train.steps, section.train.batch, section.model.keep_ratio) == (7, 3, 0.5)
    with pytest.raises(ConfigError):
        ta.load_section(None, ["tubelet.model.prune_after=[3, 12]"])  # not < depth
    with pytest.raises(ConfigError):
        ta.load_section(None, ["tubelet.model.tubelet=[2, 15]"])  # does not divide 112


def test_tradeoff_cli_writes_json_and_reads_checkpoints_with_old_evaluate_settings(
        bench, tmp_path):
    """`avatarize tubelet tradeoff` through argparse: evaluation settings come from --set,
    not the checkpoint (one written before they moved to the attack ensemble, with the
    old recognizer keys, still loads), and the JSON has a row per keep ratio."""
    section = ta.TubeletSection(model=tiny_model())
    space = ta.LabelSpace(["horizontal", "vertical"], {"gender": ["female", "male"]})
    ckpt = tmp_path / "m.pt"
    ta.save_checkpoint(ckpt, TubeletAnonymizer(section.model).eval(), section, space, [])
    saved = torch.load(ckpt, weights_only=True)
    assert "evaluate" not in saved["config"]
    saved["config"]["evaluate"] = {"steps": 400, "recognizer": {"arch": "r2plus1d"}}
    torch.save(saved, ckpt)
    parser = argparse.ArgumentParser()
    ta.add_cli(parser.add_subparsers(dest="command"))
    out = tmp_path / "tradeoff.json"
    args = parser.parse_args([
        "tubelet", "tradeoff", "--model", str(ckpt), "--dataset", str(bench),
        "--keep-ratio", "0.25", "--out", str(out),
        "--set", "evaluate.original=false", "--set", "evaluate.attack.archs=[frame2d]",
        "--set", "evaluate.attack.width=4", "--set", "evaluate.attack.min_steps=5",
        "--set", "evaluate.attack.epochs=1", "--set", "evaluate.attack.clip.size=32",
        "--set", "evaluate.attack.clip.eval_clips=1"])
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert list(report["results"]) == ["keep_0.25"]
    row = report["results"]["keep_0.25"]
    assert row["keep_ratio"] == 0.25 and (row["train_videos"], row["test_videos"]) == (24, 24)
    assert row["attributes"]["gender"]["best"] == "frame2d"
    assert report["evaluate"]["attack"]["archs"] == ["frame2d"]
    with pytest.raises(ConfigError, match="evaluate"):
        ta.load_section(None, ["evaluate.steps=400"])  # the old key is refused by name
