"""The privacy report: every anonymization method side by side (PRIVACY_EVAL.md section 3).

For each method (the original videos, blurred people, blacked-out people, avatars,
avatars with motion anonymization, the tubelet anonymizer, ...):
- the appearance attack (privacy.video_attack): a fresh ensemble trained on the method's
  training videos, tested on its test videos; per target (identity, gender, age group,
  skin tone, build, and the action as utility) the best architecture's accuracy, every
  architecture's, and chance; cMAP / F1 over the private attributes;
- the motion attack (privacy.motion_attack) where the method has joint sequences (a
  pipeline workdir: render/ avatar joints, the motion the output shows, where render wrote
  them; else motion/ joints when the motion stage ran enabled, else fit/; or the
  generator's ground truth): identity and gender accuracy against chance;
- the action accuracy of a recognizer trained by `avatarize train` where its run folder is
  given (metrics.json: the last epoch's test accuracy; evaluation.json when present), and
  ε, δ from that run's accountant when it was trained with DP;
- residual person fraction and motion fidelity on the real videos (../shared/data), read
  from a `make bench` results folder (bench/results/pipeline.json and bodies.json: the
  avatar pipeline's run on those videos); they are not recomputed here, and the report
  names the folder they came from.
The data size (videos per split, people, actions, frames, resolution) comes from the
original dataset.

One JSON (`privacy_report.json`) and one Markdown table (`privacy_report.md`) are written.
A method whose attack fails is recorded with its reason and the others go on; bad input
(a missing folder, a malformed NAME=DIR, a method with no labelled video) is a ConfigError
naming the flag.

CLI (wired into `avatarize evaluate --privacy`, see `add_privacy_args`):
    avatarize evaluate --privacy --original ORIG --method blur=B --method avatars=OUT
        [--motion avatars=WORKDIR] [--train-run avatars=RUN] [--bench-results DIR]
        [--attack-set epochs=5 --attack-set motion.steps=100] [--report-out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.config import ConfigError
from privacy.labels import LabelTable, load_labels

log = logging.getLogger(__name__)

REPORT_JSON = "privacy_report.json"
REPORT_MD = "privacy_report.md"
MOTION_SOURCES = ("fit", "motion", "render", "gt")
DEFAULT_MOTION = {"steps": 300, "batch": 32, "lr": 3e-3, "width": None, "seed": 0,
                  "archs": ["tcn", "stgcn"], "targets": ["identity", "gender"],
                  "frames": 64, "scale_normalize": False}


@dataclass
class MethodSpec:
    """One row of the report. `motion`: a pipeline workdir with joints (or None);
    `motion_source`: fit, motion, render, gt or auto (render/ avatar joints where render
    wrote them, else motion/ where the motion stage ran enabled, else fit/);
    `train_run`: an `avatarize train` run folder (metrics.json); `bench`: a `make bench`
    results folder for the real-video residual and fidelity."""

    name: str
    dataset: Path
    motion: Path | None = None
    motion_source: str = "auto"
    train_run: Path | None = None
    bench: Path | None = None


# ---- parsing NAME=VALUE flags ----------------------------------------------------------

def _name_value(flag: str, text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"{flag} {text!r}: expected NAME=VALUE, e.g. {flag} blur=/data/blur")
    name, value = (s.strip() for s in text.split("=", 1))
    if not name or not value:
        raise ConfigError(f"{flag} {text!r}: both NAME and VALUE are needed (NAME=VALUE)")
    return name, value


def _folder(flag: str, text: str, value: str | Path) -> Path:
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{flag} {text}: {path} is not a folder")
    return path


def parse_methods(original: Path, methods: list[str] | None, motion: list[str] | None,
                  train_runs: list[str] | None, bench: list[str] | None,
                  include_original: bool = True) -> list[MethodSpec]:
    """MethodSpecs from the CLI's repeatable flags (see add_privacy_args)."""
    specs: dict[str, MethodSpec] = {}
    if include_original:
        specs["original"] = MethodSpec("original", Path(original))
    for text in methods or []:
        name, value = _name_value("--method", text)
        if name in specs and not (name == "original" and include_original):
            raise ConfigError(f"--method {text}: method {name!r} given twice")
        specs[name] = MethodSpec(name, _folder("--method", text, value))

    def target(flag: str, text: str) -> tuple[MethodSpec, str]:
        name, value = _name_value(flag, text)
        if name not in specs:
            raise ConfigError(f"{flag} {text}: no method named {name!r} (methods: "
                              f"{', '.join(specs)}; add it with --method {name}=DIR)")
        return specs[name], value

    for text in motion or []:
        spec, value = target("--motion", text)
        if value == "gt":
            spec.motion, spec.motion_source = None, "gt"
            continue
        source = "auto"
        for s in ("fit", "motion", "render"):
            if value.endswith(f"@{s}"):
                value, source = value[: -len(s) - 1], s
        spec.motion, spec.motion_source = _folder("--motion", text, value), source
    for text in train_runs or []:
        spec, value = target("--train-run", text)
        folder = _folder("--train-run", text, value)
        if not (folder / "metrics.json").is_file():
            raise ConfigError(f"--train-run {text}: no metrics.json in {folder} (an "
                              "`avatarize train` run folder holds one)")
        spec.train_run = folder
    for text in bench or []:
        if "=" in text:
            spec, value = target("--bench-results", text)
        elif "avatars" in specs:
            spec, value = specs["avatars"], text
        else:
            raise ConfigError(f"--bench-results {text}: name the method the bench ran "
                              f"(--bench-results NAME={text}); without a name it applies to "
                              "the method named 'avatars', and there is none")
        folder = _folder("--bench-results", text, value)
        if not any((folder / f).is_file() for f in ("pipeline.json", "bodies.json")):
            raise ConfigError(f"--bench-results {text}: neither pipeline.json nor "
                              f"bodies.json in {folder} (written by `make bench`)")
        spec.bench = folder
    return list(specs.values())


def split_overrides(items: list[str] | None) -> tuple[list[str], dict[str, Any]]:
    """--attack-set items: `motion.KEY=VALUE` configure the motion attack, the rest the
    video attack (privacy.video_attack.config_from_overrides)."""
    video, motion = [], dict(DEFAULT_MOTION)
    for text in items or []:
        if "=" not in text:
            raise ConfigError(f"--attack-set {text!r}: expected KEY=VALUE, e.g. epochs=5 or "
                              "motion.steps=100")
        key, raw = text.split("=", 1)
        key = key.strip()
        if not key.startswith("motion."):
            video.append(text)
            continue
        sub = key[len("motion."):]
        if sub not in DEFAULT_MOTION:
            raise ConfigError(f"--attack-set {text}: unknown motion key {sub!r} (known: "
                              f"{', '.join(DEFAULT_MOTION)})")
        motion[sub] = yaml.safe_load(raw) if raw.strip() else None
    return video, _check_motion(motion)


def _check_motion(m: dict[str, Any]) -> dict[str, Any]:
    from privacy.motion_models import ARCHS

    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"--attack-set motion.{key}={m[key]!r}: {why}")

    for key in ("steps", "batch", "frames", "seed"):
        if not isinstance(m[key], int) or isinstance(m[key], bool) or m[key] < (
                0 if key == "seed" else 1):
            raise bad(key, "expected a positive integer")
    if m["width"] is not None and (not isinstance(m["width"], int) or m["width"] < 1):
        raise bad("width", "expected a positive integer or null")
    if not isinstance(m["lr"], (int, float)) or m["lr"] <= 0:
        raise bad("lr", "expected a positive number")
    for key in ("archs", "targets"):
        if isinstance(m[key], str):
            m[key] = [m[key]]
        if not isinstance(m[key], list) or not m[key]:
            raise bad(key, "expected a list, e.g. [tcn, stgcn]")
    unknown = [a for a in m["archs"] if a not in ARCHS]
    if unknown:
        raise bad("archs", f"unknown {unknown}; choose from {list(ARCHS)}")
    m["scale_normalize"] = bool(m["scale_normalize"])
    return m


# ---- data size ----------------------------------------------------------------------

def data_size(original: Path, table: LabelTable) -> dict[str, Any]:
    """Videos per split, people, actions, attribute classes, frames and resolution."""
    from pipeline.dataset import discover
    from pipeline.video import VideoDecodeError, count_frames, probe

    sizes: dict[str, int] = {}
    frames: list[int] = []
    fps: set[float] = set()
    for item in discover(original):
        try:
            info = probe(item.path)
        except (VideoDecodeError, OSError) as exc:
            log.warning("%s: not probed: %s", item.path, exc)
            continue
        key = f"{info.width}x{info.height}"
        sizes[key] = sizes.get(key, 0) + 1
        n = info.frame_count if info.frame_count > 0 else count_frames(item.path)
        frames.append(int(n))
        fps.add(round(float(info.fps_num) / float(info.fps_den or 1), 3))
    classes = {k: len(v) for k, v in table.classes.items()}
    return {
        "videos": len(table.videos), "train": len(table.split("train")),
        "test": len(table.split("test")), "people": classes.get("identity"),
        "actions": list(table.actions), "attribute_classes": classes,
        "resolution": sizes, "fps": sorted(fps),
        "frames_per_video": ([min(frames), max(frames)] if frames else None),
        "frames_total": int(sum(frames)),
    }


# ---- the parts of one method's row -----------------------------------------------------

def _labelled_count(spec: MethodSpec, table: LabelTable) -> int:
    from privacy.video_data import method_index

    try:
        _, paths, _ = method_index(spec.dataset)
    except ConfigError as exc:
        raise ConfigError(f"--method {spec.name}={spec.dataset}: {exc}") from exc
    return len(set(paths) & set(table.by_id()))


def _round(x: Any, n: int = 5) -> Any:
    """Floats to `n` significant digits (δ = 1e-5 stays), non-finite to None."""
    if isinstance(x, float):
        return float(f"{x:.{n}g}") if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _round(v, n) for k, v in x.items()}
    if isinstance(x, list):
        return [_round(v, n) for v in x]
    return x


def video_part(spec: MethodSpec, original: Path, cfg: Any) -> dict[str, Any]:
    from privacy.video_attack import attack_videos

    report = attack_videos(spec.dataset, original, cfg)
    res = report["results"]
    attackers = {t: {k: r[k] for k in ("accuracy", "best", "chance", "classes", "per_arch",
                                       "train", "test")}
                 for t, r in res.items() if t != "action"}
    action = res.get("action")
    return {
        "action": ({"accuracy": action["accuracy"], "best": action["best"],
                    "chance": action["chance"], "per_arch": action["per_arch"]}
                   if action else None),
        "attackers": attackers,
        "cmap_f1": report.get("cmap_f1") or None,
        "skipped": report.get("skipped", {}),
        "videos": report["data"],
        "attack_seconds": report["seconds"],
    }


def motion_part(spec: MethodSpec, original: Path, table: LabelTable,
                m: dict[str, Any], threads: int = 0) -> dict[str, Any]:
    """The motion attack; `threads`: torch's CPU threads meanwhile (0: unchanged), as the
    video attack's `threads`."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _motion_attack(spec, original, table, m)
    finally:
        torch.set_num_threads(before)


def _motion_attack(spec: MethodSpec, original: Path, table: LabelTable,
                   m: dict[str, Any]) -> dict[str, Any]:
    from privacy.motion_attack import TrainConfig, attack_sets
    from privacy.motion_data import load_split

    source = spec.motion_source
    if source == "auto":
        assert spec.motion is not None
        source = _auto_motion_source(spec.motion, table)
    sets = [load_split(table, split, source, m["frames"], spec.motion, original,
                       scale=m["scale_normalize"]) for split in ("train", "test")]
    config = TrainConfig(steps=m["steps"], batch=m["batch"], lr=m["lr"], width=m["width"],
                         seed=m["seed"])
    results = attack_sets(*sets, targets=tuple(m["targets"]), archs=tuple(m["archs"]),
                          config=config)
    return {"source": source, "workdir": str(spec.motion) if spec.motion else None,
            "sequences": {"train": len(sets[0].ids), "test": len(sets[1].ids)},
            "results": results}


def _auto_motion_source(workdir: Path, table: LabelTable) -> str:
    """render (the avatars as drawn: what the output shows) where render wrote them, else
    motion where the motion stage anonymized, else fit."""
    if any((workdir / "render" / v.id / "avatar_joints.npz").is_file() for v in table.videos):
        return "render"
    return "motion" if _motion_stage_ran(workdir, table) else "fit"


def _motion_stage_ran(workdir: Path, table: LabelTable) -> bool:
    """Whether the motion stage anonymized the joints of any labelled video (its meta.json
    says enabled); a disabled stage passes fit's bodies through unchanged."""
    for v in table.videos:
        meta = workdir / "motion" / v.id / "meta.json"
        if meta.is_file():
            try:
                if (json.loads(meta.read_text()).get("summary") or {}).get("enabled"):
                    return True
            except (OSError, json.JSONDecodeError):
                continue
    return False


def train_run_part(folder: Path) -> dict[str, Any]:
    metrics = json.loads((folder / "metrics.json").read_text())
    epochs = metrics.get("epochs") or []
    last = epochs[-1] if epochs else {}
    mode = metrics.get("mode")
    out: dict[str, Any] = {
        "run": str(folder), "mode": mode, "arch": metrics.get("arch"),
        "test_accuracy": last.get("test_accuracy"),
        "train_videos": metrics.get("train_videos"), "test_videos": metrics.get("test_videos"),
        "steps": metrics.get("steps"), "total_steps": metrics.get("total_steps"),
        "epsilon": metrics.get("epsilon") if mode not in (None, "none") else None,
        "delta": metrics.get("delta") if mode not in (None, "none") else None,
        "target_epsilon": metrics.get("target_epsilon"),
        "noise_multiplier": metrics.get("noise_multiplier"),
    }
    evaluation = folder / "evaluation.json"
    if evaluation.is_file():
        ev = json.loads(evaluation.read_text())
        out["evaluation"] = {k: (ev.get(k) or {}).get("accuracy")
                             for k in ("anonymized", "original")}
    return out


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def bench_part(folder: Path) -> dict[str, Any]:
    """Residual person fraction (pipeline.json, the `real` dataset) and motion fidelity
    (bodies.json, `real`) of a `make bench` results folder: means over its real videos."""
    out: dict[str, Any] = {"source": str(folder)}
    pipeline = folder / "pipeline.json"
    if pipeline.is_file():
        results = json.loads(pipeline.read_text()).get("results", [])
        real = next((r for r in results if r.get("dataset") == "real"), None)
        if real is not None:
            rows = [v for v in real.get("videos", []) if "residual_person_fraction" in v]
            out["residual"] = {
                "videos": [v["video"] for v in rows],
                "per_video": {v["video"]: v["residual_person_fraction"] for v in rows},
                "residual_person_fraction": _mean([v["residual_person_fraction"] for v in rows]),
                "source_person_fraction": _mean([v.get("source_person_fraction") for v in rows]),
                "residual_people": _mean([v.get("residual_people") for v in rows]),
                "source_people": _mean([v.get("source_people") for v in rows]),
            }
    bodies = folder / "bodies.json"
    if bodies.is_file():
        real = json.loads(bodies.read_text()).get("real", {})
        rows = [v for v in real.get("videos", []) if v.get("pck@0.1") is not None]
        if rows:
            out["fidelity"] = {"videos": [v["video"] for v in rows],
                               "per_video": {v["video"]: v["pck@0.1"] for v in rows},
                               "pck@0.1": _mean([v["pck@0.1"] for v in rows]),
                               "coverage": _mean([v.get("coverage") for v in rows])}
        elif "skipped" in real:
            out["fidelity_skipped"] = real["skipped"]
    return out


def _attempt(what: str, name: str, fn: Any, *args: Any) -> tuple[Any, str | None]:
    try:
        return fn(*args), None
    except Exception as exc:  # one method failing must not stop the others
        log.warning("%s of %s failed: %s", what, name, exc)
        return None, f"{type(exc).__name__}: {exc}"


# ---- the report ---------------------------------------------------------------------

def build_report(original: Path, methods: list[MethodSpec | tuple],
                 overrides: list[str] | None = None, command: str | None = None,
                 ) -> dict[str, Any]:
    """Attack every method and collect the report (JSON-ready; see the module doc).

    `methods`: MethodSpecs, or tuples (name, dataset dir[, motion workdir[, train run]]);
    a motion workdir may be the string "gt" (the generator's ground-truth joints).
    `overrides`: attack config KEY=VALUE (video attack; `motion.KEY=VALUE` for the motion
    attack)."""
    from privacy.video_attack import config_from_overrides

    started, cpu0 = time.perf_counter(), time.process_time()
    original = Path(original)
    if not original.is_dir():
        raise ConfigError(f"--original {original}: not a folder")
    try:
        table = load_labels(original)
    except ConfigError as exc:
        raise ConfigError(f"--original {original}: {exc}") from exc
    specs = [_as_spec(m) for m in methods]
    if not specs:
        raise ConfigError("--method: no method to report (give --method NAME=DIR)")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"--method: method names must differ ({names})")
    for spec in specs:  # check everything before hours of attacks
        if not spec.dataset.is_dir():
            raise ConfigError(f"--method {spec.name}={spec.dataset}: not a folder")
        if _labelled_count(spec, table) == 0:
            raise ConfigError(f"--method {spec.name}={spec.dataset}: none of the "
                              f"{len(table.videos)} labelled videos of --original {original} "
                              "is in it (a method must keep the original's video ids)")
        if spec.motion is not None and not spec.motion.is_dir():
            raise ConfigError(f"--motion {spec.name}={spec.motion}: not a folder")
        if spec.train_run is not None and not (spec.train_run / "metrics.json").is_file():
            raise ConfigError(f"--train-run {spec.name}={spec.train_run}: no metrics.json")
    video_items, motion_cfg = split_overrides(overrides)
    try:
        cfg = config_from_overrides(video_items)
    except ConfigError as exc:
        raise ConfigError(f"--attack-set: {exc}") from exc

    rows: dict[str, Any] = {}
    for spec in specs:
        t0, c0 = time.perf_counter(), time.process_time()
        row: dict[str, Any] = {"dataset": str(spec.dataset), "status": "ok"}
        video, err = _attempt("video attack", spec.name, video_part, spec, original, cfg)
        if err:
            row.update(status="failed", error=err)
        else:
            row.update(video)
        if spec.motion is not None or spec.motion_source == "gt":
            part, err = _attempt("motion attack", spec.name, motion_part, spec, original,
                                 table, motion_cfg, cfg.threads)
            row["motion"] = part if err is None else {"error": err}
        if spec.train_run is not None:
            part, err = _attempt("train run", spec.name, train_run_part, spec.train_run)
            row["train_run"] = part if err is None else {"error": err}
            if part and part.get("epsilon") is not None:
                row["privacy"] = {k: part[k] for k in ("mode", "epsilon", "delta",
                                                       "target_epsilon")}
        if spec.bench is not None:
            part, err = _attempt("bench results", spec.name, bench_part, spec.bench)
            row["real_videos"] = part if err is None else {"error": err}
        row["seconds"] = {"wall": round(time.perf_counter() - t0, 1),
                          "cpu": round(time.process_time() - c0, 1)}
        rows[spec.name] = _round(row)
        log.info("privacy report: %s done in %.0f s", spec.name, row["seconds"]["wall"])
    return {
        "original": str(original),
        "command": command,
        "data": data_size(original, table),
        "attack_config": cfg.model_dump(mode="json"),
        "motion_attack_config": motion_cfg,
        "methods": rows,
        "notes": [
            "accuracy: best attacker architecture on the test split (trained fresh on the "
            "method's training split); chance: always answering the training split's most "
            "common class",
            "cMAP / F1: over the private attributes except identity (one-vs-rest), each "
            "attribute's best attacker",
            "residual / fidelity: from `make bench` results on the real videos "
            "(../shared/data), not recomputed here; absent where no bench folder was given",
        ],
        "seconds": {"wall": round(time.perf_counter() - started, 1),
                    "cpu": round(time.process_time() - cpu0, 1)},
    }


def _as_spec(m: MethodSpec | tuple) -> MethodSpec:
    if isinstance(m, MethodSpec):
        return m
    name, dataset, *rest = m
    motion = rest[0] if rest else None
    train_run = rest[1] if len(rest) > 1 else None
    spec = MethodSpec(str(name), Path(dataset))
    if motion == "gt":
        spec.motion_source = "gt"
    elif motion is not None:
        spec.motion = Path(motion)
    spec.train_run = Path(train_run) if train_run is not None else None
    return spec


# ---- Markdown ---------------------------------------------------------------------------

def _f(x: Any, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _acc(r: dict | None) -> str:
    return "—" if not r else f"{_f(r['accuracy'])} ({_f(r['chance'])})"


def _pct(x: Any) -> str:
    return "—" if x is None else f"{100 * x:.2f} %"


def to_markdown(report: dict[str, Any]) -> str:
    """One table (a row per method) plus a line with the data size and the command."""
    has_run = any("train_run" in r for r in report["methods"].values())
    head = ["method", "action acc (chance)"]
    if has_run:
        head.append("action acc, trained model")
    head += ["identity acc (chance)", "gender acc (chance)", "other attributes, best (chance)",
             "cMAP / F1", "motion identity (chance)", "motion gender (chance)",
             "residual person px (real)", "PCK@0.1 (real)", "ε (δ)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    problems = []
    for name, r in report["methods"].items():
        att = r.get("attackers") or {}
        cells = [name, _acc(r.get("action"))]
        if has_run:
            tr = r.get("train_run") or {}
            cells.append(_f(tr.get("test_accuracy")))
        others = [f"{t} {_acc(v)}" for t, v in att.items() if t not in ("identity", "gender")]
        c = (r.get("cmap_f1") or {}).get("best")
        cells += [_acc(att.get("identity")), _acc(att.get("gender")),
                  "; ".join(others) or "—",
                  f"{_f(c['cmap'])} / {_f(c['f1'])}" if c else "—"]
        motion = r.get("motion") or {}
        mres = motion.get("results") or {}
        cells += [_acc(mres.get("identity")), _acc(mres.get("gender"))]
        real = r.get("real_videos") or {}
        cells += [_pct((real.get("residual") or {}).get("residual_person_fraction")),
                  _f((real.get("fidelity") or {}).get("pck@0.1"), 3)]
        p = r.get("privacy")
        cells.append(f"{_f(p['epsilon'])} ({p['delta']:.0e})" if p else "—")
        if r.get("status") == "failed":
            cells[1] = "failed¹"
            problems.append(f"{name}: {r.get('error')}")
        for part, what in ((motion, "motion attack"), (r.get("train_run") or {}, "train run"),
                           (real, "bench results")):
            if "error" in part:
                problems.append(f"{name} {what}: {part['error']}")
        missing = (r.get("videos") or {}).get("missing_count")
        if missing:
            problems.append(f"{name}: {missing} labelled videos missing from its output")
        lines.append("| " + " | ".join(cells) + " |")
    d = report["data"]
    res = ", ".join(f"{k} ({n} videos)" if len(d["resolution"]) > 1 else k
                    for k, n in d["resolution"].items())
    fpv = d.get("frames_per_video")
    frames = "—" if not fpv else (str(fpv[0]) if fpv[0] == fpv[1] else f"{fpv[0]}-{fpv[1]}")
    cfg = report["attack_config"]
    lines += ["", f"Data: {d['videos']} videos ({d['train']} train / {d['test']} test), "
              f"{d['people']} people, {len(d['actions'])} actions ({', '.join(d['actions'])}), "
              f"{frames} frames per video ({d['frames_total']} in all) at {res}, "
              f"{'/'.join(str(x) for x in d['fps'])} fps. Attackers: "
              f"{', '.join(cfg['archs'])} (video, {cfg['clip']['frames']}x{cfg['clip']['size']}"
              f" px clips), {', '.join(report['motion_attack_config']['archs'])} (motion); "
              f"{report['seconds']['cpu']:.0f} s CPU, {report['seconds']['wall']:.0f} s wall. "
              f"Command: `{report.get('command') or 'build_report(...)'}`"]
    for name, r in report["methods"].items():
        real = r.get("real_videos") or {}
        if "source" not in real:
            continue
        res = ((real.get("residual") or {}).get("per_video") or {}).items()
        fid = ((real.get("fidelity") or {}).get("per_video") or {}).items()
        per = ([f"residual {', '.join(f'{v} {_pct(x)}' for v, x in res)}"] if res else []) + (
            [f"PCK@0.1 {', '.join(f'{v} {_f(x, 3)}' for v, x in fid)}"] if fid else [])
        lines.append(f"Residual person pixels and PCK@0.1 of {name}: means over the real "
                     f"videos (../shared/data) of the `make bench` results in {real['source']}"
                     f", not recomputed{': ' + '; '.join(per) if per else ''}.")
    lines += [f"¹ {p}" for p in problems]
    return "\n".join(lines) + "\n"


# ---- CLI ----------------------------------------------------------------------------

def add_privacy_args(parser: argparse.ArgumentParser) -> None:
    """The report's flags, added to an existing parser (`avatarize evaluate`). Their
    destinations all start with `privacy_`."""
    g = parser.add_argument_group("privacy report (evaluate --privacy)")
    g.add_argument("--original", dest="privacy_original", type=Path, metavar="DIR",
                   help="the ORIGINAL generated dataset (labels, split); also the "
                   "'original' row")
    g.add_argument("--method", dest="privacy_methods", action="append", metavar="NAME=DIR",
                   help="a method's videos: an export folder (dataset.json) or a dataset "
                   "folder (manifest.csv); repeatable")
    g.add_argument("--motion", dest="privacy_motion", action="append",
                   metavar="NAME=WORKDIR",
                   help="the method's pipeline workdir for the motion attack (render/ avatar "
                   "joints, the motion the output shows, where present; else motion/ where "
                   "the motion stage ran enabled, else fit/; force with WORKDIR@fit, "
                   "WORKDIR@motion or WORKDIR@render), or NAME=gt for the generator's true "
                   "joints; repeatable")
    g.add_argument("--train-run", dest="privacy_train_runs", action="append",
                   metavar="NAME=RUN",
                   help="an `avatarize train` run folder on the method's videos "
                   "(metrics.json: test accuracy, ε, δ); repeatable")
    g.add_argument("--bench-results", dest="privacy_bench", action="append",
                   metavar="[NAME=]DIR",
                   help="a `make bench` results folder (pipeline.json, bodies.json): "
                   "residual person fraction and PCK on the real videos for that method "
                   "(without NAME: the method 'avatars')")
    g.add_argument("--attack-set", dest="privacy_attack_set", action="append",
                   metavar="KEY=VALUE",
                   help="attack config: the video attack's keys (epochs=5, clip.size=48, "
                   "archs=[c3d,frame2d], device=cpu) and motion.KEY for the motion attack "
                   "(motion.steps=100, motion.archs=[tcn])")
    g.add_argument("--report-out", dest="privacy_report_out", type=Path,
                   default=Path("privacy_report"), metavar="DIR",
                   help="where privacy_report.json and .md go (default privacy_report/)")


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces the report (for its Markdown line)."""
    parts = ["avatarize", "evaluate", "--privacy", "--original", str(args.privacy_original)]
    for flag, dest in (("--method", "privacy_methods"), ("--motion", "privacy_motion"),
                       ("--train-run", "privacy_train_runs"),
                       ("--bench-results", "privacy_bench"),
                       ("--attack-set", "privacy_attack_set")):
        for value in getattr(args, dest, None) or []:
            parts += [flag, value]
    parts += ["--report-out", str(args.privacy_report_out)]
    return shlex.join(parts)


def cmd_privacy_report(args: argparse.Namespace) -> int:
    if getattr(args, "privacy_original", None) is None:
        raise ConfigError("--original: the original dataset is required for the privacy "
                          "report (evaluate --privacy --original DIR --method NAME=DIR ...)")
    original = Path(args.privacy_original)
    if not original.is_dir():
        raise ConfigError(f"--original {original}: not a folder")
    specs = parse_methods(original, args.privacy_methods, args.privacy_motion,
                          args.privacy_train_runs, args.privacy_bench)
    report = build_report(original, specs, args.privacy_attack_set,
                          command=command_line(args))
    out = Path(args.privacy_report_out)
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(report)
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2))
    (out / REPORT_MD).write_text(md)
    print(md)
    print(f"written: {out / REPORT_JSON}, {out / REPORT_MD}")
    return 0
