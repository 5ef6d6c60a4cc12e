"""Stage graph, fingerprints, what is stale, resume.

A stage's fingerprint for a video hashes its name and version, its config section, the
run settings it declares, and the fingerprints of the stages it reads (for a first stage:
the source file's path, size and modification time). An entry whose stored fingerprint
equals the expected one is done; anything else is stale or missing and is recomputed.
Because upstream fingerprints are part of it, a changed stage makes everything
downstream stale.

Stages run one after the other, each over all videos that need it (models load once per
stage and worker); an executor (pipeline/executors) computes a stage's videos, in this
process or on Ray, and the runner keeps the books (fingerprints, failures, the summary), so
they are the same under every executor. A video that fails is recorded with its reason and
the others go on; one that raised an unexpected error (or whose worker died) is retried
`run.retries` times first. A storage problem (disk full, unwritable workdir) stops the run
with StorageError; finished artifacts stay intact.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError, fingerprint_of
from pipeline.dataset import VideoItem
from pipeline.executors import Executor, StageTask, TaskResult
from pipeline.executors.local import LocalExecutor
from pipeline.memory import release_freed_memory
from pipeline.stage import Stage
from pipeline.store import ArtifactStore, StorageError, storage_problem

log = logging.getLogger("avatarize")


@dataclass
class VideoOutcome:
    video: VideoItem
    status: str = "ok"  # ok | failed
    failed_stage: str | None = None
    reason: str | None = None
    computed: list[str] = field(default_factory=list)  # stages recomputed in this run
    reused: list[str] = field(default_factory=list)  # stages whose entry was current


@dataclass
class RunReport:
    outcomes: list[VideoOutcome]
    stages: list[str]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> list[VideoOutcome]:
        return [o for o in self.outcomes if o.status != "ok"]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def check_graph(stage_classes: Sequence[type[Stage]]) -> dict[str, type[Stage]]:
    by_name: dict[str, type[Stage]] = {}
    for cls in stage_classes:
        for dep in cls.requires:
            if dep not in by_name:
                raise ValueError(f"stage {cls.name} requires {dep}, which is not before it")
        by_name[cls.name] = cls
    return by_name


def source_identity(video: VideoItem) -> str:
    try:
        st = video.path.stat()
        return f"{video.rel_path}:{st.st_size}:{st.st_mtime_ns}"
    except OSError as exc:
        return f"{video.rel_path}:unreadable:{exc.__class__.__name__}"


class Runner:
    def __init__(self, config: Config, stage_classes: Sequence[type[Stage]],
                 executor: Executor | None = None):
        self.config = config
        self.executor: Executor = executor if executor is not None else LocalExecutor()
        self.classes = check_graph(stage_classes)
        self.order = [cls.name for cls in stage_classes]
        self.store = ArtifactStore(config.run.workdir)
        self._fp_cache: dict[tuple[str, str], str] = {}

    # ---- fingerprints -------------------------------------------------------------
    def expected_fingerprint(self, stage: str, video: VideoItem) -> str:
        key = (stage, video.id)
        if key in self._fp_cache:
            return self._fp_cache[key]
        cls = self.classes[stage]
        run = self.config.run
        parts: dict[str, Any] = {
            "stage": stage,
            "version": cls.version,
            "config": fingerprint_of(self.config.section(stage)),
            "run": {k: str(getattr(run, k)) for k in cls.fingerprint_run_keys},
            "upstream": {d: self.expected_fingerprint(d, video) for d in cls.requires},
        }
        if cls.shared_sections:
            parts["shared"] = {s: fingerprint_of(self.config.section(s))
                               for s in cls.shared_sections}
        if not cls.requires:
            parts["source"] = source_identity(video)
        fp = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]
        self._fp_cache[key] = fp
        return fp

    def instance(self, name: str) -> Stage:
        """A stage object with its own config section and the shared sections it reads."""
        cls = self.classes[name]
        shared = {s: self.config.section(s) for s in cls.shared_sections}
        return cls(self.config.section(name), self.config.run, shared)

    def closure(self, selected: Sequence[str] | None) -> list[str]:
        """The selected stages and everything upstream of them, in graph order."""
        if not selected:
            return list(self.order)
        unknown = [s for s in selected if s not in self.classes]
        if unknown:
            raise ConfigError(
                f"--stage {unknown[0]}: unknown stage (known: {', '.join(self.order)})"
            )
        needed: set[str] = set()
        stack = list(selected)
        while stack:
            s = stack.pop()
            if s not in needed:
                needed.add(s)
                stack.extend(self.classes[s].requires)
        return [s for s in self.order if s in needed]

    def entry_state(self, stage: str, video: VideoItem, instance: Stage | None = None) -> str:
        """done | stale | failed | missing, as seen from the current config."""
        fp = self.expected_fingerprint(stage, video)
        entry = self.store.get(stage, video.id)
        if entry is not None and entry.fingerprint == fp:
            if instance is not None and not instance.outputs_exist(video, entry.summary):
                return "stale"
            return "done"
        failure = self.store.get_failure(stage, video.id)
        if failure is not None and failure.get("fingerprint") == fp:
            return "failed"
        return "stale" if entry is not None else "missing"

    # ---- running ------------------------------------------------------------------
    def run(
        self,
        videos: Sequence[VideoItem],
        selected: Sequence[str] | None = None,
        force: bool = False,
    ) -> RunReport:
        stages = self.closure(selected)
        forced = set(selected or self.order) if force else set()
        self.store.clean_tmp()
        outcomes = {v.id: VideoOutcome(v) for v in videos}
        report = RunReport(list(outcomes.values()), stages)
        retries = self.config.run.retries
        for name in stages:
            instance = self.instance(name)
            started = time.perf_counter()
            tasks: list[StageTask] = []
            for video in videos:
                outcome = outcomes[video.id]
                if outcome.status != "ok":
                    continue
                if name not in forced and self.entry_state(name, video, instance) == "done":
                    outcome.reused.append(name)
                    continue
                task = self._task(name, video, outcome)
                if task is not None:
                    tasks.append(task)
            fps = {t.video.id: t.fingerprint for t in tasks}

            def on_result(result: TaskResult, name: str = name,
                          fps: dict[str, str] = fps) -> None:
                self._record(name, fps[result.video_id], outcomes[result.video_id], result)

            self.executor.run_stage(instance, tasks, self.store, retries, on_result)
            instance.finish(self, report)
            self.executor.end_stage(instance)
            # The next stage would otherwise start on this one's heap fragments.
            release_freed_memory()
            report.seconds[name] = time.perf_counter() - started
        return report

    def _task(self, name: str, video: VideoItem, outcome: VideoOutcome) -> StageTask | None:
        inputs: dict[str, Path] = {}
        upstream: dict[str, dict[str, Any]] = {}
        fp = self.expected_fingerprint(name, video)
        for dep in self.classes[name].requires:
            entry = self.store.get(dep, video.id)
            if entry is None:
                # Only reachable when an upstream entry vanished mid-run.
                outcome.status, outcome.failed_stage = "failed", name
                outcome.reason = f"{dep} artifact missing"
                return None
            inputs[dep] = entry.path
            upstream[dep] = entry.summary
        return StageTask(video=video, fingerprint=fp, inputs=inputs, upstream=upstream)

    def _record(self, stage: str, fp: str, outcome: VideoOutcome, result: TaskResult) -> None:
        """The runner's bookkeeping of one finished task, whichever executor ran it."""
        if result.status == "ok":
            outcome.computed.append(stage)
            return
        if result.status == "storage":
            raise StorageError(errno.EIO, f"{stage} on {outcome.video.id}: {result.reason}")
        reason = result.reason or "unknown error"
        if result.status == "error" and result.attempts > 1:
            reason = f"{reason} (after {result.attempts} attempts)"
        self._fail(stage, outcome.video, fp, outcome, reason)

    def _fail(self, stage: str, video: VideoItem, fp: str, outcome: VideoOutcome,
              reason: str) -> None:
        log.warning("%s: %s failed: %s", video.rel_path, stage, reason)
        try:
            self.store.record_failure(stage, video.id, fp, reason)
        except OSError as exc:
            problem = storage_problem(exc, (self.store.root,)) or str(exc)
            raise StorageError(exc.errno, problem) from exc
        outcome.status, outcome.failed_stage, outcome.reason = "failed", stage, reason

    # ---- status -------------------------------------------------------------------
    def status(self, videos: Sequence[VideoItem]) -> dict[str, dict[str, int]]:
        table: dict[str, dict[str, int]] = {}
        for name in self.order:
            counts = {"done": 0, "stale": 0, "failed": 0, "missing": 0}
            instance = self.instance(name)
            for video in videos:
                counts[self.entry_state(name, video, instance)] += 1
            table[name] = counts
        return table
