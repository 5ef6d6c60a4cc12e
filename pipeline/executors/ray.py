"""The Ray executor: the same stage classes as Ray actors, several videos in flight.

Per stage, a pool of actors (each holding the stage object built with the run's config,
`setup()` once per actor, so models load once per worker) takes the stage's videos one
at a time; each actor asks Ray for the stage's declared `resources` (cpus, gpus). When
the next stage declares the same resources the actors stay and load it (their processes
have imported the common libraries already); otherwise they are replaced. Workers
write their artifacts straight into the workdir through the same atomic store as the
local executor, so the workdir must be a shared POSIX filesystem path every worker sees
(local disk for a one-machine cluster; NFS, Lustre, CephFS... across machines; object
stores such as S3 are not supported). Stages still run one after another: a stage's
`finish()` sees every video.

A task whose actor died (killed, out of memory, node lost) or that raised an unexpected
exception is retried on a fresh actor up to `retries` times, then recorded as failed.

Without an address a local Ray is started on the fly (no dashboard, no usage report, no
network); with one (`ray://host:10001` or `auto`) the run joins that cluster, whose
nodes must have avatarize installed and the workdir, input and output mounted at the
same paths.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import deque
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from pipeline.config import ConfigError, RunSection, Section
from pipeline.executors import OnResult, StageTask, TaskResult, run_task
from pipeline.stage import Resources, Stage
from pipeline.store import ArtifactStore

log = logging.getLogger("avatarize")

# Environment the stages read; forwarded to workers (a local Ray inherits it anyway).
FORWARDED_ENV = ("PYOPENGL_PLATFORM", "HF_HUB_OFFLINE", "ANNY_CACHE_DIR", "GLOG_minloglevel",
                 "TF_CPP_MIN_LOG_LEVEL")


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("--executor ray: Ray is not installed; "
                          "pip install 'avatarize[ray]'") from exc
    return ray


def start_local_ray(num_cpus: int) -> None:
    """A private one-machine Ray: no dashboard, no usage statistics, no network. Workers
    get this interpreter's import path, so stage classes import as they do here."""
    ray = _ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
    ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env},
             log_to_driver=log.isEnabledFor(logging.DEBUG), configure_logging=False)


class StageWorker:
    """What runs inside one actor: one stage object at a time, set up once. An actor that
    finished a stage can take the next one when it declares the same resources (its
    process has imported the common libraries already)."""

    def __init__(self) -> None:
        self.stage: Stage | None = None
        self.store: ArtifactStore | None = None
        self.setup_error: str | None = None

    def load(self, cls: type[Stage], config: Section, run: RunSection,
             shared: dict[str, Section]) -> None:
        self.unload()
        self.stage, self.store = cls(config, run, shared), ArtifactStore(run.workdir)
        try:
            self.stage.setup()
        except Exception as exc:
            self.setup_error = f"{exc.__class__.__name__}: {exc}"
            raise

    def process(self, task: StageTask) -> TaskResult:
        if self.stage is None or self.store is None or self.setup_error is not None:
            return TaskResult(task.video.id, "error", f"setup failed: {self.setup_error}")
        return run_task(self.stage, self.store, task, self.stage.run)

    def unload(self) -> None:
        if self.stage is not None and self.setup_error is None:
            self.stage.teardown()
        self.stage, self.store, self.setup_error = None, None, None


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None):
        ray = _ray()
        if workers is not None and workers < 1:
            raise ConfigError("--ray-workers: must be at least 1")
        self.workers = workers
        self._owns_cluster = False
        if not ray.is_initialized():
            if address:
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
                ray.init(address=address, runtime_env={"env_vars": env},
                         log_to_driver=log.isEnabledFor(logging.DEBUG),
                         configure_logging=False)
            else:
                start_local_ray(workers or os.cpu_count() or 1)
            self._owns_cluster = True
        # The actors, all asking for the same resources (those of the stage they serve);
        # a stage with other resources gets a fresh pool.
        self._pool: list[Any] = []
        self._pool_resources: Resources | None = None
        self._in_use: list[Any] = []
        self._remote: dict[Resources, Any] = {}  # resources -> Ray actor class

    # ---- actors ---------------------------------------------------------------------
    def _pool_size(self, stage: Stage, tasks: int) -> int:
        ray = _ray()
        res = type(stage).resources
        total = ray.cluster_resources()
        fits = int(total.get("CPU", 0) // res.cpus) if res.cpus > 0 else tasks
        if res.gpus > 0:
            if total.get("GPU", 0) < res.gpus:
                raise ConfigError(f"stage {stage.name} needs {res.gpus} GPU per worker; the "
                                  "Ray cluster has none")
            fits = min(fits, int(total["GPU"] // res.gpus))
        wanted = self.workers or fits
        return max(1, min(tasks, wanted, max(fits, 1)))

    def _new_actor(self, res: Resources) -> Any:
        ray = _ray()
        if res not in self._remote:
            # Retries are ours (counted per video), so Ray itself restarts nothing.
            self._remote[res] = ray.remote(num_cpus=res.cpus, num_gpus=res.gpus,
                                           max_restarts=0, max_task_retries=0)(StageWorker)
        return self._remote[res].remote()

    def _actors_for(self, stage: Stage, count: int) -> list[Any]:
        ray = _ray()
        res = type(stage).resources
        if res != self._pool_resources:
            for actor in self._pool:
                ray.kill(actor)
            self._pool, self._pool_resources = [], res
        while len(self._pool) < count:
            self._pool.append(self._new_actor(res))
        return self._pool[:count]

    @staticmethod
    def _load(stage: Stage, actor: Any) -> Any:
        return actor.load.remote(type(stage), stage.config, stage.run, stage.shared)

    # ---- running --------------------------------------------------------------------
    def run_stage(self, stage: Stage, tasks: Sequence[StageTask], store: ArtifactStore,
                  retries: int, on_result: OnResult) -> None:
        if not tasks:
            return
        ray = _ray()
        actors = self._actors_for(stage, self._pool_size(stage, len(tasks)))
        self._in_use = list(actors)
        try:
            # A stage whose setup fails everywhere fails the run, as it does locally.
            ray.get([self._load(stage, a) for a in actors])
        except ray.exceptions.RayTaskError as exc:
            raise exc.as_instanceof_cause() from None
        pending: deque[StageTask] = deque(tasks)
        attempts: dict[str, int] = {}
        idle = list(actors)
        in_flight: dict[Any, tuple[Any, StageTask]] = {}
        bar = tqdm(total=len(tasks), desc=f"{stage.name:>9}", unit="video",
                   disable=not stage.run.progress)
        try:
            while pending or in_flight:
                while pending and idle:
                    actor, task = idle.pop(), pending.popleft()
                    attempts[task.video.id] = attempts.get(task.video.id, 0) + 1
                    in_flight[actor.process.remote(task)] = (actor, task)
                done, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in done:
                    actor, task = in_flight.pop(ref)
                    result, alive = self._collect(ray, ref, task)
                    if not alive:
                        actor = self._replace(stage, actor)
                    idle.append(actor)
                    result.attempts = attempts[task.video.id]
                    if result.status == "error" and result.attempts <= retries:
                        log.info("%s on %s: %s; retrying", stage.name, task.video.id,
                                 result.reason)
                        pending.append(task)
                        continue
                    bar.update(1)
                    on_result(result)
        finally:
            bar.close()

    def _replace(self, stage: Stage, dead: Any) -> Any:
        """A fresh actor, set up for this stage, in the dead one's place."""
        actor = self._new_actor(type(stage).resources)
        self._pool[self._pool.index(dead)] = actor
        self._in_use[self._in_use.index(dead)] = actor
        self._load(stage, actor)  # its process() calls queue behind this setup
        return actor

    @staticmethod
    def _collect(ray: Any, ref: Any, task: StageTask) -> tuple[TaskResult, bool]:
        """The task's result and whether its actor is still usable."""
        try:
            return ray.get(ref), True
        except ray.exceptions.RayTaskError as exc:  # raised outside run_task's guard
            return TaskResult(task.video.id, "error", str(exc.cause or exc)), True
        except ray.exceptions.RayError as exc:  # the actor or its worker process died
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            reason = f"worker died ({exc.__class__.__name__}): {first}"[:300]
            return TaskResult(task.video.id, "error", reason), False

    def end_stage(self, stage: Stage) -> None:
        ray = _ray()
        actors, self._in_use = self._in_use, []
        try:
            ray.get([a.unload.remote() for a in actors], timeout=120)
        except Exception:  # noqa: BLE001 - a dead or stuck actor is replaced
            for actor in actors:
                ray.kill(actor)
            self._pool = [a for a in self._pool if a not in actors]

    def close(self) -> None:
        ray = _ray()
        if not ray.is_initialized():
            return
        for actor in self._pool:
            ray.kill(actor)
        self._pool, self._in_use = [], []
        if self._owns_cluster:
            ray.shutdown()
            self._owns_cluster = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
