"""Appearance attackers: who was filmed, and their gender, age, skin tone and build, from
a method's videos (PRIVACY_EVAL.md sections 2 and 3).

The ensemble protocol (Wu et al.): one attacker proves nothing, so several video
classifiers of different families and sizes are trained FRESH on the method's training
split (privacy.video_data: the original dataset's split and labels) and tested on its
test split; for every attribute the best of them counts, since an anonymizer must beat
all (the best is picked on the test split: an optimistic attacker, the conservative side
for a privacy claim). The families:
- `r2plus1d`: the (2+1)D CNN of training.models (factorized space / time convolutions);
- `transformer`: the tubelet transformer of training.models (global attention);
- `frame2d`: a 2D CNN on every frame, a temporal convolution over the frame features,
  mean and max pooled over time (sees appearance per frame; the strongest on a frame-level
  leak such as a face visible in a few frames);
- `c3d`: a plain 3x3x3 3D CNN with max pooling (a different inductive bias again).
Each has one linear head per target (the attributes and, for utility, the action) on
shared features, trained jointly (`joint: true`, one model per architecture) or one
model per target (`joint: false`, stronger, slower).

Scores (privacy.metrics): per target and architecture the test accuracy, chance (the
training split's most common class), the best architecture; cMAP / F1 over the private
attributes (identity excluded, as in STPrivacy's attribute sets: one-vs-rest over 24+
people is a different task, reported by its accuracy) from softmax probabilities, per
architecture and for the best attacker of each attribute.

CLI (registered by `add_cli`):
    avatarize attack --method-dir D --dataset ORIG [--out report.json] [--set epochs=5]
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import Field, ValidationError
from torch import nn

from pipeline.config import ConfigError, Section
from pipeline.store import write_json_atomic
from privacy.labels import ATTRIBUTES
from privacy.metrics import accuracy, chance_level, cmap_f1
from privacy.video_data import ClipConfig, MethodVideos, VideoClips, clips_of, load_method
from training.models import ModelConfig, R2Plus1D, TubeletTransformer, _groups, _Normalize

log = logging.getLogger(__name__)

Arch = Literal["r2plus1d", "transformer", "frame2d", "c3d"]
ARCHS: tuple[str, ...] = ("r2plus1d", "transformer", "frame2d", "c3d")


class VideoAttackConfig(Section):
    clip: ClipConfig = Field(default_factory=ClipConfig, description="clips the attackers see")
    archs: tuple[Arch, ...] = Field(ARCHS, min_length=1,
                                    description="attacker architectures (the ensemble)")
    attributes: tuple[str, ...] = Field(
        ATTRIBUTES, description="private attributes to predict (privacy.labels); those "
        "missing from the labels or with one class in training are skipped, with a reason")
    action: bool = Field(True, description="also predict the action (utility)")
    joint: bool = Field(True, description="one model per architecture with every head; "
                        "false: one model per target (stronger, len(targets) x slower)")
    width: int = Field(16, ge=4, le=512, description="base width of every architecture")
    epochs: int = Field(20, ge=1, le=10000, description="passes over the training videos "
                        "(one random clip per video each)")
    min_steps: int = Field(150, ge=0, le=10**6, description="at least this many steps "
                           "(small datasets)")
    batch: int = Field(16, ge=1, le=1024, description="videos per step")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="AdamW learning rate (cosine decay)")
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0, description="AdamW weight decay")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="auto: cuda where available")
    threads: int = Field(0, ge=0, le=256, description="CPU threads of torch while attacking; "
                         "0: torch's default (on a shared, loaded machine 1 can be far faster)")
    seed: int = Field(0, description="seed of weights, batches and crops")


# ---- architectures -------------------------------------------------------------------

class Frame2D(nn.Module):
    """Per-frame 2D CNN pooled to a 2 x 2 grid (where in the frame, not only what: motion
    direction stays visible), temporal convolution, mean + max over time."""

    def __init__(self, classes: int, width: int):
        super().__init__()
        w = width

        def stage(cin: int, cout: int, k: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, k, 2, k // 2, bias=False),
                    nn.GroupNorm(_groups(cout, 8), cout), nn.ReLU()]

        self.norm = _Normalize()
        self.frame = nn.Sequential(*stage(3, w, 5), *stage(w, 2 * w, 3), *stage(2 * w, 4 * w, 3),
                                   *stage(4 * w, 4 * w, 3), nn.AdaptiveAvgPool2d(2))
        self.temporal = nn.Sequential(nn.Conv1d(16 * w, 4 * w, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, t = x.shape[:3]
        frames = self.norm(x).transpose(1, 2).flatten(0, 1)  # (N*T, 3, H, W)
        feats = self.frame(frames).view(n, t, -1).transpose(1, 2)  # (N, C, T)
        feats = self.temporal(feats)
        return self.head(torch.cat([feats.mean(2), feats.amax(2)], 1))


class C3D(nn.Module):
    """Plain 3x3x3 convolutions with max pooling (a small C3D)."""

    def __init__(self, classes: int, width: int):
        super().__init__()
        w = width
        # A strided first convolution: full-resolution 3x3x3 convolutions cost most of
        # the ensemble's CPU time for little gain at these clip sizes.
        layers: list[nn.Module] = [_Normalize()]
        cin, first = 3, True
        for cout, pool in ((w, (1, 2, 2)), (2 * w, (2, 2, 2)), (4 * w, (2, 2, 2))):
            stride = (1, 2, 2) if first else 1
            first = False
            layers += [nn.Conv3d(cin, cout, 3, stride, padding=1, bias=False),
                       nn.GroupNorm(_groups(cout, 8), cout), nn.ReLU(),
                       nn.MaxPool3d(pool, ceil_mode=True)]
            cin = cout
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten())
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_attacker(arch: str, classes: int, width: int, clip: ClipConfig) -> nn.Module:
    """A fresh classifier with `classes` outputs (every head's logits, concatenated)."""
    if arch == "r2plus1d":
        return R2Plus1D(classes, ModelConfig(arch="r2plus1d", width=width, depth=2))
    if arch == "transformer":
        # Tubelets of 2 frames (1 when the clip is odd) and 1/4 of the side: 16 tokens a
        # frame pair whatever the clip size (16 px at 64 px, as training's default).
        t = 2 if clip.frames % 2 == 0 else 1
        p = max(1, clip.size // 4)
        while clip.size % p:
            p -= 1
        dim = 4 * width
        cfg = ModelConfig(arch="transformer", width=dim, depth=2, heads=4, tubelet=(t, p))
        return TubeletTransformer(classes, cfg, clip.frames, clip.size)
    if arch == "frame2d":
        return Frame2D(classes, width)
    if arch == "c3d":
        return C3D(classes, width)
    raise ValueError(f"unknown attacker architecture {arch!r}; choose from {ARCHS}")


# ---- training and scoring ------------------------------------------------------------

def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


Head = tuple[str, int, np.ndarray]  # target name, classes, training labels (N,)


def train_attacker(arch: str, videos: list[VideoClips], heads: list[Head],
                   cfg: VideoAttackConfig, device: torch.device) -> nn.Module:
    """A fresh `arch` trained on `videos` with one cross-entropy per head (their mean)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    total = sum(k for _, k, _ in heads)
    model = build_attacker(arch, total, cfg.width, cfg.clip).to(device)
    steps = max(cfg.min_steps, cfg.epochs * math.ceil(len(videos) / cfg.batch))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=steps,
                                                pct_start=0.1)
    labels = [torch.as_tensor(y, dtype=torch.long) for _, _, y in heads]
    order = rng.permutation(len(videos))
    pos = 0
    model.train()
    for _ in range(steps):
        if pos + cfg.batch > len(order):  # a new epoch: reshuffle
            order, pos = rng.permutation(len(videos)), 0
        idx = order[pos:pos + cfg.batch]
        pos += len(idx)
        x, _ = clips_of([videos[i] for i in idx], cfg.clip, 1, rng)
        logits = model(x.to(device))
        loss, off = 0.0, 0
        for (_, k, _), y in zip(heads, labels, strict=True):
            loss = loss + nn.functional.cross_entropy(logits[:, off:off + k],
                                                      y[idx].to(device))
            off += k
        opt.zero_grad()
        (loss / len(heads)).backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, videos: list[VideoClips], sizes: list[int],
            cfg: VideoAttackConfig, device: torch.device, chunk: int = 16
            ) -> list[np.ndarray]:
    """Per head, softmax probabilities (N, K) averaged over `eval_clips` clips a video."""
    out: list[list[np.ndarray]] = [[] for _ in sizes]
    for s in range(0, len(videos), chunk):
        part = videos[s:s + chunk]
        x, owner = clips_of(part, cfg.clip, cfg.clip.eval_clips, None)
        logits = model(x.to(device)).float().cpu()
        off = 0
        for h, k in enumerate(sizes):
            probs = torch.softmax(logits[:, off:off + k], 1)
            mean = torch.zeros(len(part), k).index_add_(0, owner, probs)
            out[h].append((mean / cfg.clip.eval_clips).numpy())
            off += k
    return [np.concatenate(p) for p in out]


def _targets(data: MethodVideos, train: list[VideoClips], test: list[VideoClips],
             cfg: VideoAttackConfig) -> tuple[list[tuple[str, int, np.ndarray, np.ndarray]],
                                              dict[str, str]]:
    """(name, classes, y_train, y_test) of every target that can be attacked; and why the
    others cannot."""
    table, found, skipped = data.table, [], {}
    names = list(cfg.attributes) + (["action"] if cfg.action else [])
    for name in names:
        every = train + test
        if name == "action":
            if any(v.labels.action is None for v in every):
                skipped[name] = "a video has no action label"
                continue
            ytr = np.array(table.encode_action([v.labels for v in train]))
            yte = np.array(table.encode_action([v.labels for v in test]))
            k = len(table.actions)
        else:
            if name not in table.classes or any(name not in v.labels.attributes
                                                for v in every):
                skipped[name] = "not in every video's labels"
                continue
            ytr = np.array(table.encode(name, [v.labels for v in train]))
            yte = np.array(table.encode(name, [v.labels for v in test]))
            k = len(table.classes[name])
        if len(np.unique(ytr)) < 2:
            skipped[name] = "one class in the training split"
            continue
        found.append((name, k, ytr, yte))
    return found, skipped


def attack_loaded(data: MethodVideos, cfg: VideoAttackConfig) -> dict[str, Any]:
    """Train the ensemble on the loaded method and score it (see attack_videos)."""
    train, test = data.split("train"), data.split("test")
    if not train or not test:
        raise ConfigError(f"{data.root}: {len(train)} training and {len(test)} test videos "
                          "delivered; both splits are needed")
    targets, skipped = _targets(data, train, test, cfg)
    if not targets:
        raise ConfigError(f"{data.root}: nothing to attack ({skipped})")
    device = _device(cfg.device)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        probs, seconds = _train_all(data, train, test, targets, cfg, device)
    finally:
        torch.set_num_threads(threads)
    results = _score(targets, probs)
    private = [t for t in targets if t[0] not in ("action", "identity")]
    return {
        "data": data.summary(),
        "results": results,
        "skipped": skipped,
        "cmap_f1": _cmap(private, probs, results, cfg.archs),
        "seconds": seconds,
        "device": str(device),
    }


def _train_all(data: MethodVideos, train: list[VideoClips], test: list[VideoClips],
               targets: list, cfg: VideoAttackConfig, device: torch.device
               ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
    """Every architecture trained and tested: {target: {arch: test probabilities}} and
    seconds per architecture."""
    groups = [targets] if cfg.joint else [[t] for t in targets]
    probs: dict[str, dict[str, np.ndarray]] = {t[0]: {} for t in targets}
    seconds: dict[str, float] = {}
    for arch in cfg.archs:
        start = time.perf_counter()
        for group in groups:
            heads = [(name, k, ytr) for name, k, ytr, _ in group]
            model = train_attacker(arch, train, heads, cfg, device)
            outs = predict(model, test, [k for _, k, _ in heads], cfg, device)
            for (name, *_), p in zip(group, outs, strict=True):
                probs[name][arch] = p
        seconds[arch] = round(time.perf_counter() - start, 2)
        log.info("attack %s: %s trained and tested in %.1f s", data.root, arch, seconds[arch])
    return probs, seconds


def _score(targets: list, probs: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    results = {}
    for name, k, ytr, yte in targets:
        per_arch = {a: accuracy(p.argmax(1), yte) for a, p in probs[name].items()}
        best = max(per_arch, key=per_arch.__getitem__)
        results[name] = {"accuracy": per_arch[best], "best": best,
                         "chance": chance_level(ytr, yte), "classes": k,
                         "per_arch": per_arch, "train": len(ytr), "test": len(yte)}
    return results


def _cmap(private: list, probs: dict, results: dict, archs: tuple[str, ...]) -> dict:
    """cMAP / F1 over the private attributes: per architecture, and for each attribute's
    best attacker (what the ensemble protocol reports)."""
    if not private:
        return {}
    truth = {name: yte for name, _, _, yte in private}
    per_arch = {a: cmap_f1({n: (probs[n][a], truth[n]) for n in truth}) for a in archs}
    best = cmap_f1({n: (probs[n][results[n]["best"]], truth[n]) for n in truth})
    return {"attributes": list(truth), "best": best, "per_arch": per_arch}


def attack_videos(method_dir: Path, original_dataset: Path,
                  cfg: VideoAttackConfig | None = None) -> dict[str, Any]:
    """Train fresh attackers on a method's training videos to predict the original
    people's attributes (and the action), test them on its test videos.

    Returns a JSON-ready dict: `results` {target: {accuracy (best), best, chance, classes,
    per_arch, train, test}}, `cmap_f1` {attributes, best: {cmap, f1}, per_arch}, `data`
    (videos found, `missing` {id: why}), `skipped` targets with why, `seconds`, `config`."""
    cfg = cfg or VideoAttackConfig()
    start = time.perf_counter()
    data = load_method(Path(method_dir), Path(original_dataset), cfg.clip)
    if data.missing:
        log.warning("%s: %d labelled videos missing (%s)", method_dir, len(data.missing),
                    ", ".join(sorted(data.missing)[:5]))
    report = {"method": str(method_dir), "original": str(original_dataset),
              **attack_loaded(data, cfg), "config": cfg.model_dump(mode="json")}
    report["seconds"]["total"] = round(time.perf_counter() - start, 2)
    return report


def format_table(report: dict[str, Any]) -> str:
    archs = list(report["config"]["archs"])
    lines = ["| target | best | accuracy | chance | " + " | ".join(archs) + " |",
             "|---" * (4 + len(archs)) + "|"]
    for name, r in report["results"].items():
        per = " | ".join(f"{r['per_arch'][a]:.3f}" for a in archs)
        lines.append(f"| {name} | {r['best']} | {r['accuracy']:.3f} | {r['chance']:.3f} "
                     f"| {per} |")
    c = report.get("cmap_f1") or {}
    if c:
        lines.append(f"\ncMAP {c['best']['cmap']:.3f}, F1 {c['best']['f1']:.3f} over "
                     f"{', '.join(c['attributes'])} (best attacker per attribute)")
    missing = report["data"]["missing_count"]
    if missing:
        lines.append(f"{missing} labelled videos missing from the method's output")
    return "\n".join(lines)


# ---- CLI ----------------------------------------------------------------------------

def config_from_overrides(items: list[str]) -> VideoAttackConfig:
    """`epochs=5`, `clip.size=32`, `archs=[c3d,frame2d]`: values parsed as YAML."""
    data: dict[str, Any] = {}
    for text in items:
        if "=" not in text:
            raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. epochs=5")
        key, raw = text.split("=", 1)
        path = [p for p in key.strip().split(".") if p]
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    try:
        return VideoAttackConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"attack config: {exc}") from exc


def cmd_attack(args: argparse.Namespace) -> int:
    cfg = config_from_overrides(args.set or [])
    report = attack_videos(args.method_dir, args.dataset, cfg)
    print(format_table(report))
    if args.out:
        write_json_atomic(args.out, report)
    return 0


def add_cli(subparsers: Any) -> None:
    """Register `avatarize attack`."""
    at = subparsers.add_parser(
        "attack", help="train fresh video attackers (an ensemble) on a method's output to "
        "predict the original people's attributes and the action; accuracy vs chance, cMAP")
    at.add_argument("--method-dir", type=Path, required=True,
                    help="the method's videos: an export folder (dataset.json) or a dataset "
                    "folder (manifest.csv), e.g. the original dataset or a baseline")
    at.add_argument("--dataset", type=Path, required=True,
                    help="the ORIGINAL generated dataset (labels, split)")
    at.add_argument("--out", type=Path, help="write the report as JSON here")
    at.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="attack config, e.g. --set epochs=10 --set clip.size=48 "
                    "--set device=cpu --set archs=[c3d,frame2d]")
    at.set_defaults(func=cmd_attack)
