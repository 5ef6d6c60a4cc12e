"""The adversarial motion anonymizer of Moon et al. (PRIVACY_EVAL.md section 1).

An anonymizer f maps a normalized joint sequence x (3, T, V) to x' of the same shape.
Training alternates one step each (`privacy_steps` privacy updates per anonymizer update):

- anonymizer step: minimize CE(h(f(x)), y) - alpha * sum_targets H(softmax(g(f(x))))
  + beta * ||f(x) - x||^2 (squared displacement summed over a frame's joints and
  coordinates, metres^2, averaged over frames) + gamma * moment spread (below), with h a
  FROZEN action classifier trained on clean motion first and g the privacy classifiers
  (identity, optionally gender), warmed up on clean motion;
- privacy step: minimize CE(g(f(x)), z) for each private target z.

What we measured (CPU; fresh TCN / ST-GCN / statistics-MLP attackers trained on the
anonymized train split, tested on unseen repetitions; best attacker counts):
the paper's loss alone (gamma = 0) fools the g it trains against, but a fresh attacker
still re-identified every synthetic person (identity 1.0 -> 0.94-1.0): f learns
perturbations that confuse one g, not a mapping that removes identity. Two additions make
the defence hold better against fresh attackers:
- the moment term (`gamma`): within each action of the batch, each private class's mean
  joint statistics (time mean and std per joint coordinate: posture, lean, proportions,
  amplitude) are pulled to the action's mean; an attacker-free target, nothing to fool;
- retargeting (`retarget`): every skeleton gets the training set's mean bone lengths
  before and after the network (privacy.motion_data.retarget); body size identifies and
  the rendered avatar gets a new body anyway.
With both (MLP f, statistics-MLP h and g, 300 steps): synthetic gaits (6 people x 4
actions) identity 1.0 -> 0.375 (chance 0.167), gender 1.0 -> 0.85, action 1.0 -> 1.0;
the generated benchmark's ground-truth joints (8 people x 6 actions x 3 repetitions)
identity 1.0 -> 0.44 (chance 0.125), gender 1.0 -> 0.81, action 1.0 -> 1.0. With TCN h
and g (U-Net f, 500 steps) identity only fell to 0.85: hence the defaults. Gender still
leaks: a target for further work.
`privacy_loss: uniform` replaces -H by the cross-entropy to the uniform distribution
(same optimum; its gradient does not vanish when g is confident); `reset_every`
re-initializes g periodically. Neither helped in our measurements; they stay as options.

Anonymizers (both residual: f(x) = x + r(x), with r's last layer zero-initialized, so
training starts at the identity and beta keeps it close):
- `ResidualMLP`: per frame, the frame's V*3 coordinates through `blocks` residual blocks of
  two linear layers (the paper: 10 blocks); works on sequences of any length;
- `UNet`: a U-Net over the T x V "image" with the 3 coordinates as channels, pooling over
  time only (V = 23 is small and not a grid); T is padded to a multiple of 2^depth.

The pipeline applies a trained anonymizer in the `motion` stage (stages/motion.py), which
brings the anonymized joints back to body-model poses. Training and the fresh-attacker
evaluation: `avatarize motion train`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from pipeline.config import ConfigError, Section
from privacy.motion_attack import (
    DEFAULT_TARGETS,
    TrainConfig,
    attack_sets,
    format_table,
    train_classifier,
)
from privacy.motion_data import (
    KINEMATIC_TREE,
    NUM_JOINTS,
    MotionSet,
    bone_lengths,
    normalization_of,
    retarget,
)

CHECKPOINT_FORMAT = "avatarize-motion-anonymizer"
CHECKPOINT_VERSION = 1


class AnonymizerTrainConfig(Section):
    arch: Literal["mlp", "unet"] = Field(
        "mlp", description="mlp: residual MLP per frame; unet: U-Net over the T x V image")
    blocks: int = Field(4, ge=1, le=32, description="mlp: residual blocks (two linear layers "
                        "each; the paper uses 10)")
    hidden: int = Field(256, ge=8, le=4096, description="mlp: hidden width")
    unet_width: int = Field(32, ge=4, le=512, description="unet: channels of the first level")
    unet_depth: int = Field(2, ge=1, le=5, description="unet: levels (time halves each)")
    alpha: float = Field(1.0, ge=0.0, le=100.0,
                         description="weight of the privacy classifiers' entropy (maximized)")
    beta: float = Field(10.0, ge=0.0, le=1000.0,
                        description="weight of the squared displacement from the input")
    steps: int = Field(1500, ge=1, le=1_000_000, description="alternating steps (each: one "
                       "anonymizer and one privacy-classifier update)")
    lr: float = Field(3e-3, gt=0.0, le=1.0, description="Adam step size of the anonymizer")
    privacy_lr: float = Field(1e-3, gt=0.0, le=1.0,
                              description="Adam step size of the privacy classifiers")
    batch: int = Field(32, ge=2, le=4096, description="sequences per step")
    frames: int = Field(64, ge=8, le=4096, description="training crop length, frames at the "
                        "native rate")
    targets: tuple[str, ...] = Field(("identity", "gender"),
                                     description="private labels the privacy classifiers learn")
    action_arch: Literal["tcn", "stgcn", "mlp"] = Field(
        "mlp", description="frozen action classifier h (trained on clean motion first); "
        "mlp (joint statistics) measured better and faster than tcn, see the module doc")
    privacy_arch: Literal["tcn", "stgcn", "mlp"] = Field(
        "mlp", description="privacy classifier g (updated in alternation)")
    classifier_steps: int = Field(300, ge=1, le=1_000_000, description="training steps of h, "
                                  "and warm-up steps of g on clean motion")
    scale_normalize: bool = Field(False, description="divide sequences by the torso length "
                                  "(see privacy.motion_data)")
    privacy_loss: Literal["entropy", "uniform"] = Field(
        "entropy", description="entropy: -alpha * H(softmax(g)) as in the paper; uniform: "
        "alpha * CE(uniform, softmax(g)) - log K, the same optimum (uniform) but a gradient "
        "that does not vanish when g is confident")
    retarget: bool = Field(True, description="give every output the training set's mean bone "
                           "lengths (before and after the network): size and proportions "
                           "identify people and the avatar gets a new body anyway")
    gamma: float = Field(1000.0, ge=0.0, le=10000.0, description="weight of the moment term: the "
                         "spread, within each action, of each private class's mean joint "
                         "statistics (time mean and std per joint); 0: the paper's loss only")
    privacy_steps: int = Field(1, ge=1, le=100, description="privacy-classifier updates per "
                               "anonymizer update (the paper: 1)")
    reset_every: int = Field(0, ge=0, le=1_000_000, description="re-initialize the privacy "
                             "classifiers every n steps (0: never), so the anonymizer must beat "
                             "fresh ones, not one it learned to fool")
    seed: int = Field(0, description="initialization and batch order")


class ResidualMLP(nn.Module):
    def __init__(self, joints: int = NUM_JOINTS, hidden: int = 256, blocks: int = 4):
        super().__init__()
        dim = 3 * joints
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
            for _ in range(blocks))
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, t, v = x.shape
        frames = x.permute(0, 2, 3, 1).reshape(n, t, v * c)
        h = torch.relu(self.inp(frames))
        for block in self.blocks:
            h = torch.relu(h + block(h))
        delta = self.out(h).reshape(n, t, v, c).permute(0, 3, 1, 2)
        return x + delta


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(1, cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(1, cout), nn.ReLU())


class UNet(nn.Module):
    def __init__(self, width: int = 32, depth: int = 2):
        super().__init__()
        self.depth = depth
        widths = [width * 2 ** i for i in range(depth + 1)]
        self.down = nn.ModuleList(_conv(3 if i == 0 else widths[i - 1], widths[i])
                                  for i in range(depth))
        self.bottom = _conv(widths[depth - 1], widths[depth])
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], (2, 1), (2, 1))
                                for i in reversed(range(depth)))
        self.merge = nn.ModuleList(_conv(2 * widths[i], widths[i]) for i in reversed(range(depth)))
        self.out = nn.Conv2d(widths[0], 3, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[2]
        mult = 2 ** self.depth
        pad = (-t) % mult
        h = nn.functional.pad(x, (0, 0, 0, pad), mode="replicate") if pad else x
        skips = []
        for down in self.down:
            h = down(h)
            skips.append(h)
            h = nn.functional.max_pool2d(h, (2, 1))
        h = self.bottom(h)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips), strict=True):
            h = merge(torch.cat([up(h), skip], dim=1))
        return x + self.out(h)[:, :, :t]


class Anonymizer(nn.Module):
    """The network, with (optionally) every skeleton retargeted to template bone lengths
    before and after it (privacy.motion_data.retarget)."""

    def __init__(self, core: nn.Module, lengths: torch.Tensor | None):
        super().__init__()
        self.core = core
        self.register_buffer("lengths", lengths if lengths is not None else torch.zeros(0))

    def _retarget(self, x: torch.Tensor) -> torch.Tensor:
        if not len(self.lengths):
            return x
        return retarget(x.permute(0, 2, 3, 1), self.lengths).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._retarget(self.core(self._retarget(x)))


def build_anonymizer(config: AnonymizerTrainConfig,
                     lengths: torch.Tensor | None = None) -> Anonymizer:
    """The anonymizer of `config`; `lengths` (B,) the template bone lengths when
    config.retarget (zeros as placeholders when loading a checkpoint)."""
    core: nn.Module
    if config.arch == "mlp":
        core = ResidualMLP(NUM_JOINTS, config.hidden, config.blocks)
    else:
        core = UNet(config.unet_width, config.unet_depth)
    if config.retarget and lengths is None:
        lengths = torch.zeros(len(KINEMATIC_TREE))
    return Anonymizer(core, lengths.float() if config.retarget else None)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the softmax of each row."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def uniform_ce(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the softmax against the uniform distribution, minus log K (0 at
    uniform): -mean over classes of log p_k - log K, averaged over rows."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.mean(-1) + float(np.log(logits.shape[-1]))).mean()


def moment_spread(xa: torch.Tensor, actions: torch.Tensor, private: torch.Tensor,
                  ) -> torch.Tensor:
    """Within each action of the batch: the squared distance of each private class's mean
    statistics (per joint and coordinate: mean and std over time) from the action's mean,
    weighted by the class's share; summed over features, averaged over actions. What a
    fresh attacker reads most easily (posture, proportions, amplitude) is in these."""
    stats = torch.cat([xa.mean(2), xa.std(2)], dim=1).flatten(1)  # (N, 2 * 3 * V)
    total, groups = stats.new_zeros(()), 0
    for a in actions.unique():
        in_a = actions == a
        centre = stats[in_a].mean(0)
        for c in private[in_a].unique():
            members = in_a & (private == c)
            share = members.sum() / in_a.sum()
            total = total + share * (stats[members].mean(0) - centre).pow(2).sum()
        groups += 1
    return total / max(groups, 1)


def displacement(xa: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """||f(x) - x||^2 per frame (summed over joints and coordinates), averaged."""
    return (xa - x).pow(2).sum(dim=(1, 3)).mean()


def train_anonymizer(train: MotionSet, config: AnonymizerTrainConfig,
                     log: Any = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train an anonymizer on `train` (x and labels "action" + config.targets).

    Returns the anonymizer (eval mode) and a history of its last losses."""
    targets = [t for t in config.targets if t in train.labels]
    if not targets:
        raise ConfigError(f"motion.train.targets {list(config.targets)}: none of these labels "
                          f"exists (have {sorted(train.labels)})")
    torch.manual_seed(config.seed)
    gen = np.random.default_rng(config.seed)
    x = torch.as_tensor(train.x, dtype=torch.float32)
    y = torch.as_tensor(train.labels["action"], dtype=torch.long)
    zs = {t: torch.as_tensor(train.labels[t], dtype=torch.long) for t in targets}
    clf = TrainConfig(steps=config.classifier_steps, batch=config.batch, seed=config.seed)
    # h: the action classifier, trained on clean motion and then frozen.
    h = train_classifier(config.action_arch, train.x, train.labels["action"],
                         int(y.max()) + 1, clf)
    for p in h.parameters():
        p.requires_grad_(False)
    # g: privacy classifiers, warmed up on clean motion, then updated in alternation.
    gs = {t: train_classifier(config.privacy_arch, train.x, train.labels[t],
                              int(z.max()) + 1, clf) for t, z in zs.items()}
    lengths = None
    if config.retarget:  # the training set's mean bone lengths
        lengths = bone_lengths(x.permute(0, 2, 3, 1)).reshape(-1, len(KINEMATIC_TREE)).mean(0)
    f = build_anonymizer(config, lengths)
    opt_f = torch.optim.Adam(f.parameters(), lr=config.lr)
    opt_g = torch.optim.Adam([p for g in gs.values() for p in g.parameters()],
                             lr=config.privacy_lr)
    history: dict[str, list[float]] = {"action_ce": [], "privacy_term": [], "displacement": [],
                                       "privacy_ce": []}
    batch = min(config.batch, len(x))
    for step in range(config.steps):
        if config.reset_every and step and step % config.reset_every == 0:
            for g in gs.values():
                _reset(g)
        idx = torch.as_tensor(gen.choice(len(x), batch, replace=False))
        xb, yb = x[idx], y[idx]
        # Anonymizer step (g in eval mode: its batch statistics are not the anonymizer's).
        f.train()
        for g in gs.values():
            g.eval()
        xa = f(xb)
        action_ce = nn.functional.cross_entropy(h(xa), yb)
        if config.privacy_loss == "entropy":
            priv_term = -sum(entropy(g(xa)) for g in gs.values())
        else:
            priv_term = sum(uniform_ce(g(xa)) for g in gs.values())
        disp = displacement(xa, xb)
        loss = action_ce + config.alpha * priv_term + config.beta * disp
        if config.gamma > 0:
            loss = loss + config.gamma * sum(moment_spread(xa, yb, z[idx]) for z in zs.values())
        opt_f.zero_grad()
        loss.backward()
        opt_f.step()
        # Privacy steps on the anonymizer's current output (fresh batches after the first).
        for k in range(config.privacy_steps):
            if k:
                idx = torch.as_tensor(gen.choice(len(x), batch, replace=False))
            with torch.no_grad():
                xa = f(x[idx])
            priv = 0.0
            for t, g in gs.items():
                g.train()
                priv = priv + nn.functional.cross_entropy(g(xa), zs[t][idx])
            opt_g.zero_grad()
            priv.backward()
            opt_g.step()
        for key, val in (("action_ce", action_ce), ("privacy_term", priv_term),
                         ("displacement", disp), ("privacy_ce", priv)):
            history[key].append(float(val.detach()) if torch.is_tensor(val) else float(val))
        if log is not None and (step + 1) % max(config.steps // 10, 1) == 0:
            last = {k: v[-1] for k, v in history.items()}
            log(f"step {step + 1}: action CE {last['action_ce']:.3f}, privacy term "
                f"{last['privacy_term']:.3f}, displacement {last['displacement']:.4f}, "
                f"privacy CE {last['privacy_ce']:.3f}")
    tail = max(len(history["action_ce"]) // 10, 1)
    summary = {k: float(np.mean(v[-tail:])) for k, v in history.items()}
    return f.eval(), summary


def _reset(model: nn.Module) -> None:
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()


@torch.no_grad()
def anonymize_array(model: nn.Module, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """Apply to normalized (N, 3, T, V) float32 sequences."""
    model.eval()
    xt = torch.as_tensor(x, dtype=torch.float32)
    out = [model(xt[s:s + batch]) for s in range(0, len(xt), batch)]
    return torch.cat(out).numpy()


def anonymize_sequence(model: nn.Module, joints: np.ndarray, scale: bool = False) -> np.ndarray:
    """One sequence (T, 23, 3) in camera coordinates -> its anonymized version, same frame:
    normalized, passed through the anonymizer, normalized back."""
    norm = normalization_of(joints, scale)
    x = norm.apply(joints).transpose(2, 0, 1)[None].astype(np.float32)  # (1, 3, T, V)
    out = anonymize_array(model, x)[0].transpose(1, 2, 0).astype(np.float64)
    return norm.invert(out)


def anonymize_set(model: nn.Module, data: MotionSet) -> MotionSet:
    return MotionSet(anonymize_array(model, data.x), data.labels, data.ids)


# ---- checkpoints ----------------------------------------------------------------------

def save_anonymizer(path: Path, model: nn.Module, config: AnonymizerTrainConfig,
                    metrics: dict[str, Any] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "joints": NUM_JOINTS, "config": config.model_dump(mode="json"),
                "state_dict": model.state_dict(), "metrics": metrics or {}}, path)


def load_anonymizer(path: Path, setting: str = "motion.weights",
                    ) -> tuple[nn.Module, AnonymizerTrainConfig]:
    """The anonymizer saved at `path` (eval mode) and its training config. Any problem is a
    ConfigError naming `setting`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{setting}: {path} does not exist (train one with "
                          "`avatarize motion train`)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise ConfigError(f"{setting}: {path} is not a readable checkpoint: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{setting}: {path} is not a motion anonymizer checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION or ckpt.get("joints") != NUM_JOINTS:
        raise ConfigError(f"{setting}: {path} has version {ckpt.get('version')} / "
                          f"{ckpt.get('joints')} joints; this avatarize reads version "
                          f"{CHECKPOINT_VERSION} with {NUM_JOINTS} joints: retrain it")
    try:
        config = AnonymizerTrainConfig.model_validate(ckpt["config"])
        model = build_anonymizer(config)
        model.load_state_dict(ckpt["state_dict"])
    except Exception as exc:
        raise ConfigError(f"{setting}: {path} does not match its architecture: {exc}") from exc
    return model.eval(), config


# ---- CLI ----------------------------------------------------------------------------

def evaluate(model: nn.Module, train: MotionSet, test: MotionSet,
             attack: TrainConfig | None = None,
             archs: tuple[str, ...] = ("tcn", "stgcn")) -> dict[str, Any]:
    """Fresh attackers and action classifiers on clean and on anonymized motion (trained on
    the train split of each, tested on its test split), and how far the joints moved."""
    targets = (*DEFAULT_TARGETS, "action")
    attack = attack or TrainConfig()
    anon_tr, anon_te = anonymize_set(model, train), anonymize_set(model, test)
    moved = np.linalg.norm(anon_te.x - test.x, axis=1).mean()  # mean joint displacement, m
    return {"clean": attack_sets(train, test, targets=targets, archs=archs, config=attack),
            "anonymized": attack_sets(anon_tr, anon_te, targets=targets, archs=archs,
                                      config=attack),
            "mean_joint_displacement": float(moved)}


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from privacy.labels import load_labels
    from privacy.motion_data import load_split
    from stages import section_models

    config_path = args.config
    if config_path is None and Path("pipeline.yaml").is_file():
        config_path = Path("pipeline.yaml")
    cfg = load_config(config_path, section_models(), args.set or ())
    section = cfg.section("motion")
    tc: AnonymizerTrainConfig = section.train  # type: ignore[attr-defined]
    out = args.out or section.weights  # type: ignore[attr-defined]
    if out is None:
        raise ConfigError("motion train: give --out or set motion.weights")
    table = load_labels(args.dataset)
    workdir = args.workdir or cfg.run.workdir
    sets = [load_split(table, split, args.stage, tc.frames, workdir, args.dataset,
                       scale=tc.scale_normalize, mode="crop") for split in ("train", "test")]
    model, losses = train_anonymizer(sets[0], tc, log=print)
    report: dict[str, Any] = {"dataset": str(args.dataset), "stage": args.stage,
                              "train_videos": len(sets[0].ids), "test_videos": len(sets[1].ids),
                              "losses": losses}
    if not args.no_eval:
        attack = TrainConfig(steps=args.attack_steps, seed=tc.seed + 1)
        report["evaluation"] = evaluate(model, *sets, attack=attack)
        report["evaluation"]["attack_config"] = asdict(attack)
        for name in ("clean", "anonymized"):
            print(f"{name}:\n{format_table(report['evaluation'][name])}")
    save_anonymizer(Path(out), model, tc, report)
    Path(out).with_suffix(".json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


def add_cli(subparsers: Any) -> None:
    """Register `train` under the `motion` command's subparsers (see
    privacy.motion_attack.add_cli, which calls this)."""
    tr = subparsers.add_parser(
        "train", help="train the adversarial motion anonymizer (motion.train settings) and "
        "measure fresh attackers on clean and anonymized joints")
    tr.add_argument("--dataset", type=Path, required=True,
                    help="the generated dataset with labels (manifest.csv + .json sidecars)")
    tr.add_argument("--workdir", type=Path, help="pipeline workdir whose fit/ joints to use "
                    "(default: run.workdir)")
    tr.add_argument("--stage", choices=("fit", "gt"), default="fit",
                    help="train on fit's joints or on the generator's ground truth")
    tr.add_argument("--config", type=Path, help="YAML config (default: ./pipeline.yaml)")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a config value, e.g. --set motion.train.alpha=2")
    tr.add_argument("--out", type=Path, help="checkpoint path (default: motion.weights)")
    tr.add_argument("--attack-steps", type=int, default=TrainConfig.steps,
                    help="training steps of each fresh evaluation classifier")
    tr.add_argument("--no-eval", action="store_true", help="skip the fresh-attacker evaluation")
    tr.set_defaults(func=cmd_train)

