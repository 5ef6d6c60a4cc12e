"""`make bench`: memory against video length, and frames per second per stage.

Generates long videos of one person (stages/sample_data.py, cached in the scratch folder),
runs `avatarize run` on each in a child process, exactly as a user would (every stage in
one process, default config), and samples the child's resident memory (VmRSS of it and its
children, every `--interval` seconds). Each sample is attributed to the stage running at
that moment: the first stage, in graph order, whose artifact for the video is not written
yet. The child's peak from the kernel (wait4's ru_maxrss) is the authoritative figure;
the samples say which stage reached it and whether memory grows as the video goes on
(the largest sample in the first and in the last quarter of each stage's run).

Results: bench/results/memory.json and memory.md. The claim checked: peak resident memory
does not grow with video length and stays under 3 GB for a 10-minute video on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from pipeline.bench import bench_env, write_results

REPO = Path(__file__).resolve().parents[1]
STAGES = ("detect", "fit", "motion", "render", "inpaint", "harmonize", "export")
LIMIT_MB = 3 * 1024


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (MB), 0 once it is gone."""
    total, stack, seen = 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines()
                          if line.startswith("VmRSS:"))
            for task in Path(f"/proc/{p}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, StopIteration, ValueError):
            continue
    return total / 1024


def current_stage(workdir: Path, video_id: str) -> str:
    for stage in STAGES:
        if not (workdir / stage / video_id / "meta.json").is_file():
            return stage
    return "done"


def long_video(scratch: Path, minutes: float, fps: int, width: int, height: int) -> Path:
    """The generated video folder (one video), made once per size and length."""
    from stages.sample_data import generate_sample

    frames = round(minutes * 60 * fps)
    folder = scratch / f"long-{frames}f-{fps}fps-{width}x{height}"
    if not (folder / "manifest.csv").is_file():
        generate_sample(folder, videos=1, seed=0, width=width, height=height, frames=frames,
                        fps=fps, progress=False)
    return folder


def profile_run(input_dir: Path, root: Path, interval: float, overrides: list[str]) -> dict:
    """Run the pipeline on the one video in input_dir; memory samples per stage."""
    from pipeline.dataset import discover
    from pipeline.video import count_frames, probe

    (video,) = discover(input_dir)
    work, out = root / "work", root / "out"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--config", str(REPO / "pipeline.yaml"),
           "--input", str(input_dir), "--output", str(out), "--workdir", str(work),
           "--no-progress", "--stage", "export"]
    for kv in overrides:
        cmd += ["--set", kv]
    samples: list[tuple[float, str, float]] = []
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
    reader.start()
    rusage = None
    while rusage is None:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            rusage, proc.returncode = usage, os.waitstatus_to_exitcode(status)
            break
        samples.append((time.perf_counter() - started, current_stage(work, video.id),
                        tree_rss_mb(proc.pid)))
        time.sleep(interval)
    wall = time.perf_counter() - started
    reader.join(timeout=5)
    stages = {}
    for stage in STAGES:
        rss = [r for _, s, r in samples if s == stage]
        meta_path = work / stage / video.id / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        row: dict = {"seconds": meta.get("seconds"), "frames": meta.get("frames")}
        if meta.get("seconds") and meta.get("frames"):
            row["fps"] = round(meta["frames"] / meta["seconds"], 2)
        if rss:
            q = max(1, len(rss) // 4)
            row.update(peak_rss_mb=round(max(rss)), first_quarter_mb=round(max(rss[:q])),
                       last_quarter_mb=round(max(rss[-q:])), samples=len(rss))
        stages[stage] = row
    info = probe(video.path)
    frames = count_frames(video.path)
    return {
        "video": video.id, "width": info.width, "height": info.height,
        "fps": round(float(info.fps), 3), "frames": frames,
        "minutes": round(frames / float(info.fps) / 60, 2),
        "exit_code": proc.returncode, "log_tail": "".join(log[-20:]),
        "wall_seconds": round(wall, 1), "pipeline_fps": round(frames / wall, 2),
        # Linux reports ru_maxrss in kB: the largest resident set of the child (and of any
        # descendant it waited for), whatever the sampling missed.
        "peak_rss_mb": round(rusage.ru_maxrss / 1024),
        "stages": stages,
    }


def to_markdown(runs: list[dict], env: dict) -> str:
    lines = [f"# avatarize memory and speed by video length ({env['machine']}, "
             f"{env['cpus']} CPUs, {env['device']})", "",
             "Whole pipeline (`avatarize run`, default config) in one process per video; peak "
             "resident memory of that process (ru_maxrss) and per stage the largest sampled "
             "resident memory, in its first and last quarter.", ""]
    for r in runs:
        ok = "ok" if r["exit_code"] == 0 else f"exit {r['exit_code']}"
        lines += [f"## {r['minutes']} min: {r['frames']} frames, {r['width']}x{r['height']} at "
                  f"{r['fps']} fps ({ok}): peak {r['peak_rss_mb']} MB, "
                  f"{r['wall_seconds']} s, {r['pipeline_fps']} frames/s", "",
                  "| stage | frames/s | seconds | peak RSS MB | first quarter MB | "
                  "last quarter MB |", "|---|---|---|---|---|---|"]
        for stage, s in r["stages"].items():
            lines.append(f"| {stage} | {s.get('fps')} | {s.get('seconds')} | "
                         f"{s.get('peak_rss_mb')} | {s.get('first_quarter_mb')} | "
                         f"{s.get('last_quarter_mb')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "bench/results")
    p.add_argument("--scratch", type=Path, default=REPO / "work/bench")
    p.add_argument("--minutes", default="1,10",
                   help="comma-separated video lengths in minutes (default 1,10)")
    p.add_argument("--fps", type=int, default=12)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for minutes in (float(m) for m in args.minutes.split(",")):
        folder = long_video(args.scratch, minutes, args.fps, args.width, args.height)
        run = profile_run(folder, args.scratch / f"{folder.name}-run", args.interval, args.set)
        runs.append(run)
        print(f"{minutes} min: peak {run['peak_rss_mb']} MB, {run['wall_seconds']} s, "
              f"exit {run['exit_code']}", flush=True)
    env = bench_env(limit_mb=LIMIT_MB)
    write_results(args.out, "memory", {"env": env, "runs": runs}, to_markdown(runs, env))
    return 0 if all(r["exit_code"] == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
