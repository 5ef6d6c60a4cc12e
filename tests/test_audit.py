"""The privacy audit (training/audit.py): its bound is valid, it stays under the reported ε
for MaskDP's sensitive region, and it has power: it finds canaries in the unprotected
(synthesized) region and in the sensitive region of a trainer whose mask is ignored."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats
from train_synthetic import write_exported_dataset

import training.trainer
from training.audit import (
    AuditConfig,
    canary_pair,
    epsilon_lower_bound,
    guess_count,
    run_audit,
)
from training.data import batch_of, load_dataset
from training.maskdp import public_surrogate
from training.trainer import TrainConfig

# 256 canaries, the 32 top scores guessed in and the 32 bottom out: all 64 right supports
# ε_lb = 3.04 at β = 0.05. (Measured: guessing only the extremes of many canaries is more
# reliable than guessing a quarter each way of 128: 63-64 right over 8 seeds, not 55-64.)
CANARIES = dict(canaries=256, guesses=0.125)


def audit_train_config(mode: str, epsilon: float = 1.0, epochs: int = 20) -> TrainConfig:
    """A model that memorizes in seconds: 2 frames of 16 px in one token (the tubelet is
    the whole clip), Adam, and the whole training set in every step (batch_size >= N: the
    sample rate is 1). The clip norm is small so that the unclipped public gradient
    dominates the noise σC; it changes nothing for the sensitive region (DP is scale free)."""
    return TrainConfig.model_validate({
        "data": {"frames": 2, "stride": 1, "size": 16, "crop_margin": 1.0,
                 "clips_per_video": 1, "eval_clips": 1, "augment": False, "flip": False},
        "model": {"arch": "transformer", "width": 16, "depth": 1, "heads": 2,
                  "tubelet": [2, 16]},
        "privacy": {"mode": mode, "epsilon": epsilon, "clip": 0.01},
        "optim": {"epochs": epochs, "batch_size": 100000, "physical_batch": 512, "lr": 3e-3,
                  "schedule": "constant", "device": "cpu"},
    })


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: on a busy 2-core machine, intra-op threads only fight each
    other (measured: 7 s per audit with one thread, over 60 s with the default)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def real_train(tmp_path_factory):
    """The real (synthetic) training videos the canaries are trained next to."""
    root = write_exported_dataset(tmp_path_factory.mktemp("exported"))
    records, labels = load_dataset(root, audit_train_config("none").data)
    return [r for r in records if r.split == "train"], labels


def test_all_correct_guesses_give_the_closed_form_bound():
    for n in (10, 64, 128):
        p = 0.05 ** (1 / n)
        assert epsilon_lower_bound(n, n) == pytest.approx(math.log(p / (1 - p)), rel=1e-6)
    assert epsilon_lower_bound(32, 64) == 0.0  # chance
    assert epsilon_lower_bound(0, 0) == 0.0
    bounds = [epsilon_lower_bound(c, 64) for c in range(33, 65)]
    assert bounds == sorted(bounds) and bounds[0] == 0.0 < bounds[-1]


@pytest.mark.parametrize("eps", [0.0, 0.5, 1.0, 3.0])
def test_the_bound_exceeds_the_true_epsilon_with_probability_at_most_beta(eps):
    # The worst case ε-DP allows: every guess right independently w.p. e^ε / (1 + e^ε).
    n = 64
    p = 1 / (1 + math.exp(-eps))
    over = sum(stats.binom.pmf(c, n, p) for c in range(n + 1)
               if epsilon_lower_bound(c, n, 0.05) > eps)
    assert over <= 0.05


def test_guesses_are_the_top_and_bottom_scores():
    scores = np.array([5.0, -1.0, 3.0, 0.0, -2.0, 4.0])
    included = np.array([True, False, False, True, False, True])
    # Top 2 (5, 4): both in; bottom 2 (-1, -2): both out.
    assert guess_count(scores, included, 2) == 4
    assert guess_count(-scores, included, 2) == 0


@pytest.mark.parametrize("region", ["sensitive", "public"])
def test_canaries_are_distinct_and_lie_in_their_region(region):
    cfg = audit_train_config("maskdp")
    audit = AuditConfig(region=region, patch=0.5)
    rng = np.random.default_rng(0)
    pairs = [canary_pair(cfg, audit, rng, 1, f"c{i}") for i in range(4)]
    x, m, y, _ = batch_of([c for _, c in pairs], cfg.data, 1, None)
    xb, _, _, _ = batch_of([b for b, _ in pairs], cfg.data, 1, None)
    assert (y == 1).all() and x.shape == (4, 3, 2, 16, 16)
    assert (xb - 0.5).abs().max() < 0.01  # the base is blank filler grey
    patterns = (x - xb).reshape(4, -1)
    assert (patterns.abs() > 0.2).float().mean() == pytest.approx(0.25, abs=0.01)  # the patch
    cosine = (patterns @ patterns.T) / patterns.norm(dim=1).pow(2)
    assert (cosine - np.eye(4)).abs().max() < 0.2  # nearly orthogonal: told apart
    public = public_surrogate(x, m, cfg.privacy.filler)
    if region == "sensitive":
        # MaskDP erases the whole canary: its public surrogate is the base.
        assert (public - xb).abs().max() < 0.01
    else:
        assert (public - x).abs().max() < 0.01  # MaskDP keeps the pattern: not protected


def test_maskdp_hides_sensitive_canaries_and_the_audit_finds_public_ones(real_train,
                                                                       tmp_path):
    records, labels = real_train
    cfg = audit_train_config("maskdp", epsilon=1.0)
    hidden = run_audit(cfg, records, labels, tmp_path / "sensitive",
                       AuditConfig(region="sensitive", **CANARIES))
    assert hidden["epsilon_reported"] <= 1.0
    assert hidden["epsilon_lower_bound"] <= hidden["epsilon_reported"]
    assert hidden["bound_below_reported"] is True
    # The same training, canaries in the synthesized region, which MaskDP does not protect:
    # found, with a bound well above the ε reported for the sensitive region.
    found = run_audit(cfg, records, labels, tmp_path / "public",
                      AuditConfig(region="public", **CANARIES))
    assert found["epsilon_reported"] == pytest.approx(hidden["epsilon_reported"])
    assert found["epsilon_lower_bound"] > 2.0 > found["epsilon_reported"]
    assert found["score_in_mean"] > found["score_out_mean"] + 0.3


def test_the_audit_catches_a_trainer_that_ignores_the_mask(real_train, tmp_path, monkeypatch):
    """A bug MaskDP's guarantee does not survive: the public surrogate keeps the sensitive
    pixels (the mask is ignored), so the sensitive region is never clipped nor noised
    while ε is still reported. The sensitive canaries must then be found."""
    monkeypatch.setattr(training.trainer, "public_surrogate", lambda x, mask, filler=0.0: x)
    records, labels = real_train
    result = run_audit(audit_train_config("maskdp", epsilon=1.0), records, labels,
                       tmp_path / "broken", AuditConfig(region="sensitive", **CANARIES))
    assert result["epsilon_lower_bound"] > result["epsilon_reported"]
    assert result["bound_below_reported"] is False


def test_audit_command_writes_audit_json(tmp_path):
    from pipeline.cli import _stage_models
    from pipeline.config import load_config
    from training.audit import audit

    dataset = write_exported_dataset(tmp_path / "exported", per_class=2, test_every=2)
    overrides = [f"train.{k}" for k in (
        "data.frames=2", "data.stride=1", "data.size=16", "data.crop_margin=1.0",
        "data.augment=false", "model.arch=transformer", "model.width=8", "model.depth=1",
        "model.heads=2", "model.tubelet=[2,16]", "optim.epochs=2", "optim.device=cpu",
        "privacy.epsilon=2.0")]
    cfg = load_config(None, _stage_models(), overrides,
                      {"input": dataset, "output": dataset, "workdir": tmp_path / "work"})
    result = audit(cfg, AuditConfig(region="public", canaries=8, guesses=0.25))
    written = json.loads((tmp_path / "work" / "training" / "maskdp" / "audit-public"
                          / "audit.json").read_text())
    assert written["epsilon_lower_bound"] == result["epsilon_lower_bound"] >= 0.0
    assert written["guesses"] == 4 and written["canaries"] == 8
    assert 0 < written["epsilon_reported"] <= 2.0 and written["audit"]["region"] == "public"
    assert written["train_videos"] == 2 + written["included"]


def test_audit_subcommand(tmp_path, capsys):
    from pipeline.cli import main

    dataset = write_exported_dataset(tmp_path / "exported", per_class=2, test_every=2)
    sets = [x for k in ("data.frames=2", "data.stride=1", "data.size=16", "data.crop_margin=1.0",
                        "data.augment=false", "model.arch=transformer", "model.width=8",
                        "model.depth=1", "model.heads=2", "model.tubelet=[2,16]",
                        "optim.epochs=2", "optim.device=cpu")
            for x in ("--set", f"train.{k}")]
    where = ["--input", str(dataset), "--output", str(dataset), "--workdir", str(tmp_path / "w")]
    assert main(["audit", *where, "--privacy", "maskdp", "--epsilon", "2", "--region", "public",
                 "--canaries", "8", "--guesses", "0.25", *sets]) == 0
    assert "empirical ε lower bound" in capsys.readouterr().out
    assert (tmp_path / "w" / "training" / "maskdp" / "audit-public" / "audit.json").is_file()
    assert main(["audit", *where, "--canaries", "1", *sets]) == 2
