"""The benchmark runs end to end on a tiny setting (a smoke test: no speed is asserted)."""

from __future__ import annotations

import json

import pytest
from conftest import make_class_tree

from experiments import benchmark


def test_benchmark_smoke_on_photos_with_cache_and_memory(tmp_path, capsys):
    tree = make_class_tree(tmp_path / "pets", {"Cat": 20, "Dog": 44})
    args = [
        "--backbone",
        "test_resnet",
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--rounds",
        "1",
        "--data-dir",
        str(tree),
        "--num-workers",
        "0",
        "--cache",
        "--out",
        "bench.json",
    ]
    assert benchmark.main(args) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    for key in (
        "model_alone_contiguous",
        "model_alone_channels_last",
        "plain_loop",
        "lightning",
        "data_cached",
        "data_uncached",
    ):
        assert report["images_per_second"][key] > 0, key
    assert "lightning / plain loop" in report["ratios"] and "data cached / uncached" in report["ratios"]
    assert set(report["loss_time_relative_to_ce"]) >= {"ce", "focal", "ldam", "autobalance"}
    assert report["memory"]["pss_mib_4_workers"] > 0
    out = capsys.readouterr().out
    assert "lightning / plain loop" in out and "verdict: lightning / plain loop" in out and "spread" in out
    assert report["ratio_rounds"]["lightning / plain loop"] and "not resolved" in report["verdict"]  # one round


def test_round_ratios_are_paired_within_each_round():
    from imbalance.benchmark import round_ratios

    results = {"lightning": [90.0, 45.0, 60.0], "plain_loop": [100.0, 50.0, 60.0]}
    assert round_ratios(results, "lightning", "plain_loop") == [0.9, 0.9, 1.0]  # not 60/60 of the medians


@pytest.mark.parametrize(
    ("rounds", "says"),
    [
        ([0.98, 0.99, 0.985], "at least 0.97 in every round (resolved)"),
        ([0.90, 0.91, 0.92], "below 0.97 in every round (resolved)"),
        ([0.96, 0.975, 0.98], "not resolved: the rounds fall on both sides of 0.97"),
        ([0.88, 1.03, 0.95], "not resolved: the rounds disagree by more than the 3% effect"),
        ([0.99], "not resolved: one round has no spread"),
    ],
)
def test_the_verdict_says_not_resolved_unless_the_rounds_agree(rounds, says):
    from imbalance.benchmark import verdict

    line = verdict("lightning / plain loop", rounds, 0.97)
    assert says in line and f"spread {max(rounds) - min(rounds):.3f}" in line
