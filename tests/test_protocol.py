"""The protocol: a dev split carved from the training data makes every decision; the validation set is only
reported. Checked here: the split (disjoint, stratified, nested, recorded), the decisions read dev only, the
prior-corrected threshold against a brute-force search, and a real run's four labelled result sets."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from experiments import run as run_cli
from imbalance.config import ConfigError, RunConfig
from imbalance.data import DataError, SplitData, dev_positions, load_manifest, load_split
from imbalance.metrics import (
    best_f1_threshold,
    best_posthoc_tau,
    confusion_metrics,
    dev_decisions,
    posthoc_threshold,
    prior_weights,
)
from imbalance.recorder import RESULT_SETS, RunRecorder
from tests.conftest import make_class_tree

# ------------------------------------------------------------------------------------------ the dev split


@pytest.mark.parametrize("fraction", [0.1, 0.07, 0.25, 1 / 3, 0.5])
def test_dev_positions_hold_ceil_n_f_and_are_nested(fraction):
    full = dev_positions(500, fraction)
    for n in (1, 2, 7, 10, 30, 123, 500):
        held = dev_positions(n, fraction)
        assert held.sum() == math.ceil(n * Fraction(str(fraction)))  # exact: ceil(30 * 0.1) is 3, not 4
        assert (held == full[:n]).all()  # a smaller class's dev photos are the first ones of a larger one's
    assert not dev_positions(100, 0).any()


@pytest.fixture
def pool(tmp_path) -> Path:
    # 130 cats, 130 dogs at 8 px: every preset at scale 0.008 (balanced: 88 train + 12 val per class)
    return make_class_tree(tmp_path / "PetImages", {"Cat": 130, "Dog": 130}, learnable=False, size=(8, 8))


def test_dev_split_is_stratified_disjoint_nested_and_recorded(pool, tmp_path):
    splits = {
        name: load_split(RunConfig(data_dir=pool, split=name, scale=0.008, seed=4))
        for name in ("balanced", "imbalanced-1", "imbalanced-2")
    }
    # training classes of 88 (dogs everywhere; cats balanced), 8 and 4 cats: ceil(10%) of each is dev
    assert splits["balanced"].dev_counts == [9, 9] and splits["balanced"].train_counts == [79, 79]
    assert splits["imbalanced-1"].dev_counts == [9, 1] and splits["imbalanced-1"].train_counts == [79, 7]
    assert splits["imbalanced-2"].dev_counts == [9, 1] and splits["imbalanced-2"].train_counts == [79, 3]
    for s in splits.values():
        train, dev, val = ({p for p, _ in part} for part in (s.train, s.dev, s.val))
        assert not train & dev and not train & val and not dev & val
        assert s.val == splits["balanced"].val  # the reported set is the same for every preset
    dev = {name: set(s.dev) for name, s in splits.items()}
    train = {name: set(s.train) for name, s in splits.items()}
    assert dev["imbalanced-2"] <= dev["imbalanced-1"] <= dev["balanced"]
    assert train["imbalanced-2"] < train["imbalanced-1"] < train["balanced"]
    # --dev-fraction 0 trains on the lecture's exact counts; the validation set does not move
    exact = load_split(RunConfig(data_dir=pool, split="imbalanced-1", scale=0.008, seed=4, dev_fraction=0))
    assert exact.train_counts == [88, 8] and exact.dev == [] and exact.val == splits["imbalanced-1"].val
    assert set(exact.train) == train["imbalanced-1"] | dev["imbalanced-1"]
    # the manifest records the dev list, and a replay gives it back
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(splits["imbalanced-1"].manifest()))
    assert json.loads(manifest.read_text())["version"] == 3
    assert load_manifest(manifest).dev == splits["imbalanced-1"].dev


def test_a_hand_edited_dev_list_or_one_shared_with_val_is_refused(pool, tmp_path):
    body = load_split(RunConfig(data_dir=pool, split="imbalanced-2", scale=0.008)).manifest()
    manifest = tmp_path / "manifest.json"
    moved = {**body, "dev": body["dev"][1:]}
    manifest.write_text(json.dumps(moved))
    with pytest.raises(DataError, match="do not match its sha256"):
        load_manifest(manifest)
    from imbalance.data import manifest_digest

    shared = {**body, "dev": body["dev"] + [body["val"][0]]}
    shared["sha256"] = manifest_digest(shared, 3)
    manifest.write_text(json.dumps(shared))
    with pytest.raises(DataError, match="both dev and val"):
        load_manifest(manifest)


def test_dev_fraction_is_checked(tmp_path):
    for bad in (-0.1, 0.6, float("nan")):
        with pytest.raises(ConfigError, match="--dev-fraction"):
            RunConfig(dev_fraction=bad).validate()
    tree = make_class_tree(tmp_path / "tiny", {"Cat": 3, "Dog": 6}, learnable=False, size=(8, 8))
    with pytest.raises(DataError, match="--dev-fraction 0.5 holds out all 1 training images of class 'Cat'"):
        load_split(RunConfig(data_dir=tree, train_counts=(1, 4), val_counts=(1, 1), dev_fraction=0.5))


# ----------------------------------------------------------------------------------------- the decisions


def brute_force_weighted_f1(labels: np.ndarray, probs: np.ndarray, weights: tuple[float, float]) -> float:
    """The best weighted F1 over every threshold, with scikit-learn's sample-weighted f1_score."""
    sample_weight = np.where(labels == 1, weights[1], weights[0])
    cuts = np.concatenate([[-1.0], np.unique(probs)])
    return max(f1_score(labels, probs > t, sample_weight=sample_weight, zero_division=0) for t in cuts)


@pytest.mark.parametrize("seed", range(6))
def test_prior_corrected_threshold_equals_a_brute_force_search_on_weighted_dev_samples(seed):
    rng = np.random.default_rng(seed)
    n_pos, n_neg = int(rng.integers(3, 12)), int(rng.integers(40, 120))  # a 1:4 to 1:40 dev split
    labels = np.array([1] * n_pos + [0] * n_neg)
    probs = np.round(np.clip(rng.normal(0.25 + 0.3 * labels, 0.2), 0, 1), 2)  # ties included
    weights = prior_weights([n_neg, n_pos], [300, 300])  # to the balanced validation prior
    assert weights[1] / weights[0] == pytest.approx(n_neg / n_pos)
    t = best_f1_threshold(labels, probs, weights)
    sample_weight = np.where(labels == 1, weights[1], weights[0])
    ours = f1_score(labels, probs > t, sample_weight=sample_weight, zero_division=0)
    assert ours == pytest.approx(brute_force_weighted_f1(labels, probs, weights), abs=1e-12)
    # the uncorrected threshold maximises plain F1 instead, and is never lower than the corrected one
    assert best_f1_threshold(labels, probs) >= t - 1e-12


def test_posthoc_tau_maximises_dev_balanced_accuracy_and_its_threshold_is_the_adjusted_logit():
    counts = [2200, 100]
    # P(positive) > sigmoid(tau log(pi1/pi0)) is the adjusted logit z - tau log(pi1/pi0) above 0
    for tau in (0.0, 0.5, 1.0, 2.0):
        t = posthoc_threshold(tau, counts)
        z = np.log(t / (1 - t))
        assert z == pytest.approx(tau * math.log(100 / 2200))
    rng = np.random.default_rng(0)
    labels = np.array([1] * 10 + [0] * 220)
    probs = np.clip(rng.normal(0.02 + 0.1 * labels, 0.03), 1e-4, 1)
    tau = best_posthoc_tau(labels, probs, counts)
    from imbalance.metrics import POSTHOC_TAUS

    scores = [confusion_metrics(labels, probs, posthoc_threshold(x, counts))["balanced_accuracy"] for x in POSTHOC_TAUS]
    assert confusion_metrics(labels, probs, posthoc_threshold(tau, counts))["balanced_accuracy"] == max(scores)


LABELS = torch.tensor([0, 0, 0, 0, 1, 1])
DEV_LABELS = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1, 1])


def recorder(tmp_path: Path, dev: bool = True, **cfg) -> RunRecorder:
    split = SplitData(
        "test",
        ("dog", "cat"),
        [("t0", 0)] * 40 + [("t1", 1)] * 4,
        [(f"v{i}", int(y)) for i, y in enumerate(LABELS)],
        dev=[(f"d{i}", int(y)) for i, y in enumerate(DEV_LABELS)] if dev else [],
    )
    return RunRecorder(tmp_path, RunConfig(**cfg), split, {})


def epoch(rec: RunRecorder, number: int, val: list[float], dev: list[float] | None) -> None:
    """One validated and trained epoch, as Lightning calls the recorder; the metrics are computed from the
    predictions as the module's torchmetrics would."""
    metrics = {}
    for stage, labels, probs in (("val", LABELS, val), ("dev", DEV_LABELS, dev)):
        if probs is None:
            continue
        from imbalance.metrics import ranking_metrics

        m = {**confusion_metrics(labels.numpy(), np.array(probs), 0.5), **ranking_metrics(labels.numpy(), probs)}
        metrics.update({f"{stage}/{k}": torch.tensor(float(v)) for k, v in m.items()})
    trainer = SimpleNamespace(
        sanity_checking=False, fast_dev_run=True, current_epoch=number, callback_metrics=metrics, is_global_zero=True
    )

    def predictions(labels, probs):
        return {"index": torch.arange(len(labels)), "label": labels, "prob": torch.tensor(probs)}

    module = SimpleNamespace(
        val_predictions=predictions(LABELS, val), dev_predictions=None if dev is None else predictions(DEV_LABELS, dev)
    )
    rec.on_validation_end(trainer, module)
    rec.on_train_epoch_end(trainer, module)


DEV_EPOCHS = [
    [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.45, 0.8],  # epoch 0: dev AUROC 12/14
    [0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.35, 0.45],  # epoch 1: dev AUROC 13/14, every probability below 0.5
    [0.9] * 9,  # epoch 2: all positive, AUROC 0.5
]
VAL_EPOCHS = [[0.2, 0.3, 0.6, 0.1, 0.7, 0.4], [0.1, 0.2, 0.3, 0.4, 0.45, 0.48], [0.9] * 6]


def decisions_of(rec: RunRecorder) -> dict:
    results = rec.results()
    return {
        "best_epoch": rec.best["epoch"],
        **{name: {k: results[name].get(k) for k in ("threshold", "tau", "epoch")} for name in results},
    }


def test_no_decision_moves_when_the_validation_predictions_are_corrupted(tmp_path):
    clean = recorder(tmp_path / "clean")
    for i, (val, dev) in enumerate(zip(VAL_EPOCHS, DEV_EPOCHS, strict=True)):
        epoch(clean, i, val, dev)
    rng = np.random.default_rng(0)
    corrupted = recorder(tmp_path / "corrupted")
    for i, dev in enumerate(DEV_EPOCHS):
        # validation predictions that would pick any other epoch, threshold or tau if they were read
        epoch(corrupted, i, list(rng.permutation([0.99, 0.01, 0.5, 0.98, 0.02, 0.3]) * (i + 1) / 3), dev)
    assert decisions_of(clean) == decisions_of(corrupted)
    assert clean.best["epoch"] == 1  # the highest dev AUROC; the all-positive epoch 2 cannot win
    assert set(clean.results()) == set(RESULT_SETS)
    # while the reported numbers do follow the validation predictions
    assert clean.results()["last_epoch"]["f1"] != corrupted.results()["last_epoch"]["f1"]


def test_every_result_set_is_labelled_with_what_chose_it(tmp_path):
    rec = recorder(tmp_path)
    for i, (val, dev) in enumerate(zip(VAL_EPOCHS[:2], DEV_EPOCHS[:2], strict=True)):
        epoch(rec, i, val, dev)
    results = rec.results()
    assert [name for name in RESULT_SETS if name in results] == list(results)
    for name, r in results.items():
        assert r["label"] and r["chosen_by"], name
        assert "optimistic" not in json.dumps(r)
        labels, probs = LABELS.numpy(), np.array(VAL_EPOCHS[r["epoch"]])
        assert r["f1"] == confusion_metrics(labels, probs, r["threshold"])["f1"], name
    assert results["dev_selected_checkpoint"]["epoch"] == 1 and results["last_epoch"]["epoch"] == 1
    assert "dev" in results["dev_tuned_threshold"]["chosen_by"] and "dev" in results["posthoc_la"]["chosen_by"]
    fixed = recorder(tmp_path / "fixed", posthoc_la=1.0)
    epoch(fixed, 0, VAL_EPOCHS[0], DEV_EPOCHS[0])
    assert fixed.results()["posthoc_la"]["tau"] == 1.0 and "fixed" in fixed.results()["posthoc_la"]["chosen_by"]


def test_without_a_dev_split_nothing_is_chosen(tmp_path):
    rec = recorder(tmp_path, dev=False, dev_fraction=0.0)
    for i, val in enumerate(VAL_EPOCHS):
        epoch(rec, i, val, None)
    assert rec.best is None and list(rec.results()) == ["last_epoch"]
    fixed = recorder(tmp_path / "fixed", dev=False, dev_fraction=0.0, posthoc_la=1.0)
    epoch(fixed, 0, VAL_EPOCHS[0], None)
    assert list(fixed.results()) == ["last_epoch", "posthoc_la"]  # a fixed tau needs no dev split
    assert dev_decisions({"label": LABELS.numpy()}, None, [40, 4]) == {}


# ------------------------------------------------------------------------------------------- a real run


def test_a_run_logs_dev_and_val_every_epoch_and_reports_four_labelled_result_sets(tmp_path):
    tree = make_class_tree(tmp_path / "pets", {"Cat": 24, "Dog": 40}, size=(16, 16))
    args = ["--data-dir", str(tree), "--train-counts", "10,30", "--val-counts", "8,8", "--backbone", "test_resnet"]
    args += ["--image-size", "16", "--epochs", "2", "--batch-size", "8", "--num-workers", "0", "--logger", "csv"]
    assert run_cli.main([*args, "--out", "run"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dev_counts"] == {"Dog": 3, "Cat": 1} and summary["train_counts"] == {"Dog": 27, "Cat": 9}
    assert list(summary["results"]) == list(RESULT_SETS)
    import csv

    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert len(rows) == 2
    for row in rows:  # every dev and val photo counted once per epoch
        assert sum(float(row[f"dev/{k}"]) for k in ("tp", "fp", "tn", "fn")) == 4
        assert sum(float(row[f"val/{k}"]) for k in ("tp", "fp", "tn", "fn")) == 16
    predictions = list(csv.DictReader((tmp_path / "run" / "predictions.csv").open()))
    assert len(predictions) == 16 and set(predictions[0]) == {"path", "label", "prob_last", "prob_dev_selected"}
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert len(manifest["dev"]) == 4 and (tmp_path / "run" / "checkpoints" / "best.ckpt").is_file()
    # the reported numbers are the validation predictions at each set's threshold
    labels = np.array([int(p["label"]) for p in predictions])
    for r in summary["results"].values():
        probs = np.array([float(p[r["predictions"]]) for p in predictions])
        assert confusion_metrics(labels, probs, r["threshold"])["f1"] == pytest.approx(r["f1"], abs=1e-12)
    # --dev-fraction 0: the lecture's exact counts, no best.ckpt, one result set
    assert run_cli.main([*args, "--dev-fraction", "0", "--out", "exact"]) == 0
    exact = json.loads((tmp_path / "exact" / "summary.json").read_text())
    assert exact["train_counts"] == {"Dog": 30, "Cat": 10} and list(exact["results"]) == ["last_epoch"]
    assert not (tmp_path / "exact" / "checkpoints" / "best.ckpt").exists()


def test_a_training_shard_of_one_image_is_a_clear_error_not_a_crash_at_the_first_step():
    # AutoBalance's search part of a tiny split under 2 processes: one image per rank, and batch norm raises
    # "Expected more than 1 value per channel" at the first training step (it did, before this check)
    from imbalance.data import TrainEpochSampler

    with pytest.raises(DataError, match="leaves 2 process\\(es\\) one image each.*fewer --devices"):
        TrainEpochSampler([0, 1], "none", 0, num_replicas=2, rank=0, batch_size=2, what="the search part")
    assert len(TrainEpochSampler([0, 1, 1, 0], "none", 0, num_replicas=2, rank=1, batch_size=2)) == 2


# ------------------------------------------------------------------ runs and manifests of earlier versions

TINY_RUN = ["--backbone", "test_resnet", "--image-size", "16", "--batch-size", "8", "--num-workers", "0"]


def tiny_tree(tmp_path: Path) -> tuple[Path, list[str]]:
    tree = make_class_tree(tmp_path / "pets", {"Cat": 20, "Dog": 30}, size=(16, 16))
    return tree, ["--data-dir", str(tree), "--train-counts", "10,20", "--val-counts", "6,6", *TINY_RUN]


def as_version_2(run_dir: Path) -> str:
    """Rewrite a run's manifest as the version-2 manifest an earlier version wrote (no dev list)."""
    from imbalance.data import manifest_digest

    manifest = json.loads((run_dir / "manifest.json").read_text())
    old = {k: v for k, v in manifest.items() if k not in ("dev", "dev_fraction")}
    old["version"] = 2
    old["sha256"] = manifest_digest(old, 2)
    (run_dir / "manifest.json").write_text(json.dumps(old))
    return old["sha256"]


def test_a_checkpoint_and_manifest_of_an_earlier_version_still_evaluate(tmp_path, capsys):
    from experiments import evaluate as evaluate_cli

    tree, args = tiny_tree(tmp_path)
    assert run_cli.main([*args, "--dev-fraction", "0", "--epochs", "1", "--logger", "none", "--out", "old"]) == 0
    ckpt = tmp_path / "old" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["manifest_sha256"] = as_version_2(tmp_path / "old")
    torch.save(checkpoint, ckpt)
    # it raised KeyError: 'dev' (the version-3 digest of a version-2 manifest), for the run's split and a folder
    for extra in ([], ["--data-dir", str(tree)]):
        assert evaluate_cli.main(["--checkpoint", str(ckpt), "--out", "ev", "--bootstrap", "0", *extra]) == 0
        metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
        assert list(metrics["results"]) == ["threshold_0.5"] and "no dev split" in metrics["note"]
    capsys.readouterr()


def test_resuming_a_run_of_an_earlier_version_keeps_its_split_and_reports_no_dev_choice(tmp_path):
    _, args = tiny_tree(tmp_path)
    assert run_cli.main([*args, "--dev-fraction", "0", "--epochs", "1", "--logger", "none", "--out", "old"]) == 0
    run_dir = tmp_path / "old"
    # what a run of the earlier version left: no dev_fraction in config.json, a version-2 manifest, and its
    # recorder's state with one flat set of predictions and a best epoch chosen on val F1
    config = json.loads((run_dir / "config.json").read_text())
    del config["dev_fraction"]
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "summary.json").unlink()
    as_version_2(run_dir)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    key = next(k for k in checkpoint["callbacks"] if k.startswith("RunRecorder"))
    state = checkpoint["callbacks"][key]
    state["last_predictions"] = state["best_predictions"] = state["last_predictions"]["val"]
    state["best"] = {"epoch": 0, "metrics": state["history"][0], "rule": "highest val F1"}
    torch.save(checkpoint, ckpt)
    manifest_before = (run_dir / "manifest.json").read_text()
    # it raised AttributeError ('list' object has no attribute 'items') after rewriting manifest.json
    assert run_cli.main(["--resume", "--out", "old", "--epochs", "2", "--logger", "none"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_completed"] == 2 and summary["config"]["dev_fraction"] == 0.0
    assert list(summary["results"]) == ["last_epoch"]  # the val-chosen epoch is not reported as dev-selected
    assert (run_dir / "manifest.json").read_text() == manifest_before


def test_a_resumed_run_replays_its_split_even_after_the_folder_changed(tmp_path):
    tree, args = tiny_tree(tmp_path)
    assert run_cli.main([*args, "--epochs", "1", "--logger", "none", "--out", "run"]) == 0
    manifest_before = (tmp_path / "run" / "manifest.json").read_text()
    for i in range(3):  # new photos: a redraw would move photos the run trained on into dev
        (tree / "Cat" / f"{i}.jpg").rename(tree / "Cat" / f"new{i}.jpg")
    for i in range(3):
        make_class_tree(tmp_path / "more", {"Cat": 3}, size=(16, 16))
        (tmp_path / "more" / "Cat" / f"{i}.jpg").rename(tree / "Cat" / f"{i}.jpg")
    assert run_cli.main(["--resume", "--out", "run", "--epochs", "2", "--logger", "none"]) == 0
    assert (tmp_path / "run" / "manifest.json").read_text() == manifest_before
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dev_counts"] == {"Dog": 2, "Cat": 1} and summary["epochs_completed"] == 2


def test_a_replayed_manifest_checks_its_dev_photos_and_records_its_dev_fraction(tmp_path, capsys):
    tree, args = tiny_tree(tmp_path)
    assert run_cli.main([*args, "--dev-fraction", "0.2", "--epochs", "1", "--logger", "none", "--out", "a"]) == 0
    manifest = tmp_path / "a" / "manifest.json"
    replay = ["--manifest", str(manifest), *TINY_RUN, "--epochs", "1", "--logger", "none"]
    assert run_cli.main([*replay, "--out", "b"]) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dev_fraction"] == 0.2  # it recorded 0.1
    with pytest.raises(SystemExit):
        run_cli.main([*replay, "--dev-fraction", "0.1", "--out", "c"])
    assert "drop --dev-fraction" in capsys.readouterr().err
    dev_photo = json.loads(manifest.read_text())["dev"][0][0]
    (tree / dev_photo).unlink()
    with pytest.raises(DataError, match="files are missing"):  # it failed at the first validation instead
        load_manifest(manifest)


def test_dev_positions_of_a_fraction_with_a_long_decimal_form_do_not_overflow():
    assert dev_positions(11000, 0.1 * 3).sum() == 3300  # 0.30000000000000004: it held out 3,297
    assert dev_positions(12500, 1 / 3).sum() == math.ceil(12500 / 3)
