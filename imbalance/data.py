"""From a folder of photos (or the embedded digits) to the lecture's train/validation splits.

The path a sample takes:
1. `discover` finds the layout of `--data-dir` and the files of each class;
2. `scan_images` decodes every file once (cached by path, size and mtime) and drops the bad ones, with the
   reason, so no epoch ever meets a corrupt file; `to_rgb` is the one conversion of every Pillow mode to
   8-bit RGB, used by the scan, the loaders and the decode-once cache alike;
3. `draw_split` draws validation first, then nested training sets, from a seeded permutation per class, and
   holds out a dev part of each training class (`dev_positions`: nested too) on which every decision is made;
4. `ImbalanceDataModule` serves them, with samplers that stay correct under DDP, as uint8 images: the scaling
   to float and the normalisation (`normalize_images`) run on the batch after it reached the device
   (`on_after_batch_transfer`), so workers, collation and the host-to-device copy move a quarter of the bytes.

Labels: 1 is the positive class (`--positive-class`, cat by default), 0 the negative one.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, get_worker_info
from torchvision.transforms import v2

from imbalance.config import DEFAULT_CROP_SCALE, SPLIT_PRESETS, RunConfig
from imbalance.io import atomic_write_text
from imbalance.sampling import EpochSampler

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
EMBEDDED_NAME = "embedded digits (scikit-learn): '8' (positive) vs the other digits"
EMBEDDED_POSITIVE_DIGIT = 8
DEFAULT_VAL_FRACTION = 0.12  # the lecture's 1,500 of 12,500 photos per class


class DataError(ValueError):
    """The data folder, a manifest or the asked split cannot be used as given."""


# PyTorch re-raises an exception of a DataLoader worker as the same class, with the worker's traceback as its
# message: "Caught DataError in DataLoader worker process 0.\nOriginal Traceback ...\nimbalance.data.DataError: ..."
_WORKER_ERROR = re.compile(r"^Caught DataError in [^\n]*\n")
_LAST_DATA_ERROR = re.compile(r"^(?:[\w.]+\.)?DataError: ", re.MULTILINE)


def unwrap_worker_error(error: BaseException) -> DataError | None:
    """The one-line DataError that a DataLoader worker raised, if `error` (or what it was raised from) is
    PyTorch's re-raise of it; else None. A CLI prints `unwrap_worker_error(error) or error`, so a photo that
    broke during the run is reported as the file and the reason, not as the worker's traceback."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        if _WORKER_ERROR.match(text):
            last = list(_LAST_DATA_ERROR.finditer(text))
            message = text[last[-1].end() :] if last else text.split("\n", 1)[0]
            unwrapped = DataError(" ".join(message.split()))
            unwrapped.__cause__ = current
            return unwrapped
        current = current.__cause__ or current.__context__
    return None


@dataclass
class SplitData:
    """The result of data preparation: what every later stage needs to know."""

    source: str  # a line for the user: where the photos came from
    class_names: tuple[str, str]  # (negative, positive), i.e. indexed by label
    train: list[tuple[str, int]]  # (sample id, label); the id is a path relative to root, or "digits:<i>"
    val: list[tuple[str, int]]
    root: Path | None = None  # None for the embedded digits
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) found by the scan
    layout: str = "embedded"
    # held out of the training data for decisions (checkpoint, threshold, tau); empty with --dev-fraction 0
    dev: list[tuple[str, int]] = field(default_factory=list)
    dev_fraction: float = 0.0  # what `dev` was carved with (recorded in the manifest; not part of its hash)

    @property
    def train_counts(self) -> list[int]:
        """Training class counts in label order (negative, positive): what losses and samplers use."""
        labels = [label for _, label in self.train]
        return [labels.count(0), labels.count(1)]

    @property
    def val_counts(self) -> list[int]:
        labels = [label for _, label in self.val]
        return [labels.count(0), labels.count(1)]

    @property
    def dev_counts(self) -> list[int]:
        labels = [label for _, label in self.dev]
        return [labels.count(0), labels.count(1)]

    def manifest(self) -> dict:
        """The split as JSON, with a sha256 over everything that defines it (a checkpoint carries it)."""
        body = {
            "root": None if self.root is None else str(self.root),
            "layout": self.layout,
            "class_names": list(self.class_names),
            "train": [list(item) for item in self.train],
            "dev": [list(item) for item in self.dev],
            "val": [list(item) for item in self.val],
        }
        digest = manifest_digest(body, MANIFEST_VERSION)
        return {"version": MANIFEST_VERSION, "sha256": digest, "dev_fraction": self.dev_fraction, **body}


MANIFEST_VERSION = 3


def manifest_digest(manifest: dict, version: int) -> str:
    """sha256 of what defines a split. Version 1 hashed only the two file lists; version 2 also the class
    names (which label is positive) and the layout, so no edit of them goes unnoticed; version 3 also the
    dev list. Not the root: the same split may be replayed from another copy of the folder."""
    if version == 1:
        body: object = [manifest["train"], manifest["val"]]
    elif version == 2:
        body = {key: manifest[key] for key in ("class_names", "layout", "train", "val")}
    else:
        body = {key: manifest[key] for key in ("class_names", "layout", "train", "dev", "val")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------- layouts


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _find_split_dir(folder: Path, names: Sequence[str]) -> Path | None:
    by_lower = {p.name.lower(): p for p in _visible_dirs(folder)}
    for name in names:
        if name in by_lower:
            return by_lower[name]
    return None


@dataclass
class Discovered:
    layout: str
    root: Path
    files: dict[str, list[Path]]  # class name -> files (all of them, before the scan)
    presplit: dict[str, dict[str, list[Path]]] | None = None  # {"train": {...}, "val": {...}}


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    """Two-class ImageFolder: visible sub-folders holding images; empty folders are ignored."""
    return {d.name: files for d in _visible_dirs(folder) if (files := _image_files(d))}


def _refuse_case_clash(folder: Path, class_names: Sequence[str]) -> None:
    """Class names are matched case-insensitively (--positive-class, the pre-split parts, the seeded draw), so
    two class folders that differ only in case (Cat/ and cat/) cannot be told apart: say so, naming both."""
    by_lower: dict[str, list[str]] = {}
    for name in class_names:
        by_lower.setdefault(name.lower(), []).append(name)
    clash = next((sorted(names) for names in by_lower.values() if len(names) > 1), None)
    if clash:
        raise DataError(
            f"--data-dir {folder}: class folders {' and '.join(f'{n}/' for n in clash)} differ only in case, and "
            "class names are compared case-insensitively (--positive-class, the split), so they cannot be told "
            "apart: merge them into one folder, or rename one"
        )


KAGGLE_NAME = re.compile(r"^(cat|dog)\.\d+\.", re.IGNORECASE)


def discover(data_dir: Path) -> Discovered:
    """Recognise the folder's layout; a clear error lists what was found when none fits."""
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise DataError(f"--data-dir {data_dir} does not exist; see the README for how to get the PetImages photos")
    if not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is a file, not a folder")

    # 3. the lecture's pre-split cats_and_dogs/{train,validation}/{cat,dog}/
    train_dir = _find_split_dir(data_dir, ("train",))
    val_dir = _find_split_dir(data_dir, ("validation", "val"))
    if train_dir and val_dir:
        train_classes, val_classes = _class_folders(train_dir), _class_folders(val_dir)
        _refuse_case_clash(train_dir, list(train_classes))
        _refuse_case_clash(val_dir, list(val_classes))
        if len(train_classes) == 2 and {c.lower() for c in train_classes} == {c.lower() for c in val_classes}:
            val_by_lower = {c.lower(): files for c, files in val_classes.items()}
            files = {c: f + val_by_lower[c.lower()] for c, f in train_classes.items()}
            presplit = {"train": train_classes, "val": {c: val_by_lower[c.lower()] for c in train_classes}}
            return Discovered("presplit", data_dir, files, presplit)

    # 1 and 4. PetImages/Cat, PetImages/Dog or any two-class ImageFolder
    classes = _class_folders(data_dir)
    _refuse_case_clash(data_dir, list(classes))
    if len(classes) == 2:
        layout = "petimages" if {c.lower() for c in classes} == {"cat", "dog"} else "imagefolder"
        return Discovered(layout, data_dir, classes)

    # 2. Kaggle's flat train/ with cat.N.jpg and dog.N.jpg
    flat = [p for p in _image_files(data_dir) if KAGGLE_NAME.match(p.name)]
    if flat:
        files: dict[str, list[Path]] = {"cat": [], "dog": []}
        for p in flat:
            files[p.name.split(".")[0].lower()].append(p)
        if all(files.values()):
            return Discovered("kaggle", data_dir, files)
        if not classes:
            present, missing = sorted(files, key=lambda c: not files[c])
            raise DataError(
                f"--data-dir {data_dir} has {len(files[present])} {present}.N.jpg files but no {missing}.N.jpg "
                "files; two classes are needed (Kaggle's train/ holds both)"
            )

    # a wrapper folder (PetImages.zip and train.zip unpack into one sub-folder): look one level down
    subdirs = _visible_dirs(data_dir)
    loose = len(_image_files(data_dir))
    if len(subdirs) == 1 and not loose:
        try:
            return discover(subdirs[0])
        except DataError:
            if len(classes) != 1:  # a wrapper folder: its own error says what is wrong inside
                raise
    if len(classes) == 1:  # one class folder holding images (the others, if any, are empty)
        ((name, files),) = classes.items()
        empty = [f"{d.name}/" for d in subdirs if d.name != name]
        others = f"; {' and '.join(empty)} {'holds' if len(empty) == 1 else 'hold'} no images" if empty else ""
        loose_note = f"; {loose} loose images beside it" if loose else ""
        raise DataError(
            f"--data-dir {data_dir} has only one class folder, {name}/ ({len(files)} images){others}{loose_note}; "
            "two classes are needed (e.g. Cat/ and Dog/, or any two class folders): add a folder with the other "
            "class's images"
        )
    if not subdirs and loose:
        raise DataError(
            f"--data-dir {data_dir} holds {loose} images but no class folders; point --data-dir at the folder "
            "that holds the two class folders (e.g. PetImages/ with Cat/ and Dog/), or name the files "
            "cat.N.jpg / dog.N.jpg (Kaggle's layout)"
        )

    found = ", ".join(f"{d.name}/ ({len(_image_files(d))} images)" for d in subdirs) or "no sub-folders"
    raise DataError(
        f"--data-dir {data_dir}: no supported layout found (found {found}; {loose} loose images). Expected one of: "
        "Cat/ and Dog/ folders (Microsoft PetImages); flat cat.N.jpg/dog.N.jpg files (Kaggle train/); "
        "train/ and validation/ each with two class folders; or any folder with exactly two non-empty class folders."
    )


def _positive_first(class_names: Sequence[str], positive_class: str) -> tuple[str, str]:
    """(negative, positive) class names, matching `positive_class` case-insensitively."""
    matches = [c for c in class_names if c.lower() == positive_class.lower()]
    if len(matches) > 1:
        raise DataError(
            f"--positive-class {positive_class!r} matches {len(matches)} class folders, "
            f"{' and '.join(f'{c}/' for c in sorted(matches))}, which differ only in case (names are compared "
            "case-insensitively): merge them into one folder, or rename one"
        )
    if len(matches) != 1:
        raise DataError(f"--positive-class {positive_class!r} is not one of the classes found: {sorted(class_names)}")
    negative = [c for c in class_names if c != matches[0]]
    return negative[0], matches[0]


# --------------------------------------------------------------------------------------- integrity scan


class UnsupportedImage(ValueError):
    """A decoded image whose mode or values `to_rgb` cannot turn into 8-bit RGB faithfully."""


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8), "L").convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Every mode Pillow opens, as an 8-bit RGB image (a new image: `img` may be closed afterwards).

    Pillow's own `convert("RGB")` clips the wide grayscale modes to 0..255, so a 16-bit PNG or TIFF comes out
    white. Here they are scaled by their real range instead:
    - I;16, I;16L, I;16B, I;16N (16-bit): v >> 8;
    - I (32-bit integer): values in 0..255 are taken as 8-bit, values in 0..65535 as 16-bit (>> 8), anything
      else (negative, or wider than 16 bits) is refused;
    - F (32-bit float): values in [0, 1] are scaled by 255, values in [0, 255] taken as 8-bit (rounded), and
      NaN, inf or other ranges are refused.
    The 8-bit modes (1, L, LA, P, PA, RGBA, CMYK, YCbCr, LAB, HSV, ...) go through Pillow's conversion; a mode
    it cannot convert is refused. Refused images raise `UnsupportedImage` with the reason.
    """
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        values = np.asarray(img)
        if values.size == 0:
            raise UnsupportedImage(f"mode {mode} image without pixels")
        if mode in _SIXTEEN_BIT_MODES:
            return _gray_to_rgb(values.astype(np.uint16) >> 8)
        if mode == "F" and not np.isfinite(values).all():
            raise UnsupportedImage("mode F (32-bit float) with pixels that are not finite (NaN or inf)")
        low, high = values.min(), values.max()
        if mode == "I":
            if low < 0 or high > 65535:
                raise UnsupportedImage(
                    f"mode I (32-bit integer) with values {low}..{high}, outside 0..255 (8-bit) and 0..65535 (16-bit)"
                )
            return _gray_to_rgb(values if high <= 255 else values >> 8)
        if low < 0 or high > 255:
            raise UnsupportedImage(
                f"mode F (32-bit float) with values {low:g}..{high:g}, outside 0..1 and 0..255; convert it to 8-bit"
            )
        scaled = values * 255.0 if high <= 1 else values
        return _gray_to_rgb(np.clip(np.round(scaled), 0, 255))
    try:
        return img.convert("RGB")  # 1, L, LA, P, PA, RGBA, CMYK, YCbCr, LAB, HSV: 8 bits per channel already
    except ValueError as error:  # e.g. "conversion from La to L not supported"
        raise UnsupportedImage(f"mode {mode} cannot be converted to RGB ({error})") from error


def check_image(path: str) -> str | None:
    """None if the file decodes to an RGB image (`to_rgb`); otherwise the reason it cannot be used."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as img:
            img.load()  # a full decode: truncated JPEGs fail here, not in the middle of an epoch
            to_rgb(img)
    except UnsupportedImage as error:
        return f"unsupported image: {error}"
    except Image.DecompressionBombError as error:
        return f"refused as a decompression bomb: {error}"
    except (OSError, SyntaxError, ValueError) as error:
        text = str(error)
        if "truncated" in text.lower():
            return f"truncated image: {text}"
        if "cannot identify image file" in text:
            return "not an image (undecodable)"
        return f"undecodable: {text}"
    return None


def _cache_dir() -> Path:
    return Path(os.environ.get("IMBALANCE_CACHE", Path.home() / ".cache" / "imbalance"))


def _local_rank() -> int:
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def _die_with_parent(parent_pid: int, direct_child: bool) -> None:
    """Initializer of the scan's and the cache's worker processes: they end when the process that started them
    dies, even by kill -9, instead of waiting forever, orphaned, for work that will never come.

    On Linux the kernel sends SIGKILL at the parent's death (prctl PR_SET_PDEATHSIG); everywhere, a watchdog
    thread exits once the parent process changes (the worker was re-parented)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # no prctl in this libc: the watchdog still works
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    parent = os.getppid()
    if direct_child and parent != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _worker_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers die with this process (`_die_with_parent`)."""
    context = multiprocessing.get_context()
    direct = context.get_start_method() in ("fork", "spawn")  # forkserver children are the server's, not ours
    return ProcessPoolExecutor(
        workers, mp_context=context, initializer=_die_with_parent, initargs=(os.getpid(), direct)
    )


SCAN_VERSION = 2  # 2: images decoded by to_rgb (16-bit scaled, unconvertible modes refused)


def scan_images(files: Sequence[Path], root: Path, workers: int | None = None) -> dict[str, str]:
    """Decode every file once; return {path: reason} for the bad ones.

    Results are cached per root in `$IMBALANCE_CACHE` (default ~/.cache/imbalance) by (path, size, mtime),
    so a second run, a DDP rank or a case-study cell reads the cache instead of decoding 25,000 JPEGs again.
    """
    root_hash = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    cache_file = _cache_dir() / f"scan-v{SCAN_VERSION}-{root_hash}.json"
    waited = 0.0
    while True:
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, json.JSONDecodeError):
            cache = {}
        results: dict[str, str | None] = {}
        todo: list[str] = []
        for path in map(str, files):
            stat = os.stat(path)
            entry = cache.get(path)
            if entry is not None and entry[:2] == [stat.st_size, stat.st_mtime_ns]:
                results[path] = entry[2]
            else:
                todo.append(path)
        # Under torchrun or SLURM every process starts at once: local rank 0 scans, the others wait for its
        # cache (up to 30 min) instead of decoding the same 25,000 files N times over.
        if not todo or _local_rank() == 0 or waited > 1800:
            break
        time.sleep(1.0)
        waited += 1.0
    if todo:
        workers = workers or min(8, os.cpu_count() or 1)
        if workers > 1 and len(todo) > 256:
            with _worker_pool(workers) as pool:
                reasons = list(pool.map(check_image, todo, chunksize=64))
        else:
            reasons = [check_image(p) for p in todo]
        for path, reason in zip(todo, reasons, strict=True):
            stat = os.stat(path)
            cache[path] = [stat.st_size, stat.st_mtime_ns, reason]
            results[path] = reason
        atomic_write_text(cache_file, json.dumps(cache))
    return {path: reason for path, reason in results.items() if reason is not None}


# -------------------------------------------------------------------------------------------- splits


Counts = tuple[tuple[int, int], tuple[int, int]]  # ((train pos, train neg), (val pos, val neg))


def _asked_counts(cfg: RunConfig) -> Counts | None:
    """The split sizes the options ask for, before --scale; None for 'use every image'."""
    if cfg.split is not None:
        return SPLIT_PRESETS[cfg.split]
    if cfg.train_counts is not None or cfg.val_counts is not None:
        if cfg.train_counts is None:
            raise DataError("--val-counts needs --train-counts too (both are 'positive,negative')")
        return tuple(cfg.train_counts), tuple(cfg.val_counts or SPLIT_PRESETS["balanced"][1])  # type: ignore[return-value]
    return None


def _scaled(counts: Counts, scale: float) -> Counts:
    return tuple(tuple(max(1, round(c * scale)) for c in part) for part in counts)  # type: ignore[return-value]


def split_counts(cfg: RunConfig) -> Counts | None:
    """((train pos, train neg), (val pos, val neg)) after --scale, or None for 'use every image'."""
    asked = _asked_counts(cfg)
    return None if asked is None else _scaled(asked, cfg.scale)


def _fitting_scale(usable: dict[int, int], asked: Counts) -> float | None:
    """The largest --scale with two significant digits at which every class (label -> usable images) holds
    its scaled counts, or None when none does (a class with fewer than 2 images: 1 train + 1 val at least)."""
    if min(usable.values()) < 2:
        return None

    def fits(scale: float) -> bool:
        scaled = _scaled(asked, scale)
        return all(scaled[0][1 - label] + scaled[1][1 - label] <= n for label, n in usable.items())

    bound = min(n / (asked[0][1 - label] + asked[1][1 - label]) for label, n in usable.items())
    exponent = math.floor(math.log10(bound))
    for _ in range(30):  # at small enough scales every count rounds to 1 and 2 images per class fit
        for mantissa in range(99, 9, -1):
            scale = float(f"{mantissa}e{exponent - 1}")
            if scale <= bound and fits(scale):
                return scale
        exponent -= 1
    return None


def _scan_note(paths: Sequence[Path], bad: dict[str, str], root: Path) -> str:
    """What the integrity scan rejected among a class's files: a count per reason and an example file."""
    groups: dict[str, list[str]] = {}
    for path in paths:
        reason = bad.get(str(path))
        if reason is not None:
            groups.setdefault(reason.split(":")[0], []).append(str(Path(path).relative_to(root)))
    if not groups:
        return ""
    rejected = sum(len(files) for files in groups.values())
    kinds = "; ".join(
        f"{len(files)} {kind}, e.g. {min(files)}"
        for kind, files in sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
    )
    if rejected == len(paths):
        return (
            f"; the integrity scan rejected all {rejected} of its files ({kinds}): replace or remove the broken files"
        )
    return f"; the integrity scan rejected {rejected} of its {len(paths)} files ({kinds})"


def _check_class_sizes(
    found: Discovered, class_names: tuple[str, str], usable: dict[str, list[str]], cfg: RunConfig, bad: dict[str, str]
) -> None:
    """Refuse, before any split is drawn, a class with too few usable images for what is asked, saying why
    (the scan's reasons) and, for split sizes, the largest --scale that fits (never a scale of 0)."""

    def images(n: int) -> str:
        return f"{n} usable image{'' if n == 1 else 's'}"

    if found.presplit is not None:
        for part in ("train", "val"):
            for name in class_names:
                paths = found.presplit[part][name]
                if not any(str(p) not in bad for p in paths):
                    raise DataError(
                        f"class {name!r} has no usable images in the {part} part of the pre-split --data-dir "
                        f"{cfg.data_dir}{_scan_note(paths, bad, found.root)}"
                    )
        return
    asked = _asked_counts(cfg)
    counts = None if asked is None else _scaled(asked, cfg.scale)
    for label in (1, 0):
        name = class_names[label]
        n = len(usable[name])
        note = _scan_note(found.files[name], bad, found.root)
        if counts is None:
            needed, parts = (3, "1 train + 1 dev + 1 val") if cfg.dev_fraction else (2, "1 train + 1 val")
            if n < needed:
                raise DataError(
                    f"class {name!r} has {images(n)} but a split needs at least {needed} per class ({parts}){note}"
                )
            continue
        n_train, n_val = counts[0][1 - label], counts[1][1 - label]
        if n_train + n_val > n:
            scale = _fitting_scale({lab: len(usable[class_names[lab]]) for lab in (0, 1)}, asked)  # type: ignore[arg-type]
            hint = (
                f"use fewer, e.g. --scale {scale:g} (every count x {scale:g})"
                if scale is not None
                else "no scale fits: every class needs at least 2 usable images (1 train + 1 val)"
            )
            raise DataError(
                f"class {name!r} has {images(n)} but the split asks for {n_train + n_val} "
                f"({n_train} train + {n_val} val); {hint}{note}"
            )


def _class_permutation(files: Sequence[str], seed: int, class_name: str) -> list[str]:
    # One seeded permutation per class, independent of the other class and of the preset: so the validation
    # set (its head) is the same for every preset, and the training sets (what follows) are nested.
    rng = np.random.default_rng([seed, zlib.crc32(class_name.lower().encode())])
    order = rng.permutation(len(files))
    return [files[i] for i in order]


def dev_positions(n: int, fraction: float) -> np.ndarray:
    """Which of a class's `n` training photos (in its seeded permutation's order) are held out as dev: position
    i when ceil((i + 1) f) > ceil(i f). That is ceil(n f) photos, at least one for any f > 0, spread evenly
    through the permutation, and the first n' < n positions hold exactly the dev photos of a class of n', so the
    dev sets are nested across presets like the training sets (imbalanced-2's dev cats are among imbalanced-1's).
    The fraction is taken as the decimal it was written as (0.1 is 1/10 exactly, not 0.1000000000000000055)."""
    f = Fraction(str(fraction)).limit_denominator(10**6)  # 0.30000000000000004 (0.1 * 3) is 3/10
    m = np.arange(n + 1, dtype=np.int64)  # m * numerator stays far below 2**63 for any real class size
    held_among_first = -((-m * f.numerator) // f.denominator)  # ceil(m f) in integers, exactly
    return np.diff(held_among_first) > 0


def _carve_dev(
    items: Sequence[str], label: int, fraction: float, name: str
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, dev) of one class's training photos, given in their permutation order."""
    held = dev_positions(len(items), fraction)
    if fraction and held.all():
        hint = (
            "any --dev-fraction above 0 holds out at least one image per class: use more training images, or "
            "--dev-fraction 0"
            if len(items) == 1
            else "use a smaller --dev-fraction, more training images, or --dev-fraction 0"
        )
        raise DataError(
            f"--dev-fraction {fraction:g} holds out all {len(items)} training images of class {name!r}, leaving "
            f"none to train on; {hint}"
        )
    train = [(p, label) for p, dev in zip(items, held, strict=True) if not dev]
    dev = [(p, label) for p, dev in zip(items, held, strict=True) if dev]
    return train, dev


def draw_split(
    files: dict[str, list[str]],
    class_names: tuple[str, str],
    counts: tuple[tuple[int, int], tuple[int, int]] | None,
    seed: int,
    scale: float = 1.0,
    dev_fraction: float = 0.0,
) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, dev, val): validation first, then training, from each class's seeded permutation; the dev part
    is carved out of the training photos (`dev_positions`). Ids keep their given form. With no counts, every
    image is used (`scale` of them), 12% of each class for validation."""
    train: list[tuple[str, int]] = []
    dev: list[tuple[str, int]] = []
    val: list[tuple[str, int]] = []
    for label in (1, 0):
        name = class_names[label]
        pool = _class_permutation(sorted(files[name]), seed, name)
        if counts is None:
            used = max(2, round(scale * len(pool)))
            n_val = max(1, round(DEFAULT_VAL_FRACTION * used))
            n_train = used - n_val
        else:
            # counts are positive-first; label 1 is the positive class
            n_train = counts[0][1 - label]
            n_val = counts[1][1 - label]
        if n_train + n_val > len(pool):  # load_split checks first, with the scan's reasons and a --scale
            raise DataError(
                f"class {name!r} has {len(pool)} usable images but the split asks for {n_train + n_val} "
                f"({n_train} train + {n_val} val); ask for fewer"
            )
        val += [(p, label) for p in pool[:n_val]]
        kept, held = _carve_dev(pool[n_val : n_val + n_train], label, dev_fraction, name)
        train += kept
        dev += held
    return sorted(train), sorted(dev), sorted(val)


def load_split(cfg: RunConfig) -> SplitData:
    """Discover, scan and split `cfg.data_dir`, or replay `cfg.manifest`, or fall back to the digits."""
    if cfg.manifest is not None:
        return load_manifest(cfg.manifest, cfg.data_dir)
    if cfg.data_dir is None:
        return embedded_digits(cfg.seed, cfg.dev_fraction)
    found = discover(cfg.data_dir)
    all_files = [p for files in found.files.values() for p in files]
    bad = scan_images(all_files, found.root)
    skipped = sorted((str(Path(p).relative_to(found.root)), reason) for p, reason in bad.items())
    class_names = _positive_first(list(found.files), cfg.positive_class)

    def usable(paths: Sequence[Path]) -> list[str]:
        return [str(p.relative_to(found.root)) for p in paths if str(p) not in bad]

    if found.presplit is not None:
        given = _split_options(cfg)
        if given:
            raise DataError(
                f"{', '.join(given)}: --data-dir {cfg.data_dir} is already split into train/ and validation/ and "
                f"is used as given; drop {'it' if len(given) == 1 else 'them'}, or point --data-dir at an unsplit folder"
            )
        _check_class_sizes(found, class_names, {}, cfg, bad)
        train, dev = [], []
        for c, f in found.presplit["train"].items():  # dev from train/, in a seeded order as for unsplit folders
            kept, held = _carve_dev(
                _class_permutation(sorted(usable(f)), cfg.seed, c), int(c == class_names[1]), cfg.dev_fraction, c
            )
            train += kept
            dev += held
        train, dev = sorted(train), sorted(dev)
        val = sorted((p, int(c == class_names[1])) for c, f in found.presplit["val"].items() for p in usable(f))
    else:
        files = {c: usable(f) for c, f in found.files.items()}
        _check_class_sizes(found, class_names, files, cfg, bad)
        train, dev, val = draw_split(files, class_names, split_counts(cfg), cfg.seed, cfg.scale, cfg.dev_fraction)
    source = f"{found.layout} photos in {found.root}"
    return SplitData(source, class_names, train, val, found.root, skipped, found.layout, dev, cfg.dev_fraction)


def _split_options(cfg: RunConfig) -> list[str]:
    """The split-size options `cfg` sets, as flags: a pre-split folder takes none of them."""
    given = [f"--split {cfg.split}"] if cfg.split is not None else []
    for name in ("train_counts", "val_counts"):
        if getattr(cfg, name) is not None:
            given.append(f"--{name.replace('_', '-')} {','.join(map(str, getattr(cfg, name)))}")
    if cfg.scale != 1:
        given.append(f"--scale {cfg.scale:g}")
    return given


MANIFEST_KEYS = ("version", "sha256", "root", "layout", "class_names", "train", "val")  # and "dev" from version 3


def _manifest_problem(manifest: object) -> str | None:
    """What makes `manifest` not a manifest of this repository, or None: checked before any key is read."""
    if not isinstance(manifest, dict):
        return f"not a JSON object (found a {type(manifest).__name__})"
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        return f"missing keys {missing}"
    version = manifest["version"]
    if version not in range(1, MANIFEST_VERSION + 1) or isinstance(version, bool):
        return f"version {version!r} is unknown (this code reads 1 to {MANIFEST_VERSION}); is it from a newer version?"
    if version >= 3 and "dev" not in manifest:
        return "missing key 'dev' (a version 3 manifest lists its dev split)"
    if not isinstance(manifest["sha256"], str) or not isinstance(manifest["layout"], str):
        return "'sha256' and 'layout' must be strings"
    if manifest["root"] is not None and not isinstance(manifest["root"], str):
        return "'root' must be a folder path or null"
    names = manifest["class_names"]
    if not (isinstance(names, list) and len(names) == 2 and all(isinstance(n, str) for n in names)):
        return f"'class_names' must hold exactly two class names (negative, positive), found {names!r}"
    for key in ("train", "dev", "val") if version >= 3 else ("train", "val"):
        items = manifest[key]
        if not isinstance(items, list):
            return f"'{key}' must be a list of [path, label] pairs, found a {type(items).__name__}"
        for i, item in enumerate(items):
            pair = isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
            if not (pair and type(item[1]) is int and item[1] in (0, 1)):
                return f"'{key}' item {i} is {item!r}, not a [path, label] pair with label 0 or 1"
    return None


def read_manifest(path: Path, what: str = "--manifest") -> dict:
    """A manifest's JSON, checked whole before use: its shape and version, its sha256 (so no hand edit goes
    unnoticed) and that no file is in two of train, dev and val. `what` names the file in errors."""
    path = Path(path)
    if not path.is_file():
        state = "is a folder, not a manifest.json file" if path.is_dir() else "does not exist"
        raise DataError(f"{what} {path} {state}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{what} {path} cannot be read as JSON: {error}") from error
    problem = _manifest_problem(manifest)
    if problem is not None:
        raise DataError(f"{what} {path} is not a manifest.json of this repository: {problem}")
    if manifest_digest(manifest, manifest["version"]) != manifest["sha256"]:
        raise DataError(
            f"{what} {path}: its contents do not match its sha256; was it edited by hand? Use a manifest.json as a run wrote it"
        )
    parts = {key: {p for p, _ in manifest.get(key, [])} for key in ("train", "dev", "val")}
    for a, b in (("train", "val"), ("train", "dev"), ("dev", "val")):
        shared = sorted(parts[a] & parts[b])
        if shared:
            break
    if shared:
        raise DataError(
            f"{what} {path} lists {len(shared)} files in both {a} and {b}, e.g. {shared[0]}; "
            "a split must keep them apart: use a manifest.json as a run wrote it"
        )
    return manifest


def load_manifest(
    path: Path, data_dir: Path | None = None, parts: Sequence[str] = ("train", "dev", "val"), what: str = "--manifest"
) -> SplitData:
    """Replay a manifest written by an earlier run, under `data_dir` if given (else the manifest's root)."""
    return split_from_manifest(path, read_manifest(path, what), data_dir, parts, what)


def split_from_manifest(
    path: Path,
    manifest: dict,
    data_dir: Path | None,
    parts: Sequence[str] = ("train", "dev", "val"),
    what: str = "--manifest",
) -> SplitData:
    """The split of a checked manifest (see `read_manifest`). The files of `parts` must still exist and pass
    the integrity scan: a split is replayed as it was or refused, never silently changed. Evaluation checks
    only "val", so a training photo removed since the run does not matter to it."""
    train = [(p, label) for p, label in manifest["train"]]
    dev = [(p, label) for p, label in manifest.get("dev", [])]  # none before version 3
    val = [(p, label) for p, label in manifest["val"]]
    if manifest["layout"] == "embedded":
        return _embedded_manifest(path, manifest, train, dev, val, what)
    root = data_dir if data_dir is not None else manifest["root"]
    if root is None:
        raise DataError(
            f"{what} {path} does not say where its photos are (root is null); say it: --manifest FILE --data-dir DIR"
        )
    root = Path(root)
    checked = [p for part in parts for p, _ in manifest.get(part, [])]
    missing = [p for p in checked if not (root / p).is_file()]
    if missing:
        raise DataError(
            f"{what} {path}: {len(missing)} files are missing under {root}, e.g. {missing[0]}; the folder changed "
            "since the run: restore them, or replay it under a copy that has them (--manifest FILE --data-dir DIR)"
        )
    bad = scan_images([root / p for p in checked], root)
    if bad:
        first, reason = sorted(bad.items())[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(
            f"{what} {path}: {Path(first).relative_to(root)} no longer passes the integrity scan ({reason}){more}; "
            "the folder changed since the run: restore the file"
        )
    source = f"manifest {path} over {root}"
    fraction = _manifest_dev_fraction(manifest, dev)
    return SplitData(source, tuple(manifest["class_names"]), train, val, root, [], manifest["layout"], dev, fraction)  # type: ignore[arg-type]


def _manifest_dev_fraction(manifest: dict, dev: list) -> float:
    """The --dev-fraction a manifest's dev list was carved with (0 for one without a dev list)."""
    value = manifest.get("dev_fraction")
    if not dev:
        return 0.0
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _embedded_manifest(path: Path, manifest: dict, train: list, dev: list, val: list, what: str) -> SplitData:
    """A digits manifest: its ids and labels must be the embedded data set's."""
    split = embedded_digits(seed=0)
    if tuple(manifest["class_names"]) != split.class_names:
        raise DataError(
            f"{what} {path}: class names {manifest['class_names']} are not the digits' {list(split.class_names)}"
        )
    labels = dict(split.train + split.val)
    wrong = [(p, label) for p, label in train + dev + val if labels.get(p) != label]
    if wrong:
        raise DataError(f"{what} {path}: {wrong[0][0]} with label {wrong[0][1]} is not one of the embedded digits")
    split.source = f"{EMBEDDED_NAME}, split replayed from manifest {path}"
    split.train, split.dev, split.val = train, dev, val
    split.dev_fraction = _manifest_dev_fraction(manifest, dev)
    return split


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 8x8, values 0..16 -> 0..255
    return images, digits.target


def embedded_digits(seed: int, dev_fraction: float = 0.0) -> SplitData:
    """scikit-learn's 1,797 handwritten digits as an imbalanced two-class task: '8' (about 1 in 10,
    the positive, minority class) against every other digit; a stratified 75/25 split, the dev part carved
    from the 75."""
    _, target = _digits()
    ids = {
        "8": [f"digits:{i}" for i in np.flatnonzero(target == EMBEDDED_POSITIVE_DIGIT)],
        "not-8": [f"digits:{i}" for i in np.flatnonzero(target != EMBEDDED_POSITIVE_DIGIT)],
    }
    counts = {name: len(v) for name, v in ids.items()}
    val_n = {name: round(0.25 * n) for name, n in counts.items()}
    split_sizes = ((counts["8"] - val_n["8"], counts["not-8"] - val_n["not-8"]), (val_n["8"], val_n["not-8"]))
    train, dev, val = draw_split(ids, ("not-8", "8"), split_sizes, seed, dev_fraction=dev_fraction)
    return SplitData(EMBEDDED_NAME, ("not-8", "8"), train, val, dev=dev, dev_fraction=dev_fraction)


# ------------------------------------------------------------------------------------------- datasets


class ImageDataset(Dataset):
    """(image tensor, label, index) for a list of (sample id, label); ids are paths under `root` or
    'digits:<i>'. The index lets the module match predictions back to files under any sampler."""

    def __init__(
        self, items: Sequence[tuple[str, int]], root: Path | None, transform, cache_path: Path | None = None
    ) -> None:
        self.items = list(items)
        self.root = root
        self.transform = transform
        self.cache_path = cache_path
        self._cache: np.ndarray | None = None  # opened lazily, so each worker maps the file itself
        self._digits = _digits()[0] if root is None else None

    def load_input(self, index: int):
        """What the transform takes: a PIL image, or the cached uint8 tensor."""
        if self.cache_path is None:
            return self.load_image(index)
        if self._cache is None:
            self._cache = np.load(self.cache_path, mmap_mode="r")
        # stored (H, W, 3): a (3, H, W) view with channels-last strides, which the uint8 resize takes as it is
        return torch.from_numpy(np.array(self._cache[index])).permute(2, 0, 1)

    def __len__(self) -> int:
        return len(self.items)

    def load_image(self, index: int) -> Image.Image:
        sample_id, _ = self.items[index]
        if self._digits is not None:
            return Image.fromarray(self._digits[int(sample_id.split(":")[1])]).convert("RGB")
        return _decode_rgb(self.root / sample_id)

    def __getitem__(self, key: int | tuple[int, int]):
        """`key` is an index, or (index, augmentation seed) from a training `EpochSampler`."""
        if isinstance(key, tuple):
            index, aug_seed = key
            image = self.load_input(index)
            # The transforms draw from the CPU generator alone, so only it is seeded: torch.manual_seed would
            # also queue a lazy seed for every accelerator backend, formatting the Python stack each time
            # (issue 18: ~1 ms an item inside a loader, as much as a cached item's whole transform).
            if get_worker_info() is None:  # the training process: leave its own random stream as it was
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(aug_seed)
                    tensor = self.transform(image)
            else:  # a loader worker's stream serves these transforms alone, each item seeded anew: no need to
                # save and restore it
                torch.default_generator.manual_seed(aug_seed)
                tensor = self.transform(image)
        else:
            index = key
            tensor = self.transform(self.load_input(index))
        return tensor, self.items[index][1], index


def _decode_rgb(path: Path) -> Image.Image:
    """A photo the scan accepted, as 8-bit RGB (`to_rgb`); a one-line DataError naming the file if it no longer
    decodes (it changed during the run). Raised in a loader worker, `unwrap_worker_error` recovers the line."""
    try:
        with Image.open(path) as img:
            return to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise DataError(
            f"{path} could not be decoded although the scan accepted it ({reason}); was it modified during the run? "
            "Restore it, or remove it and start the run again (the scan will skip it)"
        ) from error


def train_augmentation(image_size: int, augment: str, crop_scale: float) -> list:
    """Photos' random training augmentation, on a PIL image or a uint8 tensor alike: a random crop of at least
    `crop_scale` of the area and a flip (--augment crop-flip), and TrivialAugment's one random op after them
    (--augment trivial; on the final crop, so its geometric ops see the size the network does)."""
    ops = [v2.RandomResizedCrop(image_size, scale=(crop_scale, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    if augment == "trivial":
        ops.append(v2.TrivialAugmentWide())
    elif augment != "crop-flip":
        raise ValueError(f"unknown augmentation {augment!r}; choose 'crop-flip' or 'trivial'")
    return ops


def make_transform(
    image_size: int,
    train: bool,
    photos: bool,
    augment: str = "crop-flip",
    crop_scale: float = DEFAULT_CROP_SCALE,
):
    """PIL image -> uint8 tensor (3, H, W), not yet normalised (`normalize_images` does that on the batch):
    standard augmentation for training (photos: `train_augmentation`); resize (and centre crop for photos) for
    evaluation, which `augment` and `crop_scale` do not change."""
    finish = [v2.ToImage()]
    if not photos:  # digits: no flips (a flipped digit is another symbol), a small shift and scale only
        resize = [v2.Resize((image_size, image_size), antialias=True)]
        if train:
            resize.append(v2.RandomAffine(degrees=8, translate=(0.08, 0.08), scale=(0.9, 1.1)))
        return v2.Compose(resize + finish)
    if train:
        return v2.Compose(train_augmentation(image_size, augment, crop_scale) + finish)
    resize = [v2.Resize(int(math.ceil(image_size / 0.875)), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose(resize + finish)


# ------------------------------------------------------------------------------------ decode-once cache

# 2: decoded by to_rgb (16-bit images scaled, not saturated); 3: each photo stored (H, W, 3), channels last, so
# torchvision's uint8 resize of a training crop needs no re-packing (issue 18: 0.39 -> 0.26 ms a 224-px crop)
CACHE_VERSION = 3


def cache_base_transform(image_size: int, train: bool) -> v2.Compose:
    """The deterministic part of the photo pipeline, PIL -> uint8 (3, H, W), stored by the cache (as (H, W, 3)).

    Validation: resize and centre crop, exactly the uncached evaluation transform before normalisation.
    Training: resize and a centre square of side image_size / 0.875, on which the random crop then works
    (so cached training crops come from the centre square, not the whole photo).
    """
    side = int(math.ceil(image_size / 0.875))
    return v2.Compose([v2.Resize(side, antialias=True), v2.CenterCrop(side if train else image_size), v2.ToImage()])


def cached_transform(
    image_size: int, train: bool, augment: str = "crop-flip", crop_scale: float = DEFAULT_CROP_SCALE
) -> v2.Compose:
    """uint8 tensors from the cache -> the training augmentation's uint8 crops, or (evaluation) as stored."""
    if train:  # the crop's resize returns a contiguous (3, H, W) tensor
        return v2.Compose(train_augmentation(image_size, augment, crop_scale))
    return v2.Compose([v2.Lambda(_contiguous)])


def _contiguous(image: Tensor) -> Tensor:
    return image.contiguous()  # a stored evaluation photo, (3, H, W) in the usual layout like every other item


_NORMALISATION: dict[tuple, tuple[Tensor, Tensor]] = {}  # (device, mean, std) -> their (3, 1, 1) tensors


def normalize_images(
    images: Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32
) -> Tensor:
    """A batch of the datasets' uint8 images (N, 3, H, W) -> scaled to [0, 1] and normalised by the backbone's
    (`mean`, `std`), as `dtype` (the model's, e.g. float64 under --precision 64-true): what the transforms did per
    item before, now done once per batch where the batch is used. The operations are torchvision's own
    (`to_dtype(scale=True)`, then `normalize`), in float32, so the numbers are the same. Anything else (labels,
    features, images already normalised) is returned as it is."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        return images
    key = (images.device, tuple(mean), tuple(std))
    if key not in _NORMALISATION:  # made once per device: a tensor built from a list on a GPU waits for the GPU
        _NORMALISATION[key] = tuple(
            torch.tensor(list(values), dtype=torch.float32, device=images.device).view(-1, 1, 1)
            for values in (mean, std)
        )
    mean_t, std_t = _NORMALISATION[key]
    out = images.to(torch.float32).mul_(1.0 / 255).sub_(mean_t).div_(std_t)
    return out if dtype == torch.float32 else out.to(dtype)


def _decode_for_cache(job: tuple[str, int, bool]) -> np.ndarray:
    path, image_size, train = job
    return cache_base_transform(image_size, train)(_decode_rgb(Path(path))).permute(1, 2, 0).numpy()


def build_decoded_cache(
    items: Sequence[tuple[str, int]], root: Path, image_size: int, train: bool, workers: int | None = None
) -> Path:
    """Decode and resize every image once into a uint8 .npy in $IMBALANCE_CACHE; return its path.

    The file is named by a hash of (root, the exact item list, size, kind), so a changed split or size
    builds a new one. It is memory-mapped read-only by every loader worker and DDP rank (the page cache
    holds one copy). Written to a temporary file and renamed; local ranks > 0 wait for rank 0's file.
    """
    key = json.dumps([CACHE_VERSION, str(Path(root).resolve()), [list(i) for i in items], image_size, train])
    path = _cache_dir() / f"decoded-{hashlib.sha256(key.encode()).hexdigest()[:24]}.npy"
    waited = 0.0
    while not path.is_file() and _local_rank() > 0 and waited < 1800:
        time.sleep(1.0)
        waited += 1.0
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    side = int(math.ceil(image_size / 0.875)) if train else image_size
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(items), side, side, 3))
    jobs = [(str(Path(root) / p), image_size, train) for p, _ in items]
    try:
        workers = workers or min(8, os.cpu_count() or 1)
        if workers > 1 and len(jobs) > 256:
            with _worker_pool(workers) as pool:
                for i, decoded in enumerate(pool.map(_decode_for_cache, jobs, chunksize=64)):
                    array[i] = decoded
        else:
            for i, job in enumerate(jobs):
                array[i] = _decode_for_cache(job)
        array.flush()
        del array
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def evaluation_dataset(
    items: Sequence[tuple[str, int]], root: Path | None, image_size: int, cache: bool
) -> ImageDataset:
    """`items` with the evaluation transform (no augmentation; uint8 images, see `normalize_images`), through
    the decode-once cache when `cache` (photos only; the cache is built here, in the calling process)."""
    if cache and root is not None:
        path = build_decoded_cache(items, root, image_size, train=False)
        return ImageDataset(items, root, cached_transform(image_size, False), path)
    return ImageDataset(items, root, make_transform(image_size, False, root is not None))


def default_image_size(split: SplitData) -> int:
    return 224 if split.root is not None else 32


class TrainEpochSampler(EpochSampler):
    """A training `EpochSampler` that leaves out the last sample of the epoch's shard when it would be a batch
    of its own, i.e. when the shard length modulo the batch size is 1 (and at least one full batch precedes it).

    Batch norm cannot normalise over one sample in training mode ("Expected more than 1 value per channel")
    once the feature map is 1x1, so such a batch would crash the run at the end of its first epoch. Only this
    one sample is dropped, not every incomplete last batch, so a training set smaller than a batch still
    trains. The draw is reshuffled every epoch, so a different sample sits out each time. Under DDP every
    shard has the same length (see `EpochSampler`), so every rank drops the same number and steps alike.
    Under DDP, a shard of a single sample (a set of fewer than two samples per process, which no drop can
    mend) is a `DataError` naming `what`, raised when the sampler is made, before any step.
    Validation uses plain `EpochSampler`s and never drops anything.
    """

    def __init__(
        self,
        labels: Sequence[int],
        mode: str = "none",
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        batch_size: int = 1,
        what: str = "the training split",
        q: float | None = None,
        epochs: int | None = None,
    ) -> None:
        super().__init__(labels, mode, seed, num_replicas, rank, q=q, epochs=epochs)
        self.batch_size = batch_size
        if batch_size > 1 and num_replicas > 1 and super().__len__() == 1:
            raise DataError(
                f"{what} has {self.draw_length()} image(s) per epoch, which leaves {num_replicas} process(es) "
                "one image each: batch norm cannot train on a batch of one; use fewer --devices, or more images"
            )

    def __len__(self) -> int:
        length = super().__len__()
        return length - 1 if length > self.batch_size and length % self.batch_size == 1 else length

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return itertools.islice(super().__iter__(), len(self))


class ImbalanceDataModule(L.LightningDataModule):
    """Train and evaluation loaders over a prepared `SplitData`: the validation loader (dataloader_idx 0,
    logged as val/*) and, when the split has a dev part, the dev loader (dataloader_idx 1, logged as dev/*).

    Sampling is done by `EpochSampler`s built here rather than by Lightning's DistributedSampler: the
    training draw (shuffle, over- or undersampling) is the same on every rank for a (seed, epoch), each rank
    takes a disjoint shard, and validation is sharded without padding, so metrics are exact under DDP.
    """

    def __init__(
        self,
        split: SplitData,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int,
        sampling: str = "none",
        seed: int = 0,
        num_workers: int = 0,
        cache: bool = False,
        sampling_q: float | None = None,
        epochs: int | None = None,
        augment: str = "crop-flip",
        crop_scale: float = DEFAULT_CROP_SCALE,
    ) -> None:
        super().__init__()
        self.split = split
        self.batch_size = batch_size
        self.sampling = sampling
        self.sampling_q = sampling_q  # --sampling sqrt's exponent (None: 1/2)
        self.epochs = epochs  # the run's epochs: the schedule of --sampling progressive
        self.seed = seed
        self.num_workers = num_workers
        self.mean, self.std = tuple(mean), tuple(std)  # applied on the device, see on_after_batch_transfer
        photos = split.root is not None
        if cache and not photos:
            raise DataError("--cache decodes photos once; the embedded digits are already in memory. Drop --cache.")
        # RunConfig refuses these for the digits; a --manifest of the digits is only known here
        if augment != "crop-flip" and not photos:
            raise DataError(f"--augment {augment} augments photos; the embedded digits have their own. Drop --augment.")
        if crop_scale != DEFAULT_CROP_SCALE and not photos:
            raise DataError(f"--crop-scale {crop_scale} sets the crop of photos; the digits are not cropped. Drop it.")
        if cache:  # built here, in the launching process, before any DDP worker starts
            train_cache = build_decoded_cache(split.train, split.root, image_size, train=True)
            transform = cached_transform(image_size, True, augment, crop_scale)
            self.train_set = ImageDataset(split.train, split.root, transform, train_cache)
        else:
            transform = make_transform(image_size, True, photos, augment, crop_scale)
            self.train_set = ImageDataset(split.train, split.root, transform)
        self.val_set = evaluation_dataset(split.val, split.root, image_size, cache)
        self.dev_set = evaluation_dataset(split.dev, split.root, image_size, cache) if split.dev else None

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # every loop's batches (train, val, dev; AutoBalance's pairs of them) are normalised here, on the device;
        # then converted as Lightning converted float batches before they moved (--precision 64-true, bf16-true),
        # which passed these uint8 images over
        batch = apply_to_collection(batch, Tensor, normalize_images, self.mean, self.std)
        trainer = self.trainer
        return batch if trainer is None else trainer.precision_plugin.convert_input(batch)

    def _replicas(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _loader(self, dataset: ImageDataset, sampler: EpochSampler, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=False,
        )

    def _train_sampler(
        self, labels: Sequence[int], mode: str, seed: int, what: str = "the training split"
    ) -> TrainEpochSampler:
        replicas, rank = self._replicas()
        return TrainEpochSampler(
            labels,
            mode,
            seed,
            replicas,
            rank,
            batch_size=self.batch_size,
            what=what,
            q=self.sampling_q,
            epochs=self.epochs,
        )

    def train_dataloader(self) -> DataLoader:
        labels = [label for _, label in self.split.train]
        return self._loader(self.train_set, self._train_sampler(labels, self.sampling, self.seed), train=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        replicas, rank = self._replicas()

        def loader(items: list[tuple[str, int]], dataset: ImageDataset) -> DataLoader:
            labels = [label for _, label in items]
            sampler = EpochSampler(labels, "sequential", seed=self.seed, num_replicas=replicas, rank=rank)
            return self._loader(dataset, sampler, train=False)

        val = loader(self.split.val, self.val_set)
        return val if self.dev_set is None else [val, loader(self.split.dev, self.dev_set)]


class SearchDataModule(ImbalanceDataModule):
    """AutoBalance's search phase: each step pairs a training-part batch with a (cycled) batch of the
    class-balanced validation part, served with evaluation transforms. There is no validation loop."""

    def train_dataloader(self):
        from lightning.pytorch.utilities import CombinedLoader

        train_labels = [label for _, label in self.split.train]
        meta_labels = [label for _, label in self.split.val]
        train_sampler = self._train_sampler(train_labels, self.sampling, self.seed)  # --sampling applies
        train = self._loader(self.train_set, train_sampler, True)
        # the meta batches also go through the backbone in training mode: no lone sample there either
        meta_sampler = self._train_sampler(meta_labels, "none", self.seed + 1, "AutoBalance's search validation part")
        meta = self._loader(self.val_set, meta_sampler, False)
        return CombinedLoader({"train": train, "meta": meta}, mode="max_size_cycle")

    def val_dataloader(self):
        return []
