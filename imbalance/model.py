"""The classifier: a timm backbone and an injected loss inside one LightningModule."""

from __future__ import annotations

import difflib
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import timm
import torch
from torch import Tensor, nn

from imbalance.config import ConfigError
from imbalance.data import normalize_images
from imbalance.losses import positive_probability
from imbalance.metrics import flatten_metrics, make_metrics

BACKBONE_ALIASES = {
    "vgg": "vgg16",
    "vgg16": "vgg16",
    "resnet": "resnet18",
    "resnet18": "resnet18",
    "resnet50": "resnet50",
}


class WeightsError(RuntimeError):
    """Starting weights could not be fetched or loaded."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the run stops (the message names the epoch, batch and loss)."""


def resolve_backbone_name(name: str) -> str:
    resolved = BACKBONE_ALIASES.get(name.lower(), name)
    if not timm.is_model(resolved):
        close = difflib.get_close_matches(name.lower(), timm.list_models(), n=6, cutoff=0.6)
        hint = f"; similar timm names: {', '.join(close)}" if close else ""
        raise ConfigError(
            f"--backbone {name!r} is neither an alias ({', '.join(BACKBONE_ALIASES)}) nor a timm model{hint}"
        )
    return resolved


def create_backbone(name: str, num_outputs: int, pretrained: bool = False, weights: Path | None = None) -> nn.Module:
    """A timm model with `num_outputs` logits: from scratch, timm's hub weights, or a local file."""
    timm_name = resolve_backbone_name(name)
    if pretrained:
        try:
            return timm.create_model(timm_name, pretrained=True, num_classes=num_outputs)
        except Exception as error:  # offline, hub down, no weights for this name: all end the same way
            raise WeightsError(
                f"--pretrained: timm could not fetch the pretrained weights of {timm_name!r} ({type(error).__name__}: "
                f"{str(error)[:200]}). Without network access, download the weights elsewhere and pass the file "
                "with --weights PATH (a timm/torchvision state dict or .safetensors file)."
            ) from error
    model = timm.create_model(timm_name, pretrained=False, num_classes=num_outputs)
    if weights is not None:
        load_backbone_weights(model, Path(weights))
    return model


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors from a .safetensors file or a torch file, loaded safely (weights_only: no pickled code).

    One of this repository's own checkpoints (runs/NAME/checkpoints/*.ckpt: a Lightning dict with
    "state_dict" and "hyper_parameters", or a bare module state dict; either way keys `backbone.*`) yields
    its `backbone.*` tensors, prefix stripped, for every loss: the rest (the loss's buffers and parameters
    such as `loss_fn.class_weights`, `loss_fn.margins` or AutoBalance's `loss_fn.omega`, metric states) is
    not part of the backbone and is dropped.
    """
    if not path.is_file():
        raise WeightsError(f"--weights {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsError(
            f"--weights {path} could not be read as a state dict or safetensors file: {error}"
        ) from error
    for key in ("state_dict", "model", "model_state_dict"):  # common training-checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"--weights {path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k[len("module.") :]: v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        # this repository's ImbalanceClassifier (or AutoBalanceSearch): backbone.* is the timm model; the
        # loss's buffers and parameters (loss_fn.*) and anything else are not, whatever the loss was
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    elif state and all(k.startswith("model.") for k in state):  # other wrappers
        state = {k[len("model.") :]: v for k, v in state.items()}
    return state


def load_backbone_weights(model: nn.Module, path: Path) -> None:
    """Load every backbone tensor of `path` into `model`; the classifier head is left re-initialised.

    torchvision state dicts are converted with timm's own filter where the names differ (VGG). Backbone
    tensors that are missing or do not fit are an error, not a silent partial load.
    """
    state = read_state_dict(path)
    module = sys.modules.get(type(model).__module__)
    own_keys = set(model.state_dict())
    if not set(state) & own_keys and module is not None:
        for filter_name in ("checkpoint_filter_fn", "_filter_fn"):
            filter_fn = getattr(module, filter_name, None)
            if filter_fn is None:
                continue
            try:
                state = filter_fn(state, model) if filter_name == "checkpoint_filter_fn" else filter_fn(state)
            except TypeError:
                state = filter_fn(state)
            break
    head_keys = {k for k in own_keys if k.startswith(_head_prefixes(model))}
    own = model.state_dict()
    backbone_state = {k: v for k, v in state.items() if k in own and k not in head_keys}
    wrong_shape = [k for k, v in backbone_state.items() if v.shape != own[k].shape]
    missing = sorted(own_keys - head_keys - set(backbone_state))
    if wrong_shape or missing:
        detail = f"shapes differ for {wrong_shape[:5]}" if wrong_shape else f"missing {missing[:5]}"
        raise WeightsError(
            f"--weights {path} does not fit backbone {type(model).__name__}: {detail} "
            f"({len(missing)} missing tensors). Is it a state dict of the same architecture?"
        )
    model.load_state_dict(backbone_state, strict=False)
    model.reset_classifier(model.num_classes)  # a fresh head for our classes, whatever the file held


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the classifier head, from timm's own record of it ('fc', 'head.fc', ...)."""
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier", "fc")
    names = [classifier] if isinstance(classifier, str) else list(classifier)
    return tuple(f"{n}." for n in names)


def freeze_all_but_head(model: nn.Module) -> None:
    """Feature extraction (the lecture's pretrained case): only the classifier head learns."""
    head = {id(p) for p in model.get_classifier().parameters()}
    for param in model.parameters():
        param.requires_grad = id(param) in head


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, with PyTorch's fused kernel where every parameter is on a CPU or a CUDA GPU: the same update up to
    floating-point rounding (tests/test_model.py), in one kernel instead of a Python loop over the parameters.
    On the 2-core CPU a resnet10t step of AdamW took 28 ms per-tensor and 3-4 ms fused, about a tenth of the
    case study's whole training step (issue 18)."""
    params = list(params)
    tensors = [t for group in params for t in (group["params"] if isinstance(group, dict) else [group])]
    fused = bool(tensors) and all(t.device.type in ("cpu", "cuda") for t in tensors)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


class ImbalanceClassifier(L.LightningModule):
    """Backbone + loss, with exact epoch metrics of the positive class for train and val.

    `config` is the run's `RunConfig.to_dict()`; it is saved in the checkpoint so evaluation can rebuild
    the model, its input size and normalisation without repeating a flag.
    """

    def __init__(
        self,
        backbone: nn.Module,
        loss: nn.Module,
        config: dict[str, Any],
        class_counts: Sequence[int],
        class_names: Sequence[str] = ("negative", "positive"),
        image_size: int = 224,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        manifest_sha256: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "loss"])  # manifest_sha256: evaluation replays that split
        self.backbone = backbone
        self.loss_fn = loss
        self.class_names = tuple(class_names)
        metrics = make_metrics()
        self.train_metrics = metrics.clone(prefix="train/")
        # one collection per evaluation set: val (reported) and dev (decisions), a ModuleDict so they move with
        # the module to its device
        self.eval_metrics = nn.ModuleDict({stage: metrics.clone(prefix=f"{stage}/") for stage in self.EVAL_STAGES})
        self.frozen_backbone = bool(config.get("freeze_backbone"))
        if self.frozen_backbone:
            freeze_all_but_head(self.backbone)
        self._eval_outputs: dict[str, list[tuple[Tensor, Tensor, Tensor]]] = {s: [] for s in self.EVAL_STAGES}
        self._train_outputs: list[tuple[Tensor, Tensor]] = []  # (P(positive), label) of the epoch's steps
        # (index, label, prob) of the last evaluated epoch, per evaluation set
        self.val_predictions: dict[str, Tensor] | None = None
        self.dev_predictions: dict[str, Tensor] | None = None
        # the first non-finite training loss of the epoch, noted on the device (no host sync per step)
        self._batches: Tensor | None = None
        self._first_bad_batch: Tensor | None = None
        self._first_bad_loss: Tensor | None = None

    def normalised(self, images: Tensor) -> Tensor:
        """`images` as the backbone takes them. The data module normalises its batches on the device; uint8 images
        given to the module directly (a dataset's items) get the same treatment here, in the backbone's dtype
        (float64 under --precision 64-true); anything else is returned as it is."""
        if images.dtype != torch.uint8:
            return images
        dtype = next(self.backbone.parameters()).dtype
        return normalize_images(images, self.hparams.mean, self.hparams.std, dtype)

    def forward(self, images: Tensor) -> Tensor:
        images = self.normalised(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.backbone(images)

    @property
    def channels_last(self) -> bool:
        wanted = self.hparams.config.get("channels_last")
        return self.device.type == "cuda" if wanted is None else bool(wanted)

    def on_fit_start(self) -> None:
        if self.channels_last:  # NHWC convolutions: faster on tensor cores; on CPUs it depends (benchmark)
            self.backbone.to(memory_format=torch.channels_last)

    def on_train_start(self) -> None:
        # After a --resume (the optimiser and schedule restored), set each learning rate from the schedule of
        # *this* run's --epochs: a run resumed with more epochs would otherwise train its next epoch at the lr
        # the old, shorter schedule left in the optimiser (0 at its end). A no-op for any other start.
        for config in self.trainer.lr_scheduler_configs:
            schedule = config.scheduler
            if isinstance(schedule, torch.optim.lr_scheduler.LambdaLR):
                groups = schedule.optimizer.param_groups
                for group, base, factor in zip(groups, schedule.base_lrs, schedule.lr_lambdas, strict=True):
                    group["lr"] = base * factor(schedule.last_epoch)
                schedule._last_lr = [group["lr"] for group in groups]

    def on_train_epoch_start(self) -> None:
        self._batches = self._first_bad_batch = self._first_bad_loss = None
        self._train_outputs.clear()
        if hasattr(self.loss_fn, "set_epoch"):  # e.g. LDAM's deferred re-weighting
            self.loss_fn.set_epoch(self.current_epoch)
        if self.frozen_backbone:  # keep the frozen backbone's batch-norm statistics as loaded
            self.backbone.eval()
            self.backbone.get_classifier().train()

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels, _ = batch
        logits = self(images)
        loss = self.loss_fn(logits, labels)
        self._note_nonfinite(loss)
        # kept on the device and given to the metrics once, at the epoch's end: the same exact epoch metrics
        # without 16 metric updates a step (issue 18: ~2 ms a step, a tenth of a short GPU step)
        self._train_outputs.append((positive_probability(logits.detach()), labels))
        # synced: under DDP each rank's loss is its share of the global batch, and rank 0's alone was logged;
        # one scalar all-reduce a step, beside the gradients' own
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(labels))
        return loss

    # How often the host looks at the device's note of a non-finite loss: every step where that costs nothing
    # (one CPU process), else every NONFINITE_CHECK_EVERY steps and at the last batch of every epoch, so the
    # run stops before the epoch is validated or checkpointed (the step named is exact either way).
    NONFINITE_CHECK_EVERY = 10

    def _note_nonfinite(self, loss: Tensor) -> None:
        loss = loss.detach().float()
        if self._batches is None:
            self._batches = torch.zeros((), dtype=torch.long, device=loss.device)
            self._first_bad_batch = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._first_bad_loss = torch.zeros((), device=loss.device)
        first = ~torch.isfinite(loss) & (self._first_bad_batch < 0)
        self._first_bad_batch = torch.where(first, self._batches, self._first_bad_batch)
        self._first_bad_loss = torch.where(first, loss, self._first_bad_loss)
        self._batches += 1

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        every_step = self.device.type == "cpu" and self.trainer.world_size == 1
        if every_step or (batch_idx + 1) % self.NONFINITE_CHECK_EVERY == 0 or self.trainer.is_last_batch:
            self._raise_if_nonfinite()

    def _raise_if_nonfinite(self) -> None:
        if self._first_bad_batch is None:
            return
        bad, value = self._first_bad_batch, self._first_bad_loss
        if self.trainer.world_size > 1:  # every rank decides the same (a rank stopping alone would hang DDP)
            bads, values = self.all_gather(bad), self.all_gather(value)
            found = bads >= 0
            if not bool(found.any()):
                return
            index = int(torch.nonzero(found)[0])
            bad, value = bads[index], values[index]
        batch = int(bad)
        if batch < 0:
            return
        cfg = self.hparams.config
        lr = float(cfg.get("lr", float("nan")))
        raise NonFiniteLossError(
            f"the training loss (--loss {cfg.get('loss')}) became {float(value)} at epoch {self.current_epoch}, "
            f"batch {batch} of the epoch: training diverged; lower --lr (it is {lr:g}; try {lr / 10:g}) or check "
            "the inputs and loss options"
        )

    def on_train_epoch_end(self) -> None:
        self._raise_if_nonfinite()
        if self._train_outputs:
            probs, labels = (torch.cat(parts) for parts in zip(*self._train_outputs, strict=True))
            self.train_metrics.update(probs, labels)
            self._train_outputs.clear()
        self.log_dict(flatten_metrics(self.train_metrics.compute(), self.class_names))
        self.train_metrics.reset()

    # the evaluation loaders of ImbalanceDataModule.val_dataloader, by dataloader_idx
    EVAL_STAGES = ("val", "dev")

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        stage = self.EVAL_STAGES[dataloader_idx]
        images, labels, indices = batch
        logits = self(images)
        loss = self.loss_fn(logits, labels)
        probs = positive_probability(logits)
        self.eval_metrics[stage].update(probs, labels)
        self._eval_outputs[stage].append((indices, labels, probs))
        # the batch-size-weighted mean over the epoch, synchronised once at the epoch's end
        self.log(f"{stage}/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(labels), add_dataloader_idx=False)

    def on_validation_epoch_end(self) -> None:
        # one pass per evaluation set the loaders served this epoch (dev only when the split has one); every
        # rank runs the same stages, so the gathers below pair up under DDP
        served = len(self.trainer.val_dataloaders) if isinstance(self.trainer.val_dataloaders, list) else 1
        for stage in self.EVAL_STAGES[:served]:
            self._end_eval_stage(stage)

    def _end_eval_stage(self, stage: str) -> None:
        metrics = self.eval_metrics[stage]
        values = flatten_metrics(metrics.compute(), self.class_names)
        metrics.reset()
        predictions = self._gather_outputs(self._eval_outputs[stage])
        self._eval_outputs[stage].clear()
        setattr(self, f"{stage}_predictions", predictions)
        nonfinite = int((~torch.isfinite(predictions["prob"])).sum())
        if nonfinite:
            # a NaN probability is neither above nor below a threshold, and the ranking metrics order NaNs
            # somewhere (AUROC and AP of 1.0 for all-NaN outputs): none of these numbers describes a model
            values = dict.fromkeys(values, float("nan"))
            if not self.trainer.sanity_checking:
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(
                    f"epoch {self.current_epoch}: {nonfinite} of {len(predictions['prob'])} {stage} "
                    f"probabilities are NaN or infinite; this epoch's {stage} metrics are NaN"
                )
        self.log_dict(values)  # already reduced over the epoch and all ranks by torchmetrics

    def _gather_outputs(self, outputs: list[tuple[Tensor, Tensor, Tensor]]) -> dict[str, Tensor]:
        if outputs:
            indices, labels, probs = (torch.cat(parts) for parts in zip(*outputs, strict=True))
        else:
            indices = labels = torch.zeros(0, dtype=torch.long, device=self.device)
            probs = torch.zeros(0, device=self.device)
        if self.trainer.world_size > 1:
            from torchmetrics.utilities.distributed import gather_all_tensors  # handles unequal shard sizes

            indices, labels, probs = (torch.cat(gather_all_tensors(t)) for t in (indices, labels, probs.float()))
        order = torch.argsort(indices)
        return {
            "index": indices[order].cpu(),
            "label": labels[order].cpu(),
            "prob": probs[order].float().cpu(),
        }

    def optimisation(self) -> tuple[float, float, int]:
        """(learning rate, weight decay, epochs) of the optimiser and its schedule: the run's options."""
        cfg = self.hparams.config
        return cfg["lr"], cfg["weight_decay"], cfg["epochs"]

    def warmup_epochs(self) -> int:
        """The linear warm-up epochs of the schedule, the run's --warmup-epochs (a separate method, so that
        `optimisation` keeps its three values for its other callers; a configuration of a version before
        --warmup-epochs has none)."""
        return self.hparams.config.get("warmup_epochs", 0)

    def configure_optimizers(self):
        lr, weight_decay, epochs = self.optimisation()
        warmup = self.warmup_epochs()
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = adamw(params, lr=lr, weight_decay=weight_decay)
        epochs = max(1, epochs)

        def factor(epoch: int) -> float:
            # closed form, read from the run's --epochs: a --resume that grows --epochs follows the longer
            # schedule (a restored CosineAnnealingLR would keep its old T_max and climb back up)
            return lr_factor(epoch, epochs, warmup)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def lr_factor(epoch: int, epochs: int, warmup: int = 0) -> float:
    """The learning rate of `epoch` (from 0) as a share of --lr: (e + 1) / (W + 1) for the W = `warmup` first
    epochs, then the cosine from 1 down to 0 over the remaining E - W (E = `epochs`), as it was over all E
    epochs before warm-up existed (W = 0 gives exactly that factor)."""
    if epoch < warmup:  # linear, never 0: the first epoch already trains, at --lr / (W + 1)
        return (epoch + 1) / (warmup + 1)
    span = epochs - warmup
    return 0.5 * (1 + math.cos(math.pi * min(epoch - warmup, span) / span))
