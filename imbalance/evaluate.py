"""Evaluate a checkpoint of this repository on any supported folder (or on its run's validation split).

The run's configuration is stored in the checkpoint, so backbone, input size and normalisation are rebuilt
from it, and the number of outputs from its weights: nothing else the training run wrote is needed, except
the run's manifest.json when its validation split is evaluated (replayed exactly, never re-drawn), and for
the decisions: the dev split listed in that manifest is scored too, and the threshold and post-hoc tau are
chosen on it (`imbalance.metrics.dev_decisions`), as is the temperature of the calibration block and of
reliability.png (`imbalance.calibration`, Guo et al. 2017), never on the evaluated images.
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from imbalance.calibration import apply_temperature, calibration_block, reliability_diagram_png
from imbalance.config import RunConfig
from imbalance.data import (
    DataError,
    ImageDataset,
    discover,
    make_transform,
    manifest_digest,
    normalize_images,
    read_manifest,
    scan_images,
    split_from_manifest,
)
from imbalance.io import atomic_write_json, atomic_write_text
from imbalance.losses import positive_probability
from imbalance.metrics import dev_decisions, scored_metrics
from imbalance.model import create_backbone

REQUIRED_HPARAMS = ("config", "class_names", "image_size", "mean", "std")


def _one_line(error: BaseException, limit: int = 300) -> str:
    """An exception as one short line (torch's messages run over several)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's dict, or a DataError naming the file: missing, unreadable, or not one of ours."""
    if not path.is_file():
        state = "is a folder, not a .ckpt file" if path.is_dir() else "does not exist"
        raise DataError(f"--checkpoint {path} {state}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # weights_only: no pickled code
    except Exception as error:  # truncated, not a torch file, or pickled objects other than tensors
        raise DataError(
            f"--checkpoint {path} cannot be read as a PyTorch checkpoint ({type(error).__name__}: "
            f"{_one_line(error)}); give a .ckpt written by experiments.run"
        ) from error
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if (
        not isinstance(hparams, dict)
        or not isinstance(hparams.get("config"), dict)
        or any(key not in hparams for key in REQUIRED_HPARAMS)
        or not isinstance(checkpoint.get("state_dict"), dict)
    ):
        raise DataError(f"--checkpoint {path} was not written by this repository's training (no run config inside)")
    return checkpoint


def head_outputs(state: dict[str, torch.Tensor], backbone: torch.nn.Module, path: Path) -> int:
    """How many logits the checkpoint's classifier head has (1 for the one-logit losses, else 2), read from
    its weights: rebuilding the loss to learn it would need files of the training run (AutoBalance's
    parameter file), which a moved run folder or another working directory no longer has."""
    head = backbone.get_classifier()
    name = next(n for n, module in backbone.named_modules() if module is head)
    weight = state.get(f"{name}.weight")
    if weight is None or weight.ndim == 0:
        raise DataError(f"--checkpoint {path} has no classifier head ({name}.weight) for its backbone; is it complete?")
    return int(weight.shape[0])


def load_checkpoint(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained backbone (eval mode) and the module's saved hyper-parameters; needs only the file."""
    path = Path(path)
    checkpoint = read_checkpoint(path)
    hparams = checkpoint["hyper_parameters"]
    cfg = RunConfig.from_dict(hparams["config"])
    state = {k[len("backbone.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("backbone.")}
    backbone = create_backbone(cfg.backbone, 2)  # the weights come from the checkpoint below
    outputs = head_outputs(state, backbone, path)
    if outputs != 2:
        backbone = create_backbone(cfg.backbone, outputs)
    try:
        backbone.load_state_dict(state)
    except RuntimeError as error:
        raise DataError(f"--checkpoint {path} does not fit backbone {cfg.backbone!r}: {_one_line(error)}") from error
    return backbone.eval(), hparams


def folder_items(data_dir: Path, class_names: tuple[str, str]) -> tuple[Path, list[tuple[str, int]], list, str]:
    """Every usable image of a folder in any supported layout, labelled by the checkpoint's class names,
    and a line saying what was evaluated. Of a pre-split folder only the validation part: its train/ part
    is what such a model was trained on."""
    found = discover(data_dir)
    files, source = found.files, str(data_dir)
    if found.presplit is not None:
        files = found.presplit["val"]
        part = next(p for paths in files.values() for p in paths).parent.parent.name  # validation/ or val/
        source = f"{part}/ part of pre-split folder {found.root}"
    by_lower = {c.lower(): c for c in files}
    missing = [c for c in class_names if c.lower() not in by_lower]
    if missing:
        raise DataError(
            f"--data-dir {data_dir} has classes {sorted(files)}, but the model was trained on {list(class_names)}"
        )
    all_files = [p for paths in files.values() for p in paths]
    bad = scan_images(all_files, found.root)
    items = [
        (str(p.relative_to(found.root)), label)
        for label, name in enumerate(class_names)
        for p in files[by_lower[name.lower()]]
        if str(p) not in bad
    ]
    skipped = sorted((str(Path(p).relative_to(found.root)), reason) for p, reason in bad.items())
    return found.root, sorted(items), skipped, source


def run_manifest(checkpoint: Path, hparams: dict[str, Any], manifest: Path | None) -> tuple[Path, dict, str]:
    """(path, checked contents, how errors name it) of the manifest the checkpoint was trained on: `manifest`,
    or by default `run_dir/manifest.json` next to `run_dir/checkpoints/`. Its sha256 must be the one in the
    checkpoint."""
    if manifest is None:
        path, what = Path(checkpoint).parent.parent / "manifest.json", "the run's manifest"
        if Path(checkpoint).parent.name != "checkpoints" or not path.is_file():  # not inside a run folder
            raise DataError(
                f"--checkpoint {checkpoint} is not RUN/checkpoints/*.ckpt of a run folder holding RUN/manifest.json, "
                "so its validation split is unknown; pass --manifest FILE (the run's manifest.json), or --data-dir DIR to evaluate a folder"
            )
    else:
        path, what = Path(manifest), "--manifest"
    content = read_manifest(path, what)
    expected = hparams.get("manifest_sha256")
    if expected is None:
        print(
            f"note: {checkpoint} predates manifest hashes, so {path} is replayed without checking that it is "
            "the split the checkpoint was trained on",
            file=sys.stderr,
        )
    elif (actual := manifest_digest(content, content["version"])) != expected:  # the hash of the run's own version
        raise DataError(
            f"{what} {path} (sha256 {actual[:12]}) is not the split this checkpoint was trained on "
            f"(sha256 {expected[:12]}); pass that run's manifest.json, or --data-dir DIR to evaluate a folder"
        )
    return path, content, what


def manifest_items(
    found: tuple[Path, dict, str], hparams: dict[str, Any], data_dir: Path | None
) -> tuple[Path | None, list[tuple[str, int]], list, str]:
    """The run's validation split, replayed from its manifest (`found`: what `run_manifest` returned), never
    re-drawn from the folder: a folder that changed since training would move training photos into the
    evaluated set. Its validation files must still be there and decode."""
    path, content, what = found
    split = split_from_manifest(path, content, data_dir, parts=("val",), what=what)
    if tuple(split.class_names) != tuple(hparams["class_names"]):
        raise DataError(
            f"{what} {path} has classes {list(split.class_names)}, but the checkpoint was trained on "
            f"{list(hparams['class_names'])}"
        )
    return split.root, split.val, split.skipped, f"validation split of the run ({split.source})"


@torch.no_grad()
def predict(
    backbone: torch.nn.Module,
    dataset: ImageDataset,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 128,
    num_workers: int = 0,
) -> np.ndarray:
    """P(positive) for every item of `dataset` (uint8 images, normalised by `mean` and `std` on the device), in
    order."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = backbone.to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    probs = [
        positive_probability(backbone(normalize_images(images.to(device), mean, std))).cpu() for images, _, _ in loader
    ]
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


def dev_predictions(
    backbone: torch.nn.Module,
    found: tuple[Path, dict, str] | DataError,
    hparams: dict[str, Any],
    data_dir: Path | None,
    batch_size: int,
    num_workers: int,
) -> tuple[dict[str, np.ndarray] | None, str]:
    """The model's predictions on its run's dev split ({"label", "prob"}), or None and why there are none
    (`found`, the run's manifest, is the error that kept it from being found; or the run had no dev split):
    then nothing is tuned."""
    if isinstance(found, DataError):
        return None, f"no dev split to tune on ({found})"
    path, content, what = found
    if not content.get("dev"):
        return None, f"no dev split to tune on: {path} lists none (the run had --dev-fraction 0)"
    split = split_from_manifest(path, content, data_dir, parts=("dev",), what=what)
    transform = make_transform(hparams["image_size"], train=False, photos=split.root is not None)
    dataset = ImageDataset(split.dev, split.root, transform)
    probs = predict(backbone, dataset, hparams["mean"], hparams["std"], batch_size, num_workers)
    return {"label": np.array([label for _, label in split.dev]), "prob": probs}, f"the dev split of {path}"


def evaluate(
    checkpoint: Path,
    out: Path,
    data_dir: Path | None = None,
    threshold: float | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int = 128,
    num_workers: int = 0,
    manifest: Path | None = None,
) -> dict[str, Any]:
    """Write metrics.json, predictions.csv and reliability.png for `checkpoint` on `data_dir`, or (by default,
    or with `manifest`) on its run's validation split; `manifest` with `data_dir` replays it under that folder.

    `results` holds the metrics at 0.5, at the threshold tuned on the run's dev split (F1 with the dev samples
    weighted to the evaluated set's class prior), after post-hoc logit adjustment with the dev-tuned tau (or
    the run's fixed --posthoc-la), and at `threshold` when given; each says what chose it. `calibration`
    holds the temperature fitted on the run's dev split (None without one) and the evaluated images' NLL,
    ECE and Brier scores before and after it; reliability.png draws the same."""
    backbone, hparams = load_checkpoint(checkpoint)
    class_names = tuple(hparams["class_names"])
    evaluates_folder = data_dir is not None and manifest is None
    try:
        found: tuple[Path, dict, str] | DataError = run_manifest(Path(checkpoint), hparams, manifest)
    except DataError as error:  # needed for the run's own validation split; else only for the dev split
        if not evaluates_folder:
            raise
        found = error
    if evaluates_folder:
        root, items, skipped, source = folder_items(Path(data_dir), class_names)
    else:
        root, items, skipped, source = manifest_items(found, hparams, data_dir)
    if not items:
        raise DataError(f"no usable images to evaluate ({source})")
    transform = make_transform(hparams["image_size"], train=False, photos=root is not None)
    dataset = ImageDataset(items, root, transform)
    probs = predict(backbone, dataset, hparams["mean"], hparams["std"], batch_size, num_workers)
    labels = np.array([label for _, label in items])
    # the dev split lives where the run's manifest says (a --data-dir given to evaluate a folder is not it)
    dev, dev_source = dev_predictions(
        backbone, found, hparams, None if evaluates_folder else data_dir, batch_size, num_workers
    )
    cfg = hparams["config"]
    target = "the evaluated images" if evaluates_folder else "the validation set"
    rules = dev_decisions({"label": labels}, dev, list(hparams["class_counts"]), cfg.get("posthoc_la"), target)
    chosen = [
        ("threshold_0.5", "threshold 0.5", "nothing: the default threshold 0.5", 0.5, {}),
        *(
            (name, f"{label} ({dev_source})", rules[name]["chosen_by"], rules[name]["threshold"], rules[name])
            for name, label in (
                ("dev_tuned_threshold", "dev-tuned threshold"),
                ("posthoc_la", "post-hoc logit adjustment"),
            )
            if name in rules
        ),
    ]
    if threshold is not None:
        chosen.append(("given_threshold", f"threshold {threshold:g}", "--threshold, given by the user", threshold, {}))
    results: dict[str, Any] = {}
    for name, label, rule, t, extra in chosen:
        results[name] = {
            "label": label,
            "chosen_by": rule,
            **{k: v for k, v in extra.items() if k not in ("threshold", "chosen_by")},
            **scored_metrics(labels, probs, t),
        }
        if bootstrap:
            results[name]["f1_ci95"] = bootstrap_f1(labels, probs.astype(np.float64), t, bootstrap, seed)
    metrics: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "data": source,
        "class_names": {"negative": class_names[0], "positive": class_names[1]},
        "images": len(items),
        "skipped_files": len(skipped),
        "dev": dev_source if dev is not None else None,
        "results": results,
        "calibration": calibration_block(dev, {"evaluated": {"label": labels, "prob": probs}}, dev_source),
    }
    if dev is None:
        metrics["note"] = dev_source
    elif evaluates_folder:  # the run's own photos: scoring them again scores what it trained and tuned on
        path, content, _ = found  # type: ignore[misc]
        seen = {p for p, _ in content["train"]} | {p for p, _ in content["dev"]}
        reused = sum(p in seen for p, _ in items)
        if reused and Path(content["root"] or "").resolve() == Path(root).resolve():
            metrics["note"] = (
                f"{reused} of the {len(items)} evaluated images are the run's own training or dev photos "
                f"(listed in {path}): these numbers are not held-out; evaluate the run's validation split "
                "(no --data-dir) or a folder of new photos"
            )
    decision = 0.5 if threshold is None else threshold
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "label", "prob_positive", "prediction"])
    for (path, label), prob in zip(items, probs, strict=True):
        writer.writerow([path, label, f"{float(prob):.9g}", int(float(prob) > decision)])
    out = Path(out)
    atomic_write_text(out / "predictions.csv", buffer.getvalue())
    atomic_write_json(out / "metrics.json", metrics)
    # the picture last: a plotting problem never costs the numbers
    temperature = metrics["calibration"]["temperature"]
    scaled = temperature is not None and np.isfinite(temperature)
    fitted = f"T = {temperature:.3g} fitted on dev" if scaled else "no temperature fitted"
    reliability_diagram_png(
        labels,
        probs,
        apply_temperature(probs, temperature) if scaled else None,
        out / "reliability.png",
        temperature=temperature if scaled else None,
        title=f"{len(items)} evaluated images ({fitted})",
        positive_name=class_names[1],
    )
    return metrics
