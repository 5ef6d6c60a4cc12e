"""The privacy/utility table: test accuracy of none / dpsgd / maskdp at several ε, for both
models, on one exported dataset. Every cell is an ordinary `Trainer` run (its own run
folder, resumable), so an interrupted grid picks up where it stopped.

    python -m training.grid --dataset OUTPUT [--epsilons 0.5 1 2 8] [--set KEY=VALUE ...]

writes grid.json and grid.md into --out (default bench/results/privacy_grid.*).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pipeline.config import load_config
from training.trainer import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[1]


def run_grid(dataset: Path, input_root: Path | None, work: Path, base: TrainConfig,
             epsilons: list[float], archs: list[str]) -> list[dict[str, Any]]:
    rows = []
    for arch in archs:
        cells = [("none", None)] + [(m, e) for e in epsilons for m in ("dpsgd", "maskdp")]
        for mode, eps in cells:
            data = json.loads(base.model_dump_json())
            data["model"]["arch"] = arch
            data["privacy"]["mode"] = mode
            if eps is not None:
                data["privacy"]["epsilon"] = eps
            cfg = TrainConfig.model_validate(data)
            out = work / arch / (mode if eps is None else f"{mode}-eps{eps:g}")
            summary = Trainer(cfg, dataset, out, input_root=input_root).fit()
            last = summary["epochs"][-1]
            rows.append({"arch": arch, "mode": mode, "target_epsilon": eps,
                         "epsilon": summary["epsilon"], "delta": summary["delta"],
                         "noise_multiplier": summary["noise_multiplier"],
                         "test_accuracy": last["test_accuracy"],
                         "train_accuracy": last["train_accuracy"],
                         "train_videos": summary["train_videos"],
                         "test_videos": summary["test_videos"], "run": str(out)})
            print(rows[-1], flush=True)
    return rows


def to_markdown(rows: list[dict[str, Any]], epsilons: list[float], command: str) -> str:
    first = rows[0]
    lines = ["# Test accuracy: none / DP-SGD / MaskDP", "",
             f"{first['train_videos']} training and {first['test_videos']} test videos, "
             f"δ = {first['delta']:.2g}. Reproduce: `{command}`", ""]
    for arch in sorted({r["arch"] for r in rows}):
        sub = [r for r in rows if r["arch"] == arch]
        none = next(r for r in sub if r["mode"] == "none")
        lines += [f"## {arch} (non-private: {none['test_accuracy']:.3f})", "",
                  "| ε | DP-SGD | MaskDP | σ |", "|---|---|---|---|"]
        for eps in epsilons:
            d = next(r for r in sub if r["mode"] == "dpsgd" and r["target_epsilon"] == eps)
            m = next(r for r in sub if r["mode"] == "maskdp" and r["target_epsilon"] == eps)
            lines.append(f"| {eps:g} | {d['test_accuracy']:.3f} | {m['test_accuracy']:.3f} | "
                         f"{m['noise_multiplier']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", type=Path, required=True, help="exported dataset folder")
    p.add_argument("--input", type=Path, help="the original videos (identity sidecars)")
    p.add_argument("--config", type=Path, default=REPO / "pipeline.yaml")
    p.add_argument("--work", type=Path, default=REPO / "work/grid")
    p.add_argument("--out", type=Path, default=REPO / "bench/results")
    p.add_argument("--epsilons", type=float, nargs="+", default=[0.5, 1.0, 2.0, 8.0])
    p.add_argument("--archs", nargs="+", default=["r2plus1d", "transformer"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    from pipeline.cli import _stage_models

    cfg = load_config(args.config, _stage_models(), args.set)
    base = cfg.section("train")
    assert isinstance(base, TrainConfig)
    rows = run_grid(args.dataset, args.input, args.work, base, args.epsilons, args.archs)
    args.out.mkdir(parents=True, exist_ok=True)
    import sys

    command = "python -m training.grid " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / "privacy_grid.json").write_text(json.dumps(rows, indent=2))
    md = to_markdown(rows, args.epsilons, command.strip())
    (args.out / "privacy_grid.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
