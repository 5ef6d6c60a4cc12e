"""The stage contract.

A stage declares its name, version, the stages whose artifacts it reads, its config
section (a pydantic model) and its resources. `setup()` loads models once per worker;
`process(job)` turns one video's upstream artifacts into its own artifact folder;
`teardown()` frees what setup took. The same class runs under the local executor and
(later) as a Ray actor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pipeline.config import RunSection, Section
from pipeline.dataset import VideoItem


class VideoFailed(RuntimeError):
    """An expected per-video failure (bad input); the message is the recorded reason."""


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    gpus: float = 0.0


@dataclass
class VideoJob:
    video: VideoItem
    inputs: dict[str, Path]  # upstream stage name -> that stage's finished artifact folder
    out_dir: Path  # empty temporary folder; renamed into place when process() returns
    run: RunSection
    # Summaries returned by upstream stages' process(), by stage name.
    upstream: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Called with the number of frames just processed (drives the frame progress bar).
    advance: Callable[[int], None] = lambda n: None


class Stage:
    name: ClassVar[str]
    version: ClassVar[str] = "1"
    requires: ClassVar[tuple[str, ...]] = ()
    config_model: ClassVar[type[Section]] = Section
    resources: ClassVar[Resources] = Resources()
    # Stages whose results live outside the workdir (export) say so, so that a deleted
    # output is recomputed even when the fingerprint matches.
    writes_outside_workdir: ClassVar[bool] = False
    # `run` settings that change this stage's results (e.g. export depends on run.output).
    fingerprint_run_keys: ClassVar[tuple[str, ...]] = ()
    # Config sections shared by several stages (e.g. `body`, read by fit and render): they
    # enter this stage's fingerprint and arrive in `self.shared`.
    shared_sections: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Section, run: RunSection,
                 shared: dict[str, Section] | None = None):
        self.config = config
        self.run = run
        self.shared: dict[str, Section] = dict(shared or {})

    def setup(self) -> None:
        """Load models; called once before the first video."""

    def process(self, job: VideoJob) -> dict[str, Any]:
        """Write this stage's artifacts for one video into job.out_dir; return a small
        JSON-serializable summary (kept in the artifact's meta.json)."""
        raise NotImplementedError

    def outputs_exist(self, video: VideoItem, summary: dict[str, Any]) -> bool:
        """For stages that write outside the workdir: are the results still there?"""
        return True

    def finish(self, runner: Any, report: Any) -> None:
        """Dataset-level work after every video went through this stage (e.g. export
        writes dataset.json). Called even when no video needed recomputing."""

    def teardown(self) -> None:
        """Free what setup() took."""
