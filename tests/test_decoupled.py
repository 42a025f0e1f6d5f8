"""Decoupled stage 2 (imbalance.decoupled): cRT, τ-norm, LWS (Kang et al. 2020) and MaxNorm (Alshammari et al.
2022), each against its definition, from the CLI, in the case study and under 2-process CPU DDP."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from experiments import run as run_cli
from imbalance.case_study import load_grid, plan_runs
from imbalance.config import ConfigError, RunConfig
from imbalance.decoupled import (
    TAU_NORM_GRID,
    DecoupledClassifier,
    FeatureDataModule,
    choose_tau_norm,
    maxnorm_cap,
    project_max_norm,
    stage2_config,
    tau_normalised,
)
from imbalance.evaluate import evaluate, load_checkpoint
from imbalance.losses import CrossEntropy
from imbalance.model import create_backbone

TINY = ["--backbone", "test_resnet", "--image-size", "16", "--batch-size", "64", "--logger", "none"]
METHODS = ("crt", "tau-norm", "lws", "maxnorm")


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> Path:
    """A finished 2-epoch run on the embedded digits (about 1:9), the stage 1 of every test here."""
    out = tmp_path_factory.mktemp("decoupled") / "stage1"
    assert run_cli.main([*TINY, "--epochs", "2", "--out", str(out)]) == 0
    return out


def state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def head_norms(weight: torch.Tensor) -> torch.Tensor:
    return weight.norm(dim=1)


@pytest.mark.parametrize("method", METHODS)
def test_stage2_changes_only_the_head_and_keeps_the_split(stage1, tmp_path, method):
    out = tmp_path / method
    epochs = [] if method == "tau-norm" else ["--stage2-epochs", "2"]
    assert (
        run_cli.main(["--logger", "none", "--decoupled", method, "--from-run", str(stage1), *epochs, "--out", str(out)])
        == 0
    )
    before, after = state(stage1), state(out)
    backbone = [k for k in before if k.startswith("backbone.") and not k.startswith("backbone.fc.")]
    assert backbone and all(torch.equal(before[k], after[k]) for k in backbone)  # batch-norm buffers included
    assert "scales" not in after  # LWS's scales are folded into the head: a plain network of this repository
    w0, w1 = before["backbone.fc.weight"], after["backbone.fc.weight"]
    summary = json.loads((out / "summary.json").read_text())
    record = summary["decoupled"]
    assert record["method"] == method and summary["epochs_completed"] == (1 if method == "tau-norm" else 2)
    assert summary["config"]["from_run"] == str(stage1.resolve())  # stored resolved, like data_dir
    if method == "tau-norm":
        assert torch.allclose(w1, tau_normalised(w0, record["tau"]), atol=1e-7)
        assert not after["backbone.fc.bias"].any()  # the authors' τ-norm drops the bias
        assert len(record["dev_balanced_accuracy_per_tau"]) == len(TAU_NORM_GRID)
    elif method == "lws":  # one scale per class row, the bias scaled alike
        scales = head_norms(w1) / head_norms(w0)
        assert torch.allclose(w1, w0 * scales[:, None], atol=1e-6)
        assert torch.allclose(after["backbone.fc.bias"], before["backbone.fc.bias"] * scales, atol=1e-6)
        assert not torch.allclose(scales, torch.ones(2))
    elif method == "maxnorm":
        assert record["norm_cap"] == pytest.approx(maxnorm_cap(w0, 0.1))
        assert bool((head_norms(w1) <= record["norm_cap"] * (1 + 1e-6)).all())
    else:
        assert not torch.allclose(w1, w0)
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (stage1, out)]
    assert all(manifests[0][part] == manifests[1][part] for part in ("train", "dev", "val"))
    # the checkpoint evaluates like any run's, and gives the probabilities the run reported
    metrics = evaluate(out / "checkpoints" / "last.ckpt", tmp_path / "eval", bootstrap=0)
    reported = np.loadtxt(out / "predictions.csv", delimiter=",", skiprows=1, usecols=2)
    evaluated = np.loadtxt(tmp_path / "eval" / "predictions.csv", delimiter=",", skiprows=1, usecols=2)
    assert np.allclose(evaluated, reported, atol=1e-5)
    assert metrics["results"]["threshold_0.5"]["f1"] == pytest.approx(summary["results"]["last_epoch"]["f1"])


def test_crt_is_trained_class_balanced(stage1, tmp_path):
    split = load_split_of(stage1)
    features = {name: torch.zeros(len(getattr(split, name)), 4) for name in ("train", "dev", "val")}
    for replicas in (1, 2):
        seen: Counter = Counter()
        for rank in range(replicas):
            module = FeatureDataModule(split, features, batch_size=16, sampling="over", seed=3)
            module._replicas = lambda rank=rank, replicas=replicas: (replicas, rank)
            for _, labels, _ in module.train_dataloader():
                seen.update(labels.tolist())
        counts = [label for _, label in split.train]
        assert seen[0] == seen[1] == max(Counter(counts).values())  # every class as often as the largest


def load_split_of(run_dir: Path):
    from imbalance.data import load_manifest

    return load_manifest(run_dir / "manifest.json", None)


def test_tau_norm_is_the_identity_at_zero_and_equalises_the_norms_at_one():
    weight = torch.randn(2, 7) * torch.tensor([[3.0], [0.2]])
    assert torch.equal(tau_normalised(weight, 0.0), weight)
    assert torch.allclose(head_norms(tau_normalised(weight, 1.0)), torch.ones(2))
    half = tau_normalised(weight, 0.5)
    assert torch.allclose(head_norms(half), head_norms(weight) ** 0.5)


@pytest.mark.parametrize("seed", range(4))
def test_tau_is_chosen_by_dev_balanced_accuracy_like_a_brute_force_search(seed):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(60, 5, generator=g)
    labels = (torch.rand(60, generator=g) < 0.2).long()
    features[labels == 1] += 0.7
    weight, bias = torch.randn(2, 5, generator=g) * torch.tensor([[2.0], [0.5]]), torch.randn(2, generator=g)
    tau, scores = choose_tau_norm(weight, bias, features, labels)
    reference = {
        t: balanced_accuracy_score(
            labels, (features @ (weight / weight.norm(dim=1, keepdim=True) ** t).T + bias).argmax(1)
        )
        for t in TAU_NORM_GRID
    }
    best = max(reference.values())
    assert scores[f"{tau:g}"] == pytest.approx(best)
    assert tau == min(t for t, s in reference.items() if s == pytest.approx(best))  # ties: the smaller τ


def test_lws_with_unit_scales_is_stage_one(stage1):
    backbone, hparams = load_checkpoint(stage1 / "checkpoints" / "last.ckpt")
    reference = create_backbone("test_resnet", 2)
    reference.load_state_dict(backbone.state_dict())
    config = {**hparams["config"], "decoupled": "lws", "from_run": str(stage1)}
    module = DecoupledClassifier(backbone, CrossEntropy(), config, [10, 90]).eval()
    images = torch.randn(5, 3, 16, 16)
    assert torch.equal(module(images), reference.eval()(images))
    tau0 = DecoupledClassifier(backbone, CrossEntropy(), {**config, "decoupled": "tau-norm", "tau_norm": 0.0}, [10, 90])
    with torch.no_grad():  # τ-norm drops the bias (as the authors' code): τ = 0 is stage 1 less its bias
        reference.get_classifier().bias.zero_()
    assert torch.equal(tau0.eval()(images), reference(images))


def test_maxnorm_never_lets_a_class_norm_exceed_the_cap():
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 2)
    with torch.no_grad():
        head.weight.mul_(torch.tensor([[5.0], [0.5]]))
    norms = head_norms(head.weight.detach())
    cap = maxnorm_cap(head.weight, 0.1)
    assert cap == pytest.approx(float(norms.min() + 0.1 * (norms.max() - norms.min())))
    project_max_norm(head.weight, cap)
    optimizer = torch.optim.SGD(head.parameters(), lr=5.0)
    for _ in range(20):  # large steps that push every row outwards
        optimizer.zero_grad()
        (-head.weight.norm(dim=1).sum()).backward()
        optimizer.step()
        project_max_norm(head.weight, cap)
        assert bool((head_norms(head.weight.detach()) <= cap * (1 + 1e-6)).all())
    small = torch.tensor([[0.1, 0.0], [0.0, 0.2]])
    project_max_norm(small, 1.0)
    assert torch.equal(small, torch.tensor([[0.1, 0.0], [0.0, 0.2]]))  # inside the ball: untouched


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_from_the_cli_in_one_command_fast_dev_run(tmp_path, method):
    assert run_cli.main([*TINY, "--decoupled", method, "--fast-dev-run"]) == 0


def test_one_command_trains_stage_one_in_its_subfolder(tmp_path, capsys):
    out = tmp_path / "both"
    args = [*TINY, "--epochs", "1", "--decoupled", "lws", "--stage2-epochs", "1", "--out", str(out)]
    assert run_cli.main(args) == 0
    assert (out / "stage1" / "summary.json").is_file() and (out / "summary.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert Path(summary["config"]["from_run"]) == (out / "stage1").resolve()
    with pytest.raises(SystemExit):  # a second time without --overwrite: refused before stage 1 trains again
        run_cli.main(args)
    assert "already holds" in capsys.readouterr().err
    stage1_summary = (out / "stage1" / "summary.json").read_bytes()
    for name in ("summary.json", "config.json", "checkpoints"):  # as if stage 2 had failed: stage 1 is kept
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    assert run_cli.main(args) == 0
    assert "reusing the finished stage 1" in capsys.readouterr().out
    assert (out / "stage1" / "summary.json").read_bytes() == stage1_summary and (out / "summary.json").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lr", "0.5"], "--lr 0.5 (the stage-1 run has 0.001)"),
        (["--loss", "focal"], "--loss focal (the stage-1 run has ce)"),
        (["--tau-norm", "1"], "--tau-norm is the τ of --decoupled tau-norm"),
        (["--maxnorm-thresh", "1.5"], "--maxnorm-thresh is the cap of --decoupled maxnorm"),
        (["--stage2-epochs", "0"], "--stage2-epochs must be at least 1"),
    ],
)
def test_stage2_option_errors_are_one_line(stage1, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as stop:
        run_cli.main(
            ["--logger", "none", "--decoupled", "crt", "--from-run", str(stage1), *extra, "--out", str(tmp_path / "x")]
        )
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_stage2_never_writes_over_its_stage1_run(stage1, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(stage1, copy)
    before = (copy / "summary.json").read_bytes()
    for out in (copy, copy / "inside"):
        with pytest.raises(SystemExit):
            run_cli.main(
                ["--logger", "none", "--decoupled", "crt", "--from-run", str(copy), "--out", str(out), "--overwrite"]
            )
        assert "would replace the run it reads" in capsys.readouterr().err
    assert (copy / "summary.json").read_bytes() == before and not (copy / "inside").exists()


def test_stage2_records_the_stage1_dev_fraction_even_from_an_earlier_manifest(stage1, tmp_path):
    earlier = tmp_path / "earlier"
    shutil.copytree(stage1, earlier)
    manifest = json.loads((earlier / "manifest.json").read_text())
    del manifest["dev_fraction"]  # written before manifests recorded it
    (earlier / "manifest.json").write_text(json.dumps(manifest))
    assert (
        run_cli.main(
            ["--logger", "none", "--decoupled", "tau-norm", "--from-run", str(earlier), "--out", str(tmp_path / "s2")]
        )
        == 0
    )
    summary = json.loads((tmp_path / "s2" / "summary.json").read_text())
    assert summary["config"]["dev_fraction"] == 0.1 and sum(summary["dev_counts"].values()) > 0


def test_stage2_may_read_the_stage1_photos_under_another_folder(tmp_path):
    stage1 = RunConfig(data_dir=tmp_path / "photos", split="balanced", scale=0.1, lr=0.002)
    cfg = RunConfig(decoupled="crt", from_run=tmp_path / "s1", data_dir=tmp_path / "moved", out=tmp_path / "s2")
    merged = stage2_config(cfg, stage1, given={"decoupled", "from_run", "data_dir", "out"})
    assert merged.data_dir == tmp_path / "moved" and merged.lr == 0.002 and merged.split == "balanced"
    with pytest.raises(ConfigError, match="--lr 0.1"):
        stage2_config(replace(cfg, lr=0.1), stage1, given={"decoupled", "from_run", "lr"})


def test_stage2_options_need_decoupled_and_a_finished_two_logit_run(stage1, tmp_path):
    with pytest.raises(ConfigError, match="--from-run is an option of decoupled stage 2"):
        RunConfig(from_run=stage1).validate()
    with pytest.raises(ConfigError, match="trains nothing"):
        RunConfig(decoupled="tau-norm", stage2_lr=0.1).validate()
    with pytest.raises(ConfigError, match="one logit"):
        RunConfig(decoupled="crt", loss="bce").validate()
    with pytest.raises(ConfigError, match="give --tau-norm T"):  # known before stage 1 trains
        RunConfig(decoupled="tau-norm", dev_fraction=0.0).validate()
    RunConfig(decoupled="tau-norm", dev_fraction=0.0, tau_norm=1.0).validate()
    unfinished = tmp_path / "unfinished"
    shutil.copytree(stage1, unfinished)
    (unfinished / "summary.json").unlink()
    with pytest.raises(SystemExit):
        run_cli.main(
            ["--logger", "none", "--decoupled", "crt", "--from-run", str(unfinished), "--out", str(tmp_path / "y")]
        )
    with pytest.raises(SystemExit):
        run_cli.main(
            [
                "--logger",
                "none",
                "--decoupled",
                "crt",
                "--from-run",
                str(tmp_path / "nowhere"),
                "--out",
                str(tmp_path / "y"),
            ]
        )
    out = tmp_path / "done"
    assert (
        run_cli.main(["--logger", "none", "--decoupled", "tau-norm", "--from-run", str(stage1), "--out", str(out)]) == 0
    )
    with pytest.raises(SystemExit):  # a stage 2 is started again, not resumed
        run_cli.main(["--resume", "--out", str(out)])
    with pytest.raises(SystemExit):  # a stage 2 is not a stage 1
        run_cli.main(["--logger", "none", "--decoupled", "crt", "--from-run", str(out), "--out", str(tmp_path / "z")])


def test_case_study_trains_stage_one_cells_first_and_points_stage_two_at_them(tmp_path):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(
        "name: g\nseeds: 2\ndefaults: {epochs: 1}\ncells:\n"
        "  - {id: d/crt, data: d, method: cRT, stage1: d/weighted, flags: {decoupled: crt}}\n"
        "  - {id: d/weighted, data: d, method: w, flags: {loss: weighted}}\n"
    )
    grid = load_grid(grid_file)
    plans = plan_runs(grid, grid.cells, tmp_path / "res", {}, None)
    assert [(p.cell.id, p.seed) for p in plans] == [("d/weighted", 0), ("d/crt", 0), ("d/weighted", 1), ("d/crt", 1)]
    crt = plans[1]
    assert crt.config["from_run"] == str(tmp_path / "res" / "runs" / "d" / "weighted" / "seed0")
    assert crt.config["loss"] == "weighted"  # the stage-1 cell's flags: the run's stored config matches the plan
    only_stage2 = plan_runs(grid, [grid.cells[0]], tmp_path / "res", {}, None)
    assert [p.cell.id for p in only_stage2] == ["d/weighted", "d/crt", "d/weighted", "d/crt"]
    for cell, problem in [
        ("{id: d/x, data: d, method: x, flags: {decoupled: crt}}", "no stage1"),
        ("{id: d/x, data: d, method: x, stage1: d/none, flags: {decoupled: crt}}", "unknown cell"),
        ("{id: d/x, data: d, method: x, stage1: d/weighted}", "no flag decoupled"),
    ]:
        grid_file.write_text(
            f"name: g\ncells:\n  - {{id: d/weighted, data: d, method: w, flags: {{loss: weighted}}}}\n  - {cell}\n"
        )
        with pytest.raises(ConfigError, match=problem):
            load_grid(grid_file)


@pytest.mark.slow
def test_two_process_stage2_gives_the_single_process_answer(stage1, tmp_path):
    # stage 2 trains only the head on fixed features, so batch 4 on each of 2 gloo processes (the same global
    # batch and the same samples per step, see EpochSampler) must give the model of batch 8 on one
    common = ["--decoupled", "crt", "--from-run", str(stage1), "--stage2-epochs", "1", "--logger", "none"]
    assert run_cli.main([*common, "--batch-size", "8", "--out", str(tmp_path / "one")]) == 0
    two = ["--batch-size", "4", "--accelerator", "cpu", "--devices", "2", "--out", str(tmp_path / "two")]
    result = subprocess.run(
        [sys.executable, "-m", "experiments.run", *common, *two],
        capture_output=True,
        text=True,
        timeout=240,  # a hang fails the test
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = {
        name: np.loadtxt(tmp_path / name / "predictions.csv", delimiter=",", skiprows=1, usecols=2)
        for name in ("one", "two")
    }
    assert np.allclose(outputs["one"], outputs["two"], atol=1e-5)
    summaries = {name: json.loads((tmp_path / name / "summary.json").read_text()) for name in outputs}
    assert sum(summaries["two"]["dev_counts"].values()) % 2 == 1  # uneven dev shards: 68 and 67 photos
    for name in ("dev_tuned_threshold", "posthoc_la"):  # decisions on the gathered dev predictions
        one, two = (summaries[k]["results"][name] for k in ("one", "two"))
        assert one["threshold"] == pytest.approx(two["threshold"], abs=1e-5) and one["f1"] == two["f1"]


def test_tau_norm_asked_for_two_processes_runs_in_one(stage1, tmp_path):
    # τ-norm trains nothing, which DDP cannot wrap ("DistributedDataParallel is not needed when a module
    # doesn't have any parameter that requires a gradient"); tested on the decision, not by starting DDP
    # workers from inside pytest
    from imbalance.train import hardware, stage2_hardware

    asked = RunConfig(decoupled="tau-norm", from_run=stage1, accelerator="cpu", devices=2)
    assert hardware(asked)["strategy"] == "ddp"
    assert stage2_hardware(asked, hardware(asked)) == {**hardware(asked), "devices": 1, "strategy": "auto"}
    crt = replace(asked, decoupled="crt")
    assert stage2_hardware(crt, hardware(crt)) == hardware(crt)  # the others train under DDP
