"""Where the time goes: the model alone, a plain PyTorch loop, the Lightning path, the data pipeline and
the losses, measured in one process, interleaved over rounds, after warm-up. Ratios are what to read:
absolute images per second on a shared machine are noise.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from imbalance.allocator import keep_freed_memory
from imbalance.config import ConfigError, RunConfig
from imbalance.data import normalize_images
from imbalance.losses import LOSSES, build_loss
from imbalance.model import adamw
from imbalance.train import _num_workers, load_split, prepare

# issue 18: the Lightning path should run at >= 0.97 of the plain loop; a benchmark must resolve a 3% effect
LIGHTNING_TARGET = 0.97
RESOLUTION = 0.03
CACHE_TARGET = 3.0  # the decode-once cache on full-size photos at 224 px: at least 3x the uncached loader
CACHE_RESOLUTION = 0.10  # a 3x target is told from 2.7x or 3.3x


def round_ratios(results: dict[str, list[float]], numerator: str, denominator: str) -> list[float]:
    """numerator / denominator within each round: paired, so a drift in machine load between rounds cancels."""
    return [a / b for a, b in zip(results[numerator], results[denominator], strict=True)]


def verdict(name: str, rounds: list[float], target: float, effect: float = RESOLUTION) -> str:
    """One line: whether the per-round ratios `rounds` tell that `name` is at least `target`. The rounds must
    agree within `effect` of their median (max - min <= effect x median) for any answer; else, or with a
    single round, "not resolved"."""
    median = statistics.median(rounds)
    low, high = min(rounds), max(rounds)
    head = f"{name} = {median:.3f} (rounds {low:.3f}-{high:.3f}, spread {high - low:.3f})"
    if len(rounds) < 2:
        return f"{head}: not resolved: one round has no spread; use --rounds 3 or more"
    if high - low > effect * median:
        return (
            f"{head}: not resolved: the rounds disagree by more than the {effect:.0%} effect to be told apart; "
            "rerun on an idle machine, or with more --steps and --rounds"
        )
    if low >= target:
        return f"{head}: at least {target:g} in every round (resolved)"
    if high < target:
        return f"{head}: below {target:g} in every round (resolved)"
    return f"{head}: not resolved: the rounds fall on both sides of {target:g}"


def _endless(loader):
    """The loader's batches, starting a new epoch whenever one runs out."""
    while True:
        yield from loader


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


class _TimedPath:
    """One training path of the benchmark, advanced a few steps at a time so that it can run interleaved
    with the Lightning run: a fresh model of the run's settings (built by `prepare`, so --compile and
    --channels-last apply as in a run) and AdamW with the module's own learning rate and weight decay."""

    def __init__(self, cfg: RunConfig, split, device: torch.device, bf16: bool) -> None:
        self.device, self.bf16 = device, bf16
        _, module, self.datamodule = prepare(cfg, split)
        self.memory = torch.channels_last if module.channels_last else torch.contiguous_format
        self.mean, self.std = module.hparams.mean, module.hparams.std
        self.model = module.backbone.to(device, memory_format=self.memory).train()
        self.loss_fn = module.loss_fn.to(device)
        lr, weight_decay, _ = module.optimisation()
        self.optimizer = adamw(self.model.parameters(), lr=lr, weight_decay=weight_decay)  # as the module's
        self.seconds: list[float] = []
        self.images: list[int] = []

    def batch(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def step(self, timed: bool = True) -> None:
        start = time.perf_counter()
        x, y = self.batch()
        x = normalize_images(x.to(self.device, non_blocking=True), self.mean, self.std)  # as the data module does
        x = x.contiguous(memory_format=self.memory)
        y = y.to(self.device, non_blocking=True)
        with _autocast(self.device, self.bf16):
            loss = self.loss_fn(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        _sync(self.device)
        if timed:
            self.seconds.append(time.perf_counter() - start)
            self.images.append(len(y))


class PlainLoop(_TimedPath):
    """A hand-written training loop over the run's real training loader (each step's time includes
    fetching its batch)."""

    def __init__(self, cfg: RunConfig, split, device: torch.device, bf16: bool) -> None:
        super().__init__(cfg, split, device, bf16)
        self.batches = _endless(self.datamodule.train_dataloader())

    def batch(self) -> tuple[Tensor, Tensor]:
        x, y, _ = next(self.batches)
        return x, y


class ModelAlone(_TimedPath):
    """The model's own ceiling: steps on one synthetic batch already on the device, no data pipeline."""

    def __init__(self, cfg: RunConfig, split, device: torch.device, bf16: bool) -> None:
        super().__init__(cfg, split, device, bf16)
        size = cfg.image_size or self.datamodule.train_set[0][0].shape[-1]
        self.x = torch.randn(cfg.batch_size, 3, size, size, device=device).contiguous(memory_format=self.memory)
        self.y = torch.randint(0, 2, (cfg.batch_size,), device=device)

    def batch(self) -> tuple[Tensor, Tensor]:
        return self.x, self.y


class _Interleaved(Callback):
    """Times each Lightning training step (batch end to batch end: data loading, hooks and logging
    included) and, after every `block` timed steps, runs `block` steps of every other path, outside the
    Lightning intervals. Interleaving in short blocks puts every path under the same machine load, so a
    drift of the load over a minute cancels in the ratios instead of landing on one path."""

    def __init__(self, paths: dict[str, _TimedPath], warmup: int, block: int) -> None:
        self.paths, self.warmup, self.block = paths, warmup, block
        self.seconds: list[float] = []
        self.images: list[int] = []
        self.last: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync(pl_module.device)
        now = time.perf_counter()
        if self.last is not None:
            self.seconds.append(now - self.last)
            self.images.append(len(batch[1]))
        if trainer.global_step == self.warmup:
            for path in self.paths.values():
                for _ in range(self.warmup):
                    path.step(timed=False)
        elif self.last is not None and len(self.seconds) % self.block == 0:
            for path in self.paths.values():
                for _ in range(self.block):
                    path.step()
        if trainer.global_step >= self.warmup:
            self.last = time.perf_counter()


def _round_rates(images: list[int], seconds: list[float], rounds: int) -> list[float]:
    """Images per second of each of `rounds` consecutive, equal parts of a path's timed steps."""
    per = len(seconds) // rounds
    return [sum(images[r * per : (r + 1) * per]) / sum(seconds[r * per : (r + 1) * per]) for r in range(rounds)]


def interleaved_rates(
    cfg: RunConfig,
    split,
    steps: int,
    warmup: int,
    rounds: int,
    block: int,
    accelerator: str,
    paths: dict[str, _TimedPath],
) -> dict[str, list[float]]:
    """Per-round images per second of the Lightning path (this repository's module, data module and
    logger on `cfg`) and of each of `paths`, all run interleaved in blocks of `block` steps. Each path
    trains its own model."""
    bf16 = cfg.precision == "bf16-mixed"
    _, module, datamodule = prepare(cfg, split)
    timer = _Interleaved(paths, warmup, block)
    with tempfile.TemporaryDirectory() as tmp:
        from lightning.pytorch.loggers import CSVLogger

        trainer = L.Trainer(
            max_steps=warmup + rounds * steps,
            limit_val_batches=0,
            logger=CSVLogger(tmp),
            callbacks=[timer],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator=accelerator,
            devices=1,
            use_distributed_sampler=False,
            log_every_n_steps=10,  # as a run's
            precision="bf16-mixed" if bf16 else "32-true",
        )
        trainer.fit(module, datamodule=datamodule)
    out = {"lightning": _round_rates(timer.images, timer.seconds, rounds)}
    for name, path in paths.items():
        out[name] = _round_rates(path.images, path.seconds, rounds)
    return out


def alternating_rates(
    paths: dict[str, _TimedPath], steps: int, warmup: int, rounds: int, block: int
) -> dict[str, list[float]]:
    """Per-round images per second of `paths` taking turns every `block` steps, after `warmup` untimed steps
    each (the same design as `interleaved_rates`, without a Lightning run)."""
    for path in paths.values():
        for _ in range(warmup):
            path.step(timed=False)
    for _ in range(rounds * steps // block):
        for path in paths.values():
            for _ in range(block):
                path.step()
    return {name: _round_rates(path.images, path.seconds, rounds) for name, path in paths.items()}


def data_rate(loader, steps: int, warmup: int, ready: Callable[[Tensor], Tensor] | None = None) -> float:
    """Images per second the training loader delivers on its own: the clock runs over the `steps` timed
    fetches (the warm-up fetches before it), so no batch is counted without its fetch. `ready` makes each
    batch's images what the model takes (moved to the device and normalised, as the data module does)."""
    batches = _endless(loader)
    for _ in range(warmup):
        next(batches)
    start, seen = time.perf_counter(), 0
    for _ in range(steps):
        x, y, _ = next(batches)
        if ready is not None:
            ready(x)
        seen += len(y)
    return seen / (time.perf_counter() - start)


def loss_costs(batch: int, device: torch.device, repeats: int = 200) -> dict[str, float]:
    """Seconds per forward + backward of each loss on (batch, 2) logits."""
    counts = [11000, 500]
    out = {}
    for name in LOSSES:
        if name == "autobalance":
            from imbalance.autobalance import initial_loss

            loss = initial_loss("logit-adjusted", counts, trainable=False)
        else:
            loss = build_loss(RunConfig(loss=name), counts)
        loss = loss.to(device)
        logits = torch.randn(batch, loss.num_outputs, device=device, requires_grad=True)
        target = torch.randint(0, 2, (batch,), device=device)
        for _ in range(10):
            loss(logits, target).backward()
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            loss(logits, target).backward()
        _sync(device)
        out[name] = (time.perf_counter() - start) / repeats
    return out


def process_tree_pss_mib(pid: int | None = None) -> float:
    """Proportional set size of a process and its children (shared pages split among sharers), in MiB."""
    pid = pid or os.getpid()
    total = 0.0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total


def loader_memory(cfg: RunConfig, workers: int, steps: int) -> float:
    """Peak PSS of this process and its loader workers while iterating `steps` batches."""
    _, _, datamodule = prepare(replace(cfg, num_workers=workers))
    peak = process_tree_pss_mib()
    batches = iter(datamodule.train_dataloader())
    for _ in range(steps):
        next(batches)
        peak = max(peak, process_tree_pss_mib())
    del batches
    return peak


# Settings the benchmark can run as extra plain loops beside the run's own (--variants a,b+c): the CPU
# choices of issue 18. A spec joins names with "+"; later names win.
VARIANTS: dict[str, dict[str, Any]] = {
    "channels-last": {"channels_last": True},
    "contiguous": {"channels_last": False},
    "cache": {"cache": True},
    "no-cache": {"cache": False},
    "compile": {"compile": True},
    **{f"workers-{n}": {"num_workers": n} for n in range(5)},
}


def variant_config(cfg: RunConfig, spec: str) -> RunConfig:
    """`cfg` with the changes of a --variants spec such as "cache+workers-1"; ConfigError on an unknown name."""
    changes: dict[str, Any] = {}
    for name in spec.split("+"):
        if name not in VARIANTS:
            raise ConfigError(f"--variants: unknown setting {name!r} in {spec!r}; choose from {', '.join(VARIANTS)}")
        changes.update(VARIANTS[name])
    return replace(cfg, **changes).validate()


def _data_rates(
    cfg: RunConfig, split, steps: int, warmup: int, rounds: int, device: torch.device
) -> tuple[dict[str, list[float]], float]:
    """Per-round images per second of the training loader alone, uncached and on the decode-once cache
    (photos only), each batch made ready for the model on `device` (moved and normalised, as in a run), and
    the seconds it took to build the run's caches (train, dev and val) from scratch, in a fresh cache folder."""
    uncached = prepare(replace(cfg, cache=False), split)[2]
    loaders = {"uncached": uncached.train_dataloader()}

    def ready(images: Tensor) -> Tensor:
        out = normalize_images(images.to(device, non_blocking=True), uncached.mean, uncached.std)
        _sync(device)
        return out

    with tempfile.TemporaryDirectory() as cache_dir, mock.patch.dict(os.environ, {"IMBALANCE_CACHE": cache_dir}):
        start = time.perf_counter()
        cached = prepare(replace(cfg, cache=True), split)[2]  # train, dev and val decoded and stored
        build_seconds = time.perf_counter() - start
        loaders["cached"] = cached.train_dataloader()
        results: dict[str, list[float]] = {}
        for _ in range(rounds):
            for name, loader in loaders.items():
                results.setdefault(f"data_{name}", []).append(data_rate(loader, steps, warmup, ready))
        del loaders["cached"], cached  # its workers end before the cache folder goes
    return results, build_seconds


PREFETCH_FACTOR = 2  # torch's DataLoader default: each worker keeps this many batches ready


def _notes(cfg: RunConfig, split, block: int, variants: dict[str, RunConfig]) -> list[str]:
    """Caveats of this measurement: a path's loader workers keep filling their prefetch queue while the
    other paths take their turns, so up to workers x PREFETCH_FACTOR batches of each block were loaded in the
    other paths' time. That is alike for paths with the same loader settings (Lightning and the plain loop);
    between different worker counts it favours the one with more workers unless --block is much longer."""
    workers = {_num_workers(c, split) for c in (cfg, *variants.values())}
    hidden = max(workers) * PREFETCH_FACTOR
    if len(workers) > 1 and block < 10 * hidden:
        return [
            f"variants with different loader workers ({sorted(workers)}) at --block {block}: up to {hidden} of each "
            f"block's batches were loaded while other paths ran; compare worker settings with --block >= "
            f"{10 * hidden} or with --data-only"
        ]
    return []


def run_benchmark(
    cfg: RunConfig,
    steps: int,
    warmup: int,
    rounds: int,
    loss_batch: int = 256,
    memory_check: bool = True,
    block: int = 5,
    variants: tuple[str, ...] = (),
    data_only: bool = False,
    glibc_malloc: bool = False,
) -> dict[str, Any]:
    """All measurements and ratios; see the module docstring. `data_only`: the data pipeline alone.
    `glibc_malloc`: leave glibc's malloc as it is instead of keeping freed memory as a CPU run does, to compare
    the two in separate processes (within one, the heap that one setting leaves behind serves the other)."""
    if warmup < 1:  # the interleaving starts the other paths at the end of Lightning's last warm-up step
        raise ConfigError(f"--warmup must be at least 1, got {warmup}")
    if cfg.accelerator == "gpu" and not torch.cuda.is_available():
        raise ConfigError("--accelerator gpu: no CUDA GPU is visible here; use --accelerator cpu or auto")
    if data_only and variants:
        raise ConfigError("--variants compares training loops; --data-only measures the data pipeline alone: drop one")
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.accelerator != "cpu" else "cpu")
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    malloc = "glibc" if glibc_malloc or device.type != "cpu" else "kept"
    if malloc == "kept":  # as a CPU run does (imbalance.train.fit): every path reuses freed memory
        keep_freed_memory()
    bf16 = cfg.precision == "bf16-mixed"
    split = load_split(cfg)
    photos = split.root is not None
    if data_only and not photos:
        raise ConfigError("--data-only measures the photo pipeline; add --data-dir")
    results: dict[str, list[float]] = {}
    pairs: dict[str, tuple[str, str]] = {}  # ratio: (numerator, denominator), each taken within a round
    alone = "model_alone_channels_last" if cfg.channels_last else "model_alone_contiguous"
    variant_cfgs: dict[str, RunConfig] = {}
    if not data_only:
        variant_cfgs = {spec: variant_config(cfg, spec) for spec in variants}  # every spec checked before timing
        paths: dict[str, _TimedPath] = {"plain_loop": PlainLoop(cfg, split, device, bf16)}
        for spec, variant in variant_cfgs.items():
            paths[f"plain_loop[{spec}]"] = PlainLoop(variant, split, device, bf16)
        results.update(interleaved_rates(cfg, split, steps, warmup, rounds, block, accelerator, paths))
        # The model-alone ceilings run in a phase of their own, taking turns with each other only: interleaved
        # with the end-to-end paths, two more models and their optimiser states between every Lightning block
        # and the plain loop's slowed every path by a quarter and unevenly (Lightning / plain loop 0.964 with
        # them, 0.98-0.99 without; benchmarks/RESULTS.md), so their ratios to end-to-end are unpaired context.
        ceilings = {
            "model_alone_contiguous": ModelAlone(replace(cfg, channels_last=False), split, device, bf16),
            "model_alone_channels_last": ModelAlone(replace(cfg, channels_last=True), split, device, bf16),
        }
        results.update(alternating_rates(ceilings, steps, warmup, rounds, block))
        pairs |= {
            "lightning / plain loop": ("lightning", "plain_loop"),
            "end-to-end (plain loop) / model alone": ("plain_loop", alone),
            "end-to-end (lightning) / model alone": ("lightning", alone),
            "channels_last / contiguous (model alone)": ("model_alone_channels_last", "model_alone_contiguous"),
        }
        for spec in variant_cfgs:
            pairs[f"plain loop [{spec}] / plain loop"] = (f"plain_loop[{spec}]", "plain_loop")
    build_seconds = None
    if photos:
        data, build_seconds = _data_rates(cfg, split, steps, warmup, rounds, device)
        results.update(data)
        pairs["data cached / uncached"] = ("data_cached", "data_uncached")
        if not data_only:
            pipeline = "cached" if cfg.cache else "uncached"
            pairs[f"data ({pipeline}) / model alone"] = (f"data_{pipeline}", alone)
    rates = {name: statistics.median(values) for name, values in results.items()}
    ratio_rounds = {name: round_ratios(results, *pair) for name, pair in pairs.items()}
    ratios = {name: statistics.median(values) for name, values in ratio_rounds.items()}
    verdicts = {}
    if not data_only:
        verdicts["lightning / plain loop"] = verdict(
            "lightning / plain loop", ratio_rounds["lightning / plain loop"], LIGHTNING_TARGET
        )
    if photos:
        verdicts["data cached / uncached"] = verdict(
            "data cached / uncached", ratio_rounds["data cached / uncached"], CACHE_TARGET, CACHE_RESOLUTION
        )
    report: dict[str, Any] = {
        "settings": {
            "backbone": cfg.backbone,
            "image_size": cfg.image_size,
            "batch_size": cfg.batch_size,
            "steps": steps,
            "warmup": warmup,
            "rounds": rounds,
            "block": block,
            "device": str(device),
            "precision": "bf16-mixed" if bf16 else "32-true",
            "channels_last": bool(cfg.channels_last),
            "compile": cfg.compile,
            "malloc": malloc,
            "cache": cfg.cache,
            "num_workers": _num_workers(cfg, split),
            "data": split.source,
            "torch_threads": torch.get_num_threads(),
            "variants": list(variants),
        },
        "images_per_second": rates,
        "all_rounds": results,
        "ratios": ratios,  # the median over rounds of each round's ratio
        "ratio_rounds": ratio_rounds,
        "verdicts": verdicts,
        "notes": _notes(cfg, split, block, variant_cfgs),
    }
    if build_seconds is not None:
        report["cache_build_seconds"] = build_seconds
    if not data_only:
        report["verdict"] = verdicts["lightning / plain loop"]
        step_seconds = cfg.batch_size / rates[alone]
        costs = loss_costs(loss_batch, device)
        report |= {
            "loss_seconds_per_fwd_bwd": costs,
            "loss_time_relative_to_ce": {k: v / costs["ce"] for k, v in costs.items()},
            "loss_time_relative_to_model_step": {k: v / step_seconds for k, v in costs.items()},
            # a training step with this loss relative to one with ce (model + loss), at the benchmark's batch
            "step_time_relative_to_ce": {
                k: (step_seconds + v) / (step_seconds + costs["ce"]) for k, v in costs.items()
            },
        }
    if memory_check and photos and not data_only:
        model_mib = sum(p.numel() * p.element_size() for p in paths["plain_loop"].model.parameters()) / 2**20
        cached_cfg = replace(cfg, cache=True)
        pss0, pss4 = loader_memory(cached_cfg, 0, steps), loader_memory(cached_cfg, 4, steps)
        report["memory"] = {
            "model_mib": model_mib,
            "pss_mib_0_workers": pss0,
            "pss_mib_4_workers": pss4,
            "extra_mib_per_worker": (pss4 - pss0) / 4,
            "extra_per_worker / model size": (pss4 - pss0) / 4 / model_mib,
        }
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [
        "settings: " + ", ".join(f"{k}={v}" for k, v in report["settings"].items()),
        "",
        f"{'measurement':45s} {'img/s (median)':>15s}   rounds",
    ]
    for name, rate in report["images_per_second"].items():
        rounds = ", ".join(f"{v:.0f}" for v in report["all_rounds"][name])
        lines.append(f"{name:45s} {rate:15.1f}   {rounds}")
    lines += ["", f"{'ratio (median of the rounds)':45s} {'value':>15s}   {'min':>6s} {'max':>6s} {'spread':>7s}"]
    for name, value in report["ratios"].items():
        rounds = report["ratio_rounds"][name]
        lines.append(
            f"{name:45s} {value:15.3f}   {min(rounds):6.3f} {max(rounds):6.3f} {max(rounds) - min(rounds):7.3f}"
        )
    lines.append("")
    lines += [f"verdict: {line}" for line in report["verdicts"].values()]
    lines += [f"note: {line}" for line in report.get("notes", [])]
    if "cache_build_seconds" in report:
        lines.append(f"cache build (train, dev, val; once per split and size): {report['cache_build_seconds']:.1f} s")
    if "loss_seconds_per_fwd_bwd" not in report:
        return "\n".join(lines)
    lines += [
        "",
        f"{'loss (fwd+bwd, batch 256)':28s} {'µs':>8s} {'/ ce':>8s} {'/ model step':>14s} {'step / ce step':>15s}",
    ]
    for name, seconds in report["loss_seconds_per_fwd_bwd"].items():
        lines.append(
            f"{name:28s} {seconds * 1e6:8.1f} {report['loss_time_relative_to_ce'][name]:8.3f} "
            f"{report['loss_time_relative_to_model_step'][name]:14.5f} "
            f"{report['step_time_relative_to_ce'][name]:15.4f}"
        )
    if "memory" in report:
        lines += [
            "",
            "memory (PSS of the process tree, cached pipeline): "
            + ", ".join(f"{k}={v:.1f}" for k, v in report["memory"].items()),
        ]
    return "\n".join(lines)


def write_full_size_photos(
    source: Path, out: Path, size: tuple[int, int] = (500, 375), per_class: int = 1500, quality: int = 90
) -> dict[str, int]:
    """A benchmark input for the decode-once cache: the first `per_class` photos of each class folder under
    `source`, resized to `size` (width, height; the archive's typical 500x375) and saved as JPEGs in the
    same layout under `out`. The shared photos are 96 px, where the cache saves only a small resize; at full
    size it saves a full JPEG decode and resize per image. Upscaled photos are smoother than real ones, so
    their JPEGs are smaller and decode a little faster: the measured gain is, if anything, an underestimate.
    Written into a temporary folder renamed to `out` at the end, so no half-written input is left."""
    from PIL import Image

    from imbalance.data import IMAGE_EXTENSIONS, DataError, _decode_rgb

    if not source.is_dir():
        raise ConfigError(f"--data-dir {source} is not a folder of class folders (e.g. Cat/ and Dog/)")
    if out.exists():
        raise ConfigError(f"--write-full-size {out} already exists; remove it or choose another folder")
    if not out.parent.is_dir():
        raise ConfigError(f"--write-full-size {out}: its parent folder {out.parent} does not exist; create it first")
    classes = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ConfigError(f"--data-dir {source} has no class folders (e.g. Cat/ and Dog/) to copy from")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    counts: dict[str, int] = {}
    try:
        for folder in classes:
            (tmp / folder.name).mkdir(parents=True)
            written: set[str] = set()
            for photo in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
                if len(written) == per_class:
                    break
                name = f"{photo.stem}.jpg"
                if name in written:  # cat.png beside cat.jpg: keep both
                    name = f"{photo.stem}_{photo.suffix[1:]}.jpg"
                try:  # decoded as a run decodes it (16-bit images scaled, not saturated)
                    image = _decode_rgb(photo)
                except DataError:
                    continue  # unreadable source photos are skipped, as the run's scan would
                image.resize(size, Image.BICUBIC).save(tmp / folder.name / name, quality=quality)
                written.add(name)
            counts[folder.name] = len(written)
        if not all(counts.values()):
            empty = [name for name, n in counts.items() if not n]
            raise ConfigError(f"--data-dir {source}: no readable photos in {', '.join(empty)}; nothing to benchmark")
        tmp.rename(out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts
