"""What a run writes about itself: metrics.csv (one row per epoch), summary.json (the labelled result sets),
predictions.csv and the pictures, and the two checkpoints (`best.ckpt`, `last.ckpt`). Rank 0 writes; every
rank takes part in the collectives (checkpoint saves). How a run trains lives in imbalance.train.
"""

from __future__ import annotations

import csv
import io
import platform
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_only

from imbalance.config import RunConfig
from imbalance.data import SplitData
from imbalance.io import atomic_write_json, atomic_write_text
from imbalance.metrics import best_f1_threshold, confusion_metrics
from imbalance.model import ImbalanceClassifier


def versions() -> dict[str, str]:
    import lightning
    import timm
    import torchmetrics

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "timm": timm.__version__,
        "torchmetrics": torchmetrics.__version__,
        "machine": platform.machine(),
    }


def _selection_key(epoch: int, metrics: dict[str, float]) -> tuple[float, float, int]:
    """Orders epochs by `RunRecorder.BEST_EPOCH_RULE`; a missing or NaN metric ranks lowest."""

    def value(key: str) -> float:
        number = metrics.get(key, float("nan"))
        return number if number == number else float("-inf")

    return value("val/f1"), value("val/auroc"), epoch


class RunRecorder(Checkpoint):
    """Writes metrics.csv, summary.json and predictions.csv of the run directory (rank 0 only), and saves
    `checkpoints/best.ckpt` at the epoch chosen by `BEST_EPOCH_RULE` and `checkpoints/last.ckpt` at the end
    of every training epoch.

    It is a `Checkpoint` so that Lightning calls its `on_train_epoch_end` *after* the module's (as for every
    monitoring callback): the module logs its train epoch metrics there, so an epoch's row (val and train
    columns) is complete before `last.ckpt` is written, and a resumed run keeps every column of that epoch.
    """

    BEST_EPOCH_RULE = "highest val F1; ties broken by the higher val AUROC, then by the later epoch"

    def __init__(self, run_dir: Path, cfg: RunConfig, split: SplitData, extra: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.split = split
        self.extra = extra
        self.history: list[dict[str, float]] = []
        self.pending: dict[str, float] | None = None
        self.best: dict[str, Any] | None = None
        self.best_predictions: dict[str, np.ndarray] | None = None
        self.last_predictions: dict[str, np.ndarray] | None = None  # of the last validated epoch
        self.last_epoch: int | None = None
        self.last_saved_epoch: int | None = None  # the epoch last.ckpt holds: what --resume continues from
        self.best_model_path = self.last_model_path = ""  # as Lightning's own checkpoint callbacks expose them
        self.started = time.time()
        self.previous_wall_time = 0.0  # time spent before a --resume

    # state travels in the checkpoint, so --resume continues the same history and best epoch
    def state_dict(self) -> dict[str, Any]:
        def listed(predictions: dict[str, np.ndarray] | None) -> dict[str, list] | None:
            return None if predictions is None else {k: v.tolist() for k, v in predictions.items()}

        return {
            "history": self.history,
            "pending": self.pending,
            "best": self.best,
            "best_predictions": listed(self.best_predictions),
            "last_predictions": listed(self.last_predictions),
            "last_epoch": self.last_epoch,
            "wall_time": self.previous_wall_time + time.time() - self.started,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def arrays(predictions: dict[str, list] | None) -> dict[str, np.ndarray] | None:
            return None if predictions is None else {k: np.asarray(v) for k, v in predictions.items()}

        self.history, self.pending, self.best = state["history"], state["pending"], state["best"]
        self.best_predictions = arrays(state.get("best_predictions"))
        self.last_predictions = arrays(state.get("last_predictions"))
        self.last_epoch = state.get("last_epoch")
        self.last_saved_epoch = self.history[-1]["epoch"] if self.history else None
        self.previous_wall_time = state["wall_time"]
        self.started = time.time()

    def on_fit_start(self, trainer: L.Trainer, pl_module: ImbalanceClassifier) -> None:
        logger = trainer.logger
        if logger:  # --batch-size is per device: record what one optimiser step really sees
            logger.log_hyperparams(
                {"global_batch_size": self.extra["global_batch_size"], "world_size": trainer.world_size}
            )
        if trainer.is_global_zero and type(logger).__name__ == "WandbLogger":
            # --resume reads this to continue the same W&B run
            atomic_write_text(self.run_dir / "wandb_id.txt", logger.experiment.id)

    def on_validation_end(self, trainer: L.Trainer, pl_module: ImbalanceClassifier) -> None:
        # on_validation_end, not on_validation_epoch_end: the module logs its val metrics in the latter,
        # after the callbacks' hooks of that name have run
        if trainer.sanity_checking:
            return
        epoch = trainer.current_epoch
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.pending = {"epoch": epoch, **metrics}
        predictions = pl_module.val_predictions
        if predictions is not None:
            self.last_predictions = {k: v.numpy() for k, v in predictions.items()}
        self.last_epoch = epoch
        if self.best is None or _selection_key(epoch, metrics) > _selection_key(
            self.best["epoch"], self.best["metrics"]
        ):
            self.best = {"epoch": epoch, "metrics": metrics, "rule": self.BEST_EPOCH_RULE}
            self.best_predictions = self.last_predictions
            if not trainer.fast_dev_run:  # every rank calls it (a collective); rank 0 writes the file
                self.best_model_path = str(self.run_dir / "checkpoints" / "best.ckpt")
                trainer.save_checkpoint(self.best_model_path)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: ImbalanceClassifier) -> None:
        self._complete_row(trainer)  # after the module's hook (see the class docstring)
        if not trainer.fast_dev_run:  # --resume continues from here, with this epoch's row complete
            self.last_model_path = str(self.run_dir / "checkpoints" / "last.ckpt")
            trainer.save_checkpoint(self.last_model_path)
            self.last_saved_epoch = trainer.current_epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: ImbalanceClassifier) -> None:
        self._complete_row(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: ImbalanceClassifier) -> None:
        self._complete_row(trainer)
        if trainer.is_global_zero:
            self.write_summary(trainer)

    def _complete_row(self, trainer: L.Trainer) -> None:
        if self.pending is None:
            return
        train = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith("train/") and not k.endswith("_step")
        }
        self.history.append({**self.pending, **train})
        self.pending = None
        if trainer.is_global_zero:
            self._write_metrics_csv()

    @rank_zero_only
    def _write_metrics_csv(self) -> None:
        columns = list(dict.fromkeys(k for row in self.history for k in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write_text(self.run_dir / "metrics.csv", buffer.getvalue())

    def write_summary(self, trainer: L.Trainer) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "run_dir": str(self.run_dir),
            "data": self.split.source,
            "class_names": {"negative": self.split.class_names[0], "positive": self.split.class_names[1]},
            "train_counts": dict(zip(self.split.class_names, self.split.train_counts, strict=True)),
            "val_counts": dict(zip(self.split.class_names, self.split.val_counts, strict=True)),
            "skipped_files": len(self.split.skipped),
            "epochs_completed": len(self.history),
            "best": self.best,
            "last": {"epoch": self.history[-1]["epoch"], "metrics": self.history[-1]} if self.history else None,
            "config": self.cfg.to_dict(),
            "wall_time_s": round(self.previous_wall_time + time.time() - self.started, 2),
            "versions": versions(),
            **self.extra,
        }
        if self.best is not None:
            m = self.best["metrics"]
            summary["confusion_matrix"] = {
                "rows": "true class",
                "columns": "predicted class",
                "labels": list(self.split.class_names),
                "matrix": [[m.get("val/tn"), m.get("val/fp")], [m.get("val/fn"), m.get("val/tp")]],
            }
        if self.last_predictions is not None:
            summary.update(self._thresholds())
        if self.best_predictions is not None:
            self._write_predictions()
        finite = self.best_predictions is None or bool(np.isfinite(self.best_predictions["prob"]).all())
        if not finite:
            summary["pictures"] = []  # NaN probabilities have no PR curve (then every epoch's were NaN)
        atomic_write_json(self.run_dir / "summary.json", summary)
        if self.best_predictions is not None and finite:  # pictures last: a plotting problem never costs the numbers
            summary["pictures"] = self._pictures(trainer, summary)
            atomic_write_json(self.run_dir / "summary.json", summary)
        return summary

    def _pictures(self, trainer: L.Trainer, summary: dict[str, Any]) -> list[str]:
        """PNGs in the run directory, and the same (plus interactive plots) in W&B when it is the logger."""
        from imbalance import plots
        from imbalance.data import ImageDataset

        labels, probs = self.best_predictions["label"], self.best_predictions["prob"]
        names = self.split.class_names
        m = self.best["metrics"]
        title = f"Validation, epoch {self.best['epoch']} (best val F1 {m.get('val/f1', float('nan')):.3f})"
        thresholds = {"0.5": 0.5}
        if "tuned_threshold" in summary and summary["tuned_threshold"]["epoch"] == self.best["epoch"]:
            thresholds["tuned (optimistic)"] = summary["tuned_threshold"]["threshold"]
        dataset = ImageDataset(self.split.val, self.split.root, transform=None)
        mistakes = plots.confident_mistakes(labels, probs)
        files = [
            plots.confusion_matrix_png(
                *(int(m.get(f"val/{k}", 0)) for k in ("tn", "fp", "fn", "tp")),
                names,
                self.run_dir / "confusion_matrix.png",
                title,
            ),
            plots.pr_curve_png(labels, probs, self.run_dir / "pr_curve.png", thresholds, names[1]),
            plots.curves_png(self.history, self.run_dir / "curves.png"),
            plots.mistakes_grid_png(mistakes, labels, probs, dataset.load_image, names, self.run_dir / "mistakes.png"),
        ]
        if type(trainer.logger).__name__ == "WandbLogger":
            self._log_wandb(trainer.logger.experiment, files, labels, probs, mistakes, dataset)
        return [f.name for f in files]

    def _log_wandb(self, run, files, labels, probs, mistakes, dataset) -> None:
        import wandb

        names = list(self.split.class_names)
        preds = (probs > 0.5).astype(int)
        table = wandb.Table(columns=["path", "label", "prob_positive", "image"])
        for i in mistakes:
            table.add_data(
                self.split.val[int(i)][0],
                names[int(labels[i])],
                float(probs[i]),
                wandb.Image(dataset.load_image(int(i))),
            )
        run.log(
            {
                "val/confusion_matrix": wandb.plot.confusion_matrix(
                    y_true=labels.tolist(), preds=preds.tolist(), class_names=names
                ),
                "val/pr_curve": wandb.plot.pr_curve(
                    labels.tolist(), np.stack([1 - probs, probs], axis=1).tolist(), labels=names
                ),
                "val/misclassified": table,
                **{f"pictures/{f.stem}": wandb.Image(str(f)) for f in files},
            }
        )

    def _thresholds(self) -> dict[str, Any]:
        """Metrics at 0.5, at the tuned threshold and after post-hoc logit adjustment, all computed from the
        *last* epoch's validation predictions: the model the table reports, with no selection of epochs."""
        labels, probs = self.last_predictions["label"], self.last_predictions["prob"]
        source = {"epoch": self.last_epoch, "predictions": "the last epoch's validation predictions"}
        out: dict[str, Any] = {"at_threshold_0.5": {**source, **confusion_metrics(labels, probs, 0.5)}}
        if self.cfg.tune_threshold:
            t = best_f1_threshold(labels, probs)
            out["tuned_threshold"] = {
                "note": "threshold chosen to maximise F1 on this same validation set: optimistic",
                **source,
                **confusion_metrics(labels, probs, t),
            }
        if self.cfg.posthoc_la is not None:
            counts = np.asarray(self.split.train_counts, dtype=np.float64)
            shift = self.cfg.posthoc_la * (np.log(counts[1]) - np.log(counts[0]))
            p = np.clip(probs.astype(np.float64), 1e-12, 1 - 1e-12)
            adjusted = 1 / (1 + np.exp(-(np.log(p) - np.log1p(-p) - shift)))
            out["posthoc_logit_adjusted"] = {
                "tau": self.cfg.posthoc_la,
                **source,
                **confusion_metrics(labels, adjusted, 0.5),
            }
        return out

    def _write_predictions(self) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["path", "label", "prob_positive", "prediction"])
        items = self.split.val
        for index, label, prob in zip(*(self.best_predictions[k] for k in ("index", "label", "prob")), strict=True):
            writer.writerow([items[int(index)][0], int(label), f"{float(prob):.6f}", int(prob > 0.5)])
        atomic_write_text(self.run_dir / "predictions.csv", buffer.getvalue())
