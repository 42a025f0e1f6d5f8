"""One training run, from a `RunConfig` to a run directory:

    runs/<run-name>/
        config.json       the resolved configuration
        manifest.json     the exact train/dev/val file lists (replay with --manifest)
        skipped.csv       files the integrity scan rejected, with the reason
        metrics.csv       one row per epoch: train/*, dev/* and val/* metrics
        summary.json      the result sets on validation, each chosen on the dev split (imbalance.recorder)
        predictions.csv   P(positive) of every validation photo: last epoch and dev-selected epoch
        checkpoints/      best.ckpt (the dev-selected epoch, RunRecorder.BEST_EPOCH_RULE), last.ckpt (each epoch)
        .lock             while the run lives: its pid and host (imbalance.io.RunLock)

Only global rank 0 writes files (and holds the lock); under DDP the other ranks train and compute metrics
with it. A folder that holds a run is reused only with --resume or --overwrite; a run that fails before its
first completed epoch removes what it wrote (`fit`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pickle
import shutil
import signal
import sys
import threading
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from imbalance.allocator import keep_freed_memory
from imbalance.config import ConfigError, RunConfig, contradictions, option_text
from imbalance.data import ImbalanceDataModule, SplitData, default_image_size, load_manifest, load_split
from imbalance.decoupled import stage2_epochs
from imbalance.io import RunDirLocked, RunLock, atomic_write_json, atomic_write_text
from imbalance.losses import build_loss
from imbalance.model import ImbalanceClassifier, NonFiniteLossError, create_backbone
from imbalance.recorder import RunRecorder

FAST_DEV_RUN_PREFIX = "imbalance-fast-dev-run-"
STAGE1_SUFFIX = "-stage1"  # the run name of the stage 1 that `--decoupled` without --from-run trains first
RUN_NAME_ENV = "IMBALANCE_RUN_NAME"  # hands the parent's run name to the DDP worker processes it starts


def say(message: str) -> None:
    """One line for the user, printed by rank 0 only."""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
        print(f"[imbalance] {message}", flush=True)


def hardware(cfg: RunConfig) -> dict[str, Any]:
    """Trainer arguments for --gpus / --accelerator / --devices / --nodes."""
    if cfg.gpus is not None:
        available = torch.cuda.device_count()
        if available < cfg.gpus:
            raise ConfigError(
                f"--gpus {cfg.gpus} asks for {cfg.gpus} GPU(s) but this machine has {available}. "
                f"To run the same {cfg.gpus}-process DDP on CPU processes, use --accelerator cpu --devices {cfg.gpus}."
            )
        accelerator, devices = "gpu", cfg.gpus
    else:
        accelerator, devices = cfg.accelerator, cfg.devices or 1
    if accelerator in ("gpu", "cuda") and cfg.gpus is None and torch.cuda.device_count() < devices:
        raise ConfigError(
            f"--accelerator {accelerator} --devices {devices}: this machine has "
            f"{torch.cuda.device_count()} GPU(s); use --accelerator cpu --devices {devices}"
        )
    distributed = devices * cfg.nodes > 1
    return {
        "accelerator": accelerator,
        "devices": devices,
        "num_nodes": cfg.nodes,
        "strategy": "ddp" if distributed else "auto",
    }


def stage2_hardware(cfg: RunConfig, hw: dict[str, Any]) -> dict[str, Any]:
    """`hw`, except that --decoupled tau-norm runs in one process: it trains nothing, and DDP refuses a module
    without a parameter to train ("DistributedDataParallel is not needed ...")."""
    if cfg.decoupled == "tau-norm" and hw["devices"] * hw["num_nodes"] > 1:
        say("--decoupled tau-norm trains nothing: it runs in one process")
        return {**hw, "devices": 1, "num_nodes": 1, "strategy": "auto"}
    return hw


def default_precision(accelerator: str) -> str:
    # bf16 autocast pays off on GPUs with bf16 tensor cores; on CPUs without native bf16 it is many times slower
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def resolve_run(cfg: RunConfig) -> tuple[str, Path]:
    """The run's name and directory, the same in every DDP process."""
    if cfg.resume:
        if cfg.out is None and cfg.run_name is None:
            raise ConfigError("--resume needs the run to continue: give its --out DIR or --run-name NAME")
        run_dir = cfg.out or Path("runs") / cfg.run_name  # type: ignore[operator]
        if not (run_dir / "checkpoints" / "last.ckpt").is_file():
            raise ConfigError(f"--resume: {run_dir / 'checkpoints' / 'last.ckpt'} does not exist; nothing to resume")
        return cfg.run_name or run_dir.name, run_dir
    name = cfg.run_name or os.environ.get(RUN_NAME_ENV)
    if name is not None and cfg.decoupled and cfg.from_run is None:  # a DDP worker started by its stage 1
        name = name.removesuffix(STAGE1_SUFFIX)
    if name is None:
        data = "digits" if cfg.data_dir is None else (cfg.split or "all")
        name = f"{cfg.loss}-{cfg.backbone}-{data}-seed{cfg.seed}-{datetime.now():%Y%m%d-%H%M%S}"
    return name, cfg.out or Path("runs") / name


# what a resumed run may change: where it runs and how long; anything else would make the finished run a mix
RESUME_MAY_CHANGE = {"resume", "overwrite", "out", "run_name", "epochs", "num_workers"}


def resumed_config(cfg: RunConfig, given: Iterable[str] | None = None) -> RunConfig:
    """The configuration of the run `--resume` continues: its stored config.json, not today's flags.

    `given` names the options the user set (experiments.run passes the flags on its command line; without it,
    every option that differs from its default counts as given). One that contradicts the stored value is an
    error naming both; `--epochs` may grow, and where the run lives and its loader workers may change.
    """
    _, run_dir = resolve_run(cfg)
    stored_file = run_dir / "config.json"
    try:
        stored = RunConfig.from_stored(json.loads(stored_file.read_text()))
    except (OSError, json.JSONDecodeError, ConfigError, TypeError) as error:
        raise ConfigError(f"--resume: cannot read the run's configuration {stored_file} ({error})") from error
    given, conflicts = contradictions(cfg, stored, given, RESUME_MAY_CHANGE)
    if conflicts:
        raise ConfigError(
            f"--resume continues {run_dir} with the configuration in {stored_file}, but "
            + "; ".join(conflicts)
            + ". Drop those flags to resume, or start a new run in another --out."
        )
    epochs = cfg.epochs if "epochs" in set(given) else stored.epochs
    if epochs < stored.epochs:
        raise ConfigError(
            f"--resume: --epochs {epochs} is fewer than the run's {stored.epochs}; --epochs may only grow"
        )
    num_workers = cfg.num_workers if "num_workers" in set(given) else stored.num_workers
    return replace(stored, resume=True, overwrite=False, out=run_dir, epochs=epochs, num_workers=num_workers)


def wandb_mode() -> str:
    """'online' when W&B credentials exist (or WANDB_MODE says so), else 'offline'."""
    if os.environ.get("WANDB_MODE"):  # Lightning's offline WandbLogger sets "dryrun", wandb's old name for offline
        return "offline" if os.environ["WANDB_MODE"] == "dryrun" else os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "online" if "api.wandb.ai" in netrc.read_text() else "offline"
    except OSError:
        return "offline"


def make_logger(cfg: RunConfig, run_name: str, run_dir: Path):
    if cfg.logger == "none" or cfg.fast_dev_run:
        return False
    if cfg.logger == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=run_dir, name="csv", version="")
    if cfg.logger == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=run_dir, name="tensorboard", version="")
    from lightning.pytorch.loggers import WandbLogger

    mode = wandb_mode()
    id_file = run_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if cfg.resume and id_file.is_file() else None
    logger = WandbLogger(
        project=cfg.wandb_project,
        name=run_name,
        save_dir=str(run_dir),
        id=run_id,
        offline=mode == "offline",
        mode=mode if mode == "disabled" else None,
        resume="allow" if run_id else None,
        group=cfg.wandb_group,
    )
    if mode == "offline":
        say(f"W&B is offline (no credentials found); upload later with: wandb sync {run_dir}/wandb/offline-run-*")
    return logger


def _normalisation(backbone) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std of the backbone's timm data config (ImageNet's by default)."""
    data_cfg = backbone.pretrained_cfg
    return tuple(data_cfg.get("mean", (0.485, 0.456, 0.406))), tuple(data_cfg.get("std", (0.229, 0.224, 0.225)))


def _num_workers(cfg: RunConfig, split: SplitData) -> int:
    if cfg.num_workers is not None:
        return cfg.num_workers
    return 0 if split.root is None else min(8, os.cpu_count() or 1)  # the digits live in memory


def input_settings(cfg: RunConfig, split: SplitData, backbone) -> tuple[int, tuple, tuple]:
    """The input size and the normalisation (mean, std) a run feeds its backbone."""
    return (cfg.image_size or default_image_size(split), *_normalisation(backbone))


def make_datamodule(datamodule_class, cfg: RunConfig, split: SplitData, backbone, epochs: int, cache: bool = False):
    """The run's data module (`ImbalanceDataModule`, or AutoBalance's `SearchDataModule`) over `split`, with
    `epochs` as the schedule of --sampling progressive and the run's --augment and --crop-scale (so the search
    trains on the batches its retrain will see)."""
    image_size, mean, std = input_settings(cfg, split, backbone)
    return datamodule_class(
        split,
        image_size,
        mean,
        std,
        cfg.batch_size,
        cfg.sampling,
        cfg.seed,
        _num_workers(cfg, split),
        cache,
        sampling_q=cfg.sampling_q,
        epochs=epochs,
        augment=cfg.augment,
        crop_scale=cfg.crop_scale,
    )


def prepare(cfg: RunConfig, split: SplitData | None = None):
    """Everything before the Trainer: the split, the loss, the backbone, the data module and the module."""
    split = load_split(cfg) if split is None else split
    if cfg.decoupled is not None:  # stage 2 on a stage-1 run's frozen features
        from imbalance.decoupled import prepare as prepare_stage2

        return prepare_stage2(cfg, split)
    say(
        f"data: {split.source}; train {split.train_counts[1]} {split.class_names[1]} / {split.train_counts[0]} "
        f"{split.class_names[0]}, dev {split.dev_counts[1]} / {split.dev_counts[0]}, "
        f"val {split.val_counts[1]} / {split.val_counts[0]}"
        + (f"; {len(split.skipped)} unusable files skipped" if split.skipped else "")
    )
    try:
        loss = build_loss(cfg, split.train_counts)
    except ValueError as error:  # an option the loss rejects for this split (e.g. an empty class)
        raise ConfigError(str(error)) from error
    backbone = create_backbone(cfg.backbone, loss.num_outputs, cfg.pretrained, cfg.weights)
    image_size, mean, std = input_settings(cfg, split, backbone)
    datamodule = make_datamodule(ImbalanceDataModule, cfg, split, backbone, cfg.epochs, cache=cfg.cache)

    module = ImbalanceClassifier(
        backbone,
        loss,
        cfg.to_dict(),
        split.train_counts,
        split.class_names,
        image_size,
        mean,
        std,
        manifest_sha256=split.manifest()["sha256"],  # evaluation replays exactly this split
    )
    if cfg.compile:
        module.backbone.compile()  # in place: the state dict keeps the backbone's own parameter names
    return split, module, datamodule


def _trainer_options(cfg: RunConfig, hw: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    return dict(
        precision=cfg.precision or default_precision(hw["accelerator"]),
        deterministic="warn" if cfg.deterministic else None,
        default_root_dir=run_dir,
        fast_dev_run=cfg.fast_dev_run,
        use_distributed_sampler=False,  # our samplers shard exactly (see imbalance.sampling)
        log_every_n_steps=10,
        enable_model_summary=False,
        enable_progress_bar=sys.stderr.isatty(),  # a progress bar in a log file is megabytes of noise
        benchmark=True if torch.cuda.is_available() and hw["accelerator"] != "cpu" else None,  # cudnn autotune
        **hw,
    )


class RunError(RuntimeError):
    """The run cannot start or continue in its folder (owned by another run, already holds a run, bad
    checkpoint); the message says what to do."""


class RunInterrupted(RunError):
    """The run was stopped by a signal before it finished; `exit_code` is the shell's 128 + signal number."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# What `--overwrite` clears: every file or folder a run of this repository writes in its directory. Anything
# else in the folder (a case study's run.log, the user's notes) is left alone.
RUN_FILES = (
    "config.json",
    "manifest.json",
    "skipped.csv",
    "metrics.csv",
    "summary.json",
    "predictions.csv",
    "checkpoints",
    "confusion_matrix.png",
    "pr_curve.png",
    "curves.png",
    "mistakes.png",
    "reliability.png",
    "wandb",
    "wandb_id.txt",
    "csv",
    "tensorboard",
    "lightning_logs",
    "search",
    "autobalance_params.json",
    "autobalance_trajectory.png",
)
RUN_FILE_PATTERNS = ("hpc_ckpt_*.ckpt", ".*.tmp")  # SLURM requeue checkpoints; temporary files of a killed write
RUN_LOCK_ENV = "IMBALANCE_RUN_LOCK"  # "<pid>:<run dir>" of the process holding the lock, for its DDP workers


def _run_entries(run_dir: Path) -> list[Path]:
    found = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    return found + [p for pattern in RUN_FILE_PATTERNS for p in sorted(run_dir.glob(pattern))]


def existing_run(run_dir: Path) -> str | None:
    """What the folder already holds ('a finished run', ...), or None when it holds no run."""
    if (run_dir / "summary.json").is_file():
        return "a finished run (summary.json)"
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        return "a stopped run (checkpoints/last.ckpt)"
    if (run_dir / "config.json").exists() or (run_dir / "checkpoints").exists():
        return "a started run that completed no epoch (config.json, no checkpoints/last.ckpt)"
    return None


def owns_run_dir(run_dir: Path) -> bool:
    """Whether this process owns the run folder: the launching rank 0, not one of the DDP processes that
    Lightning (or torchrun, SLURM) starts, which re-run the same command line on a folder rank 0 owns."""
    holder = os.environ.get(RUN_LOCK_ENV, "")
    pid, _, locked_dir = holder.partition(":")
    if pid.isdigit() and int(pid) != os.getpid() and locked_dir == str(run_dir.resolve()):
        return False  # started by the process that holds this folder's lock
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool, locked: bool = False) -> None:
    """Refuse, before anything is written, a folder another run holds, or one that holds a run this one would
    overwrite without --overwrite or --resume (read-only; repeated with `locked` under the lock we hold)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"--out {run_dir} is a file, not a folder; choose another --out")
    holder = None if locked else RunLock(run_dir).held_by_other()
    if holder is not None:
        raise RunError(
            f"{run_dir} is in use by another run ({RunLock.describe(holder)}); wait for it to end or choose "
            "another --out"
        )
    held = existing_run(run_dir)
    if held is not None and not resume and not overwrite:
        hint = "--resume continues it (--epochs may grow), " if "completed no epoch" not in held else ""
        raise RunError(
            f"{run_dir} already holds {held}; {hint}--overwrite replaces it (its files are deleted first), "
            "or choose another --out"
        )


class _RunDir:
    """The run folder's owner (rank 0): takes its lock, clears it for --overwrite, and on a failure before the
    run's first completed epoch removes what the run created (the folder too, when the run made it and nothing
    else is left in it), so a failed start never leaves a half-made run behind. Always releases the lock."""

    def __init__(self, run_dir: Path, owner: bool, resume: bool, overwrite: bool) -> None:
        self.run_dir, self.owner, self.resume, self.overwrite = run_dir, owner, resume, overwrite
        self.lock = RunLock(run_dir)
        self.created = False
        self.kept: set[str] | None = None  # the folder's entries before this run wrote anything

    def take(self) -> None:
        if not self.owner or self.lock.held:
            return
        self.created = not self.run_dir.exists()
        try:
            note = self.lock.acquire()
        except RunDirLocked as error:
            raise RunError(str(error)) from None
        if note:
            say(note)
        try:
            check_run_dir(self.run_dir, self.resume, self.overwrite, locked=True)  # again: no run can start now
        except RunError:  # another run finished here meanwhile: leave its files, free the lock
            self.lock.release()
            if self.created:
                with contextlib.suppress(OSError):
                    self.run_dir.rmdir()
            raise
        if self.overwrite and existing_run(self.run_dir) is not None:
            for entry in _run_entries(self.run_dir):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            say(f"--overwrite: deleted the earlier run's files in {self.run_dir}")
        self.kept = {p.name for p in self.run_dir.iterdir()}
        os.environ[RUN_LOCK_ENV] = f"{os.getpid()}:{self.run_dir.resolve()}"

    def release(self, failed: bool) -> bool:
        """Free the lock; after a failure with nothing to resume, remove the run's files. True if removed."""
        if not self.lock.held:
            return False
        removed = False
        try:
            if failed and not self.resume and self.kept is not None:
                for entry in self.run_dir.iterdir():
                    if entry.name not in self.kept and entry.name != RunLock.NAME:
                        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
                removed = True
        finally:
            self.lock.release()
            os.environ.pop(RUN_LOCK_ENV, None)
        if removed and self.created:
            with contextlib.suppress(OSError):  # not empty: something else lives there
                self.run_dir.rmdir()
        return removed


class _StopSignals:
    """SIGTERM handling for the life of a run. Inside `trainer.fit` Lightning's own handler stops the loops at
    the next step and raises `SIGTERMException` (ours only notes the signal); outside it, ours raises that
    exception at once, so the run always ends through its clean-up (lock freed, nothing half-made left)."""

    def __init__(self) -> None:
        self.inside_lightning = False
        self.received = False
        self.previous: Any = None
        self.previous_sigint: Any = None
        self.installed = False

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous_sigint = signal.getsignal(signal.SIGINT)
            self.previous = signal.signal(signal.SIGTERM, self._handler)
            self.installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.installed:  # Lightning ignores SIGINT for good once it caught a Ctrl-C: give it back too
            signal.signal(signal.SIGTERM, self.previous)
            signal.signal(signal.SIGINT, self.previous_sigint)

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = True
        if not self.inside_lightning:
            raise SIGTERMException

    def fit(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        """`trainer.fit`, with Lightning's exit on Ctrl-C (its `sys.exit(1)`) turned back into KeyboardInterrupt.

        Ours hands SIGTERM over to Lightning only at `on_train_start`: Lightning installs its handler inside
        `fit`, after `on_fit_start`; a signal before that point, if only noted, would be lost and the run would
        train to the end and exit 0."""
        signals = self

        class HandOver(Callback):
            def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
                signals.inside_lightning = True

        trainer.callbacks.append(HandOver())
        try:
            trainer.fit(*args, **kwargs)
        except SystemExit as stop:
            if isinstance(stop, SIGTERMException) or not trainer.interrupted:
                raise
            raise KeyboardInterrupt from None  # Lightning caught a Ctrl-C, tore down and called sys.exit(1)
        finally:
            self.inside_lightning = False


def check_optimiser(cfg: RunConfig) -> None:
    """Build the run's optimisers on a dummy parameter: a value they reject fails before anything is written."""
    param = torch.nn.Parameter(torch.zeros(1))
    try:
        optimizer = torch.optim.AdamW([param], lr=cfg.lr, weight_decay=cfg.weight_decay)
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.epochs))
        if cfg.loss == "autobalance":
            torch.optim.Adam([param], lr=cfg.autobalance_lr)
    except ValueError as error:
        raise ConfigError(
            f"the optimiser rejects the options (--lr {cfg.lr:g}, --weight-decay {cfg.weight_decay:g}"
            + (f", --autobalance-lr {cfg.autobalance_lr:g}" if cfg.loss == "autobalance" else "")
            + f"): {error}"
        ) from error


def _make_trainer(**options: Any) -> L.Trainer:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return L.Trainer(**options)
    except (ValueError, MisconfigurationException) as error:  # e.g. an unknown --precision
        raise ConfigError(f"Lightning rejects the options: {_one_line(error)}") from error


def _one_line(error: object, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# what every last.ckpt of this repository holds (Lightning's training state and the module's configuration)
CHECKPOINT_KEYS = ("state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks", "epoch", "hyper_parameters")


def read_resume_checkpoint(path: Path, cfg: RunConfig) -> dict[str, tuple[int, ...]]:
    """Check that `path` is a training checkpoint of this run, loaded safely (`weights_only=True`: tensors and
    plain containers, no pickled code), before Lightning gets it; return its weights' shapes (checked against
    the model by `check_checkpoint_fits`). Every problem is one `RunError` saying what the file is."""
    what = f"--resume: {path}"
    todo = "start the run again with --overwrite, or put back a good copy of that file"
    expected = "the Lightning checkpoint this repository writes at the end of every epoch"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error):  # a real pickle naming classes or functions (code on load)
            raise RunError(
                f"{what} holds pickled Python objects that a safe load (weights_only) refuses, not {expected}; {todo}"
            ) from None
        raise RunError(f"{what} is not a readable torch checkpoint ({_one_line(error)}); {todo}") from None
    except Exception as error:  # truncated zip, empty file, random bytes: torch says it in many ways
        size = path.stat().st_size if path.exists() else 0
        raise RunError(
            f"{what} ({size} bytes) is not a readable torch checkpoint, truncated or corrupt "
            f"({type(error).__name__}: {_one_line(str(error).split('. ')[0], 160)}); expected {expected}; {todo}"
        ) from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or key not in ckpt]
    if missing:
        kind = f"a {type(ckpt).__name__}" if not isinstance(ckpt, dict) else f"a dict with keys {sorted(ckpt)[:6]}"
        raise RunError(f"{what} is {kind}, not {expected} (missing {missing}); {todo}")
    config = ckpt["hyper_parameters"].get("config") if isinstance(ckpt["hyper_parameters"], dict) else None
    if not isinstance(config, dict):
        raise RunError(f"{what} has no run configuration in its hyper_parameters: not {expected}; {todo}")
    differ = [
        f"--{key.replace('_', '-')} {option_text(config.get(key))} (this run has {option_text(cfg.to_dict()[key])})"
        for key in ("backbone", "loss", "seed")
        if config.get(key) != cfg.to_dict()[key]
    ]
    if differ:
        raise RunError(f"{what} was written by another run: {'; '.join(differ)}; {todo}")
    state = ckpt["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RunError(f"{what} has no state dict of tensors: not {expected}; {todo}")
    return {k: tuple(v.shape) for k, v in state.items()}


def check_checkpoint_fits(module: ImbalanceClassifier, shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing, unexpected = sorted(set(own) - set(shapes)), sorted(set(shapes) - set(own))
    wrong = sorted(k for k in set(own) & set(shapes) if own[k] != shapes[k])
    if missing or unexpected or wrong:
        detail = (
            f"shapes differ for {wrong[:3]}"
            if wrong
            else f"missing {missing[:3]}"
            if missing
            else f"extra {unexpected[:3]}"
        )
        raise RunError(
            f"--resume: {path} does not fit this run's model ({detail}); start the run again with --overwrite"
        )


def fit(cfg: RunConfig, given: Iterable[str] | None = None) -> dict[str, Any]:
    """Train one run; return its summary (also written to summary.json on rank 0).

    With `cfg.resume`, the run continues with its stored configuration (`resumed_config`; `given` names the
    options the user set, so that one contradicting the stored run is an error).

    The folder is owned by one run at a time (`RunLock`) and is never overwritten without `cfg.overwrite`.
    Every check that can fail runs before the first file is written; a run that fails or is stopped before its
    first completed epoch leaves no files behind (`_RunDir`). A run stopped by SIGTERM or Ctrl-C raises
    `RunInterrupted` (exit code 143 or 130) saying how to resume; a non-finite training loss stops it with
    `NonFiniteLossError`.
    """
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume continues the run in its folder and --overwrite replaces it; give only one")
    if cfg.resume:
        cfg = resumed_config(cfg, given)
        if cfg.decoupled is not None:
            raise ConfigError(
                f"--resume: {cfg.out} is a decoupled stage-2 run, which retrains from its stage-1 run in little "
                f"time; start it again with: python -m experiments.run --decoupled {cfg.decoupled} --from-run "
                f"{cfg.from_run} --out {cfg.out} --overwrite"
            )
    if cfg.decoupled is not None:
        cfg = _stage2_config(cfg, given)
    cfg.validate()
    hw = stage2_hardware(cfg, hardware(cfg))
    run_name, run_dir = resolve_run(cfg)
    overwrite = cfg.overwrite
    cfg = replace(cfg, run_name=run_name, out=run_dir, overwrite=False)  # an action, not part of the run
    owner = not cfg.fast_dev_run and owns_run_dir(run_dir)
    if owner:
        check_run_dir(run_dir, cfg.resume, overwrite)
    ckpt_path = run_dir / "checkpoints" / "last.ckpt" if cfg.resume else None
    shapes = read_resume_checkpoint(ckpt_path, cfg) if ckpt_path is not None else None
    check_optimiser(cfg)
    if hw["accelerator"] == "cpu" or not torch.cuda.is_available():  # a CPU run: its steps reuse memory
        keep_freed_memory()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    logger = make_logger(cfg, run_name, run_dir)
    folder = _RunDir(run_dir, owner, cfg.resume, overwrite)
    recorder: RunRecorder | None = None
    os.environ[RUN_NAME_ENV] = run_name  # DDP workers re-run the command line: give them the same name
    failed = True
    try:
        with _StopSignals() as signals:
            if cfg.manifest is not None and given is not None and "dev_fraction" in set(given):
                raise ConfigError("--manifest replays a saved split, its dev part included; drop --dev-fraction")
            # a resumed run continues on the split it was trained on, replayed from its manifest (a folder that
            # changed since would redraw train and dev, and move photos it trained on into dev)
            if cfg.resume:
                split = load_manifest(run_dir / "manifest.json", cfg.data_dir, what="--resume: the run's manifest")
            elif cfg.from_run is not None:  # decoupled stage 2: the stage-1 run's photos, exactly
                split = load_manifest(
                    Path(cfg.from_run) / "manifest.json", cfg.data_dir, what="--from-run: the stage-1 run's manifest"
                )
            else:
                split = load_split(cfg)
            # a replayed split records the fraction it was made with (a stage 2 keeps its stage-1 run's, which a
            # manifest of an earlier version, without the field, would report as 0)
            if (cfg.manifest is not None or cfg.resume) and cfg.from_run is None:
                cfg = replace(cfg, dev_fraction=split.dev_fraction)
            if cfg.data_dir is not None:  # stored resolved: the run resumes and evaluates from any directory
                cfg = replace(cfg, data_dir=Path(cfg.data_dir).resolve())
            if split.root is not None:
                split.root = split.root.resolve()
            global_batch = cfg.batch_size * hw["devices"] * hw["num_nodes"]
            recorder = RunRecorder(run_dir, cfg, split, {"global_batch_size": global_batch})
            trainer = _make_trainer(  # a --fast-dev-run smoke test writes nothing: no recorder, no checkpoints
                max_epochs=stage2_epochs(cfg) if cfg.decoupled else cfg.epochs,
                logger=logger,
                callbacks=[] if cfg.fast_dev_run else [recorder],  # it saves best.ckpt and last.ckpt
                **_trainer_options(cfg, hw, run_dir),
            )
            if cfg.loss == "autobalance" and cfg.autobalance_params is None and cfg.decoupled is None:
                from imbalance.autobalance import run_search

                create_backbone(cfg.backbone, 2, cfg.pretrained, cfg.weights)  # --weights checked before any file
                L.seed_everything(cfg.seed, workers=True, verbose=False)  # the search starts as it always did
                folder.take()
                cfg = replace(cfg, autobalance_params=run_search(cfg, run_dir, hw, logger, signals))
                recorder.cfg = cfg
                L.seed_everything(cfg.seed, workers=True, verbose=False)  # the retrain starts as any other run
            split, module, datamodule = prepare(cfg, split)
            if cfg.decoupled is not None:
                recorder.extra["decoupled"] = module.describe()
            if shapes is not None:
                check_checkpoint_fits(module, shapes, ckpt_path)
            folder.take()
            if not cfg.fast_dev_run:
                _write_run_files(run_dir, cfg, split, manifest=not cfg.resume)  # a resumed run keeps its manifest
            say(
                f"run {run_name}: {cfg.backbone}, loss {cfg.loss}, {hw['devices'] * hw['num_nodes']} x {hw['accelerator']}, "
                f"{cfg.epochs} epochs, directory {run_dir}"
            )
            signals.fit(trainer, module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        failed = False
    except (SIGTERMException, KeyboardInterrupt) as stop:
        name, code = ("SIGTERM", 143) if isinstance(stop, SIGTERMException) else ("Ctrl-C (SIGINT)", 130)
        removed = folder.release(failed=not _completed(cfg, recorder))
        raise RunInterrupted(_stopped_message(name, cfg, recorder, removed), code) from None
    except NonFiniteLossError as error:
        removed = folder.release(failed=not _completed(cfg, recorder))
        raise NonFiniteLossError(f"{error}; {_left_behind(cfg, recorder, removed)}") from None
    finally:
        os.environ.pop(RUN_NAME_ENV, None)
        folder.release(failed=failed and not _completed(cfg, recorder))
        smoke_params = Path(cfg.autobalance_params or ".").parent
        if cfg.fast_dev_run and smoke_params.name.startswith(FAST_DEV_RUN_PREFIX):  # the smoke search's own folder
            shutil.rmtree(smoke_params, ignore_errors=True)
    if cfg.fast_dev_run or not trainer.is_global_zero:
        return {"run_dir": str(run_dir), "fast_dev_run": cfg.fast_dev_run}
    if type(trainer.logger).__name__ == "WandbLogger":
        trainer.logger.experiment.finish()  # flush and close now: the next run in this process gets its own
    summary = json.loads((run_dir / "summary.json").read_text())
    for result in summary.get("results", {}).values():
        say(
            f"val F1 {result['f1']:.4f} (precision {result['precision']:.4f}, recall {result['recall']:.4f}, "
            f"balanced accuracy {result['balanced_accuracy']:.4f}): {result['label']}"
        )
    say(f"summary: {run_dir / 'summary.json'}")
    return summary


def _stage2_config(cfg: RunConfig, given: Iterable[str] | None) -> RunConfig:
    """A `--decoupled` run's configuration: with --from-run, the stage-1 run's options and this run's stage-2
    ones (`imbalance.decoupled.stage2_config`); without it, stage 1 is trained first, in <out>/stage1."""
    from imbalance.decoupled import read_stage1, stage2_config

    given = None if given is None else set(given)
    if cfg.from_run is None:
        cfg.validate()
        run_name, run_dir = resolve_run(cfg)
        cfg = replace(cfg, run_name=run_name, out=run_dir)
        if not cfg.fast_dev_run and owns_run_dir(run_dir):  # a stage 2 it may not replace fails before stage 1
            check_run_dir(run_dir, False, cfg.overwrite)
        stage1 = replace(
            cfg,
            decoupled=None,
            stage2_epochs=None,
            stage2_lr=None,
            stage2_weight_decay=None,
            tau_norm=None,
            maxnorm_thresh=None,
            run_name=run_name + STAGE1_SUFFIX,
            out=run_dir / "stage1",
        )
        if _finished_stage1(stage1) and not cfg.overwrite:  # e.g. a stage 2 that failed: keep its stage 1
            say(f"--decoupled {cfg.decoupled}: reusing the finished stage 1 in {stage1.out}")
        else:
            say(f"--decoupled {cfg.decoupled} without --from-run: training stage 1 in {stage1.out} first")
            fit(stage1, given=None if given is None else given - {"decoupled", "out", "run_name"})
        if cfg.fast_dev_run:  # stage 1 wrote nothing: stage 2's smoke test starts from a fresh network
            return cfg
        cfg = replace(cfg, from_run=run_dir / "stage1")
        given = None if given is None else given | {"from_run"}
    return stage2_config(cfg, read_stage1(Path(cfg.from_run)), given)


def _finished_stage1(stage1: RunConfig) -> bool:
    """Whether <out>/stage1 holds a finished run of exactly this stage-1 configuration."""
    try:
        stored = RunConfig.from_stored(json.loads((Path(stage1.out) / "summary.json").read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    where = {"out", "run_name", "overwrite", "resume", "num_workers", "logger", "autobalance_params"}
    return not contradictions(stage1, stored, set(stage1.to_dict()), where)[1]


def _completed(cfg: RunConfig, recorder: RunRecorder | None) -> bool:
    """Whether the run has an epoch to resume from: a resumed run's checkpoint, or one this run saved."""
    return cfg.resume or (recorder is not None and recorder.last_saved_epoch is not None)


def _last_epoch(cfg: RunConfig, recorder: RunRecorder | None) -> str:
    epoch = recorder.last_saved_epoch if recorder is not None else None
    return f"{cfg.out / 'checkpoints' / 'last.ckpt'} keeps " + (
        f"epoch {epoch}, the last completed one" if epoch is not None else "the last completed epoch"
    )


def _left_behind(cfg: RunConfig, recorder: RunRecorder | None, removed: bool) -> str:
    if _completed(cfg, recorder):
        return _last_epoch(cfg, recorder)
    return f"no epoch had completed, so {cfg.out} was removed" if removed else "no epoch had completed"


def _stopped_message(name: str, cfg: RunConfig, recorder: RunRecorder | None, removed: bool) -> str:
    if _completed(cfg, recorder):
        return (
            f"run stopped by {name} before it finished; {_last_epoch(cfg, recorder)}; continue with: "
            f"python -m experiments.run --resume --out {cfg.out}"
        )
    gone = f", {cfg.out} was removed" if removed else ""
    return f"run stopped by {name} before its first epoch completed; nothing to resume{gone}: start it again"


@rank_zero_only
def _write_run_files(run_dir: Path, cfg: RunConfig, split: SplitData, manifest: bool = True) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", cfg.to_dict())
    if manifest:
        atomic_write_json(run_dir / "manifest.json", split.manifest())
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "reason"])
    writer.writerows(split.skipped)
    atomic_write_text(run_dir / "skipped.csv", buffer.getvalue())
