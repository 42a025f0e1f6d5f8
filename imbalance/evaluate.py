"""Evaluate a checkpoint of this repository on any supported folder (or on its run's validation split).

The run's configuration is stored in the checkpoint, so backbone, input size and normalisation are rebuilt
from it; only the data and the decision threshold are chosen here.
"""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

from imbalance.config import RunConfig
from imbalance.data import DataError, ImageDataset, SplitData, discover, load_split, make_transform, scan_images
from imbalance.io import atomic_write_json, atomic_write_text
from imbalance.losses import build_loss, positive_probability
from imbalance.metrics import confusion_metrics
from imbalance.model import create_backbone


def load_checkpoint(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained backbone (eval mode) and the module's saved hyper-parameters."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--checkpoint {path} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "hyper_parameters" not in checkpoint or "config" not in checkpoint["hyper_parameters"]:
        raise DataError(f"--checkpoint {path} was not written by this repository's training (no run config inside)")
    hparams = checkpoint["hyper_parameters"]
    cfg = RunConfig.from_dict(hparams["config"])
    loss = build_loss(cfg, hparams["class_counts"])
    backbone = create_backbone(cfg.backbone, loss.num_outputs)  # the weights come from the checkpoint below
    state = {k[len("backbone.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("backbone.")}
    backbone.load_state_dict(state)
    return backbone.eval(), hparams


def folder_items(data_dir: Path, class_names: tuple[str, str]) -> tuple[Path, list[tuple[str, int]], list]:
    """Every usable image of a folder in any supported layout, labelled by the checkpoint's class names."""
    found = discover(data_dir)
    by_lower = {c.lower(): c for c in found.files}
    missing = [c for c in class_names if c.lower() not in by_lower]
    if missing:
        raise DataError(
            f"--data-dir {data_dir} has classes {sorted(found.files)}, but the model was trained on {list(class_names)}"
        )
    all_files = [p for files in found.files.values() for p in files]
    bad = scan_images(all_files, found.root)
    items = [
        (str(p.relative_to(found.root)), label)
        for label, name in enumerate(class_names)
        for p in found.files[by_lower[name.lower()]]
        if str(p) not in bad
    ]
    return found.root, sorted(items), sorted(bad.items())


@torch.no_grad()
def predict(
    backbone: torch.nn.Module, dataset: ImageDataset, batch_size: int = 128, num_workers: int = 0
) -> np.ndarray:
    """P(positive) for every item of `dataset`, in order."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = backbone.to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    probs = [positive_probability(backbone(images.to(device))).cpu() for images, _, _ in loader]
    return torch.cat(probs).numpy() if probs else np.zeros(0)


def bootstrap_f1(labels: np.ndarray, probs: np.ndarray, threshold: float, rounds: int, seed: int) -> dict[str, float]:
    """Percentile 95% interval of F1 over `rounds` resamples of the evaluated images (with replacement)."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    pred = probs > threshold
    scores = np.empty(rounds)
    for i in range(rounds):
        idx = rng.integers(0, n, n)
        y, p = labels[idx] == 1, pred[idx]
        tp = np.sum(y & p)
        denom = 2 * tp + np.sum(~y & p) + np.sum(y & ~p)
        scores[i] = 2 * tp / denom if denom else 0.0
    low, high = np.percentile(scores, [2.5, 97.5])
    return {"low": float(low), "high": float(high), "rounds": rounds, "seed": seed}


def evaluate(
    checkpoint: Path,
    out: Path,
    data_dir: Path | None = None,
    threshold: float | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int = 128,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Write metrics.json and predictions.csv for `checkpoint` on `data_dir` (default: its run's val split)."""
    backbone, hparams = load_checkpoint(checkpoint)
    cfg = RunConfig.from_dict(hparams["config"])
    class_names = tuple(hparams["class_names"])
    if data_dir is None:
        split: SplitData = load_split(replace(cfg, fast_dev_run=False))
        root, items, skipped, source = (
            split.root,
            split.val,
            split.skipped,
            f"validation split of the run ({split.source})",
        )
    else:
        root, items, skipped = folder_items(Path(data_dir), class_names)
        source = str(data_dir)
    if not items:
        raise DataError(f"no usable images to evaluate in {data_dir}")
    transform = make_transform(
        hparams["image_size"], hparams["mean"], hparams["std"], train=False, photos=root is not None
    )
    dataset = ImageDataset(items, root, transform)
    probs = predict(backbone, dataset, batch_size, num_workers)
    labels = np.array([label for _, label in items])

    probs_t, labels_t = torch.from_numpy(probs), torch.from_numpy(labels)
    both_classes = 0 < labels.sum() < len(labels)
    metrics: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "data": source,
        "class_names": {"negative": class_names[0], "positive": class_names[1]},
        "images": len(items),
        "skipped_files": len(skipped),
        "at_threshold_0.5": confusion_metrics(labels, probs, 0.5),
        "average_precision": float(binary_average_precision(probs_t, labels_t)) if both_classes else None,
        "auroc": float(binary_auroc(probs_t, labels_t)) if both_classes else None,
    }
    if bootstrap:
        metrics["at_threshold_0.5"]["f1_ci95"] = bootstrap_f1(labels, probs, 0.5, bootstrap, seed)
    if threshold is not None:
        metrics["at_threshold"] = confusion_metrics(labels, probs, threshold)
        if bootstrap:
            metrics["at_threshold"]["f1_ci95"] = bootstrap_f1(labels, probs, threshold, bootstrap, seed)
    decision = 0.5 if threshold is None else threshold
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "label", "prob_positive", "prediction"])
    for (path, label), prob in zip(items, probs, strict=True):
        writer.writerow([path, label, f"{prob:.6f}", int(prob > decision)])
    out = Path(out)
    atomic_write_text(out / "predictions.csv", buffer.getvalue())
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
