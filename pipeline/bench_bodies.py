"""Body fitting benchmark: 3D accuracy on the generated sample, motion fidelity on real video.

(a) The generated sample knows its people's 3D joints (<video>.gt.npz, see
    stages.sample_data): detect + fit run on it and fit's COCO-23 joints (bodies.npz) are
    compared with the truth: PA-MPJPE (Procrustes-aligned, mm), MPJPE in camera
    coordinates (mm, includes the depth the single view cannot know well) and the 2D
    reprojection error (px) of the fitted joints against the true 2D joints.
(b) Real videos from ../shared/data (linked, never copied) go through the whole pipeline;
    the detect stage then runs again on the anonymized output, and the keypoints it finds
    on the avatar are compared with those found on the original person: PCK at 0.1 of the
    person's extent, per video, over the frames where both were found (coverage: the share
    of the original's person-frames that had a match in the output).

    python -m pipeline.bench_bodies --out bench/results

Results: OUT/bodies.json and OUT/bodies.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from pipeline.bench import bench_env, write_results
from pipeline.metrics import mpjpe, nanmean, pa_mpjpe, pck, project, reprojection_error

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "videos"
DEFAULT_REAL = ("intel__asl_help.mkv", "intel__asl_walk.mkv",
                "mmaction2__S001C001P001R001A001_rgb.avi")
# BlazePose landmarks compared for motion fidelity: nose, shoulders, elbows, wrists, hips,
# knees, ankles (the face details and fingers of an avatar are not the person's anyway).
BODY_LANDMARKS = (0, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28)
MIN_VISIBILITY = 0.5  # a reference landmark counts where BlazePose is this sure of it
PCK_THRESHOLD = 0.1


def _runner(input_dir: Path, workdir: Path, output: Path, overrides: list[str]):
    from pipeline.cli import _stage_models
    from pipeline.config import load_config
    from pipeline.dataset import discover
    from pipeline.runner import Runner
    from stages import stage_classes

    cfg = load_config(REPO / "pipeline.yaml", _stage_models(), [
        f"run.input={input_dir}", f"run.output={output}", f"run.workdir={workdir}",
        "run.progress=false", *overrides])
    return Runner(cfg, stage_classes()), discover(input_dir)


def _fit_seconds(workdir: Path, vid: str) -> tuple[float, int]:
    meta = workdir / "fit" / vid / "meta.json"
    if not meta.is_file():
        return 0.0, 0
    m = json.loads(meta.read_text())
    return float(m["seconds"]), int(m.get("frames") or 0)


# ----------------------------------------------------------------------------- (a) sample


def match_track(joints3d: np.ndarray, present: np.ndarray, camera: np.ndarray,
                gt2d: np.ndarray) -> np.ndarray:
    """Per frame, the fitted track (T,) whose projection is nearest the true 2D joints
    (-1 where no track is present): the sample has one person, a spurious extra track
    must not count as the fit of that person."""
    t, p = present.shape
    if p == 0:
        return np.full(t, -1)
    err = np.stack([reprojection_error(project(joints3d[:, i], camera), gt2d)
                    for i in range(p)], 1)
    err = np.where(present & np.isfinite(err), err, np.inf)
    best = err.argmin(1)
    return np.where(np.isfinite(err.min(1)), best, -1)


def score_sample_video(bodies: Path, gt: Path) -> dict:
    with np.load(bodies) as b, np.load(gt) as g:
        joints, present, camera = b["joints3d"], b["present"], b["camera"]
        gt3d, gt2d = g["joints3d"].astype(np.float64), g["joints2d"].astype(np.float64)
    pick = match_track(joints, present, camera, gt2d)
    frames = np.flatnonzero(pick >= 0)
    pred = joints[frames, pick[frames]].astype(np.float64)
    pa = pa_mpjpe(pred, gt3d[frames])
    raw = mpjpe(pred, gt3d[frames])
    rep = reprojection_error(project(pred, camera), gt2d[frames])
    return {"frames": int(len(pick)), "fitted_frames": int(len(frames)),
            "tracks": int(present.shape[1]),
            "pa_mpjpe_mm": round(nanmean(pa), 1), "mpjpe_mm": round(nanmean(raw), 1),
            "reprojection_px": round(nanmean(rep), 2),
            "_per_frame": {"pa": pa, "mpjpe": raw, "rep": rep}}


def bench_sample(root: Path, videos: int, seed: int, overrides: list[str]) -> dict:
    from stages.sample_data import generate_sample

    sample = root / "sample"
    if not (sample / "manifest.csv").is_file():
        generate_sample(sample, videos=videos, seed=seed, progress=False)
    work = root / "sample-work"
    runner, items = _runner(sample, work, root / "sample-out", overrides)
    report = runner.run(items, selected=["fit"])
    rows, pa_all, raw_all, rep_all = [], [], [], []
    seconds = frames = 0.0
    for o in report.outcomes:
        row = {"video": o.video.id, "status": o.status}
        if o.status == "ok":
            row.update(score_sample_video(work / "fit" / o.video.id / "bodies.npz",
                                          Path(o.video.path).with_suffix(".gt.npz")))
            per = row.pop("_per_frame")
            pa_all.append(per["pa"])
            raw_all.append(per["mpjpe"])
            rep_all.append(per["rep"])
            s, f = _fit_seconds(work, o.video.id)
            seconds, frames = seconds + s, frames + f
        else:
            row["reason"] = o.reason
        rows.append(row)
    cat = (lambda xs: np.concatenate(xs) if xs else np.array([]))  # noqa: E731
    return {"input": str(sample), "videos": rows,
            "overall": {"pa_mpjpe_mm": round(nanmean(cat(pa_all)), 1),
                        "mpjpe_mm": round(nanmean(cat(raw_all)), 1),
                        "reprojection_px": round(nanmean(cat(rep_all)), 2),
                        "fit_s_per_frame": round(seconds / frames, 4) if frames else None}}


# ----------------------------------------------------------------------------- (b) real


def _landmarks(people: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(people) as npz:
        return npz["keypoints"].astype(np.float64), npz["present"].astype(bool)


def motion_fidelity(original: Path, anonymized: Path) -> dict:
    """PCK of the landmarks found on the output against those on the original. Each
    original person-frame is matched to the output person nearest to it (mean landmark
    distance); a match farther than half the person's extent counts as not found."""
    ref_kp, ref_present = _landmarks(original)
    out_kp, out_present = _landmarks(anonymized)
    t = min(len(ref_kp), len(out_kp))
    lm = list(BODY_LANDMARKS)
    scores, pairs, matched = [], 0, 0
    for f in range(t):
        for i in np.flatnonzero(ref_present[f]):
            ref = ref_kp[f, i][lm]
            vis = ref[:, 2] >= MIN_VISIBILITY
            if vis.sum() < 2:
                continue
            pairs += 1
            cands = np.flatnonzero(out_present[f]) if f < len(out_present) else []
            if len(cands) == 0:
                continue
            dists = [np.linalg.norm(out_kp[f, j][lm][vis, :2] - ref[vis, :2], axis=-1).mean()
                     for j in cands]
            j = cands[int(np.argmin(dists))]
            extent = np.ptp(ref[vis, :2], axis=0).max()
            if min(dists) > 0.5 * extent:
                continue
            matched += 1
            scores.append(float(pck(out_kp[f, j][lm][:, :2], ref[:, :2], vis,
                                    PCK_THRESHOLD)))
    return {"person_frames": pairs, "matched": matched,
            "coverage": round(matched / pairs, 3) if pairs else None,
            "pck@0.1": round(nanmean(np.array(scores)), 3) if scores else None}


def fit_fidelity(people: Path, bodies: Path) -> dict:
    """PCK of the fitted joints, projected, against the landmarks they were fitted to: how
    much of the motion the fit itself keeps (render, inpaint and the second detection
    are not in it)."""
    from stages.body import BLAZEPOSE_FOR_COCO23

    ref_kp, ref_present = _landmarks(people)
    with np.load(bodies) as b:
        joints, present, camera = b["joints3d"], b["present"], b["camera"]
    coco = [BLAZEPOSE_FOR_COCO23.index(i) for i in BODY_LANDMARKS]
    scores = []
    for f, i in zip(*np.nonzero(ref_present & present), strict=True):
        ref = ref_kp[f, i][list(BODY_LANDMARKS)]
        vis = ref[:, 2] >= MIN_VISIBILITY
        if vis.sum() >= 2:
            proj = project(joints[f, i][coco].astype(np.float64), camera)
            scores.append(float(pck(proj, ref[:, :2], vis, PCK_THRESHOLD)))
    return {"fit_pck@0.1": round(nanmean(np.array(scores)), 3) if scores else None}


def bench_real(root: Path, names: list[str], overrides: list[str]) -> dict:
    real = [REAL_DATA / n for n in names if (REAL_DATA / n).is_file()]
    if not real:
        return {"skipped": f"none of {names} in {REAL_DATA}"}
    src = root / "real-input"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    for f in real:  # links, never copies, of the shared data
        (src / f.name).symlink_to(f)
    work, out = root / "real-work", root / "real-out"
    runner, items = _runner(src, work, out, overrides)
    report = runner.run(items)
    # The anonymized outputs, detected again by the same detect stage.
    again = root / "real-again"
    shutil.rmtree(again, ignore_errors=True)
    again.mkdir()
    ok = [o for o in report.outcomes if o.status == "ok"]
    for o in ok:
        (again / f"{o.video.id}.mp4").symlink_to((out / f"{o.video.id}.mp4").resolve())
    rerun, again_items = _runner(again, root / "real-again-work", root / "real-again-out",
                                 overrides)
    rerun.run(again_items, selected=["detect"], force=True)
    rows = []
    for o in report.outcomes:
        row: dict = {"video": o.video.id, "status": o.status}
        if o.status == "ok":
            row.update(motion_fidelity(work / "detect" / o.video.id / "people.npz",
                                       root / "real-again-work" / "detect" / o.video.id
                                       / "people.npz"))
            row.update(fit_fidelity(work / "detect" / o.video.id / "people.npz",
                                    work / "fit" / o.video.id / "bodies.npz"))
            s, f = _fit_seconds(work, o.video.id)
            row["fit_s_per_frame"] = round(s / f, 4) if f else None
        else:
            row["reason"] = o.reason
        rows.append(row)
    return {"input": [str(f) for f in real], "videos": rows}


# ----------------------------------------------------------------------------- report


def to_markdown(result: dict) -> str:
    env = result["env"]
    s = result["sample"]
    lines = [f"# avatarize body-fit benchmark ({env['machine']}, {env['cpus']} CPUs, "
             f"{env['device']})", "",
             "## (a) 3D accuracy on the generated sample (known ground truth)", "",
             "| video | frames | fitted | PA-MPJPE mm | MPJPE mm | reprojection px |",
             "|---|---|---|---|---|---|"]
    for v in s["videos"]:
        lines.append(f"| {v['video']} | {v.get('frames')} | {v.get('fitted_frames')} | "
                     f"{v.get('pa_mpjpe_mm')} | {v.get('mpjpe_mm')} | "
                     f"{v.get('reprojection_px')} |")
    o = s["overall"]
    lines += [f"| **overall** | | | **{o['pa_mpjpe_mm']}** | {o['mpjpe_mm']} | "
              f"{o['reprojection_px']} |", "",
              f"fit: {o['fit_s_per_frame']} s/frame", ""]
    r = result["real"]
    lines += ["## (b) Motion fidelity on real video (keypoints on output vs original)", ""]
    if "skipped" in r:
        lines.append(f"skipped: {r['skipped']}")
    else:
        lines += ["PCK@0.1: landmarks detected on the anonymized output vs on the original, "
                  "over the person-frames matched in both (coverage). Fit PCK@0.1: the "
                  "fitted joints, projected, vs the original's landmarks (the fit alone).", "",
                  "| video | person-frames | coverage | PCK@0.1 | fit PCK@0.1 | fit s/frame |",
                  "|---|---|---|---|---|---|"]
        for v in r["videos"]:
            lines.append(f"| {v['video']} | {v.get('person_frames')} | {v.get('coverage')} | "
                         f"{v.get('pck@0.1')} | {v.get('fit_pck@0.1')} | "
                         f"{v.get('fit_s_per_frame')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "bench/results")
    p.add_argument("--scratch", type=Path, default=REPO / "work/bench-bodies")
    p.add_argument("--sample-videos", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real", nargs="*", default=list(DEFAULT_REAL),
                   help="file names in ../shared/data/videos to include")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

    args.out.mkdir(parents=True, exist_ok=True)
    args.scratch.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sample = bench_sample(args.scratch, args.sample_videos, args.seed, args.set)
    real = bench_real(args.scratch, args.real, args.set)
    env = bench_env(seconds=round(time.perf_counter() - started, 1))
    result = {"env": env, "sample": sample, "real": real}
    write_results(args.out, "bodies", result, to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
