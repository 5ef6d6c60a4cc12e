"""Training an action recognizer: non-private, full DP-SGD (Opacus) or MaskDP.

One loop for all three. Each step draws a Poisson sample of training videos (rate
q = batch_size / N, every video independently, as Opacus' sampler), takes
`clips_per_video` clips of each, and builds the step's gradient sum in physical chunks of
`physical_batch` videos (virtual batches larger than memory):

- none:   Σ_videos mean-over-clips gradient (no clipping, no noise);
- dpsgd:  Σ_videos clip_C(mean-over-clips gradient) + N(0, σ²C²): per-sample gradients
          from forward hooks ("hooks", training/maskdp.py: per_sample_gradients) or, with
          one clip per video, Opacus' ghost clipping (norms without materializing
          per-sample gradients);
- maskdp: Σ_videos [public gradient + clip_C(Δ)] + N(0, σ²C²) (training/maskdp.py).

then divides by the expected batch size q·N (as Opacus does) and steps the optimizer. The
accountant (Opacus RDP or PRV) records one Poisson-subsampled Gaussian step each time;
the noise multiplier comes from the target ε, δ, q and the number of steps, as Opacus'
make_private_with_epsilon computes it.

Checkpoints (after every epoch, written atomically) hold the model, the optimizer, the
scheduler, the accountant's history and the step; every random draw is a function of
(seed, step), so a killed run resumes from its last epoch exactly as it would have gone on,
with its accounting exact: the steps of the unfinished epoch were never released and are
redone, counted once.

Data parallel (launched by torchrun, gloo on CPU, NCCL on GPUs): every rank draws the same
Poisson sample and processes its share of the videos; rank 0 alone adds the noise; the sums
are all-reduced, so all ranks take the same step and the accounting is a single process's
(as Opacus' DPDDP does).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from pipeline.config import Section
from training.accounting import default_delta, make_accountant, noise_for_epsilon
from training.data import DataConfig, VideoRecord, batch_of, load_dataset
from training.maskdp import (
    add_noise,
    dpsgd_gradient_ghost,
    dpsgd_gradient_hooks,
    maskdp_gradient_efficient,
    maskdp_gradient_naive,
    public_surrogate,
)
from training.models import ModelConfig, build_model, check_private

log = logging.getLogger(__name__)


class PrivacyConfig(Section):
    mode: Literal["none", "dpsgd", "maskdp"] = Field(
        "maskdp", description="none | dpsgd (whole input private) | maskdp (sensitive region)")
    epsilon: float = Field(8.0, gt=0.0, description="target ε spent by the whole run")
    delta: float | None = Field(
        None, gt=0.0, lt=1.0, description="δ; null: min(1e-5, 1/N^1.1), N = training videos")
    noise_multiplier: float | None = Field(
        None, ge=0.0, description="σ directly (then ε is what it spends, not a target)")
    clip: float = Field(1.0, gt=0.0, description="clip norm C of a video's (sensitive) gradient")
    accountant: Literal["rdp", "prv"] = Field("prv", description="Opacus accountant")
    filler: float = Field(0.5, ge=0.0, le=1.0,
                          description="constant that replaces sensitive pixels in x̄ (no data)")
    dpsgd_mode: Literal["hooks", "ghost"] = Field(
        "hooks", description="dpsgd: per-sample gradients (hooks) or ghost clipping (norms "
        "without materializing gradients; needs train.data.clips_per_video 1)")
    maskdp_form: Literal["efficient", "naive"] = Field(
        "efficient", description="stacked-batch MaskDP or the two-pass reference")


class OptimConfig(Section):
    optimizer: Literal["adam", "sgd"] = Field(
        "adam", description="applied to the privatized gradient (post-processing: no cost in ε)")
    epochs: int = Field(10, ge=1, le=10000)
    batch_size: int = Field(8, ge=1, description="expected videos per step (Poisson)")
    physical_batch: int = Field(8, ge=1, description="videos per forward/backward in memory")
    lr: float = Field(1e-3, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0.0)
    schedule: Literal["cosine", "constant"] = "cosine"
    seed: int = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")


class TrainConfig(Section):
    enabled: bool = Field(
        False, description="the train stage of `avatarize run` trains only when true "
        "(`avatarize train` always does)")
    out: Path | None = Field(
        None, description="run folder (checkpoint, metrics); null: WORKDIR/training/<mode>")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    optim: OptimConfig = OptimConfig()

    @model_validator(mode="after")
    def _ghost_needs_one_clip(self) -> TrainConfig:
        if (self.privacy.mode == "dpsgd" and self.privacy.dpsgd_mode == "ghost"
                and self.data.clips_per_video != 1):
            raise ValueError("train.privacy.dpsgd_mode ghost clips each clip, not each video: "
                             "set train.data.clips_per_video to 1")
        return self


def loss_per_sample(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, y, reduction="none")


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


class Trainer:
    def __init__(self, cfg: TrainConfig, dataset_root: Path | None, out_dir: Path,
                 input_root: Path | None = None,
                 records: tuple[list[VideoRecord], list[str]] | None = None):
        """Train on the exported dataset at `dataset_root`, or on `records` (videos and
        label names already in memory, e.g. with audit canaries planted)."""
        self.cfg = cfg
        self.out = out_dir
        self.out.mkdir(parents=True, exist_ok=True)
        dev = cfg.optim.device
        self.device = torch.device("cuda" if dev == "auto" and torch.cuda.is_available()
                                   else ("cpu" if dev == "auto" else dev))
        if records is None:
            if dataset_root is None:
                raise ValueError("no dataset: give its folder or the records")
            records = load_dataset(dataset_root, cfg.data, input_root=input_root)
        videos, self.labels = records
        self.train = [r for r in videos if r.split == "train"]
        self.test = [r for r in videos if r.split == "test"]
        if not self.train:
            raise ValueError(f"{dataset_root}: no training videos")
        torch.manual_seed(cfg.optim.seed)
        self.model = build_model(cfg.model, len(self.labels), cfg.data.frames,
                                 cfg.data.size).to(self.device)
        p = cfg.privacy
        if p.mode != "none":
            check_private(self.model)
        n = len(self.train)
        self.sample_rate = min(1.0, cfg.optim.batch_size / n)
        self.steps_per_epoch = max(1, round(1.0 / self.sample_rate))
        self.total_steps = self.steps_per_epoch * cfg.optim.epochs
        self.delta = p.delta if p.delta is not None else default_delta(n)
        if p.mode == "none":
            self.sigma = 0.0
        elif p.noise_multiplier is not None:
            self.sigma = p.noise_multiplier
        else:
            self.sigma = noise_for_epsilon(p.epsilon, self.delta, self.sample_rate,
                                           self.total_steps, p.accountant)
        self.accountant = make_accountant(p.accountant)
        o = cfg.optim
        self.optimizer = (
            torch.optim.Adam(self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
            if o.optimizer == "adam" else
            torch.optim.SGD(self.model.parameters(), lr=o.lr, momentum=o.momentum,
                            weight_decay=o.weight_decay))
        total = self.total_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, (lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
            if cfg.optim.schedule == "cosine" else (lambda s: 1.0))
        self.step = 0
        # Data parallel (torchrun): every rank draws the same Poisson sample and takes its
        # share of the videos; rank 0 alone adds the noise; the sums are all-reduced.
        dist = torch.distributed
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() \
            else 1
        self.rank = dist.get_rank() if self.world > 1 else 0
        self.history: list[dict[str, Any]] = []
        self.dataset_root = dataset_root
        self._gsm: nn.Module | None = None
        self._resume()

    # ---- state -----------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def epsilon(self) -> float | None:
        """ε spent so far; None for non-private training (no guarantee at all)."""
        if self.cfg.privacy.mode == "none":
            return None
        if not self.accountant.history:
            return 0.0
        return float(self.accountant.get_epsilon(delta=self.delta))

    def _state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "accountant": list(self.accountant.history), "step": self.step,
                "history": self.history,
                "sigma": self.sigma, "labels": self.labels,
                "config": json.loads(self.cfg.model_dump_json())}

    def _resume(self) -> None:
        if not self.checkpoint_path.is_file():
            return
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=False)
        if state["config"] != json.loads(self.cfg.model_dump_json()):
            raise ValueError(f"{self.checkpoint_path} was written with another train config: "
                             "use another train.out or remove the folder to start over")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.accountant.history = [tuple(h) for h in state["accountant"]]
        self.step = state["step"]
        self.history = state["history"]
        self.sigma = state["sigma"]
        log.info("resumed %s at step %d (ε spent %s)", self.checkpoint_path, self.step,
                 self.epsilon())

    # ---- one step --------------------------------------------------------------------
    def _rng(self, purpose: int, rank: int = 0) -> np.random.Generator:
        """The step's own generator: a function of (seed, step, purpose, rank), so a resumed
        run draws exactly what an uninterrupted one would, with no state to save."""
        return np.random.default_rng([self.cfg.optim.seed, self.step, purpose, rank])

    def _ghost_module(self) -> nn.Module:
        if self._gsm is None:
            from opacus.grad_sample import GradSampleModuleFastGradientClipping

            self._gsm = GradSampleModuleFastGradientClipping(
                self.model, loss_reduction="sum", use_ghost_clipping=True,
                max_grad_norm=self.cfg.privacy.clip)
        return self._gsm

    def _chunk_sum(self, videos: list[VideoRecord], rng: np.random.Generator
                   ) -> tuple[list[torch.Tensor], float, int]:
        """Σ over these videos of their (clipped) contributions; summed loss; clips."""
        cfg, p = self.cfg, self.cfg.privacy
        x, m, y, g = batch_of(videos, cfg.data, cfg.data.clips_per_video, rng)
        x, m, y, g = (t.to(self.device) for t in (x, m, y, g))
        if p.mode == "maskdp":
            xbar = public_surrogate(x, m, p.filler)
            gradient = maskdp_gradient_efficient if p.maskdp_form == "efficient" \
                else maskdp_gradient_naive
            grads, _, loss = gradient(self.model, loss_per_sample, x, xbar, y, p.clip, g)
            return grads, loss, len(y)
        if p.mode == "none":
            # Per-video mean over its clips: weight 1 / clips of that video.
            params = [q for q in self.model.parameters() if q.requires_grad]
            counts = torch.bincount(g)[g].to(x.dtype)
            self.model.zero_grad(set_to_none=True)
            losses = loss_per_sample(self.model(x), y)
            (losses / counts).sum().backward()
            grads = [q.grad.detach().clone() for q in params]
            self.model.zero_grad(set_to_none=True)
            return grads, float(losses.detach().sum()), len(y)
        if p.dpsgd_mode == "ghost":
            grads, _, loss = dpsgd_gradient_ghost(self._ghost_module(), loss_per_sample, x, y,
                                                  p.clip)
        else:
            grads, _, loss = dpsgd_gradient_hooks(self.model, loss_per_sample, x, y, p.clip, g)
        return grads, loss, len(y)

    def _all_reduce(self, grads: list[torch.Tensor], loss: float, clips: int
                    ) -> tuple[list[torch.Tensor], float, int]:
        flat = torch.cat([g.reshape(-1) for g in grads] + [
            torch.tensor([loss, float(clips)], dtype=grads[0].dtype, device=grads[0].device)])
        torch.distributed.all_reduce(flat)
        out, at = [], 0
        for g in grads:
            out.append(flat[at:at + g.numel()].view_as(g))
            at += g.numel()
        return out, float(flat[at]), int(round(float(flat[at + 1])))

    def train_step(self) -> dict[str, float]:
        # Dropout draws from torch's global generator: seed it from (seed, step, rank) so a
        # resumed run draws the masks an uninterrupted one would, and restore it after.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(self._rng(3, self.rank).integers(2**62)))
            return self._train_step()

    def _train_step(self) -> dict[str, float]:
        cfg = self.cfg
        chosen = np.flatnonzero(self._rng(0).random(len(self.train)) < self.sample_rate)
        mine = chosen[self.rank::self.world]
        augment = self._rng(1, self.rank)
        params = [q for q in self.model.parameters() if q.requires_grad]
        total = [torch.zeros_like(q) for q in params]
        loss_sum, clips = 0.0, 0
        self.model.train()
        for start in range(0, len(mine), cfg.optim.physical_batch):
            videos = [self.train[i] for i in mine[start:start + cfg.optim.physical_batch]]
            grads, loss, n = self._chunk_sum(videos, augment)
            for acc, gr in zip(total, grads, strict=True):
                acc += gr
            loss_sum += loss
            clips += n
        if cfg.privacy.mode != "none" and self.rank == 0:
            noise = torch.Generator().manual_seed(int(self._rng(2).integers(2**62)))
            total = add_noise(total, self.sigma, cfg.privacy.clip, noise)
        if self.world > 1:
            total, loss_sum, clips = self._all_reduce(total, loss_sum, clips)
        expected = self.sample_rate * len(self.train)
        for q, gr in zip(params, total, strict=True):
            q.grad = (gr / expected).to(q.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if cfg.privacy.mode != "none":
            self.accountant.step(noise_multiplier=self.sigma, sample_rate=self.sample_rate)
        self.step += 1
        return {"loss": loss_sum / clips if clips else float("nan"), "videos": len(chosen)}

    # ---- evaluation ------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, records: list[VideoRecord]) -> dict[str, float]:
        if not records:
            return {"accuracy": float("nan"), "videos": 0}
        self.model.eval()
        correct = 0
        for rec in records:
            x, _, _, _ = batch_of([rec], self.cfg.data, self.cfg.data.eval_clips, None)
            logits = self.model(x.to(self.device)).mean(0)
            correct += int(int(logits.argmax()) == rec.label)
        return {"accuracy": correct / len(records), "videos": len(records)}

    @torch.no_grad()
    def loss_of(self, record: VideoRecord) -> float:
        """Mean loss over the evaluation clips of one video, with its label."""
        self.model.eval()
        x, _, y, _ = batch_of([record], self.cfg.data, self.cfg.data.eval_clips, None)
        return float(loss_per_sample(self.model(x.to(self.device)), y.to(self.device)).mean())

    # ---- the run ---------------------------------------------------------------------
    def fit(self, stop_after_epochs: int | None = None) -> dict[str, Any]:
        """Train to the end (or stop after that many more epochs: a run cut short, as a
        kill between epochs would leave it)."""
        cfg = self.cfg
        epochs_run = 0
        log.info("train: %d train / %d test videos, %d classes, mode %s, σ=%.3f, q=%.3f, "
                 "%d steps", len(self.train), len(self.test), len(self.labels),
                 cfg.privacy.mode, self.sigma, self.sample_rate, self.total_steps)
        while self.step < self.total_steps:
            if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
                break
            epochs_run += 1
            started = time.perf_counter()
            losses = [self.train_step()["loss"]
                      for _ in range(min(self.steps_per_epoch, self.total_steps - self.step))]
            epoch = self.step // self.steps_per_epoch
            row = {"epoch": epoch, "step": self.step,
                   "loss": float(np.nanmean(losses)) if losses else float("nan"),
                   "train_accuracy": self.evaluate(self.train)["accuracy"],
                   "test_accuracy": self.evaluate(self.test)["accuracy"],
                   "epsilon": self.epsilon(), "delta": self.delta,
                   "seconds": round(time.perf_counter() - started, 2)}
            self.history.append(row)
            if self.rank == 0:
                _atomic_save(self._state(), self.checkpoint_path)
                _atomic_json(self.summary(), self.out / "metrics.json")
            if self.world > 1:
                torch.distributed.barrier()
            log.info("epoch %d: loss %.3f, test accuracy %.3f, ε %s", epoch, row["loss"],
                     row["test_accuracy"], row["epsilon"])
        out = self.summary()
        if self.rank == 0 and epochs_run == 0:
            # A kill between the last checkpoint.pt and its metrics.json leaves the metrics
            # an epoch behind; a resume with no step left must still bring them up to date.
            _atomic_json(out, self.out / "metrics.json")
        return out

    def summary(self) -> dict[str, Any]:
        p = self.cfg.privacy
        return {"mode": p.mode, "arch": self.cfg.model.arch, "labels": self.labels,
                "train_videos": len(self.train), "test_videos": len(self.test),
                "sample_rate": self.sample_rate, "noise_multiplier": self.sigma,
                "clip": p.clip, "delta": self.delta, "accountant": p.accountant,
                "target_epsilon": p.epsilon if p.mode != "none" else None,
                "epsilon": self.epsilon(), "steps": self.step, "total_steps": self.total_steps,
                "epochs": self.history}
