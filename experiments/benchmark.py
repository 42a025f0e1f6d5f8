"""Measure where the time goes: `python -m experiments.benchmark [--backbone B] [--image-size S]
[--batch-size N] [--steps K] [--data-dir DIR] [--out FILE]`. Prints images per second and the ratios
(Lightning / plain loop, data / model, cached / uncached, each loss / ce) and writes them as JSON."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.benchmark",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=60, help="timed steps per path and round")
    p.add_argument(
        "--warmup",
        type=int,
        default=10,
        help="untimed steps of each path before timing (the first timed round ran slow after 3)",
    )
    p.add_argument("--rounds", type=int, default=3, help="consecutive parts of the timed steps; medians are reported")
    p.add_argument("--block", type=int, default=5, help="paths take turns every this many steps (a divisor of --steps)")
    p.add_argument(
        "--variants",
        default="",
        help="extra plain loops to compare, comma-separated, each a '+'-joined spec of: "
        "channels-last, contiguous, cache, no-cache, compile, workers-0 ... workers-4 (e.g. cache+workers-1)",
    )
    p.add_argument("--data-dir", type=Path, help="photo folder (default: the embedded digits)")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the photos to use")
    p.add_argument("--num-workers", type=int, help="data-loader processes")
    p.add_argument("--cache", action="store_true", help="run the end-to-end paths on the decode-once cache")
    p.add_argument("--channels-last", action="store_true", help="end-to-end paths in channels_last")
    p.add_argument("--compile", action="store_true", help="end-to-end paths with torch.compile")
    p.add_argument("--data-only", action="store_true", help="measure the data pipeline alone (needs --data-dir)")
    p.add_argument(
        "--write-full-size",
        type=Path,
        metavar="DIR",
        help="write full-size (500x375) JPEG copies of --data-dir's photos to DIR, as a cache benchmark input, and exit",
    )
    p.add_argument("--per-class", type=int, default=1500, help="photos per class for --write-full-size")
    p.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true")
    p.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu"])
    p.add_argument("--no-memory", action="store_true", help="skip the loader-memory measurement")
    p.add_argument(
        "--glibc-malloc",
        action="store_true",
        help="on a CPU, leave glibc's malloc as it is instead of keeping freed memory as a run does "
        "(imbalance.allocator): run once with and once without to compare",
    )
    p.add_argument("--out", type=Path, help="write the report as JSON here")
    return p


def _output_problem(out: Path) -> str | None:
    """Why the JSON report cannot be written to `out`, or None: checked before the measurements, not after."""
    if out.is_dir():
        return f"--out {out} is a folder; give a file name for the JSON report, e.g. {out / 'benchmark.json'}"
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        return f"--out {out}: {parent} is a file, so no file can be written below it; choose another path"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, least in (("steps", 1), ("rounds", 1), ("warmup", 1), ("block", 1), ("per_class", 1)):
        value = getattr(args, name)
        if value < least:
            bound = "at least 1" if least == 1 else ">= 0"
            parser.exit(2, f"error: --{name.replace('_', '-')} must be {bound}, got {value}\n")
    if args.steps % args.block:
        parser.exit(
            2, f"error: --steps {args.steps} is not a multiple of --block {args.block}; e.g. --steps 60 --block 5\n"
        )
    if args.write_full_size is not None:
        if args.data_dir is None:
            parser.exit(2, "error: --write-full-size copies the photos of --data-dir; add --data-dir\n")
        from imbalance.benchmark import write_full_size_photos
        from imbalance.config import ConfigError

        try:
            counts = write_full_size_photos(args.data_dir, args.write_full_size, per_class=args.per_class)
        except ConfigError as error:
            parser.exit(2, f"error: {error}\n")
        print(f"wrote {', '.join(f'{n} {c}' for c, n in counts.items())} photos at 500x375 to {args.write_full_size}")
        return 0
    if args.out is not None and (problem := _output_problem(args.out)):
        parser.exit(2, f"error: {problem}\n")
    from imbalance.config import ConfigError, RunConfig
    from imbalance.data import DataError, unwrap_worker_error
    from imbalance.model import WeightsError

    try:
        cfg = RunConfig(
            data_dir=args.data_dir,
            backbone=args.backbone,
            image_size=args.image_size,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            cache=args.cache,
            channels_last=args.channels_last,
            compile=args.compile,
            precision=args.precision,
            accelerator=args.accelerator,
            scale=args.scale,
            train_counts=None,
            logger="csv",
        ).validate()
        from imbalance.benchmark import format_report, run_benchmark
        from imbalance.io import atomic_write_json

        variants = tuple(v for v in args.variants.split(",") if v)
        report = run_benchmark(
            cfg,
            args.steps,
            args.warmup,
            args.rounds,
            memory_check=not args.no_memory,
            block=args.block,
            variants=variants,
            data_only=args.data_only,
            glibc_malloc=args.glibc_malloc,
        )
    except (ConfigError, DataError, WeightsError) as error:
        parser.exit(2, f"error: {unwrap_worker_error(error) or error}\n")
    print(format_report(report))
    if args.out:
        atomic_write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
