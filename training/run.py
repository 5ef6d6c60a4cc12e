"""`avatarize train` and `avatarize evaluate`: the whole-dataset jobs around Trainer.

Paths: the dataset is `train.data.dataset` or the pipeline's output (`run.output`); the
original videos (for evaluating on them) are in `run.input`; a run's folder is
`train.out` or WORKDIR/training/<privacy mode>, holding checkpoint.pt, metrics.json and,
after `evaluate`, evaluation.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config, ConfigError
from training.data import load_dataset
from training.models import build_model
from training.trainer import TrainConfig, Trainer


def train_paths(cfg: Config) -> tuple[TrainConfig, Path, Path]:
    section = cfg.section("train")
    assert isinstance(section, TrainConfig)
    dataset = section.data.dataset or cfg.run.output
    out = section.out or cfg.run.workdir / "training" / section.privacy.mode
    return section, dataset, out


def _distributed_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); False when alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = torch.distributed
    if world <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def train(cfg: Config) -> dict[str, Any]:
    section, dataset, out = train_paths(cfg)
    joined = _distributed_from_env()
    if joined and torch.cuda.is_available() and section.optim.device == "auto":
        section.optim.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    try:
        trainer = Trainer(section, dataset, out, input_root=cfg.run.input)
        summary = trainer.fit()
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"train: {exc}") from exc
    finally:
        if joined:
            torch.distributed.destroy_process_group()
    summary["run_folder"] = str(out)
    return summary


def evaluate(cfg: Config, checkpoint: Path | None) -> dict[str, Any]:
    """Test a checkpoint on the anonymized test split and on the original test videos."""
    section, dataset, out = train_paths(cfg)
    path = checkpoint or out / "checkpoint.pt"
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise ConfigError(f"evaluate: no checkpoint at {path} (train first)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    trained = TrainConfig.model_validate(state["config"])
    labels = state["labels"]
    model = build_model(trained.model, len(labels), trained.data.frames, trained.data.size)
    model.load_state_dict(state["model"])
    model.eval()
    result: dict[str, Any] = {"checkpoint": str(path), "mode": trained.privacy.mode,
                              "steps": state["step"], "labels": labels}
    history = state.get("history") or []
    result["epsilon"] = history[-1]["epsilon"] if history else None
    result["delta"] = history[-1]["delta"] if history else None
    # A stand-in trainer only for its evaluation loop (same clips, same averaging).
    probe = Trainer.__new__(Trainer)
    probe.cfg, probe.model, probe.device = trained, model, torch.device("cpu")
    for name, originals in (("anonymized", False), ("original", True)):
        if originals and not cfg.run.input.exists():
            result[name] = {"accuracy": None, "videos": 0,
                            "note": f"run.input {cfg.run.input} not found"}
            continue
        try:
            records, _ = load_dataset(dataset, trained.data, labels, cfg.run.input, originals)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"evaluate: {exc}") from exc
        result[name] = probe.evaluate([r for r in records if r.split == "test"])
    target = path.parent / "evaluation.json"
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, target)
    return result
