"""Train one classifier: `python -m experiments.run --loss focal [--data-dir data/PetImages] [--gpus 2]`.

This file only turns flags into a `RunConfig`; everything else is in `imbalance.train.fit`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imbalance.config import (
    ACCELERATORS,
    AUGMENTS,
    DECOUPLED,
    DEFAULT_CROP_SCALE,
    LOGGERS,
    SAMPLING,
    SPLIT_PRESETS,
    ConfigError,
    RunConfig,
)
from imbalance.losses import LOSSES


def number_list(kind: type):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(part) for part in text.split(","))
        except ValueError as error:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated numbers such as '6,0.55', got {text!r}"
            ) from error

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.run",
        description="Train a timm image classifier on imbalanced cat/dog data (or the embedded digits) and log "
        "precision, recall and F1 of the positive class every epoch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--data-dir",
        type=Path,
        help="photo folder: PetImages (Cat/, Dog/), Kaggle train/ (cat.N.jpg), "
        "cats_and_dogs/{train,validation}/ or any two-class folder. Default: data/PetImages if it exists, "
        "else the embedded digits data set",
    )
    d.add_argument("--positive-class", default="cat", help="class folder name (case-insensitive) of the positive class")
    d.add_argument(
        "--split",
        choices=list(SPLIT_PRESETS),
        help="the lecture's split sizes (cat,dog): "
        + "; ".join(f"{k} train {v[0][0]}/{v[0][1]} val {v[1][0]}/{v[1][1]}" for k, v in SPLIT_PRESETS.items())
        + ". Default: every usable image, 12%% of each class for validation",
    )
    d.add_argument("--train-counts", type=number_list(int), help="custom training counts 'positive,negative'")
    d.add_argument("--val-counts", type=number_list(int), help="custom validation counts 'positive,negative'")
    d.add_argument("--scale", type=float, default=1.0, help="multiply every split count by this, e.g. 0.25")
    d.add_argument(
        "--dev-fraction",
        type=float,
        default=0.1,
        help="share of each training class held out as the dev split (ceil(F n) of a class of n photos, so at least "
        "one per class for any F > 0; stratified, seeded, nested across presets), "
        "on which every decision is made: the best.ckpt epoch, the decision threshold (tuned for F1 with the dev "
        "photos weighted to the validation set's class prior), the post-hoc tau. The validation set is only "
        "reported. 0 trains on the lecture's exact counts and makes no dev-based decision",
    )
    d.add_argument("--manifest", type=Path, help="replay the exact split of an earlier run's manifest.json")
    d.add_argument("--image-size", type=int, help="input size in pixels (default 224 for photos, 32 for digits)")
    d.add_argument(
        "--cache",
        action="store_true",
        help="decode and resize every photo once into a memory-mapped "
        "uint8 file in $IMBALANCE_CACHE (~/.cache/imbalance), shared by all workers and ranks",
    )
    d.add_argument("--num-workers", type=int, help="data-loader processes (default: min(8, CPUs); 0 for digits)")
    d.add_argument(
        "--augment",
        default="crop-flip",
        choices=list(AUGMENTS),
        help="photos' training augmentation: a random resized crop and a horizontal flip, or (trivial) "
        "TrivialAugmentWide's one random op after them; evaluation is never augmented",
    )
    d.add_argument(
        "--crop-scale",
        type=float,
        default=DEFAULT_CROP_SCALE,
        metavar="MIN",
        help="photos' random training crop keeps a share of the area in [MIN, 1]",
    )
    m = p.add_argument_group("model")
    m.add_argument("--backbone", default="resnet18", help="vgg16, resnet18, resnet50 or any timm model name")
    m.add_argument("--pretrained", action="store_true", help="start from timm's hub weights (needs network)")
    m.add_argument(
        "--weights",
        type=Path,
        help="start from a local timm/torchvision state dict, a .safetensors file or an earlier run's "
        "runs/NAME/checkpoints/*.ckpt (its backbone); the classifier head is re-initialised",
    )
    m.add_argument("--freeze-backbone", action="store_true", help="train only the head (feature extraction)")
    lo = p.add_argument_group("loss and remedies")
    lo.add_argument("--loss", default="ce", choices=list(LOSSES), help="loss function")
    lo.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing for ce/weighted")
    lo.add_argument(
        "--gamma",
        type=float,
        help="focal loss focusing parameter (default 2); for --loss vs the exponent of the logit scales "
        "Delta_c = (n_c/n_max)^gamma (default 0.3; 0 is the logit-adjusted loss)",
    )
    lo.add_argument(
        "--alpha",
        type=number_list(float),
        help="focal loss class weight: one value = weight of the "
        "positive class (the negative gets 1-alpha), or 'positive,negative' weights",
    )
    lo.add_argument(
        "--class-weights",
        type=number_list(float),
        help="weights 'positive,negative' for --loss weighted (default: balanced, N/(K*N_c) from the training counts)",
    )
    lo.add_argument("--pos-weight", type=float, help="positive-term weight for --loss bce")
    lo.add_argument("--beta", type=float, default=0.9999, help="effective-number beta for --loss cb")
    lo.add_argument("--cb-base", default="ce", choices=["ce", "focal"], help="loss under the class-balanced weights")
    lo.add_argument("--ldam-max-margin", type=float, default=0.5, help="largest LDAM margin")
    lo.add_argument(
        "--ldam-scale", type=float, default=1.0, help="LDAM logit scale s (30 in the paper, for cosine heads)"
    )
    lo.add_argument("--drw-epoch", type=int, help="LDAM deferred re-weighting starts at this epoch")
    lo.add_argument(
        "--tau",
        type=float,
        default=1.0,
        help="temperature of --loss logit-adjusted; for --loss vs the scale of the offsets tau*log(train prior)",
    )
    lo.add_argument(
        "--sampling",
        default="none",
        choices=list(SAMPLING),
        help="resampling, redrawn every epoch from (seed, epoch): over/under balance the classes by random "
        "over/undersampling; sqrt draws class c with probability n_c^q / sum n^q (square-root sampling, q = "
        "--sampling-q); progressive moves from instance-balanced (n_c / N) at the first epoch to class-balanced "
        "(1 / classes) at the last, linearly over --epochs. sqrt and progressive keep the training set size",
    )
    lo.add_argument(
        "--sampling-q",
        type=float,
        help="--sampling sqrt: the exponent q in [0, 1] (1: instance-balanced, 0: class-balanced; default 0.5)",
    )
    lo.add_argument("--autobalance-params", type=Path, help="--loss autobalance: reuse a found loss (skip the search)")
    lo.add_argument(
        "--autobalance-init",
        default="logit-adjusted",
        choices=["ce", "logit-adjusted"],
        help="--loss autobalance: the loss the search starts from",
    )
    lo.add_argument(
        "--autobalance-search-epochs", type=int, help="--loss autobalance: search epochs (default --epochs)"
    )
    lo.add_argument(
        "--autobalance-lr", type=float, default=0.05, help="--loss autobalance: Adam step of the loss parameters"
    )
    lo.add_argument(
        "--autobalance-objective",
        default="balanced-ce",
        choices=["balanced-ce", "soft-f1"],
        help="--loss autobalance: validation objective of the search (the paper's balanced CE, or soft F1)",
    )
    lo.add_argument(
        "--posthoc-la",
        type=float,
        metavar="TAU",
        help="post-hoc logit adjustment z - TAU*log(train prior) with this fixed TAU; by default TAU is tuned on the "
        "dev split (the grid 0, 0.1, ..., 3 maximising dev balanced accuracy), and with --dev-fraction 0 and no "
        "TAU nothing is adjusted",
    )
    st = p.add_argument_group("decoupled stage 2 (a new classifier on a stage-1 run's frozen features)")
    st.add_argument(
        "--decoupled",
        choices=list(DECOUPLED),
        help="crt: re-initialise and retrain the classifier with class-balanced sampling; tau-norm: w_c/|w_c|^tau "
        "(tau chosen on dev); lws: learn one scale per class, class-balanced (Kang et al., ICLR 2020); maxnorm: "
        "fine-tune it with the class-balanced loss, weight decay and a per-class norm cap (weight balancing, "
        "Alshammari et al., CVPR 2022). The backbone's features are computed once and never change",
    )
    st.add_argument(
        "--from-run",
        type=Path,
        metavar="DIR",
        help="the finished stage-1 run (its last.ckpt, config and manifest: the same photos); without it, the other "
        "flags train stage 1 first, in <out>/stage1",
    )
    st.add_argument("--stage2-epochs", type=int, help="stage-2 epochs (default 10; tau-norm: 1, it trains nothing)")
    st.add_argument("--stage2-lr", type=float, help="stage-2 AdamW learning rate, cosine-decayed (default 0.01)")
    st.add_argument(
        "--stage2-weight-decay", type=float, help="stage-2 weight decay (default 0; maxnorm: the run's --weight-decay)"
    )
    st.add_argument("--tau-norm", type=float, metavar="TAU", help="tau-norm's fixed tau (default: chosen on dev, 0..2)")
    st.add_argument(
        "--maxnorm-thresh",
        type=float,
        help="maxnorm's cap: min norm + THRESH x (max norm - min norm) of the stage-1 class weights (default 0.1)",
    )
    o = p.add_argument_group("optimisation")
    o.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="batch size per device (the global batch is this times devices times nodes; it is logged)",
    )
    o.add_argument("--epochs", type=int, default=10)
    o.add_argument(
        "--warmup-epochs",
        type=int,
        default=0,
        metavar="N",
        help="linear warm-up: epoch e < N trains at --lr x (e+1)/(N+1), then the cosine decays over the other "
        "epochs (decoupled stage 2 has none)",
    )
    o.add_argument(
        "--lr",
        type=float,
        default=1e-3,
        help="AdamW learning rate, cosine-decayed per epoch; not scaled with the number of devices",
    )
    o.add_argument("--weight-decay", type=float, default=0.05)
    o.add_argument("--seed", type=int, default=0, help="seeds the split, the sampler and the weights")
    o.add_argument(
        "--precision", help="Lightning precision (default: bf16-mixed on GPUs that support it, else 32-true)"
    )
    o.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="NHWC memory format (default: on for GPUs, off on CPUs; experiments.benchmark measures it)",
    )
    o.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    o.add_argument("--deterministic", action="store_true", help="deterministic algorithms (warn where none exists)")
    h = p.add_argument_group("hardware")
    h.add_argument("--gpus", type=int, help="number of GPUs (DDP when more than one)")
    h.add_argument("--accelerator", default="auto", choices=list(ACCELERATORS))
    h.add_argument("--devices", type=int, help="number of devices, e.g. '--accelerator cpu --devices 2' for CPU DDP")
    h.add_argument("--nodes", type=int, default=1, help="number of machines")
    g = p.add_argument_group("logging and output")
    g.add_argument(
        "--logger",
        default="wandb",
        choices=list(LOGGERS),
        help="W&B is online with credentials, else offline; a metrics.csv is always written",
    )
    g.add_argument("--wandb-project", default="imbalance")
    g.add_argument("--wandb-group", help="W&B run group (the case study groups the seeds of a cell)")
    g.add_argument(
        "--case-study-cell",
        metavar="ID",
        help="take the flags of this cell of --grid (e.g. imbalanced-2/focal); flags given here win. "
        "This is what experiments/sweeps/case_study.yaml runs",
    )
    g.add_argument("--grid", type=Path, default=Path("experiments/case_study.yaml"), help="grid for --case-study-cell")
    g.add_argument("--run-name", help="default: <loss>-<backbone>-<split>-seed<seed>-<time>")
    g.add_argument("--out", type=Path, help="run directory (default runs/<run-name>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished or started run in --out (its files are deleted first); without it, or --resume, "
        "a folder that holds a run is an error",
    )
    g.add_argument("--fast-dev-run", action="store_true", help="one batch of train and val, nothing written")
    return p


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> RunConfig:
    values = vars(args).copy()
    cell_id, grid_file = values.pop("case_study_cell"), values.pop("grid")
    if cell_id is not None:
        from imbalance.case_study import load_grid

        grid = load_grid(grid_file)
        cells = {c.id: c for c in grid.cells}
        if cell_id not in cells or cells[cell_id].runs_of is not None:
            trained = [c.id for c in grid.cells if c.runs_of is None]
            raise ConfigError(
                f"--case-study-cell {cell_id!r} is not a trained cell of {grid_file}; choose from {trained}"
            )
        for key, value in grid.flags_of(cells[cell_id]).items():
            if values[key] == parser.get_default(key):  # a flag given on the command line wins over the grid
                values[key] = tuple(value) if isinstance(value, list) else value
        values["wandb_group"] = values["wandb_group"] or cell_id
    if values["data_dir"] is None and Path("data/PetImages").is_dir():
        values["data_dir"] = Path("data/PetImages")
    return RunConfig(**values)


def given_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The options set on the command line (not left at their defaults): --resume checks them against the run."""
    unset = object()  # not a string: argparse would run a string default through the option's type
    probe = build_parser()
    probe.set_defaults(**{action.dest: unset for action in probe._actions if action.dest != "help"})
    return {name for name, value in vars(probe.parse_args(argv)).items() if value is not unset}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    given = given_options(parser, argv)
    # heavy imports only once the flags parsed, so --help and flag errors are instant
    from imbalance.data import DataError, unwrap_worker_error
    from imbalance.model import NonFiniteLossError, WeightsError
    from imbalance.train import RunError, RunInterrupted, fit, say

    try:
        cfg = config_from_args(args, parser).validate()
        # a resumed run and a stage 2 say what they use (the stage-1 run's data)
        if cfg.data_dir is None and cfg.manifest is None and not cfg.resume and cfg.from_run is None:
            say(
                "no --data-dir and no data/PetImages: using the embedded digits data set "
                "(scikit-learn's handwritten '8' vs the other digits, about 1:9)"
            )
        # only what was typed counts as given: on --resume a --case-study-cell's own flags and the grid's
        # defaults yield to the run's stored configuration
        fit(cfg, given=given - {"case_study_cell", "grid"})
    except RunInterrupted as stopped:  # 143 after SIGTERM, 130 after Ctrl-C: the run did not finish
        parser.exit(stopped.exit_code, f"error: {stopped}\n")
    except (ConfigError, DataError, WeightsError, RunError, NonFiniteLossError) as error:
        parser.exit(2, f"error: {unwrap_worker_error(error) or error}\n")  # a loader worker's error, one line
    except KeyboardInterrupt:  # Ctrl-C before the run began
        parser.exit(130, "error: interrupted (Ctrl-C) before the run started; nothing was written\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
