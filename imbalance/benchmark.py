"""Where the time goes: the model alone, a plain PyTorch loop, the Lightning path, the data pipeline and
the losses, measured in one process, interleaved over rounds, after warm-up. Ratios are what to read:
absolute images per second on a shared machine are noise.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from imbalance.config import RunConfig
from imbalance.data import ImbalanceDataModule
from imbalance.losses import LOSSES, build_loss
from imbalance.train import prepare

# issue 18: the Lightning path should run at >= 0.97 of the plain loop; a benchmark must resolve a 3% effect
LIGHTNING_TARGET = 0.97
RESOLUTION = 0.03


def round_ratios(results: dict[str, list[float]], numerator: str, denominator: str) -> list[float]:
    """numerator / denominator within each round: paired, so a drift in machine load between rounds cancels."""
    return [a / b for a, b in zip(results[numerator], results[denominator], strict=True)]


def verdict(name: str, rounds: list[float], target: float, effect: float = RESOLUTION) -> str:
    """One line: whether the per-round ratios `rounds` tell that `name` is at least `target`. The rounds must
    agree within `effect` (their max - min) for any answer; else, or with a single round, "not resolved"."""
    median = statistics.median(rounds)
    low, high = min(rounds), max(rounds)
    head = f"{name} = {median:.3f} (rounds {low:.3f}-{high:.3f}, spread {high - low:.3f})"
    if len(rounds) < 2:
        return f"{head}: not resolved: one round has no spread; use --rounds 3 or more"
    if high - low > effect:
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


def model_step_rate(
    model,
    loss_fn,
    batch_size: int,
    image_size: int,
    steps: int,
    warmup: int,
    device: torch.device,
    channels_last: bool,
    bf16: bool,
) -> float:
    """Images per second of forward + backward + optimiser step on one synthetic batch already on the device."""
    memory = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=memory)
    y = torch.randint(0, 2, (batch_size,), device=device)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        with _autocast(device, bf16):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    return batch_size * steps / (time.perf_counter() - start)


def plain_loop_rate(
    model, loss_fn, loader, steps: int, warmup: int, device: torch.device, channels_last: bool, bf16: bool
) -> float:
    """Images per second of a hand-written training loop over the real data pipeline."""
    memory = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seen, start = 0, None
    batches = _endless(loader)
    for i in range(warmup + steps):
        x, y, _ = next(batches)
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        x = x.to(device, non_blocking=True).contiguous(memory_format=memory)
        y = y.to(device, non_blocking=True)
        with _autocast(device, bf16):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            seen += len(y)
    _sync(device)
    return seen / (time.perf_counter() - start)


class _StepTimer(Callback):
    """Times the Lightning training steps from `warmup` on (data loading between steps included)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.seen = warmup, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            _sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.start is not None:
            self.seen += len(batch[1])
        _sync(pl_module.device)
        self.end = time.perf_counter()

    @property
    def rate(self) -> float:
        return self.seen / (self.end - self.start)


def lightning_rate(cfg: RunConfig, steps: int, warmup: int, accelerator: str) -> float:
    """Images per second through this repository's module, data module and logger."""
    _, module, datamodule = prepare(cfg)
    timer = _StepTimer(warmup)
    with tempfile.TemporaryDirectory() as tmp:
        from lightning.pytorch.loggers import CSVLogger

        trainer = L.Trainer(
            max_steps=warmup + steps,
            limit_val_batches=0,
            logger=CSVLogger(tmp),
            callbacks=[timer],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator=accelerator,
            devices=1,
            use_distributed_sampler=False,
            log_every_n_steps=10,
            precision="bf16-mixed" if cfg.precision == "bf16-mixed" else "32-true",
        )
        trainer.fit(module, datamodule=datamodule)
    return timer.rate


def data_rate(loader, steps: int, warmup: int) -> float:
    """Images per second the training loader delivers on its own."""
    seen, start = 0, None
    batches = _endless(loader)
    for i in range(warmup + steps):
        _, y, _ = next(batches)
        if i == warmup:
            start = time.perf_counter()
        if i >= warmup:
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


def run_benchmark(
    cfg: RunConfig, steps: int, warmup: int, rounds: int, loss_batch: int = 256, memory_check: bool = True
) -> dict[str, Any]:
    """All measurements and ratios; see the module docstring."""
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.accelerator != "cpu" else "cpu")
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    bf16 = cfg.precision == "bf16-mixed"
    photos = cfg.data_dir is not None
    split, module, datamodule = prepare(cfg)
    loss_fn = module.loss_fn.to(device)
    cached_dm = None
    if photos:
        cached_dm = ImbalanceDataModule(
            split,
            cfg.image_size,
            module.hparams.mean,
            module.hparams.std,
            cfg.batch_size,
            cfg.sampling,
            cfg.seed,
            datamodule.num_workers,
            cache=True,
        )
    loaders = {"uncached": datamodule.train_dataloader()}
    if cached_dm is not None:
        loaders["cached"] = cached_dm.train_dataloader()
    pipeline = "cached" if cfg.cache and cached_dm is not None else "uncached"
    results: dict[str, list[float]] = {}

    def record(name: str, value: float) -> None:
        results.setdefault(name, []).append(value)

    for _ in range(rounds):  # interleaved, so drifts in machine load hit every measurement alike
        for channels_last in (False, True):
            tag = "channels_last" if channels_last else "contiguous"
            record(
                f"model_alone_{tag}",
                model_step_rate(
                    module.backbone, loss_fn, cfg.batch_size, cfg.image_size, steps, warmup, device, channels_last, bf16
                ),
            )
        cl = bool(cfg.channels_last)
        record(
            "plain_loop", plain_loop_rate(module.backbone, loss_fn, loaders[pipeline], steps, warmup, device, cl, bf16)
        )
        record("lightning", lightning_rate(cfg, steps, warmup, accelerator))
        for name, loader in loaders.items():
            record(f"data_{name}", data_rate(loader, steps, warmup))
    rates = {name: statistics.median(values) for name, values in results.items()}
    alone = "model_alone_channels_last" if cfg.channels_last else "model_alone_contiguous"
    model_alone = rates[alone]
    costs = loss_costs(loss_batch, device)
    step_seconds = cfg.batch_size / model_alone
    pairs = {  # ratio: (numerator, denominator), each taken within a round
        "lightning / plain loop": ("lightning", "plain_loop"),
        "end-to-end (plain loop) / model alone": ("plain_loop", alone),
        "end-to-end (lightning) / model alone": ("lightning", alone),
        f"data ({pipeline}) / model alone": (f"data_{pipeline}", alone),
        "channels_last / contiguous (model alone)": ("model_alone_channels_last", "model_alone_contiguous"),
    }
    if "data_cached" in rates:
        pairs["data cached / uncached"] = ("data_cached", "data_uncached")
        pairs["data cached / model alone"] = ("data_cached", alone)
    ratio_rounds = {name: round_ratios(results, *pair) for name, pair in pairs.items()}
    ratios = {name: statistics.median(values) for name, values in ratio_rounds.items()}
    report: dict[str, Any] = {
        "settings": {
            "backbone": cfg.backbone,
            "image_size": cfg.image_size,
            "batch_size": cfg.batch_size,
            "steps": steps,
            "warmup": warmup,
            "rounds": rounds,
            "device": str(device),
            "precision": "bf16-mixed" if bf16 else "32-true",
            "channels_last": bool(cfg.channels_last),
            "num_workers": datamodule.num_workers,
            "data": split.source,
            "pipeline": pipeline,
            "torch_threads": torch.get_num_threads(),
        },
        "images_per_second": rates,
        "all_rounds": results,
        "ratios": ratios,  # the median over rounds of each round's ratio
        "ratio_rounds": ratio_rounds,
        "verdict": verdict("lightning / plain loop", ratio_rounds["lightning / plain loop"], LIGHTNING_TARGET),
        "loss_seconds_per_fwd_bwd": costs,
        "loss_time_relative_to_ce": {k: v / costs["ce"] for k, v in costs.items()},
        "loss_time_relative_to_model_step": {k: v / step_seconds for k, v in costs.items()},
        # a training step with this loss relative to one with ce (model + loss), at the benchmark's batch
        "step_time_relative_to_ce": {k: (step_seconds + v) / (step_seconds + costs["ce"]) for k, v in costs.items()},
    }
    if memory_check and photos:
        model_mib = sum(p.numel() * p.element_size() for p in module.backbone.parameters()) / 2**20
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
    lines += ["", f"verdict: {report['verdict']}"]
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
