"""Artifact store: one folder per stage, one entry (folder) per video.

    WORKDIR/<stage>/<video id>/          the finished artifact: files + meta.json
    WORKDIR/<stage>/.failed/<id>.json    the last failure of that stage on that video
    WORKDIR/.tmp/                         entries being written

An entry is built in `.tmp` and renamed into place, so a crash never leaves a
half-written entry that looks finished; `meta.json` holds the fingerprint it was made
with, the stage version and the stage's summary.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

META = "meta.json"


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with tmp.open("w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass
class Entry:
    stage: str
    video_id: str
    path: Path
    meta: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return self.meta.get("fingerprint", "")

    @property
    def summary(self) -> dict[str, Any]:
        return self.meta.get("summary", {})


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp_root = self.root / ".tmp"

    def entry_dir(self, stage: str, video_id: str) -> Path:
        return self.root / stage / video_id

    def failure_path(self, stage: str, video_id: str) -> Path:
        return self.root / stage / ".failed" / f"{video_id}.json"

    def get(self, stage: str, video_id: str) -> Entry | None:
        d = self.entry_dir(stage, video_id)
        meta_path = d / META
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return Entry(stage, video_id, d, meta)

    def get_failure(self, stage: str, video_id: str) -> dict[str, Any] | None:
        p = self.failure_path(stage, video_id)
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    @contextmanager
    def writing(self, stage: str, video_id: str) -> Iterator[Path]:
        """Yield an empty temporary folder; on normal exit it replaces the entry."""
        self.tmp_root.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_root / f"{stage}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if not (tmp / META).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"{stage}/{video_id}: entry written without {META}")
        final = self.entry_dir(stage, video_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        old = None
        if final.exists():
            old = self.tmp_root / f"old-{stage}-{uuid.uuid4().hex}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.clear_failure(stage, video_id)

    def record_failure(self, stage: str, video_id: str, fingerprint: str, reason: str) -> None:
        write_json_atomic(
            self.failure_path(stage, video_id),
            {"stage": stage, "video": video_id, "fingerprint": fingerprint, "reason": reason},
        )

    def clear_failure(self, stage: str, video_id: str) -> None:
        p = self.failure_path(stage, video_id)
        if p.exists():
            p.unlink()

    def remove(self, stage: str, video_id: str) -> None:
        d = self.entry_dir(stage, video_id)
        if d.exists():
            shutil.rmtree(d)

    def clean_tmp(self) -> None:
        """Leftovers of a killed run are never finished entries: drop them."""
        if self.tmp_root.exists():
            shutil.rmtree(self.tmp_root, ignore_errors=True)
