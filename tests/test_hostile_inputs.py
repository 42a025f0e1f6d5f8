"""Hostile inputs: each one must end in one clear `error: ...` line (exit code 2) or the right outcome, never a
traceback, a silently wrong image or a half-written run folder. Every case builds its data in tmp_path and fails
before any training starts where it can."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_class_tree, write_image
from PIL import Image

from experiments import benchmark as benchmark_cli
from experiments import evaluate as evaluate_cli
from experiments import run as run_cli
from imbalance import data
from imbalance.config import RunConfig
from imbalance.data import DataError, ImageDataset, SplitData, check_image, to_rgb, unwrap_worker_error

TINY = ["--backbone", "test_resnet", "--image-size", "32", "--num-workers", "0", "--logger", "none"]


def cli_error(main, args: list[str], capsys) -> str:
    """Run a CLI's main in-process; it must exit with code 2 and exactly one `error: ...` line on stderr
    (and no traceback). Returns that line."""
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def only_error_line(main, args: list[str], capsys) -> str:
    """As `cli_error`, for errors found before any work: stderr holds that one line and nothing else."""
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


def no_run_folder(tmp_path: Path) -> None:
    """Nothing under runs/: no run folder, not even an empty or half-written one."""
    runs = tmp_path / "runs"
    leftovers = sorted(str(p.relative_to(tmp_path)) for p in runs.rglob("*")) if runs.exists() else []
    assert not leftovers, leftovers


# -------------------------------------------------------------------- 1. numbers that pass validation


NON_FINITE = [
    (["--loss", "focal", "--gamma", "nan"], "--gamma"),
    (["--loss", "focal", "--alpha", "0,nan"], "--alpha"),
    (["--loss", "focal", "--alpha", "inf"], "--alpha"),
    (["--loss", "weighted", "--class-weights", "1,nan"], "--class-weights"),
    (["--loss", "weighted", "--class-weights", "inf,1"], "--class-weights"),
    (["--loss", "logit-adjusted", "--tau", "nan"], "--tau"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--label-smoothing", "nan"], "--label-smoothing"),
    (["--loss", "cb", "--beta", "nan"], "--beta"),
    (["--loss", "bce", "--pos-weight", "inf"], "--pos-weight"),
    (["--loss", "ldam", "--ldam-max-margin", "nan"], "--ldam-max-margin"),
    (["--loss", "ldam", "--ldam-scale", "inf"], "--ldam-scale"),
    (["--weight-decay", "nan"], "--weight-decay"),
    (["--posthoc-la", "nan"], "--posthoc-la"),
    (["--loss", "autobalance", "--autobalance-lr", "inf"], "--autobalance-lr"),
    (["--scale", "nan"], "--scale"),
]


@pytest.mark.parametrize(("args", "flag"), NON_FINITE, ids=[" ".join(a) for a, _ in NON_FINITE])
def test_non_finite_numbers_are_rejected_naming_the_flag(args, flag, capsys, tmp_path):
    line = only_error_line(run_cli.main, [*TINY, *args, "--epochs", "1", "--out", "runs/x"], capsys)
    assert flag in line and "finite" in line, line
    no_run_folder(tmp_path)


def test_every_float_field_is_checked_for_finiteness():
    """The check is generic: a new float option gets it without a line of its own."""
    import dataclasses

    floats = {f.name: str(f.type) for f in dataclasses.fields(RunConfig) if "float" in str(f.type)}
    assert {"gamma", "alpha", "class_weights", "tau", "lr", "scale", "posthoc_la", "autobalance_lr"} <= set(floats)
    for name, kind in floats.items():
        for bad in (float("nan"), float("inf"), -float("inf")):
            value = (1.0, bad) if "tuple" in kind else bad
            with pytest.raises(ValueError, match=f"^--{name.replace('_', '-')} must be a finite number"):
                RunConfig(**{name: value}).validate()


OUT_OF_RANGE = [
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--precision", "17"], "--precision '17' is not one Lightning accepts"),
    (["--precision", "fp16"], "32-true"),
    (["--loss", "ldam", "--ldam-scale", "0"], "--ldam-scale must be positive"),
    (["--loss", "ldam", "--ldam-max-margin", "-1"], "--ldam-max-margin must be positive"),
    (["--loss", "bce", "--pos-weight", "0"], "--pos-weight must be positive"),
    (["--loss", "autobalance", "--autobalance-lr", "0"], "--autobalance-lr must be positive"),
    (["--loss", "ldam", "--drw-epoch", "-1"], "--drw-epoch must be >= 0"),
    (["--seed", "-1"], "--seed must be in [0, 4294967295]"),
    (["--seed", "4294967296"], "--seed must be in [0, 4294967295]"),
]


@pytest.mark.parametrize(("args", "message"), OUT_OF_RANGE, ids=[" ".join(a) for a, _ in OUT_OF_RANGE])
def test_out_of_range_options_are_rejected(args, message, capsys, tmp_path):
    line = only_error_line(run_cli.main, [*TINY, *args, "--epochs", "1", "--out", "runs/x"], capsys)
    assert message in line, line
    no_run_folder(tmp_path)


@pytest.mark.parametrize("precision", ["32-true", "32", "16-mixed", "bf16-mixed", "64-true", "bf16-true", "16-true"])
def test_lightning_precisions_are_accepted(precision):
    RunConfig(precision=precision).validate()


BENCHMARK_BAD = [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--steps", "-3"], "--steps must be at least 1"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--warmup", "-1"], "--warmup must be at least 1"),
    (["--warmup", "0"], "--warmup must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--image-size", "4"], "--image-size must be at least 8"),
    (["--scale", "nan"], "--scale"),
    (["--num-workers", "-2"], "--num-workers must be >= 0"),
    (["--data-dir", "no/such/folder"], "--data-dir no/such/folder does not exist"),
    (["--out", "."], "--out . is a folder"),
]


@pytest.mark.parametrize(("args", "message"), BENCHMARK_BAD, ids=[" ".join(a) for a, _ in BENCHMARK_BAD])
def test_benchmark_nonsense_numbers_are_one_line_errors(args, message, capsys):
    started = time.perf_counter()
    line = only_error_line(benchmark_cli.main, ["--backbone", "test_resnet", *args], capsys)
    assert message in line, line
    assert time.perf_counter() - started < 10, "checked before any measurement"


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    tree = make_class_tree(tmp_path / "pets", {"Cat": 5, "Dog": 5}, size=(16, 16))
    assert run_cli.main([*TINY, "--data-dir", str(tree), "--epochs", "1", "--batch-size", "4", "--out", "runs/t"]) == 0
    return tmp_path / "runs" / "t" / "checkpoints" / "best.ckpt"


def test_evaluate_out_pointing_at_a_file_is_one_line_error(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "result.txt").write_text("keep me")
    args = ["--checkpoint", str(tiny_checkpoint), "--out", "result.txt", "--bootstrap", "0"]
    line = only_error_line(evaluate_cli.main, args, capsys)
    assert "--out result.txt" in line and "is a file" in line, line
    assert (tmp_path / "result.txt").read_text() == "keep me"
    # a folder below a file cannot be made either
    line = only_error_line(evaluate_cli.main, [*args[:3], "result.txt/sub", *args[4:]], capsys)
    assert "--out result.txt/sub" in line, line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--num-workers", "-1"], "--num-workers must be >= 0"),
    ],
)
def test_evaluate_bad_numbers_are_one_line_errors(args, message, tmp_path, capsys):
    line = only_error_line(evaluate_cli.main, ["--checkpoint", "x.ckpt", "--out", "eval", *args], capsys)
    assert message in line, line


# ------------------------------------------------------------------------- 2. every image mode to RGB


def gradient16(width: int = 64, height: int = 48) -> np.ndarray:
    """A 16-bit horizontal+vertical gradient over the whole 0..65535 range."""
    x = np.linspace(0, 65535, width)[None, :]
    y = np.linspace(0, 1, height)[:, None]
    return np.round(x * (0.25 + 0.75 * y)).astype(np.uint16)


def test_16bit_png_decodes_like_its_8bit_version(tmp_path):
    g16 = gradient16()
    g8 = (g16 >> 8).astype(np.uint8)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    Image.fromarray(g8).save(tmp_path / "g8.png")
    with Image.open(tmp_path / "g16.png") as img:
        assert img.mode.startswith("I")  # Pillow's 16-bit grayscale: I;16 (or I in older versions)
    assert check_image(str(tmp_path / "g16.png")) is None

    # the integrity scan, the uncached loader and the decode-once cache all see the 8-bit picture
    dataset = ImageDataset([("g16.png", 1), ("g8.png", 0)], tmp_path, transform=None)
    rgb16, rgb8 = (np.asarray(dataset.load_image(i)) for i in (0, 1))
    assert rgb16.shape == (48, 64, 3) and rgb16.std() > 30, "not a constant (white) image"
    assert np.abs(rgb16.astype(int) - rgb8.astype(int)).max() <= 1
    assert np.abs(rgb16[..., 0].astype(int) - g8.astype(int)).max() <= 1
    cached16 = data._decode_for_cache((str(tmp_path / "g16.png"), 32, False))
    cached8 = data._decode_for_cache((str(tmp_path / "g8.png"), 32, False))
    assert cached16.std() > 30 and np.abs(cached16.astype(int) - cached8.astype(int)).max() <= 1


@pytest.mark.parametrize("mode", ["I;16", "I;16L", "I;16B", "I"])
def test_wide_integer_modes_scale_to_8_bit(mode):
    g16 = gradient16()
    dtype = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I": "<i4"}[mode]
    img = Image.frombytes(mode, (g16.shape[1], g16.shape[0]), g16.astype(dtype).tobytes())
    rgb = np.asarray(to_rgb(img))
    assert rgb.dtype == np.uint8 and rgb.shape == (*g16.shape, 3)
    assert np.abs(rgb[..., 1].astype(int) - (g16 >> 8).astype(int)).max() <= 1


def test_float_images_in_0_1_scale_and_8bit_range_int_stays():
    ramp = np.linspace(0, 1, 64, dtype=np.float32)[None, :].repeat(8, axis=0)
    rgb = np.asarray(to_rgb(Image.fromarray(ramp, "F")))
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255 and np.abs(rgb[0, :, 2] - np.round(ramp[0] * 255)).max() <= 1
    small = np.arange(0, 256, 4, dtype=np.int32)[None, :].repeat(4, axis=0)  # 8-bit values in a 32-bit image
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(small, "I")))[..., 0], small.astype(np.uint8))


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"])
def test_eight_bit_modes_convert_as_pillow_does(mode):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)).convert(mode)
    assert np.array_equal(np.asarray(to_rgb(img)), np.asarray(img.convert("RGB")))


def test_modes_that_cannot_be_converted_land_in_skipped_csv(tmp_path):
    tree = make_class_tree(tmp_path / "pets", {"Cat": 5, "Dog": 5}, size=(16, 16))
    nan_float = np.full((16, 16), 0.5, dtype=np.float32)
    nan_float[3, 3] = np.nan
    Image.fromarray(nan_float, "F").save(tree / "Cat" / "float-nan.tif")
    Image.fromarray(np.full((16, 16), 3.0e6, dtype=np.float32), "F").save(tree / "Cat" / "float-huge.tif")
    Image.fromarray(np.full((16, 16), -5, dtype=np.int32), "I").save(tree / "Dog" / "negative.tif")
    args = [*TINY, "--data-dir", str(tree), "--epochs", "1", "--batch-size", "4", "--out", "runs/modes"]
    assert run_cli.main(args) == 0
    rows = {r["path"]: r["reason"] for r in csv.DictReader((tmp_path / "runs" / "modes" / "skipped.csv").open())}
    assert set(rows) == {"Cat/float-nan.tif", "Cat/float-huge.tif", "Dog/negative.tif"}
    assert "unsupported image" in rows["Cat/float-nan.tif"] and "not finite" in rows["Cat/float-nan.tif"]
    assert "mode F" in rows["Cat/float-huge.tif"] and "3e+06" in rows["Cat/float-huge.tif"]
    assert "mode I" in rows["Dog/negative.tif"] and "-5" in rows["Dog/negative.tif"]


# ---------------------------------------------------------------------------- 3. unclear data messages


def test_one_class_folder_says_two_classes_are_needed(tmp_path, capsys):
    make_class_tree(tmp_path / "pets", {"Cat": 12})
    line = only_error_line(run_cli.main, [*TINY, "--data-dir", "pets", "--out", "runs/x"], capsys)
    assert "only one class folder, Cat/ (12 images)" in line and "two classes" in line, line
    assert "loose images" not in line
    no_run_folder(tmp_path)


def test_one_class_and_an_empty_folder_names_both(tmp_path, capsys):
    make_class_tree(tmp_path / "pets", {"Cat": 12})
    (tmp_path / "pets" / "Dog").mkdir()
    line = only_error_line(run_cli.main, [*TINY, "--data-dir", "pets", "--out", "runs/x"], capsys)
    assert "only one class folder, Cat/ (12 images)" in line and "Dog/ holds no images" in line, line
    no_run_folder(tmp_path)


def test_one_class_folder_inside_a_wrapper_folder(tmp_path, capsys):
    make_class_tree(tmp_path / "download" / "PetImages", {"Dog": 7})
    line = only_error_line(run_cli.main, [*TINY, "--data-dir", "download", "--out", "runs/x"], capsys)
    assert "only one class folder, Dog/ (7 images)" in line and "two classes" in line, line
    no_run_folder(tmp_path)


def test_kaggle_layout_with_one_class_says_which_is_missing(tmp_path, capsys):
    for i in range(5):
        write_image(tmp_path / "train" / f"cat.{i}.jpg", seed=i)
    line = only_error_line(run_cli.main, [*TINY, "--data-dir", "train", "--out", "runs/x"], capsys)
    assert "5 cat.N.jpg files but no dog.N.jpg files" in line and "two classes" in line, line
    no_run_folder(tmp_path)


def test_folder_of_loose_images_points_at_the_folder_above(tmp_path, capsys):
    make_class_tree(tmp_path / "pets", {"Cat": 4, "Dog": 4})
    line = only_error_line(run_cli.main, [*TINY, "--data-dir", "pets/Cat", "--out", "runs/x"], capsys)
    assert "holds 4 images but no class folders" in line and "point --data-dir at the folder" in line, line
    no_run_folder(tmp_path)


def _corrupt_class(folder: Path, n: int) -> None:
    """`n` broken files: every third one empty, the others truncated JPEGs."""
    folder.mkdir(parents=True)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buffer, "JPEG")
    good = buffer.getvalue()
    for i in range(n):
        if i % 3 == 0:
            (folder / f"{i}.jpg").write_bytes(b"")
        else:
            (folder / f"{i}.jpg").write_bytes(good[: len(good) // 2])


def test_class_with_only_corrupt_files_shows_the_scan_reasons(tmp_path, capsys):
    make_class_tree(tmp_path / "pets", {"Cat": 6})
    _corrupt_class(tmp_path / "pets" / "Dog", 6)
    line = only_error_line(run_cli.main, [*TINY, "--data-dir", "pets", "--out", "runs/x"], capsys)
    assert "class 'Dog' has 0 usable images" in line, line
    assert "rejected all 6" in line and "4 truncated image, e.g. Dog/1.jpg" in line, line
    assert "2 empty file (0 bytes), e.g. Dog/0.jpg" in line, line
    assert "--scale" not in line, line
    no_run_folder(tmp_path)


def test_too_few_usable_images_suggests_a_working_nonzero_scale(tmp_path, capsys):
    make_class_tree(tmp_path / "pets", {"Cat": 4, "Dog": 40}, size=(8, 8))
    (tmp_path / "pets" / "Cat" / "x.jpg").write_bytes(b"")
    base = [*TINY, "--data-dir", "pets", "--out", "runs/x"]
    line = only_error_line(run_cli.main, [*base, "--train-counts", "1000,1000", "--val-counts", "100,100"], capsys)
    assert "class 'Cat' has 4 usable images" in line and "1 empty file (0 bytes), e.g. Cat/x.jpg" in line, line
    scale = float(line.split("--scale ")[1].split()[0])
    assert scale > 0
    assert (
        run_cli.main(
            [*base, "--train-counts", "1000,1000", "--val-counts", "100,100", "--scale", str(scale), "--fast-dev-run"]
        )
        == 0
    ), "the suggested --scale fits"
    # no class can fit any scale: no suggestion
    line = only_error_line(
        run_cli.main,
        [*TINY, "--data-dir", str(make_class_tree(tmp_path / "one", {"Cat": 1, "Dog": 9})), "--split", "balanced"],
        capsys,
    )
    assert "class 'Cat' has 1 usable image" in line and "--scale" not in line, line


@pytest.mark.parametrize("folders", [("Cat", "cat", "Dog"), ("Cat", "cat")])
def test_positive_class_matching_two_folders_explains_the_clash(folders, tmp_path, capsys):
    make_class_tree(tmp_path / "pets", dict.fromkeys(folders, 3))
    line = only_error_line(
        run_cli.main, [*TINY, "--data-dir", "pets", "--positive-class", "cat", "--out", "runs/x"], capsys
    )
    assert "Cat/" in line and "cat/" in line and "differ only in case" in line, line
    no_run_folder(tmp_path)


def _photo_manifest(tmp_path: Path) -> tuple[Path, list[str]]:
    tree = make_class_tree(tmp_path / "pets", {"Cat": 5, "Dog": 7}, size=(16, 16))  # train 4 + 6
    args = [*TINY, "--epochs", "1", "--batch-size", "4"]
    assert run_cli.main([*args, "--data-dir", str(tree), "--out", "runs/a"]) == 0
    return tmp_path / "runs" / "a" / "manifest.json", args


def test_manifest_without_data_dir_replays_a_photo_split(tmp_path, capsys):
    manifest, args = _photo_manifest(tmp_path)
    assert run_cli.main([*args, "--manifest", str(manifest), "--cache", "--out", "runs/b"]) == 0
    assert "embedded digits" not in capsys.readouterr().out
    replayed = json.loads((tmp_path / "runs" / "b" / "manifest.json").read_text())
    assert replayed["sha256"] == json.loads(manifest.read_text())["sha256"]


@pytest.mark.parametrize("extra", [["--split", "balanced"], ["--train-counts", "2,2"], ["--scale", "0.5"]])
def test_manifest_with_split_options_is_refused_for_the_manifest_reason(extra, tmp_path, capsys):
    manifest = tmp_path / "manifest.json"  # refused before the file is read
    line = only_error_line(run_cli.main, [*TINY, "--manifest", str(manifest), *extra], capsys)
    assert "--manifest replays a saved split exactly" in line and "digits" not in line, line


# ------------------------------------------------------------------ 4. a lone sample in the last batch


def test_training_count_modulo_batch_of_one_trains(tmp_path):
    # val 1 + 1, dev 1 + 1 (ceil(0.1 * n) of each class's training photos), train 4 + 5 = 9 = 2 * 4 + 1
    tree = make_class_tree(tmp_path / "pets", {"Cat": 6, "Dog": 7}, size=(16, 16))
    args = [*TINY, "--data-dir", str(tree), "--epochs", "1", "--batch-size", "4", "--out", "runs/odd"]
    assert run_cli.main(args) == 0
    summary = json.loads((tmp_path / "runs" / "odd" / "summary.json").read_text())
    assert summary["train_counts"] == {"Cat": 4, "Dog": 5} and summary["dev_counts"] == {"Cat": 1, "Dog": 1}
    assert summary["epochs_completed"] == 1


def _digits_split(n_train: int, n_val: int) -> SplitData:
    train = [(f"digits:{i}", i % 2) for i in range(n_train)]
    val = [(f"digits:{i}", i % 2) for i in range(n_train, n_train + n_val)]
    return SplitData("digits", ("not-8", "8"), train, val)


@pytest.mark.parametrize(
    ("n_train", "batch", "sizes"), [(9, 4, [4, 4]), (8, 4, [4, 4]), (10, 4, [4, 4, 2]), (1, 4, [1])]
)
def test_training_loader_drops_only_a_lone_last_sample(n_train, batch, sizes):
    module = data.ImbalanceDataModule(_digits_split(n_train, 5), 8, (0.5,) * 3, (0.5,) * 3, batch)
    loader = module.train_dataloader()
    assert [len(y) for _, y, _ in loader] == sizes and len(loader) == len(sizes)
    val = module.val_dataloader()  # validation never drops anything: 5 = 4 + 1
    assert [len(y) for _, y, _ in val] == [4, 1]


def test_lone_sample_rule_is_the_same_on_every_rank():
    labels = [0, 1] * 9 + [0]  # 19 samples over 2 ranks: shards of 10 (one padded), batch 3 -> 10 % 3 == 1
    shards = [data.TrainEpochSampler(labels, "none", 0, 2, rank, batch_size=3) for rank in (0, 1)]
    assert [len(s) for s in shards] == [9, 9] and [len(list(s)) for s in shards] == [9, 9]


# -------------------------------------------------------------- 5. a photo that breaks during the run


def _break_after_scan(monkeypatch, victim: Path) -> None:
    """The scan accepts `victim`; then it is truncated, before the first epoch reads it."""
    original = data.scan_images

    def scan_then_truncate(*args, **kwargs):
        bad = original(*args, **kwargs)
        good = victim.read_bytes()
        victim.write_bytes(good[: len(good) // 3])
        return bad

    monkeypatch.setattr(data, "scan_images", scan_then_truncate)


def test_photo_truncated_after_the_scan_is_one_line_from_the_worker(tmp_path, monkeypatch):
    from imbalance.train import fit

    tree = make_class_tree(tmp_path / "pets", {"Cat": 5, "Dog": 5}, size=(64, 64))
    victim = tree / "Cat" / "3.jpg"
    _break_after_scan(monkeypatch, victim)
    cfg = RunConfig(
        data_dir=tree, backbone="test_resnet", image_size=32, num_workers=1, logger="none", epochs=1, batch_size=4
    )
    with pytest.raises(Exception) as info:
        fit(cfg.validate())
    assert "Caught DataError in DataLoader worker process" in str(info.value)  # what PyTorch re-raises
    error = unwrap_worker_error(info.value)
    assert isinstance(error, DataError)
    message = str(error)
    assert "\n" not in message and "Traceback" not in message, message
    assert str(victim) in message and "could not be decoded although the scan accepted it" in message, message
    assert unwrap_worker_error(ValueError("unrelated")) is None
    assert unwrap_worker_error(DataError("in-process")) is None
    no_run_folder(tmp_path)  # a run that failed in its first epoch leaves nothing


def test_photo_truncated_after_the_scan_via_the_run_cli(tmp_path, monkeypatch, capsys):
    tree = make_class_tree(tmp_path / "pets", {"Cat": 5, "Dog": 5}, size=(64, 64))
    victim = tree / "Dog" / "2.jpg"
    _break_after_scan(monkeypatch, victim)
    args = [*TINY[:-4], "--num-workers", "1", "--logger", "none", "--data-dir", str(tree), "--batch-size", "4"]
    line = cli_error(run_cli.main, [*args, "--epochs", "1", "--out", "runs/x"], capsys)
    assert str(victim) in line and "Caught DataError" not in line, line
    no_run_folder(tmp_path)


def test_decode_once_cache_names_a_file_broken_after_the_scan(tmp_path):
    path = write_image(tmp_path / "a.jpg", size=(64, 64))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=r"a\.jpg could not be decoded although the scan accepted it"):
        data._decode_for_cache((str(path), 32, False))


# ---------------------------------------------- 6. scan and cache workers die with their parent


SCAN_PARENT = """
import os, signal, sys, threading, time
from pathlib import Path
from imbalance.data import build_decoded_cache, scan_images

root, what = Path(sys.argv[1]), sys.argv[2]
files = sorted(root.glob("*.png"))

def kill_self_once_workers_run():
    me = os.getpid()
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            children = Path(f"/proc/{me}/task/{me}/children").read_text().split()
        except OSError:
            children = []
        if len(children) >= 2:
            print("workers", *children, flush=True)
            os.kill(me, signal.SIGKILL)  # kill -9 during the scan
        time.sleep(0.002)

threading.Thread(target=kill_self_once_workers_run, daemon=True).start()
while True:  # work until killed (a fresh cache every round, so every round decodes)
    os.environ["IMBALANCE_CACHE"] = str(root / f".cache-{time.time_ns()}")
    if what == "scan":
        scan_images(files, root, workers=2)
    else:
        build_decoded_cache([(p.name, 0) for p in files], root, 8, train=False, workers=2)
"""


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status  # a zombie has exited; only its exit status waits to be read


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("what", ["scan", "decode-once cache"])
def test_pool_workers_die_when_the_parent_is_killed(what, tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    pixel = np.zeros((4, 4, 3), dtype=np.uint8)
    for i in range(600):
        pixel[0, 0, 0] = i % 256
        Image.fromarray(pixel).save(root / f"{i}.png")
    script = tmp_path / "scan_parent.py"
    script.write_text(textwrap.dedent(SCAN_PARENT))
    log = tmp_path / "parent.out"  # a file, not a pipe: orphaned workers would hold a pipe open forever
    with log.open("w") as stdout:
        parent = subprocess.Popen([sys.executable, str(script), str(root), what.split()[0]], stdout=stdout)
    workers: list[int] = []
    try:
        parent.wait(timeout=60)
        out = log.read_text()
        assert parent.returncode == -signal.SIGKILL, out
        workers = [int(pid) for pid in out.split()[1:]]
        assert len(workers) >= 2, out
        deadline = time.time() + 5
        while any(_alive(pid) for pid in workers) and time.time() < deadline:
            time.sleep(0.05)
        orphans = [pid for pid in workers if _alive(pid)]
        assert not orphans, f"{what} workers outlived their killed parent: {orphans}"
    finally:
        parent.kill()
        parent.wait()
        for pid in workers or [int(p) for p in log.read_text().split()[1:]]:  # leave nothing behind, even on failure
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
