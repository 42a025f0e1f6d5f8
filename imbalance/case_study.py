"""The case-study grid: expand a YAML grid into runs, run the missing ones, tabulate mean ± std over seeds.

Each (cell, seed) is one `python -m experiments.run` process (the same code path a user runs, DDP
included), writing to `results/<name>/runs/<cell-id>/seed<k>/`. A run counts as finished only when its
summary.json exists (written atomically at the end of fitting); a half-finished run directory is deleted
and rerun, so nothing is ever half-counted and the grid resumes after a crash or Ctrl-C. A run directory
whose lock another live run holds (`imbalance.io.RunLock`: a second case study on the same results) is
never deleted: that run counts as failed here.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import io
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from imbalance.config import ConfigError, RunConfig, comparable
from imbalance.io import RunLock, atomic_write_text

REPORTS = ("last", "tuned_threshold", "posthoc_logit_adjusted")
COLUMNS = ("f1", "precision", "recall", "correct_pos", "correct_neg")


@dataclass
class Cell:
    id: str
    data: str
    method: str
    flags: dict[str, Any] = field(default_factory=dict)
    seeds: int | None = None
    lecture: dict[str, Any] = field(default_factory=dict)
    report: str = "last"
    runs_of: str | None = None


@dataclass
class Grid:
    name: str
    cells: list[Cell]
    defaults: dict[str, Any]
    seeds: int
    notes: str = ""  # printed under the table: what the rows can and cannot be compared with

    def seeds_of(self, cell: Cell, override: int | None = None) -> list[int]:
        return list(range(override if override is not None else (cell.seeds or self.seeds)))


def load_grid(path: Path) -> Grid:
    """Read and check a grid file: unknown keys, flags and references are errors naming the cell."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"--grid {path} cannot be read: {error}") from error
    known = {f.name for f in dataclasses.fields(Cell)}
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    cells = []
    for entry in raw.get("cells", []):
        unknown = set(entry) - known
        if unknown:
            raise ConfigError(f"--grid {path}: cell {entry.get('id')!r} has unknown keys {sorted(unknown)}")
        cell = Cell(**entry)
        bad_flags = set(cell.flags) - fields
        if bad_flags:
            raise ConfigError(f"--grid {path}: cell {cell.id!r} has unknown flags {sorted(bad_flags)}")
        if cell.report not in REPORTS:
            raise ConfigError(f"--grid {path}: cell {cell.id!r} report must be one of {REPORTS}")
        cells.append(cell)
    ids = [c.id for c in cells]
    if len(ids) != len(set(ids)):
        raise ConfigError(f"--grid {path}: duplicate cell ids")
    for cell in cells:
        if cell.runs_of is not None and cell.runs_of not in ids:
            raise ConfigError(f"--grid {path}: cell {cell.id!r} reuses unknown cell {cell.runs_of!r}")
    bad_defaults = set(raw.get("defaults", {})) - fields
    if bad_defaults:
        raise ConfigError(f"--grid {path}: unknown defaults {sorted(bad_defaults)}")
    return Grid(
        raw.get("name", Path(path).stem), cells, raw.get("defaults", {}), int(raw.get("seeds", 1)), raw.get("notes", "")
    )


def select(grid: Grid, pattern: str | None) -> list[Cell]:
    """Cells whose id matches one of the comma-separated globs or substrings of `pattern` (all if None)."""
    if pattern is None:
        return list(grid.cells)
    parts = [p.strip() for p in pattern.split(",") if p.strip()]
    return [c for c in grid.cells if any(fnmatch.fnmatch(c.id, p) or p in c.id for p in parts)]


def run_flags(values: dict[str, Any]) -> list[str]:
    """RunConfig values -> experiments.run command-line flags."""
    args: list[str] = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            args += [flag, ",".join(str(v) for v in value)]
        else:
            args += [flag, str(value)]
    return args


@dataclass
class Plan:
    cell: Cell
    seed: int
    run_dir: Path
    args: list[str]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        """Finished, and with the same configuration: a run made with other flags (say another --scale)
        is not counted, it is rerun."""
        summary = self.run_dir / "summary.json"
        if not summary.is_file():
            return False
        recorded = RunConfig.from_dict(json.loads(summary.read_text()).get("config", {})).to_dict()  # fills defaults
        recorded, planned = comparable(recorded), comparable(self.config)  # a run stores its data folder resolved
        return all(recorded.get(k) == v for k, v in planned.items() if k not in IGNORED_FOR_DONE)


IGNORED_FOR_DONE = {"out", "run_name", "num_workers", "resume", "overwrite", "logger", "autobalance_params"}


def plan_runs(grid: Grid, cells: list[Cell], results: Path, overrides: dict[str, Any], seeds: int | None) -> list[Plan]:
    """Every (cell, seed) to train, seed-major so that a partial grid has every cell at seed 0 first."""
    plans = []
    trained = [c for c in cells if c.runs_of is None]
    by_id = {c.id: c for c in grid.cells}
    for cell in cells:  # cells that report another cell's runs need that cell trained
        if cell.runs_of is not None and by_id[cell.runs_of] not in trained:
            trained.append(by_id[cell.runs_of])
    max_seeds = max((len(grid.seeds_of(c, seeds)) for c in trained), default=0)
    for seed in range(max_seeds):
        for cell in trained:
            if seed not in grid.seeds_of(cell, seeds):
                continue
            values = {**grid.defaults, **cell.flags, **{k: v for k, v in overrides.items() if v is not None}}
            run_dir = results / "runs" / cell.id / f"seed{seed}"
            values.update(seed=seed, out=str(run_dir), run_name=f"{grid.name}/{cell.id}/seed{seed}")
            config = RunConfig.from_dict(values).validate()  # a bad cell fails before anything trains
            plans.append(Plan(cell, seed, run_dir, run_flags(values), config.to_dict()))
    return plans


def total_wall_time(plans: list[Plan]) -> float:
    """Seconds of training behind the finished runs (their own wall times, resumed parts included)."""
    return sum(json.loads((p.run_dir / "summary.json").read_text()).get("wall_time_s", 0.0) for p in plans if p.done)


def execute(plans: list[Plan], log: Any = print) -> list[tuple[Plan, str]]:
    """Run the unfinished plans one after another; return the failures with their last output lines."""
    failures = []
    for i, plan in enumerate(plans, 1):
        if plan.done:
            log(f"[{i}/{len(plans)}] {plan.cell.id} seed {plan.seed}: done, skipped")
            continue
        holder = RunLock(plan.run_dir).held_by_other()
        if holder is not None:  # another process is training this run right now: never delete its files
            reason = f"{plan.run_dir} is in use by another run ({RunLock.describe(holder)})"
            failures.append((plan, reason))
            log(f"[{i}/{len(plans)}] {plan.cell.id} seed {plan.seed}: skipped, {reason}")
            continue
        if plan.run_dir.exists():
            shutil.rmtree(plan.run_dir)  # half-finished: rerun from scratch, never half-count
        plan.run_dir.mkdir(parents=True)
        log(f"[{i}/{len(plans)}] {plan.cell.id} seed {plan.seed}: python -m experiments.run {' '.join(plan.args)}")
        started = time.time()
        with open(plan.run_dir / "run.log", "w") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "experiments.run", *plan.args], stdout=out, stderr=subprocess.STDOUT
            )
            try:
                code = process.wait()
            except KeyboardInterrupt:  # the run got the same Ctrl-C: let it clean up and free its folder
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                raise
        if code != 0:
            tail = (plan.run_dir / "run.log").read_text().strip().splitlines()[-3:]
            failures.append((plan, " / ".join(tail)))
            log(f"    failed (exit {code}) after {time.time() - started:.0f} s: {' / '.join(tail)}")
        else:
            log(f"    finished in {time.time() - started:.0f} s")
    return failures


def _row_numbers(summary: dict[str, Any], report: str) -> dict[str, float] | None:
    if report == "last":
        m = (summary.get("last") or {}).get("metrics")
        if not m:
            return None
        return {
            "f1": m["val/f1"],
            "precision": m["val/precision"],
            "recall": m["val/recall"],
            "correct_pos": m["val/tp"],
            "correct_neg": m["val/tn"],
        }
    m = summary.get(report)
    if not m:
        return None
    return {
        "f1": m["f1"],
        "precision": m["precision"],
        "recall": m["recall"],
        "correct_pos": m["tp"],
        "correct_neg": m["tn"],
    }


def collect(grid: Grid, cells: list[Cell], results: Path, seeds: int | None) -> list[dict[str, Any]]:
    """One table row per cell: mean and std over the finished seeds (failed or missing seeds are counted)."""
    by_id = {c.id: c for c in grid.cells}
    rows = []
    for cell in cells:
        source = by_id[cell.runs_of] if cell.runs_of else cell
        numbers, val_sizes, failed = [], [], 0
        for seed in grid.seeds_of(source, seeds):
            run_dir = results / "runs" / source.id / f"seed{seed}"
            summary_file = run_dir / "summary.json"
            if summary_file.is_file():
                summary = json.loads(summary_file.read_text())
                values = _row_numbers(summary, cell.report)
                if values is not None:
                    numbers.append(values)
                    val_sizes.append(summary["val_counts"])
            elif (run_dir / "run.log").is_file():
                failed += 1
        row: dict[str, Any] = {
            "id": cell.id,
            "data": cell.data,
            "method": cell.method,
            "seeds": len(numbers),
            "failed": failed,
            "lecture": cell.lecture,
            "val_counts": val_sizes[0] if val_sizes else None,
        }
        for column in COLUMNS:
            values = np.array([n[column] for n in numbers], dtype=float)
            row[column] = (
                (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0) if len(values) else None
            )
        rows.append(row)
    return rows


def _fmt(value: tuple[float, float] | None, digits: int, seeds: int) -> str:
    if value is None:
        return "–"
    mean, std = value
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if seeds > 1 else f"{mean:.{digits}f}"


def render_table(rows: list[dict[str, Any]], header: str) -> tuple[str, str]:
    """(markdown, csv) of the table; correct cats/dogs are out of each run's own validation counts."""
    lines = [
        header,
        "",
        "| data | method | seeds | F1 | precision | recall | correct cats | correct dogs | lecture F1 (VGG16) | lecture cats / dogs of 1500 | lecture F1 (ResNet) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        [
            "id",
            "data",
            "method",
            "seeds",
            "failed",
            *[f"{c}_{s}" for c in COLUMNS for s in ("mean", "std")],
            "val_pos",
            "val_neg",
            "lecture_f1",
            "lecture_cats",
            "lecture_dogs",
            "lecture_resnet_f1",
        ]
    )
    for row in rows:
        lec = row["lecture"]
        seeds = row["seeds"]
        val = row["val_counts"] or {}
        val_pos, val_neg = (list(val.values())[1], list(val.values())[0]) if val else ("", "")
        seeds_text = f"{seeds}" + (f" ({row['failed']} failed)" if row["failed"] else "")
        lines.append(
            f"| {row['data']} | {row['method']} | {seeds_text} | {_fmt(row['f1'], 3, seeds)} | {_fmt(row['precision'], 3, seeds)} "
            f"| {_fmt(row['recall'], 3, seeds)} | {_fmt(row['correct_pos'], 0, seeds)}{f' / {val_pos}' if val else ''} "
            f"| {_fmt(row['correct_neg'], 0, seeds)}{f' / {val_neg}' if val else ''} | {lec.get('f1', '')} "
            f"| {lec.get('cats', '')}{' / ' if 'cats' in lec else ''}{lec.get('dogs', '')} | {lec.get('resnet_f1', '')} |"
        )
        flat = [v for c in COLUMNS for v in (row[c] if row[c] is not None else ("", ""))]
        writer.writerow(
            [
                row["id"],
                row["data"],
                row["method"],
                seeds,
                row["failed"],
                *flat,
                val_pos,
                val_neg,
                lec.get("f1", ""),
                lec.get("cats", ""),
                lec.get("dogs", ""),
                lec.get("resnet_f1", ""),
            ]
        )
    return "\n".join(lines) + "\n", buffer.getvalue()


def plot_table(rows: list[dict[str, Any]], path: Path) -> None:
    """Bar chart of F1 (mean ± std over seeds) per cell, with the lecture's F1 as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["f1"] is not None or isinstance(r["lecture"].get("f1"), (int, float))]
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(shown) + 1.5))
    y = np.arange(len(shown))
    means = [r["f1"][0] if r["f1"] else 0 for r in shown]
    stds = [r["f1"][1] if r["f1"] else 0 for r in shown]
    ax.barh(y, means, xerr=stds, color="#4c72b0", alpha=0.85, label="this repository (mean ± std over seeds)")
    for i, r in enumerate(shown):
        for key, marker, color, label in (
            ("f1", "D", "#dd8452", "lecture, VGG16 (TF)"),
            ("resnet_f1", "o", "#55a868", "lecture, ResNet (PyTorch)"),
        ):
            value = r["lecture"].get(key)
            if isinstance(value, (int, float)):
                ax.plot(value, i, marker, color=color, label=label)
    ax.set_yticks(y, [f"{r['data']}: {r['method']}" for r in shown], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1 of the positive class (cat) on validation")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), loc="lower right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    from imbalance.io import atomic_write_bytes

    atomic_write_bytes(path, buffer.getvalue())


def write_results(grid: Grid, cells: list[Cell], results: Path, seeds: int | None, header: str) -> list[dict[str, Any]]:
    rows = collect(grid, cells, results, seeds)
    markdown, table_csv = render_table(rows, header)
    if grid.notes:
        markdown += "\n" + grid.notes.strip() + "\n"
    atomic_write_text(results / "table.md", markdown)
    atomic_write_text(results / "table.csv", table_csv)
    plot_table(rows, results / "table.png")
    return rows
