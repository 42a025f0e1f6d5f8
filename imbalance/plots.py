"""The run's pictures, drawn with matplotlib's Agg backend (no display needed) and written atomically."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from imbalance.io import atomic_write_bytes  # noqa: E402


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def confusion_matrix_png(
    tn: int, fp: int, fn: int, tp: int, class_names: Sequence[str], path: Path, title: str = ""
) -> Path:
    """Counts and row-normalised (recall per true class) side by side; rows true, columns predicted."""
    counts = np.array([[tn, fp], [fn, tp]], dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, matrix, fmt, name in (
        (axes[0], counts, "{:.0f}", "counts"),
        (axes[1], normalised, "{:.3f}", "row-normalised"),
    ):
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=matrix.max() or 1)
        for i in range(2):
            for j in range(2):
                color = "white" if matrix[i, j] > 0.6 * (matrix.max() or 1) else "black"
                ax.text(j, i, fmt.format(matrix[i, j]), ha="center", va="center", color=color, fontsize=12)
        ax.set_xticks([0, 1], [f"pred {c}" for c in class_names])
        ax.set_yticks([0, 1], [f"true {c}" for c in class_names])
        ax.set_title(name)
    fig.suptitle(title or "Confusion matrix (validation)")
    fig.tight_layout()
    return _save(fig, path)


def pr_curve_png(
    labels: np.ndarray,
    probs: np.ndarray,
    path: Path,
    thresholds: dict[str, float] | None = None,
    positive_name: str = "positive",
) -> Path:
    """Precision-recall curve of P(positive), with the chosen threshold(s) marked."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    labels, probs = np.asarray(labels), np.asarray(probs)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    if 0 < labels.sum() < len(labels):
        precision, recall, _ = precision_recall_curve(labels, probs)
        ap = average_precision_score(labels, probs)
        ax.plot(recall, precision, label=f"PR curve (AP {ap:.3f})")
        ax.axhline(labels.mean(), color="gray", ls=":", label=f"chance (prevalence {labels.mean():.3f})")
        for (name, t), marker in zip((thresholds or {"0.5": 0.5}).items(), "os^v", strict=False):
            pred = probs > t
            tp = np.sum(pred & (labels == 1))
            p_at = tp / pred.sum() if pred.sum() else 1.0
            r_at = tp / labels.sum()
            ax.plot(r_at, p_at, marker, ms=9, label=f"threshold {name} = {t:.3f}: P {p_at:.2f}, R {r_at:.2f}")
    else:
        ax.text(0.5, 0.5, "only one class in the labels:\nno PR curve", ha="center", va="center")
    ax.set_xlabel(f"recall ({positive_name})")
    ax.set_ylabel(f"precision ({positive_name})")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return _save(fig, path)


def curves_png(history: list[dict[str, float]], path: Path) -> Path:
    """F1, precision and recall of the positive class per epoch: val (solid), dev (dotted), train (dashed)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    epochs = [row["epoch"] for row in history]
    for metric, color in (("f1", "C0"), ("precision", "C1"), ("recall", "C2")):
        for stage, style in (("val", "-"), ("dev", ":"), ("train", "--")):
            values = [row.get(f"{stage}/{metric}", np.nan) for row in history]
            if all(v != v for v in values):  # no dev split
                continue
            ax.plot(epochs, values, style, color=color, marker="o", ms=3, label=f"{stage} {metric}")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, ncol=3)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def confident_mistakes(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5, limit: int = 16) -> np.ndarray:
    """Indices of the misclassified samples, most confident first (largest |P(positive) - label|)."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    wrong = np.flatnonzero((probs > threshold).astype(int) != labels)
    confidence = np.abs(probs[wrong] - labels[wrong])
    return wrong[np.argsort(-confidence, kind="stable")][:limit]


def mistakes_grid_png(
    indices: Sequence[int],
    labels: np.ndarray,
    probs: np.ndarray,
    load_image: Callable[[int], Image.Image],
    class_names: Sequence[str],
    path: Path,
) -> Path:
    """A grid of images with their true class and P(positive)."""
    n = max(1, len(indices))
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, indices, strict=False):
        ax.imshow(load_image(int(i)))
        ax.set_title(f"true {class_names[int(labels[i])]}\nP({class_names[1]}) = {probs[i]:.3f}", fontsize=8)
    if not len(indices):
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    fig.suptitle("Most confident mistakes (validation)")
    fig.tight_layout()
    return _save(fig, path)
