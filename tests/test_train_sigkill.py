"""Killing a DP training run and resuming it keeps its privacy accounting exact, with real
processes: `avatarize train` (python -m pipeline.cli train) is SIGKILLed at seeded random
points after its first checkpoint (between an epoch's checkpoint.pt and metrics.json, and
in the middle of an epoch), then run to the end, and compared with an uninterrupted run of
the same config: the same steps, the same accountant history and ε, the same model, bit
for bit. Every checkpoint seen on the way, and the one left by each kill, loads.

Two in-process tests (cheaper) cover what a resume must also repair: a kill in the last
epoch's checkpoint/metrics window, and dropout's masks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from train_synthetic import write_exported_dataset

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 6
STEPS_PER_EPOCH = 4  # 8 training videos, expected batch 2: q = 0.25
TOTAL = EPOCHS * STEPS_PER_EPOCH
TINY = {"train.data.frames": 4, "train.data.stride": 2, "train.data.size": 16,
        "train.model.width": 4, "train.model.depth": 1, "train.optim.epochs": EPOCHS,
        "train.optim.batch_size": 2, "train.optim.physical_batch": 2,
        "train.optim.seed": 7, "train.optim.device": "cpu",
        # RDP: finding σ for the target ε takes ~2 s a process here, PRV's ~9 s.
        "train.privacy.accountant": "rdp"}
STARTUP_S = 180  # imports and decoding on a loaded machine; an epoch here is ~0.5 s


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_exported_dataset(tmp_path_factory.mktemp("exported"), frames=8, size=16)


def _start(dataset: Path, workdir: Path, name: str) -> subprocess.Popen:
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    cmd = [sys.executable, "-m", "pipeline.cli", "train", "--input", str(dataset),
           "--output", str(dataset), "--workdir", str(workdir), "--privacy", "maskdp",
           "--epsilon", "4", *sets]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    log = workdir.parent / f"{workdir.name}.{name}.log"
    # cwd: a folder without pipeline.yaml, so the code's defaults plus TINY are the config
    # (another pipeline.yaml edited meanwhile could not make two runs differ).
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=workdir.parent, env=env, start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def _output(proc: subprocess.Popen) -> str:
    return proc.log.read_text()  # type: ignore[attr-defined]


def _load(path: Path) -> dict[str, Any]:
    """The checkpoint must load whenever it exists: it is only ever replaced whole."""
    return torch.load(path, map_location="cpu", weights_only=False)


class Watch:
    """Every version of checkpoint.pt that appears (os.replace: a new inode, though the
    number may be reused, and new times) is loaded."""

    def __init__(self, run: Path):
        self.path = run / "checkpoint.pt"
        self.version: tuple[int, ...] | None = None
        self.state: dict[str, Any] | None = None
        self.seen: list[int] = []  # steps of the checkpoints loaded

    def poll(self) -> dict[str, Any] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self.state
        version = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        if version != self.version:
            self.version, self.state = version, _load(self.path)
            self.seen.append(self.state["step"])
        return self.state

    def metrics_step(self) -> int:
        """The step metrics.json is at (0: none yet). It always parses: replaced whole."""
        path = self.path.with_name("metrics.json")
        return json.loads(path.read_text())["steps"] if path.is_file() else 0

    def metrics_until(self, proc: subprocess.Popen, step: int) -> None:
        deadline = time.monotonic() + STARTUP_S
        while self.metrics_step() < step:
            assert proc.poll() is None, f"train exited {proc.returncode}:\n{_output(proc)}"
            assert time.monotonic() < deadline, f"metrics.json not at step {step}"
            time.sleep(0.005)

    def until_past(self, proc: subprocess.Popen, step: int) -> dict[str, Any]:
        """Poll until a checkpoint later than `step` is there; return it."""
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            state = self.poll()
            if state is not None and state["step"] > step:
                return state
            assert proc.poll() is None, f"train exited {proc.returncode}:\n{_output(proc)}"
            time.sleep(0.01)
        raise AssertionError(f"no checkpoint past step {step} in {STARTUP_S} s")


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # its own session: the process and any children
    assert proc.wait(timeout=30) == -signal.SIGKILL


def _check_consistent(state: dict[str, Any]) -> None:
    """A checkpoint counts each released step once: the accountant, the step, the epochs."""
    step = state["step"]
    assert step % STEPS_PER_EPOCH == 0 and 0 < step <= TOTAL
    assert sum(h[2] for h in state["accountant"]) == step
    assert [(r["epoch"], r["step"]) for r in state["history"]] == [
        (e, e * STEPS_PER_EPOCH) for e in range(1, step // STEPS_PER_EPOCH + 1)]


def _without_time(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_sigkilled_training_resumes_to_the_same_model_and_epsilon(dataset, tmp_path):
    rng = np.random.default_rng(20261205)  # where the kills land
    whole_dir, cut_dir = tmp_path / "whole", tmp_path / "cut"
    whole_run = whole_dir / "training" / "maskdp"
    cut_run = cut_dir / "training" / "maskdp"
    procs: list[subprocess.Popen] = []
    try:
        # The uninterrupted run, alongside the interrupted one (one thread each).
        procs.append(whole := _start(dataset, whole_dir, "whole"))
        watch = Watch(cut_run)
        kills: list[dict[str, Any]] = []
        left_behind: list[list[dict[str, Any]]] = []  # each kill's checkpoint's epochs

        # Kills, each after the resumed run's next checkpoint appears:
        # - "window": at once, between that epoch's checkpoint.pt and its metrics.json (the
        #   summary written second recomputes ε: a window of ~0.1 s here), so metrics.json
        #   is left an epoch behind (or missing) and must be caught up;
        # - "mid-epoch": once both files are written, a seeded random fraction of an epoch
        #   later, in the next epoch's steps, which are lost and must be redone.
        # Load can make a kill miss its moment ("late"); then the next run tries again. Each
        # run takes at least one epoch, and kills stop two epochs before the end.
        while not {"window", "mid-epoch"} <= {k["kind"] for k in kills}:
            start = _load(watch.path)["step"] if watch.path.is_file() else 0
            assert start < TOTAL - 2 * STEPS_PER_EPOCH, kills
            want = "window" if "window" not in {k["kind"] for k in kills} else "mid-epoch"
            procs.append(proc := _start(dataset, cut_dir, f"kill{len(kills) + 1}"))
            seen = watch.until_past(proc, start)
            delay = 0.0
            if want == "mid-epoch":
                watch.metrics_until(proc, seen["step"])
                epoch_s = min(r["seconds"] for r in seen["history"])
                delay = float(rng.uniform(0.05, 0.5)) * epoch_s
                time.sleep(delay)
            _kill(proc)
            left = _load(watch.path)  # whole, whatever the moment of the kill
            watch.poll()
            metrics = watch.metrics_step()
            if left["step"] > seen["step"]:
                kind = "late"
            elif want == "window":
                kind = "window" if metrics < left["step"] else "late"
            else:
                kind = "mid-epoch" if metrics == left["step"] else "late"
            if start:
                assert f"resumed {watch.path} at step {start}" in _output(proc)
            kills.append({"want": want, "kind": kind, "started_at": start,
                          "seen": seen["step"], "delay": delay, "left": left["step"],
                          "metrics": metrics})
            _check_consistent(left)
            left_behind.append(_without_time(left["history"]))
            (tmp_path / "kills.json").write_text(json.dumps(kills, indent=1))  # to debug

        # What a kill in the middle of torch.save would leave: a half-written temporary.
        # The resumed run ignores it and replaces it.
        (cut_run / "checkpoint.pt.tmp").write_bytes(b"PK\x03\x04 half a zip")
        (cut_run / "metrics.json.tmp").write_text('{"epochs": [')

        procs.append(proc := _start(dataset, cut_dir, "final"))
        deadline = time.monotonic() + STARTUP_S
        while proc.poll() is None and time.monotonic() < deadline:
            watch.poll()  # each checkpoint of the last run loads too
            time.sleep(0.01)
        assert proc.wait(timeout=1) == 0, _output(proc)
        watch.poll()
        assert f"for {TOTAL} steps" in _output(proc) and "ε" in _output(proc)
        assert whole.wait(timeout=STARTUP_S) == 0, _output(whole)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    # Each kill left a whole, self-consistent checkpoint, short of the end (not in the
    # last epoch's window between checkpoint.pt and metrics.json: covered by the test below).
    assert all(k["started_at"] < k["left"] < TOTAL for k in kills), kills
    assert watch.seen == sorted(watch.seen) and watch.seen[-1] == TOTAL, watch.seen

    whole_state, cut_state = _load(whole_run / "checkpoint.pt"), _load(cut_run / "checkpoint.pt")
    for state in (whole_state, cut_state):
        _check_consistent(state)
    assert cut_state["step"] == whole_state["step"] == TOTAL
    assert cut_state["config"] == whole_state["config"]
    # Accounting: the same σ and the same history of (σ, q, steps): the redone steps of the
    # killed epochs were counted once.
    assert cut_state["sigma"] == whole_state["sigma"] > 0
    assert cut_state["accountant"] == whole_state["accountant"]
    assert _without_time(cut_state["history"]) == _without_time(whole_state["history"])
    for rows in left_behind:  # at each kill, ε (and loss, accuracy) so far were exact too
        assert rows == _without_time(whole_state["history"])[:len(rows)]
    whole_metrics = json.loads((whole_run / "metrics.json").read_text())
    cut_metrics = json.loads((cut_run / "metrics.json").read_text())
    assert cut_metrics["steps"] == whole_metrics["steps"] == TOTAL
    assert 3.0 < whole_metrics["epsilon"] <= 4.0
    assert cut_metrics["epsilon"] == pytest.approx(whole_metrics["epsilon"], rel=1e-9, abs=1e-9)
    assert [e["epsilon"] for e in cut_metrics["epochs"]] == pytest.approx(
        [e["epsilon"] for e in whole_metrics["epochs"]], rel=1e-9, abs=1e-9)
    assert _without_time(cut_metrics["epochs"]) == _without_time(whole_metrics["epochs"])
    # The model, the optimizer and the schedule: bit-identical (every draw is a function of
    # seed and step; nothing depends on the process that made it).
    assert cut_state["model"].keys() == whole_state["model"].keys()
    for key, value in whole_state["model"].items():
        assert torch.equal(cut_state["model"][key], value), key
    for pid, moments in whole_state["optimizer"]["state"].items():
        for key, value in moments.items():
            assert torch.equal(cut_state["optimizer"]["state"][pid][key], value), (pid, key)
    assert cut_state["scheduler"] == whole_state["scheduler"]
    assert not (cut_run / "checkpoint.pt.tmp").exists()
    assert not (cut_run / "metrics.json.tmp").exists()


def test_a_kill_between_the_last_checkpoint_and_metrics_is_repaired_on_resume(dataset,
                                                                               tmp_path):
    from training.data import load_dataset
    from training.trainer import TrainConfig, Trainer

    cfg = TrainConfig.model_validate({  # σ given and RDP: no search, quick ε (as above)
        "data": {"frames": 4, "stride": 2, "size": 16},
        "model": {"width": 4, "depth": 1},
        "privacy": {"mode": "maskdp", "noise_multiplier": 1.5, "accountant": "rdp"},
        "optim": {"epochs": 2, "batch_size": 2, "physical_batch": 2, "device": "cpu"}})
    records = load_dataset(dataset, cfg.data)
    run = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster on a busy machine
    try:
        Trainer(cfg, None, run, records=records).fit(stop_after_epochs=1)
        stale = (run / "metrics.json").read_text()
        Trainer(cfg, None, run, records=records).fit()
        final = json.loads((run / "metrics.json").read_text())
        # The kill: checkpoint.pt of epoch 2 is in place, metrics.json still epoch 1's.
        (run / "metrics.json").write_text(stale)
        Trainer(cfg, None, run, records=records).fit()
    finally:
        torch.set_num_threads(threads)
    metrics = json.loads((run / "metrics.json").read_text())
    assert final["steps"] == 8 and final["epsilon"] > json.loads(stale)["epsilon"]
    assert metrics["steps"] == final["steps"]
    assert metrics["epsilon"] == pytest.approx(final["epsilon"], rel=1e-9)


def test_a_resumed_run_with_dropout_is_the_same_model(dataset, tmp_path):
    from training.data import load_dataset
    from training.trainer import TrainConfig, Trainer

    cfg = TrainConfig.model_validate({
        "data": {"frames": 4, "stride": 2, "size": 16},
        "model": {"width": 4, "depth": 1, "dropout": 0.5},
        "privacy": {"mode": "maskdp", "noise_multiplier": 1.5, "accountant": "rdp"},
        "optim": {"epochs": 2, "batch_size": 2, "physical_batch": 2, "device": "cpu"}})
    records = load_dataset(dataset, cfg.data)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = Trainer(cfg, None, tmp_path / "whole", records=records)
        whole.fit()
        Trainer(cfg, None, tmp_path / "cut", records=records).fit(stop_after_epochs=1)
        resumed = Trainer(cfg, None, tmp_path / "cut", records=records)
        resumed.fit()
    finally:
        torch.set_num_threads(threads)
    assert resumed.step == whole.step and resumed.epsilon() == whole.epsilon()
    for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
