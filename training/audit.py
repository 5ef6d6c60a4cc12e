"""An empirical check of a private training run: plant canaries, train, guess which were
planted, turn the guesses into a lower bound on ε (one-run auditing, Steinke, Nasr and
Jagielski 2023).

Canaries. Each of `canaries` canary videos starts from a blank base (every pixel the
filler grey, so the base carries no data and is the same for all canaries) and gets its own
pattern: independent random ±`amplitude` pixel noise over a centre patch, different in
every frame. Such patterns are high-dimensional and nearly orthogonal to each other, so a
model that saw one fits it without fitting the others: that is what gives the audit its
power (coarse or shared patterns are learned as a class and cannot tell members apart).
A canary's label is drawn uniformly among the labels. Each canary is included in training
with probability 1/2, independently, next to the real training videos, and trained by the
unchanged Trainer (same sampler, same MaskDP / DP-SGD code, same accountant): it is that
code path the audit checks.

Score: how much better the trained model fits the canary than the blank base, both with
the canary's label (loss(base) - loss(canary)); the base term removes the model's bias
toward a label. The `guesses` highest scores are guessed "included", the `guesses` lowest
"excluded" (fixed in advance: no peeking at which k would look best). Under ε-DP the
number of correct guesses is stochastically dominated by Binomial(2 * guesses,
e^ε / (1 + e^ε)); the largest ε that the observed count rejects at confidence 1 - β is the
lower bound. (δ is neglected: with δ <= 1e-5 and a few hundred canaries its effect is far
below the bound's own noise.) With every guess right, 2k guesses support at most
ε = ln(p / (1 - p)), p = β^(1 / 2k): e.g. 3.0 for 64 guesses at β = 0.05. So an audit
can only catch a violation of a reported ε below that ceiling; larger reported ε need more
canaries (the ceiling grows like ln(2k)).

Power needs a model and optimizer that memorize: on CPU, 2 frames of 16 px in one token
(transformer, tubelet = the whole clip), Adam, the whole training set every step
(batch_size >= N) and 20 steps find every public-region canary of 256 (tests/test_audit.py).
A small clip norm C makes the unclipped public gradient dominate the noise σC without
changing anything for the sensitive region (DP is scale free); a large C gives the
sensitive path more weight, the stricter test of the sensitive region.

`region: sensitive`: the canary's frames are sensitive (mask 255), so MaskDP must hide
the pattern (the bound must stay below the reported ε). `region: public`: the patch is
marked synthesized (mask 0), which MaskDP does not protect: the audit must find those
canaries, which shows it has the power to catch a leak.

The patterns live in the decoded frames: with random crops (`train.data.augment` and
`crop_margin` > 1) or flips they move between steps and are harder to memorize, which
costs power but not honesty.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field
from scipy import stats

from pipeline.config import Config, ConfigError, Section
from training.data import VideoRecord, load_dataset
from training.trainer import TrainConfig, Trainer


class AuditConfig(Section):
    region: Literal["sensitive", "public"] = Field(
        "sensitive", description="where the canary pattern goes: the sensitive region "
        "(MaskDP must hide it) or the synthesized one (not protected: shows the audit's power)")
    canaries: int = Field(256, ge=2, le=100000, description="canaries, each included w.p. 1/2")
    guesses: float = Field(0.125, gt=0.0, le=0.5,
                           description="share of the canaries guessed 'in' (top scores), "
                           "and the same share guessed 'out' (bottom scores)")
    patch: float = Field(1.0, gt=0.0, le=1.0,
                         description="side of the canary's centre patch, fraction of the frame")
    amplitude: float = Field(0.25, gt=0.0, le=0.5,
                             description="canary pixel noise ± this (pixel values in [0, 1])")
    beta: float = Field(0.05, gt=0.0, lt=0.5, description="confidence level of the bound")
    seed: int = Field(0, description="draws the patterns, labels and memberships")


def epsilon_lower_bound(correct: int, guesses: int, beta: float = 0.05) -> float:
    """The largest ε rejected at level β by `correct` right out of `guesses`."""
    if guesses == 0 or correct <= guesses / 2:
        return 0.0

    def tail(eps: float) -> float:  # P[Bin(guesses, p_eps) >= correct]
        p = 1.0 / (1.0 + math.exp(-eps))
        return float(stats.binom.sf(correct - 1, guesses, p))

    if tail(0.0) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while tail(hi) < beta and hi < 100:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tail(mid) < beta else (lo, mid)
    return lo


def _patch(side: int, fraction: float) -> slice:
    size = max(1, round(side * fraction))
    start = (side - size) // 2
    return slice(start, start + size)


def canary_pair(cfg: TrainConfig, audit: AuditConfig, rng: np.random.Generator, label: int,
                name: str) -> tuple[VideoRecord, VideoRecord]:
    """(blank base, canary) with the canary's label. The videos are exactly one clip long
    (so every clip of it shows the same frames) and as large as the decoded frames."""
    d = cfg.data
    length = (d.frames - 1) * d.stride + 1
    side = round(d.size * d.crop_margin)
    grey = round(cfg.privacy.filler * 255)
    base_frames = np.full((length, side, side, 3), grey, np.uint8)
    mask = np.full((length, side, side), 255, np.uint8)
    at = _patch(side, audit.patch)
    n = at.stop - at.start
    noise = rng.choice([-1.0, 1.0], size=(length, n, n, 3)) * audit.amplitude * 255
    frames = base_frames.copy()
    frames[:, at, at] = np.clip(grey + noise, 0, 255).astype(np.uint8)
    canary_mask = mask.copy()
    if audit.region == "public":
        canary_mask[:, at, at] = 0
    base = VideoRecord(f"{name}_base", label, "test", f"{name}_base", base_frames, mask)
    canary = VideoRecord(name, label, "train", name, frames, canary_mask)
    return base, canary


def guess_count(scores: np.ndarray, included: np.ndarray, k: int) -> int:
    """Right guesses when the k highest scores are called 'in' and the k lowest 'out'."""
    order = np.argsort(-scores, kind="stable")
    return int(included[order[:k]].sum() + (~included[order[len(order) - k:]]).sum())


def run_audit(cfg: TrainConfig, records: list[VideoRecord], labels: list[str], out_dir: Path,
              audit: AuditConfig | None = None) -> dict[str, Any]:
    """Train `cfg` on `records` plus the included canaries (in `out_dir`) and audit it."""
    audit = audit or AuditConfig()
    started = time.perf_counter()
    rng = np.random.default_rng(audit.seed)
    pairs = [canary_pair(cfg, audit, rng, int(rng.integers(len(labels))), f"canary_{i:05d}")
             for i in range(audit.canaries)]
    included = rng.random(audit.canaries) < 0.5
    data = list(records) + [c for (_, c), inc in zip(pairs, included, strict=True) if inc]
    trainer = Trainer(cfg, None, out_dir, records=(data, labels))
    trainer.fit()
    scores = np.array([trainer.loss_of(b) - trainer.loss_of(c) for b, c in pairs])
    k = max(1, int(audit.canaries * audit.guesses))
    correct = guess_count(scores, included, k)
    bound = epsilon_lower_bound(correct, 2 * k, audit.beta)
    reported = trainer.epsilon()
    return {"region": audit.region, "mode": cfg.privacy.mode, "arch": cfg.model.arch,
            "canaries": audit.canaries, "included": int(included.sum()),
            "guesses": 2 * k, "correct": correct, "beta": audit.beta,
            "epsilon_lower_bound": bound, "epsilon_reported": reported,
            "delta": trainer.delta, "noise_multiplier": trainer.sigma,
            "steps": trainer.step, "train_videos": len(trainer.train),
            "bound_below_reported": None if reported is None else bool(bound <= reported),
            "score_in_mean": float(scores[included].mean()) if included.any() else None,
            "score_out_mean": float(scores[~included].mean()) if (~included).any() else None,
            "seconds": round(time.perf_counter() - started, 1)}


def audit_folder(cfg: Config, region: str) -> Path:
    """Where `avatarize audit` trains and writes audit.json: a folder of its own inside the
    train run's folder, so the audit never resumes (or overwrites) the real model."""
    from training.run import train_paths

    _, _, run = train_paths(cfg)
    return run / f"audit-{region}"


def audit(cfg: Config, audit_cfg: AuditConfig) -> dict[str, Any]:
    """`avatarize audit`: the train config on the exported dataset's training videos plus
    the canaries, from scratch; the result goes to <run folder>/audit-<region>/audit.json."""
    from training.run import train_paths

    section, dataset, _ = train_paths(cfg)
    out = audit_folder(cfg, audit_cfg.region)
    # A checkpoint left by an earlier audit may come from other canaries (another seed or
    # count): resuming it would mix two experiments, so every audit trains from scratch.
    (out / "checkpoint.pt").unlink(missing_ok=True)
    try:
        records, labels = load_dataset(dataset, section.data, input_root=cfg.run.input)
        result = run_audit(section, [r for r in records if r.split == "train"], labels, out,
                           audit_cfg)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"audit: {exc}") from exc
    result["audit"] = json.loads(audit_cfg.model_dump_json())
    result["run_folder"] = str(out)
    target = out / "audit.json"
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, target)
    return result
