"""AutoBalance: let a validation set choose the loss (Li, Zhang, Thrampoulidis, Chen, Oymak, "AutoBalance:
Optimized Loss Functions for Imbalanced Data", NeurIPS 2021, arXiv 2201.01212).

The parametric loss is l(y, z) = -w_y log softmax(Delta * z + l)_y with per-class weights w, logit scales
Delta and offsets l, alpha = (w, Delta, l). It combines class weighting with the LDAM / logit-adjustment
family. The search alternates
- a lower-level step on the model weights theta with the training part and the current loss, and
- an upper-level step on alpha along the hypergradient of a validation objective on a class-balanced
  validation part (class-balanced cross-entropy as in the paper, or a soft F1 when F1 is what is reported),
  through a one-step unrolled lower update.
This implementation unrolls the lower update through the classifier head only, with the features held fixed
for the upper step: d/d alpha L_val(W - eta * grad_W L_train(W, alpha)). That keeps the hypergradient as
cheap as one extra head evaluation (the paper's full-network unroll costs a second-order pass through the
backbone), and it is exact for a linear model, which the tests check against finite differences.

alpha is kept normalised so the loss scale cannot collapse: w = K softmax(omega) (sums to K),
Delta = exp(delta - mean delta) (geometric mean 1), l = lambda - mean lambda (softmax ignores a shift).
Under DDP every rank gathers the batch's features from all ranks and computes the hypergradient of the global
batch, so alpha is the same on every rank and the same as one process would find with the global batch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imbalance.io import atomic_write_json


class ParametricLoss(nn.Module):
    """-w_y log softmax(Delta * z + l)_y, averaged over the batch (sum_i w_{y_i} l_i / N).

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


def initial_loss(init: str, class_counts: Sequence[int], trainable: bool = True) -> ParametricLoss:
    """The search's starting point: plain CE, or the logit-adjusted loss (tau = 1)."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if init == "ce":
        return ParametricLoss(len(counts), trainable=trainable)
    if init == "logit-adjusted":
        return ParametricLoss(
            len(counts), offsets=torch.log(counts / counts.sum()).float().tolist(), trainable=trainable
        )
    raise ValueError(f"--autobalance-init must be 'ce' or 'logit-adjusted', got {init!r}")


def balanced_ce(logits: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Mean over classes of each class's mean CE: the validation objective (balanced error's surrogate)."""
    nll = F.cross_entropy(logits, target, reduction="none")
    per_class = torch.zeros(num_classes, device=logits.device, dtype=nll.dtype).index_add(0, target, nll)
    counts = torch.bincount(target, minlength=num_classes).to(nll.dtype)
    present = counts > 0
    return (per_class[present] / counts[present]).mean()


def soft_f1_loss(logits: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """1 - F1 of the positive class (label 1) with soft counts from P(positive): a differentiable F1."""
    p = torch.softmax(logits, dim=-1)[:, 1]
    y = (target == 1).to(p.dtype)
    tp, fp, fn = (p * y).sum(), (p * (1 - y)).sum(), ((1 - p) * y).sum()
    return 1 - 2 * tp / (2 * tp + fp + fn).clamp(min=1e-8)


OBJECTIVES = {"balanced-ce": balanced_ce, "soft-f1": soft_f1_loss}


def head_hypergradient(
    loss: ParametricLoss,
    head: nn.Linear,
    feats_train: Tensor,
    y_train: Tensor,
    feats_val: Tensor,
    y_val: Tensor,
    inner_lr: float,
    objective: str = "balanced-ce",
) -> tuple[Tensor, list[Tensor]]:
    """Validation objective after one unrolled SGD step of the head, and its gradient w.r.t. the loss
    parameters (omega, delta, lambda).

    Computed in float32 at least, with autocast off: the search calls it inside a bf16-mixed training step,
    with bf16 features, and bf16 head products would cost the hypergradient its precision (it is cheap: the
    head only). The hypergradients have the dtype of the loss parameters they are assigned to as `.grad`.
    """
    dtype = torch.promote_types(head.weight.dtype, torch.float32)
    with torch.autocast(feats_train.device.type, enabled=False):
        weight, bias = head.weight.to(dtype), head.bias.to(dtype)
        feats_train, feats_val = feats_train.to(dtype), feats_val.to(dtype)
        train_loss = loss(F.linear(feats_train, weight, bias), y_train)
        grad_w, grad_b = torch.autograd.grad(train_loss, (weight, bias), create_graph=True)
        new_w, new_b = weight - inner_lr * grad_w, bias - inner_lr * grad_b
        val_loss = OBJECTIVES[objective](F.linear(feats_val, new_w, new_b), y_val, loss.num_classes)
        params = [loss.omega, loss.delta, loss.offset]
        hypergrads = torch.autograd.grad(val_loss, params, allow_unused=True)
    return val_loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, hypergrads, strict=True)]


def search_split(
    labels: Sequence[int], fraction: float, seed: int, balance_val: bool = True
) -> tuple[list[int], list[int]]:
    """Stratified split of the training indices into (train part, validation part). The validation part is
    made class-balanced (as the paper recommends) by moving its surplus majority samples to the train part,
    so every training sample is used by one part or the other."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 20211])
    train_part, val_part = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_val = max(1, round(fraction * len(members)))
        val_part.append(members[:n_val])
        train_part.append(members[n_val:])
    if balance_val:
        smallest = min(len(v) for v in val_part)
        train_part += [v[smallest:] for v in val_part]
        val_part = [v[:smallest] for v in val_part]
    return sorted(np.concatenate(train_part).tolist()), sorted(np.concatenate(val_part).tolist())


class AutoBalanceSearch(L.LightningModule):
    """The search phase as a LightningModule with manual optimisation (two optimisers: theta and alpha).

    Each training batch is a pair {"train": ..., "meta": ...}; the upper step runs every `upper_every` steps.
    """

    def __init__(
        self,
        backbone: nn.Module,
        loss: ParametricLoss,
        lr: float,
        weight_decay: float,
        alpha_lr: float,
        inner_lr: float,
        upper_every: int = 1,
        objective: str = "balanced-ce",
        frozen_backbone: bool = False,
    ) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"AutoBalance objective must be one of {list(OBJECTIVES)}, got {objective!r}")
        self.objective = objective
        self.automatic_optimization = False
        self.backbone = backbone
        self.loss_fn = loss
        self.lr, self.weight_decay, self.alpha_lr = lr, weight_decay, alpha_lr
        self.inner_lr, self.upper_every = inner_lr, upper_every
        self.trajectory: list[dict[str, Any]] = []
        # --freeze-backbone: the caller has frozen all but the head; its batch-norm statistics stay as loaded
        self.frozen_backbone = frozen_backbone

    def on_train_epoch_start(self) -> None:
        if self.frozen_backbone:
            self.backbone.eval()
            self.backbone.get_classifier().train()

    def _features(self, images: Tensor) -> Tensor:
        return self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        opt_model, opt_alpha = self.optimizers()
        images, labels, _ = batch["train"]
        head = self.backbone.get_classifier()
        feats = self._features(images)
        loss = self.loss_fn(head(feats), labels)
        opt_model.zero_grad()
        self.manual_backward(loss)  # the loss parameters get no update here: only opt_model steps
        opt_model.step()
        self.log("search/train_loss", loss, prog_bar=True, batch_size=len(labels))
        if batch_idx % self.upper_every:
            return
        meta_images, meta_labels, _ = batch["meta"]
        with torch.no_grad():
            meta_feats = self._features(meta_images)
        train_feats, train_labels = feats.detach(), labels
        if self.trainer.world_size > 1:
            # The hypergradient is not linear in the batch (a class-balanced mean, an unrolled step), so
            # averaging per-rank hypergradients would not give the single-process one. The features are
            # small: gather every rank's, and let each rank compute the same hypergradient of the global batch.
            train_feats, train_labels, meta_feats, meta_labels = (
                self.all_gather(t).flatten(0, 1) for t in (train_feats, train_labels, meta_feats, meta_labels)
            )
        val_loss, hypergrads = head_hypergradient(
            self.loss_fn, head, train_feats, train_labels, meta_feats, meta_labels, self.inner_lr, self.objective
        )
        opt_alpha.zero_grad()
        for p, g in zip((self.loss_fn.omega, self.loss_fn.delta, self.loss_fn.offset), hypergrads, strict=True):
            p.grad = g
        opt_alpha.step()
        self.log("search/val_loss", val_loss, prog_bar=True, batch_size=len(meta_labels))

    def on_train_epoch_end(self) -> None:
        self.trajectory.append({"epoch": self.current_epoch, **self.loss_fn.as_dict()})
        for name, values in self.loss_fn.as_dict().items():
            for k, v in enumerate(values):
                self.log(f"autobalance/{name}_{k}", v)

    def configure_optimizers(self):
        model_params = [p for n, p in self.named_parameters() if not n.startswith("loss_fn.") and p.requires_grad]
        opt_model = torch.optim.AdamW(model_params, lr=self.lr, weight_decay=self.weight_decay)
        opt_alpha = torch.optim.Adam(self.loss_fn.parameters(), lr=self.alpha_lr)
        return [opt_model, opt_alpha]


def save_params(loss: ParametricLoss, trajectory: list[dict[str, Any]], path: Path, extra: dict[str, Any]) -> None:
    atomic_write_json(path, {**loss.as_dict(), "trajectory": trajectory, **extra})


def plot_trajectory(trajectory: list[dict[str, Any]], class_names: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from imbalance.plots import _save

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    epochs = [row["epoch"] for row in trajectory]
    for ax, name in zip(axes, ("weights", "scales", "offsets"), strict=True):
        for k, cls in enumerate(class_names):
            ax.plot(epochs, [row[name][k] for row in trajectory], marker="o", label=cls)
        ax.set_title(name)
        ax.set_xlabel("search epoch")
        ax.legend(fontsize=8)
    fig.suptitle("AutoBalance: the loss parameters during the search")
    fig.tight_layout()
    _save(fig, path)
