"""Artifact store: one folder per stage, one entry (folder) per video.

    WORKDIR/<stage>/<video id>/          the finished artifact: files + meta.json
    WORKDIR/<stage>/.failed/<id>.json    the last failure of that stage on that video
    WORKDIR/.tmp/                         entries being written

An entry is built in `.tmp` and renamed into place, so a crash never leaves a
half-written entry that looks finished; `meta.json` holds the fingerprint it was made
with, the stage version and the stage's summary.
"""

from __future__ import annotations

import errno
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

# errnos that mean "this folder cannot take more files" rather than "this video is bad".
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                  errno.ENOTDIR, errno.EFBIG}


class StorageError(OSError):
    """The workdir or output folder cannot be written (disk full, read-only, not a
    folder). Not a per-video failure: the run stops; finished artifacts stay intact."""


def storage_problem(exc: BaseException, roots: tuple[Path, ...]) -> str | None:
    """A readable message when `exc` (or an exception it was raised from) is a storage
    problem: a disk-full error anywhere, or another write error on a path inside one of
    `roots`. None otherwise (e.g. an unreadable input is a per-video failure)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in STORAGE_ERRNOS:
            where = cur.filename
            inside = where is not None and any(
                _is_within(Path(str(where)), Path(r)) for r in roots)
            if cur.errno in (errno.ENOSPC, errno.EDQUOT) or inside:
                folder = Path(str(where)).parent if where is not None else None
                text = os.strerror(cur.errno) if cur.errno else str(cur)
                return f"cannot write {folder if folder else 'the workdir'}: {text}"
        cur = cur.__cause__ or cur.__context__
    return None


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(Path(root).resolve())
    except (ValueError, OSError):
        return False
    return True


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
        tmp = self.tmp_root / f"{stage}-{uuid.uuid4().hex}"
        try:
            tmp.mkdir(parents=True)
        except OSError as exc:
            raise StorageError(exc.errno, f"cannot create a folder in {self.tmp_root}: "
                               f"{exc.strerror or exc}", str(self.tmp_root)) from exc
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
