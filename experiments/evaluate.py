"""Evaluate a checkpoint: `python -m experiments.evaluate --checkpoint runs/NAME/checkpoints/best.ckpt
[--data-dir DIR | --manifest FILE] --out DIR [--threshold T] [--bootstrap 1000]`. Writes metrics.json and
predictions.csv. Without --data-dir it scores the run's validation split, replayed from its manifest.json."""

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
    p.add_argument("--threshold", type=float, help="also report metrics at this decision threshold on P(positive)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap rounds for the F1 95%% interval (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        parser.error(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.bootstrap < 0:
        parser.error(f"--bootstrap must be >= 0, got {args.bootstrap}")
    from imbalance.config import ConfigError
    from imbalance.data import DataError
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
        parser.exit(2, "error: " + " ".join(str(error).split()) + "\n")  # one line, whatever the message
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
