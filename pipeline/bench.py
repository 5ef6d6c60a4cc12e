"""`make bench`: per-stage seconds per frame, and what is left of the real people.

Runs the whole pipeline on the generated sample and on real videos from ../shared/data
(where present), then reads each stage's timing from its artifacts. What is left of the
real people is measured by pipeline/residual.py (segmenter pixels, people and faces found
outside the avatars, next to the same on the source). Results:
bench/results/pipeline.json and pipeline.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "videos"
DEFAULT_REAL = ("intel__asl_help.mkv", "mmaction2__demo.mp4")


def bench_env(**extra: object) -> dict:
    """The machine a benchmark ran on (what every results file starts with)."""
    import torch

    return {"machine": platform.machine(), "cpus": os.cpu_count(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, **extra}


def write_results(out: Path, name: str, payload: dict, markdown: str) -> None:
    """out/name.json and out/name.md; the Markdown is printed too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    (out / f"{name}.md").write_text(markdown)
    print(markdown)


def stage_timings(workdir: Path, stages: list[str], video_ids: list[str]) -> dict:
    out = {}
    for stage in stages:
        seconds = frames = 0.0
        for vid in video_ids:
            meta_path = workdir / stage / vid / "meta.json"
            if meta_path.is_file():
                meta = json.loads(meta_path.read_text())
                seconds += meta["seconds"]
                frames += meta.get("frames") or 0
        out[stage] = {"seconds": round(seconds, 2), "frames": int(frames),
                      "s_per_frame": round(seconds / frames, 4) if frames else None}
    return out


def bench_dataset(name: str, input_dir: Path, root: Path, overrides: list[str]) -> dict:
    from pipeline.cli import _stage_models
    from pipeline.config import load_config
    from pipeline.dataset import discover
    from pipeline.residual import residual_report
    from pipeline.runner import Runner
    from pipeline.video import count_frames, probe
    from stages import stage_classes

    work, out = root / f"{name}-work", root / f"{name}-out"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(REPO / "pipeline.yaml", _stage_models(), [
        f"run.input={input_dir}", f"run.output={out}", f"run.workdir={work}",
        "run.progress=false", *overrides])
    videos = discover(input_dir)
    runner = Runner(cfg, stage_classes())
    started = time.perf_counter()
    report = runner.run(videos)
    wall = time.perf_counter() - started
    per_video = []
    for o in report.outcomes:
        row = {"video": o.video.id, "status": o.status, "reason": o.reason}
        if o.status == "ok":
            info = probe(o.video.path)
            row.update(width=info.width, height=info.height, fps=round(float(info.fps), 3),
                       frames=count_frames(o.video.path))
            row.update(residual_report(o.video.path, out / f"{o.video.id}.mp4",
                                       work / "render" / o.video.id / "avatar.mkv"))
        per_video.append(row)
    ok_ids = [o.video.id for o in report.outcomes if o.status == "ok"]
    timings = stage_timings(work, report.stages, ok_ids)
    total_frames = sum(r.get("frames", 0) for r in per_video)
    residual = [r["residual_person_fraction"] for r in per_video if "residual_person_fraction" in r]
    return {
        "dataset": name,
        "input": str(input_dir),
        "videos": per_video,
        "stages": timings,
        "wall_seconds": round(wall, 1),
        "frames": total_frames,
        "pipeline_s_per_frame": round(wall / total_frames, 4) if total_frames else None,
        "mean_residual_person_fraction": round(float(np.mean(residual)), 5) if residual else None,
    }


def to_markdown(results: list[dict], env: dict) -> str:
    lines = [f"# avatarize pipeline benchmark ({env['machine']}, {env['cpus']} CPUs, "
             f"{env['device']})", ""]
    for r in results:
        lines += [f"## {r['dataset']}: {len(r['videos'])} videos, {r['frames']} frames, "
                  f"{r['wall_seconds']} s ({r['pipeline_s_per_frame']} s/frame)", "",
                  "| stage | s/frame | frames | seconds |", "|---|---|---|---|"]
        for stage, t in r["stages"].items():
            lines.append(f"| {stage} | {t['s_per_frame']} | {t['frames']} | {t['seconds']} |")
        lines += ["", "Residual: outside the avatars in the output (source: the whole input "
                  "frame, for scale). Person fraction: selfie segmenter pixels; people: "
                  "BlazePose detections, faces: full-range face detections, per sampled "
                  "frame (every 5th).", "",
                  "| video | size | fps | frames | status | person fraction residual / source "
                  "| people residual / source | faces residual / source |",
                  "|---|---|---|---|---|---|---|---|"]

        def pair(v: dict, key: str) -> str:
            return f"{v.get('residual_' + key)} / {v.get('source_' + key)}"

        for v in r["videos"]:
            size = f"{v.get('width')}x{v.get('height')}"
            lines.append(f"| {v['video']} | {size} | {v.get('fps')} | {v.get('frames')} | "
                         f"{v['status']} | {pair(v, 'person_fraction')} | {pair(v, 'people')} "
                         f"| {pair(v, 'faces')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "bench/results")
    p.add_argument("--scratch", type=Path, default=REPO / "work/bench")
    p.add_argument("--sample-videos", type=int, default=4)
    p.add_argument("--real", nargs="*", default=list(DEFAULT_REAL),
                   help="file names in ../shared/data/videos to include")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    from stages.sample_data import generate_sample

    args.out.mkdir(parents=True, exist_ok=True)
    args.scratch.mkdir(parents=True, exist_ok=True)
    sample = args.scratch / "sample"
    if not (sample / "manifest.csv").is_file():
        generate_sample(sample, videos=args.sample_videos, seed=0, progress=False)
    results = [bench_dataset("sample", sample, args.scratch, args.set)]
    real = [REAL_DATA / n for n in args.real if (REAL_DATA / n).is_file()]
    if real:
        real_dir = args.scratch / "real-input"
        shutil.rmtree(real_dir, ignore_errors=True)
        real_dir.mkdir()
        for f in real:  # links, never copies, of the shared data
            (real_dir / f.name).symlink_to(f)
        results.append(bench_dataset("real", real_dir, args.scratch, args.set))
    env = bench_env()
    write_results(args.out, "pipeline", {"env": env, "results": results},
                  to_markdown(results, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
