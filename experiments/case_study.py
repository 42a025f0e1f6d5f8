"""Regenerate the case-study table: `python -m experiments.case_study --grid experiments/case_study.yaml
--data-dir DIR [--scale F] [--image-size S] [--seeds N] [--gpus N] [--only PATTERN] [--dry-run]`.

Each cell runs as `python -m experiments.run` with the cell's flags; finished runs are skipped, so the
command resumes after a crash or Ctrl-C. Writes results/<name>/table.md, table.csv and table.png, with 95%
seed-and-photo bootstrap intervals, paired differences to each data set's baseline and an all-cat (no-skill)
row per data set, and for a grid with `sweep` (experiments/ratio_sweep.yaml) sweep.md and sweep.png, the same
rows as lines against the swept x; `--table-only` rebuilds them from the run files alone (summary.json,
predictions.csv), the same numbers on any machine. Exits 1 (after writing the table) when any run failed, 2
when the run files disagree, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.case_study",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--grid", type=Path, default=Path("experiments/case_study.yaml"), help="the grid YAML")
    p.add_argument("--data-dir", type=Path, help="photo folder (default: the embedded digits)")
    p.add_argument("--scale", type=float, help="multiply every split count (e.g. 0.25 on a CPU)")
    p.add_argument("--image-size", type=int, help="input size in pixels")
    p.add_argument("--epochs", type=int, help="override the grid's epochs")
    p.add_argument("--backbone", help="override the grid's backbone")
    p.add_argument("--seeds", type=int, help="seeds per cell (default: the grid's, per cell)")
    p.add_argument("--gpus", type=int, help="GPUs per run (DDP when more than one)")
    p.add_argument("--logger", default="csv", choices=["wandb", "csv", "tensorboard", "none"])
    p.add_argument(
        "--only", help="run only cells whose id matches this glob or substring (comma-separated: any of them)"
    )
    p.add_argument("--table-only", action="store_true", help="write the table from the finished runs; train nothing")
    p.add_argument("--results", type=Path, help="output folder (default results/<grid name>)")
    p.add_argument("--dry-run", action="store_true", help="list the runs that would be made, and stop")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from imbalance.case_study import (
        TableError,
        execute,
        finished,
        load_grid,
        one_line,
        plan_runs,
        protocol,
        select,
        total_wall_time,
        write_results,
    )
    from imbalance.config import ConfigError

    try:
        grid = load_grid(args.grid)
        cells = select(grid, args.only)
        if not cells:
            parser.exit(2, f"error: --only {args.only!r} matches no cell of {args.grid}\n")
        results = args.results or Path("results") / grid.name
        overrides = {
            "data_dir": args.data_dir,
            "scale": args.scale,
            "image_size": args.image_size,
            "epochs": args.epochs,
            "backbone": args.backbone,
            "gpus": args.gpus,
            "logger": args.logger,
        }
        plans = plan_runs(grid, cells, results, overrides, args.seeds)
    except ConfigError as error:
        parser.exit(2, f"error: {one_line(error)}\n")
    import torch

    if args.dry_run:
        for plan in plans:
            state = "done" if plan.done else "todo"
            print(f"{state}  {plan.cell.id}  seed {plan.seed}  python -m experiments.run {shlex.join(plan.args)}")
        print(f"{len(plans)} runs, {sum(not p.done for p in plans)} to do, {len(cells)} cells")
        return 0
    started = time.time()
    try:
        failures = [] if args.table_only else execute(plans)
    except KeyboardInterrupt:
        parser.exit(130, "error: interrupted (Ctrl-C); finished runs are kept: run the same command to continue\n")
    given = argv if argv is not None else sys.argv[1:]
    command = "python -m experiments.case_study " + shlex.join([a for a in given if a != "--table-only"])
    header = (
        f"# Case study: {grid.name}\n\nRegenerate with `{command}`.\n"
        f"Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.machine()} "
        f"({cpu_name()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads): "
        f"{len(finished(plans))} runs, {total_wall_time(plans) / 60:.0f} min of training in all "
        + (
            "(table written from the finished runs with --table-only). "
            if args.table_only
            else f"(this invocation {time.time() - started:.0f} s). "
        )
        + "A row reports the result set its method names (by default the model of the last epoch).\n\n"
        + protocol()
    )
    try:
        write_results(grid, cells, results, args.seeds, header)
    except TableError as error:
        parser.exit(2, f"error: {one_line(error)}\n")
    print(f"table: {results / 'table.md'}")
    if grid.sweep is not None:
        print(f"sweep: {results / 'sweep.md'}")
    for plan, reason in failures:
        print(f"failed: {plan.cell.id} seed {plan.seed}: {reason}")
    if failures:  # a scheduler or script must not read a grid with failed runs as a success
        print(f"error: {len(failures)} of {len(plans)} runs failed (see the lines above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
