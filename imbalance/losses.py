"""Loss functions for imbalanced classification, one small `nn.Module` each.

Every loss takes `logits` of shape (N, K) (or (N, 1) / (N,) for the one-logit forms) and integer
`target` of shape (N,) with values in [0, K), and returns the mean loss as a 0-d tensor. Everything is
computed in log space (`log_softmax`, `logsigmoid`), so logits of +-100 give finite losses and gradients,
and in float32 at least: bf16/fp16 logits from an autocast forward are upcast first (`_full_precision`).

Class-indexed tensors (weights, counts, alpha) are in label order: index 1 is the positive class. The
command line takes them positive-first, as the lecture writes them; `pos_neg_to_label_order` converts.

`LOSSES` maps the `--loss` names to classes; `build_loss` makes one from a `RunConfig` and the class counts
of the *training* split. Adding a loss is one class with a `from_config` classmethod and one dict entry.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from imbalance.config import RunConfig


def pos_neg_to_label_order(values: Sequence[float]) -> list[float]:
    """'positive,negative' (command-line order) -> [negative, positive] (label order, label 1 = positive)."""
    if len(values) != 2:
        raise ValueError(f"expected two values 'positive,negative', got {list(values)}")
    return [float(values[1]), float(values[0])]


def balanced_class_weights(class_counts: Sequence[int]) -> Tensor:
    """w_c = N / (K * N_c), as scikit-learn's compute_class_weight('balanced'); 1000/11000 gives 6.0/0.545."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if (counts <= 0).any():
        raise ValueError(f"every class needs at least one training sample to weight it, got counts {counts.tolist()}")
    return (counts.sum() / (len(counts) * counts)).float()


def effective_number_weights(class_counts: Sequence[int], beta: float) -> Tensor:
    """Class-balanced weights (1 - beta) / (1 - beta^n_c), normalised to sum to K (Cui et al., CVPR 2019)."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    weights = (1.0 - beta) / (1.0 - torch.pow(beta, counts))
    return (weights / weights.sum() * len(counts)).float()


def _log_prior(class_counts: Sequence[int]) -> Tensor:
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    return torch.log(counts / counts.sum()).float()


def weighted_cross_entropy(
    logits: Tensor, target: Tensor, weight: Tensor, label_smoothing: float = 0.0, global_batch: bool = False
) -> Tensor:
    """`F.cross_entropy(logits, target, weight=weight)`: sum_i w_{y_i} l_i / sum_i w_{y_i}.

    With `global_batch` (a training step under DDP) the denominator is the total weight of the *global*
    batch. DDP averages the ranks' gradients; for a plain mean that is the gradient of the global batch, but
    a weighted mean normalised per rank would weigh each rank's samples by its own total weight. So each rank
    divides its weighted sum by the all-reduced total weight and multiplies by the number of ranks: the
    averaged gradient is then exactly the single-process one.

    Only training steps may ask for it: the all-reduce is a collective that every rank must reach, and only
    training shards are padded to the same number of batches. Validation shards are deliberately unpadded
    (each sample once), so ranks can run different numbers of validation batches, and a collective there
    waits forever on the rank that has finished. The losses pass `global_batch=_in_training_step(self)`.
    """
    weight = weight.to(logits.dtype)
    log_probs = F.log_softmax(logits, dim=-1)
    nll = -log_probs.gather(1, target[:, None]).squeeze(1)
    w = weight[target]
    per_sample = w * nll
    if label_smoothing:  # as PyTorch: the uniform part is weighted by each class's own weight
        smooth = -(log_probs * weight).sum(dim=1) / logits.shape[1]
        per_sample = (1 - label_smoothing) * per_sample + label_smoothing * smooth
    weighted_sum, weight_sum = per_sample.sum(), w.sum()
    if global_batch and _distributed_world_size() > 1:
        total = weight_sum.detach().clone()
        torch.distributed.all_reduce(total)
        return weighted_sum * torch.distributed.get_world_size() / total
    return weighted_sum / weight_sum


def _in_training_step(loss: nn.Module) -> bool:
    """True in a training step (module in train mode, gradients on): the only place a DDP collective is safe.
    Lightning switches the LightningModule, and so its loss, to eval mode for validation and sanity checks."""
    return loss.training and torch.is_grad_enabled()


def _distributed_world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _full_precision(logits: Tensor) -> Tensor:
    """Half-precision logits (bf16 or fp16, as a `--precision bf16-mixed` forward makes them) as float32.

    Every loss is computed in float32 at least, whatever autocast did to the model: a bf16 loss carries only
    8 significant bits, and casting the class-indexed buffers (weights, margins, log prior, alpha) down to
    the logits' dtype would round them too (log 1217 = 7.104 becomes 7.094). float64 logits stay float64.
    """
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _check_logits(logits: Tensor, target: Tensor, num_classes: int | None = None) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, K), got {tuple(logits.shape)}")
    if target.shape != logits.shape[:1]:
        raise ValueError(f"target must have shape ({logits.shape[0]},), got {tuple(target.shape)}")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(f"this loss was built for {num_classes} classes but got logits with {logits.shape[1]}")


class CrossEntropy(nn.Module):
    """Plain softmax cross-entropy, optionally with label smoothing (Szegedy et al., CVPR 2016)."""

    num_outputs = 2

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = _full_precision(logits)
        _check_logits(logits, target)
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)

    @classmethod
    def from_config(cls, cfg: RunConfig, class_counts: Sequence[int]) -> CrossEntropy:
        return cls(label_smoothing=cfg.label_smoothing)


class WeightedCrossEntropy(nn.Module):
    """Class-weighted cross-entropy: sum_i w_{y_i} l_i / sum_i w_{y_i} (the `weight=` of `F.cross_entropy`).

    The default weights are 'balanced', w_c = N / (K N_c) (King & Zeng 2001; scikit-learn's
    `compute_class_weight`): for the lecture's 1000 cats / 11000 dogs that is 6.0 and 0.545.
    """

    num_outputs = 2

    def __init__(self, class_weights: Sequence[float], label_smoothing: float = 0.0) -> None:
        super().__init__()
        weights = torch.as_tensor(class_weights, dtype=torch.float32)
        if weights.ndim != 1 or len(weights) < 2 or (weights <= 0).any():
            raise ValueError(f"class_weights must be K >= 2 positive numbers, got {weights.tolist()}")
        self.register_buffer("class_weights", weights)
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = _full_precision(logits)
        _check_logits(logits, target, len(self.class_weights))
        return weighted_cross_entropy(
            logits, target, self.class_weights, self.label_smoothing, global_batch=_in_training_step(self)
        )

    @classmethod
    def from_config(cls, cfg: RunConfig, class_counts: Sequence[int]) -> WeightedCrossEntropy:
        if cfg.class_weights is not None:
            weights = pos_neg_to_label_order(cfg.class_weights)
        else:
            weights = balanced_class_weights(class_counts).tolist()
        return cls(weights, label_smoothing=cfg.label_smoothing)


class BinaryCrossEntropy(nn.Module):
    """One-logit binary cross-entropy; `pos_weight` multiplies the positive term (as in PyTorch).

    The model has a single output, the logit of the positive class.
    """

    num_outputs = 1

    def __init__(self, pos_weight: float | None = None) -> None:
        super().__init__()
        if pos_weight is not None and pos_weight <= 0:
            raise ValueError(f"pos_weight must be positive, got {pos_weight}")
        self.register_buffer("pos_weight", None if pos_weight is None else torch.tensor(float(pos_weight)))

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = _full_precision(logits).reshape(-1)
        if target.shape != logits.shape:
            raise ValueError(
                f"bce expects one logit per sample, got logits {tuple(logits.shape)}, target {tuple(target.shape)}"
            )
        pos_weight = None if self.pos_weight is None else self.pos_weight.to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), pos_weight=pos_weight)

    @classmethod
    def from_config(cls, cfg: RunConfig, class_counts: Sequence[int]) -> BinaryCrossEntropy:
        return cls(pos_weight=cfg.pos_weight)


class FocalLoss(nn.Module):
    """Focal loss FL = -alpha_t (1 - p_t)^gamma log p_t (Lin et al., "Focal Loss for Dense Object
    Detection", ICCV 2017), averaged over the batch.

    Two forms, chosen by the shape of the logits:
    - softmax over K classes, logits (N, K): p_t is the softmax probability of the true class;
    - sigmoid with one logit, logits (N, 1) or (N,): p_t = sigmoid(x) for positives and 1 - sigmoid(x) for
      negatives, exactly `torchvision.ops.sigmoid_focal_loss(..., reduction="mean")`.

    What alpha means (a classic source of confusion): alpha is a *class weight*, not a probability. A scalar
    alpha weights the positive class (label 1) by alpha and the negative class by 1 - alpha, as in the paper
    and in torchvision; a sequence gives one weight per class in label order. alpha=0.5 weights both classes
    equally (the loss is then half the unweighted one). The paper's best detector used alpha=0.25 with
    gamma=2, i.e. it *down*-weighted the rare class, because gamma already removes most of the easy
    negatives' loss; alpha is not automatically "the minority's share". With gamma=0 and alpha=None this
    is exactly cross-entropy.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | Sequence[float] | None = None, one_logit: bool = False):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.one_logit = one_logit
        if alpha is None:
            alpha_tensor = None
        elif isinstance(alpha, (int, float)):
            if not 0 <= alpha <= 1:
                raise ValueError(f"a scalar alpha is the positive-class weight and must be in [0, 1], got {alpha}")
            alpha_tensor = torch.tensor([1.0 - alpha, float(alpha)])
        else:
            alpha_tensor = torch.as_tensor(alpha, dtype=torch.float32)
            if alpha_tensor.ndim != 1 or (alpha_tensor < 0).any():
                raise ValueError(f"per-class alpha must be non-negative numbers, got {alpha_tensor.tolist()}")
            if one_logit and len(alpha_tensor) != 2:
                raise ValueError("the one-logit focal loss takes a scalar alpha or two per-class weights")
        self.register_buffer("alpha", alpha_tensor)

    @property
    def num_outputs(self) -> int:
        return 1 if self.one_logit else 2

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = _full_precision(logits)
        if logits.ndim == 1 or logits.shape[-1] == 1:
            logits = logits.reshape(-1)
            if target.shape != logits.shape:
                raise ValueError(f"got {tuple(logits.shape)} logits for {tuple(target.shape)} targets")
            # signed logit: log p_t = logsigmoid(+x) for positives, logsigmoid(-x) for negatives
            signed = torch.where(target == 1, logits, -logits)
            log_pt = F.logsigmoid(signed)
            log_one_minus_pt = F.logsigmoid(-signed)
        else:
            _check_logits(logits, target)
            log_probs = F.log_softmax(logits, dim=-1)
            log_pt = log_probs.gather(1, target[:, None]).squeeze(1)
            # log(1 - p_t) = logsumexp of the other classes' log-probabilities; stable when p_t -> 1,
            # where log1p(-exp(log_pt)) would give -inf and a NaN gradient.
            others = log_probs.masked_fill(F.one_hot(target, logits.shape[1]).bool(), float("-inf"))
            log_one_minus_pt = torch.logsumexp(others, dim=1)
        # (1 - p_t)^gamma as exp(gamma * log(1 - p_t)): finite gradient for any gamma >= 0, also gamma < 1
        modulating = torch.exp(self.gamma * log_one_minus_pt) if self.gamma else torch.ones_like(log_pt)
        loss = -modulating * log_pt
        if self.alpha is not None:
            loss = self.alpha.to(loss.dtype)[target] * loss
        return loss.mean()

    @classmethod
    def from_config(cls, cfg: RunConfig, class_counts: Sequence[int]) -> FocalLoss:
        return cls(gamma=cfg.gamma_or_default, alpha=_alpha_from_cli(cfg.alpha), one_logit=False)


class SigmoidFocalLoss(FocalLoss):
    """The one-logit (sigmoid) form of `FocalLoss`; the model has a single output."""

    def __init__(self, gamma: float = 2.0, alpha: float | Sequence[float] | None = None) -> None:
        super().__init__(gamma=gamma, alpha=alpha, one_logit=True)

    @classmethod
    def from_config(cls, cfg: RunConfig, class_counts: Sequence[int]) -> SigmoidFocalLoss:
        return cls(gamma=cfg.gamma_or_default, alpha=_alpha_from_cli(cfg.alpha))


def _alpha_from_cli(alpha: Sequence[float] | None) -> float | list[float] | None:
    if alpha is None:
        return None
    if len(alpha) == 1:
        return float(alpha[0])
    return pos_neg_to_label_order(alpha)


class ClassBalancedLoss(nn.Module):
    """Class-balanced loss (Cui et al., "Class-Balanced Loss Based on Effective Number of Samples",
    CVPR 2019): class c is weighted by (1 - beta) / (1 - beta^n_c), normalised to sum to K, on top of
    cross-entropy (as `WeightedCrossEntropy`) or focal loss (as its per-class alpha)."""

    num_outputs = 2

    def __init__(self, class_counts: Sequence[int], beta: float = 0.9999, base: str = "ce", gamma: float = 2.0):
        super().__init__()
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if base not in ("ce", "focal"):
            raise ValueError(f"base must be 'ce' or 'focal', got {base!r}")
        weights = effective_number_weights(class_counts, beta)
        self.register_buffer("class_weights", weights)
        self.base = FocalLoss(gamma=gamma, alpha=weights.tolist()) if base == "focal" else None

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = _full_precision(logits)
        if self.base is not None:
            return self.base(logits, target)
        _check_logits(logits, target, len(self.class_weights))
        return weighted_cross_entropy(logits, target, self.class_weights, global_batch=_in_training_step(self))

    @classmethod
    def from_config(cls, cfg: RunConfig, class_counts: Sequence[int]) -> ClassBalancedLoss:
        return cls(class_counts, beta=cfg.beta, base=cfg.cb_base, gamma=cfg.gamma_or_default)


class LDAMLoss(nn.Module):
    """Label-distribution-aware margin loss (Cao et al., "Learning Imbalanced Datasets with
    Label-Distribution-Aware Margin Loss", NeurIPS 2019): CE(s * (z - m_y e_y), y) with margins
    m_c = C / n_c^(1/4), C chosen so the largest margin is `max_margin`.

    With `drw_epoch`, deferred re-weighting switches to class-balanced weights (beta = 0.9999) from that
    epoch on (the paper's LDAM-DRW); the module's training loop calls `set_epoch`. The paper's s = 30 is
    meant for a cosine (normalised) classifier; on the ordinary linear heads used here s = 1 is the default.
    """

    num_outputs = 2

    def __init__(
        self,
        class_counts: Sequence[int],
        max_margin: float = 0.5,
        scale: float = 1.0,
        drw_epoch: int | None = None,
        drw_beta: float = 0.9999,
    ) -> None:
        super().__init__()
        if max_margin <= 0 or scale <= 0:
            raise ValueError(f"max_margin and scale must be positive, got {max_margin}, {scale}")
        counts = torch.as_tensor(class_counts, dtype=torch.float64)
        margins = 1.0 / counts.pow(0.25)
        self.register_buffer("margins", (margins * (max_margin / margins.max())).float())
        self.register_buffer("drw_weights", effective_number_weights(class_counts, drw_beta))
        self.scale = scale
        self.drw_epoch = drw_epoch
        self.reweight = False

    def set_epoch(self, epoch: int) -> None:
        self.reweight = self.drw_epoch is not None and epoch >= self.drw_epoch

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = _full_precision(logits)
        _check_logits(logits, target, len(self.margins))
        shifted = logits - F.one_hot(target, logits.shape[1]).to(logits.dtype) * self.margins.to(logits.dtype)
        weight = self.drw_weights.to(logits.dtype) if self.reweight else None
        if weight is None:
            return F.cross_entropy(self.scale * shifted, target)
        return weighted_cross_entropy(self.scale * shifted, target, weight, global_batch=_in_training_step(self))

    @classmethod
    def from_config(cls, cfg: RunConfig, class_counts: Sequence[int]) -> LDAMLoss:
        return cls(class_counts, max_margin=cfg.ldam_max_margin, scale=cfg.ldam_scale, drw_epoch=cfg.drw_epoch)


class LogitAdjustedLoss(nn.Module):
    """Logit-adjusted cross-entropy CE(z + tau * log pi, y) with pi the training class prior (Menon et al.,
    "Long-Tail Learning via Logit Adjustment", ICLR 2021). Predictions use the raw logits z."""

    num_outputs = 2

    def __init__(self, class_counts: Sequence[int], tau: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("adjustment", tau * _log_prior(class_counts))

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = _full_precision(logits)
        _check_logits(logits, target, len(self.adjustment))
        return F.cross_entropy(logits + self.adjustment.to(logits.dtype), target)

    @classmethod
    def from_config(cls, cfg: RunConfig, class_counts: Sequence[int]) -> LogitAdjustedLoss:
        return cls(class_counts, tau=cfg.tau)


class BalancedSoftmaxLoss(nn.Module):
    """Balanced softmax CE(z + log n_c, y) (Ren et al., "Balanced Meta-Softmax for Long-Tailed Visual
    Recognition", NeurIPS 2020); equal to `LogitAdjustedLoss` with tau = 1, since log n_c and log pi_c
    differ by a constant that softmax ignores."""

    num_outputs = 2

    def __init__(self, class_counts: Sequence[int]) -> None:
        super().__init__()
        counts = torch.as_tensor(class_counts, dtype=torch.float64)
        self.register_buffer("log_counts", torch.log(counts).float())

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = _full_precision(logits)
        _check_logits(logits, target, len(self.log_counts))
        return F.cross_entropy(logits + self.log_counts.to(logits.dtype), target)

    @classmethod
    def from_config(cls, cfg: RunConfig, class_counts: Sequence[int]) -> BalancedSoftmaxLoss:
        return cls(class_counts)


VS_DEFAULT_GAMMA = 0.3  # the default of the paper's code (github.com/orparask/VS-Loss, `--gamma 0.3 --tau 1.0`)


class VSLoss(nn.Module):
    """Vector-scaling loss (Kini et al., "Label-Imbalanced and Group-Sensitive Classification under
    Overparameterization", NeurIPS 2021): CE(Delta * z + iota, y), a multiplicative and an additive logit
    adjustment with, for every class c, Delta_c = (n_c / n_max)^gamma (1 for the largest class, smaller for
    the rarer ones) and iota_c = tau * log pi_c (pi the training class prior).

    Both adjustments apply to *every* logit, not only the target's: the loss is -log softmax(a)_y over the
    adjusted logits a_c = Delta_c z_c + iota_c of all classes c, as the paper writes it and as its code
    computes it (`x / Delta_list + iota_list` with 1 / Delta_c = (n_max / n_c)^gamma). gamma = 0 is the
    logit-adjusted loss (with the same buffer, so bit for bit), gamma = tau = 0 plain CE, and tau = 0 the CDT
    loss (Ye et al., 2020). It is a training loss only: predictions (`positive_probability`) use the raw
    logits z. Defaults are those of the paper's code, gamma = 0.3 and tau = 1.
    """

    num_outputs = 2

    def __init__(self, class_counts: Sequence[int], gamma: float = VS_DEFAULT_GAMMA, tau: float = 1.0) -> None:
        super().__init__()
        counts = torch.as_tensor(class_counts, dtype=torch.float64)
        if counts.ndim != 1 or len(counts) < 2 or (counts <= 0).any():
            raise ValueError(f"class_counts must be K >= 2 positive counts, got {counts.tolist()}")
        if not (math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
        if not math.isfinite(tau):
            raise ValueError(f"tau must be a finite number, got {tau}")
        self.gamma, self.tau = float(gamma), float(tau)
        self.register_buffer("scales", (counts / counts.max()).pow(self.gamma).float())
        self.register_buffer("offsets", tau * _log_prior(class_counts))  # as LogitAdjustedLoss's adjustment

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = _full_precision(logits)
        _check_logits(logits, target, len(self.scales))
        return F.cross_entropy(logits * self.scales.to(logits.dtype) + self.offsets.to(logits.dtype), target)

    @classmethod
    def from_config(cls, cfg: RunConfig, class_counts: Sequence[int]) -> VSLoss:
        gamma = VS_DEFAULT_GAMMA if cfg.gamma is None else cfg.gamma
        return cls(class_counts, gamma=gamma, tau=cfg.tau)


class ParametricLoss(nn.Module):
    """AutoBalance's parametric loss (Li et al., "AutoBalance: Optimized Loss Functions for Imbalanced Data",
    NeurIPS 2021); its search lives in imbalance.autobalance.

    -w_y log softmax(Delta * z + l)_y, averaged over the batch (sum_i w_{y_i} l_i / N).

    With w = 1, Delta = 1, l = 0 it is cross-entropy; with l = tau log prior the logit-adjusted loss; with
    Delta = 1, l = 0 the class-weighted sum. Parameters are stored unconstrained (omega, delta, lambda).
    """

    num_outputs = 2

    def __init__(
        self,
        num_classes: int = 2,
        weights: Sequence[float] | None = None,
        scales: Sequence[float] | None = None,
        offsets: Sequence[float] | None = None,
        trainable: bool = False,
    ) -> None:
        super().__init__()
        k = num_classes
        w = torch.ones(k) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        d = torch.ones(k) if scales is None else torch.as_tensor(scales, dtype=torch.float32)
        o = torch.zeros(k) if offsets is None else torch.as_tensor(offsets, dtype=torch.float32)
        if (w <= 0).any() or (d <= 0).any():
            raise ValueError(f"AutoBalance weights and scales must be positive, got {w.tolist()}, {d.tolist()}")
        self.num_classes = k
        omega, delta = torch.log(w), torch.log(d)
        if trainable:
            self.omega, self.delta, self.offset = (nn.Parameter(t.clone()) for t in (omega, delta, o))
        else:
            self.register_buffer("omega", omega)
            self.register_buffer("delta", delta)
            self.register_buffer("offset", o)

    def alpha(self) -> tuple[Tensor, Tensor, Tensor]:
        """The normalised (w, Delta, l)."""
        w = self.num_classes * torch.softmax(self.omega, 0)
        scales = torch.exp(self.delta - self.delta.mean())
        offsets = self.offset - self.offset.mean()
        return w, scales, offsets

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if logits.dtype in (torch.float16, torch.bfloat16):  # an autocast forward's logits: the loss in float32
            logits = logits.float()
        w, scales, offsets = self.alpha()
        log_probs = F.log_softmax(logits * scales + offsets, dim=-1)
        nll = -log_probs.gather(1, target[:, None]).squeeze(1)
        return (w[target] * nll).mean()

    def as_dict(self) -> dict[str, list[float]]:
        w, scales, offsets = (t.detach().cpu().tolist() for t in self.alpha())
        return {"weights": w, "scales": scales, "offsets": offsets}

    @classmethod
    def from_file(cls, path: Path) -> ParametricLoss:
        try:
            values = json.loads(Path(path).read_text())
            return cls(len(values["weights"]), values["weights"], values["scales"], values["offsets"])
        except (OSError, KeyError, json.JSONDecodeError) as error:
            raise ValueError(f"--autobalance-params {path}: not an AutoBalance parameter file ({error})") from error

    @classmethod
    def from_config(cls, cfg, class_counts: Sequence[int]) -> ParametricLoss:
        if cfg.autobalance_params is None:
            raise ValueError("--loss autobalance needs its searched parameters; run it through experiments.run")
        return cls.from_file(cfg.autobalance_params)


LOSSES: dict[str, type[nn.Module]] = {
    "ce": CrossEntropy,
    "bce": BinaryCrossEntropy,
    "weighted": WeightedCrossEntropy,
    "focal": FocalLoss,
    "sigmoid-focal": SigmoidFocalLoss,
    "cb": ClassBalancedLoss,
    "ldam": LDAMLoss,
    "logit-adjusted": LogitAdjustedLoss,
    "balanced-softmax": BalancedSoftmaxLoss,
    "vs": VSLoss,
    "autobalance": ParametricLoss,  # its parameters come from the search (imbalance.autobalance)
}


def build_loss(cfg: RunConfig, class_counts: Sequence[int]) -> nn.Module:
    """The loss named by `cfg.loss`, with class statistics from the training split's `class_counts`."""
    if cfg.loss not in LOSSES:
        raise ValueError(f"--loss {cfg.loss!r} is unknown; choose one of: {', '.join(LOSSES)}")
    if min(class_counts) < 1:
        raise ValueError(f"the training split has an empty class (counts {list(class_counts)}); every loss needs both")
    return LOSSES[cfg.loss].from_config(cfg, class_counts)


def posthoc_logit_adjustment(logits: Tensor, class_counts: Sequence[int], tau: float) -> Tensor:
    """Post-hoc logit adjustment z - tau * log pi (Menon et al., ICLR 2021): a free fix of a model trained
    with plain CE on imbalanced data. Only for K-class (softmax) outputs."""
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError("post-hoc logit adjustment needs softmax outputs (N, K>=2); it does not apply to --loss bce")
    return logits - tau * _log_prior(class_counts).to(logits.device, logits.dtype)


def positive_probability(logits: Tensor) -> Tensor:
    """P(label 1) from the model's outputs: sigmoid of one logit, or softmax column 1 of (N, 2)."""
    if logits.ndim == 1 or logits.shape[-1] == 1:
        return torch.sigmoid(logits.reshape(-1).float())
    return torch.softmax(logits.float(), dim=-1)[:, 1]
