"""AutoBalance: the parametric loss's special cases, the hypergradient, the search's direction, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from experiments import run as run_cli
from imbalance.autobalance import (
    ParametricLoss,
    balanced_ce,
    head_hypergradient,
    initial_loss,
    search_split,
    soft_f1_loss,
)
from imbalance.losses import LogitAdjustedLoss


def batch(seed=0, n=40, k=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 2, torch.randint(0, k, (n,), generator=g)


@pytest.mark.parametrize("seed", range(3))
def test_reduces_to_ce_weighted_and_logit_adjusted(seed):
    logits, target = batch(seed)
    torch.testing.assert_close(ParametricLoss(2)(logits, target), F.cross_entropy(logits, target))
    w = torch.tensor([0.4, 1.6])  # sums to K = 2, so the normalisation keeps it
    weighted = F.cross_entropy(logits, target, weight=w, reduction="sum") / len(target)
    torch.testing.assert_close(ParametricLoss(2, weights=w)(logits, target), weighted)
    counts = [900, 100]
    la = initial_loss("logit-adjusted", counts, trainable=False)
    torch.testing.assert_close(la(logits, target), LogitAdjustedLoss(counts, 1.0)(logits, target))
    scales = torch.tensor([0.5, 2.0])  # geometric mean 1
    torch.testing.assert_close(
        ParametricLoss(2, scales=scales)(logits, target), F.cross_entropy(logits * scales, target)
    )


def test_normalisation_prevents_collapse():
    loss = ParametricLoss(2, weights=[10.0, 30.0], scales=[4.0, 4.0], offsets=[5.0, 7.0])
    w, d, o = loss.alpha()
    assert w.sum().item() == pytest.approx(2.0) and torch.prod(d).item() == pytest.approx(1.0)
    assert o.sum().item() == pytest.approx(0.0)


@pytest.mark.parametrize("objective", ["balanced-ce", "soft-f1"])
def test_hypergradient_matches_finite_differences(objective):
    torch.manual_seed(0)
    feats_train, y_train = torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 2, (30,))
    feats_val, y_val = torch.randn(20, 5, dtype=torch.float64), torch.tensor([0, 1] * 10)
    head = torch.nn.Linear(5, 2).double()
    loss = ParametricLoss(2, weights=[0.7, 1.3], scales=[0.8, 1.25], offsets=[0.3, -0.3], trainable=True).double()
    _, grads = head_hypergradient(loss, head, feats_train, y_train, feats_val, y_val, 0.5, objective)

    def objective_value() -> float:
        train_loss = loss(head(feats_train), y_train)
        gw, gb = torch.autograd.grad(train_loss, (head.weight, head.bias))
        logits = F.linear(feats_val, head.weight - 0.5 * gw, head.bias - 0.5 * gb)
        fn = balanced_ce if objective == "balanced-ce" else soft_f1_loss
        return float(fn(logits, y_val, 2))

    eps = 1e-6
    for param, grad in zip((loss.omega, loss.delta, loss.offset), grads, strict=True):
        for k in range(2):
            with torch.no_grad():
                param[k] += eps
            up = objective_value()
            with torch.no_grad():
                param[k] -= 2 * eps
            down = objective_value()
            with torch.no_grad():
                param[k] += eps
            assert grad[k].item() == pytest.approx((up - down) / (2 * eps), rel=1e-4, abs=1e-8)


def test_search_moves_offsets_toward_the_log_prior():
    # Logit adjustment with tau = 1 minimises the balanced error (Menon et al.): starting from plain CE on
    # 10:1 data, the search should push the minority's offset below the majority's, toward log(1/10).
    torch.manual_seed(0)
    n_major, n_minor = 1000, 100
    x = torch.cat(
        [torch.randn(n_major, 2) + torch.tensor([1.0, 0.0]), torch.randn(n_minor, 2) - torch.tensor([1.0, 0.0])]
    )
    y = torch.cat([torch.zeros(n_major, dtype=torch.long), torch.ones(n_minor, dtype=torch.long)])
    x_val = torch.cat([torch.randn(200, 2) + torch.tensor([1.0, 0.0]), torch.randn(200, 2) - torch.tensor([1.0, 0.0])])
    y_val = torch.cat([torch.zeros(200, dtype=torch.long), torch.ones(200, dtype=torch.long)])
    head = torch.nn.Linear(2, 2)
    loss = initial_loss("ce", [n_major, n_minor])
    opt_head = torch.optim.SGD(head.parameters(), lr=0.1)
    opt_alpha = torch.optim.Adam(loss.parameters(), lr=0.05)
    for _ in range(300):
        opt_head.zero_grad()
        loss(head(x), y).backward()
        opt_head.step()
        _, grads = head_hypergradient(loss, head, x, y, x_val, y_val, 0.1)
        opt_alpha.zero_grad()
        for p, g in zip(loss.parameters(), grads, strict=True):
            p.grad = g
        opt_alpha.step()
    offsets = loss.alpha()[2]
    gap = (offsets[1] - offsets[0]).item()
    assert gap < -0.5, gap  # moved from 0 toward log(100/1000) = -2.3


def test_search_split_is_stratified_and_balanced():
    labels = [0] * 900 + [1] * 100
    train, val = search_split(labels, 0.2, seed=0)
    assert not set(train) & set(val)
    assert sum(labels[i] for i in val) == 20 and len(val) == 40  # balanced: 20 + 20
    # the 160 majority samples cut from the validation part to balance it train instead of being thrown away
    assert sum(labels[i] for i in train) == 80 and len(train) == 960
    assert sorted(train + val) == list(range(1000))


def test_cli_runs_both_phases_and_reuses_parameters(tmp_path):
    args = [
        "--backbone",
        "test_resnet",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--logger",
        "none",
        "--loss",
        "autobalance",
        "--autobalance-search-epochs",
        "1",
        "--autobalance-objective",
        "soft-f1",
    ]
    assert run_cli.main([*args, "--out", "ab"]) == 0
    params = json.loads((tmp_path / "ab" / "autobalance_params.json").read_text())
    assert len(params["trajectory"]) == 1 and params["objective"] == "soft-f1"
    assert (tmp_path / "ab" / "autobalance_trajectory.png").is_file()
    assert json.loads((tmp_path / "ab" / "summary.json").read_text())["config"]["autobalance_params"].endswith(
        "autobalance_params.json"
    )
    reuse = [
        "--backbone",
        "test_resnet",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--logger",
        "none",
        "--loss",
        "autobalance",
        "--autobalance-params",
        str(tmp_path / "ab" / "autobalance_params.json"),
        "--out",
        "again",
    ]
    assert run_cli.main(reuse) == 0
    assert not (tmp_path / "again" / "autobalance_params.json").exists()  # no second search


def test_search_honours_freeze_backbone_and_sampling(tmp_path, monkeypatch):
    # The retrain uses --freeze-backbone and --sampling; the search must train the same thing the same way.
    import timm

    import imbalance.autobalance as autobalance
    import imbalance.data as data
    from imbalance.autobalance import run_search
    from imbalance.config import RunConfig

    seen = {}

    class SpySearch(autobalance.AutoBalanceSearch):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["module"] = self

    class SpyData(data.SearchDataModule):
        def train_dataloader(self):
            loaders = super().train_dataloader()
            seen["train_sampler"] = loaders.iterables["train"].sampler
            return loaders

    monkeypatch.setattr(autobalance, "AutoBalanceSearch", SpySearch)
    monkeypatch.setattr(data, "SearchDataModule", SpyData)
    torch.manual_seed(0)
    torch.save(timm.create_model("test_resnet", num_classes=2).state_dict(), tmp_path / "w.pt")
    cfg = RunConfig(
        backbone="test_resnet",
        image_size=32,
        loss="autobalance",
        autobalance_search_epochs=1,
        weights=tmp_path / "w.pt",
        freeze_backbone=True,
        sampling="under",
        batch_size=64,
        logger="none",
    ).validate()
    hw = {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto"}
    run_search(cfg, tmp_path / "run", hw, logger=False)
    assert seen["train_sampler"].mode == "under"
    saved = torch.load(tmp_path / "w.pt", weights_only=True)
    trained = seen["module"].backbone.state_dict()
    head = {"fc.weight", "fc.bias"}
    for key, value in saved.items():
        if key not in head:
            torch.testing.assert_close(trained[key], value, msg=key)  # frozen: weights and BN statistics
    assert {n for n, p in seen["module"].backbone.named_parameters() if p.requires_grad} == head
