"""``memzoo sweep SWEEP.yaml [--dry-run] [--print-commands] [--max-parallel N]`` and
``memzoo report SWEEP_DIR [--merge PATH] [--publish DIR]``.

``add_subcommands(subparsers)`` adds both to the ``memzoo`` parser; ``python -m
memzoo.sweep.cli sweep|report ...`` runs them on their own (and is what ``--max-parallel``
workers run).
"""

from __future__ import annotations

import argparse
import sys


def cmd_sweep(args: argparse.Namespace) -> int:
    from memzoo.sweep.runner import (
        SweepInterrupted,
        commands,
        dry_run_lines,
        run_sweep,
        write_sweep_copy,
    )
    from memzoo.sweep.spec import SweepError, load_sweep

    if args.max_parallel < 1:
        raise SweepError(f"--max-parallel must be >= 1, got {args.max_parallel}")
    sweep = load_sweep(args.sweep)
    if args.dry_run:
        print("\n".join(dry_run_lines(sweep, args.root, only=args.only)))
        return 0
    if args.print_commands:
        lines = commands(sweep, args.root, only=args.only)
        write_sweep_copy(sweep, args.root)  # so that `memzoo report` works after the jobs
        print("\n".join(lines))
        return 0
    try:
        res = run_sweep(
            sweep,
            args.root,
            only=args.only,
            max_parallel=args.max_parallel,
            report=not args.no_report,
        )
    except SweepInterrupted as e:
        print(f"memzoo: sweep interrupted: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("memzoo: sweep interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 1 if res["failed"] else 0


def cmd_report(args: argparse.Namespace) -> int:
    from memzoo.sweep.report import build_report

    out = build_report(args.sweep_dir, args.root, merge=args.merge or (), publish_to=args.publish)
    print(f"{out['report']}  ({len(out['rows'])} runs)")
    print(f"{out['csv']}")
    for p in out["plots"]:
        print(p)
    if out.get("published"):
        print(f"published to {out['published']}")
    return 0


def add_subcommands(subparsers) -> None:
    """Add ``sweep`` and ``report`` to a ``memzoo`` subparsers object."""
    p = subparsers.add_parser(
        "sweep",
        help="run a sweep of runs (grid of settings) with evals and a report",
        description="Expand SWEEP.yaml into named runs under ROOT/<sweep>/runs/, train them one "
        "after another (skipping finished runs, resuming interrupted ones, recording failures "
        "in ROOT/<sweep>/status.json), run the sweep's evals on each, and write "
        "ROOT/<sweep>/{report.md,results.csv,plots/}. The file format: memzoo/sweep/spec.py.",
    )
    p.add_argument("sweep", help="sweep file, e.g. configs/sweeps/mqar_zoo.yaml")
    p.add_argument(
        "--dry-run", action="store_true", help="print the expanded runs (configs validated)"
    )
    p.add_argument(
        "--print-commands",
        action="store_true",
        help="print one shell line per run (memzoo train ... && memzoo eval ...) instead",
    )
    p.add_argument("--max-parallel", type=int, default=1, help="runs at a time (worker processes)")
    p.add_argument("--root", default="sweeps", help="where sweeps go (default: sweeps)")
    p.add_argument(
        "--only",
        action="append",
        metavar="RUN",
        help="run (or with --dry-run / --print-commands, list) only these runs "
        "(repeatable or comma-separated)",
    )
    p.add_argument("--no-report", action="store_true", help="do not rebuild the report")
    p.set_defaults(func=cmd_sweep)

    p = subparsers.add_parser(
        "report",
        help="rebuild a sweep's report.md, results.csv and plots",
        description="Rebuild ROOT/<sweep>/{report.md,results.csv,plots/*.png} from the run "
        "directories (metrics.jsonl, evals/*/results.json) and status.json.",
    )
    p.add_argument("sweep_dir", help="sweep directory (sweeps/NAME) or its sweep file")
    p.add_argument("--root", default="sweeps", help="sweeps root when given a sweep file")
    p.add_argument(
        "--merge",
        action="append",
        metavar="PATH",
        help="another copy of this sweep: its directory (from another machine) or a "
        "results.csv (e.g. the published one); runs not finished here take their row from "
        "it (repeatable; a 'source' column says which)",
    )
    p.add_argument(
        "--publish",
        metavar="DIR",
        help="then copy report.md, results.csv, plots/ and the runs' records (configs, "
        "metrics, eval results; no checkpoints) to DIR, e.g. experiments/results/sweeps/NAME; "
        "--merge DIR later brings every published run back",
    )
    p.set_defaults(func=cmd_report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memzoo", description=__doc__)
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    from memzoo.config import ConfigError
    from memzoo.evals.runner import EvalError
    from memzoo.train.loop import TrainingError

    try:
        return args.func(args)
    except (ConfigError, TrainingError, FileNotFoundError, EvalError) as e:
        print(f"memzoo: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
