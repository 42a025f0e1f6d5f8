"""Temperature scaling (Guo et al., ICML 2017) and the reliability diagram: cheap, synthetic, exact where it can be."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy.special import expit
from sklearn.metrics import log_loss

from imbalance.calibration import (
    LOGIT_LIMIT,
    TEMPERATURE_BOUNDS,
    apply_temperature,
    binary_nll,
    fit_temperature,
    reliability_diagram_png,
    temperature_report,
    to_logit,
)
from imbalance.metrics import calibration_metrics


def synthetic(true_temperature: float, n: int = 20000, seed: int = 0, prior_shift: float = -2.0):
    """Labels drawn from sigmoid(z / T0), the model reporting sigmoid(z): calibrated after dividing by T0.
    An imbalanced set (about 1:5 with the default shift), P(positive) in float32 as the model writes it."""
    rng = np.random.default_rng(seed)
    z = rng.normal(prior_shift, 2.0, n) * true_temperature
    labels = (rng.random(n) < expit(z / true_temperature)).astype(int)
    return labels, expit(z).astype(np.float32), z


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.5, 4.0])
def test_fit_recovers_a_known_temperature(true_temperature):
    labels, probs, z = synthetic(true_temperature)
    assert fit_temperature(labels, probs) == pytest.approx(true_temperature, rel=0.08)
    assert fit_temperature(labels, z, kind="logit") == pytest.approx(fit_temperature(labels, probs), rel=1e-3)


@pytest.mark.parametrize("seed", range(3))
def test_scaling_an_overconfident_model_lowers_nll_and_ece_on_its_fit_set(seed):
    labels, probs, _ = synthetic(3.0, n=4000, seed=seed)
    t = fit_temperature(labels, probs)
    assert t > 1  # over-confident: softened
    scaled = apply_temperature(probs, t)
    assert binary_nll(labels, scaled) < binary_nll(labels, probs)
    assert calibration_metrics(labels, scaled)["ece"] < calibration_metrics(labels, probs)["ece"]
    # the fitted T is the minimum of the NLL, not just better than T = 1
    grid = np.exp(np.linspace(np.log(0.5), np.log(10), 400))
    assert binary_nll(labels, scaled) <= min(binary_nll(labels, apply_temperature(probs, g)) for g in grid) + 1e-9
    report = temperature_report(labels, probs, t)
    assert report["after"]["nll"] < report["before"]["nll"] and set(report["after"]) >= {"ece", "brier", "brier_pos"}


@pytest.mark.parametrize("temperature", [1e-2, 0.3, 1.0, 2.0, 100.0])
def test_scaling_keeps_every_prediction_at_one_half(temperature):
    rng = np.random.default_rng(0)
    half = np.float32(0.5)
    near = [np.nextafter(half, np.float32(0)), half, np.nextafter(half, np.float32(1))]
    probs32 = np.concatenate([rng.random(500).astype(np.float32), near, np.float32([0.0, 1.0])])
    near64 = [np.nextafter(0.5, 0), 0.5, np.nextafter(0.5, 1)]  # logits of about 1e-16: the sigmoid rounds to 0.5
    for probs in (probs32, np.concatenate([probs32.astype(np.float64), near64])):
        scaled = apply_temperature(probs, temperature)
        assert np.array_equal(scaled > 0.5, probs > 0.5) and np.array_equal(scaled < 0.5, probs < 0.5)
        # and the order (the ranking metrics), up to ties where the scaled sigmoid saturates
        assert (np.diff(scaled[np.argsort(to_logit(probs), kind="stable")]) >= 0).all()


def test_temperature_one_is_the_identity_and_nll_is_log_loss():
    rng = np.random.default_rng(1)
    probs, labels = rng.uniform(1e-6, 1 - 1e-6, 300), (rng.random(300) < 0.3).astype(int)
    assert np.allclose(apply_temperature(probs, 1.0), probs, rtol=0, atol=1e-12)
    assert binary_nll(labels, probs) == pytest.approx(log_loss(labels, probs), rel=1e-9)
    # a saturated 0.0 / 1.0 is clipped to a logit of -+30: a finite cost when wrong
    assert binary_nll(np.array([0]), np.array([1.0])) == pytest.approx(LOGIT_LIMIT, rel=1e-6)


LOW, HIGH = TEMPERATURE_BOUNDS


@pytest.mark.parametrize(
    ("name", "labels", "probs", "expected"),
    [
        ("perfectly separated", [0, 0, 1, 1], [0.1, 0.3, 0.7, 0.99], LOW),
        ("separated, saturated", [0, 1, 1], [0.0, 1.0, 1.0], LOW),
        ("one class, all on its side", [0, 0, 0], [0.2, 0.4, 0.01], LOW),
        ("every sample wrong", [1, 0, 1], [0.2, 0.9, 0.4], HIGH),
        ("every logit 0", [0, 1, 1], [0.5, 0.5, 0.5], 1.0),
        ("no sample", [], [], 1.0),
    ],
)
def test_degenerate_sets_return_a_bound_or_one(name, labels, probs, expected):
    t = fit_temperature(np.array(labels, dtype=int), np.array(probs, dtype=np.float32))
    assert t == expected, name
    if len(probs):
        apply_temperature(np.array(probs), t)  # usable as is


def test_one_class_with_logits_of_both_signs_has_an_interior_temperature():
    t = fit_temperature(np.zeros(4, int), np.array([0.1, 0.2, 0.6, 0.05]))
    assert LOW < t < HIGH and np.isfinite(t)


def test_nonfinite_scores_give_nan_and_bad_arguments_raise():
    assert np.isnan(fit_temperature(np.array([0, 1]), np.array([0.2, np.nan])))
    assert np.isnan(apply_temperature(np.array([0.2, 0.7]), float("nan"))).all()
    assert np.isnan(apply_temperature(np.array([np.nan]), 2.0)).all()
    with pytest.raises(ValueError):
        fit_temperature(np.array([0]), np.array([0.2]), kind="probability")
    with pytest.raises(ValueError):
        apply_temperature(np.array([0.2]), 0.0)


@pytest.mark.parametrize("after", ["scaled", "none", "nan"])
def test_reliability_diagram_is_written(tmp_path, after):
    labels, probs, _ = synthetic(3.0, n=2000)
    t = fit_temperature(labels, probs)
    probs_after = {"scaled": apply_temperature(probs, t), "none": None, "nan": np.full(len(probs), np.nan)}[after]
    path = reliability_diagram_png(labels, probs, probs_after, tmp_path / "plots" / "reliability.png", temperature=t)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 300
    assert not list(path.parent.glob(".*.tmp"))  # written atomically


def test_a_temperature_on_the_search_bound_is_flagged_not_reported_as_a_fit():
    from imbalance.calibration import TEMPERATURE_BOUNDS, calibration_block

    labels = np.array([0, 0, 1, 1])
    separated = {"label": labels, "prob": np.array([0.2, 0.3, 0.7, 0.9])}
    block = calibration_block(separated, {"val": separated})
    assert block["temperature"] == TEMPERATURE_BOUNDS[0] and block["at_bound"]
    assert "not a fitted calibration" in block["fitted_on"]
    mixed = {"label": labels, "prob": np.array([0.2, 0.6, 0.4, 0.9])}
    block = calibration_block(mixed, {"val": mixed})
    assert not block["at_bound"] and "not a fitted" not in block["fitted_on"]
