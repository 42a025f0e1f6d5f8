"""Temperature scaling of a two-class model and its reliability diagram (GitHub issue 15).

Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", ICML 2017: divide the logit by one
scalar T > 0 fitted to minimise the negative log-likelihood on held-out (here: the dev split's) samples. For
a two-class model with P(positive) p the logit is z = log(p / (1 - p)) and the scaled probability is
sigmoid(z / T). T > 0 keeps the sign of z, so every prediction at the threshold 0.5 (and the ranking, so
AUROC and average precision) is unchanged; T > 1 softens an over-confident model, T < 1 sharpens.

NumPy/SciPy only (matplotlib lazily, for the diagram): a lower layer that imports nothing from the model,
the training loop or the recorder. SciPy is always there: scikit-learn depends on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit

from imbalance.metrics import ECE_BINS, calibration_bins, calibration_metrics

# Logits beyond +-LOGIT_LIMIT are clipped: P(positive) within about 1e-13 of 0 or 1, in particular the exact
# 0.0 and 1.0 of a saturated float32 sigmoid (whose true logit is only known to be below -103.9 or above
# 16.6). A confidently wrong sample then costs a large but finite NLL (about 30) instead of infinity.
LOGIT_LIMIT = 30.0

# The temperatures searched. On perfectly separated samples (every logit on its label's side of 0) the NLL
# keeps falling as T -> 0, and with every logit on the wrong side as T -> infinity: the fit returns the bound.
TEMPERATURE_BOUNDS = (1e-2, 1e2)


def to_logit(probs: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) in float64, clipped to +-LOGIT_LIMIT; NaN stays NaN. Above p = 1/4 it is computed as
    log1p((2p - 1) / (1 - p)), where 2p - 1 is exact: a p on either side of 0.5, however close, keeps the
    sign of its logit (log(p) - log1p(-p) would round both terms to log(1/2) within ~1e-16 of 0.5)."""
    p = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(p < 0.25, np.log(p) - np.log1p(-p), np.log1p((2 * p - 1) / (1 - p)))
    return np.clip(z, -LOGIT_LIMIT, LOGIT_LIMIT)


def _nll_of_margins(margins: np.ndarray, temperature: float) -> float:
    # -log sigmoid(m / T), m = (2y - 1) z the signed logit, computed stably
    return float(np.logaddexp(0.0, -margins / temperature).mean())


def binary_nll(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log-likelihood -[y log p + (1 - y) log(1 - p)] of P(positive), with the logits clipped
    as in `to_logit` (the objective `fit_temperature` minimises, at T = 1). NaN for no sample or a
    non-finite probability."""
    labels = np.asarray(labels).astype(int).ravel()
    probs = np.asarray(probs, dtype=np.float64).ravel()
    if probs.size == 0 or not np.isfinite(probs).all():
        return float("nan")
    return _nll_of_margins((2 * labels - 1) * to_logit(probs), 1.0)


def fit_temperature(
    labels: np.ndarray,
    scores: np.ndarray,
    kind: str = "prob",
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
) -> float:
    """The temperature T in `bounds` minimising the NLL of sigmoid(z / T) on (labels, scores), z the logits:
    `scores` are P(positive) (`kind="prob"`, turned into logits by `to_logit`) or the logits themselves
    (`kind="logit"`). Fit it on the dev split, never on the set it is reported on.

    The NLL is convex in 1 / T (a sum of softplus of linear functions of 1 / T), so it is unimodal in log T,
    which is searched with SciPy's bounded Brent method; the bounds themselves are compared too, so that a
    degenerate set returns exactly a bound:
    - perfectly separated samples (including one class only, all on its side of 0.5): the lower bound;
    - every sample on the wrong side: the upper bound;
    - one class only with logits of both signs: an interior, finite T;
    - no sample, or every logit 0 (the NLL is log 2 whatever T): 1.0, no scaling.
    A non-finite score (a diverged model) gives NaN, like `best_f1_threshold`."""
    if kind not in ("prob", "logit"):
        raise ValueError(f"kind must be 'prob' or 'logit', not {kind!r}")
    lo, hi = (float(b) for b in bounds)
    if not 0 < lo <= 1 <= hi < np.inf:
        raise ValueError(f"bounds must satisfy 0 < low <= 1 <= high < inf, got {bounds}")
    labels = np.asarray(labels).astype(int).ravel()
    raw = np.asarray(scores, dtype=np.float64).ravel()
    if raw.size == 0:
        return 1.0
    if not np.isfinite(raw).all():
        return float("nan")
    z = to_logit(raw) if kind == "prob" else raw
    margins = (2 * labels - 1) * z
    if not np.any(margins):
        return 1.0
    result = minimize_scalar(
        lambda u: _nll_of_margins(margins, float(np.exp(u))),
        bounds=(np.log(lo), np.log(hi)),
        method="bounded",
        options={"xatol": 1e-8},
    )
    candidates = [lo, hi, float(np.exp(result.x))]
    losses = [_nll_of_margins(margins, t) for t in candidates]
    return candidates[int(np.argmin(losses))]  # a bound where Brent's T (never exactly on it) is no better


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """sigmoid(logit(p) / T) in float64, logits clipped as in `to_logit` (so an exact 0.0 or 1.0 becomes
    sigmoid(-+30 / T)). The side of 0.5 of every probability is kept exactly (T > 0 keeps the sign of the
    logit), so predictions at the threshold 0.5 do not change. NaN probabilities, or a NaN temperature (the
    fit of a diverged model), give NaN."""
    temperature = float(temperature)
    if temperature <= 0 or temperature == np.inf:
        raise ValueError(f"the temperature must be positive and finite, got {temperature}")
    z = to_logit(probs)
    out = expit(z / temperature)
    # keep the side of 0.5 exactly: for |z / T| below ~1e-16 the sigmoid rounds to 0.5 itself
    out = np.where((z > 0) & (out <= 0.5), np.nextafter(0.5, 1.0), out)
    return np.where((z < 0) & (out >= 0.5), np.nextafter(0.5, 0.0), out)


def temperature_report(labels: np.ndarray, probs: np.ndarray, temperature: float | None) -> dict[str, dict[str, float]]:
    """NLL, ECE and (stratified) Brier scores of (labels, probs) before and after scaling by `temperature`:
    {"before": {...}, "after": {...}}, the "reported before and after" of the issue. A `temperature` of None
    (nothing fitted: no dev split) or NaN (fitted on non-finite probabilities) gives {"before": {...}} only."""
    sets = [("before", np.asarray(probs, dtype=np.float64))]
    if temperature is not None and np.isfinite(temperature):
        sets.append(("after", apply_temperature(probs, temperature)))
    return {name: {"nll": binary_nll(labels, p), **calibration_metrics(labels, p)} for name, p in sets}


def calibration_block(
    dev: dict[str, np.ndarray] | None,
    reported: dict[str, dict[str, np.ndarray]],
    no_dev: str = "there is no dev split (--dev-fraction 0)",
) -> dict[str, Any]:
    """The "calibration" entry of summary.json and of experiments.evaluate's metrics.json: the temperature
    fitted on the dev split's predictions `dev` ({"label", "prob"}; None or empty: nothing is fitted, and
    `no_dev` says why), how it was fitted, and per set of `reported` ({name: {"label", "prob"}}) its
    `temperature_report`. Nothing is fitted on a reported set other than the dev split itself."""
    if dev is None or len(dev["prob"]) == 0:
        temperature, fitted_on = None, f"nothing: {no_dev}, so no temperature is fitted (before only)"
    else:
        n = len(dev["prob"])
        temperature = fit_temperature(dev["label"], dev["prob"])
        fitted_on = (
            f"the dev split ({n} photos): minimum NLL of sigmoid(logit/T), Guo et al. 2017"
            if np.isfinite(temperature)
            else f"nothing: the dev split ({n} photos) has NaN or infinite probabilities, so the temperature is NaN "
            "(before only)"
        )
        if temperature in TEMPERATURE_BOUNDS:  # separated (or all wrong) dev samples: the NLL has no minimum inside
            fitted_on += (
                f"; T = {temperature:g} is the bound of the search {TEMPERATURE_BOUNDS}: the dev predictions are "
                "perfectly separated (or all on the wrong side), so this T is not a fitted calibration"
            )
    block: dict[str, Any] = {
        "temperature": temperature,
        "at_bound": bool(temperature in TEMPERATURE_BOUNDS),
        "fitted_on": fitted_on,
    }
    for name, p in reported.items():
        block[name] = temperature_report(p["label"], p["prob"], temperature)
    return block


def reliability_diagram_png(
    labels: np.ndarray,
    probs_before: np.ndarray,
    probs_after: np.ndarray | None,
    path: Path,
    n_bins: int = ECE_BINS,
    temperature: float | None = None,
    title: str = "",
    positive_name: str = "positive",
) -> Path:
    """Reliability diagram of P(positive): per equal-width bin (the bins of the ECE), the fraction of
    positives against the mean predicted probability, before and (when `probs_after` is given) after
    temperature scaling, ECE in the legend; below, the number of samples per bin (log scale: on imbalanced
    data most samples sit in the lowest bin). Non-finite probabilities are not drawn (noted instead)."""
    import matplotlib.pyplot as plt

    from imbalance.plots import _save  # sets the Agg backend

    labels = np.asarray(labels).astype(int).ravel()
    sets = [("uncalibrated", probs_before, "C0", "o")]
    if probs_after is not None:
        after = "temperature-scaled" + (f" (T = {temperature:.3g})" if temperature is not None else "")
        sets.append((after, probs_after, "C3", "s"))
    fig, (ax, hist) = plt.subplots(
        2, 1, figsize=(5.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, constrained_layout=True
    )
    ax.plot([0, 1], [0, 1], ls=":", color="gray", label="perfect calibration")
    edges = np.linspace(0, 1, n_bins + 1)
    width = 1 / n_bins / len(sets)
    for i, (name, probs, color, marker) in enumerate(sets):
        probs = np.asarray(probs, dtype=np.float64).ravel()
        if probs.size == 0 or not np.isfinite(probs).all():
            ax.plot([], [], marker, color=color, label=f"{name}: no finite probabilities")
            continue
        b = calibration_bins(labels, probs, n_bins)
        used = b["count"] > 0
        confidence = b["prob_sum"][used] / b["count"][used]
        frequency = b["positives"][used] / b["count"][used]
        ece = calibration_metrics(labels, probs, n_bins)["ece"]
        ax.plot(confidence, frequency, marker=marker, color=color, ms=5, label=f"{name}: ECE {ece:.4f}")
        hist.bar(edges[:-1] + i * width, b["count"], width=width, align="edge", color=color, alpha=0.7)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel(f"fraction {positive_name} (per bin)")
    ax.set_title(title or f"Reliability diagram, {n_bins} equal-width bins of P({positive_name})")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    hist.set_yscale("symlog", linthresh=1)
    hist.set_xlabel(f"P({positive_name}): mean per bin (above), bin (below)")
    hist.set_ylabel("samples")
    hist.grid(alpha=0.3)
    return _save(fig, Path(path))
