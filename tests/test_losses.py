"""Every loss against its reference: torch.nn.functional, torchvision, scikit-learn or a closed form."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight
from torchvision.ops import sigmoid_focal_loss

from imbalance.config import ConfigError, RunConfig
from imbalance.losses import (
    LOSSES,
    VS_DEFAULT_GAMMA,
    BalancedSoftmaxLoss,
    BinaryCrossEntropy,
    ClassBalancedLoss,
    CrossEntropy,
    FocalLoss,
    LDAMLoss,
    LogitAdjustedLoss,
    ParametricLoss,
    SigmoidFocalLoss,
    VSLoss,
    WeightedCrossEntropy,
    balanced_class_weights,
    build_loss,
    effective_number_weights,
    posthoc_logit_adjustment,
)

SEEDS = [0, 1, 2]
SHAPES = [(1, 2), (7, 2), (64, 2), (33, 5)]


def random_batch(seed: int, n: int, k: int, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * scale, torch.randint(0, k, (n,), generator=g)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_ce_matches_functional(seed, shape, smoothing):
    logits, target = random_batch(seed, *shape)
    expected = F.cross_entropy(logits, target, label_smoothing=smoothing)
    torch.testing.assert_close(CrossEntropy(smoothing)(logits, target), expected)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_weighted_matches_functional(seed, shape, smoothing):
    logits, target = random_batch(seed, *shape)
    weights = torch.rand(shape[1], generator=torch.Generator().manual_seed(seed)) + 0.1
    expected = F.cross_entropy(logits, target, weight=weights, label_smoothing=smoothing)
    torch.testing.assert_close(WeightedCrossEntropy(weights.tolist(), smoothing)(logits, target), expected)


@pytest.mark.parametrize(
    ("cats", "dogs", "cat_weight", "dog_weight"),
    [(1000, 11000, 6.0, 0.545), (500, 11000, 11.5, 0.523), (11000, 11000, 1.0, 1.0)],
)
def test_balanced_weights_for_the_lecture_splits(cats, dogs, cat_weight, dog_weight):
    counts = [dogs, cats]  # label order: dog (negative) = 0, cat (positive) = 1
    weights = balanced_class_weights(counts)
    labels = [0] * dogs + [1] * cats
    reference = compute_class_weight("balanced", classes=np.array([0, 1]), y=np.array(labels))
    torch.testing.assert_close(weights.double(), torch.tensor(reference), rtol=1e-6, atol=1e-6)
    assert weights[1].item() == pytest.approx(cat_weight, abs=5e-4)
    assert weights[0].item() == pytest.approx(dog_weight, abs=5e-4)


def test_weighted_from_config_uses_training_counts_and_cli_order():
    loss = build_loss(RunConfig(loss="weighted"), [11000, 1000])
    assert loss.class_weights.tolist() == pytest.approx([0.5454545, 6.0])
    # the lecture's "L_c + 100 L_d": --class-weights 1,100 is cat (positive) 1, dog (negative) 100
    loss = build_loss(RunConfig(loss="weighted", class_weights=(1.0, 100.0)), [11000, 11000])
    assert loss.class_weights.tolist() == [100.0, 1.0]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", [1, 8, 100])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
@pytest.mark.parametrize("alpha", [None, 0.25, 0.5, 0.9])
def test_sigmoid_focal_matches_torchvision(seed, n, gamma, alpha):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, generator=g) * 4
    target = torch.randint(0, 2, (n,), generator=g)
    expected = sigmoid_focal_loss(
        logits, target.float(), alpha=-1 if alpha is None else alpha, gamma=gamma, reduction="mean"
    )
    ours = SigmoidFocalLoss(gamma=gamma, alpha=alpha)(logits[:, None], target)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_focal_with_gamma_zero_is_cross_entropy(seed, shape):
    logits, target = random_batch(seed, *shape)
    torch.testing.assert_close(FocalLoss(gamma=0.0)(logits, target), F.cross_entropy(logits, target))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_softmax_focal_closed_form(seed, gamma):
    logits, target = random_batch(seed, 50, 3)
    alpha = [0.2, 0.3, 0.5]
    p_t = torch.softmax(logits.double(), 1).gather(1, target[:, None]).squeeze(1)
    expected = (-torch.tensor(alpha, dtype=torch.float64)[target] * (1 - p_t) ** gamma * torch.log(p_t)).mean()
    torch.testing.assert_close(FocalLoss(gamma, alpha)(logits, target).double(), expected, rtol=1e-5, atol=1e-7)


def test_focal_two_class_softmax_equals_sigmoid_of_logit_difference():
    logits, target = random_batch(0, 40, 2)
    softmax_form = FocalLoss(2.0, 0.25)(logits, target)
    sigmoid_form = SigmoidFocalLoss(2.0, 0.25)((logits[:, 1] - logits[:, 0])[:, None], target)
    torch.testing.assert_close(softmax_form, sigmoid_form)


def test_scalar_alpha_weights_the_positive_class():
    loss = FocalLoss(gamma=2.0, alpha=0.25)
    assert loss.alpha.tolist() == pytest.approx([0.75, 0.25])  # label 1 (positive) gets alpha
    cfg = RunConfig(loss="focal", alpha=(0.8, 0.2))  # CLI order positive,negative
    assert build_loss(cfg, [10, 10]).alpha.tolist() == pytest.approx([0.2, 0.8])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("pos_weight", [None, 11.0])
def test_bce_matches_functional(seed, pos_weight):
    g = torch.Generator().manual_seed(seed)
    logits, target = torch.randn(30, 1, generator=g), torch.randint(0, 2, (30,), generator=g)
    expected = F.binary_cross_entropy_with_logits(
        logits[:, 0], target.float(), pos_weight=None if pos_weight is None else torch.tensor(pos_weight)
    )
    torch.testing.assert_close(BinaryCrossEntropy(pos_weight)(logits, target), expected)


@pytest.mark.parametrize("beta", [0.0, 0.9, 0.999, 0.9999])
def test_class_balanced_weights_closed_form(beta):
    counts = [11000, 500]
    effective = [(1 - beta**n) / (1 - beta) if beta else 1.0 for n in counts]
    raw = [1 / e for e in effective]
    expected = [w / sum(raw) * 2 for w in raw]
    assert effective_number_weights(counts, beta).tolist() == pytest.approx(expected, rel=1e-5)
    logits, target = random_batch(3, 20, 2)
    expected_loss = F.cross_entropy(logits, target, weight=torch.tensor(expected, dtype=torch.float32))
    torch.testing.assert_close(ClassBalancedLoss(counts, beta)(logits, target), expected_loss)
    focal = ClassBalancedLoss(counts, beta, base="focal", gamma=0.0)(logits, target)
    unnormalised = (torch.tensor(expected)[target] * F.cross_entropy(logits, target, reduction="none")).mean()
    torch.testing.assert_close(focal, unnormalised)


def test_class_balanced_with_beta_zero_is_plain_ce():
    logits, target = random_batch(0, 20, 2)
    torch.testing.assert_close(ClassBalancedLoss([100, 5], beta=0.0)(logits, target), F.cross_entropy(logits, target))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_ldam_closed_form(seed, scale):
    counts = [11000, 1000]
    logits, target = random_batch(seed, 25, 2, scale=1.0)
    margins = torch.tensor([1 / 11000**0.25, 1 / 1000**0.25])
    margins = margins * (0.5 / margins.max())
    shifted = logits.clone()
    shifted[torch.arange(25), target] -= margins[target]
    expected = F.cross_entropy(scale * shifted, target)
    loss = LDAMLoss(counts, max_margin=0.5, scale=scale, drw_epoch=2)
    torch.testing.assert_close(loss(logits, target), expected)
    assert loss.margins[1] == pytest.approx(0.5)  # the minority gets the largest margin
    loss.set_epoch(2)  # deferred re-weighting switches on
    reweighted = F.cross_entropy(scale * shifted, target, weight=effective_number_weights(counts, 0.9999))
    torch.testing.assert_close(loss(logits, target), reweighted)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_logit_adjusted_closed_form(tau):
    counts = [11000, 500]
    logits, target = random_batch(1, 30, 2)
    prior = torch.tensor(counts, dtype=torch.float32) / sum(counts)
    expected = F.cross_entropy(logits + tau * prior.log(), target)
    torch.testing.assert_close(LogitAdjustedLoss(counts, tau)(logits, target), expected)


@pytest.mark.parametrize("seed", SEEDS)
def test_balanced_softmax_equals_logit_adjusted_with_tau_one(seed):
    counts = [11000, 1000, 37]
    logits, target = random_batch(seed, 30, 3)
    torch.testing.assert_close(
        BalancedSoftmaxLoss(counts)(logits, target), LogitAdjustedLoss(counts, 1.0)(logits, target)
    )


def _vs_reference(counts, gamma, tau):
    """Delta_c = (n_c / n_max)^gamma and iota_c = tau log pi_c, in float64 from the counts."""
    n = torch.tensor(counts, dtype=torch.float64)
    return (n / n.max()) ** gamma, tau * torch.log(n / n.sum())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("counts", [[11000, 500], [11000, 1000, 37]])
@pytest.mark.parametrize(("gamma", "tau"), [(0.3, 1.0), (0.2, 1.25), (1.0, 0.0), (0.5, 2.0)])
def test_vs_closed_form(seed, counts, gamma, tau):
    logits, target = random_batch(seed, 40, len(counts))
    scales, offsets = _vs_reference(counts, gamma, tau)
    expected = F.cross_entropy(logits.double() * scales + offsets, target)  # every logit adjusted, not only z_y
    loss = VSLoss(counts, gamma, tau)
    torch.testing.assert_close(loss(logits, target).double(), expected, rtol=1e-5, atol=1e-6)
    assert loss.scales.max() == 1.0 and loss.scales[0] == 1.0  # the largest class keeps its logit
    assert loss.scales.tolist() == sorted(loss.scales.tolist(), reverse=True)  # rarer classes scaled down


def test_vs_adjusts_every_logit_by_hand():
    """900 dogs, 100 cats, gamma = tau = 1: Delta = (1, 1/9), iota = (log 0.9, log 0.1), applied to both logits."""
    loss = VSLoss([900, 100], gamma=1.0, tau=1.0)
    z = torch.tensor([[2.0, 3.0]], dtype=torch.float64)
    a0, a1 = 2.0 + math.log(0.9), 3.0 / 9 + math.log(0.1)
    for y, a_y in ((0, a0), (1, a1)):
        expected = math.log(math.exp(a0) + math.exp(a1)) - a_y
        assert loss(z, torch.tensor([y])).item() == pytest.approx(expected, rel=1e-6)
    # adjusting only the target's logit (as LDAM's margin does) would be another loss
    target_only = math.log(math.exp(a0) + math.exp(3.0)) - a0
    assert loss(z, torch.tensor([0])).item() != pytest.approx(target_only, rel=1e-3)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 2.0])
def test_vs_with_gamma_zero_is_the_logit_adjusted_loss_and_with_tau_zero_too_ce(seed, tau):
    counts = [11000, 500]
    logits, target = random_batch(seed, 30, 2)
    prior = torch.tensor(counts, dtype=torch.float32) / sum(counts)
    vs = VSLoss(counts, gamma=0.0, tau=tau)
    assert vs.scales.tolist() == [1.0, 1.0]  # x^0 = 1 exactly
    torch.testing.assert_close(vs(logits, target), F.cross_entropy(logits + tau * prior.log(), target))
    # the same buffer as the logit-adjusted loss and Delta = 1: bit for bit
    assert torch.equal(vs(logits, target), LogitAdjustedLoss(counts, tau)(logits, target))
    if tau == 0.0:
        assert torch.equal(vs(logits, target), F.cross_entropy(logits, target))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("counts", [[11000, 500], [11000, 1000, 37]])
@pytest.mark.parametrize(("gamma", "tau"), [(0.3, 1.0), (1.0, 0.0), (0.0, 1.0), (0.5, 2.0)])
def test_autobalance_parametric_loss_with_fixed_vs_parameters_is_the_vs_loss(seed, counts, gamma, tau, tmp_path):
    """AutoBalance's parametric loss -w_y log softmax(Delta * z + l)_y with w = 1, Delta = VS's scales and
    l = VS's offsets is the VS loss, up to the two invariances of its normalisation (alpha()):

    - the offsets are centred, l - mean(l): a shift of every adjusted logit by one constant, which softmax
      ignores, so this part is exact;
    - the scales are divided by their geometric mean g: the adjusted logits become (Delta / g) z, i.e. the VS
      loss of the logits z / g. So ParametricLoss(g z) = VS(z) exactly, with the same gradient in z and the
      same softmax of the adjusted logits. For a model with a linear head z = W h + b, g z is the same model
      with (g W, g b): the two losses train the same set of classifiers (one reparametrised by the constant
      g > 0), and predictions, argmax z = argmax g z, are identical. Only at the same z do they differ (unless
      g = 1, e.g. gamma = 0), which the last assertion shows, so the normalisation is not a no-op.
    """
    vs = VSLoss(counts, gamma, tau)
    parametric = ParametricLoss(len(counts), weights=None, scales=vs.scales.tolist(), offsets=vs.offsets.tolist())
    g = torch.exp(torch.log(vs.scales.double()).mean())  # geometric mean of Delta
    w, scales, offsets = (t.double() for t in parametric.alpha())
    torch.testing.assert_close(w, torch.ones(len(counts), dtype=torch.float64))
    torch.testing.assert_close(scales, vs.scales.double() / g, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(offsets, vs.offsets.double() - vs.offsets.double().mean(), rtol=1e-6, atol=1e-6)

    logits, target = random_batch(seed, 40, len(counts))
    z = logits.double().requires_grad_(True)
    z_vs = logits.double().requires_grad_(True)
    value = parametric(g * z, target)
    reference = vs(z_vs, target)
    torch.testing.assert_close(value, reference, rtol=1e-6, atol=1e-7)
    value.backward()
    reference.backward()
    torch.testing.assert_close(z.grad, z_vs.grad, rtol=1e-5, atol=1e-8)
    adjusted_parametric = torch.softmax(g * logits.double() * scales + offsets, dim=1)
    adjusted_vs = torch.softmax(logits.double() * vs.scales.double() + vs.offsets.double(), dim=1)
    torch.testing.assert_close(adjusted_parametric, adjusted_vs, rtol=1e-6, atol=1e-8)

    # the --autobalance-params file a search writes, holding these fixed parameters, loads as the same loss
    path = tmp_path / "vs_params.json"
    path.write_text(
        json.dumps({"weights": [1.0] * len(counts), "scales": vs.scales.tolist(), "offsets": vs.offsets.tolist()})
    )
    from_file = ParametricLoss.from_file(path)(g * logits.double(), target)
    torch.testing.assert_close(from_file, reference.detach(), rtol=1e-6, atol=1e-7)
    if gamma > 0:  # g != 1: at the same logits the normalised loss is another number
        assert parametric(logits.double(), target).item() != pytest.approx(reference.item(), rel=1e-4)


def test_vs_from_config_reuses_gamma_and_tau():
    counts = [11000, 500]
    default = build_loss(RunConfig(loss="vs"), counts)
    assert (default.gamma, default.tau) == (VS_DEFAULT_GAMMA, 1.0) == (0.3, 1.0)
    loss = build_loss(RunConfig(loss="vs", gamma=0.5, tau=2.0).validate(), counts)
    assert loss.scales.tolist() == pytest.approx([1.0, (500 / 11000) ** 0.5])
    assert loss.offsets.tolist() == pytest.approx([2 * math.log(11000 / 11500), 2 * math.log(500 / 11500)], rel=1e-6)
    with pytest.raises(ConfigError, match="--gamma is a focal-loss option"):
        RunConfig(loss="logit-adjusted", gamma=0.5).validate()
    with pytest.raises(ConfigError, match="--gamma must be >= 0"):
        RunConfig(loss="vs", gamma=-0.1).validate()


def test_posthoc_logit_adjustment_shifts_by_log_prior():
    logits = torch.zeros(1, 2)
    adjusted = posthoc_logit_adjustment(logits, [900, 100], tau=1.0)
    assert (adjusted[0, 1] - adjusted[0, 0]).item() == pytest.approx(torch.log(torch.tensor(9.0)).item())


def _all_losses(counts, gamma):
    return [
        CrossEntropy(),
        WeightedCrossEntropy([0.5, 6.0]),
        FocalLoss(gamma),
        FocalLoss(gamma, 0.25),
        SigmoidFocalLoss(gamma, 0.25),
        BinaryCrossEntropy(11.0),
        ClassBalancedLoss(counts),
        ClassBalancedLoss(counts, base="focal", gamma=gamma),
        LDAMLoss(counts, scale=30.0),
        LogitAdjustedLoss(counts),
        BalancedSoftmaxLoss(counts),
        VSLoss(counts, gamma=gamma),
    ]


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
@pytest.mark.parametrize("magnitude", [100.0, -100.0])
def test_losses_and_gradients_are_finite_at_extreme_logits(gamma, magnitude):
    counts = [11000, 500]
    for loss in _all_losses(counts, gamma):
        k = loss.num_outputs
        base = torch.tensor([[magnitude, -magnitude], [-magnitude, magnitude], [magnitude, magnitude]])
        logits = (base[:, :1] if k == 1 else base).clone().requires_grad_(True)
        target = torch.tensor([0, 1, 1])
        value = loss(logits, target)
        value.backward()
        assert torch.isfinite(value), (type(loss).__name__, gamma, magnitude)
        assert torch.isfinite(logits.grad).all(), (type(loss).__name__, gamma, magnitude)


def test_autobalance_needs_its_searched_parameters():
    with pytest.raises(ValueError, match="needs its searched parameters"):
        build_loss(RunConfig(loss="autobalance"), [90, 10])


@pytest.mark.parametrize("name", [n for n in LOSSES if n != "autobalance"])
def test_every_loss_builds_from_config(name):
    loss = build_loss(RunConfig(loss=name), [90, 10])
    k = loss.num_outputs
    logits = torch.randn(6, k, requires_grad=True)
    loss(logits, torch.tensor([0, 1, 0, 1, 0, 0])).backward()
    assert torch.isfinite(logits.grad).all()


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="gamma"):
        FocalLoss(gamma=-1)
    with pytest.raises(ValueError, match="alpha"):
        FocalLoss(alpha=1.5)
    with pytest.raises(ValueError, match="class_weights"):
        WeightedCrossEntropy([1.0, -1.0])
    with pytest.raises(ValueError, match="gamma"):
        VSLoss([100, 10], gamma=-1.0)
    with pytest.raises(ValueError, match="class_counts"):
        VSLoss([100])
    with pytest.raises(ValueError, match="class_counts"):
        VSLoss([100, 0])
    with pytest.raises(ValueError, match="empty class"):
        build_loss(RunConfig(loss="ce"), [10, 0])
