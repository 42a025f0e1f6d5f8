"""Shared fixtures: every test runs offline, writes only under its tmp_path, and makes its own data."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # timm hub downloads fail fast instead of waiting on the network


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in tmp_path with a private scan cache, so tests never share or leave state."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IMBALANCE_CACHE", str(tmp_path / ".cache"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    return tmp_path


def write_image(
    path: Path,
    size: tuple[int, int] = (40, 30),
    mode: str = "RGB",
    seed: int = 0,
    fmt: str = "JPEG",
    brightness: int | None = None,
) -> Path:
    """A small random image; `brightness` shifts its mean so a model can learn the class."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    if brightness is not None:
        base = np.clip(base // 4 + brightness, 0, 255).astype(np.uint8)
    img = Image.fromarray(base, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "JPEG" and mode in ("RGBA", "P", "LA"):
        fmt = "PNG"
    img.save(path, format=fmt)
    return path


def make_class_tree(root: Path, counts: dict[str, int], learnable: bool = True, size=(40, 30)) -> Path:
    """root/<Class>/<i>.jpg with `counts` images per class; classes differ in brightness when learnable."""
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            brightness = (40 if c == 0 else 170) if learnable else None
            write_image(
                root / name / f"{i}.jpg", size=size, seed=zlib.crc32(f"{name}{i}".encode()), brightness=brightness
            )
    return root


@pytest.fixture
def pet_tree(tmp_path: Path) -> Path:
    """A small learnable PetImages-style tree: 30 cats, 90 dogs."""
    return make_class_tree(tmp_path / "PetImages", {"Cat": 30, "Dog": 90})
