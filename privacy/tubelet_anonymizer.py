"""Train, apply and evaluate the tubelet transformer anonymizer (PRIVACY_EVAL.md section 2).

Training (adversarial, alternating, per step):
1. the action recognizer (CE) and the video-level privacy recognizer (multi-label BCE over
   the one-hot classes of every private attribute) take a step on the anonymizer's
   current outputs;
2. the anonymizer takes a step on
       L = λr·L_keep_ratio + λa·CE(action) − λp·min(BCE(privacy), cap) + λrec·L_rec
   with the recognizers frozen. L_rec (our addition, not in the paper) is the mean squared
   error of the KEPT tubelets against the input: it keeps the published video looking
   like video rather than a code only our recognizers read. The cap (our addition) stops
   the anonymizer once the privacy recognizer does no better than an uninformed one
   (BCE of 0.5 everywhere, ln 2): past it, pushing the recognizer to be confidently
   wrong would flip the attributes, which leaks them as well as telling them would.

Apply: a trained model rewrites every video of a dataset clip by clip (`frames` frames
at a time, so memory does not grow with length) at its own resolution (short side
`size`, the long side rounded to a tubelet multiple: aspect ratio kept) and writes an
export-style dataset (OUT/<id>.mp4, <id>.mask.mp4, <id>.json, dataset.json) that
`avatarize train` reads. The mask marks KEPT tubelets as sensitive (white): they are
rewritten from the real pixels, so a private trainer must treat them as data; dropped
tubelets are zero and marked black.

Trade-off: for several keep ratios (and the original videos), the appearance attack
ensemble of `avatarize attack` (privacy.video_attack: four architectures trained fresh, the
best per target counts) is trained on the anonymized training split and tested on the test
split: action top-1 (its action head) and attribute cMAP / F1, plus identity and every
attribute's accuracy against chance. The paper trains one action and one privacy
recognizer; an ensemble is the project's protocol (PRIVACY_EVAL.md section 3), and one
small recognizer proved too weak to be a measure: on the 72-video benchmark it read
identity 0.29 and gender 0.38 (chance 0.50) off the ORIGINAL videos, where the ensemble
reads 0.92 and 0.83.

CLI (registered by `add_cli`):
    avatarize tubelet train    --dataset DIR [--labels DIR] --out model.pt [--set ...]
    avatarize tubelet apply    --model model.pt --dataset DIR --out OUT [--keep-ratio R]
    avatarize tubelet tradeoff --model model.pt --dataset DIR [--keep-ratio R ...] [--out J]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import yaml
from pydantic import Field, ValidationError

from pipeline.config import ConfigError, Section, parse_override
from pipeline.dataset import discover
from pipeline.store import write_json_atomic
from pipeline.video import VideoDecodeError, VideoWriter, iter_chunks, iter_frames, probe
from privacy.labels import ATTRIBUTES, LabelTable, load_labels
from privacy.tubelet_model import TubeletAnonymizer, TubeletModelConfig, ratio_loss
from privacy.video_attack import VideoAttackConfig, attack_loaded
from privacy.video_data import MethodVideos, VideoClips, attack_frames
from training.models import ModelConfig, build_model

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "avatarize-tubelet/1"
DATASET_FORMAT = "avatarize-dataset/1"


def _small_recognizer() -> ModelConfig:
    return ModelConfig(arch="r2plus1d", width=16, depth=2)


class TubeletTrainConfig(Section):
    steps: int = Field(3000, ge=1, le=10**7, description="anonymizer steps (each after a "
                       "recognizer step)")
    batch: int = Field(8, ge=1, le=4096, description="clips per step")
    lr: float = Field(1e-4, gt=0.0, description="anonymizer learning rate (AdamW, cosine)")
    recognizer_lr: float = Field(1e-3, gt=0.0, description="action / privacy recognizer lr")
    weight_decay: float = Field(0.05, ge=0.0, description="AdamW weight decay")
    lambda_ratio: float = Field(1.0, ge=0.0, description="weight of the keep-ratio loss")
    lambda_action: float = Field(0.5, ge=0.0, description="λa: weight of the action CE")
    lambda_privacy: float = Field(0.5, ge=0.0, description="λp: weight of −BCE(privacy)")
    lambda_recon: float = Field(1.0, ge=0.0, description="weight of the kept-tubelet "
                                "reconstruction (ours: keeps outputs video-like, so fresh "
                                "recognizers can read them); 0: off")
    privacy_cap: float = Field(math.log(2), gt=0.0, description="−BCE stops paying past this "
                               "(ln 2: an uninformed recognizer); larger would reward flips")
    recognizer_steps: int = Field(1, ge=1, le=100, description="recognizer steps per "
                                  "anonymizer step")
    warmup_steps: int = Field(
        500, ge=0, le=10**7, description="first steps: the recognizers learn on the ORIGINAL "
        "clips and the anonymizer without the privacy term (a fresh decoder's noise gives "
        "recognizers nothing to learn from, and the scorers no signal)")
    identity: bool = Field(False, description="also hide identity (one class per person)")
    attributes: tuple[str, ...] = Field(
        ("gender", "age_group", "skin_tone", "build"),
        description="private attributes (privacy.labels) the adversary predicts; those "
        "missing from the labels are skipped")
    flip: bool = Field(False, description="random horizontal flips (off: direction may be "
                       "the action)")
    recognizer: ModelConfig = Field(default_factory=_small_recognizer,
                                    description="action and privacy recognizers in training")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    seed: int = 0


class TubeletEvalConfig(Section):
    keep_ratios: tuple[float, ...] = Field(
        (0.2, 0.343, 0.5, 0.7, 1.0), description="keep ratios of the trade-off report")
    original: bool = Field(True, description="also score the un-anonymized videos")
    attack: VideoAttackConfig = Field(
        default_factory=VideoAttackConfig, description="the fresh attackers and action "
        "recognizers trained per keep ratio (the `avatarize attack` ensemble and settings)")


class TubeletSection(Section):
    model: TubeletModelConfig = Field(default_factory=TubeletModelConfig)
    train: TubeletTrainConfig = Field(default_factory=TubeletTrainConfig)
    evaluate: TubeletEvalConfig = Field(default_factory=TubeletEvalConfig)


def load_section(path: Path | None = None, overrides: tuple[str, ...] | list[str] = ()
                 ) -> TubeletSection:
    """The `tubelet` section of a pipeline YAML (other sections ignored) with `--set`
    overrides (`tubelet.train.steps=100`; the `tubelet.` prefix may be left out)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read config: {exc}") from exc
        data = dict(loaded.get("tubelet") or {}) if isinstance(loaded, dict) else {}
    for text in overrides:
        keys, value = parse_override(text if text.startswith("tubelet.") else f"tubelet.{text}")
        node = data
        for key in keys[1:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    try:
        return TubeletSection.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"tubelet: {exc}") from None


# ---- data -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    id: str
    path: Path
    rel: str  # the original's path relative to its dataset root
    label: str | None
    split: str | None


def dataset_sources(dataset: Path) -> list[Source]:
    """Videos of a dataset: an avatarize export (dataset.json, ok videos), else a folder
    or a manifest.csv (pipeline.dataset)."""
    dataset = Path(dataset)
    index = dataset / "dataset.json"
    if index.is_file():
        entries = json.loads(index.read_text()).get("videos", [])
        return [Source(v["id"], dataset / v["video"], v.get("source") or v["video"],
                       v.get("label"), v.get("split")) for v in entries
                if v.get("status") == "ok" and v.get("video")]
    return [Source(i.id, i.path, i.rel_path, i.label, i.split) for i in discover(dataset)]


def model_shape(height: int, width: int, size: int, patch: int) -> tuple[int, int]:
    """(h, w) with the short side `size` and the long side the nearest tubelet multiple."""
    scale = size / min(height, width)
    long_side = max(size, round(max(height, width) * scale / patch) * patch)
    return (size, long_side) if height <= width else (long_side, size)


def resize_frames(frames: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    if frames.shape[1:3] == (h, w):
        return frames
    return np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in frames])


@dataclass
class ClipVideo:
    """A decoded video at the model's resolution, with its labels."""

    id: str
    split: str
    action: int
    privacy: np.ndarray  # (K,) multi-hot: one 1 per attribute
    attributes: dict[str, int]  # class index per attribute
    frames: np.ndarray  # (T, h, w, 3) uint8


@dataclass(frozen=True)
class LabelSpace:
    actions: list[str]
    attributes: dict[str, list[str]]  # attribute -> classes, in the privacy vector's order

    @property
    def privacy_classes(self) -> int:
        return sum(len(c) for c in self.attributes.values())

    def blocks(self) -> dict[str, slice]:
        out, start = {}, 0
        for name, classes in self.attributes.items():
            out[name] = slice(start, start + len(classes))
            start += len(classes)
        return out


def label_space(table: LabelTable, cfg: TubeletTrainConfig) -> LabelSpace:
    wanted = (("identity",) if cfg.identity else ()) + tuple(cfg.attributes)
    unknown = [a for a in wanted if a not in ATTRIBUTES]
    if unknown:
        raise ConfigError(f"tubelet.train.attributes: unknown {unknown} (known: {ATTRIBUTES})")
    attrs = {a: table.classes[a] for a in wanted if len(table.classes.get(a, [])) > 1}
    if not attrs:
        raise ConfigError(f"no private attribute with two or more classes among {wanted}")
    return LabelSpace(table.actions, attrs)


def load_videos(dataset: Path, table: LabelTable, space: LabelSpace,
                model: TubeletModelConfig) -> list[ClipVideo]:
    """Decode the labelled videos of `dataset` at the model's resolution (ids matched to
    `table`, which may come from another folder: the originals of an export)."""
    labels = table.by_id()
    out = []
    for src in dataset_sources(dataset):
        lab = labels.get(src.id)
        if lab is None or lab.action not in space.actions:
            continue
        frames = np.stack(list(iter_frames(src.path, "rgb24")))
        frames = resize_frames(frames, model_shape(*frames.shape[1:3], model.size,
                                                   model.tubelet[1]))
        idx = {a: classes.index(lab.attributes[a]) for a, classes in space.attributes.items()}
        vec = np.zeros(space.privacy_classes, np.float32)
        for a, block in space.blocks().items():
            vec[block.start + idx[a]] = 1.0
        split = lab.split or src.split or "train"
        out.append(ClipVideo(src.id, "test" if split in ("test", "val", "validation")
                             else "train", space.actions.index(lab.action), vec, idx, frames))
    if not out:
        raise ConfigError(f"{dataset}: no video with labels (ids must match the label table)")
    return out


def _clip(frames: np.ndarray, start: int, length: int) -> np.ndarray:
    idx = np.minimum(start + np.arange(length), len(frames) - 1)
    return frames[idx]


def random_clips(videos: list[ClipVideo], model: TubeletModelConfig,
                 rng: np.random.Generator, flip: bool = False,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One random clip of each video, in order: (N, 3, T, S, S) in [0, 1] (random start
    and square crop), actions (N,) and privacy vectors (N, K)."""
    xs, ys, ps = [], [], []
    for v in videos:
        clip = _clip(v.frames, int(rng.integers(0, max(1, len(v.frames) - model.frames + 1))),
                     model.frames)
        h, w = clip.shape[1:3]
        y0 = int(rng.integers(0, h - model.size + 1))
        x0 = int(rng.integers(0, w - model.size + 1))
        clip = clip[:, y0:y0 + model.size, x0:x0 + model.size]
        if flip and rng.integers(0, 2):
            clip = clip[:, :, ::-1]
        xs.append(torch.from_numpy(np.ascontiguousarray(clip)).permute(3, 0, 1, 2))
        ys.append(v.action)
        ps.append(torch.from_numpy(v.privacy))
    return torch.stack(xs).float() / 255.0, torch.tensor(ys), torch.stack(ps)


def sample_batch(videos: list[ClipVideo], model: TubeletModelConfig, batch: int,
                 rng: np.random.Generator, flip: bool = False,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random clips of `batch` randomly drawn videos (see random_clips)."""
    idx = rng.choice(len(videos), batch, replace=len(videos) < batch)
    return random_clips([videos[int(i)] for i in idx], model, rng, flip)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---- adversarial training --------------------------------------------------------------

def _step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def train_anonymizer(videos: list[ClipVideo], space: LabelSpace, section: TubeletSection,
                     progress: Callable[[int, dict[str, float]], None] | None = None,
                     ) -> tuple[TubeletAnonymizer, list[dict[str, float]]]:
    """Alternate recognizer and anonymizer steps on the training split; the anonymizer is
    returned in eval mode with a per-50-steps loss history."""
    cfg, mcfg = section.train, section.model
    train = [v for v in videos if v.split == "train"]
    if not train:
        raise ConfigError("no training videos (split 'train')")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = _device(cfg.device)
    anon = TubeletAnonymizer(mcfg).to(device)
    action = build_model(cfg.recognizer, len(space.actions), mcfg.frames, mcfg.size).to(device)
    privacy = build_model(cfg.recognizer, space.privacy_classes, mcfg.frames,
                          mcfg.size).to(device)
    opt_anon = torch.optim.AdamW(anon.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_anon, cfg.steps)
    opt_rec = torch.optim.AdamW([*action.parameters(), *privacy.parameters()],
                                lr=cfg.recognizer_lr, weight_decay=1e-4)
    recognizers = [*action.parameters(), *privacy.parameters()]
    history: list[dict[str, float]] = []
    sums: dict[str, float] = {}
    anon.train()
    for step in range(1, cfg.steps + 1):
        for _ in range(cfg.recognizer_steps):
            x, y, p = (t.to(device) for t in sample_batch(train, mcfg, cfg.batch, rng, cfg.flip))
            if step > cfg.warmup_steps:
                with torch.no_grad():
                    out, _ = anon(x)
            else:
                out = x
            _step(opt_rec, F.cross_entropy(action(out), y)
                  + F.binary_cross_entropy_with_logits(privacy(out), p))
        x, y, p = (t.to(device) for t in sample_batch(train, mcfg, cfg.batch, rng, cfg.flip))
        for q in recognizers:
            q.requires_grad_(False)
        out, masks = anon(x)
        # Detached: the reconstruction shapes the kept content, not the selection (through
        # the mask it would pay the scorers to drop whatever is hard to reconstruct).
        keep = anon.pixel_mask(masks[-1].detach(), (out.shape[2] // anon.t,
                                                    out.shape[3] // anon.p,
                                                    out.shape[4] // anon.p))[:, None]
        terms = {
            "ratio": ratio_loss(masks, mcfg.keep_ratio),
            "action": F.cross_entropy(action(out), y),
            "privacy": F.binary_cross_entropy_with_logits(privacy(out), p),
            "recon": ((out - x) ** 2 * keep).sum() / (3 * keep.sum()).clamp_min(1.0),
        }
        lambda_privacy = cfg.lambda_privacy if step > cfg.warmup_steps else 0.0
        loss = (cfg.lambda_ratio * terms["ratio"] + cfg.lambda_action * terms["action"]
                - lambda_privacy * terms["privacy"].clamp(max=cfg.privacy_cap)
                + cfg.lambda_recon * terms["recon"])
        _step(opt_anon, loss)
        sched.step()
        for q in recognizers:
            q.requires_grad_(True)
        terms["kept"] = masks[-1].mean()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        if step % 50 == 0 or step == cfg.steps:
            n = 50 if step % 50 == 0 else step % 50
            row = {"step": float(step), **{k: round(v / n, 5) for k, v in sums.items()}}
            history.append(row)
            sums = {}
            if progress is not None:
                progress(step, row)
    return anon.eval(), history


def save_checkpoint(path: Path, model: TubeletAnonymizer, section: TubeletSection,
                    space: LabelSpace, history: list[dict[str, float]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    # The evaluation settings are not the model's: a trade-off run picks its own.
    torch.save({"format": CHECKPOINT_FORMAT,
                "config": section.model_dump(mode="json", exclude={"evaluate"}),
                "state": model.state_dict(), "actions": space.actions,
                "attributes": space.attributes, "history": history}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, device: str = "cpu",
                    ) -> tuple[TubeletAnonymizer, TubeletSection, dict[str, Any]]:
    try:
        ck = torch.load(Path(path), map_location=device, weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise ConfigError(f"{path}: cannot read the anonymizer checkpoint: {exc}") from exc
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path}: not a tubelet anonymizer checkpoint")
    config = {k: v for k, v in ck["config"].items() if k != "evaluate"}
    section = TubeletSection.model_validate(config)
    model = TubeletAnonymizer(section.model)
    model.load_state_dict(ck["state"])
    return model.to(device).eval(), section, ck


# ---- applying --------------------------------------------------------------------------

@torch.no_grad()
def anonymize_clips(model: TubeletAnonymizer, frames: np.ndarray, keep_ratio: float,
                    batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Frames (T, h, w, 3) uint8 at the model's resolution -> anonymized frames (T, h, w, 3)
    and the kept mask (T, h, w) uint8 (255 = kept tubelet), in clips of `frames` frames
    (the last one padded by repeating its last frame)."""
    length = model.cfg.frames
    starts = list(range(0, len(frames), length))
    device = next(model.parameters()).device
    outs, masks = [], []
    for s in range(0, len(starts), batch):
        clips = np.stack([_clip(frames, b, length) for b in starts[s:s + batch]])
        x = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float().div(255.0).to(device)
        y, keep = model(x, keep_ratio=keep_ratio)
        grid = (y.shape[2] // model.t, y.shape[3] // model.p, y.shape[4] // model.p)
        outs.append((y.permute(0, 2, 3, 4, 1) * 255.0).round().byte().cpu().numpy())
        masks.append((model.pixel_mask(keep[-1], grid) * 255).byte().cpu().numpy())
    t = len(frames)
    out = np.concatenate(outs).reshape(-1, *frames.shape[1:])[:t]
    return out, np.concatenate(masks).reshape(-1, *frames.shape[1:3])[:t]


def _iter_model_frames(path: Path, model: TubeletModelConfig) -> Iterator[np.ndarray]:
    """Chunks of `frames` frames of a video, resized to the model's resolution."""
    shape = None
    for chunk in iter_chunks(path, model.frames):
        if shape is None:
            shape = model_shape(*chunk.shape[1:3], model.size, model.tubelet[1])
        yield resize_frames(chunk, shape)


def _tmp_for(final: Path) -> Path:
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp{final.suffix}")


def apply_video(model: TubeletAnonymizer, src: Source, out_root: Path, keep_ratio: float,
                crf: int = 18, model_name: str = "") -> dict[str, Any]:
    """Anonymize one video into OUT/<id>.mp4 + .mask.mp4 + .json; returns its dataset.json
    entry. Files appear under their final names only once complete."""
    info = probe(src.path)
    base = out_root / src.id
    paths = {"video": base.with_name(base.name + ".mp4"),
             "mask": base.with_name(base.name + ".mask.mp4"),
             "meta": base.with_name(base.name + ".json")}
    paths["video"].parent.mkdir(parents=True, exist_ok=True)
    tmp_video, tmp_mask = _tmp_for(paths["video"]), _tmp_for(paths["mask"])
    video_out = mask_out = None
    frames = kept = 0
    try:
        for chunk in _iter_model_frames(src.path, model.cfg):
            anon, mask = anonymize_clips(model, chunk, keep_ratio)
            if video_out is None or mask_out is None:
                h, w = chunk.shape[1:3]
                video_out = VideoWriter(tmp_video, info.fps, w, h, "h264", crf=crf)
                mask_out = VideoWriter(tmp_mask, info.fps, w, h, "h264", crf=10)
            video_out.write_chunk(anon)
            mask_out.write_chunk(mask)
            frames += len(chunk)
            kept += int((mask > 127).sum())
        if video_out is None or mask_out is None:
            raise VideoDecodeError(f"{src.path}: no frames")
        video_out.close()
        mask_out.close()
        os.replace(tmp_video, paths["video"])
        os.replace(tmp_mask, paths["mask"])
    finally:
        for w_ in (video_out, mask_out):
            if w_ is not None:
                w_.close()
        for tmp in (tmp_video, tmp_mask):
            if tmp.exists():
                tmp.unlink()
    fps: Fraction = info.fps
    write_json_atomic(paths["meta"], {
        "video": src.id, "source": src.rel, "label": src.label, "split": src.split,
        "width": video_out.width, "height": video_out.height, "fps": float(fps),
        "fps_fraction": f"{fps.numerator}/{fps.denominator}", "frames": frames,
        "anonymizer": {"method": "tubelet", "model": model_name, "keep_ratio": keep_ratio,
                       "kept_fraction": round(kept / (frames * video_out.width
                                                       * video_out.height), 4)},
        "mask": "white = kept tubelets (rewritten from real pixels: sensitive), "
                "black = dropped tubelets (zero)",
        "notes": [],
    })
    return {"id": src.id, "source": src.rel, "label": src.label, "split": src.split,
            "status": "ok", **{k: p.relative_to(out_root).as_posix() for k, p in paths.items()}}


def apply_dataset(model: TubeletAnonymizer, dataset: Path, out_root: Path,
                  keep_ratio: float | None = None, crf: int = 18, model_name: str = "",
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Anonymize every video of `dataset` into `out_root`; writes and returns dataset.json.
    A video that cannot be read is listed as failed with the reason, the others go on."""
    dataset, out_root = Path(dataset).resolve(), Path(out_root).resolve()
    if out_root == dataset or dataset in out_root.parents or out_root in dataset.parents:
        raise ConfigError(f"--out {out_root} must be outside the dataset {dataset}")
    ratio = model.cfg.keep_ratio if keep_ratio is None else keep_ratio
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"keep ratio {ratio} must be in (0, 1]")
    videos = []
    for src in dataset_sources(dataset):
        try:
            videos.append(apply_video(model, src, out_root, ratio, crf, model_name))
        except (VideoDecodeError, OSError, ValueError) as exc:
            log.warning("%s: %s", src.id, exc)
            videos.append({"id": src.id, "source": src.rel, "label": src.label,
                           "split": src.split, "status": "failed", "reason": str(exc)})
        if progress is not None:
            progress(src.id)
    index = {
        "format": DATASET_FORMAT, "videos": videos,
        "labels": sorted({v["label"] for v in videos if v["label"]}),
        "counts": {"total": len(videos), "ok": sum(v["status"] == "ok" for v in videos),
                   "failed": sum(v["status"] != "ok" for v in videos)},
        "anonymizer": {"method": "tubelet", "model": model_name, "keep_ratio": ratio},
    }
    write_json_atomic(out_root / "dataset.json", index)
    return index


# ---- trade-off -------------------------------------------------------------------------

def attack_method(name: str, videos: list[ClipVideo], table: LabelTable,
                  cfg: VideoAttackConfig) -> dict[str, Any]:
    """The attack ensemble on in-memory videos (labels and split from `table`): a trade-off
    row with action top-1, cMAP / F1 of the best attacker per attribute, and every private
    target's accuracy against chance."""
    labels = table.by_id()
    clips = [VideoClips(v.id, labels[v.id], attack_frames(v.frames, cfg.clip))
             for v in videos if v.id in labels]
    report = attack_loaded(MethodVideos(Path(name), "memory", table, clips), cfg)
    results = report["results"]
    action = results.get("action", {})
    best = report["cmap_f1"].get("best", {})
    return {"action_top1": action.get("accuracy"), "action_chance": action.get("chance"),
            "cmap": best.get("cmap"), "f1": best.get("f1"),
            "attributes": {k: {"accuracy": r["accuracy"], "chance": r["chance"],
                               "best": r["best"]}
                           for k, r in results.items() if k != "action"},
            "train_videos": report["data"]["train"], "test_videos": report["data"]["test"],
            "skipped": report["skipped"], "attack": results}


def anonymized_copy(model: TubeletAnonymizer, videos: list[ClipVideo], keep_ratio: float,
                    ) -> list[ClipVideo]:
    return [ClipVideo(v.id, v.split, v.action, v.privacy, v.attributes,
                      anonymize_clips(model, v.frames, keep_ratio)[0]) for v in videos]


def tradeoff(model: TubeletAnonymizer, videos: list[ClipVideo], table: LabelTable,
             cfg: TubeletEvalConfig, keep_ratios: tuple[float, ...] | None = None,
             ) -> dict[str, Any]:
    """The attack ensemble's action top-1 and attribute cMAP / F1 per keep ratio (and on
    the original videos): a JSON-ready dict."""
    ratios = tuple(keep_ratios or cfg.keep_ratios)
    rows: dict[str, Any] = {}
    if cfg.original:
        rows["original"] = attack_method("original", videos, table, cfg.attack)
    for r in ratios:
        t0 = time.perf_counter()
        rows[f"keep_{r:g}"] = {"keep_ratio": r, **attack_method(
            f"keep {r:g}", anonymized_copy(model, videos, r), table, cfg.attack),
            "seconds": round(time.perf_counter() - t0, 1)}
    return {"method": "tubelet", "keep_ratios": list(ratios),
            "evaluate": cfg.model_dump(mode="json"), "results": rows}


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def format_tradeoff(report: dict[str, Any]) -> str:
    lines = ["| videos | action top-1 (chance) | attribute cMAP | F1 | per target accuracy "
             "(chance) |", "|---|---|---|---|---|"]
    for name, r in report["results"].items():
        per = "; ".join(f"{a} {_num(v['accuracy'])} ({_num(v['chance'])})"
                        for a, v in r["attributes"].items())
        lines.append(f"| {name} | {_num(r['action_top1'])} ({_num(r['action_chance'])}) | "
                     f"{_num(r['cmap'])} | {_num(r['f1'])} | {per} |")
    return "\n".join(lines)


# ---- CLI -------------------------------------------------------------------------------

def _labels_for(args: argparse.Namespace) -> LabelTable:
    return load_labels(args.labels or args.dataset)


def cmd_train(args: argparse.Namespace) -> int:
    section = load_section(args.config, args.set or [])
    table = _labels_for(args)
    space = label_space(table, section.train)
    videos = load_videos(args.dataset, table, space, section.model)
    log.info("tubelet: %d videos, actions %s, private %s", len(videos), space.actions,
             list(space.attributes))
    model, history = train_anonymizer(
        videos, space, section, lambda s, row: log.info("step %d %s", s, row))
    save_checkpoint(args.out, model, section, space, history)
    print(json.dumps({"checkpoint": str(args.out), "last": history[-1]}, indent=2))
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    model, _, _ = load_checkpoint(args.model)
    index = apply_dataset(model, args.dataset, args.out, args.keep_ratio, args.crf,
                          str(args.model), lambda vid: log.info("tubelet: %s", vid))
    print(json.dumps(index["counts"]))
    return 0 if index["counts"]["failed"] == 0 else 1


def cmd_tradeoff(args: argparse.Namespace) -> int:
    model, section, ck = load_checkpoint(args.model)
    evaluate = load_section(args.config, args.set or []).evaluate
    table = _labels_for(args)
    space = LabelSpace(list(ck["actions"]), {k: list(v) for k, v in ck["attributes"].items()})
    videos = load_videos(args.dataset, table, space, section.model)
    report = tradeoff(model, videos, table, evaluate,
                      tuple(args.keep_ratio) if args.keep_ratio else None)
    print(format_tradeoff(report))
    if args.out:
        write_json_atomic(args.out, report)
    return 0


def add_cli(subparsers: Any) -> None:
    """Register `avatarize tubelet train|apply|tradeoff`."""
    top = subparsers.add_parser("tubelet", help="the tubelet transformer anonymizer "
                                "(STPrivacy): train, apply, trade-off")
    sub = top.add_subparsers(dest="tubelet_command", required=True)

    def common(p: argparse.ArgumentParser, labels: bool = True) -> None:
        p.add_argument("--dataset", type=Path, required=True,
                       help="videos: a folder, a manifest.csv folder or an avatarize export")
        if labels:
            p.add_argument("--labels", type=Path, help="folder with manifest.csv and .json "
                           "sidecars holding the labels (default: --dataset; give the "
                           "originals when --dataset is an export)")
            p.add_argument("--config", type=Path, help="YAML whose `tubelet` section is read")
            p.add_argument("--set", action="append", metavar="KEY=VALUE",
                           help="override, e.g. tubelet.train.steps=500")

    tr = sub.add_parser("train", help="adversarial training against action and privacy "
                        "recognizers")
    common(tr)
    tr.add_argument("--out", type=Path, required=True, help="checkpoint to write (model.pt)")
    tr.set_defaults(func=cmd_train)

    ap = sub.add_parser("apply", help="write the anonymized dataset (export layout)")
    common(ap, labels=False)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="output dataset folder")
    ap.add_argument("--keep-ratio", type=float, help="share of tubelets kept per frame "
                    "(default: the trained one)")
    ap.add_argument("--crf", type=int, default=18, help="H.264 quality")
    ap.set_defaults(func=cmd_apply)

    to = sub.add_parser("tradeoff", help="the attack ensemble trained fresh per keep ratio: "
                        "action top-1 vs attribute cMAP / F1")
    common(to)
    to.add_argument("--model", type=Path, required=True)
    to.add_argument("--keep-ratio", type=float, action="append",
                    help="repeatable (default: tubelet.evaluate.keep_ratios)")
    to.add_argument("--out", type=Path, help="write the JSON report here")
    to.set_defaults(func=cmd_tradeoff)
