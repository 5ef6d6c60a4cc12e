"""Motion attackers: who is it, and which gender, from the joints alone?

Every attacker is trained FRESH on the training split of the data it attacks (clean fit
joints, anonymized motion-stage joints, or the generator's ground truth) and tested on the
held-out split (unseen repetitions of the same people: closed-set re-identification, as
in Moon et al., PRIVACY_EVAL.md section 1). Several architectures attack each target and
the best one counts (an anonymizer must beat all of them); chance is the accuracy of
always answering the training split's most common class (privacy.metrics.chance_level).
The same training gives the utility side: an action classifier on the same joints.

CLI (registered by `add_cli`):
    avatarize motion attack --dataset DIR [--workdir W --stage fit|motion|render | --stage gt]
    avatarize motion train ...   (privacy.motion_anonymizer)
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.store import write_json_atomic
from privacy.labels import load_labels
from privacy.metrics import accuracy, chance_level
from privacy.motion_data import MotionSet, load_split
from privacy.motion_models import ARCHS, Arch, build_classifier

DEFAULT_TARGETS = ("identity", "gender")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300  # optimizer steps (batches)
    batch: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    noise: float = 0.005  # std of Gaussian jitter on the joints (m), a light augmentation
    width: int | None = None  # classifier width (None: the architecture's default)
    seed: int = 0


def train_classifier(arch: Arch, x: np.ndarray, y: np.ndarray, classes: int,
                     config: TrainConfig = TrainConfig()) -> nn.Module:
    """A fresh classifier of `arch` fitted to (x (N, 3, T, V), y (N,)); returned in eval
    mode."""
    torch.manual_seed(config.seed)
    gen = np.random.default_rng(config.seed)
    model = build_classifier(arch, classes, config.width)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps)
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(np.asarray(y), dtype=torch.long)
    model.train()
    for _ in range(config.steps):
        idx = torch.as_tensor(gen.choice(len(xt), min(config.batch, len(xt)), replace=False))
        xb = xt[idx]
        if config.noise > 0:
            xb = xb + config.noise * torch.randn_like(xb)
        loss = nn.functional.cross_entropy(model(xb), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def predict_proba(model: nn.Module, x: np.ndarray, batch: int = 256) -> np.ndarray:
    model.eval()
    xt = torch.as_tensor(x, dtype=torch.float32)
    out = [torch.softmax(model(xt[s:s + batch]), dim=-1) for s in range(0, len(xt), batch)]
    return torch.cat(out).numpy()


def attack_motion(train_x: np.ndarray, train_labels: dict[str, np.ndarray],
                  test_x: np.ndarray, test_labels: dict[str, np.ndarray],
                  targets: tuple[str, ...] = (*DEFAULT_TARGETS, "action"),
                  archs: tuple[Arch, ...] = ("tcn", "stgcn"),
                  config: TrainConfig = TrainConfig()) -> dict[str, Any]:
    """Per target: each architecture's test accuracy, the best one, and chance.

    {target: {"accuracy": best, "best": arch, "chance": c, "classes": k,
              "per_arch": {arch: acc}}}; targets missing from the labels are skipped."""
    out: dict[str, Any] = {}
    for target in targets:
        if target not in train_labels or target not in test_labels:
            continue
        ytr, yte = np.asarray(train_labels[target]), np.asarray(test_labels[target])
        classes = int(max(ytr.max(), yte.max())) + 1
        per_arch = {}
        for arch in archs:
            model = train_classifier(arch, train_x, ytr, classes, config)
            per_arch[arch] = accuracy(predict_proba(model, test_x).argmax(1), yte)
        best = max(per_arch, key=per_arch.__getitem__)
        out[target] = {"accuracy": per_arch[best], "best": best,
                       "chance": chance_level(ytr, yte), "classes": classes,
                       "per_arch": per_arch, "train": len(ytr), "test": len(yte)}
    return out


def attack_sets(train: MotionSet, test: MotionSet, **kwargs: Any) -> dict[str, Any]:
    return attack_motion(train.x, train.labels, test.x, test.labels, **kwargs)


def format_table(result: dict[str, Any]) -> str:
    lines = ["| target | best attacker | accuracy | chance | per architecture |",
             "|---|---|---|---|---|"]
    for target, r in result.items():
        per = ", ".join(f"{a} {v:.3f}" for a, v in r["per_arch"].items())
        lines.append(f"| {target} | {r['best']} | {r['accuracy']:.3f} | {r['chance']:.3f} "
                     f"| {per} |")
    return "\n".join(lines)


# ---- CLI ----------------------------------------------------------------------------

def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", type=Path, required=True,
                   help="the generated dataset with labels (manifest.csv + .json sidecars)")
    p.add_argument("--workdir", type=Path,
                   help="pipeline workdir (fit/, motion/ and render/ joints)")
    p.add_argument("--stage", choices=("fit", "motion", "render", "gt"), default="fit",
                   help="whose joints: fit (the real person), motion (anonymized poses on "
                   "the fitted shape), render (the avatars as drawn: what the output shows) "
                   "or gt (the generator's .gt.npz)")
    p.add_argument("--frames", type=int, default=64, help="sequence length after resampling")
    p.add_argument("--scale-normalize", action="store_true",
                   help="divide by the torso length (removes body size, keeps proportions)")
    p.add_argument("--seed", type=int, default=0)


def cmd_attack(args: argparse.Namespace) -> int:
    table = load_labels(args.dataset)
    sets = [load_split(table, split, args.stage, args.frames, args.workdir, args.dataset,
                       scale=args.scale_normalize) for split in ("train", "test")]
    config = TrainConfig(steps=args.steps, seed=args.seed)
    result = attack_sets(*sets, targets=tuple(args.target), archs=tuple(args.arch),
                         config=config)
    report = {"stage": args.stage, "dataset": str(args.dataset), "frames": args.frames,
              "scale_normalize": args.scale_normalize, "config": asdict(config),
              "results": result}
    print(format_table(result))
    if args.out:
        write_json_atomic(args.out, report)
    return 0


def add_cli(subparsers: Any) -> None:
    """Register `avatarize motion attack` and `avatarize motion train` (the latter from
    privacy.motion_anonymizer) under one `motion` command."""
    from privacy import motion_anonymizer  # imports this module: avoid the cycle at import

    motion = subparsers.add_parser("motion", help="motion attackers and the motion anonymizer")
    sub = motion.add_subparsers(dest="motion_command", required=True)
    at = sub.add_parser("attack", help="train fresh identity / gender / action classifiers "
                        "on joint sequences and report test accuracy against chance")
    _data_args(at)
    at.add_argument("--target", action="append", default=None,
                    help="identity, gender, action, ... (repeatable; default all three)")
    at.add_argument("--arch", action="append", choices=ARCHS, default=None,
                    help="attacker architectures (repeatable; default tcn and stgcn)")
    at.add_argument("--steps", type=int, default=TrainConfig.steps, help="training steps")
    at.add_argument("--out", type=Path, help="write the results as JSON here")
    at.set_defaults(func=_with_defaults(cmd_attack))
    motion_anonymizer.add_cli(sub)


def _with_defaults(func: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        args.target = args.target or [*DEFAULT_TARGETS, "action"]
        args.arch = args.arch or ["tcn", "stgcn"]
        return func(args)
    return run
