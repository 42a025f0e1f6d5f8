"""The one typed configuration of a run.

`RunConfig` is what `experiments.run` builds from its flags and what every part of the library reads.
`RunConfig.validate()` rejects unknown values and contradictory combinations with a message that names the
flag, so a typo never silently trains the wrong thing.

Conventions used everywhere:
- label 1 is the positive class (cat by default), label 0 the negative one;
- comma lists on the command line (`--class-weights`, `--alpha`, `--train-counts`) are given in the
  lecture's order: positive first, then negative ("6,0.55" means 6 for cats, 0.55 for dogs).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPLIT_PRESETS: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    # name: ((train positive, train negative), (val positive, val negative)), as in the lecture.
    "balanced": ((11000, 11000), (1500, 1500)),
    "imbalanced-1": ((1000, 11000), (1500, 1500)),
    "imbalanced-2": ((500, 11000), (1500, 1500)),
    "intro-balanced": ((6000, 6000), (1500, 1500)),
}

LOGGERS = ("wandb", "csv", "tensorboard", "none")
SAMPLING = ("none", "over", "under", "sqrt", "progressive")
# photos' training augmentation (imbalance.data.make_transform): the random crop and flip, or TrivialAugment after them
AUGMENTS = ("crop-flip", "trivial")
DEFAULT_CROP_SCALE = 0.5  # RandomResizedCrop(scale=(0.5, 1.0)): the training crop before --crop-scale existed
DECOUPLED = ("crt", "tau-norm", "lws", "maxnorm")  # stage-2 methods of imbalance.decoupled
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
# what Lightning's Trainer(precision=...) accepts (its short aliases included), transformer-engine aside
PRECISIONS = ("32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "16-true", "bf16-true", "64-true", "64")
MAX_SEED = 2**32 - 1  # numpy's and Lightning's seed range


PATH_FIELDS = ("data_dir", "manifest", "weights", "out", "autobalance_params", "from_run")


def comparable(values: dict[str, Any]) -> dict[str, Any]:
    """`RunConfig.to_dict()` values with the paths resolved, so that `data`, `./data` and `/abs/data` (the form
    a run stores) compare equal when a resume or the case study checks a configuration against a stored one."""
    return {k: str(Path(v).resolve()) if k in PATH_FIELDS and v is not None else v for k, v in values.items()}


def option_text(value: Any) -> str:
    """An option's value as a command line would spell it ('6,0.55' for a list, 'unset' for None)."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return "unset" if value is None else str(value)


def contradictions(
    asked: RunConfig,
    stored: RunConfig,
    given: Iterable[str] | None,
    may_differ: Iterable[str],
    holder: str = "the run",
) -> tuple[set[str], list[str]]:
    """The options given in `asked` (None: every one that differs from its default) and, for each given one
    outside `may_differ` whose value differs from `stored` (paths compared resolved), a line naming both:
    "--lr 0.5 (the run has 0.001)". What --resume and a decoupled stage 2 check against the stored run."""
    defaults, wanted, kept = RunConfig().to_dict(), comparable(asked.to_dict()), comparable(stored.to_dict())
    if given is None:
        given = {name for name, value in asked.to_dict().items() if value != defaults[name]}
    given = set(given)
    lines = [
        f"--{name.replace('_', '-')} {option_text(wanted[name])} ({holder} has {option_text(kept[name])})"
        for name in sorted(given - set(may_differ) - {"extra"})
        if wanted[name] != kept[name]
    ]
    return given, lines


# options of earlier versions that no longer exist; a stored config holding them still loads
# (tune_threshold: a run now always reports its dev-tuned threshold)
RETIRED_KEYS = ("tune_threshold",)


class ConfigError(ValueError):
    """An option is unknown, out of range or contradicts another one."""


@dataclass
class RunConfig:
    # data
    data_dir: Path | None = None
    positive_class: str = "cat"
    split: str | None = None
    train_counts: tuple[int, int] | None = None
    val_counts: tuple[int, int] | None = None
    scale: float = 1.0
    dev_fraction: float = 0.1  # of each training class, held out for every decision (imbalance.data)
    manifest: Path | None = None
    image_size: int | None = None
    cache: bool = False
    num_workers: int | None = None
    augment: str = "crop-flip"  # photos' training augmentation, one of AUGMENTS
    crop_scale: float = DEFAULT_CROP_SCALE  # the smallest share of a photo's area the random training crop keeps
    # model
    backbone: str = "resnet18"
    pretrained: bool = False
    weights: Path | None = None
    freeze_backbone: bool = False
    # loss and remedies
    loss: str = "ce"
    label_smoothing: float = 0.0
    gamma: float | None = None
    alpha: tuple[float, ...] | None = None
    class_weights: tuple[float, ...] | None = None
    pos_weight: float | None = None
    beta: float = 0.9999
    cb_base: str = "ce"
    ldam_max_margin: float = 0.5
    ldam_scale: float = 1.0
    drw_epoch: int | None = None
    tau: float = 1.0
    sampling: str = "none"
    sampling_q: float | None = None  # --sampling sqrt: p_c ∝ n_c^q; None: q = 1/2
    autobalance_params: Path | None = None
    autobalance_init: str = "logit-adjusted"
    autobalance_search_epochs: int | None = None
    autobalance_lr: float = 0.05
    autobalance_objective: str = "balanced-ce"
    posthoc_la: float | None = None  # a fixed post-hoc tau; None: tau is tuned on the dev split
    # decoupled stage 2 (imbalance.decoupled): a new classifier on the frozen features of a stage-1 run
    decoupled: str | None = None  # crt | tau-norm | lws | maxnorm
    from_run: Path | None = None  # the finished stage-1 run; None: stage 1 trains first, in <out>/stage1
    stage2_epochs: int | None = None  # None: 10 (τ-norm: 1, it trains nothing)
    stage2_lr: float | None = None  # None: 0.01
    stage2_weight_decay: float | None = None  # None: 0, and --weight-decay for maxnorm
    tau_norm: float | None = None  # τ of --decoupled tau-norm; None: chosen on the dev split
    maxnorm_thresh: float | None = None  # --decoupled maxnorm's cap, between the smallest and largest norm; None: 0.1
    # optimisation
    batch_size: int = 64
    epochs: int = 10
    warmup_epochs: int = 0  # linear warm-up epochs before the cosine (stage 2 of --decoupled has none)
    lr: float = 1e-3
    weight_decay: float = 0.05
    seed: int = 0
    precision: str | None = None
    channels_last: bool | None = None  # None: on for GPUs, off on CPUs unless asked (measure it: benchmark)
    compile: bool = False
    deterministic: bool = False
    # hardware
    gpus: int | None = None
    accelerator: str = "auto"
    devices: int | None = None
    nodes: int = 1
    # logging and output
    logger: str = "wandb"
    wandb_project: str = "imbalance"
    wandb_group: str | None = None
    run_name: str | None = None
    out: Path | None = None
    resume: bool = False
    overwrite: bool = False  # clear a finished or started run in the folder first
    fast_dev_run: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> RunConfig:
        """Check every option on its own and against the others; return self for chaining."""
        from imbalance.losses import LOSSES  # late import: losses import torch, config must stay light

        def fail(message: str) -> None:
            raise ConfigError(message)

        # Every float option, and every float of a tuple option, must be a finite number. NaN compares false
        # with everything, so it would slip through each range check below (`nan < 0` is False).
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            numbers = value if isinstance(value, tuple) else (value,)
            floats = [v for v in numbers if isinstance(v, float)]
            if any(not math.isfinite(v) for v in floats):
                shown = ",".join(map(str, numbers))
                fail(f"--{f.name.replace('_', '-')} must be a finite number, got {shown}")

        if self.loss not in LOSSES:
            fail(f"--loss {self.loss!r} is unknown; choose one of: {', '.join(LOSSES)}")
        if self.logger not in LOGGERS:
            fail(f"--logger {self.logger!r} is unknown; choose one of: {', '.join(LOGGERS)}")
        if self.sampling not in SAMPLING:
            fail(f"--sampling {self.sampling!r} is unknown; choose one of: {', '.join(SAMPLING)}")
        if self.sampling_q is not None and self.sampling != "sqrt":
            fail(f"--sampling-q is the exponent of --sampling sqrt, but --sampling is {self.sampling!r}")
        if self.sampling_q is not None and not 0 <= self.sampling_q <= 1:
            fail(f"--sampling-q must be in [0, 1] (1: instance-balanced, 0: class-balanced), got {self.sampling_q}")
        if self.accelerator not in ACCELERATORS:
            fail(f"--accelerator {self.accelerator!r} is unknown; choose one of: {', '.join(ACCELERATORS)}")
        if self.split is not None and self.split not in SPLIT_PRESETS:
            fail(f"--split {self.split!r} is unknown; choose one of: {', '.join(SPLIT_PRESETS)}")
        for name in ("batch_size", "epochs", "nodes"):
            if getattr(self, name) < 1:
                fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_epochs < self.epochs:
            # at least one epoch must be left to the cosine, which starts at the full --lr
            fail(
                f"--warmup-epochs must be in [0, --epochs), got --warmup-epochs {self.warmup_epochs} with "
                f"--epochs {self.epochs}"
            )
        if self.lr <= 0:
            fail(f"--lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            fail(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.seed <= MAX_SEED:
            fail(f"--seed must be in [0, {MAX_SEED}], got {self.seed}")
        if self.precision is not None and self.precision not in PRECISIONS:
            fail(f"--precision {self.precision!r} is not one Lightning accepts; choose one of: {', '.join(PRECISIONS)}")
        if not 0 < self.scale <= 1:
            fail(f"--scale must be in (0, 1], got {self.scale}")
        if not 0 <= self.dev_fraction <= 0.5:
            fail(f"--dev-fraction must be in [0, 0.5] (0: no dev split), got {self.dev_fraction}")
        if self.posthoc_la is not None and self.posthoc_la < 0:
            fail(f"--posthoc-la must be >= 0, got {self.posthoc_la}")
        if self.image_size is not None and self.image_size < 8:
            fail(f"--image-size must be at least 8 pixels, got {self.image_size}")
        if not 0 <= self.label_smoothing < 1:
            fail(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.num_workers is not None and self.num_workers < 0:
            fail(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.augment not in AUGMENTS:
            fail(f"--augment {self.augment!r} is unknown; choose one of: {', '.join(AUGMENTS)}")
        if not 0 < self.crop_scale <= 1:
            fail(
                f"--crop-scale must be in (0, 1] (the smallest share of the photo a crop keeps), got {self.crop_scale}"
            )

        # hardware: --gpus is the lecture's shorthand, --accelerator/--devices the general form
        if self.gpus is not None:
            if self.gpus < 1:
                fail(f"--gpus must be at least 1, got {self.gpus}")
            if self.devices is not None:
                fail("--gpus N and --devices N both set the number of devices; give only one of them")
            if self.accelerator not in ("auto", "gpu", "cuda"):
                fail(f"--gpus asks for GPUs but --accelerator is {self.accelerator!r}; drop one of them")
        if self.devices is not None and self.devices < 1:
            fail(f"--devices must be at least 1, got {self.devices}")

        # model
        if self.pretrained and self.weights is not None:
            fail("--pretrained and --weights both choose the starting weights; give only one of them")
        if self.freeze_backbone and not (self.pretrained or self.weights is not None):
            fail("--freeze-backbone trains only the head on a random backbone; add --pretrained or --weights")

        # data
        # --manifest needs no --data-dir: the manifest says where its data is (a folder, or the embedded digits)
        if self.manifest is not None and (self.split or self.train_counts or self.val_counts or self.scale != 1):
            fail("--manifest replays a saved split exactly; drop --split/--train-counts/--val-counts/--scale")
        if self.data_dir is None and (self.split or self.train_counts or self.val_counts):
            fail(
                "--split, --train-counts and --val-counts choose photos from --data-dir; "
                "the embedded digits data set has its own fixed split. Add --data-dir DIR."
            )
        if self.cache and self.data_dir is None and self.manifest is None:
            fail(
                "--cache decodes photos once; the embedded digits are already in memory. Drop --cache or add --data-dir."
            )
        # a resumed run and a stage 2 use the stored run's data, checked when it started; a --manifest of the
        # digits is refused where its split is known (imbalance.data.ImbalanceDataModule)
        digits = self.data_dir is None and self.manifest is None and not self.resume and self.from_run is None
        if digits and self.augment != "crop-flip":
            fail(
                f"--augment {self.augment} augments photos; the embedded digits have their own augmentation (no "
                "crop, no flip). Drop --augment or add --data-dir DIR (photos)."
            )
        if digits and self.crop_scale != DEFAULT_CROP_SCALE:
            fail(
                f"--crop-scale {self.crop_scale} sets the random crop of photos; the embedded digits are not cropped. "
                "Drop --crop-scale or add --data-dir DIR (photos)."
            )
        if self.split is not None and (self.train_counts or self.val_counts):
            fail("--split and --train-counts/--val-counts both set the split sizes; give only one of them")
        for name in ("train_counts", "val_counts"):
            counts = getattr(self, name)
            if counts is not None and (len(counts) != 2 or min(counts) < 1):
                fail(f"--{name.replace('_', '-')} takes two positive counts 'positive,negative', got {counts}")

        # loss-specific options must belong to the chosen loss
        focal_like = self.loss in ("focal", "sigmoid-focal") or (self.loss == "cb" and self.cb_base == "focal")
        # --loss vs reuses --gamma as the exponent of its logit scales (n_c / n_max)^gamma, the paper's name
        if self.gamma is not None and not (focal_like or self.loss == "vs"):
            fail(
                f"--gamma is a focal-loss option (and the exponent of --loss vs) but --loss is {self.loss!r}; "
                "use --loss focal or vs"
            )
        if self.gamma is not None and self.gamma < 0:
            fail(f"--gamma must be >= 0, got {self.gamma}")
        if self.alpha is not None:
            if self.loss not in ("focal", "sigmoid-focal"):
                fail(f"--alpha is a focal-loss option but --loss is {self.loss!r}; use --loss focal")
            one_in_range = len(self.alpha) == 1 and 0 <= self.alpha[0] <= 1
            two_nonnegative = len(self.alpha) == 2 and min(self.alpha) >= 0
            if not (one_in_range or two_nonnegative):
                fail(
                    f"--alpha takes one value in [0, 1] or two per-class weights 'positive,negative', got {self.alpha}"
                )
            if self.loss == "sigmoid-focal" and len(self.alpha) != 1:
                fail("--loss sigmoid-focal takes a single --alpha (the weight of the positive class)")
        if self.class_weights is not None:
            if self.loss != "weighted":
                fail(f"--class-weights needs --loss weighted, but --loss is {self.loss!r}")
            if len(self.class_weights) != 2 or min(self.class_weights) <= 0:
                fail(f"--class-weights takes two positive weights 'positive,negative', got {self.class_weights}")
        if self.pos_weight is not None and self.loss != "bce":
            fail(f"--pos-weight needs --loss bce, but --loss is {self.loss!r}")
        if self.pos_weight is not None and self.pos_weight <= 0:
            fail(f"--pos-weight must be positive, got {self.pos_weight}")
        if self.label_smoothing and self.loss not in ("ce", "weighted"):
            fail(f"--label-smoothing applies to --loss ce or weighted, not {self.loss!r}")
        if self.cb_base not in ("ce", "focal"):
            fail(f"--cb-base must be 'ce' or 'focal', got {self.cb_base!r}")
        if not 0 <= self.beta < 1:
            fail(f"--beta must be in [0, 1), got {self.beta}")
        if self.drw_epoch is not None and self.loss != "ldam":
            fail(f"--drw-epoch is the LDAM-DRW schedule; it needs --loss ldam, not {self.loss!r}")
        if self.drw_epoch is not None and self.drw_epoch < 0:
            fail(f"--drw-epoch must be >= 0 (the first epoch is 0), got {self.drw_epoch}")
        if self.ldam_max_margin <= 0:
            fail(f"--ldam-max-margin must be positive, got {self.ldam_max_margin}")
        if self.ldam_scale <= 0:
            fail(f"--ldam-scale must be positive, got {self.ldam_scale}")
        autobalance_set = (
            self.autobalance_params is not None
            or self.autobalance_search_epochs is not None
            or self.autobalance_init != "logit-adjusted"
            or self.autobalance_lr != 0.05
            or self.autobalance_objective != "balanced-ce"
        )
        if autobalance_set and self.loss != "autobalance":
            fail(f"--autobalance-* options need --loss autobalance, but --loss is {self.loss!r}")
        if self.autobalance_init not in ("ce", "logit-adjusted"):
            fail(f"--autobalance-init must be 'ce' or 'logit-adjusted', got {self.autobalance_init!r}")
        if self.autobalance_objective not in ("balanced-ce", "soft-f1"):
            fail(f"--autobalance-objective must be 'balanced-ce' or 'soft-f1', got {self.autobalance_objective!r}")
        if self.autobalance_lr <= 0:
            fail(f"--autobalance-lr must be positive, got {self.autobalance_lr}")
        if self.autobalance_search_epochs is not None and self.autobalance_search_epochs < 1:
            fail(f"--autobalance-search-epochs must be at least 1, got {self.autobalance_search_epochs}")
        if self.autobalance_params is not None and not Path(self.autobalance_params).is_file():
            fail(f"--autobalance-params {self.autobalance_params} does not exist")
        self._validate_stage2(fail)
        return self

    def _validate_stage2(self, fail) -> None:
        method = self.decoupled
        if method is not None and method not in DECOUPLED:
            fail(f"--decoupled {method!r} is unknown; choose one of: {', '.join(DECOUPLED)}")
        stage2 = ("from_run", "stage2_epochs", "stage2_lr", "stage2_weight_decay", "tau_norm", "maxnorm_thresh")
        given = [name for name in stage2 if getattr(self, name) is not None]
        if method is None and given:
            fail(f"--{given[0].replace('_', '-')} is an option of decoupled stage 2; add --decoupled METHOD")
        if method is None:
            return
        trains = ("stage2_epochs", "stage2_lr", "stage2_weight_decay")
        if method == "tau-norm" and any(getattr(self, n) is not None for n in trains):
            fail("--decoupled tau-norm trains nothing: drop --stage2-epochs, --stage2-lr and --stage2-weight-decay")
        if self.tau_norm is not None and method != "tau-norm":
            fail(f"--tau-norm is the τ of --decoupled tau-norm, but --decoupled is {method!r}")
        if self.maxnorm_thresh is not None and method != "maxnorm":
            fail(f"--maxnorm-thresh is the cap of --decoupled maxnorm, but --decoupled is {method!r}")
        if self.stage2_epochs is not None and self.stage2_epochs < 1:
            fail(f"--stage2-epochs must be at least 1, got {self.stage2_epochs}")
        if self.stage2_lr is not None and self.stage2_lr <= 0:
            fail(f"--stage2-lr must be positive, got {self.stage2_lr}")
        if self.stage2_weight_decay is not None and self.stage2_weight_decay < 0:
            fail(f"--stage2-weight-decay must be >= 0, got {self.stage2_weight_decay}")
        if self.tau_norm is not None and self.tau_norm < 0:
            fail(f"--tau-norm must be >= 0, got {self.tau_norm}")
        if self.maxnorm_thresh is not None and not 0 <= self.maxnorm_thresh <= 1:
            fail(
                f"--maxnorm-thresh must be in [0, 1] (0: every class capped at the smallest stage-1 norm, 1: at the "
                f"largest), got {self.maxnorm_thresh}"
            )
        if self.loss in ("bce", "sigmoid-focal"):
            fail(f"--decoupled {method} needs a two-logit classifier; --loss {self.loss} has one logit")
        if method == "tau-norm" and self.tau_norm is None and self.dev_fraction == 0:
            fail(
                "--decoupled tau-norm chooses τ on the dev split, but --dev-fraction is 0 (no dev split; with "
                "--from-run, the stage-1 run's); give --tau-norm T"
            )

    @property
    def gamma_or_default(self) -> float:
        return 2.0 if self.gamma is None else self.gamma

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (paths as strings), for logs, checkpoints and summary.json."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_stored(cls, values: dict[str, Any]) -> RunConfig:
        """A configuration a run stored (config.json, summary.json): `from_dict`, with the values that a run
        of an earlier version used for options it did not have yet (a run from before the dev split trained on
        its whole training split: dev_fraction 0)."""
        if isinstance(values, dict) and "dev_fraction" not in values:
            values = {**values, "dev_fraction": 0.0}
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Inverse of `to_dict`; unknown keys are an error so an old checkpoint never half-loads."""
        if not isinstance(values, dict):
            raise ConfigError(f"a run configuration must be a JSON object of options, got a {type(values).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k not in RETIRED_KEYS}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown configuration keys {unknown}; was this written by a newer version?")
        kwargs = {}
        for name, value in values.items():
            if value is not None and name in PATH_FIELDS:
                value = Path(value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[name] = value
        return cls(**kwargs)
