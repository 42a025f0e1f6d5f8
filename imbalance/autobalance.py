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
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imbalance.io import atomic_write_json
from imbalance.losses import ParametricLoss
from imbalance.model import ImbalanceClassifier, NonFiniteLossError, adamw


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
        # the ranks' mean, as the module's train/loss (the meta loss below is the global batch's on every rank)
        self.log("search/train_loss", loss, prog_bar=True, sync_dist=True, batch_size=len(labels))
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
        opt_model = adamw(model_params, lr=self.lr, weight_decay=self.weight_decay)
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


# ------------------------------------------------------------------ the search phase of a run


class _SearchLossGuard(L.Callback):
    """Stops AutoBalance's search when its logged training loss is NaN or infinite (the search module is not
    ours to instrument; the classifier checks its own loss on the device, see ImbalanceClassifier). Looked at
    every step on one CPU process, else every ImbalanceClassifier.NONFINITE_CHECK_EVERY steps and at each
    epoch's last batch, by every rank together."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        every_step = pl_module.device.type == "cpu" and trainer.world_size == 1
        if not (
            every_step or (batch_idx + 1) % ImbalanceClassifier.NONFINITE_CHECK_EVERY == 0 or trainer.is_last_batch
        ):
            return
        loss = trainer.callback_metrics.get("search/train_loss")
        if loss is None:
            return
        value = loss.detach().float().reshape(())
        if trainer.world_size > 1:
            values = trainer.strategy.all_gather(value).reshape(-1)
            bad = values[~torch.isfinite(values)]
            value = bad[0] if len(bad) else values[0]
        if not bool(torch.isfinite(value)):
            lr = pl_module.lr
            raise NonFiniteLossError(
                f"the AutoBalance search's training loss became {float(value)} at search epoch "
                f"{trainer.current_epoch}, batch {batch_idx}: training diverged; lower --lr (it is {lr:g}; try "
                f"{lr / 10:g}) or --autobalance-lr"
            )


def run_search(cfg, run_dir: Path, hw: dict[str, Any], logger, signals=None) -> Path:
    """AutoBalance's search phase of a run (`cfg` its RunConfig); returns the file of the found loss parameters (rank 0 writes it)."""
    # the run machinery (trainer options, data loading) is imbalance.train's; imported here, not at the top,
    # because imbalance.train imports this module's search for --loss autobalance
    from imbalance.data import SearchDataModule, load_split
    from imbalance.model import create_backbone, freeze_all_but_head
    from imbalance.train import FAST_DEV_RUN_PREFIX, _make_trainer, _trainer_options, make_datamodule, say

    if cfg.fast_dev_run:  # a smoke test writes nothing into the run directory
        run_dir = Path(tempfile.mkdtemp(prefix=FAST_DEV_RUN_PREFIX))  # removed when the smoke test ends
    params_file = run_dir / "autobalance_params.json"
    if cfg.resume and params_file.is_file():
        return params_file
    split = load_split(cfg)
    train_part, meta_part = search_split([label for _, label in split.train], 0.2, cfg.seed)
    search = replace(split, train=[split.train[i] for i in train_part], val=[split.train[i] for i in meta_part], dev=[])
    say(
        f"AutoBalance search: train part {search.train_counts}, class-balanced validation part {search.val_counts} "
        "(counts negative, positive)"
    )
    loss = initial_loss(cfg.autobalance_init, search.train_counts)
    backbone = create_backbone(cfg.backbone, 2, cfg.pretrained, cfg.weights)
    if cfg.freeze_backbone:  # the search trains what the retrain will train, on the same kind of batches
        freeze_all_but_head(backbone)
    epochs = cfg.autobalance_search_epochs or cfg.epochs  # also the schedule of --sampling progressive
    datamodule = make_datamodule(SearchDataModule, cfg, search, backbone, epochs)
    module = AutoBalanceSearch(
        backbone,
        loss,
        cfg.lr,
        cfg.weight_decay,
        cfg.autobalance_lr,
        inner_lr=0.1,
        objective=cfg.autobalance_objective,
        frozen_backbone=cfg.freeze_backbone,
    )
    trainer = _make_trainer(
        max_epochs=epochs,
        logger=logger,
        callbacks=[_SearchLossGuard()],
        enable_checkpointing=False,
        **_trainer_options(cfg, hw, run_dir / "search"),
    )
    if signals is None:
        trainer.fit(module, datamodule=datamodule)
    else:
        signals.fit(trainer, module, datamodule=datamodule)
    if trainer.is_global_zero:
        extra = {
            "init": cfg.autobalance_init,
            "objective": cfg.autobalance_objective,
            "search_epochs": epochs,
            "class_names": list(split.class_names),
            "train_part_counts": search.train_counts,
            "validation_part_counts": search.val_counts,
        }
        save_params(loss, module.trajectory, params_file, extra)
        plot_trajectory(module.trajectory, split.class_names, run_dir / "autobalance_trajectory.png")
        say(f"AutoBalance found {json.dumps(loss.as_dict())}; retraining from scratch with it")
    trainer.strategy.barrier()  # every rank reads the file rank 0 wrote
    return params_file
