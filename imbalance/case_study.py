"""The case-study grid: expand a YAML grid into runs, run the missing ones, and tabulate them with statistics.

Each (cell, seed) is one `python -m experiments.run` process (the same code path a user runs, DDP
included), writing to `results/<name>/runs/<cell-id>/seed<k>/`. A run counts as finished only when its
summary.json exists (written atomically at the end of fitting); a half-finished run directory is deleted
and rerun, so nothing is ever half-counted and the grid resumes after a crash or Ctrl-C. A run directory
whose lock another live run holds (`imbalance.io.RunLock`: a second case study on the same results) is
never deleted: that run counts as failed here.

The table (`collect`, `render_table`, `plot_table`) is built from the run files alone (summary.json and
predictions.csv), so `--table-only` rebuilds it on a fresh clone: a row is one `summary["results"][report]`
of each seed's run; mean ± sample std over seeds, the seed-and-photo bootstrap interval and the paired
difference to the data set's baseline come from `imbalance.stats`, with a fixed bootstrap seed. Per data set
an all-cat (no-skill) row says what the trivial answer scores, and each row that does not beat it is flagged.

A grid with a top-level `sweep` (issue 16: the imbalance ratio) also places every cell at a point (`x`, `series`):
`render_sweep` and `plot_sweep` write the same rows as sweep.md (a table per metric, series by x) and sweep.png
(lines against x on a log axis), with the average precision's interval from the same draws as F1's.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import io
import json
import math
import shutil
import subprocess
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import yaml

from imbalance import stats
from imbalance.config import ConfigError, RunConfig, comparable
from imbalance.io import RunLock, atomic_write_text

# which of a run's result sets (summary.json "results") fills a row; all but last_epoch need a dev split
REPORTS = ("last_epoch", "dev_selected_checkpoint", "dev_tuned_threshold", "posthoc_la")
DEV_REPORTS = REPORTS[1:]  # a run records these only with a dev split (posthoc_la also with a fixed --posthoc-la)
# (table column, key of a summary.json result set) of the mean ± std columns
COLUMNS = (
    ("f1", "f1"),
    ("balanced_accuracy", "balanced_accuracy"),
    ("average_precision", "average_precision"),
    ("correct_pos", "tp"),
    ("correct_neg", "tn"),
    ("precision", "precision"),
    ("recall", "recall"),
)
GRID_KEYS = {"name", "defaults", "seeds", "notes", "cells", "cells_from", "baselines", "sweep"}
CELL_REQUIRED = ("id", "data", "method")
SWEEP_KEYS = {"x_label"}  # of the top-level `sweep` mapping
SWEEP_CELL_KEYS = ("x", "series")  # what places a cell of a sweep grid: its x (the log axis) and its line
# (Row.means column, Row interval attribute, what it is) of each table of sweep.md and panel of sweep.png
SWEEP_METRICS = (
    ("f1", "f1_ci", "F1 of the positive class (cat)"),
    ("balanced_accuracy", "ba_ci", "Balanced accuracy"),
    ("average_precision", "ap_ci", "Average precision"),
)
MIN_SEEDS_FOR_INTERVAL = 3  # fewer seeds say nothing about the seed-to-seed spread
BOOTSTRAP_REPLICATES = stats.DEFAULT_REPLICATES
BOOTSTRAP_SEED = 14  # fixed: the same run files always give the same table (issue 14)
RECOMPUTE_TOLERANCE = 1e-9
NO_SKILL_METHOD = "all-cat predictor (no skill)"
NOT_BETTER = "no better than all-cat"
BETTER = "beats all-cat"
FEW_SEEDS = "n<3"


class TableError(ValueError):
    """The run files disagree with each other or with the grid; the message names the file and the fix."""


def one_line(error: BaseException | str) -> str:
    """An error message on one line (YAML and some OS errors span several)."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def protocol(replicates: int = BOOTSTRAP_REPLICATES, seed: int = BOOTSTRAP_SEED) -> str:
    """How the table's numbers were made, for its header."""
    return (
        "Protocol: every decision (the checkpoint, the threshold, the post-hoc τ) is made on a dev split carved "
        "from the training data; the validation set is reported once and never tuned on. Cells are mean ± sample "
        f"std (ddof 1) over seeds; [a, b] is the 95% {stats.METHOD}, B = {replicates} replicates, bootstrap seed "
        f"{seed}; Δ is the paired difference to the data set's baseline row on the same seeds and the same "
        f"resampled photos. Rows with fewer than {MIN_SEEDS_FOR_INTERVAL} seeds get no interval ({FEW_SEEDS}). "
        f"'{NOT_BETTER}': the F1 interval reaches down to the all-cat predictor's F1, or the balanced-accuracy "
        "interval reaches 0.5."
    )


@dataclass
class Cell:
    id: str
    data: str
    method: str
    flags: dict[str, Any] = field(default_factory=dict)
    seeds: int | None = None
    lecture: dict[str, Any] = field(default_factory=dict)
    report: str = "last_epoch"
    runs_of: str | None = None
    stage1: str | None = None  # a decoupled stage 2 (flag decoupled) starts from this cell's run of the same seed
    x: float | None = None  # in a sweep grid: the cell's place on the x axis (say, the imbalance ratio)
    series: str | None = None  # in a sweep grid: the line the cell is a point of


@dataclass
class Grid:
    name: str
    cells: list[Cell]
    defaults: dict[str, Any]
    seeds: int
    notes: str = ""  # printed under the table: what the rows can and cannot be compared with
    baselines: dict[str, str] = field(default_factory=dict)  # data set -> the cell every row's Δ is taken to
    path: Path | None = None  # the grid file, for error messages
    sweep: dict[str, Any] | None = None  # {x_label: ...}: the cells are points (x, series) of a sweep as well

    def flags_of(self, cell: Cell) -> dict[str, Any]:
        """The options of the cell's runs: the grid's defaults, its stage-1 cell's flags (a stage 2 keeps the
        stage-1 run's model and data), then its own."""
        stage1 = next((c.flags for c in self.cells if c.id == cell.stage1), {}) if cell.stage1 else {}
        return {**self.defaults, **stage1, **cell.flags}

    def seeds_of(self, cell: Cell, override: int | None = None) -> list[int]:
        if override is not None:
            return list(range(override))
        return list(range(cell.seeds if cell.seeds is not None else self.seeds))


_OPTION_TYPES = typing.get_type_hints(RunConfig)
_TYPE_NAMES = {
    bool: "true or false",
    int: "a whole number",
    float: "a number",
    str: "text",
    Path: "a path",
    tuple: "a list such as [1, 2]",
    dict: "a mapping",
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fits(kind: Any, value: Any) -> bool:
    origin = typing.get_origin(kind) or kind
    if kind is Any:
        return True
    if origin is bool:
        return isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is float:
        return _is_number(value)
    if origin in (str, Path):
        return isinstance(value, str)
    if origin is tuple:
        item = typing.get_args(kind)[0] if typing.get_args(kind) else Any
        return isinstance(value, list) and all(_fits(item, v) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return True


def _option_problem(name: str, value: Any) -> str | None:
    """Why `value` (from YAML) cannot be the RunConfig option `name`; None when it can."""
    hint = _OPTION_TYPES[name]
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        return None if type(None) in kinds else "must be given a value, not null"
    if any(_fits(kind, value) for kind in kinds if kind is not type(None)):
        return None
    wanted = " or ".join(_TYPE_NAMES.get(typing.get_origin(k) or k, str(k)) for k in kinds if k is not type(None))
    problem = f"must be {wanted}, got {value!r}"
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            pass
        else:  # YAML 1.1 reads 1e-3 (no dot) as text
            problem += " (text: YAML reads a number such as 1e-3 as text; write 0.001 or 1.0e-3)"
    return problem


def _count_problem(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return None
    return f"must be a whole number of seeds, at least 1, got {value!r}"


def load_grid(path: Path) -> Grid:
    """Read and check a grid file: unknown keys, flags and references, values of the wrong type and cells no
    run can fill are errors naming the grid file and the cell."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"--grid {path} cannot be read: {one_line(error)}") from error

    def fail(message: str, cell: Any = None) -> NoReturn:
        where = f"--grid {path}" + ("" if cell is None else f": cell {cell!r}")
        raise ConfigError(f"{where}: {message}")

    if not isinstance(raw, dict):
        fail("must be a mapping with 'cells' (see experiments/case_study.yaml)")
    unknown_keys = set(raw) - GRID_KEYS
    if unknown_keys:
        fail(f"unknown top-level keys {sorted(unknown_keys)}; known: {sorted(GRID_KEYS)}")
    if "cells_from" in raw:  # another grid's cells (and baselines) with this grid's defaults: same rows, new recipe
        source = raw["cells_from"]
        if "cells" in raw:
            fail("has both cells and cells_from; keep one (cells_from takes the cells of another grid file)")
        if not isinstance(source, str) or not source:
            fail(f"cells_from must name a grid file (relative to this one), got {source!r}")
        other = path.parent / source
        try:
            other_raw = yaml.safe_load(other.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            fail(f"cells_from {source}: {other} cannot be read: {one_line(error)}")
        if not isinstance(other_raw, dict) or "cells" not in other_raw:
            fail(f"cells_from {source}: {other} has no cells of its own to take")
        raw = {**raw, "cells": other_raw["cells"], "baselines": raw.get("baselines", other_raw.get("baselines"))}
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name:
        fail(f"name must be text (it names the folder results/<name>), got {name!r}")
    notes = raw.get("notes") or ""
    if not isinstance(notes, str):
        fail(f"notes must be text, got {type(notes).__name__}")
    sweep = raw.get("sweep")
    if sweep is not None:
        if not isinstance(sweep, dict):
            fail(f"sweep must be a mapping such as {{x_label: training dogs per cat}}, got {sweep!r}")
        if set(sweep) - SWEEP_KEYS:
            fail(f"unknown sweep keys {sorted(set(sweep) - SWEEP_KEYS, key=str)}; known: {sorted(SWEEP_KEYS)}")
        x_label = sweep.get("x_label", "x")
        if not isinstance(x_label, str) or not x_label:
            fail(f"sweep: x_label must be text (it names the x axis of sweep.png), got {x_label!r}")
        sweep = {**sweep, "x_label": x_label}
    seeds = raw.get("seeds", 1)
    if _count_problem(seeds):
        fail(f"seeds {_count_problem(seeds)}")
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        fail(f"defaults must map experiments.run options to values, e.g. {{epochs: 6}}, got {defaults!r}")
    bad_defaults = set(defaults) - fields
    if bad_defaults:
        fail(f"unknown defaults {sorted(bad_defaults, key=str)}")
    for key, value in defaults.items():
        if problem := _option_problem(key, value):
            fail(f"defaults: {key} {problem}")
    entries = raw.get("cells")
    if not isinstance(entries, list) or not entries:
        fail("cells must be a list of cells, each a mapping with id, data and method (see experiments/case_study.yaml)")
    known = {f.name for f in dataclasses.fields(Cell)}
    cells = []
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            fail(f"cell {number} is {entry!r}, not a mapping with id, data and method")
        label = entry.get("id", f"number {number}")
        unknown = set(entry) - known
        if unknown:
            fail(f"unknown keys {sorted(unknown, key=str)}; known: {sorted(known)}", label)
        missing = [k for k in CELL_REQUIRED if k not in entry]
        if missing:
            fail(f"lacks {', '.join(missing)} (every cell needs {', '.join(CELL_REQUIRED)})", label)
        for key in CELL_REQUIRED:
            if not isinstance(entry[key], str) or not entry[key]:
                fail(f"{key} must be text, got {entry[key]!r}", label)
        cell_id = entry["id"]
        parts = cell_id.split("/")
        if cell_id.startswith("/") or any(p in ("", ".", "..") for p in parts):
            fail("the id names the folder runs/<id>: use names such as balanced/ce, without '..' or empty parts", label)
        entry = {**entry, "flags": entry.get("flags") or {}, "lecture": entry.get("lecture") or {}}
        cell = Cell(**entry)
        if not isinstance(cell.flags, dict):
            fail(f"flags must map experiments.run options to values, got {cell.flags!r}", cell_id)
        if not isinstance(cell.lecture, dict):
            fail(f"lecture must be a mapping such as {{f1: 0.9, cats: 10, dogs: 20}}, got {cell.lecture!r}", cell_id)
        bad_flags = set(cell.flags) - fields
        if bad_flags:
            fail(f"has unknown flags {sorted(bad_flags, key=str)}", cell_id)
        for key, value in cell.flags.items():
            if problem := _option_problem(key, value):
                fail(f"flag {key} {problem}", cell_id)
        if cell.seeds is not None and _count_problem(cell.seeds):
            fail(f"seeds {_count_problem(cell.seeds)} (leave seeds out for the grid's {seeds})", cell_id)
        if not isinstance(cell.report, str) or cell.report not in REPORTS:
            fail(f"report must be one of {REPORTS}, got {cell.report!r}", cell_id)
        placed = [k for k in SWEEP_CELL_KEYS if entry.get(k) is not None]
        if sweep is None and placed:  # a point of no sweep would be drawn nowhere: say so rather than drop it
            fail(
                f"has {' and '.join(placed)}, which place a cell in a sweep, but the grid has no top-level sweep; "
                "add one (e.g. sweep: {x_label: training dogs per cat}) or drop them",
                cell_id,
            )
        if sweep is not None:
            if len(placed) < len(SWEEP_CELL_KEYS):
                lacking = " and ".join(k for k in SWEEP_CELL_KEYS if k not in placed)
                fail(
                    f"lacks {lacking} (in a grid with sweep every cell needs x, its place on the x axis, and series, its line)",
                    cell_id,
                )
            if not _is_number(cell.x) or not math.isfinite(cell.x) or cell.x <= 0:
                fail(f"x must be a positive number (its place on the sweep's log axis), got {cell.x!r}", cell_id)
            if not isinstance(cell.series, str) or not cell.series:
                fail(f"series must be text (the name of its line in sweep.png), got {cell.series!r}", cell_id)
        cells.append(cell)
    ids = [c.id for c in cells]
    if len(ids) != len(set(ids)):
        fail(f"duplicate cell ids {sorted({i for i in ids if ids.count(i) > 1})}")
    points: dict[tuple[str, float], str] = {}
    for cell in cells if sweep is not None else []:  # one cell per point, or sweep.md would have to pick one
        point = (str(cell.series), float(cell.x))  # type: ignore[arg-type]
        if point in points:
            fail(
                f"is series {cell.series!r} at x {cell.x:g}, as cell {points[point]!r} is: each (series, x) is one "
                "point of the sweep; change the x or the series of one of them",
                cell.id,
            )
        points[point] = cell.id
    by_id = {c.id: c for c in cells}
    for cell in cells:
        if cell.runs_of is None:
            continue
        if not isinstance(cell.runs_of, str) or cell.runs_of not in by_id:
            fail(f"reuses unknown cell {cell.runs_of!r}", cell.id)
        if by_id[cell.runs_of].runs_of is not None:
            fail(
                f"runs_of must name a trained cell, but {cell.runs_of!r} itself reuses {by_id[cell.runs_of].runs_of!r}",
                cell.id,
            )
    for cell in cells:  # a decoupled stage 2 and the cell whose runs it starts from
        if cell.stage1 is None:
            if cell.flags.get("decoupled") is not None:
                fail("has flag decoupled but no stage1: name the cell whose runs stage 2 starts from", cell.id)
            continue
        source = by_id.get(cell.stage1) if isinstance(cell.stage1, str) else None
        if source is None:
            fail(f"stage1 names unknown cell {cell.stage1!r}", cell.id)
        if cell.flags.get("decoupled") is None:
            fail(f"has stage1 {cell.stage1!r} but no flag decoupled (crt, tau-norm, lws or maxnorm)", cell.id)
        if cell.runs_of is not None:
            fail("has both runs_of and stage1: a cell either reuses runs or trains a stage 2", cell.id)
        if source.runs_of is not None or source.stage1 is not None or source.flags.get("decoupled") is not None:
            fail(f"stage1 must name a plain trained cell, but {source.id!r} is not one", cell.id)
        own, theirs = (c.seeds if c.seeds is not None else seeds for c in (cell, source))
        if own > theirs:
            fail(f"has {own} seeds but its stage1 {source.id!r} only {theirs}", cell.id)
    default_dev = RunConfig().dev_fraction
    for cell in cells:  # a result set that needs a dev split, over runs made without one, is never there
        if cell.report not in DEV_REPORTS:
            continue
        source = by_id[cell.runs_of] if cell.runs_of else cell
        values = {**defaults, **(by_id[source.stage1].flags if source.stage1 else {}), **source.flags}
        if values.get("dev_fraction", default_dev) != 0:
            continue
        if cell.report == "posthoc_la" and values.get("posthoc_la") is not None:
            continue  # τ fixed by --posthoc-la: no dev split needed
        where = "its runs" if source is cell else f"the runs of {source.id!r}"
        fix = "a fixed posthoc_la flag or " if cell.report == "posthoc_la" else ""
        fail(
            f"report {cell.report!r} is chosen on a dev split, but {where} set dev_fraction 0 (no dev split), so "
            f"no run can fill this row; give {fix}a dev_fraction above 0, or report last_epoch",
            cell.id,
        )
    baselines = raw.get("baselines") or {}
    if not isinstance(baselines, dict):
        fail("baselines must map a data set to a cell id, e.g. {balanced: balanced/ce}")
    for data, cell_id in baselines.items():
        if not isinstance(cell_id, str) or cell_id not in by_id:
            fail(f"the baseline of {data!r} is {cell_id!r}, which is not a cell id")
        if by_id[cell_id].data != data:
            fail(
                f"the baseline of {data!r} is {cell_id!r}, a cell of data {by_id[cell_id].data!r}; "
                "a baseline must be trained on the same data"
            )
    return Grid(name, cells, dict(defaults), seeds, notes, dict(baselines), path, sweep)


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
        """Finished, and with the same configuration: a run made with other flags (say another --scale), or
        by an earlier version that lacked a planned option (a run from before the dev split), is not counted,
        it is rerun; so is a run whose summary.json cannot be read."""
        summary = self.run_dir / "summary.json"
        if not summary.is_file():
            return False
        try:
            stored = json.loads(summary.read_text(encoding="utf-8"))["config"]
            recorded = comparable(RunConfig.from_stored(stored).to_dict())  # fills defaults; paths resolved
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # cut off, edited, not a summary
            return False
        planned = comparable(self.config)  # a run stores its data folder resolved
        return all(recorded.get(k) == v for k, v in planned.items() if k not in IGNORED_FOR_DONE)


IGNORED_FOR_DONE = {"out", "run_name", "num_workers", "resume", "overwrite", "logger", "autobalance_params"}


def plan_runs(grid: Grid, cells: list[Cell], results: Path, overrides: dict[str, Any], seeds: int | None) -> list[Plan]:
    """Every (cell, seed) to train, seed-major so that a partial grid has every cell at seed 0 first."""
    if seeds is not None and _count_problem(seeds):
        raise ConfigError(f"--seeds {_count_problem(seeds)}")
    plans = []
    trained = [c for c in cells if c.runs_of is None]
    by_id = {c.id: c for c in grid.cells}
    for cell in cells:  # cells that report another cell's runs need that cell trained
        if cell.runs_of is not None and by_id[cell.runs_of] not in trained:
            trained.append(by_id[cell.runs_of])
    for cell in list(trained):  # a stage 2 needs its stage-1 runs, trained before it (seed by seed)
        if cell.stage1 is not None and by_id[cell.stage1] not in trained:
            trained.append(by_id[cell.stage1])
    trained.sort(key=lambda c: c.stage1 is not None)  # stable: stage-1 cells first, in grid order
    max_seeds = max((len(grid.seeds_of(c, seeds)) for c in trained), default=0)
    for seed in range(max_seeds):
        for cell in trained:
            if seed not in grid.seeds_of(cell, seeds):
                continue
            values = {**grid.flags_of(cell), **{k: v for k, v in overrides.items() if v is not None}}
            run_dir = results / "runs" / cell.id / f"seed{seed}"
            if cell.stage1 is not None:
                values["from_run"] = str(results / "runs" / cell.stage1 / f"seed{seed}")
            values.update(seed=seed, out=str(run_dir), run_name=f"{grid.name}/{cell.id}/seed{seed}")
            try:  # a bad cell fails before anything trains
                config = RunConfig.from_dict(values).validate()
            except (ConfigError, TypeError, ValueError) as error:
                raise ConfigError(f"--grid {grid.path or grid.name}: cell {cell.id!r}: {one_line(error)}") from error
            plans.append(Plan(cell, seed, run_dir, run_flags(values), config.to_dict()))
    return plans


def finished(plans: list[Plan]) -> list[Plan]:
    """Plans whose run wrote its summary.json (what the table counts; on a fresh clone `done` may not hold,
    since a run stores its data folder resolved on the machine that trained it)."""
    return [p for p in plans if (p.run_dir / "summary.json").is_file()]


def _wall_time(plan: Plan) -> float:
    try:
        seconds = float(json.loads((plan.run_dir / "summary.json").read_text(encoding="utf-8"))["wall_time_s"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # unreadable: the table says which file
        return 0.0
    return seconds if math.isfinite(seconds) and seconds > 0 else 0.0


def total_wall_time(plans: list[Plan]) -> float:
    """Seconds of training behind the finished runs (their own wall times, resumed parts included); a
    summary.json that cannot be read adds nothing."""
    return sum(_wall_time(p) for p in finished(plans))


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
            tail = (plan.run_dir / "run.log").read_text(errors="replace").strip().splitlines()[-3:]
            failures.append((plan, " / ".join(tail)))
            log(f"    failed (exit {code}) after {time.time() - started:.0f} s: {' / '.join(tail)}")
        else:
            log(f"    finished in {time.time() - started:.0f} s")
    return failures


# ---------------------------------------------------------------- the table: reading the runs


@dataclass
class Run:
    """One seed's run as a row sees it: its result set and the validation predictions it came from."""

    seed: int
    run_dir: Path
    result: dict[str, Any]  # summary.json results[report]
    positives: int  # the run's own validation counts
    negatives: int
    paths: tuple[str, ...]  # validation photos, in predictions.csv order
    labels: np.ndarray  # (N,) 0/1
    predicted: np.ndarray  # (N,) bool: prob > threshold, the rule the run used
    finite: bool  # False for a diverged model (NaN probabilities): no interval, NaN metrics
    # val ECE of the row's model before and after the temperature fitted on dev (summary.json "calibration");
    # None for a run written before runs recorded it, or without a fitted temperature
    ece: tuple[float, float | None] | None = None
    probs: np.ndarray | None = None  # (N,) P(positive) behind `predicted`: what average precision ranks


@dataclass
class Row:
    id: str
    data: str
    method: str
    kind: str = "trained"  # or "no_skill"
    report: str = ""
    seeds: list[int] = field(default_factory=list)  # seeds with numbers
    failed: int = 0
    unreported: int = 0  # finished runs without this result set (a run without a dev split)
    lecture: dict[str, Any] = field(default_factory=dict)
    val: tuple[int, int] | None = None  # (positives, negatives) of the validation set
    means: dict[str, tuple[float, float] | None] = field(default_factory=dict)  # column -> (mean, sample std)
    f1_ci: tuple[float, float] | None = None
    ba_ci: tuple[float, float] | None = None
    ap_ci: tuple[float, float] | None = None  # computed for a sweep grid only (sweep.md, sweep.png)
    baseline: str | None = None  # the data set's baseline cell (None: the grid names none)
    delta_f1: stats.Difference | None = None
    delta_ba: stats.Difference | None = None
    no_skill_f1: float | None = None
    verdict: str = ""  # BETTER, NOT_BETTER, FEW_SEEDS, "non-finite predictions", "no skill" or ""

    @property
    def is_baseline(self) -> bool:
        return self.baseline == self.id


class _Reader:
    """Reads each run file once (a runs_of row rereads its source's runs) and draws each resample once."""

    def __init__(self, replicates: int, seed: int) -> None:
        self.replicates, self.seed = replicates, seed
        self._predictions: dict[Path, dict[str, list[str]]] = {}
        self._draws: dict[tuple[tuple[int, ...], bytes], stats.Resample] = {}

    def predictions(self, path: Path) -> dict[str, list[str]]:
        if path not in self._predictions:
            if not path.is_file():
                raise TableError(f"{path} is missing: the table needs each run's predictions.csv; rerun the run")
            try:
                with path.open(newline="", encoding="utf-8") as handle:
                    rows = list(csv.DictReader(handle))
            except (OSError, UnicodeDecodeError, csv.Error) as error:
                raise TableError(
                    f"{path} cannot be read as a UTF-8 CSV file ({one_line(error)}); the run's files are damaged: "
                    f"delete {path.parent} and run the case study again to redo it"
                ) from error
            if not rows or "path" not in rows[0] or "label" not in rows[0]:
                raise TableError(f"{path} has no rows with 'path' and 'label' columns; rerun the run")
            for line, row in enumerate(rows, 2):
                if None in row or None in row.values():
                    raise TableError(
                        f"{path} line {line} has {'more' if None in row else 'fewer'} fields than its header; "
                        f"the file is damaged: delete {path.parent} and run the case study again to redo it"
                    )
            self._predictions[path] = {key: [r[key] for r in rows] for key in rows[0]}
        return self._predictions[path]

    def resample(self, labels: np.ndarray, cell: Cell) -> stats.Resample:
        key = (labels.shape, labels.tobytes())
        if key not in self._draws:
            try:
                self._draws[key] = stats.draw(labels, self.replicates, self.seed)
            except ValueError as error:
                raise TableError(f"cell {cell.id!r}: {error}; rerun its runs with one --scale") from error
        return self._draws[key]

    def run(self, run_dir: Path, seed: int, report: str) -> Run | None:
        """The run's result set `report` (None when the run has none: no dev split), checked against its
        predictions.csv: F1 and balanced accuracy recomputed from the predictions must equal the summary's."""
        summary_file = run_dir / "summary.json"
        redo = f"delete {run_dir} and run the case study again (without --table-only) to redo the run"
        try:
            summary = json.loads(summary_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:  # ValueError: not JSON, or not UTF-8
            raise TableError(f"{summary_file} cannot be read as JSON ({one_line(error)}); {redo}") from error
        if not isinstance(summary, dict):
            raise TableError(f"{summary_file} holds a JSON {type(summary).__name__}, not a run summary; {redo}")
        try:
            results = summary["results"]
            class_names = summary["class_names"]
            positives = int(summary["val_counts"][class_names["positive"]])
            negatives = int(summary["val_counts"][class_names["negative"]])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise TableError(
                f"{summary_file} lacks results/class_names/val_counts ({error!r}): written by an older "
                "experiments.run; rerun the run with --overwrite"
            ) from error
        if not isinstance(results, dict):
            raise TableError(
                f"{summary_file}: 'results' must map each result set's name to its numbers, got a "
                f"{type(results).__name__}; {redo}"
            )
        result = results.get(report)
        if result is None:
            return None
        if not isinstance(result, dict):
            raise TableError(f"{summary_file}: results[{report!r}] is {result!r}, not a mapping of numbers; {redo}")
        column = result.get("predictions")
        if not isinstance(column, str):
            raise TableError(
                f"{summary_file}: results[{report!r}] lacks 'predictions' (the predictions.csv column it was "
                f"computed from), got {column!r}; {redo}"
            )
        for key in RESULT_NUMBERS:
            if key not in result:
                raise TableError(f"{summary_file}: results[{report!r}] lacks {key!r}; {redo}")
            if not _is_number(result[key]):
                raise TableError(
                    f"{summary_file}: results[{report!r}][{key!r}] is {result[key]!r}, not a number; {redo}"
                )
        threshold = float(result["threshold"])
        predictions_file = run_dir / "predictions.csv"
        table = self.predictions(predictions_file)
        if column not in table:
            raise TableError(
                f"{predictions_file} has no column {column!r}, which summary.json's results[{report!r}] "
                "was computed from; rerun the run"
            )
        # the run wrote float32 probabilities with 9 significant digits and compared them, widened to float64,
        # with the threshold: read them back the same way (as float32, then widened), or a threshold equal to a
        # probability can land on the other side of the decimal that was written
        try:
            with np.errstate(over="ignore"):
                probs = np.asarray(table[column], dtype=np.float32).astype(np.float64)
        except ValueError as error:
            line, bad = next(((i, v) for i, v in enumerate(table[column], 2) if not _parses(v)), (0, ""))
            raise TableError(
                f"{predictions_file} line {line}: {column} is {bad!r}, not a probability; the file is damaged: {redo}"
            ) from error
        labels = np.array([_label(v, class_names, run_dir) for v in table["label"]], dtype=np.int8)
        predicted = probs > threshold
        finite = bool(np.isfinite(probs).all())
        if int(labels.sum()) != positives or len(labels) - int(labels.sum()) != negatives:
            raise TableError(
                f"{run_dir / 'predictions.csv'} holds {int(labels.sum())} positives of {len(labels)} photos but "
                f"summary.json's val_counts say {positives} of {positives + negatives}; rerun the run"
            )
        for name, metric in (("f1", stats.f1_score), ("balanced_accuracy", stats.balanced_accuracy)):
            recorded = float(result[name])
            recomputed = float(metric(labels, predicted)) if finite else float("nan")
            agree = abs(recomputed - recorded) <= RECOMPUTE_TOLERANCE or (np.isnan(recomputed) and np.isnan(recorded))
            if not agree:  # the table's intervals would describe other predictions than the row's numbers
                raise TableError(
                    f"{run_dir}: {name} recomputed from predictions.csv ({column} > {threshold!r}) is {recomputed!r} "
                    f"but summary.json results[{report!r}] says {recorded!r}; the run's files disagree: rerun it"
                )
        run = Run(seed, run_dir, result, positives, negatives, tuple(table["path"]), labels, predicted, finite)
        run.ece, run.probs = _val_ece(summary, report), probs
        return run


def _val_ece(summary: dict[str, Any], report: str) -> tuple[float, float | None] | None:
    """(ECE before, after temperature scaling) on val of the model behind `report`: the dev-selected epoch's for
    that result set, else the last epoch's (a threshold or a post-hoc τ does not change its probabilities)."""
    model = "dev_selected_checkpoint" if report == "dev_selected_checkpoint" else "last_epoch"
    try:
        val = summary["calibration"][model]["val"]
        before = float(val["before"]["ece"])
        after = float(val["after"]["ece"]) if "after" in val else None
    except (KeyError, TypeError, ValueError):
        return None
    return before, after


RESULT_NUMBERS = tuple(dict.fromkeys(("threshold", "f1", "balanced_accuracy", *(key for _, key in COLUMNS))))


def _parses(value: str) -> bool:
    try:
        np.float32(value)
    except ValueError:
        return False
    return True


def _label(value: str, class_names: dict[str, str], run_dir: Path) -> int:
    if value in ("0", "1"):
        return int(value)
    names = {class_names.get("negative"): 0, class_names.get("positive"): 1}
    if value not in names:
        raise TableError(
            f"{run_dir / 'predictions.csv'}: label {value!r} is neither 0/1 nor a class name; rerun the run"
        )
    return names[value]


def _runs(grid: Grid, cell: Cell, results: Path, seeds: int | None, reader: _Reader) -> tuple[list[Run], int, int]:
    """(the runs with numbers for this cell's report, failed runs, finished runs without the report)."""
    source = next(c for c in grid.cells if c.id == cell.runs_of) if cell.runs_of else cell
    runs, failed, unreported = [], 0, 0
    for seed in grid.seeds_of(source, seeds):
        run_dir = results / "runs" / source.id / f"seed{seed}"
        if (run_dir / "summary.json").is_file():
            run = reader.run(run_dir, seed, cell.report)
            if run is None:
                unreported += 1
            else:
                runs.append(run)
        elif (run_dir / "run.log").is_file():
            failed += 1
    return runs, failed, unreported


def _stack(runs: list[Run], attribute: str, cell: Cell) -> np.ndarray:
    try:
        return np.stack([getattr(r, attribute) for r in runs])
    except ValueError as error:
        sizes = sorted({len(r.labels) for r in runs})
        raise TableError(
            f"cell {cell.id!r}: its runs have validation sets of different sizes {sizes}; rerun them with one --scale"
        ) from error


def _check_same_photos(cell: Cell, run: Run, base_id: str, base: Run) -> None:
    if run.paths != base.paths or not np.array_equal(run.labels, base.labels):
        raise TableError(
            f"{run.run_dir / 'predictions.csv'} and {base.run_dir / 'predictions.csv'} list different validation "
            f"photos: cell {cell.id!r} and its baseline {base_id!r} at seed {run.seed} were not made on the same data "
            "(compare their config.json); rerun one of them on the other's data"
        )


def _difference(
    labels: np.ndarray, row: np.ndarray, base: np.ndarray, metric: stats.Metric, resample: stats.Resample | None
) -> stats.Difference:
    """Row minus baseline over their common seeds; no interval (NaN ends) without a resample (n<3)."""
    if resample is not None:
        return stats.paired_difference(labels, row, base, resample, metric)
    mean = float((metric(labels, row) - metric(labels, base)).mean())
    return stats.Difference(mean, float("nan"), float("nan"), len(labels))


def _trained_row(
    grid: Grid,
    cell: Cell,
    results: Path,
    seeds: int | None,
    reader: _Reader,
    base_runs: list[Run] | None,
    ap_interval: bool = False,
) -> Row:
    runs, failed, unreported = _runs(grid, cell, results, seeds, reader)
    row = Row(cell.id, cell.data, cell.method, "trained", cell.report, [r.seed for r in runs], failed, unreported)
    row.lecture, row.baseline = cell.lecture, grid.baselines.get(cell.data)
    for column, key in COLUMNS:
        values = np.array([float(r.result[key]) for r in runs])
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        row.means[column] = (float(values.mean()), std) if len(values) else None
    for column, index in (("ece", 0), ("ece_scaled", 1)):  # only when every run recorded it
        values = [r.ece[index] if r.ece is not None else None for r in runs]
        if runs and all(v is not None for v in values):
            row.means[column] = (float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)
    if not runs:
        return row
    row.val = (runs[0].positives, runs[0].negatives)
    row.no_skill_f1 = stats.no_skill(*row.val).f1
    finite = all(r.finite for r in runs)
    enough = len(runs) >= MIN_SEEDS_FOR_INTERVAL and finite
    if enough:
        labels, predicted = _stack(runs, "labels", cell), _stack(runs, "predicted", cell)
        resample = reader.resample(labels, cell)
        row.f1_ci = stats.bootstrap_interval(labels, predicted, resample, stats.f1_score)
        row.ba_ci = stats.bootstrap_interval(labels, predicted, resample, stats.balanced_accuracy)
        if ap_interval:  # on the probabilities, with the same draws; a sort per replicate, so only where shown
            scores = _stack(runs, "probs", cell)
            row.ap_ci = stats.bootstrap_interval(labels, scores, resample, stats.average_precision)
    if base_runs is not None and not row.is_baseline:
        by_seed = {r.seed: r for r in base_runs}
        pairs = [(r, by_seed[r.seed]) for r in runs if r.seed in by_seed]
        for run, base in pairs:
            _check_same_photos(cell, run, row.baseline or "", base)
        if pairs and finite and all(b.finite for _, b in pairs):
            mine, theirs = [r for r, _ in pairs], [b for _, b in pairs]
            labels = _stack(mine, "labels", cell)
            row_pred, base_pred = _stack(mine, "predicted", cell), _stack(theirs, "predicted", cell)
            paired = reader.resample(labels, cell) if len(pairs) >= MIN_SEEDS_FOR_INTERVAL else None
            row.delta_f1 = _difference(labels, row_pred, base_pred, stats.f1_score, paired)
            row.delta_ba = _difference(labels, row_pred, base_pred, stats.balanced_accuracy, paired)
    if not finite:
        row.verdict = "non-finite predictions"
    elif row.f1_ci is None or row.ba_ci is None:
        row.verdict = FEW_SEEDS
    elif row.f1_ci[0] <= row.no_skill_f1 + 1e-12 or row.ba_ci[0] <= 0.5 + 1e-12:  # an all-cat model ties exactly
        row.verdict = NOT_BETTER
    else:
        row.verdict = BETTER
    return row


def _no_skill_row(data: str, val: tuple[int, int]) -> Row:
    ns = stats.no_skill(*val)
    row = Row(f"{data}/no-skill", data, NO_SKILL_METHOD, "no_skill", val=val, verdict="no skill")
    row.no_skill_f1 = ns.f1
    for column, value in (
        ("f1", ns.f1),
        ("balanced_accuracy", ns.balanced_accuracy),
        ("average_precision", ns.average_precision),
        ("correct_pos", ns.correct_pos),
        ("correct_neg", ns.correct_neg),
        ("precision", ns.precision),
        ("recall", ns.recall),
    ):
        row.means[column] = (float(value), 0.0)
    return row


def collect(
    grid: Grid,
    cells: list[Cell],
    results: Path,
    seeds: int | None,
    replicates: int = BOOTSTRAP_REPLICATES,
    bootstrap_seed: int = BOOTSTRAP_SEED,
    ap_interval: bool = False,
) -> list[Row]:
    """The table's rows, grouped by data set in grid order, each group ending with its no-skill row.
    Failed, missing and unreported seeds are counted, never averaged in. `ap_interval`: also the average
    precision's interval (`Row.ap_ci`), which the sweep shows and the table does not."""
    reader = _Reader(replicates, bootstrap_seed)
    by_id = {c.id: c for c in grid.cells}
    rows: list[Row] = []
    for data in dict.fromkeys(c.data for c in grid.cells):
        group = [c for c in cells if c.data == data]
        if not group:
            continue
        base_id = grid.baselines.get(data)
        base_runs = _runs(grid, by_id[base_id], results, seeds, reader)[0] if base_id else None
        group_rows = [_trained_row(grid, c, results, seeds, reader, base_runs, ap_interval) for c in group]
        rows += group_rows
        val = next((r.val for r in group_rows if r.val is not None), None)
        if val is not None:
            rows.append(_no_skill_row(data, val))
    return rows


# ---------------------------------------------------------------- the table: writing it


def _mean_std(value: tuple[float, float] | None, digits: int, seeds: int) -> str:
    if value is None:
        return "–"
    mean, std = value
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if seeds > 1 else f"{mean:.{digits}f}"


def _with_interval(row: Row, column: str, ci: tuple[float, float] | None) -> str:
    if row.kind == "no_skill":
        return f"{row.means[column][0]:.3f}"
    text = _mean_std(row.means.get(column), 3, len(row.seeds))
    if ci is not None:
        return f"{text} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{text} ({FEW_SEEDS})" if 0 < len(row.seeds) < MIN_SEEDS_FOR_INTERVAL else text


def _delta(row: Row, diff: stats.Difference | None) -> str:
    if row.kind == "no_skill" or row.baseline is None:
        return ""
    if row.is_baseline:
        return "—"
    if diff is None:
        return "–"
    if np.isnan(diff.low):
        return f"{diff.mean:+.3f} ({FEW_SEEDS})"
    return f"{diff.mean:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}]"


def _counts(row: Row, column: str, total: int | None) -> str:
    if row.kind == "no_skill":
        return f"{row.means[column][0]:.0f} / {total}"
    text = _mean_std(row.means.get(column), 0, len(row.seeds))
    return f"{text} / {total}" if total is not None and row.seeds else text


def _ece(row: Row, seeds: int) -> str:
    """Val ECE before → after the temperature fitted on dev; empty for runs that did not record it."""
    if row.means.get("ece") is None:
        return ""
    before = _mean_std(row.means["ece"], 3, seeds)
    return before + (f" → {_mean_std(row.means['ece_scaled'], 3, seeds)}" if row.means.get("ece_scaled") else "")


def _seeds_text(row: Row) -> str:
    """The seeds with numbers, and the runs that failed or lack the row's result set."""
    if row.kind == "no_skill":
        return "–"
    text = f"{len(row.seeds)}" + (f" ({row.failed} failed)" if row.failed else "")
    return text + (f" ({row.unreported} without {row.report})" if row.unreported else "")


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


CSV_HEADER = [
    "id",
    "data",
    "method",
    "kind",
    "report",
    "baseline",
    "seeds",
    "failed",
    "unreported",
    *[f"{c}_{s}" for c, _ in COLUMNS for s in ("mean", "std")],
    "ece_mean",
    "ece_std",
    "ece_scaled_mean",
    "ece_scaled_std",
    "f1_low",
    "f1_high",
    "balanced_accuracy_low",
    "balanced_accuracy_high",
    "delta_f1",
    "delta_f1_low",
    "delta_f1_high",
    "delta_balanced_accuracy",
    "delta_balanced_accuracy_low",
    "delta_balanced_accuracy_high",
    "delta_seeds",
    "no_skill_f1",
    "vs_no_skill",
    "val_pos",
    "val_neg",
    "lecture_f1",
    "lecture_cats",
    "lecture_dogs",
    "lecture_resnet_f1",
]


def render_table(rows: list[Row], header: str) -> tuple[str, str]:
    """(markdown, csv) of the table; correct cats/dogs are out of each run's own validation counts."""
    lines = [
        header,
        "",
        "| data | method | seeds | F1 [95% CI] | Δ F1 vs baseline [95% CI] | balanced acc. [95% CI] "
        "| Δ bal. acc. [95% CI] | AP | ECE → temperature-scaled | correct cats | correct dogs | precision | recall "
        "| vs all-cat | lecture F1 (VGG16) | lecture cats / dogs of 1500 | lecture F1 (ResNet) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for row in rows:
        lec, n = row.lecture, len(row.seeds)
        val_pos, val_neg = row.val if row.val else (None, None)
        seeds_text = _seeds_text(row)
        verdict = f"**{row.verdict}**" if row.verdict == NOT_BETTER else row.verdict
        lines.append(
            f"| {row.data} | {row.method} | {seeds_text} | {_with_interval(row, 'f1', row.f1_ci)} "
            f"| {_delta(row, row.delta_f1)} | {_with_interval(row, 'balanced_accuracy', row.ba_ci)} "
            f"| {_delta(row, row.delta_ba)} | {_mean_std(row.means.get('average_precision'), 3, n)} "
            f"| {_ece(row, n)} | {_counts(row, 'correct_pos', val_pos)} | {_counts(row, 'correct_neg', val_neg)} "
            f"| {_mean_std(row.means.get('precision'), 3, n)} | {_mean_std(row.means.get('recall'), 3, n)} "
            f"| {verdict} | {lec.get('f1', '')} "
            f"| {lec.get('cats', '')}{' / ' if 'cats' in lec else ''}{lec.get('dogs', '')} | {lec.get('resnet_f1', '')} |"
        )
        means = [
            v
            for c, _ in COLUMNS
            for v in (
                (_number(row.means[c][0]), "" if row.kind == "no_skill" else _number(row.means[c][1]))
                if row.means.get(c) is not None
                else ("", "")
            )
        ]
        eces = [
            _number(row.means[c][i]) if row.means.get(c) is not None else ""
            for c in ("ece", "ece_scaled")
            for i in (0, 1)
        ]
        cis = [_number(x) for ci in (row.f1_ci, row.ba_ci) for x in (ci if ci else (None, None))]
        deltas = [
            _number(None if x is None or np.isnan(x) else x)  # no interval (n<3): empty, not "nan"
            for d in (row.delta_f1, row.delta_ba)
            for x in ((d.mean, d.low, d.high) if d else (None, None, None))
        ]
        delta_seeds = row.delta_f1.seeds if row.delta_f1 else ""
        writer.writerow(
            [
                row.id,
                row.data,
                row.method,
                row.kind,
                row.report,
                row.baseline or "",
                n if row.kind == "trained" else "",
                row.failed,
                row.unreported,
                *means,
                *eces,
                *cis,
                *deltas,
                delta_seeds,
                _number(row.no_skill_f1),
                row.verdict,
                "" if val_pos is None else val_pos,
                "" if val_neg is None else val_neg,
                lec.get("f1", ""),
                lec.get("cats", ""),
                lec.get("dogs", ""),
                lec.get("resnet_f1", ""),
            ]
        )
    return "\n".join(lines) + "\n", buffer.getvalue()


def _legend_below(fig: Any, axes: Any, ncol: int) -> int:
    """One legend for all `axes` (each label once), centred under them; returns its number of rows."""
    unique: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            unique.setdefault(label, handle)
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    return (len(unique) + ncol - 1) // ncol


def plot_table(rows: list[Row], path: Path) -> None:
    """Two panels, rows grouped by data set: mean F1 and mean balanced accuracy with their 95% bootstrap
    intervals as error bars, each group's no-skill value as a dashed line, the lecture's F1 as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def shown(r: Row) -> bool:
        lecture = any(isinstance(r.lecture.get(k), (int, float)) for k in ("f1", "resnet_f1"))
        return r.kind == "trained" and (bool(r.seeds) or lecture)

    groups = [(d, [r for r in rows if r.data == d and shown(r)]) for d in dict.fromkeys(r.data for r in rows)]
    groups = [(d, g) for d, g in groups if g]
    no_skill = {r.data: r for r in rows if r.kind == "no_skill"}
    placed: list[tuple[float, Row]] = []
    y = 0.0
    spans: list[tuple[str, float, float]] = []
    for data, group in groups:
        first = y
        for r in group:
            placed.append((y, r))
            y += 1
        spans.append((data, first, y - 1))
        y += 0.8  # a gap between data sets
    height = 0.42 * max(len(placed), 1) + 0.3 * len(groups) + 1.8
    fig, (ax_f1, ax_ba) = plt.subplots(1, 2, figsize=(14, height), sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    colours = {BETTER: "#4c72b0", NOT_BETTER: "#c44e52"}
    for ax, column, attribute, label in (
        (ax_f1, "f1", "f1_ci", "F1 of the positive class (cat) on validation"),
        (ax_ba, "balanced_accuracy", "ba_ci", "balanced accuracy on validation"),
    ):
        for pos, r in placed:
            mean = r.means[column][0] if r.means.get(column) else None
            if mean is None or np.isnan(mean):
                continue
            ci = getattr(r, attribute)
            xerr = [[max(0.0, mean - ci[0])], [max(0.0, ci[1] - mean)]] if ci else None
            ax.barh(
                pos,
                mean,
                xerr=xerr,
                color=colours.get(r.verdict, "#a0a0a0"),
                alpha=0.85,
                capsize=2,
                label=f"mean over seeds, 95% interval ({r.verdict or 'no runs'})",
            )
        for data, first, last in spans:
            if data in no_skill:
                value = no_skill[data].means[column][0]
                ax.vlines(
                    value,
                    first - 0.45,
                    last + 0.45,
                    colors="black",
                    linestyles="--",
                    linewidth=1.2,
                    label=NO_SKILL_METHOD,
                )
                ax.annotate(
                    f"all-cat {value:.3f}",
                    (value, first - 0.5),
                    fontsize=7,
                    ha="left",
                    va="bottom",
                    xytext=(2, 0),
                    textcoords="offset points",
                )
        for _, first, _ in spans[1:]:  # a rule between data sets
            ax.axhline(first - 0.9, color="#cccccc", linewidth=0.8)
        ax.set_xlim(0, 1)
        ax.set_xlabel(label)
    for pos, r in placed:
        for key, marker, colour, label in (
            ("f1", "D", "#dd8452", "lecture, VGG16 (TF)"),
            ("resnet_f1", "o", "#55a868", "lecture, ResNet (PyTorch)"),
        ):
            value = r.lecture.get(key)
            if isinstance(value, (int, float)):
                ax_f1.plot(value, pos, marker, color=colour, label=label)
    ticks = [
        f"{r.data}: {r.method}" + (f" ({FEW_SEEDS})" if 0 < len(r.seeds) < MIN_SEEDS_FOR_INTERVAL else "")
        for _, r in placed
    ]
    ax_f1.set_yticks([p for p, _ in placed], ticks, fontsize=8)
    ax_f1.invert_yaxis()
    legend_rows = _legend_below(fig, (ax_f1, ax_ba), ncol=3)  # under both panels, where it hides no bar
    fig.tight_layout(rect=(0, 0.25 * legend_rows / height + 0.01, 1, 1))
    from imbalance.plots import _save

    _save(fig, path)


# ---------------------------------------------------------------- the sweep: the table's rows as lines against x


@dataclass
class SweepPoints:
    """A sweep grid's rows as points: the x values in order, the series in grid order, the row of each (series,
    x) the grid has, and the all-cat (no-skill) row of the validation set at each x."""

    x_label: str
    xs: list[float]
    series: list[str]
    rows: dict[tuple[str, float], Row]
    no_skill: dict[float, Row]


def sweep_points(grid: Grid, cells: list[Cell], rows: list[Row]) -> SweepPoints:
    by_id = {r.id: r for r in rows}
    no_skill = {r.data: r for r in rows if r.kind == "no_skill"}
    swept = [c for c in cells if c.x is not None and c.series is not None and c.id in by_id]
    points = SweepPoints(
        (grid.sweep or {}).get("x_label", "x"),
        sorted({float(c.x) for c in swept}),  # type: ignore[arg-type]
        list(dict.fromkeys(str(c.series) for c in swept)),
        {(str(c.series), float(c.x)): by_id[c.id] for c in swept},  # type: ignore[arg-type]
        {},
    )
    for cell in swept:  # a data set has a no-skill row once one of its runs finished: the first such at each x
        if cell.data in no_skill:
            points.no_skill.setdefault(float(cell.x), no_skill[cell.data])  # type: ignore[arg-type]
    return points


def render_sweep(grid: Grid, cells: list[Cell], rows: list[Row], header: str) -> str:
    """sweep.md: the seeds of each point, then one table per metric, a row per series and a column per x. A cell
    is its table row's own text (`_with_interval`: mean ± sample std [95% interval], no interval under 3 seeds),
    – where no run of the point finished, blank where the grid has no such point; each table ends with the
    all-cat predictor on each x's validation set (its no-skill row)."""
    points = sweep_points(grid, cells, rows)
    xs = ", ".join(f"{x:g}" for x in points.xs)
    head = ["| series | " + " | ".join(f"{x:g}" for x in points.xs) + " |", "|---" * (len(points.xs) + 1) + "|"]

    def table(title: str, text: Any, last: str | None = None) -> list[str]:
        lines = [f"### {title}, against {points.x_label}", "", *head]
        for name in points.series:
            texts = [text(points.rows[(name, x)]) if (name, x) in points.rows else "" for x in points.xs]
            lines.append(f"| {name} | {' | '.join(texts)} |")
        return [*lines, *([last] if last else []), ""]

    lines = [
        header,
        "",
        f"## Sweep: {len(points.series)} series at {points.x_label} = {xs}",
        "",
        "The rows of table.md as points of lines: each cell is the row's mean ± sample std over seeds [95% "
        f"interval], the same numbers; ({FEW_SEEDS}): fewer than {MIN_SEEDS_FOR_INTERVAL} seeds, no interval; –: "
        "no finished run; blank: not a point of this grid. Each table ends with the all-cat predictor on that x's "
        "validation set. sweep.png draws the same numbers (error bars: the 95% intervals).",
        "",
        *table("Seeds per point", _seeds_text),
    ]
    for column, attribute, title in SWEEP_METRICS:
        no_skill = [
            _with_interval(points.no_skill[x], column, None) if x in points.no_skill else "–" for x in points.xs
        ]
        lines += table(
            f"{title} [95% CI]",
            lambda row, column=column, attribute=attribute: _with_interval(row, column, getattr(row, attribute)),
            f"| {NO_SKILL_METHOD} | {' | '.join(no_skill)} |",
        )
    markdown = "\n".join(lines)
    return markdown + ("\n" + grid.notes.strip() + "\n" if grid.notes else "")


def plot_sweep(grid: Grid, cells: list[Cell], rows: list[Row], path: Path) -> None:
    """sweep.png: F1, balanced accuracy and average precision against x on a log axis, a line with markers per
    series, error bars where the point has a 95% interval, the all-cat predictor dashed; a point with no
    finished run is left out (its line joins its neighbours)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    points = sweep_points(grid, cells, rows)
    fig, axes = plt.subplots(1, len(SWEEP_METRICS), figsize=(16, 5.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*Xh<>"
    for ax, (column, attribute, title) in zip(axes, SWEEP_METRICS, strict=True):
        for i, name in enumerate(points.series):
            # the series side by side around each x (a constant factor on the log axis), so that the error bars
            # of one x do not hide each other
            shift = 1.025 ** (i - (len(points.series) - 1) / 2)
            drawn = []
            for x in points.xs:
                row = points.rows.get((name, x))
                mean = row.means.get(column) if row is not None else None
                if row is not None and mean is not None and math.isfinite(mean[0]):
                    drawn.append((x * shift, mean[0], getattr(row, attribute)))
            if not drawn:
                continue
            colour = colours[i % len(colours)]
            ax.plot(
                [d[0] for d in drawn], [d[1] for d in drawn], marker=markers[i % len(markers)], color=colour, label=name
            )
            bars = [d for d in drawn if d[2] is not None]
            if bars:
                ax.errorbar(
                    [x for x, _, _ in bars],
                    [m for _, m, _ in bars],
                    yerr=[[max(0.0, m - ci[0]) for _, m, ci in bars], [max(0.0, ci[1] - m) for _, m, ci in bars]],
                    fmt="none",
                    ecolor=colour,
                    capsize=3,
                    linewidth=1,
                )
        line = [(x, points.no_skill[x].means[column][0]) for x in points.xs if x in points.no_skill]
        style = {"color": "black", "linestyle": "--", "linewidth": 1.2, "label": NO_SKILL_METHOD}
        if len(line) == 1:  # one x: a line across the panel, not a dash of no length
            ax.axhline(line[0][1], **style)
        elif line:
            ax.plot([x for x, _ in line], [v for _, v in line], **style)
        ax.set_xscale("log")
        if points.xs:  # room beside the first and last x for the side-by-side series
            ax.set_xlim(points.xs[0] / 1.3, points.xs[-1] * 1.3)
        ax.set_xticks(points.xs, [f"{x:g}" for x in points.xs])
        ax.xaxis.set_minor_locator(NullLocator())  # the ratios are the ticks, not the decades between them
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(points.x_label)
        ax.set_title(f"{title} on validation", fontsize=10)
        ax.grid(alpha=0.3)
    legend_rows = _legend_below(fig, axes, ncol=4)
    fig.tight_layout(rect=(0, 0.05 * legend_rows + 0.02, 1, 1))
    from imbalance.plots import _save

    _save(fig, path)


def write_results(grid: Grid, cells: list[Cell], results: Path, seeds: int | None, header: str) -> list[Row]:
    rows = collect(grid, cells, results, seeds, ap_interval=grid.sweep is not None)
    markdown, table_csv = render_table(rows, header)
    if grid.notes:
        markdown += "\n" + grid.notes.strip() + "\n"
    atomic_write_text(results / "table.md", markdown)
    atomic_write_text(results / "table.csv", table_csv)
    plot_table(rows, results / "table.png")
    if grid.sweep is not None:  # the same rows by series and x, beside the table
        atomic_write_text(results / "sweep.md", render_sweep(grid, cells, rows, header))
        plot_sweep(grid, cells, rows, results / "sweep.png")
    return rows
