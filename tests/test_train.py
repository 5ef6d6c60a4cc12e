"""Training end to end on a tiny exported dataset: it learns, it spends what it says,
and a run cut short resumes to the same model and the same ε."""

from __future__ import annotations

import json

import pytest
import torch
from train_synthetic import write_exported_dataset

from training.data import DataConfig, batch_of, load_dataset
from training.trainer import TrainConfig, Trainer


def config(mode: str, epochs: int = 6, **privacy) -> TrainConfig:
    return TrainConfig.model_validate({
        "data": {"frames": 4, "stride": 4, "size": 32, "crop_margin": 1.0,
                 "clips_per_video": 2, "eval_clips": 1, "flip": False},
        "model": {"arch": "r2plus1d", "width": 8, "depth": 2, "groups": 4},
        "privacy": {"mode": mode, **privacy},
        "optim": {"epochs": epochs, "batch_size": 4, "physical_batch": 3, "lr": 3e-3,
                  "device": "cpu"},
    })


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_exported_dataset(tmp_path_factory.mktemp("exported"))


def test_data_split_masks_and_augmentation_move_together(dataset):
    cfg = DataConfig(frames=4, stride=4, size=32, crop_margin=1.25)  # flips too
    records, labels = load_dataset(dataset, cfg)
    assert labels == ["bar", "square"]
    assert sum(r.split == "test" for r in records) == 4
    assert {r.group for r in records if r.split == "test"}.isdisjoint(
        {r.group for r in records if r.split == "train"})
    import numpy as np

    x, m, y, g = batch_of(records[:3], cfg, 2, np.random.default_rng(0))
    assert x.shape == (6, 3, 4, 32, 32) and m.shape == (6, 1, 4, 32, 32)
    assert g.tolist() == [0, 0, 1, 1, 2, 2]
    # The moving shape is exactly where the mask says "synthesized", after crop and flip.
    yellow = (x[:, 1] > 0.8) & (((x[:, 0] > 0.8) & (x[:, 2] < 0.3))
                                | ((x[:, 2] > 0.8) & (x[:, 0] < 0.3)))
    inside = yellow[m[:, 0] < 0.5].float().mean()
    outside = yellow[m[:, 0] > 0.5].float().mean()
    assert inside > 0.8 and outside < 0.05


def test_non_private_training_learns_the_action(dataset, tmp_path):
    cfg = config("none", epochs=15)
    cfg.optim.batch_size = 8  # every video every step: a steady signal for a short test
    summary = Trainer(cfg, dataset, tmp_path / "none").fit()
    assert summary["epsilon"] is None
    assert summary["epochs"][-1]["train_accuracy"] >= 0.875
    # 4 test videos: chance is 0.5; a model that learned the shapes gets 3 or 4 right.
    assert max(e["test_accuracy"] for e in summary["epochs"]) >= 0.75
    assert summary["epochs"][-1]["loss"] < summary["epochs"][0]["loss"]


@pytest.mark.parametrize("mode", ["maskdp", "dpsgd"])
def test_private_training_spends_its_target_epsilon(dataset, tmp_path, mode):
    trainer = Trainer(config(mode, epochs=3, epsilon=2.0, clip=0.5), dataset, tmp_path / mode)
    summary = trainer.fit()
    assert 1.9 <= summary["epsilon"] <= 2.0
    assert summary["noise_multiplier"] > 0.3
    metrics = json.loads((tmp_path / mode / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]
    eps = [e["epsilon"] for e in metrics["epochs"]]
    assert eps == sorted(eps) and eps[0] > 0


def test_a_run_cut_short_resumes_to_the_same_model_and_epsilon(dataset, tmp_path):
    whole = Trainer(config("maskdp", epochs=3, epsilon=4.0), dataset, tmp_path / "whole")
    whole.fit()
    cut = Trainer(config("maskdp", epochs=3, epsilon=4.0), dataset, tmp_path / "cut")
    cut.fit(stop_after_epochs=1)
    assert cut.step == cut.steps_per_epoch
    resumed = Trainer(config("maskdp", epochs=3, epsilon=4.0), dataset, tmp_path / "cut")
    assert resumed.step == cut.step and resumed.epsilon() == pytest.approx(cut.epsilon())
    resumed.fit()
    assert resumed.step == whole.step
    assert resumed.epsilon() == pytest.approx(whole.epsilon(), rel=1e-9)
    for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="another train config"):
        Trainer(config("maskdp", epochs=5, epsilon=4.0), dataset, tmp_path / "cut")


def test_train_and_evaluate_commands(dataset, tmp_path, capsys):
    from pipeline.cli import main

    small = ["--set", "train.data.frames=4", "--set", "train.data.size=32",
             "--set", "train.data.crop_margin=1.0", "--set", "train.model.width=8",
             "--set", "train.model.depth=1", "--set", "train.optim.epochs=2",
             "--set", "train.optim.device=cpu"]
    where = ["--input", str(dataset), "--output", str(dataset),
             "--workdir", str(tmp_path / "work")]
    assert main(["train", *where, "--privacy", "maskdp", "--epsilon", "1.5", *small]) == 0
    run = tmp_path / "work" / "training" / "maskdp"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["mode"] == "maskdp" and metrics["epsilon"] <= 1.5
    assert "ε" in capsys.readouterr().out
    assert main(["evaluate", *where, "--privacy", "maskdp", *small]) == 0
    result = json.loads((run / "evaluation.json").read_text())
    assert result["anonymized"]["videos"] == 4 and result["original"]["videos"] == 4
    assert 0.0 <= result["anonymized"]["accuracy"] <= 1.0
    assert result["epsilon"] == pytest.approx(metrics["epsilon"])
    # A bad value names its key.
    assert main(["train", *where, "--set", "train.privacy.clip=-1"]) == 2
    assert "train.privacy.clip" in capsys.readouterr().err


def _rank_main(rank: int, world: int, init: str, dataset, out, result_dir) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        trainer = Trainer(config("maskdp", epochs=2, epsilon=2.0), dataset, out)
        trainer.fit()
        torch.save({"params": [p.detach() for p in trainer.model.parameters()],
                    "epsilon": trainer.epsilon(), "step": trainer.step},
                   result_dir / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_take_identical_steps_with_one_process_accounting(dataset, tmp_path):
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_rank_main, args=(2, init, dataset, tmp_path / "ddp", tmp_path), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["step"] == r1["step"] > 0
    for a, b in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(a, b)
    single = Trainer(config("maskdp", epochs=2, epsilon=2.0), dataset, tmp_path / "single")
    single.fit()
    assert single.step == r0["step"]
    assert r0["epsilon"] == pytest.approx(single.epsilon(), rel=1e-9)
    assert (tmp_path / "ddp" / "metrics.json").is_file()


def test_ghost_clipping_trains_and_needs_one_clip_per_video(dataset, tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="clips_per_video"):
        config("dpsgd", epochs=1, epsilon=2.0, dpsgd_mode="ghost")
    data = json.loads(config("dpsgd", epochs=1, epsilon=2.0).model_dump_json())
    data["data"]["clips_per_video"] = 1
    data["privacy"]["dpsgd_mode"] = "ghost"
    summary = Trainer(TrainConfig.model_validate(data), dataset, tmp_path / "ghost").fit()
    assert summary["steps"] > 0 and 0 < summary["epsilon"] <= 2.0


@pytest.mark.parametrize("mode", ["maskdp", "dpsgd"])
def test_a_step_forwards_each_chunk_once(dataset, tmp_path, mode):
    # The loss comes from the gradient's own forward pass: no second pass to report it.
    cfg = config(mode, epochs=1, epsilon=2.0)
    cfg.optim.batch_size = 8  # every video: 8 videos, physical chunks of 3 -> 3 chunks
    trainer = Trainer(cfg, dataset, tmp_path / mode)
    seen: list[int] = []
    trainer.model.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].shape[0]))
    out = trainer.train_step()
    clips = cfg.data.clips_per_video * (2 if mode == "maskdp" else 1)  # [x; x̄] stacked
    assert seen == [clips * 3, clips * 3, clips * 2]
    assert out["videos"] == 8 and out["loss"] > 0
