"""Stage 2 of decoupled classifier learning: a new classifier on the frozen features of a finished run.

Kang et al., "Decoupling Representation and Classifier for Long-Tailed Recognition", ICLR 2020:
- cRT (classifier re-training): the classifier is re-initialised and trained with class-balanced sampling;
- τ-normalisation: each class's weight vector is rescaled, w_c / ‖w_c‖^τ, and the logits are the dot products
  with the rescaled weights, without the bias, as in the authors' code (so τ = 0 is the stage-1 classifier
  less its bias); τ chosen on the dev split (highest dev balanced accuracy) or given;
- LWS (learnable weight scaling): one scale f_c per class is learnt with class-balanced sampling, the weights
  fixed: z_c = f_c (w_c · x + b_c).
Alshammari et al., "Long-Tailed Recognition via Weight Balancing", CVPR 2022, stage 2:
- MaxNorm: the classifier is fine-tuned with the class-balanced loss (w_c = N / (K N_c)) and weight decay, and
  after every optimiser step each class's weight vector is projected back into the ball of radius
  cap = min_c ‖w_c‖ + thresh · (max_c ‖w_c‖ − min_c ‖w_c‖) of the stage-1 norms (the authors' PGD, thresh 0.1).
  Their stage 1 is an ordinary run with a tuned --weight-decay.

Stage 2 starts from a finished stage-1 run (`--from-run DIR`: its last.ckpt, its config.json and its
manifest.json, so the split is the same photos), or trains stage 1 first in `<out>/stage1` (see
`imbalance.train.fit`). The backbone never changes: its pooled features of every training, dev and validation
photo are computed once, in evaluation mode and without augmentation, by every process, and the classifier is
trained on them for `--stage2-epochs` with the run's usual loop (metrics, dev decisions, checkpoints, W&B).
The checkpoints hold the whole network with the stage-2 classifier folded into its head (for LWS and τ-norm
the effective weights), so `experiments.evaluate` and `--weights` read them like any run's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from imbalance.config import DECOUPLED, ConfigError, RunConfig, contradictions
from imbalance.data import ImageDataset, ImbalanceDataModule, SplitData, evaluation_dataset, normalize_images
from imbalance.losses import CrossEntropy, WeightedCrossEntropy, balanced_class_weights
from imbalance.metrics import confusion_metrics
from imbalance.model import ImbalanceClassifier

__all__ = ["DECOUPLED", "DecoupledClassifier", "prepare", "read_stage1", "stage2_config"]
TAU_NORM_GRID = tuple(round(0.1 * i, 1) for i in range(21))  # 0, 0.1, ..., 2: the range of Kang et al.'s Fig. 4
DEFAULT_STAGE2_EPOCHS = 10  # Kang et al. retrain the classifier for 10 epochs
DEFAULT_STAGE2_LR = 0.01
DEFAULT_MAXNORM_THRESH = 0.1  # the authors' code
# stage 2's own sampling: cRT and LWS are trained class-balanced; MaxNorm instance-balanced with the
# class-balanced loss; τ-norm trains nothing
STAGE2_SAMPLING = {"crt": "over", "lws": "over", "maxnorm": "none", "tau-norm": "none"}

# what a stage-2 run may set itself; every other option describes stage 1 and comes from its run
STAGE2_OPTIONS = {
    "decoupled",
    "from_run",
    "stage2_epochs",
    "stage2_lr",
    "stage2_weight_decay",
    "tau_norm",
    "maxnorm_thresh",
    "out",
    "run_name",
    "logger",
    "wandb_project",
    "wandb_group",
    "gpus",
    "accelerator",
    "devices",
    "nodes",
    "overwrite",
    "fast_dev_run",
    "resume",
    "extra",
}
# how stage 2 runs rather than what it learns from: the stage-1 run's value unless given here
# (data_dir: the stage-1 photos under another folder; the manifest replay checks they are the same files)
STAGE2_MAY_CHANGE = {
    "batch_size",
    "num_workers",
    "cache",
    "precision",
    "compile",
    "channels_last",
    "deterministic",
    "data_dir",
}


def stage2_epochs(cfg: RunConfig) -> int:
    """--stage2-epochs, by default 10 (one pass of metrics only for τ-norm, which trains nothing)."""
    if cfg.stage2_epochs is not None:
        return cfg.stage2_epochs
    return 1 if cfg.decoupled == "tau-norm" else DEFAULT_STAGE2_EPOCHS


def stage2_weight_decay(cfg: RunConfig) -> float:
    """--stage2-weight-decay, by default 0 except for MaxNorm (weight balancing's stage 2 keeps weight decay)."""
    if cfg.stage2_weight_decay is not None:
        return cfg.stage2_weight_decay
    return cfg.weight_decay if cfg.decoupled == "maxnorm" else 0.0


def read_stage1(run_dir: Path) -> RunConfig:
    """The configuration of the finished stage-1 run in `run_dir`; a ConfigError naming what is missing."""
    run_dir = Path(run_dir)
    what = f"--from-run {run_dir}"
    if not run_dir.is_dir():
        raise ConfigError(f"{what} is not a folder; give the folder of a finished run (it holds summary.json)")
    for name in ("config.json", "manifest.json", "summary.json", "checkpoints/last.ckpt"):
        if not (run_dir / name).is_file():
            hint = "it has not finished; let it finish, or --resume it" if name == "summary.json" else "is it a run?"
            raise ConfigError(f"{what} has no {name}: {hint}")
    try:
        stage1 = RunConfig.from_stored(json.loads((run_dir / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as error:
        raise ConfigError(f"{what}: cannot read its config.json ({error})") from error
    if stage1.decoupled is not None:
        raise ConfigError(
            f"{what} is itself a decoupled stage-2 run (--decoupled {stage1.decoupled}); give its stage-1 "
            f"run ({stage1.from_run})"
        )
    return stage1


def stage2_config(cfg: RunConfig, stage1: RunConfig, given: set[str] | None = None) -> RunConfig:
    """The stage-2 run's configuration: the stage-1 run's options (model, data, split, seed, stage-1 loss and
    schedule, as it stored them) with this run's stage-2, output and hardware options (`STAGE2_OPTIONS`), and
    the batch size and loader settings of `STAGE2_MAY_CHANGE` where given. An
    option given here that contradicts the stage-1 run is an error naming both (`given`: the options the
    user set; None: every option that differs from its default)."""
    given, conflicts = contradictions(cfg, stage1, given, STAGE2_OPTIONS | STAGE2_MAY_CHANGE, "the stage-1 run")
    if conflicts:
        raise ConfigError(
            f"--from-run {cfg.from_run}: stage 2 keeps the stage-1 run's model, data and split, but "
            + "; ".join(conflicts)
            + ". Drop those flags (stage 2's own are --stage2-epochs, --stage2-lr, --stage2-weight-decay, "
            "--tau-norm, --maxnorm-thresh)."
        )
    own = {name: getattr(cfg, name) for name in STAGE2_OPTIONS | (STAGE2_MAY_CHANGE & given)}
    from_run = Path(cfg.from_run).resolve()  # stored resolved, as data_dir: the record outlives the cwd
    if cfg.out is not None and (Path(cfg.out).resolve() == from_run or from_run in Path(cfg.out).resolve().parents):
        raise ConfigError(
            f"--out {cfg.out} is the stage-1 run --from-run {cfg.from_run} (or inside it): stage 2 would replace the "
            "run it reads; give stage 2 its own --out"
        )
    return replace(stage1, **{**own, "from_run": from_run}).validate()


def check_stage2(cfg: RunConfig, split: SplitData) -> None:
    """What only the replayed split can tell: τ-norm needs a dev split unless τ is given."""
    if cfg.decoupled == "tau-norm" and cfg.tau_norm is None and not split.dev:
        raise ConfigError(
            "--decoupled tau-norm chooses τ on the dev split, but the stage-1 run has none (--dev-fraction 0); "
            "give --tau-norm T"
        )


# ------------------------------------------------------------------------------------------ features


def pooled_features(backbone: nn.Module, images: Tensor) -> Tensor:
    """The input of the classifier head (timm's `forward_head(..., pre_logits=True)`)."""
    return backbone.forward_head(backbone.forward_features(images), pre_logits=True)


def feature_device(cfg: RunConfig) -> torch.device:
    """The device this process computes features on: its GPU under --gpus / --accelerator gpu, else the CPU."""
    wants_gpu = cfg.gpus is not None or cfg.accelerator in ("gpu", "cuda")
    if cfg.accelerator == "auto" and torch.cuda.is_available():
        wants_gpu = True
    if wants_gpu and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    dataset: Dataset,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    num_workers: int,
    device: torch.device,
) -> Tensor:
    """Pooled features of every item of `dataset` (uint8 images, normalised by `mean` and `std` on the
    device), in its order, with the backbone in evaluation mode."""
    was_training = backbone.training
    backbone.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    parts = [
        pooled_features(backbone, normalize_images(images.to(device), mean, std)).float().cpu()
        for images, _, _ in loader
    ]
    backbone.train(was_training)
    backbone.to("cpu")
    return torch.cat(parts) if parts else torch.zeros(0, backbone.num_features)


class FeatureSet(Dataset):
    """(feature vector, label, index) of one set, keyed like `ImageDataset` (an index, or (index, seed) from a
    training sampler: the seed is unused, stage 2 has no augmentation)."""

    def __init__(self, features: Tensor, items: list[tuple[str, int]]) -> None:
        self.features = features
        self.labels = [label for _, label in items]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]):
        index = key[0] if isinstance(key, tuple) else key
        return self.features[index], self.labels[index], index


class FeatureDataModule(ImbalanceDataModule):
    """`ImbalanceDataModule`'s loaders (the same exact DDP sharding, val at dataloader_idx 0 and dev at 1) over
    precomputed features instead of photos."""

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return batch  # features: nothing to normalise

    def __init__(
        self, split: SplitData, features: dict[str, Tensor], batch_size: int, sampling: str, seed: int
    ) -> None:
        import lightning as L

        L.LightningDataModule.__init__(self)
        self.split = split
        self.batch_size = batch_size
        self.sampling = sampling
        self.sampling_q = None
        self.epochs = None
        self.seed = seed
        self.num_workers = 0  # tensors in memory
        self.train_set = FeatureSet(features["train"], split.train)
        self.val_set = FeatureSet(features["val"], split.val)
        self.dev_set = FeatureSet(features["dev"], split.dev) if split.dev else None


def image_sets(cfg: RunConfig, split: SplitData, image_size: int) -> dict[str, ImageDataset]:
    """Train, dev and validation photos with the evaluation transform (no augmentation: features are
    computed once), through the decode-once cache with --cache."""
    return {
        name: evaluation_dataset(getattr(split, name), split.root, image_size, cfg.cache)
        for name in ("train", "dev", "val")
        if getattr(split, name)
    }


# ------------------------------------------------------------------------------------------ the module


def choose_tau_norm(
    weight: Tensor, bias: Tensor | None, features: Tensor, labels: Tensor, taus=TAU_NORM_GRID
) -> tuple[float, dict[str, float]]:
    """The τ of `taus` with the highest balanced accuracy (argmax of the τ-normalised logits) on (features,
    labels), the dev split's; ties go to the smaller τ (when every τ ties, τ = 0: the stage-1 weights, less
    the bias that τ-normalisation always drops).
    Returns τ and the dev balanced accuracy of every τ."""
    scores = {}
    for tau in taus:
        logits = features @ tau_normalised(weight, tau).T + (0 if bias is None else bias)
        predicted = logits.argmax(1).numpy()
        probs = predicted.astype(np.float64)  # P(positive) 1 or 0: the argmax decision at the threshold 0.5
        scores[f"{tau:g}"] = confusion_metrics(labels.numpy(), probs, 0.5)["balanced_accuracy"]
    best = max(taus, key=lambda t: (scores[f"{t:g}"], -t))
    return float(best), scores


def tau_normalised(weight: Tensor, tau: float) -> Tensor:
    """w_c / ‖w_c‖^τ for every class row c (Kang et al.'s τ-normalisation); τ = 0 leaves the weights as they are."""
    norms = weight.norm(dim=1, keepdim=True)
    return weight / norms.clamp_min(1e-12) ** tau


def maxnorm_cap(weight: Tensor, thresh: float) -> float:
    """min_c ‖w_c‖ + thresh · (max_c ‖w_c‖ − min_c ‖w_c‖): Alshammari et al.'s per-layer threshold."""
    norms = weight.detach().norm(dim=1)
    return float(norms.min() + thresh * (norms.max() - norms.min()))


@torch.no_grad()
def project_max_norm(weight: Tensor, cap: float) -> None:
    """Scale every class row whose norm exceeds `cap` back onto the sphere of radius `cap` (in place)."""
    norms = weight.norm(dim=1, keepdim=True)
    weight.mul_(torch.where(norms > cap, cap / norms.clamp_min(1e-12), torch.ones_like(norms)))


class DecoupledClassifier(ImbalanceClassifier):
    """The stage-1 network with its backbone frozen; its batches are pooled features, and only the head
    (cRT, MaxNorm) or the per-class scales (LWS) learn; τ-norm learns nothing. `forward` also takes images."""

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
        super().__init__(backbone, loss, config, class_counts, class_names, image_size, mean, std, manifest_sha256)
        cfg = RunConfig.from_dict(config)
        self.method = cfg.decoupled
        for param in self.backbone.parameters():
            param.requires_grad = False
        head = self.backbone.get_classifier()
        if not isinstance(head, nn.Linear) or head.out_features != 2:
            raise ConfigError(
                f"--decoupled {self.method}: the stage-1 network's classifier is {type(head).__name__} with "
                f"{getattr(head, 'out_features', '?')} outputs; stage 2 needs a linear two-logit head (a stage-1 "
                "--loss other than bce and sigmoid-focal)"
            )
        self.head_name = next(name for name, module in self.backbone.named_modules() if module is head)
        if self.method == "crt":  # re-initialised, with the generator the run seeded
            head.reset_parameters()
        if self.method in ("crt", "maxnorm"):
            for param in head.parameters():
                param.requires_grad = True
        self.scales = nn.Parameter(torch.ones(2)) if self.method == "lws" else None
        self.tau = cfg.tau_norm if self.method == "tau-norm" else None  # set by `choose_tau` when None
        self.tau_scores: dict[str, float] | None = None
        self.cap = None
        if self.method == "maxnorm":  # projected once before the first step too: no evaluated head exceeds the cap
            self.cap = maxnorm_cap(
                head.weight, DEFAULT_MAXNORM_THRESH if cfg.maxnorm_thresh is None else cfg.maxnorm_thresh
            )
            project_max_norm(head.weight, self.cap)
        self.stage2_lr = DEFAULT_STAGE2_LR if cfg.stage2_lr is None else cfg.stage2_lr
        self.stage2_epochs = stage2_epochs(cfg)
        self.stage2_weight_decay = stage2_weight_decay(cfg)

    @property
    def head(self) -> nn.Linear:
        return self.backbone.get_classifier()

    def effective_head(self) -> tuple[Tensor, Tensor | None]:
        """The (weight, bias) of one linear layer that gives this classifier's logits."""
        weight, bias = self.head.weight, self.head.bias
        if self.method == "lws":
            return weight * self.scales[:, None], None if bias is None else bias * self.scales
        if self.method == "tau-norm":  # the authors' code drops the bias: logits f · w_c / ‖w_c‖^τ
            return tau_normalised(weight, self.tau or 0.0), None
        return weight, bias

    def forward(self, inputs: Tensor) -> Tensor:
        # features, or images (a dataset's uint8 ones normalised as the data module would)
        features = inputs if inputs.ndim == 2 else pooled_features(self.backbone, self.normalised(inputs))
        weight, bias = self.effective_head()
        return nn.functional.linear(features, weight, bias)

    def choose_tau(self, dev_features: Tensor, dev_labels: Tensor) -> dict[str, float] | None:
        """τ-norm without --tau-norm: τ from the dev split; returns the dev balanced accuracy per τ."""
        if self.method != "tau-norm" or self.tau is not None:
            return None
        self.tau, self.tau_scores = choose_tau_norm(self.head.weight.detach(), None, dev_features, dev_labels)
        return self.tau_scores

    def describe(self) -> dict[str, Any]:
        """What stage 2 did, for summary.json."""
        cfg = self.hparams.config
        out: dict[str, Any] = {
            "method": self.method,
            "stage1_run": cfg.get("from_run"),
            "stage1_checkpoint": "checkpoints/last.ckpt of the stage-1 run",
            "features": "pooled backbone features, computed once (evaluation mode, no augmentation)",
            "sampling": {"over": "class-balanced", "none": "instance-balanced"}[STAGE2_SAMPLING[self.method]],
        }
        if self.method != "tau-norm":
            out.update(epochs=self.stage2_epochs, lr=self.stage2_lr, weight_decay=self.stage2_weight_decay)
        if self.method == "tau-norm":
            out["tau"] = self.tau
            out["tau_chosen_by"] = (
                "--tau-norm, given" if cfg.get("tau_norm") is not None else "the highest dev balanced accuracy"
            )
            out["bias"] = "dropped, as in the authors' code"
            if self.tau_scores is not None:
                out["dev_balanced_accuracy_per_tau"] = self.tau_scores
        if self.method == "maxnorm":
            out["norm_cap"] = self.cap
        return out

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.backbone.eval()  # never used on batches here, but forward on images must not update batch norm

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor | None:
        loss = super().training_step(batch, batch_idx)
        return None if self.method == "tau-norm" else loss  # τ-norm: metrics only, nothing to optimise

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.cap is not None:  # after the optimiser step: back into the norm ball
            project_max_norm(self.head.weight, self.cap)

    def optimisation(self) -> tuple[float, float, int]:
        return self.stage2_lr, self.stage2_weight_decay, self.stage2_epochs

    def warmup_epochs(self) -> int:
        # stage 2's own schedule is the cosine over --stage2-epochs alone: its configuration inherits stage 1's
        # --warmup-epochs as a record of stage 1, which may even exceed --stage2-epochs
        return 0

    def configure_optimizers(self):
        if self.method == "tau-norm":
            return None
        return super().configure_optimizers()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # fold LWS's scales and τ-norm into the head, so the checkpoint is a plain network of this repository
        state = checkpoint["state_dict"]
        weight, bias = self.effective_head()
        state[f"backbone.{self.head_name}.weight"] = weight.detach().clone()
        if self.head.bias is not None:  # τ-norm has none: a zero bias in the plain head
            folded = torch.zeros_like(self.head.bias) if bias is None else bias
            state[f"backbone.{self.head_name}.bias"] = folded.detach().clone()
        state.pop("scales", None)


def stage2_loss(cfg: RunConfig, train_counts: list[int]) -> nn.Module:
    if cfg.decoupled == "maxnorm":  # weight balancing's stage 2: the class-balanced loss
        return WeightedCrossEntropy(balanced_class_weights(train_counts).tolist())
    return CrossEntropy()


def prepare(cfg: RunConfig, split: SplitData):
    """The stage-2 module and its feature data module (the counterpart of `imbalance.train.prepare`)."""
    from imbalance.evaluate import load_checkpoint
    from imbalance.train import input_settings, say

    check_stage2(cfg, split)
    if cfg.from_run is not None:
        stage1_backbone, hparams = load_checkpoint(Path(cfg.from_run) / "checkpoints" / "last.ckpt")
        image_size, mean, std = hparams["image_size"], hparams["mean"], hparams["std"]
    else:  # --fast-dev-run of the one-command form: stage 1 wrote nothing, so a fresh network stands in
        from imbalance.model import create_backbone

        stage1_backbone = create_backbone(cfg.backbone, 2)
        image_size, mean, std = input_settings(cfg, split, stage1_backbone)
    workers = (
        cfg.num_workers if cfg.num_workers is not None else (0 if split.root is None else min(4, os.cpu_count() or 1))
    )
    device = feature_device(cfg)
    features = {
        name: extract_features(stage1_backbone, images, mean, std, max(64, cfg.batch_size), workers, device)
        for name, images in image_sets(cfg, split, image_size).items()
    }
    say(f"stage 2 ({cfg.decoupled}): features of {sum(len(f) for f in features.values())} photos computed once")
    module = DecoupledClassifier(
        stage1_backbone,
        stage2_loss(cfg, split.train_counts),
        cfg.to_dict(),
        split.train_counts,
        split.class_names,
        image_size,
        mean,
        std,
        manifest_sha256=split.manifest()["sha256"],
    )
    if split.dev:
        module.choose_tau(features["dev"], torch.tensor([label for _, label in split.dev]))
    datamodule = FeatureDataModule(split, features, cfg.batch_size, STAGE2_SAMPLING[cfg.decoupled], cfg.seed)
    return split, module, datamodule
