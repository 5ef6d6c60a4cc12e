"""train: the `train` stage of `avatarize run`, a dataset-level job after export.

Per video there is nothing to do; after every video went through export, `finish` trains
the configured recognizer on the exported dataset when `train.enabled` is true (and
resumes a run cut short). `avatarize train` runs the same job on its own.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.stage import Resources, Stage, VideoJob
from training.trainer import TrainConfig

log = logging.getLogger(__name__)


class TrainStage(Stage):
    name = "train"
    version = "1"
    requires = ("export",)
    config_model = TrainConfig
    resources = Resources(cpus=1.0)

    def process(self, job: VideoJob) -> dict[str, Any]:
        return {}

    def finish(self, runner: Any, report: Any) -> None:
        if not self.config.enabled:
            return
        from training.run import train

        summary = train(runner.config)
        log.info("train: %s model in %s, ε %s", summary["mode"], summary["run_folder"],
                 summary["epsilon"])
