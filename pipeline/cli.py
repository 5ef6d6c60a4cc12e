"""The `avatarize` command.

    avatarize run [--config FILE] [--input DIR] [--output DIR] [--workdir DIR]
                  [--stage NAME ...] [--force] [--set KEY=VALUE ...]
                  [--executor local|ray] [--ray-address ADDR] [--ray-workers N]
    avatarize status [--config FILE]
    avatarize sample-data DIR [--videos N] [--seed S]
    avatarize sample-data DIR --benchmark [--people N --repetitions R --actions a,b ...]
    avatarize train | evaluate | audit ...    private training (training/)
    avatarize evaluate --privacy --original DIR --method NAME=DIR ...   privacy report
    avatarize attack | baseline | motion | tubelet ...   attackers and anonymizers (privacy/)
    avatarize doctor

Exit codes: 0 every video succeeded; 1 the run finished but some videos failed;
2 usage or configuration error (the message names the key and the problem);
3 `run` stopped because the workdir or output could not be written (disk full, read-only);
the artifacts finished before it are intact and the next run resumes from them.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import sys
import time
from pathlib import Path

from pipeline.config import Config, ConfigError, load_config

DEFAULT_CONFIG = Path("pipeline.yaml")
EXIT_OK, EXIT_FAILED_VIDEOS, EXIT_USAGE, EXIT_STORAGE = 0, 1, 2, 3

log = logging.getLogger("avatarize")


def _environment_defaults() -> None:
    # Rendering without a display, and never a download at run time.
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("ANNY_CACHE_DIR", str(Path.home() / ".cache/avatarize/anny"))
    # mediapipe / TF Lite / absl are chatty on stderr.
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _stage_models() -> dict:
    from stages import section_models

    return section_models()


def _load(args: argparse.Namespace) -> Config:
    path = args.config
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    run_overrides = {
        "input": getattr(args, "input", None),
        "output": getattr(args, "output", None),
        "workdir": getattr(args, "workdir", None),
    }
    if getattr(args, "no_progress", False):
        run_overrides["progress"] = False
    cfg = load_config(path, _stage_models(), getattr(args, "set", None) or [], run_overrides)
    # Paths given on the command line are relative to where the command runs.
    for key in ("input", "output", "workdir"):
        value = run_overrides[key]
        if value is not None:
            setattr(cfg.run, key, Path(value).resolve())
    return cfg


def _check_writable(key: str, folder: Path) -> None:
    """Create the folder and a file in it now, so that an unwritable output or workdir
    is a clear error before any work, not a failure of every video."""
    probe = folder / f".avatarize-write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot write to {folder}: {exc.strerror or exc}") from exc


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.dataset import check_layout, discover
    from pipeline.executors import make_executor
    from pipeline.runner import Runner
    from pipeline.store import StorageError
    from stages import stage_classes

    cfg = _load(args)
    check_layout(cfg.run.input, cfg.run.output, cfg.run.workdir)
    videos = discover(cfg.run.input)
    if not videos:
        raise ConfigError(f"run.input: no videos found in {cfg.run.input}")
    _check_writable("run.output", cfg.run.output)
    _check_writable("run.workdir", cfg.run.workdir)
    executor = make_executor(args.executor, args.ray_address, args.ray_workers)
    log.info("%d videos from %s (executor: %s)", len(videos), cfg.run.input, executor.name)
    started = time.perf_counter()
    try:
        report = Runner(cfg, stage_classes(), executor).run(
            videos, selected=args.stage, force=args.force)
    except StorageError as exc:
        print(f"avatarize: error: {exc.strerror or exc}; finished artifacts are kept, "
              "free space or fix the folder and run again to resume", file=sys.stderr)
        return EXIT_STORAGE
    finally:
        executor.close()
    elapsed = time.perf_counter() - started
    computed = sum(len(o.computed) for o in report.outcomes)
    reused = sum(len(o.reused) for o in report.outcomes)
    print(
        f"{len(report.outcomes) - len(report.failed)}/{len(report.outcomes)} videos ok, "
        f"{len(report.failed)} failed; {computed} stage results computed, {reused} reused; "
        f"{elapsed:.1f} s"
    )
    for o in report.failed:
        print(f"  FAILED {o.video.rel_path}: {o.failed_stage}: {o.reason}")
    if "export" in report.stages:
        print(f"output: {cfg.run.output}")
    return report.exit_code


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline.dataset import discover
    from pipeline.runner import Runner
    from stages import stage_classes

    cfg = _load(args)
    videos = discover(cfg.run.input)
    table = Runner(cfg, stage_classes()).status(videos)
    print(f"{len(videos)} videos in {cfg.run.input}; artifacts in {cfg.run.workdir}")
    print(f"{'stage':<10} {'done':>6} {'stale':>6} {'failed':>6} {'missing':>8}")
    for stage, c in table.items():
        print(f"{stage:<10} {c['done']:>6} {c['stale']:>6} {c['failed']:>6} {c['missing']:>8}")
    return EXIT_OK


def cmd_sample_data(args: argparse.Namespace) -> int:
    from stages.sample_data import generate_benchmark, generate_sample

    size = {k: getattr(args, k) for k in ("width", "height", "frames", "fps")
            if getattr(args, k) is not None}
    if args.benchmark:
        if args.videos is not None:
            raise ConfigError("--videos: not with --benchmark (use --people, --repetitions)")
        actions = [a.strip() for a in args.actions.split(",") if a.strip()] \
            if args.actions is not None else None
        try:
            items = generate_benchmark(Path(args.dir), people=args.people,
                                       repetitions=args.repetitions, actions=actions,
                                       seed=args.seed, progress=not args.no_progress, **size)
        except ValueError as exc:
            raise ConfigError(f"sample-data --benchmark: {exc}") from exc
        print(f"wrote {len(items)} benchmark videos to {args.dir} "
              f"(people table in {Path(args.dir) / 'benchmark.json'})")
        return EXIT_OK
    bench_only = [f"--{k}" for k in ("people", "repetitions", "actions")
                  if getattr(args, k) is not None]
    if bench_only:
        raise ConfigError(f"{', '.join(bench_only)}: only with --benchmark")
    videos = 4 if args.videos is None else args.videos
    if videos < 1:
        raise ConfigError("--videos: must be at least 1")
    try:
        items = generate_sample(Path(args.dir), videos=videos, seed=args.seed,
                                progress=not args.no_progress, **size)
    except ValueError as exc:
        raise ConfigError(f"sample-data: {exc}") from exc
    print(f"wrote {len(items)} videos to {args.dir}")
    return EXIT_OK


def cmd_convert_body_model(args: argparse.Namespace) -> int:
    from stages.smpl_family import convert_model_file

    try:
        keys = convert_model_file(Path(args.src), Path(args.dst))
    except (OSError, ValueError, pickle.UnpicklingError) as exc:
        raise ConfigError(f"convert-body-model: {exc}") from exc
    print(f"wrote {args.dst} ({len(keys)} arrays: {', '.join(keys)})")
    return EXIT_OK


def _train_overrides(args: argparse.Namespace) -> None:
    extra = []
    if args.privacy is not None:
        extra.append(f"train.privacy.mode={args.privacy}")
    if args.epsilon is not None:
        extra.append(f"train.privacy.epsilon={args.epsilon}")
    if getattr(args, "delta", None) is not None:
        extra.append(f"train.privacy.delta={args.delta}")
    args.set = [*extra, *(args.set or [])]


def cmd_train(args: argparse.Namespace) -> int:
    from training.run import train

    _train_overrides(args)
    summary = train(_load(args))
    last = summary["epochs"][-1] if summary["epochs"] else {}
    eps = summary["epsilon"]
    print(f"trained {summary['arch']} ({summary['mode']}) for {summary['steps']} steps on "
          f"{summary['train_videos']} videos: test accuracy {last.get('test_accuracy')}, "
          f"ε {'n/a (not private)' if eps is None else f'{eps:.3f}'} at δ {summary['delta']:.2g}")
    print(f"run folder: {summary['run_folder']} (checkpoint.pt, metrics.json)")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.run import evaluate

    if args.privacy == "report":
        from privacy.report import cmd_privacy_report

        return cmd_privacy_report(args)
    _train_overrides(args)
    result = evaluate(_load(args), args.checkpoint)
    for name in ("anonymized", "original"):
        r = result[name]
        print(f"{name:>10} test videos: {r['videos']}, accuracy {r['accuracy']}")
    print(f"written: {Path(result['checkpoint']).parent / 'evaluation.json'}")
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from training.audit import AuditConfig, audit

    _train_overrides(args)
    given = {"region": args.region, "canaries": args.canaries, "guesses": args.guesses,
             "seed": args.seed}
    try:
        audit_cfg = AuditConfig(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(f"audit: {exc}") from exc
    r = audit(_load(args), audit_cfg)
    reported = r["epsilon_reported"]
    print(f"audit ({r['mode']}, canaries in the {r['region']} region): {r['correct']} of "
          f"{r['guesses']} guesses right, empirical ε lower bound {r['epsilon_lower_bound']:.3f} "
          f"(β {r['beta']}); reported ε "
          f"{'n/a (not private)' if reported is None else f'{reported:.3f}'}")
    print(f"written: {Path(r['run_folder']) / 'audit.json'}")
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from pipeline.doctor import run_checks

    return run_checks()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="avatarize",
        description="Replace every person in a video dataset by a rendered avatar that moves "
        "the same way; export videos, sensitivity masks and metadata.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline (only what is missing or stale)")
    run.add_argument("--config", type=Path, help="YAML config (default: ./pipeline.yaml)")
    run.add_argument("--input", type=Path, help="folder of videos or a CSV manifest")
    run.add_argument("--output", type=Path, help="output dataset folder")
    run.add_argument("--workdir", type=Path, help="artifact folder (resumable)")
    run.add_argument("--stage", action="append", metavar="NAME",
                     help="run this stage (and what it needs that is missing); repeatable")
    run.add_argument("--force", action="store_true",
                     help="recompute the selected stages (all stages without --stage)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a config value, e.g. --set export.preview=true")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--executor", choices=("local", "ray"), default="local",
                     help="local: this process (default); ray: stages as Ray actors, several "
                     "videos at once (pip install 'avatarize[ray]'; the workdir must be a "
                     "folder every worker sees)")
    run.add_argument("--ray-address", metavar="ADDR",
                     help="join this Ray cluster (e.g. auto or ray://head:10001) instead of "
                     "starting a local one")
    run.add_argument("--ray-workers", type=int, metavar="N",
                     help="actors per stage (default: as many as the cluster's CPUs allow); "
                     "a local Ray gets N CPUs")
    run.set_defaults(func=cmd_run)

    st = sub.add_parser("status", help="per stage: videos done / stale / failed / missing")
    st.add_argument("--config", type=Path)
    st.add_argument("--input", type=Path)
    st.add_argument("--output", type=Path)
    st.add_argument("--workdir", type=Path)
    st.add_argument("--set", action="append", metavar="KEY=VALUE")
    st.set_defaults(func=cmd_status)

    sd = sub.add_parser("sample-data", help="write the generated sample dataset")
    sd.add_argument("dir", help="where to write it")
    sd.add_argument("--videos", type=int, help="plain sample: how many videos (default 4)")
    sd.add_argument("--seed", type=int, default=0)
    sd.add_argument("--benchmark", action="store_true",
                    help="the privacy benchmark: people x actions x repetitions "
                         "(sizes: assets/sample_recipes.yaml benchmark)")
    sd.add_argument("--people", type=int, help="benchmark: number of people")
    sd.add_argument("--repetitions", type=int, help="benchmark: repetitions per action")
    sd.add_argument("--actions", help="benchmark: comma-separated action names")
    for flag in ("--width", "--height", "--frames", "--fps"):
        sd.add_argument(flag, type=int, help="default: 320x240, 48 frames at 24 fps for the "
                        "plain sample; the recipes' benchmark table for --benchmark")
    sd.add_argument("--no-progress", action="store_true")
    sd.set_defaults(func=cmd_sample_data)

    cv = sub.add_parser(
        "convert-body-model",
        help="convert an official SMPL-family .pkl (chumpy) into a pickle-free .npz, once")
    cv.add_argument("src", help="the .pkl model file")
    cv.add_argument("dst", help="the .npz to write")
    cv.set_defaults(func=cmd_convert_body_model)

    for name, func, text in (
            ("train", cmd_train, "train an action recognizer on the exported dataset "
             "(non-private, DP-SGD or MaskDP)"),
            ("evaluate", cmd_evaluate, "test a trained checkpoint on the anonymized and the "
             "original test videos"),
            ("audit", cmd_audit, "plant canaries, train, report an empirical ε lower bound "
             "(one-run privacy audit)")):
        tr = sub.add_parser(name, help=text)
        tr.add_argument("--config", type=Path, help="YAML config (default: ./pipeline.yaml)")
        tr.add_argument("--input", type=Path, help="the original videos (run.input)")
        tr.add_argument("--output", type=Path, help="the exported dataset (run.output)")
        tr.add_argument("--workdir", type=Path, help="artifact folder (runs go to training/)")
        if name == "evaluate":
            tr.add_argument("--privacy", nargs="?", const="report",
                            choices=("none", "dpsgd", "maskdp", "report"),
                            help="train.privacy.mode; without a value: the privacy report "
                            "(--original, --method NAME=DIR, ...; privacy/report.py)")
        else:
            tr.add_argument("--privacy", choices=("none", "dpsgd", "maskdp"),
                            help="train.privacy.mode")
        tr.add_argument("--epsilon", type=float, help="train.privacy.epsilon (target)")
        tr.add_argument("--delta", type=float, help="train.privacy.delta")
        tr.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.optim.epochs=20")
        if name == "evaluate":
            tr.add_argument("--checkpoint", type=Path,
                            help="checkpoint.pt or its run folder (default: the train run's)")
            from privacy.report import add_privacy_args

            add_privacy_args(tr)
        if name == "audit":
            tr.add_argument("--region", choices=("sensitive", "public"),
                            help="where the canaries go (default sensitive; public: the "
                            "unprotected region, shows the audit's power)")
            tr.add_argument("--canaries", type=int, help="number of canaries (default 256)")
            tr.add_argument("--guesses", type=float,
                            help="share of canaries guessed in, and out (default 0.125)")
            tr.add_argument("--seed", type=int, help="canary seed (default 0)")
        tr.set_defaults(func=func)

    doc = sub.add_parser("doctor", help="check rendering, detector, body model, torch")
    doc.set_defaults(func=cmd_doctor)

    # Privacy measurement and the learned anonymizers own their sub-commands.
    from privacy.baselines import add_cli as add_baseline_cli
    from privacy.motion_attack import add_cli as add_motion_cli
    from privacy.tubelet_anonymizer import add_cli as add_tubelet_cli
    from privacy.video_attack import add_cli as add_attack_cli

    add_attack_cli(sub)
    add_baseline_cli(sub)
    add_motion_cli(sub)
    add_tubelet_cli(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    _environment_defaults()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(message)s",
    )
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"avatarize: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
