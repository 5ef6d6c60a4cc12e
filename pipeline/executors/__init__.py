"""Executors: "run this stage over these videos".

The runner decides what is stale, builds one `StageTask` per video that needs computing
and hands the list to an executor; the executor calls `on_result` once per task with a
`TaskResult`. Fingerprints, failure records and the run summary stay in the runner, so
they are the same whichever executor ran the stage.

    local   in this process, one video after the other (the default)
    ray     the same stage classes as Ray actors, several videos in flight (extra `ray`)

Both retry a task that raised an unexpected exception (or, under Ray, whose worker died)
up to `retries` times; a `VideoFailed` (bad input) is never retried. A storage problem
(disk full, read-only or missing folder) stops the run with `StorageError`.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline.config import ConfigError, RunSection
from pipeline.dataset import VideoItem
from pipeline.memory import release_freed_memory
from pipeline.stage import Stage, VideoFailed, VideoJob
from pipeline.store import META, ArtifactStore, StorageError, storage_problem, write_json_atomic

log = logging.getLogger("avatarize")

EXECUTORS = ("local", "ray")


@dataclass
class StageTask:
    """One video through one stage: everything a worker needs besides the stage object."""

    video: VideoItem
    fingerprint: str
    inputs: dict[str, Path]  # upstream stage -> its finished artifact folder
    upstream: dict[str, dict[str, Any]]  # upstream stage -> its summary


@dataclass
class TaskResult:
    video_id: str
    # ok | failed (VideoFailed: the input is bad, not retried) | error (exception or dead
    # worker: retried) | storage (the workdir cannot be written: the run stops)
    status: str
    reason: str | None = None
    attempts: int = 1


OnResult = Callable[[TaskResult], None]


class Executor(Protocol):
    name: str

    def run_stage(self, stage: Stage, tasks: Sequence[StageTask], store: ArtifactStore,
                  retries: int, on_result: OnResult) -> None:
        """Compute every task (setting the stage up first when there is any); call
        on_result once per task with its final result, in any order."""

    def end_stage(self, stage: Stage) -> None:
        """Free what run_stage set up (after the runner called stage.finish)."""

    def close(self) -> None:
        """Release the executor's resources (a Ray cluster it started)."""


def run_task(stage: Stage, store: ArtifactStore, task: StageTask, run: RunSection,
             advance: Callable[[int], None] | None = None) -> TaskResult:
    """Process one video and move its artifact into place atomically; never raises for
    a per-video problem (KeyboardInterrupt and SystemExit still propagate)."""
    video = task.video
    frames = [0, 0]  # processed, and at the last trim

    def counted(n: int) -> None:
        frames[0] += n
        if frames[0] - frames[1] >= run.chunk_frames:
            # As between stages (the runner), so within a long video: without it detect's
            # resident memory crept up by 100 MB over 720 frames, with it stays flat.
            frames[1] = frames[0]
            release_freed_memory(collect=False)
        if advance is not None:
            advance(n)

    started = time.perf_counter()
    try:
        with store.writing(stage.name, video.id) as tmp:
            job = VideoJob(video=video, inputs=task.inputs, out_dir=tmp, run=run,
                           upstream=task.upstream, advance=counted)
            summary = stage.process(job) or {}
            meta = {
                "stage": stage.name,
                "version": stage.version,
                "fingerprint": task.fingerprint,
                "video": video.id,
                "seconds": round(time.perf_counter() - started, 3),
                "frames": frames[0],
                "summary": summary,
            }
            write_json_atomic(tmp / META, meta)
    except VideoFailed as exc:
        return TaskResult(video.id, "failed", str(exc))
    except StorageError as exc:
        return TaskResult(video.id, "storage", str(exc))
    except Exception as exc:  # noqa: BLE001 - one video's bug must not stop the run
        problem = storage_problem(exc, (store.root, run.output))
        if problem is not None:
            return TaskResult(video.id, "storage", problem)
        log.debug("%s failed on %s:\n%s", stage.name, video.id, traceback.format_exc())
        return TaskResult(video.id, "error", f"{exc.__class__.__name__}: {exc}")
    return TaskResult(video.id, "ok")


def make_executor(name: str, ray_address: str | None = None,
                  ray_workers: int | None = None) -> Executor:
    if name == "local":
        from pipeline.executors.local import LocalExecutor

        if ray_address or ray_workers:
            raise ConfigError("--ray-address/--ray-workers: only with --executor ray")
        return LocalExecutor()
    if name == "ray":
        from pipeline.executors.ray import RayExecutor

        return RayExecutor(address=ray_address, workers=ray_workers)
    raise ConfigError(f"--executor {name}: unknown executor (known: {', '.join(EXECUTORS)})")
