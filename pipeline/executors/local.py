"""The local executor: the stage runs in this process, one video after the other."""

from __future__ import annotations

from collections.abc import Sequence

from tqdm import tqdm

from pipeline.executors import OnResult, StageTask, run_task
from pipeline.stage import Stage
from pipeline.store import ArtifactStore


class LocalExecutor:
    name = "local"

    def __init__(self) -> None:
        self._set_up: set[int] = set()  # ids of the stage objects this executor set up

    def run_stage(self, stage: Stage, tasks: Sequence[StageTask], store: ArtifactStore,
                  retries: int, on_result: OnResult) -> None:
        if not tasks:
            return  # models load only when some video needs them
        stage.setup()
        self._set_up.add(id(stage))
        show = stage.run.progress
        bar = tqdm(tasks, desc=f"{stage.name:>9}", unit="video", disable=not show, leave=True)
        for task in bar:
            bar.set_postfix_str(task.video.id[-40:])
            frames_bar = tqdm(desc=f"{'':>9}  {task.video.id[-30:]}", unit="frame",
                              leave=False, disable=not show)
            try:
                for attempt in range(1, retries + 2):
                    result = run_task(stage, store, task, stage.run, frames_bar.update)
                    result.attempts = attempt
                    if result.status != "error":
                        break
            finally:
                frames_bar.close()
            on_result(result)
        bar.close()

    def end_stage(self, stage: Stage) -> None:
        if id(stage) in self._set_up:
            self._set_up.discard(id(stage))
            stage.teardown()

    def close(self) -> None:
        pass

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
