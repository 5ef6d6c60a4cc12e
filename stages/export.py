"""export: the anonymized dataset, in formats anyone can open.

For a video with id `a/b` it writes, into the output folder:
    a/b.mp4           the anonymized video (H.264, the input's fps, size and frame count)
    a/b.mask.mp4      the sensitivity mask (white = real background, black = synthesized)
    a/b.json          persons, per-frame fit error, stage versions, notes
    a/b.preview.mp4   with export.preview=true: original | anonymized side by side
and, after all videos, dataset.json: every video, its label and split, status and reason.
Each file is written under a temporary name and renamed, so a killed run never leaves a
half-written video that looks finished; the temporary files of a killed export are removed
at the end of the next export (`sweep_orphaned_tmp`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from pipeline.config import Section
from pipeline.dataset import VideoItem
from pipeline.stage import Stage, VideoJob
from pipeline.store import write_json_atomic
from pipeline.video import VideoWriter, iter_chunks, iter_frames

log = logging.getLogger(__name__)

MASK_SUFFIX = ".mask.mp4"
PREVIEW_SUFFIX = ".preview.mp4"


class ExportConfig(Section):
    crf: int = Field(18, ge=0, le=51, description="H.264 quality of the anonymized video")
    mask_crf: int = Field(10, ge=0, le=51, description="H.264 quality of the mask video")
    preview: bool = Field(False, description="also write original | anonymized side by side")


def _replace_into(tmp: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)


def _tmp_for(final: Path) -> Path:
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp{final.suffix}")


# What _tmp_for and write_json_atomic name their files; nothing else in an output folder
# looks like this (hidden, a hex stamp, then .tmp).
_TMP_NAME = re.compile(r"^\..+\.([0-9a-f]{8}\.tmp\.[A-Za-z0-9]+|[0-9a-f]{32}\.tmp)$")


def sweep_orphaned_tmp(output: Path, video_ids: list[str]) -> list[Path]:
    """Delete the temporary files a killed export left in the output folders of these
    videos (a SIGKILLed process or a dead Ray worker never runs its cleanup). Only called
    when no export task is in flight. Returns what was deleted."""
    removed = []
    folders = {output} | {(output / vid).parent for vid in video_ids}
    for folder in sorted(folders):
        if not folder.is_dir():
            continue
        for f in folder.iterdir():
            if _TMP_NAME.match(f.name) and f.is_file():
                f.unlink(missing_ok=True)
                removed.append(f)
    return removed


class ExportStage(Stage):
    name = "export"
    version = "1"
    requires = ("detect", "fit", "render", "inpaint", "harmonize")
    config_model = ExportConfig
    fingerprint_run_keys = ("output",)

    def paths(self, video: VideoItem) -> dict[str, Path]:
        base = self.run.output / video.id
        return {
            "video": base.with_name(base.name + ".mp4"),
            "mask": base.with_name(base.name + MASK_SUFFIX),
            "meta": base.with_name(base.name + ".json"),
            "preview": base.with_name(base.name + PREVIEW_SUFFIX),
        }

    def outputs_exist(self, video: VideoItem, summary: dict[str, Any]) -> bool:
        p = self.paths(video)
        needed = [p["video"], p["mask"], p["meta"]]
        if self.config.preview:
            needed.append(p["preview"])
        return all(x.is_file() for x in needed)

    def process(self, job: VideoJob) -> dict[str, Any]:
        cfg: ExportConfig = self.config  # type: ignore[assignment]
        info = job.upstream["detect"]["video"]
        fps = Fraction(info["fps_num"], info["fps_den"])
        w, h, total = info["width"], info["height"], info["frame_count"]
        paths = self.paths(job.video)
        paths["video"].parent.mkdir(parents=True, exist_ok=True)
        harm = job.inputs["harmonize"]

        tmp_video, tmp_mask = _tmp_for(paths["video"]), _tmp_for(paths["mask"])
        tmp_preview = _tmp_for(paths["preview"]) if cfg.preview else None
        written = 0
        try:
            with VideoWriter(tmp_video, fps, w, h, "h264", crf=cfg.crf) as out, \
                    VideoWriter(tmp_mask, fps, w, h, "h264", crf=cfg.mask_crf) as mask_out:
                preview = VideoWriter(tmp_preview, fps, 2 * w, h, "h264", crf=23) \
                    if tmp_preview else None
                originals = iter_chunks(job.video.path, job.run.chunk_frames) if preview else None
                for chunk in iter_chunks(harm / "composite.mkv", job.run.chunk_frames):
                    out.write_chunk(chunk)
                    if preview is not None and originals is not None:
                        orig = next(originals)
                        preview.write_chunk(np.concatenate([orig[: len(chunk)], chunk], axis=2))
                    written += len(chunk)
                    job.advance(len(chunk))
                for frame in iter_frames(harm / "sensitivity.mkv", "gray"):
                    mask_out.write(frame)
                if preview is not None:
                    preview.close()
            if written != total:
                raise RuntimeError(f"composite has {written} frames, the source {total}")
            meta = self._metadata(job, written, fps)
            _replace_into(tmp_video, paths["video"])
            _replace_into(tmp_mask, paths["mask"])
            if tmp_preview is not None:
                _replace_into(tmp_preview, paths["preview"])
            write_json_atomic(paths["meta"], meta)
        finally:
            for tmp in (tmp_video, tmp_mask, tmp_preview):
                if tmp is not None and tmp.exists():
                    tmp.unlink()
        return {
            "frames": written,
            "outputs": {k: str(v) for k, v in paths.items() if k != "preview" or cfg.preview},
            "notes": meta["notes"],
        }

    def _metadata(self, job: VideoJob, frames: int, fps: Fraction) -> dict[str, Any]:
        info = job.upstream["detect"]["video"]
        bodies = np.load(job.inputs["fit"] / "bodies.npz")
        identities_path = job.inputs["render"] / "identities.json"
        identities = json.loads(identities_path.read_text()) if identities_path.is_file() else []
        by_track = {int(i.get("track_id", -1)): i for i in identities} \
            if isinstance(identities, list) else {}
        present = bodies["present"]
        err = bodies["fit_error"]
        persons = []
        for p, tid in enumerate(bodies["track_ids"].tolist()):
            frames_present = np.flatnonzero(present[:, p])
            persons.append({
                "track_id": int(tid),
                "frames": int(len(frames_present)),
                "first_frame": int(frames_present[0]) if len(frames_present) else None,
                "last_frame": int(frames_present[-1]) if len(frames_present) else None,
                "mean_fit_error_px": _nanmean(err[:, p]),
                "avatar": by_track.get(int(tid)),
            })
        per_frame = [_nanmean(row) for row in err] if err.size else [None] * frames
        notes: list[str] = []
        for stage in self.requires:
            notes.extend(job.upstream.get(stage, {}).get("notes", []))
        stages = {}
        for stage in self.requires:
            meta_path = job.inputs[stage] / "meta.json"
            m = json.loads(meta_path.read_text())
            stages[stage] = {"version": m["version"], "fingerprint": m["fingerprint"]}
        return {
            "video": job.video.id,
            "source": job.video.rel_path,
            "label": job.video.label,
            "split": job.video.split,
            "width": info["width"],
            "height": info["height"],
            "fps": float(fps),
            "fps_fraction": f"{fps.numerator}/{fps.denominator}",
            "frames": frames,
            "persons": persons,
            "fit_error_px": per_frame,
            "harmonize": job.upstream.get("harmonize", {}),
            "stages": stages,
            "notes": sorted(set(notes)),
        }

    def finish(self, runner: Any, report: Any) -> None:
        """dataset.json: every video of this run, its status and, if failed, why; and no
        temporary file of a killed export left behind."""
        removed = sweep_orphaned_tmp(self.run.output, [o.video.id for o in report.outcomes])
        if removed:
            log.info("removed %d temporary files of interrupted exports", len(removed))
        videos = []
        for o in report.outcomes:
            entry = {
                "id": o.video.id,
                "source": o.video.rel_path,
                "label": o.video.label,
                "split": o.video.split,
                "status": o.status,
            }
            if o.status == "ok":
                p = self.paths(o.video)
                entry["video"] = p["video"].relative_to(self.run.output).as_posix()
                entry["mask"] = p["mask"].relative_to(self.run.output).as_posix()
                entry["meta"] = p["meta"].relative_to(self.run.output).as_posix()
                done = runner.store.get("export", o.video.id)
                if done is not None:
                    entry["notes"] = done.summary.get("notes", [])
            else:
                entry["failed_stage"] = o.failed_stage
                entry["reason"] = o.reason
            videos.append(entry)
        labels = sorted({v["label"] for v in videos if v["label"]})
        write_json_atomic(self.run.output / "dataset.json", {
            "format": "avatarize-dataset/1",
            "videos": videos,
            "labels": labels,
            "counts": {
                "total": len(videos),
                "ok": sum(v["status"] == "ok" for v in videos),
                "failed": sum(v["status"] != "ok" for v in videos),
            },
        })


def _nanmean(x: np.ndarray) -> float | None:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return round(float(x.mean()), 3) if x.size else None
