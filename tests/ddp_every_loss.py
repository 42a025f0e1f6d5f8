"""Launched by tests/test_ddp.py under torchrun (2 CPU processes, gloo): one short run per loss in the same
two processes, with validation shards of different lengths (5 images, batch 2: rank 0 runs 2 batches, rank 1
one). A collective in a validation step would make rank 0 wait forever; the test's timeout turns that into a
failure. Usage: torchrun --nproc_per_node 2 tests/ddp_every_loss.py DATA_DIR OUT_DIR (or the test's own launch)."""

from __future__ import annotations

import sys
from pathlib import Path

from imbalance.config import RunConfig
from imbalance.losses import LOSSES
from imbalance.train import fit


def main(data_dir: Path, out: Path) -> None:
    for loss in LOSSES:
        extra = {"drw_epoch": 1} if loss == "ldam" else {}  # DRW from the 2nd epoch: weighted from then on
        if loss == "autobalance":
            extra = {"autobalance_search_epochs": 1}
        cfg = RunConfig(
            data_dir=data_dir,
            train_counts=(10, 12),  # dev: 1 cat, 2 dogs; AutoBalance's search part keeps 2 per rank
            val_counts=(3, 2),
            backbone="test_resnet",
            image_size=16,
            batch_size=2,
            epochs=2,
            loss=loss,
            accelerator="cpu",
            devices=2,
            num_workers=0,
            logger="none",
            out=out / loss,
            **extra,
        )
        fit(cfg)
        print(f"finished {loss}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
