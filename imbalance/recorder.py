"""What a run writes about itself: metrics.csv (one row per epoch), summary.json (the labelled result sets,
and the temperature scaling fitted on the dev split, Guo et al. 2017), predictions.csv and the pictures
(reliability.png among them), and the two checkpoints (`best.ckpt`, `last.ckpt`). Rank 0 writes; every rank
takes part in the collectives (checkpoint saves). How a run trains lives in imbalance.train.
"""

from __future__ import annotations

import csv
import io
import math
import platform
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_only

from imbalance.calibration import apply_temperature, calibration_block, reliability_diagram_png
from imbalance.config import RunConfig
from imbalance.data import SplitData
from imbalance.io import atomic_write_json, atomic_write_text
from imbalance.metrics import dev_decisions, scored_metrics
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

    return value("dev/auroc"), value("dev/balanced_accuracy"), epoch


# The four result sets a run reports, in this order: every one is measured on the validation set, and each
# says what chose it; nothing is chosen on the validation set itself.
RESULT_SETS = ("last_epoch", "dev_selected_checkpoint", "dev_tuned_threshold", "posthoc_la")

# The numbers of `RunRecorder.calibration` (per set: last_epoch, dev_selected_checkpoint) that become the W&B
# run's summary, besides the temperature: `calibration/<set>/val_<metric>_<before|after>`.
CALIBRATION_SUMMARY = ("ece", "brier", "nll")


class RunRecorder(Checkpoint):
    """Writes metrics.csv, summary.json, predictions.csv and the pictures of the run directory (rank 0 only),
    and saves `checkpoints/best.ckpt` at the epoch chosen on the dev split by `BEST_EPOCH_RULE` (not with
    --dev-fraction 0: then no epoch is chosen) and `checkpoints/last.ckpt` at the end of every training epoch.

    It is a `Checkpoint` so that Lightning calls its `on_train_epoch_end` *after* the module's (as for every
    monitoring callback): the module logs its train epoch metrics there, so an epoch's row (val and train
    columns) is complete before `last.ckpt` is written, and a resumed run keeps every column of that epoch.
    """

    # an all-positive (or all-negative) model has dev AUROC 0.5 and balanced accuracy 0.5: it cannot win
    BEST_EPOCH_RULE = "highest dev AUROC; ties broken by the higher dev balanced accuracy, then by the later epoch"

    def __init__(self, run_dir: Path, cfg: RunConfig, split: SplitData, extra: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.split = split
        self.extra = extra
        self.history: list[dict[str, float]] = []
        self.pending: dict[str, float] | None = None
        self.best: dict[str, Any] | None = None
        # {"val": {index, label, prob}, "dev": ...} of the dev-selected epoch and of the last validated epoch
        self.best_predictions: dict[str, dict[str, np.ndarray]] | None = None
        self.last_predictions: dict[str, dict[str, np.ndarray]] | None = None
        self.last_epoch: int | None = None
        self.last_saved_epoch: int | None = None  # the epoch last.ckpt holds: what --resume continues from
        self.best_model_path = self.last_model_path = ""  # as Lightning's own checkpoint callbacks expose them
        self.started = time.time()
        self.previous_wall_time = 0.0  # time spent before a --resume

    # state travels in the checkpoint, so --resume continues the same history and best epoch
    def state_dict(self) -> dict[str, Any]:
        def listed(predictions: dict[str, dict[str, np.ndarray]] | None) -> dict | None:
            if predictions is None:
                return None
            return {stage: {k: v.tolist() for k, v in p.items()} for stage, p in predictions.items()}

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
        def arrays(predictions: dict | None) -> dict[str, dict[str, np.ndarray]] | None:
            if predictions is None:
                return None
            if "prob" in predictions:  # a run from before the dev split kept its val predictions alone
                predictions = {"val": predictions}
            return {stage: {k: np.asarray(v) for k, v in p.items()} for stage, p in predictions.items()}

        self.history, self.pending, self.best = state["history"], state["pending"], state["best"]
        self.best_predictions = arrays(state.get("best_predictions"))
        self.last_predictions = arrays(state.get("last_predictions"))
        if self.best is not None and "dev" not in (self.best_predictions or {}):
            # chosen without a dev split (by an earlier version, on val F1): not a dev-selected epoch
            self.best, self.best_predictions = None, None
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
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "dev/"))}
        self.pending = {"epoch": epoch, **metrics}
        predictions = {
            stage: {k: v.numpy() for k, v in found.items()}
            for stage in ("val", "dev")
            if (found := getattr(pl_module, f"{stage}_predictions", None)) is not None
        }
        if predictions:
            self.last_predictions = predictions
        self.last_epoch = epoch
        if not self.split.dev:  # --dev-fraction 0: no data to choose an epoch on, so none is chosen
            return
        if self.best is None or _selection_key(epoch, metrics) > _selection_key(
            self.best["epoch"], self.best["metrics"]
        ):
            self.best = {"epoch": epoch, "metrics": metrics, "rule": self.BEST_EPOCH_RULE}
            self.best_predictions = self.last_predictions
            if not trainer.fast_dev_run:  # every rank calls it (a collective); rank 0 writes the file
                self.best_model_path = str(self.run_dir / "checkpoints" / "best.ckpt")
                trainer.save_checkpoint(self.best_model_path, weights_only=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: ImbalanceClassifier) -> None:
        self._complete_row(trainer)  # after the module's hook (see the class docstring)
        if not trainer.fast_dev_run:  # --resume continues from here, with this epoch's row complete
            self.last_model_path = str(self.run_dir / "checkpoints" / "last.ckpt")
            trainer.save_checkpoint(self.last_model_path, weights_only=False)
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

    def results(self) -> dict[str, dict[str, Any]]:
        """The labelled result sets (`RESULT_SETS`), each measured on the validation set and chosen on dev."""
        if self.last_predictions is None or "val" not in self.last_predictions:
            return {}
        last = self.last_predictions
        val = last["val"]
        out: dict[str, dict[str, Any]] = {
            "last_epoch": {
                "label": "last epoch, threshold 0.5",
                "chosen_by": "nothing: the last epoch's model at the default threshold 0.5",
                "epoch": self.last_epoch,
                "predictions": "prob_last",
                **scored_metrics(val["label"], val["prob"], 0.5),
            }
        }
        if self.best is not None and self.best_predictions is not None:
            best_val = self.best_predictions["val"]
            out["dev_selected_checkpoint"] = {
                "label": "dev-selected epoch (best.ckpt), threshold 0.5",
                "chosen_by": f"the epoch of the {self.BEST_EPOCH_RULE}",
                "epoch": self.best["epoch"],
                "predictions": "prob_dev_selected",
                **scored_metrics(best_val["label"], best_val["prob"], 0.5),
            }
        rules = dev_decisions(val, last.get("dev"), self.split.train_counts, self.cfg.posthoc_la)
        labels = {
            "dev_tuned_threshold": "last epoch, dev-tuned threshold",
            "posthoc_la": "last epoch, post-hoc logit adjustment",
        }
        for name in ("dev_tuned_threshold", "posthoc_la"):
            if name in rules:
                rule = rules[name]
                out[name] = {
                    "label": labels[name] + (f" (tau {rule['tau']:g})" if "tau" in rule else ""),
                    **{k: v for k, v in rule.items() if k != "threshold"},
                    "epoch": self.last_epoch,
                    "predictions": "prob_last",
                    **scored_metrics(val["label"], val["prob"], rule["threshold"]),
                }
        return out

    def calibration(self) -> dict[str, dict[str, Any]]:
        """Temperature scaling (Guo et al. 2017) of the last epoch's and of the dev-selected epoch's model:
        per result set ("last_epoch", "dev_selected_checkpoint"), the temperature fitted on that epoch's dev
        predictions and the NLL, ECE and Brier scores before and after it, on val and on dev
        (`calibration.calibration_block`). Without a dev split nothing is fitted: the temperature is None and
        val has "before" only; with non-finite dev probabilities it is NaN, and "before" only too."""
        chosen = {"last_epoch": self.last_predictions}
        if self.best is not None and self.best_predictions is not None:
            chosen["dev_selected_checkpoint"] = self.best_predictions
        return {
            name: calibration_block(
                predictions.get("dev"), {s: predictions[s] for s in ("val", "dev") if s in predictions}
            )
            for name, predictions in chosen.items()
            if predictions is not None and "val" in predictions
        }

    def write_summary(self, trainer: L.Trainer) -> dict[str, Any]:
        results = self.results()
        calibration = self.calibration()
        summary: dict[str, Any] = {
            "run_dir": str(self.run_dir),
            "data": self.split.source,
            "class_names": {"negative": self.split.class_names[0], "positive": self.split.class_names[1]},
            "train_counts": dict(zip(self.split.class_names, self.split.train_counts, strict=True)),
            "dev_counts": dict(zip(self.split.class_names, self.split.dev_counts, strict=True)),
            "val_counts": dict(zip(self.split.class_names, self.split.val_counts, strict=True)),
            "protocol": (
                "every decision (best.ckpt's epoch, the threshold, the post-hoc tau) is made on the dev split, "
                "carved from the training data; the validation set is only reported"
                if self.split.dev
                else "--dev-fraction 0: no dev split, so nothing is chosen (no best epoch, no tuned threshold)"
            ),
            "skipped_files": len(self.split.skipped),
            "epochs_completed": len(self.history),
            "results": results,
            "calibration": calibration,
            "best": self.best,
            "last": {"epoch": self.history[-1]["epoch"], "metrics": self.history[-1]} if self.history else None,
            "config": self.cfg.to_dict(),
            "wall_time_s": round(self.previous_wall_time + time.time() - self.started, 2),
            "versions": versions(),
            **self.extra,
        }
        if "last_epoch" in results:
            r = results["last_epoch"]
            summary["confusion_matrix"] = {
                "of": r["label"],
                "rows": "true class",
                "columns": "predicted class",
                "labels": list(self.split.class_names),
                "matrix": [[r["tn"], r["fp"]], [r["fn"], r["tp"]]],
            }
        if self.last_predictions is not None and "val" in self.last_predictions:
            self._write_predictions()
        probs = (
            self.last_predictions["val"]["prob"] if self.last_predictions and "val" in self.last_predictions else None
        )
        finite = probs is not None and bool(np.isfinite(probs).all())
        summary["pictures"] = []  # NaN probabilities have no PR curve
        atomic_write_json(self.run_dir / "summary.json", summary)
        if finite:  # pictures last: a plotting problem never costs the numbers
            summary["pictures"] = self._pictures(trainer, results, calibration)
            atomic_write_json(self.run_dir / "summary.json", summary)
        if type(trainer.logger).__name__ == "WandbLogger":  # the result sets as the W&B run's summary
            numbers = {f"result/{name}/{key}": value for name, r in results.items() for key, value in r.items()}
            for name, c in calibration.items():
                numbers[f"calibration/{name}/temperature"] = c["temperature"]
                for when, values in c["val"].items():  # "before", and "after" when a temperature was fitted
                    numbers.update({f"calibration/{name}/val_{k}_{when}": values[k] for k in CALIBRATION_SUMMARY})
            trainer.logger.experiment.summary.update(
                {
                    key: value
                    for key, value in numbers.items()
                    if isinstance(value, (int, float)) and not isinstance(value, bool)
                }
            )
        return summary

    def _pictures(
        self, trainer: L.Trainer, results: dict[str, dict[str, Any]], calibration: dict[str, dict[str, Any]]
    ) -> list[str]:
        """PNGs of the last epoch's model on validation (the reported model), and the same (plus interactive
        plots) in W&B when it is the logger. reliability.png: before and after the temperature fitted on the
        last epoch's dev predictions (before only when none was fitted)."""
        from imbalance import plots
        from imbalance.data import ImageDataset

        val = self.last_predictions["val"]
        labels, probs = val["label"], val["prob"]
        names = self.split.class_names
        r = results["last_epoch"]
        title = f"Validation, last epoch {self.last_epoch} at threshold 0.5 (F1 {r['f1']:.3f})"
        thresholds = {"0.5": 0.5}
        if "dev_tuned_threshold" in results:
            thresholds["dev-tuned"] = results["dev_tuned_threshold"]["threshold"]
        if "posthoc_la" in results:
            thresholds[f"post-hoc LA (tau {results['posthoc_la']['tau']:g})"] = results["posthoc_la"]["threshold"]
        dataset = ImageDataset(self.split.val, self.split.root, transform=None)
        mistakes = plots.confident_mistakes(labels, probs)
        files = [
            plots.confusion_matrix_png(
                *(int(r[k]) for k in ("tn", "fp", "fn", "tp")), names, self.run_dir / "confusion_matrix.png", title
            ),
            plots.pr_curve_png(labels, probs, self.run_dir / "pr_curve.png", thresholds, names[1]),
            plots.curves_png(self.history, self.run_dir / "curves.png"),
            plots.mistakes_grid_png(mistakes, labels, probs, dataset.load_image, names, self.run_dir / "mistakes.png"),
        ]
        temperature = calibration["last_epoch"]["temperature"]
        scaled = temperature is not None and math.isfinite(temperature)
        fitted = f"T = {temperature:.3g} fitted on dev" if scaled else "no temperature fitted"
        files.append(
            reliability_diagram_png(
                labels,
                probs,
                apply_temperature(probs, temperature) if scaled else None,
                self.run_dir / "reliability.png",
                temperature=temperature if scaled else None,
                title=f"Validation, last epoch {self.last_epoch} ({fitted})",
                positive_name=names[1],
            )
        )
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

    def _write_predictions(self) -> None:
        """predictions.csv: per validation photo, P(positive) of the last epoch and of the dev-selected one
        (sorted by path, the order of the split; the case study bootstraps over these rows)."""
        last = self.last_predictions["val"]
        columns = {"prob_last": last["prob"]}
        if self.best_predictions is not None:
            columns["prob_dev_selected"] = self.best_predictions["val"]["prob"]
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["path", "label", *columns])
        items = self.split.val
        for row, (index, label) in enumerate(zip(last["index"], last["label"], strict=True)):
            writer.writerow([items[int(index)][0], int(label), *(f"{float(c[row]):.9g}" for c in columns.values())])
        atomic_write_text(self.run_dir / "predictions.csv", buffer.getvalue())
