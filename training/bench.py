"""`make bench` for private training: time per step and peak memory of one gradient step
for none, dpsgd (hooks and ghost), maskdp naive and maskdp efficient, same model, same
batch; and the ratios dpsgd/none and maskdp/dpsgd.

Each mode runs in a fresh process so peak memory is its own: on CPU the peak resident set
growth over the steps (Linux VmHWM, reset through /proc/self/clear_refs), on CUDA
torch.cuda.max_memory_allocated. Inputs are random clips of the configured shape: speed
and memory do not depend on the pixel values. Results: bench/results/training.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
MODES = ("none", "dpsgd-hooks", "dpsgd-ghost", "maskdp-naive", "maskdp-efficient")


def _vm(field: str) -> int:
    """A /proc/self/status memory field in bytes (0 where not available)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def run_mode(mode: str, arch: str, batch: int, frames: int, size: int, steps: int,
             device: str) -> dict:
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    from training.maskdp import (
        dpsgd_gradient_ghost,
        dpsgd_gradient_hooks,
        maskdp_gradient_efficient,
        maskdp_gradient_naive,
        public_surrogate,
    )
    from training.models import ModelConfig, build_model

    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_model(ModelConfig(arch=arch), 10, frames, size).to(dev)
    x = torch.rand(batch, 3, frames, size, size, device=dev)
    mask = (torch.rand(batch, 1, frames, size, size, device=dev) > 0.5).float()
    y = torch.randint(0, 10, (batch,), device=dev)
    xbar = public_surrogate(x, mask, 0.5)

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, target, reduction="none")

    if mode == "none":
        def step() -> None:
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), y).mean().backward()
    elif mode == "dpsgd-hooks":
        gsm = GradSampleModule(model, loss_reduction="sum")

        def step() -> None:
            dpsgd_gradient_hooks(gsm, loss_fn, x, y, 1.0)
    elif mode == "dpsgd-ghost":
        ghost = GradSampleModuleFastGradientClipping(model, loss_reduction="sum",
                                                     use_ghost_clipping=True)

        def step() -> None:
            dpsgd_gradient_ghost(ghost, loss_fn, x, y, 1.0)
    elif mode == "maskdp-naive":
        def step() -> None:
            maskdp_gradient_naive(model, loss_fn, x, xbar, y, 1.0)
    elif mode == "maskdp-efficient":
        gsm = GradSampleModule(model, loss_reduction="sum")

        def step() -> None:
            maskdp_gradient_efficient(gsm, loss_fn, x, xbar, y, 1.0)
    else:
        raise ValueError(mode)

    # Peak: from before the first step (model and batch in memory) over all steps.
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak()
        base = _vm("VmRSS")
    step()  # warm-up (allocator, hooks), not timed
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _vm("VmHWM") - base
    seconds = (time.perf_counter() - started) / steps
    return {"mode": mode, "s_per_step": round(seconds, 4),
            "peak_mb": round(max(peak, 0) / 2**20, 1),
            "params": sum(p.numel() for p in model.parameters())}


def to_markdown(result: dict) -> str:
    env, cfg = result["env"], result["config"]
    lines = [f"# private training step ({env['machine']}, {env['cpus']} CPUs, {cfg['device']}, "
             f"torch {env['torch']})", "",
             f"Model {cfg['arch']} ({result['rows'][0]['params']} parameters), batch "
             f"{cfg['batch']} clips of {cfg['frames']} x {cfg['size']} x {cfg['size']}, "
             f"{cfg['steps']} timed steps after one warm-up. Peak memory: growth over all "
             "steps, model and batch excluded (CPU: resident set; CUDA: allocated).", "",
             "| mode | s/step | peak MB |", "|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['mode']} | {row['s_per_step']} | {row['peak_mb']} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    for name, value in result["ratios"].items():
        lines.append(f"| {name} | {value} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "bench/results")
    p.add_argument("--arch", default="r2plus1d", choices=("r2plus1d", "transformer"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # child process
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_mode(args.one, args.arch, args.batch, args.frames, args.size,
                                  args.steps, args.device)))
        return 0
    rows = []
    for mode in MODES:
        cmd = [sys.executable, "-m", "training.bench", "--one", mode, "--arch", args.arch,
               "--batch", str(args.batch), "--frames", str(args.frames), "--size",
               str(args.size), "--steps", str(args.steps), "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    t = {r["mode"]: r["s_per_step"] for r in rows}
    ratios = {
        "dpsgd-hooks / none": round(t["dpsgd-hooks"] / t["none"], 2),
        "dpsgd-ghost / none": round(t["dpsgd-ghost"] / t["none"], 2),
        "maskdp-efficient / dpsgd-hooks": round(t["maskdp-efficient"] / t["dpsgd-hooks"], 2),
        "maskdp-naive / dpsgd-hooks": round(t["maskdp-naive"] / t["dpsgd-hooks"], 2),
        "maskdp-naive / maskdp-efficient": round(t["maskdp-naive"] / t["maskdp-efficient"], 2),
    }
    result = {"env": {"machine": platform.machine(), "cpus": os.cpu_count(),
                      "torch": torch.__version__},
              "config": {"arch": args.arch, "batch": args.batch, "frames": args.frames,
                         "size": args.size, "steps": args.steps, "device": args.device},
              "rows": rows, "ratios": ratios}
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"training-{args.arch}" if args.arch != "r2plus1d" else "training"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    md = to_markdown(result)
    (args.out / f"{name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
