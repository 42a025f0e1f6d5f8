"""The case-study runner and its table: dry run, a tiny grid end to end, resuming after a failed cell, and the
table's statistics on fake run folders (summary.json + predictions.csv from fixed arrays, no training)."""

from __future__ import annotations

import csv
import itertools
import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.metrics import average_precision_score, roc_auc_score

from experiments import case_study
from imbalance import stats
from imbalance.case_study import BETTER, BOOTSTRAP_SEED, NOT_BETTER, REPORTS, _val_ece, load_grid, plan_runs
from imbalance.config import ConfigError

GRID = Path(__file__).resolve().parents[1] / "experiments" / "case_study.yaml"


def test_dry_run_lists_every_cell_of_the_repository_grid(capsys):
    assert case_study.main(["--grid", str(GRID), "--data-dir", "somewhere", "--scale", "0.2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    grid = yaml.safe_load(GRID.read_text())
    trained = [c for c in grid["cells"] if "runs_of" not in c]
    for cell in trained:
        assert f"  {cell['id']}  seed 0" in out, cell["id"]
        assert cell.get("seeds", grid["seeds"]) >= 3, f"{cell['id']}: a row needs 3 seeds for an interval"
    expected = sum(cell.get("seeds", grid["seeds"]) for cell in trained)
    assert f"{expected} runs, {expected} to do" in out
    assert "--split imbalanced-2 --loss focal --gamma 2 --alpha 0.5" in out
    assert "--tune-threshold" not in out and "--posthoc-la" not in out  # both are chosen on the dev split now
    reports = {c["id"]: c.get("report", "last_epoch") for c in grid["cells"]}
    assert reports["imbalanced-2/ce-dev-selected"] == "dev_selected_checkpoint"
    assert reports["imbalanced-2/ce-tuned"] == "dev_tuned_threshold"
    assert reports["imbalanced-2/ce-posthoc-la"] == "posthoc_la"
    assert grid["baselines"] == {
        "balanced": "balanced/ce",
        "imbalanced-1": "imbalanced-1/ce",
        "imbalanced-2": "imbalanced-2/ce",
    }
    assert "optimistic" not in GRID.read_text()


def test_protocol_slice_grid_plans_its_runs(capsys):
    slice_grid = GRID.parent / "protocol_slice.yaml"
    assert case_study.main(["--grid", str(slice_grid), "--data-dir", "somewhere", "--dry-run"]) == 0
    out = capsys.readouterr().out
    # CE, weighted, VS, sqrt and progressive sampling, the four decoupled stage 2s, weight decay 0.5 and weight
    # balancing x 3 seeds, weight decay 0.005 x 1 seed; 3 rows reuse CE
    assert "34 runs, 34 to do, 15 cells" in out
    assert "--backbone resnet10t --epochs 12 --lr 0.002 --batch-size 64 --cache --num-workers 1" in out
    assert "--image-size 64 --scale 0.2" in out
    grid = load_grid(slice_grid)
    assert grid.name == "petimages-96-slice" and grid.baselines == {"imbalanced-2": "imbalanced-2/ce"}
    assert sorted(c.report for c in grid.cells if c.runs_of) == sorted(REPORTS[1:])


def test_only_filters_and_bad_grids_are_errors(tmp_path, capsys):
    assert (
        case_study.main(["--grid", str(GRID), "--data-dir", "d", "--only", "balanced/*", "--seeds", "1", "--dry-run"])
        == 0
    )
    assert "3 runs" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("cells:\n  - {id: a, data: d, method: m, flags: {los: ce}}\n")
    with pytest.raises(SystemExit):
        case_study.main(["--grid", str(bad), "--dry-run"])
    assert "unknown flags ['los']" in capsys.readouterr().err


def write_grid(path: Path, second_flags: dict) -> Path:
    grid = {
        "name": "tiny",
        "defaults": {"backbone": "test_resnet", "epochs": 1, "image_size": 32},
        "seeds": 2,
        "baselines": {"digits": "digits/ce"},
        "cells": [
            {
                "id": "digits/ce",
                "data": "digits",
                "method": "plain CE",
                "flags": {"loss": "ce"},
                "lecture": {"f1": 0.5, "cats": 10, "dogs": 20},
            },
            {"id": "digits/weighted", "data": "digits", "method": "weighted", "flags": second_flags},
            {
                "id": "digits/ce-tuned",
                "data": "digits",
                "method": "plain CE + dev-tuned threshold",
                "runs_of": "digits/ce",
                "report": "dev_tuned_threshold",
            },
        ],
    }
    path.write_text(yaml.safe_dump(grid))
    return path


@pytest.mark.slow
@pytest.mark.extended  # 6 real runs (72 s); the failing-run exit and the table are also tested faster elsewhere
def test_tiny_grid_runs_resumes_and_tabulates(tmp_path, capsys):
    # the second cell fails (no network for --pretrained); the first must not be retrained on the rerun
    grid = write_grid(tmp_path / "grid.yaml", {"loss": "weighted", "pretrained": True})
    assert case_study.main(["--grid", str(grid), "--results", "res"]) == 1  # the table is written, the exit says
    out = capsys.readouterr().out
    assert out.count("failed: digits/weighted") == 2
    first = tmp_path / "res" / "runs" / "digits" / "ce"
    stamps = {p: p.stat().st_mtime_ns for p in first.glob("seed*/summary.json")}
    assert len(stamps) == 2
    write_grid(grid, {"loss": "weighted"})
    assert case_study.main(["--grid", str(grid), "--results", "res"]) == 0
    out = capsys.readouterr().out
    assert out.count("done, skipped") == 2
    assert {p: p.stat().st_mtime_ns for p in first.glob("seed*/summary.json")} == stamps
    rows = list(csv.DictReader((tmp_path / "res" / "table.csv").open()))
    assert [r["id"] for r in rows] == ["digits/ce", "digits/weighted", "digits/ce-tuned", "digits/no-skill"]
    trained = rows[:3]
    assert all(r["seeds"] == "2" and r["failed"] == "0" for r in trained)
    assert all(0 <= float(r["f1_mean"]) <= 1 and float(r["f1_std"]) >= 0 for r in trained)
    assert all(r["vs_no_skill"] == "n<3" and r["f1_low"] == "" for r in trained)  # 2 seeds: no interval
    table = (tmp_path / "res" / "table.md").read_text()
    assert "± " in table and "| digits | plain CE | 2 |" in table and "| 0.5 | 10 / 20 |" in table
    assert "all-cat predictor (no skill)" in table and "(n<3)" in table
    assert (tmp_path / "res" / "table.png").stat().st_size > 1000


# ---------------------------------------------------------------- the table on fake run folders

FAKE_GRID = {
    "name": "fake",
    "seeds": 3,
    "baselines": {"d1": "d1/ce", "d2": "d2/ce"},
    "cells": [  # the data sets interleaved: the table groups them
        {
            "id": "d1/ce",
            "data": "d1",
            "method": "plain CE",
            "flags": {"loss": "ce"},
            "lecture": {"f1": 0.9, "cats": 10, "dogs": 20},
        },
        {"id": "d2/ce", "data": "d2", "method": "plain CE", "flags": {"loss": "ce", "lr": 0.002}},
        {"id": "d1/good", "data": "d1", "method": "a good remedy", "flags": {"loss": "weighted"}},
        {"id": "d1/all-cat", "data": "d1", "method": "calls everything cat", "flags": {"loss": "focal", "gamma": 2}},
        {
            "id": "d1/ce-tuned",
            "data": "d1",
            "method": "CE, dev-tuned",
            "runs_of": "d1/ce",
            "report": "dev_tuned_threshold",
        },
        {"id": "d2/good", "data": "d2", "method": "a good remedy", "flags": {"loss": "weighted", "lr": 0.002}},
    ],
}
FAKE_KINDS = {"d1/ce": "weak", "d2/ce": "weak", "d1/good": "good", "d1/all-cat": "all-cat", "d2/good": "good"}
ORDER = ["d1/ce", "d1/good", "d1/all-cat", "d1/ce-tuned", "d1/no-skill", "d2/ce", "d2/good", "d2/no-skill"]


def validation_photos(seed: int, photos: int) -> tuple[list[str], np.ndarray]:
    """The validation set of a seed (the same for every method at that seed), sorted by path."""
    rng = np.random.default_rng(1000 + seed)
    labels = np.zeros(photos, dtype=int)
    labels[rng.permutation(photos)[: photos // 2]] = 1
    return [f"val/s{seed}_{i:04d}.jpg" for i in range(photos)], labels


def fake_probs(kind: str, labels: np.ndarray, key: str) -> np.ndarray:
    u = np.random.default_rng(zlib.crc32(key.encode())).random(len(labels))
    if kind == "all-cat":
        return 0.9 + 0.05 * u
    return (0.6 if kind == "good" else 0.25) * labels + (0.4 if kind == "good" else 0.75) * u


def result_set(labels: np.ndarray, probs: np.ndarray, column: str, threshold: float, label: str) -> dict:
    """One entry of summary.json "results", as the run recorder writes it (computed here independently)."""
    pred = probs > threshold
    tp, fp = int((pred & (labels == 1)).sum()), int((pred & (labels == 0)).sum())
    tn, fn = int((~pred & (labels == 0)).sum()), int((~pred & (labels == 1)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall, specificity = tp / (tp + fn), tn / (tn + fp)
    f1 = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0
    f1_neg = 2 * tn / (2 * tn + fn + fp) if 2 * tn + fn + fp else 0.0
    return {
        "label": label,
        "chosen_by": "test",
        "epoch": 2,
        "predictions": column,
        "threshold": threshold,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "specificity": specificity,
        "accuracy": (tp + tn) / len(labels),
        "balanced_accuracy": (recall + specificity) / 2,
        "macro_f1": (f1 + f1_neg) / 2,
        "mcc": 0.0,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "average_precision": float(average_precision_score(labels, probs)),
        "auroc": float(roc_auc_score(labels, probs)),
    }


def write_fake_run(run_dir: Path, config: dict, kind: str, photos: int, dev: bool = True) -> None:
    paths, labels = validation_photos(config["seed"], photos)
    last = fake_probs(kind, labels, f"{run_dir}/last")
    selected = fake_probs(kind, labels, f"{run_dir}/selected")
    results = {"last_epoch": result_set(labels, last, "prob_last", 0.5, "last epoch")}
    if dev:
        results["dev_selected_checkpoint"] = result_set(labels, selected, "prob_dev_selected", 0.5, "dev-selected")
        results["dev_tuned_threshold"] = result_set(labels, last, "prob_last", 0.4, "dev-tuned threshold")
        results["posthoc_la"] = {**result_set(labels, last, "prob_last", 0.45, "post-hoc LA"), "tau": 1.0}
    run_dir.mkdir(parents=True, exist_ok=True)
    columns = ["path", "label", "prob_last"] + (["prob_dev_selected"] if dev else [])
    with (run_dir / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for i in range(photos):
            writer.writerow(
                [paths[i], int(labels[i]), repr(float(last[i]))] + ([repr(float(selected[i]))] if dev else [])
            )
    n_pos = int(labels.sum())
    summary = {
        "results": results,
        "class_names": {"negative": "Dog", "positive": "Cat"},
        "val_counts": {"Dog": photos - n_pos, "Cat": n_pos},
        "config": config,
        "wall_time_s": 60.0,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, default=str))
    (run_dir / "config.json").write_text(json.dumps(config, default=str))


def fake_results(
    tmp_path: Path, grid: dict = FAKE_GRID, kinds: dict = FAKE_KINDS, photos: int = 40
) -> tuple[Path, Path]:
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(grid))
    loaded = load_grid(grid_file)
    results = tmp_path / "res"
    for plan in plan_runs(loaded, loaded.cells, results, {}, None):
        write_fake_run(plan.run_dir, plan.config, kinds[plan.cell.id], photos)
    return grid_file, results


def table_rows(results: Path) -> dict[str, dict[str, str]]:
    return {r["id"]: r for r in csv.DictReader((results / "table.csv").open())}


def table_only(grid: Path, results: Path) -> int:
    return case_study.main(["--grid", str(grid), "--results", str(results), "--table-only"])


def run_arrays(
    results: Path, cell: str, column: str = "prob_last", threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    labels, predicted = [], []
    for seed in range(3):
        rows = list(csv.DictReader((results / "runs" / cell / f"seed{seed}" / "predictions.csv").open()))
        labels.append([int(r["label"]) for r in rows])
        predicted.append([float(r[column]) > threshold for r in rows])
    return np.array(labels), np.array(predicted)


def test_table_only_on_fake_runs_is_complete_and_deterministic(tmp_path):
    grid, results = fake_results(tmp_path)
    assert table_only(grid, results) == 0
    first = (results / "table.csv").read_bytes()
    assert table_only(grid, results) == 0
    assert (results / "table.csv").read_bytes() == first  # fixed bootstrap seed: the same table every time
    assert (results / "table.png").stat().st_size > 1000
    rows = table_rows(results)
    assert list(rows) == ORDER  # grouped by data set in grid order, each ending with its no-skill row
    markdown = (results / "table.md").read_text()
    assert "B = 2000 replicates, bootstrap seed 14" in markdown and "Protocol: every decision" in markdown
    assert "| d1 | plain CE | 3 |" in markdown and "| 0.9 | 10 / 20 |" in markdown
    assert " / 20 |" in markdown  # correct cats and dogs out of the run's own validation counts
    ce = rows["d1/ce"]
    assert ce["baseline"] == "d1/ce" and ce["delta_f1"] == ""  # the baseline has no difference to itself
    assert "| — |" in markdown
    assert rows["d1/ce-tuned"]["report"] == "dev_tuned_threshold" and rows["d1/ce-tuned"]["delta_f1"] != ""


def test_intervals_and_differences_are_those_of_imbalance_stats(tmp_path):
    grid, results = fake_results(tmp_path)
    assert table_only(grid, results) == 0
    rows = table_rows(results)
    labels, good = run_arrays(results, "d1/good")
    _, base = run_arrays(results, "d1/ce")
    resample = stats.draw(labels, 2000, BOOTSTRAP_SEED)
    low, high = stats.bootstrap_interval(labels, good, resample, stats.f1_score)
    assert (float(rows["d1/good"]["f1_low"]), float(rows["d1/good"]["f1_high"])) == pytest.approx((low, high), abs=1e-6)
    ba_low, _ = stats.bootstrap_interval(labels, good, resample, stats.balanced_accuracy)
    assert float(rows["d1/good"]["balanced_accuracy_low"]) == pytest.approx(ba_low, abs=1e-6)
    diff = stats.paired_difference(labels, good, base, resample, stats.f1_score)
    got = (float(rows["d1/good"][k]) for k in ("delta_f1", "delta_f1_low", "delta_f1_high"))
    assert tuple(got) == pytest.approx((diff.mean, diff.low, diff.high), abs=1e-6)
    f1s = stats.f1_score(labels, good)
    assert float(rows["d1/good"]["f1_mean"]) == pytest.approx(f1s.mean(), abs=1e-6)
    assert float(rows["d1/good"]["f1_std"]) == pytest.approx(f1s.std(ddof=1), abs=1e-6)  # the sample std
    assert rows["d1/good"]["delta_seeds"] == "3"


def test_no_skill_rows_and_the_all_cat_flag(tmp_path):
    grid, results = fake_results(tmp_path)
    assert table_only(grid, results) == 0
    rows = table_rows(results)
    no_skill = rows["d1/no-skill"]
    assert no_skill["method"] == "all-cat predictor (no skill)" and no_skill["kind"] == "no_skill"
    assert float(no_skill["f1_mean"]) == pytest.approx(2 / 3, abs=1e-6)
    assert float(no_skill["balanced_accuracy_mean"]) == 0.5 and float(no_skill["average_precision_mean"]) == 0.5
    assert (no_skill["correct_pos_mean"], no_skill["correct_neg_mean"]) == ("20.000000", "0.000000")
    assert rows["d1/all-cat"]["vs_no_skill"] == NOT_BETTER  # its F1 interval reaches 0.667, bal. acc. is 0.5
    assert float(rows["d1/all-cat"]["f1_mean"]) == pytest.approx(2 / 3, abs=1e-6)
    assert rows["d1/good"]["vs_no_skill"] == BETTER and rows["d2/good"]["vs_no_skill"] == BETTER
    assert f"| **{NOT_BETTER}** |" in (results / "table.md").read_text()


def test_fewer_than_three_seeds_get_no_interval(tmp_path):
    grid, results = fake_results(tmp_path)
    shutil.rmtree(results / "runs" / "d2" / "good" / "seed2")
    assert table_only(grid, results) == 0
    row = table_rows(results)["d2/good"]
    assert row["seeds"] == "2" and row["f1_low"] == "" and row["vs_no_skill"] == "n<3"
    assert row["delta_f1"] != "" and row["delta_f1_low"] == "" and row["delta_seeds"] == "2"
    assert "(n<3)" in (results / "table.md").read_text()


def test_a_run_without_a_dev_split_is_counted_not_averaged(tmp_path):
    grid, results = fake_results(tmp_path)
    run = results / "runs" / "d1" / "ce" / "seed0"
    write_fake_run(run, json.loads((run / "config.json").read_text()), "weak", 40, dev=False)
    assert table_only(grid, results) == 0
    rows = table_rows(results)
    assert rows["d1/ce-tuned"]["seeds"] == "2" and rows["d1/ce-tuned"]["unreported"] == "1"
    assert rows["d1/ce"]["seeds"] == "3"
    assert "2 (1 without dev_tuned_threshold)" in (results / "table.md").read_text()


def test_different_photos_of_paired_runs_are_a_clear_error(tmp_path, capsys):
    grid, results = fake_results(tmp_path)
    predictions = results / "runs" / "d1" / "good" / "seed1" / "predictions.csv"
    predictions.write_text(predictions.read_text().replace("val/s1_0000.jpg", "val/elsewhere.jpg"))
    with pytest.raises(SystemExit) as exit_info:
        table_only(grid, results)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "list different validation photos" in err and "'d1/good'" in err and "'d1/ce'" in err and "seed 1" in err


def test_files_that_disagree_are_a_clear_error(tmp_path, capsys):
    grid, results = fake_results(tmp_path)
    summary_file = results / "runs" / "d2" / "good" / "seed0" / "summary.json"
    summary = json.loads(summary_file.read_text())
    summary["results"]["last_epoch"]["f1"] += 0.01
    summary_file.write_text(json.dumps(summary))
    with pytest.raises(SystemExit):
        table_only(grid, results)
    err = capsys.readouterr().err
    assert "f1 recomputed from predictions.csv (prob_last > 0.5)" in err and "rerun it" in err
    del summary["results"]
    summary_file.write_text(json.dumps(summary))
    with pytest.raises(SystemExit):
        table_only(grid, results)
    assert "written by an older experiments.run" in capsys.readouterr().err


def test_baselines_must_name_a_cell_of_the_same_data(tmp_path):
    for baselines, message in (
        ({"d1": "d1/nope"}, "not a cell id"),
        ({"d1": "d2/ce"}, "a cell of data 'd2'"),
        ("d1/ce", "must map a data set"),
    ):
        (tmp_path / "g.yaml").write_text(yaml.safe_dump({**FAKE_GRID, "baselines": baselines}))
        with pytest.raises(ConfigError, match=message):
            load_grid(tmp_path / "g.yaml")
    (tmp_path / "g.yaml").write_text(yaml.safe_dump({**FAKE_GRID, "baseline": {}}))
    with pytest.raises(ConfigError, match="unknown top-level keys \\['baseline'\\]"):
        load_grid(tmp_path / "g.yaml")


def test_sweep_file_lists_every_trained_cell():
    sweep = yaml.safe_load((GRID.parent / "sweeps" / "case_study.yaml").read_text())
    grid = yaml.safe_load(GRID.read_text())
    assert sweep["parameters"]["case-study-cell"]["values"] == [c["id"] for c in grid["cells"] if "runs_of" not in c]
    assert sweep["method"] == "grid" and "experiments.run" in sweep["command"]


def test_case_study_cell_flags_reach_the_run_config():
    from experiments.run import build_parser, config_from_args

    parser = build_parser()
    args = parser.parse_args(
        ["--case-study-cell", "imbalanced-2/focal", "--grid", str(GRID), "--data-dir", "d", "--epochs", "2"]
    )
    cfg = config_from_args(args, parser)
    assert (cfg.split, cfg.loss, cfg.gamma, cfg.alpha) == ("imbalanced-2", "focal", 2, (0.5,))
    assert cfg.epochs == 2 and cfg.wandb_group == "imbalanced-2/focal"  # the command line wins


# ---------------------------------------------------------------- hostile run files and grids


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def rewrite_column(predictions: Path, column: str, line: int, value: str) -> None:
    rows = list(csv.reader(predictions.open(newline="")))
    rows[line - 1][rows[0].index(column)] = value
    with predictions.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)


def edit_summary(summary_file: Path, edit) -> None:
    summary = json.loads(summary_file.read_text())
    edit(summary)
    summary_file.write_text(json.dumps(summary))


RUN = ("runs", "d2", "good", "seed0")
BROKEN_RUN_FILES = {  # name: (file of the run, how it breaks, what the error says)
    "non-utf8 csv": ("predictions.csv", lambda f: f.write_bytes(f.read_bytes() + b"\xff\xfe\n"), "UTF-8 CSV"),
    "abc probability": ("predictions.csv", lambda f: rewrite_column(f, "prob_last", 4, "abc"), "line 4: prob_last"),
    "empty probability": ("predictions.csv", lambda f: rewrite_column(f, "prob_last", 2, ""), "is '', not a prob"),
    "short row": ("predictions.csv", lambda f: f.write_text(f.read_text() + "val/x.jpg\n"), "fewer fields"),
    "cut-off json": ("summary.json", lambda f: f.write_text("{"), "cannot be read as JSON"),
    "json list": ("summary.json", lambda f: f.write_text("[]"), "holds a JSON list"),
    "results a list": ("summary.json", lambda f: edit_summary(f, lambda s: s.update(results=[])), "'results' must map"),
    "no f1": ("summary.json", lambda f: edit_summary(f, lambda s: s["results"]["last_epoch"].pop("f1")), "lacks 'f1'"),
    "text threshold": (
        "summary.json",
        lambda f: edit_summary(f, lambda s: s["results"]["last_epoch"].update(threshold="abc")),
        "['threshold'] is 'abc', not a number",
    ),
}


@pytest.mark.parametrize("name", list(BROKEN_RUN_FILES))
def test_broken_run_files_are_one_line_errors_naming_the_file(tmp_path, capsys, name):
    grid, results = fake_results(tmp_path)
    file_name, corrupt, says = BROKEN_RUN_FILES[name]
    broken = results.joinpath(*RUN, file_name)
    corrupt(broken)
    with pytest.raises(SystemExit) as exit_info:
        table_only(grid, results)
    assert exit_info.value.code == 2
    err = one_line_error(capsys)
    assert str(broken) in err and says in err and "run the case study again" in err


def test_an_unreadable_summary_is_not_done_and_adds_no_wall_time(tmp_path, capsys):
    from imbalance.case_study import finished, total_wall_time

    grid_file, results = fake_results(tmp_path)
    grid = load_grid(grid_file)
    plans = plan_runs(grid, grid.cells, results, {}, None)
    assert all(p.done for p in plans) and total_wall_time(plans) == 60.0 * len(plans)
    broken = {
        p.run_dir: text for p, text in zip(plans[:4], ["{", "[]", '{"config": 3}', '{"wall_time_s": "x"}'], strict=True)
    }
    for run_dir, text in broken.items():
        (run_dir / "summary.json").write_text(text)
    assert [p.done for p in plans] == [p.run_dir not in broken for p in plans]  # redone, not a crash
    assert len(finished(plans)) == len(plans) and total_wall_time(plans) == 60.0 * (len(plans) - len(broken))
    assert case_study.main(["--grid", str(grid_file), "--results", str(results), "--dry-run"]) == 0
    assert f"{len(plans)} runs, {len(broken)} to do" in capsys.readouterr().out


def test_a_threshold_equal_to_a_float32_probability_tabulates(tmp_path):
    # the dev-tuned threshold can be exactly one photo's float32 probability: the run predicts that photo
    # negative (p > t is false), and a reader that parses the written '%.9g' decimal in float64 would not
    grid, results = fake_results(tmp_path)
    run_dir = results.joinpath(*RUN)
    summary = json.loads((run_dir / "summary.json").read_text())
    paths, labels = validation_photos(0, 40)
    probs = fake_probs("good", labels, "float32").astype(np.float32)
    pinned = np.float32(0.99999988)
    assert float(f"{float(pinned):.9g}") > float(pinned)  # the decimal written lies above the float32 value
    probs[int(np.argmax(labels))] = pinned
    widened = probs.astype(np.float64)
    summary["results"] = {"last_epoch": result_set(labels, widened, "prob_last", float(pinned), "last epoch")}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    with (run_dir / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "prob_last"])
        for path, label, prob in zip(paths, labels, probs, strict=True):
            writer.writerow([path, int(label), f"{float(prob):.9g}"])  # as imbalance.recorder writes it
    assert table_only(grid, results) == 0
    f1s = [summary["results"]["last_epoch"]["f1"]]
    for seed in (1, 2):
        other = json.loads(results.joinpath("runs", "d2", "good", f"seed{seed}", "summary.json").read_text())
        f1s.append(other["results"]["last_epoch"]["f1"])
    assert float(table_rows(results)["d2/good"]["f1_mean"]) == pytest.approx(np.mean(f1s), abs=1e-6)


def test_a_run_from_before_the_dev_split_is_not_done(tmp_path):
    grid_file, results = fake_results(tmp_path)
    grid = load_grid(grid_file)
    plan = plan_runs(grid, grid.cells, results, {}, None)[0]
    assert plan.done
    edit_summary(plan.run_dir / "summary.json", lambda s: s["config"].pop("dev_fraction"))
    assert not plan.done  # it trained on its whole training split (dev_fraction 0): rerun it, don't count it
    flags = {**grid.cells[0].flags, "dev_fraction": 0.0}
    grid.cells[0].flags = flags
    assert plan_runs(grid, grid.cells, results, {}, None)[0].done  # a plan without a dev split is that run


def cells_grid(*cells: dict, **top) -> dict:
    return {"name": "g", "seeds": 3, **top, "cells": list(cells)}


CE = {"id": "d/ce", "data": "d", "method": "CE", "flags": {"loss": "ce"}}
NO_DEV = {"id": "d/ce", "data": "d", "method": "CE", "flags": {"dev_fraction": 0.0}}
BAD_GRIDS = [  # (grid, the cell the error names or None, what it says)
    (cells_grid(1), None, "cell 1 is 1, not a mapping"),
    ({"name": "g", "cells": "abc"}, None, "cells must be a list"),
    (cells_grid({"data": "d", "method": "m"}), "number 1", "lacks id"),
    (cells_grid(CE, seeds="x"), None, "seeds must be a whole number"),
    (cells_grid({**CE, "seeds": "x"}), "d/ce", "seeds must be a whole number"),
    (cells_grid({**CE, "seeds": 0}), "d/ce", "at least 1, got 0"),
    (cells_grid({**CE, "seeds": -2}), "d/ce", "at least 1, got -2"),
    (cells_grid({**CE, "flags": {"dev_fraction": "abc"}}), "d/ce", "flag dev_fraction must be a number, got 'abc'"),
    (cells_grid({**CE, "flags": {"lr": "1e-3"}}), "d/ce", "write 0.001 or 1.0e-3"),
    (cells_grid({**CE, "flags": "loss"}), "d/ce", "flags must map"),
    ({**cells_grid(CE), "defaults": {"epochs": "x"}}, None, "defaults: epochs must be a whole number"),
    (cells_grid({**CE, "id": "../ce"}), "../ce", "without '..'"),
    (
        cells_grid(
            CE, {"id": "d/a", "data": "d", "method": "a", "runs_of": "d/ce"}, {**CE, "id": "d/b", "runs_of": "d/a"}
        ),
        "d/b",
        "must name a trained cell",
    ),
]
for report in REPORTS[1:]:
    tuned = {"id": "d/tuned", "data": "d", "method": "tuned", "runs_of": "d/ce", "report": report}
    BAD_GRIDS.append((cells_grid(NO_DEV, tuned), "d/tuned", f"report '{report}' is chosen on a dev split"))
    BAD_GRIDS.append(({**cells_grid(CE, tuned), "defaults": {"dev_fraction": 0}}, "d/tuned", "dev_fraction 0"))
    BAD_GRIDS.append((cells_grid({**NO_DEV, "report": report}), "d/ce", "no run can fill this row"))


@pytest.mark.parametrize("grid, cell, says", BAD_GRIDS)
def test_bad_grids_are_config_errors_naming_the_file_and_the_cell(tmp_path, capsys, grid, cell, says):
    grid_file = tmp_path / "bad.yaml"
    grid_file.write_text(yaml.safe_dump(grid))
    with pytest.raises(ConfigError) as error:
        load_grid(grid_file)
    message = str(error.value)
    assert message.startswith(f"--grid {grid_file}") and says in message
    assert cell is None or f"cell {cell!r}" in message
    with pytest.raises(SystemExit) as exit_info:
        case_study.main(["--grid", str(grid_file), "--dry-run"])
    assert exit_info.value.code == 2 and says in one_line_error(capsys)


def test_grid_values_that_fit_but_fail_validation_name_the_cell(tmp_path, capsys):
    fixed = {
        "id": "d/la",
        "data": "d",
        "method": "LA",
        "report": "posthoc_la",
        "flags": {**NO_DEV["flags"], "posthoc_la": 1.0},
    }
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(yaml.safe_dump(cells_grid(fixed, {**CE, "flags": {"dev_fraction": 0.9}})))
    grid = load_grid(grid_file)  # post-hoc LA with a fixed τ needs no dev split
    with pytest.raises(ConfigError, match=r"cell 'd/ce': --dev-fraction must be in \[0, 0.5\]") as error:
        plan_runs(grid, grid.cells, tmp_path / "res", {}, None)
    assert str(error.value).startswith(f"--grid {grid_file}")
    with pytest.raises(ConfigError, match="--seeds must be a whole number of seeds, at least 1, got 0"):
        plan_runs(grid, grid.cells[:1], tmp_path / "res", {}, 0)
    with pytest.raises(SystemExit):
        case_study.main(["--grid", str(grid_file), "--dry-run"])
    assert "cell 'd/ce'" in one_line_error(capsys)


def test_ece_columns_average_each_runs_calibration_record(tmp_path):
    grid, results = fake_results(tmp_path)
    recorded = {}
    for seed in range(3):
        for cell, before, after in (("d1/ce", 0.30, 0.10), ("d1/good", 0.2, None)):

            def add(summary, seed=seed, before=before, after=after):
                val = {"before": {"ece": before + seed / 100}}
                if after is not None:
                    val["after"] = {"ece": after + seed / 50}
                summary["calibration"] = {
                    "last_epoch": {"temperature": 1.5, "val": val},
                    "dev_selected_checkpoint": {"temperature": 2.0, "val": {"before": {"ece": 0.9}}},
                }

            edit_summary(results / "runs" / cell / f"seed{seed}" / "summary.json", add)
            recorded.setdefault(cell, []).append((before + seed / 100, None if after is None else after + seed / 50))
    assert table_only(grid, results) == 0
    rows = table_rows(results)
    before, after = zip(*recorded["d1/ce"], strict=True)
    assert float(rows["d1/ce"]["ece_mean"]) == pytest.approx(np.mean(before), abs=1e-6)
    assert float(rows["d1/ce"]["ece_std"]) == pytest.approx(np.std(before, ddof=1), abs=1e-6)
    assert float(rows["d1/ce"]["ece_scaled_mean"]) == pytest.approx(np.mean(after), abs=1e-6)
    assert rows["d1/ce-tuned"]["ece_mean"] == rows["d1/ce"]["ece_mean"]  # a threshold keeps the probabilities
    assert rows["d1/good"]["ece_mean"] != "" and rows["d1/good"]["ece_scaled_mean"] == ""  # no temperature
    assert "0.310 ± 0.010 → 0.120 ± 0.020" in (results / "table.md").read_text()
    assert all(rows[c]["ece_mean"] == "" for c in rows if c.startswith("d2/"))  # runs without the record
    summary = json.loads((results / "runs" / "d1" / "ce" / "seed0" / "summary.json").read_text())
    assert _val_ece(summary, "dev_selected_checkpoint") == (0.9, None)  # that epoch's own model


# ---------------------------------------------------------------- the imbalance-ratio sweep (issue 16)

RATIO_SWEEP = GRID.parent / "ratio_sweep.yaml"
RATIOS = (1, 2, 5, 11, 22, 50)


def test_ratio_sweep_uses_the_case_study_recipe():
    sweep, case = (yaml.safe_load(path.read_text()) for path in (RATIO_SWEEP, GRID))
    assert sweep["defaults"] == case["defaults"]  # the sweep measures the case study's recipe, not its own


def test_ratio_sweep_grid_plans_its_runs(capsys):
    given = ["--grid", str(RATIO_SWEEP), "--data-dir", "somewhere", "--scale", "0.2", "--image-size", "64"]
    assert case_study.main([*given, "--dry-run"]) == 0
    out = capsys.readouterr().out
    # 6 ratios x (CE, weighted, oversampling, logit-adjusted, MaxNorm stage 2) x 1 seed; post-hoc LA reuses CE
    assert "30 runs, 30 to do, 36 cells" in out
    assert "--train-counts 220,11000 --val-counts 1500,1500 --loss ce --data-dir somewhere --scale 0.2" in out
    assert "--image-size 64" in out
    assert "--decoupled maxnorm" in out and f"--from-run {Path('results/ratio-sweep/runs/ratio-50/ce/seed0')}" in out
    assert case_study.main([*given, "--seeds", "3", "--dry-run"]) == 0
    assert "90 runs, 90 to do, 36 cells" in capsys.readouterr().out
    grid = load_grid(RATIO_SWEEP)
    assert grid.name == "ratio-sweep" and grid.sweep == {"x_label": "training dogs per cat"} and grid.seeds == 1
    series = {c.series for c in grid.cells}
    assert len(series) == 6 and "plain CE" in series
    for name in series:  # every line has a point at every ratio
        assert sorted(c.x for c in grid.cells if c.series == name) == list(RATIOS), name
    for cell in grid.cells:
        flags = grid.flags_of(cell)
        if cell.runs_of is None:  # positive (cat) first: the dogs fixed, the cats round(11000 / r)
            assert flags["train_counts"] == [round(11000 / cell.x), 11000] and flags["val_counts"] == [1500, 1500]
        assert cell.data == f"ratio-{cell.x:g}" and grid.baselines[cell.data] == f"{cell.data}/ce"
        assert cell.stage1 in (None, f"{cell.data}/ce") and cell.runs_of in (None, f"{cell.data}/ce")
    assert {c.report for c in grid.cells if c.runs_of} == {"posthoc_la"}


def test_ratio_sweep_splits_share_validation_and_nest():
    # what makes the sweep paired: at one seed every ratio scores the same validation photos, trains on the
    # same dogs, and each smaller cat set (training and dev) is part of every larger one
    from imbalance.config import RunConfig
    from imbalance.data import draw_split, split_counts

    files = {name: [f"{name}/{i}.jpg" for i in range(2600)] for name in ("Cat", "Dog")}
    grid = load_grid(RATIO_SWEEP)
    splits = []
    for cell in (c for c in grid.cells if c.series == "plain CE"):
        flags = grid.flags_of(cell)
        counts = {k: tuple(flags[k]) for k in ("train_counts", "val_counts")}
        cfg = RunConfig(data_dir=Path("d"), scale=0.2, **counts)
        splits.append(draw_split(files, ("Dog", "Cat"), split_counts(cfg), seed=1, scale=0.2, dev_fraction=0.1))
    cats = [[{p for p, label in part if label == 1} for part in split[:2]] for split in splits]  # (train, dev)
    assert [len(train) + len(dev) for train, dev in cats] == [2200, 1100, 440, 200, 100, 44]
    assert len(splits[0][2]) == 600 and all(split[2] == splits[0][2] for split in splits)  # the validation photos
    for part in (0, 1):  # the dogs, training and dev
        dogs = [{p for p, label in split[part] if label == 0} for split in splits]
        assert all(d == dogs[0] for d in dogs) and len(dogs[0]) == (1980, 220)[part]
    for (train, dev), (smaller_train, smaller_dev) in itertools.pairwise(cats):
        assert smaller_train < train and smaller_dev < dev


def point(**change) -> dict:
    return {"id": "d/ce", "data": "d", "method": "CE", "flags": {"loss": "ce"}, "x": 2, "series": "CE", **change}


def without(cell: dict, *keys: str) -> dict:
    return {k: v for k, v in cell.items() if k not in keys}


SWEEP = {"sweep": {"x_label": "dogs per cat"}}
BAD_SWEEP_GRIDS = [  # (grid, the cell the error names or None, what it says)
    (cells_grid(without(point(), "x"), **SWEEP), "d/ce", "lacks x (in a grid with sweep"),
    (cells_grid(without(point(), "series"), **SWEEP), "d/ce", "lacks series"),
    (cells_grid(without(point(), "x", "series"), **SWEEP), "d/ce", "lacks x and series"),
    (
        cells_grid(point(x="abc"), **SWEEP),
        "d/ce",
        "x must be a positive number (its place on the sweep's log axis), got 'abc'",
    ),
    (cells_grid(point(x=0), **SWEEP), "d/ce", "x must be a positive number"),
    (cells_grid(point(x=-5), **SWEEP), "d/ce", "got -5"),
    (cells_grid(point(x=True), **SWEEP), "d/ce", "got True"),
    (cells_grid(point(x=[2]), **SWEEP), "d/ce", "got [2]"),
    (cells_grid(point(series=3), **SWEEP), "d/ce", "series must be text"),
    (cells_grid(point(series=""), **SWEEP), "d/ce", "series must be text"),
    (
        cells_grid(point(), point(id="d/ce2", x=2.0), **SWEEP),
        "d/ce2",
        "is series 'CE' at x 2, as cell 'd/ce' is",
    ),
    (
        cells_grid(point()),
        "d/ce",
        "has x and series, which place a cell in a sweep, but the grid has no top-level sweep",
    ),
    (cells_grid(without(point(), "x")), "d/ce", "has series, which place"),
    (cells_grid(point(), sweep="ratio"), None, "sweep must be a mapping"),
    (cells_grid(point(), sweep={"x_lable": "r"}), None, "unknown sweep keys ['x_lable']"),
    (cells_grid(point(), sweep={"x_label": 3}), None, "sweep: x_label must be text"),
]


@pytest.mark.parametrize("grid, cell, says", BAD_SWEEP_GRIDS)
def test_bad_sweep_grids_are_config_errors_naming_the_file_and_the_cell(tmp_path, capsys, grid, cell, says):
    test_bad_grids_are_config_errors_naming_the_file_and_the_cell(tmp_path, capsys, grid, cell, says)


def test_a_good_sweep_grid_loads():
    grid_file = Path("g.yaml")
    grid_file.write_text(yaml.safe_dump(cells_grid(point(), point(id="d/w", series="W", x=5.5), sweep={})))
    grid = load_grid(grid_file)  # an empty sweep mapping is a sweep: x_label defaults to x
    assert grid.sweep == {"x_label": "x"} and [(c.series, c.x) for c in grid.cells] == [("CE", 2), ("W", 5.5)]


FAKE_SWEEP = {
    "name": "fake-sweep",
    "seeds": 3,
    "sweep": {"x_label": "dogs per cat"},
    "baselines": {"r1": "r1/ce", "r5": "r5/ce"},
    "cells": [
        {"id": "r1/ce", "data": "r1", "method": "plain CE", "x": 1, "series": "plain CE", "flags": {"loss": "ce"}},
        {"id": "r1/good", "data": "r1", "method": "remedy", "x": 1, "series": "remedy", "flags": {"loss": "weighted"}},
        {"id": "r5/ce", "data": "r5", "method": "plain CE", "x": 5, "series": "plain CE", "flags": {"loss": "ce"}},
        {"id": "r5/good", "data": "r5", "method": "remedy", "x": 5, "series": "remedy", "flags": {"loss": "weighted"}},
        {
            "id": "r5/ce-tuned",
            "data": "r5",
            "method": "CE, dev-tuned",
            "x": 5,
            "series": "tuned",
            "runs_of": "r5/ce",
            "report": "dev_tuned_threshold",
        },
        {"id": "r20/ce", "data": "r20", "method": "plain CE", "x": 20, "series": "plain CE", "flags": {"loss": "ce"}},
    ],
}
FAKE_SWEEP_KINDS = {"r1/ce": "weak", "r1/good": "good", "r5/ce": "weak", "r5/good": "good", "r20/ce": "weak"}


def sweep_tables(markdown: str) -> dict[str, dict[str, dict[str, str]]]:
    """sweep.md's tables: title -> series -> x -> the cell's text."""
    tables: dict[str, dict[str, dict[str, str]]] = {}
    title, xs = None, []
    for line in markdown.splitlines():
        if line.startswith("### "):
            title = line[4:].rsplit(", against ", 1)[0]
            tables[title] = {}
        elif title is not None and line.startswith("| series |"):
            xs = [c.strip() for c in line.strip()[1:-1].split("|")][1:]
        elif title is not None and line.startswith("| ") and xs:
            texts = [c.strip() for c in line.strip()[1:-1].split("|")]
            tables[title][texts[0]] = dict(zip(xs, texts[1:], strict=True))
    return tables


def test_sweep_md_and_png_from_fake_runs(tmp_path):
    from imbalance.case_study import collect

    grid_file, results = fake_results(tmp_path, FAKE_SWEEP, FAKE_SWEEP_KINDS)
    shutil.rmtree(results / "runs" / "r20")  # a point none of whose runs finished
    for seed in (1, 2):  # a point with one seed
        shutil.rmtree(results / "runs" / "r5" / "good" / f"seed{seed}")
    assert table_only(grid_file, results) == 0
    assert (results / "sweep.png").stat().st_size > 1000 and (results / "table.md").is_file()
    markdown = (results / "sweep.md").read_text()
    assert (
        markdown.startswith("# Case study: fake-sweep") and "## Sweep: 3 series at dogs per cat = 1, 5, 20" in markdown
    )
    tables = sweep_tables(markdown)
    f1, ba, ap = (
        tables[f"{t} [95% CI]"] for t in ("F1 of the positive class (cat)", "Balanced accuracy", "Average precision")
    )
    grid = load_grid(grid_file)
    rows = {r.id: r for r in collect(grid, grid.cells, results, None, ap_interval=True)}
    good = rows["r1/good"]
    assert float(table_rows(results)["r1/good"]["f1_mean"]) == pytest.approx(good.means["f1"][0], abs=1e-6)
    mean, std = good.means["f1"]
    assert f1["remedy"]["1"] == f"{mean:.3f} ± {std:.3f} [{good.f1_ci[0]:.3f}, {good.f1_ci[1]:.3f}]"
    assert ba["remedy"]["1"].startswith(f"{good.means['balanced_accuracy'][0]:.3f} ± ")
    # the average precision's interval: the table's bootstrap (same draws, same seed) on the probabilities of the
    # overlapping CE runs (the remedy's fake probabilities separate the classes: AP 1 on every draw)
    ce = rows["r1/ce"]
    labels, probs = [], []
    for seed in range(3):
        lines = list(csv.DictReader((results / "runs" / "r1" / "ce" / f"seed{seed}" / "predictions.csv").open()))
        labels.append([int(r["label"]) for r in lines])
        probs.append([float(np.float32(r["prob_last"])) for r in lines])
    labels, probs = np.array(labels), np.array(probs)
    low, high = stats.bootstrap_interval(
        labels, probs, stats.draw(labels, 2000, BOOTSTRAP_SEED), stats.average_precision
    )
    assert ce.ap_ci == pytest.approx((low, high), abs=1e-12) and low < ce.means["average_precision"][0] < high < 1
    assert ap["plain CE"]["1"].endswith(f" [{low:.3f}, {high:.3f}]") and good.ap_ci == (1.0, 1.0)
    assert ce.means["average_precision"][0] == pytest.approx(
        np.mean([average_precision_score(y, p) for y, p in zip(labels, probs, strict=True)]), abs=1e-6
    )
    one = rows["r5/good"]  # fewer than 3 seeds: no interval, as in the table
    assert f1["remedy"]["5"] == f"{one.means['f1'][0]:.3f} (n<3)" and "[" not in ap["remedy"]["5"]
    assert tables["Seeds per point"]["remedy"] == {"1": "3", "5": "1", "20": ""}
    assert f1["plain CE"]["20"] == "–" and ap["plain CE"]["20"] == "–"  # nothing finished: no number
    assert f1["tuned"]["1"] == "" and f1["tuned"]["5"].endswith("]")  # not a point of the grid: blank
    no_skill = "all-cat predictor (no skill)"
    assert (f1[no_skill], ba[no_skill], ap[no_skill]) == (
        {"1": "0.667", "5": "0.667", "20": "–"},
        {"1": "0.500", "5": "0.500", "20": "–"},
        {"1": "0.500", "5": "0.500", "20": "–"},
    )
    first = (results / "sweep.md").read_text()
    assert table_only(grid_file, results) == 0
    assert (results / "sweep.md").read_text().split("\n", 4)[4] == first.split("\n", 4)[4]  # the same numbers


def test_a_grid_without_sweep_writes_no_sweep(tmp_path):
    grid, results = fake_results(tmp_path)
    assert table_only(grid, results) == 0
    assert (results / "table.md").is_file() and not (results / "sweep.md").exists()
    assert not (results / "sweep.png").exists()


GPU_GRID = GRID.parent / "case_study_gpu.yaml"


def test_the_gpu_grid_has_the_case_study_cells_at_full_scale():
    cpu, gpu = load_grid(GRID), load_grid(GPU_GRID)
    assert [(c.id, c.flags, c.runs_of, c.stage1, c.report) for c in gpu.cells] == [
        (c.id, c.flags, c.runs_of, c.stage1, c.report) for c in cpu.cells
    ]
    assert gpu.baselines == cpu.baselines and gpu.seeds == 3
    assert gpu.defaults["image_size"] == 224 and gpu.defaults["scale"] == 0.99 and gpu.name != cpu.name


@pytest.mark.parametrize(
    "grid, says",
    [
        ({"cells_from": "other.yaml", "cells": [CE]}, "has both cells and cells_from"),
        ({"cells_from": "missing.yaml"}, "cells_from missing.yaml:"),
        ({"cells_from": 3}, "cells_from must name a grid file"),
        ({"cells_from": "empty.yaml"}, "has no cells of its own to take"),
    ],
)
def test_bad_cells_from_is_a_one_line_error(tmp_path, grid, says):
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(cells_grid(CE)))
    (tmp_path / "empty.yaml").write_text(yaml.safe_dump({"name": "x"}))
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(yaml.safe_dump(grid))
    with pytest.raises(ConfigError) as error:
        load_grid(grid_file)
    assert str(error.value).startswith(f"--grid {grid_file}") and says in str(error.value)
    assert "\n" not in str(error.value)


def test_cells_from_takes_cells_and_baselines_but_keeps_its_own_defaults(tmp_path):
    (tmp_path / "other.yaml").write_text(
        yaml.safe_dump({**cells_grid(CE), "baselines": {"d": "d/ce"}, "defaults": {"epochs": 3}})
    )
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(yaml.safe_dump({"name": "big", "cells_from": "other.yaml", "defaults": {"epochs": 30}}))
    grid = load_grid(grid_file)
    assert [c.id for c in grid.cells] == ["d/ce"] and grid.baselines == {"d": "d/ce"}
    assert grid.defaults == {"epochs": 30} and grid.name == "big"
