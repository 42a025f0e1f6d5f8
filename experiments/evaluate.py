"""Evaluate a checkpoint: `python -m experiments.evaluate --checkpoint runs/NAME/checkpoints/best.ckpt
[--data-dir DIR | --manifest FILE] --out DIR [--threshold T] [--bootstrap 1000]`. Writes metrics.json and
predictions.csv. Without --data-dir it scores the run's validation split, replayed from its manifest.json.
Besides threshold 0.5 it reports the threshold and the post-hoc logit-adjustment tau tuned on the run's dev
split (listed in its manifest.json), never on the images it scores."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.evaluate",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="a .ckpt written by experiments.run")
    p.add_argument(
        "--data-dir",
        type=Path,
        help="a folder to score, in any supported layout (of a pre-split train/+validation/ folder: validation/ "
        "only); default: the run's validation split, from its manifest",
    )
    p.add_argument(
        "--manifest",
        type=Path,
        help="the run's manifest.json whose validation split to score (default: RUN/manifest.json for "
        "RUN/checkpoints/*.ckpt); with --data-dir, its files are read under that folder",
    )
    p.add_argument("--out", type=Path, required=True, help="folder for metrics.json and predictions.csv")
    p.add_argument(
        "--threshold",
        type=float,
        help="also report metrics at this decision threshold on P(positive), given by you (the dev-tuned ones are always reported)",
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap rounds for the F1 95%% interval (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=0)
    return p


def _output_problem(out: Path) -> str | None:
    """Why `out` cannot be the results folder, or None: checked before the checkpoint is even read."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file; give a folder for metrics.json and predictions.csv (a new or existing one)"
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        return f"--out {out}: {parent} is a file, so no folder can be made below it; choose another --out"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def fail(message: str) -> None:
        parser.exit(2, "error: " + " ".join(str(message).split()) + "\n")  # one line, whatever the message

    if args.threshold is not None and not 0 <= args.threshold <= 1:  # NaN fails this too
        fail(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.bootstrap < 0:
        fail(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if args.batch_size < 1:
        fail(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.num_workers < 0:
        fail(f"--num-workers must be >= 0, got {args.num_workers}")
    if problem := _output_problem(args.out):
        fail(problem)
    from imbalance.config import ConfigError
    from imbalance.data import DataError, unwrap_worker_error
    from imbalance.evaluate import evaluate
    from imbalance.model import WeightsError

    try:
        metrics = evaluate(
            args.checkpoint,
            args.out,
            args.data_dir,
            args.threshold,
            args.bootstrap,
            args.seed,
            args.batch_size,
            args.num_workers,
            args.manifest,
        )
    except (ConfigError, DataError, WeightsError, OSError) as error:  # OSError: e.g. --out is not writable
        fail(unwrap_worker_error(error) or error)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
