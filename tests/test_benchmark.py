"""The benchmark runs end to end on a tiny setting (a smoke test: no speed is asserted)."""

from __future__ import annotations

import json

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
    assert "lightning / plain loop" in capsys.readouterr().out
