"""Layouts, the lecture's split presets, the integrity scan and manifests, on trees the tests write."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_class_tree, write_image
from PIL import Image

from imbalance.config import RunConfig
from imbalance.data import (
    DataError,
    ImageDataset,
    discover,
    embedded_digits,
    load_split,
    make_transform,
    scan_images,
)


def messy_petimages(root: Path) -> Path:
    """PetImages with the archive's kinds of trouble and odd image sizes and modes."""
    make_class_tree(root, {"Cat": 20, "Dog": 40}, size=(37, 53))
    write_image(root / "Cat" / "100.jpg", size=(61, 17), mode="L")
    write_image(root / "Cat" / "101.jpg", size=(33, 33), mode="CMYK")
    write_image(root / "Dog" / "100.png", size=(25, 44), mode="P", fmt="PNG")
    write_image(root / "Dog" / "101.png", size=(25, 44), mode="RGBA", fmt="PNG")
    (root / "Cat" / "666.jpg").write_bytes(b"")  # zero bytes, like the archive's Cat/666.jpg
    good = (root / "Dog" / "0.jpg").read_bytes()
    (root / "Dog" / "11702.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    (root / "Dog" / "notes.jpg").write_text("this is not an image")
    (root / "Cat" / "Thumbs.db").write_bytes(b"\x00" * 64)
    (root / ".hidden").mkdir()
    write_image(root / ".hidden" / "x.jpg")
    (root / "Empty").mkdir()
    return root


def test_petimages_layout_scan_skips_bad_files(tmp_path):
    root = messy_petimages(tmp_path / "PetImages")
    found = discover(root)
    assert found.layout == "petimages"
    assert sorted(found.files) == ["Cat", "Dog"]
    all_files = [p for files in found.files.values() for p in files]
    bad = {Path(p).name: reason for p, reason in scan_images(all_files, root).items()}
    assert set(bad) == {"666.jpg", "11702.jpg", "notes.jpg"}
    assert "empty" in bad["666.jpg"]
    assert bad["11702.jpg"].startswith("truncated")
    assert "not an image" in bad["notes.jpg"]


def test_scan_is_cached_and_notices_changed_files(tmp_path, monkeypatch):
    root = messy_petimages(tmp_path / "PetImages")
    files = [p for fs in discover(root).files.values() for p in fs]
    first = scan_images(files, root)
    calls = []
    import imbalance.data as data

    monkeypatch.setattr(data, "check_image", lambda p: calls.append(p) or None)
    assert scan_images(files, root) == first and calls == []  # everything from the cache
    write_image(root / "Cat" / "666.jpg", seed=5)  # the broken file is replaced by a good one
    scan_images(files, root)
    assert [Path(p).name for p in calls] == ["666.jpg"]


def test_modes_are_converted_to_rgb(tmp_path):
    root = messy_petimages(tmp_path / "PetImages")
    split = load_split(RunConfig(data_dir=root, seed=0))
    dataset = ImageDataset(split.train + split.val, split.root, make_transform(24, False, True))
    for i in range(len(dataset)):
        image, label, index = dataset[i]
        assert image.shape == (3, 24, 24) and index == i


def test_default_split_is_stratified_disjoint_and_skips_bad_files(tmp_path):
    root = messy_petimages(tmp_path / "PetImages")
    split = load_split(RunConfig(data_dir=root, seed=3))
    assert split.class_names == ("Dog", "Cat")
    assert len(split.skipped) == 3
    train_paths = {p for p, _ in split.train}
    dev_paths = {p for p, _ in split.dev}
    val_paths = {p for p, _ in split.val}
    assert not train_paths & val_paths and not train_paths & dev_paths and not dev_paths & val_paths
    # usable images only, each in exactly one of train, dev and val
    assert sum(split.train_counts) + sum(split.dev_counts) + sum(split.val_counts) == 22 + 42
    assert len(train_paths | dev_paths | val_paths) == 22 + 42
    # the dev split is the default 10% of each training class, rounded up (42 - 5 dogs, 22 - 3 cats train)
    assert split.val_counts == [5, 3] and split.dev_counts == [4, 2] and split.train_counts == [33, 17]
    assert all(label == int(p.startswith("Cat")) for p, label in split.train + split.dev + split.val)


def test_kaggle_flat_layout(tmp_path):
    root = tmp_path / "train"
    for i in range(6):
        write_image(root / f"cat.{i}.jpg", seed=i)
    for i in range(9):
        write_image(root / f"dog.{i}.jpg", seed=100 + i)
    found = discover(tmp_path)  # the wrapper folder is looked through
    assert found.layout == "kaggle" and len(found.files["cat"]) == 6 and len(found.files["dog"]) == 9
    split = load_split(RunConfig(data_dir=tmp_path, train_counts=(4, 7), val_counts=(2, 2)))
    # the asked-for training counts, one photo of each class held out of them as dev (ceil(0.1 * n))
    assert split.train_counts == [6, 3] and split.dev_counts == [1, 1] and split.val_counts == [2, 2]
    exact = load_split(RunConfig(data_dir=tmp_path, train_counts=(4, 7), val_counts=(2, 2), dev_fraction=0))
    assert exact.train_counts == [7, 4] and exact.dev == [] and exact.val == split.val


def test_presplit_layout_is_used_as_given(tmp_path):
    root = tmp_path / "cats_and_dogs"
    make_class_tree(root / "train", {"cat": 5, "dog": 8})
    make_class_tree(root / "validation", {"cat": 3, "dog": 4})
    split = load_split(RunConfig(data_dir=root))
    assert split.layout == "presplit"
    # validation/ as given; the dev split is carved out of train/ (ceil(0.1 * n) of each class)
    assert split.train_counts == [7, 4] and split.dev_counts == [1, 1] and split.val_counts == [4, 3]
    assert all(p.startswith("train/") for p, _ in split.train + split.dev)
    assert all(p.startswith("validation/") for p, _ in split.val)
    assert not {p for p, _ in split.train} & {p for p, _ in split.dev}
    exact = load_split(RunConfig(data_dir=root, dev_fraction=0))
    assert exact.train_counts == [8, 5] and exact.dev == [] and exact.val == split.val
    assert sorted(exact.train) == sorted(split.train + split.dev)
    with pytest.raises(DataError, match="used as given"):
        load_split(RunConfig(data_dir=root, split="imbalanced-1", scale=0.001))


def test_any_two_class_imagefolder_with_positive_class(tmp_path):
    root = make_class_tree(tmp_path / "birds", {"Robin": 6, "Sparrow": 9})
    split = load_split(RunConfig(data_dir=root, positive_class="robin"))
    assert split.class_names == ("Sparrow", "Robin")
    with pytest.raises(DataError, match="--positive-class 'cat' is not one of"):
        load_split(RunConfig(data_dir=root))


def test_unknown_layout_error_lists_what_was_found(tmp_path):
    make_class_tree(tmp_path / "three", {"a": 2, "b": 2, "c": 2})
    with pytest.raises(DataError, match=r"no supported layout.*a/ \(2 images\)"):
        discover(tmp_path / "three")
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path / "nope")


@pytest.fixture
def big_pool(tmp_path) -> Path:
    # 120 cats, 130 dogs: enough for every preset at scale 0.008 (balanced: 88+12 per class)
    return make_class_tree(tmp_path / "PetImages", {"Cat": 120, "Dog": 130}, learnable=False, size=(8, 8))


def test_presets_share_validation_and_nest_training_sets(big_pool):
    splits = {
        name: load_split(RunConfig(data_dir=big_pool, split=name, scale=0.008, seed=1))
        for name in ("balanced", "imbalanced-1", "imbalanced-2", "intro-balanced")
    }
    # 1500 -> 12 per class for validation; 11000 -> 88, 1000 -> 8, 500 -> 4, 6000 -> 48 for training, of which
    # the dev split holds ceil(0.1 * n): 9, 1, 1 and 5
    assert splits["balanced"].train_counts == [79, 79] and splits["balanced"].dev_counts == [9, 9]
    assert splits["imbalanced-1"].train_counts == [79, 7] and splits["imbalanced-1"].dev_counts == [9, 1]
    assert splits["imbalanced-2"].train_counts == [79, 3] and splits["imbalanced-2"].dev_counts == [9, 1]
    assert splits["intro-balanced"].train_counts == [43, 43] and splits["intro-balanced"].dev_counts == [5, 5]
    vals = {name: s.val for name, s in splits.items()}
    assert all(v == vals["balanced"] for v in vals.values()) and splits["balanced"].val_counts == [12, 12]
    cats = {name: {p for p, label in s.train if label == 1} for name, s in splits.items()}
    assert cats["imbalanced-2"] < cats["imbalanced-1"] < cats["intro-balanced"] < cats["balanced"]
    dev_cats = {name: {p for p, label in s.dev if label == 1} for name, s in splits.items()}
    assert dev_cats["imbalanced-2"] <= dev_cats["imbalanced-1"] < dev_cats["intro-balanced"] < dev_cats["balanced"]
    dogs = {
        name: ({p for p, label in s.train if label == 0}, {p for p, label in s.dev if label == 0})
        for name, s in splits.items()
    }
    assert dogs["balanced"] == dogs["imbalanced-1"] == dogs["imbalanced-2"]  # the same 79 + 9 dogs in each
    for s in splits.values():
        train, dev, val = ({p for p, _ in part} for part in (s.train, s.dev, s.val))
        assert not train & val and not train & dev and not dev & val


def test_split_depends_on_seed_only(big_pool):
    a = load_split(RunConfig(data_dir=big_pool, split="imbalanced-1", scale=0.008, seed=1))
    b = load_split(RunConfig(data_dir=big_pool, split="imbalanced-1", scale=0.008, seed=2))
    assert a.val != b.val
    code = (
        "import json,sys; from pathlib import Path; from imbalance.config import RunConfig; "
        "from imbalance.data import load_split; "
        "s=load_split(RunConfig(data_dir=Path(sys.argv[1]), split='imbalanced-1', scale=0.008, seed=1)); "
        "print(json.dumps(s.manifest()['sha256']))"
    )
    other_process = subprocess.run(
        [sys.executable, "-c", code, str(big_pool)],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", **__import__("os").environ},
    )
    assert json.loads(other_process.stdout.strip().splitlines()[-1]) == a.manifest()["sha256"]


def test_pool_too_small_error_suggests_scale(big_pool):
    with pytest.raises(DataError, match=r"'Cat' has 120 usable images but the split asks for 12500.*--scale 0\.00"):
        load_split(RunConfig(data_dir=big_pool, split="balanced"))


def test_manifest_replays_exactly_and_detects_edits(big_pool, tmp_path):
    split = load_split(RunConfig(data_dir=big_pool, split="imbalanced-2", scale=0.008, seed=4))
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(split.manifest()))
    replay = load_split(RunConfig(manifest=path))
    assert replay.train == split.train and replay.dev == split.dev and replay.val == split.val
    assert replay.dev  # the default dev split travels in the manifest
    edited = json.loads(path.read_text())
    edited["train"].pop()
    path.write_text(json.dumps(edited))
    with pytest.raises(DataError, match="sha256"):
        load_split(RunConfig(manifest=path))


def test_embedded_digits_is_imbalanced_and_stratified():
    split = embedded_digits(seed=0)
    assert split.class_names == ("not-8", "8")
    n_pos, n_neg = split.train_counts[1] + split.val_counts[1], split.train_counts[0] + split.val_counts[0]
    assert n_pos == 174 and n_neg == 1797 - 174
    assert split.val_counts[1] == round(0.25 * 174)
    image, label, _ = ImageDataset(split.val, None, make_transform(32, False, False))[0]
    assert image.shape == (3, 32, 32) and isinstance(label, int)
    assert torch.isfinite(image).all()


def test_decode_once_cache_matches_the_uncached_pipeline(tmp_path):
    from imbalance.data import ImbalanceDataModule, build_decoded_cache, cache_base_transform

    root = messy_petimages(tmp_path / "PetImages")
    split = load_split(RunConfig(data_dir=root, seed=0))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    plain = ImbalanceDataModule(split, 24, mean, std, batch_size=5)
    cached = ImbalanceDataModule(split, 24, mean, std, batch_size=5, cache=True)
    assert cached.val_set.cache_path is not None and cached.dev_set.cache_path is not None
    # two evaluation loaders, validation then dev, each the same batches with and without the cache
    plain_loaders, cached_loaders = plain.val_dataloader(), cached.val_dataloader()
    assert len(plain_loaders) == len(cached_loaders) == 2
    for plain_loader, cached_loader, items in zip(plain_loaders, cached_loaders, (split.val, split.dev), strict=True):
        seen = 0
        for (x_plain, y_plain, i_plain), (x_cached, y_cached, i_cached) in zip(
            plain_loader, cached_loader, strict=True
        ):
            assert torch.equal(x_plain, x_cached) and torch.equal(y_plain, y_cached)
            assert torch.equal(i_plain, i_cached)
            seen += len(y_plain)
        assert seen == len(items)
    # training: the cache holds the deterministic base the random crop starts from
    base = np.load(cached.train_set.cache_path, mmap_mode="r")
    assert base.shape == (len(split.train), 28, 28, 3) and base.dtype == np.uint8  # channels last
    for i, (path, _) in enumerate(split.train[:5]):
        with Image.open(root / path) as img:
            expected = cache_base_transform(24, train=True)(img.convert("RGB"))
        assert torch.equal(torch.from_numpy(np.array(base[i])).permute(2, 0, 1), expected)
    first, second = next(iter(plain.train_dataloader())), next(iter(cached.train_dataloader()))
    assert torch.equal(first[2], second[2]) and first[0].shape == second[0].shape  # same samples, same order
    # the same split and size reuse the file; another size builds another one
    assert build_decoded_cache(split.val, split.root, 24, train=False) == cached.val_set.cache_path
    assert build_decoded_cache(split.val, split.root, 32, train=False) != cached.val_set.cache_path
    assert not list((tmp_path / ".cache").glob("*.tmp*"))


@pytest.mark.parametrize("cache", [False, True], ids=["uncached", "cached"])
def test_batches_are_uint8_and_reach_the_model_as_the_per_item_normalisation_gave_them(tmp_path, cache):
    # issue 18: items stay uint8 through the workers and the collation (a quarter of the bytes), and the data
    # module normalises each batch after its transfer; the model must see exactly what the per-item pipeline
    # (resize and centre crop, then ToDtype and Normalize on each item) gave it before.
    from torchvision.transforms import v2

    from imbalance.data import ImbalanceDataModule, normalize_images

    root = messy_petimages(tmp_path / "PetImages")
    split = load_split(RunConfig(data_dir=root, seed=0))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    data = ImbalanceDataModule(split, 24, mean, std, batch_size=4, cache=cache)
    old = v2.Compose(
        [
            v2.Resize(28, antialias=True),
            v2.CenterCrop(24),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )
    images, labels, indices = next(iter(data.val_dataloader()[0]))
    assert images.dtype == torch.uint8
    got, got_labels, got_indices = data.on_after_batch_transfer((images, labels, indices), 0)
    expected = []
    for i in indices.tolist():
        with Image.open(root / split.val[i][0]) as img:
            expected.append(old(img.convert("RGB")))
    assert got.dtype == torch.float32 and torch.equal(got, torch.stack(expected))
    assert torch.equal(got_labels, labels) and torch.equal(got_indices, indices)  # integers untouched
    # AutoBalance's batches are pairs of such batches: both normalised; float tensors (features) pass unchanged
    pair = data.on_after_batch_transfer({"train": (images, labels, indices), "meta": (images, labels, indices)}, 0)
    assert torch.equal(pair["train"][0], got) and torch.equal(pair["meta"][0], got)
    features = torch.randn(4, 8)
    assert normalize_images(features, mean, std) is features


def test_cache_needs_photos():
    from imbalance.config import ConfigError

    with pytest.raises(ConfigError, match="--cache"):
        RunConfig(cache=True).validate()


def test_scale_applies_to_the_default_split(big_pool):
    full = load_split(RunConfig(data_dir=big_pool, seed=0))
    tenth = load_split(RunConfig(data_dir=big_pool, seed=0, scale=0.1))
    assert sum(full.train_counts) + sum(full.dev_counts) + sum(full.val_counts) == 250
    assert tenth.train_counts[1] + tenth.dev_counts[1] + tenth.val_counts[1] == 12
    assert tenth.train_counts[0] + tenth.dev_counts[0] + tenth.val_counts[0] == 13
    assert tenth.dev_counts == [2, 2]  # ceil(0.1 * 11) of the 11 training photos of each class


def test_scale_alone_is_rejected_on_the_presplit_layout(tmp_path):
    root = tmp_path / "cats_and_dogs"
    make_class_tree(root / "train", {"cat": 5, "dog": 8})
    make_class_tree(root / "validation", {"cat": 3, "dog": 4})
    with pytest.raises(DataError, match=r"--scale 0\.5.*used as given"):
        load_split(RunConfig(data_dir=root, scale=0.5))


def _v1_manifest(split) -> dict:
    """A manifest as version 1 wrote it: the hash covers only the two file lists."""
    manifest = split.manifest()
    body = [manifest["train"], manifest["val"]]
    return {**manifest, "version": 1, "sha256": hashlib.sha256(json.dumps(body).encode()).hexdigest()}


def test_manifest_hash_covers_class_names_and_layout(big_pool, tmp_path):
    split = load_split(RunConfig(data_dir=big_pool, split="imbalanced-2", scale=0.008, seed=4))
    manifest = split.manifest()
    assert manifest["version"] == 3 and manifest["dev"]
    path = tmp_path / "manifest.json"
    edits = (
        ("class_names", ["Cat", "Dog"]),
        ("layout", "imagefolder"),
        ("dev", manifest["dev"][1:]),  # version 3 hashes the dev list too
        ("dev", []),
    )
    for key, value in edits:
        path.write_text(json.dumps({**manifest, key: value}))
        with pytest.raises(DataError, match="sha256"):
            load_split(RunConfig(manifest=path))


def test_version_1_manifest_still_replays(big_pool, tmp_path):
    split = load_split(RunConfig(data_dir=big_pool, split="imbalanced-2", scale=0.008, seed=4))
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(_v1_manifest(split)))
    replay = load_split(RunConfig(manifest=path))
    assert replay.train == split.train and replay.val == split.val and replay.class_names == split.class_names


def test_manifest_with_overlapping_train_and_val_is_rejected(big_pool, tmp_path):
    split = load_split(RunConfig(data_dir=big_pool, split="imbalanced-2", scale=0.008, seed=4))
    shared = split.train[0]
    split.val = sorted([*split.val, shared])
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(_v1_manifest(split)))  # a consistent hash: only the overlap is wrong
    with pytest.raises(DataError, match=rf"both train and val.*{re.escape(shared[0])}"):
        load_split(RunConfig(manifest=path))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: [m], "not a JSON object"),
        (lambda m: {k: v for k, v in m.items() if k != "val"}, "'val'"),
        (lambda m: {**m, "class_names": ["Dog", "Cat", "Bird"]}, "two class names"),
        (lambda m: {**m, "train": [["Cat/0.jpg"]] + m["train"]}, "train"),
        (lambda m: {**m, "val": "Cat/0.jpg"}, "val"),
        (lambda m: {**m, "version": 9}, "version 9"),
    ],
)
def test_malformed_manifest_is_one_clear_error(edit, message, big_pool, tmp_path):
    split = load_split(RunConfig(data_dir=big_pool, split="imbalanced-2", scale=0.008, seed=4))
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(edit(_v1_manifest(split))))
    with pytest.raises(DataError, match=rf"--manifest {re.escape(str(path))}.*{message}"):
        load_split(RunConfig(manifest=path))


def test_digits_manifest_replays_without_data_dir(tmp_path):
    from experiments import run as run_cli

    path = tmp_path / "digits-seed3.json"  # another seed than the run's: the split must come from the file
    path.write_text(json.dumps(embedded_digits(seed=3).manifest()))
    args = ["--backbone", "test_resnet", "--image-size", "32", "--epochs", "1", "--logger", "none"]
    assert run_cli.main([*args, "--manifest", str(path), "--out", "runs/replay"]) == 0
    replayed = json.loads((tmp_path / "runs" / "replay" / "manifest.json").read_text())
    original = json.loads(path.read_text())
    assert replayed["train"] == original["train"] and replayed["val"] == original["val"]
    assert replayed["sha256"] == original["sha256"] and replayed["layout"] == "embedded"


@pytest.mark.parametrize("cache", [False, True])
def test_training_batches_are_the_same_in_loader_workers_and_leave_the_training_rng_alone(tmp_path, cache):
    # loader workers seed each item without saving and restoring their random stream (issue 18: it cost a
    # sixth of a cached item); the batches must still be those of the training process, which keeps its own
    # stream untouched
    from imbalance.data import ImbalanceDataModule

    root = make_class_tree(tmp_path / "pets", {"Cat": 9, "Dog": 15})
    split = load_split(RunConfig(data_dir=root, seed=3))
    mean, std = (0.5,) * 3, (0.25,) * 3

    def module(workers: int) -> ImbalanceDataModule:
        return ImbalanceDataModule(split, 16, mean, std, batch_size=4, seed=3, num_workers=workers, cache=cache)

    torch.manual_seed(11)
    before = torch.random.get_rng_state()
    first = module(0).train_set[(0, 1234)]
    assert torch.equal(torch.random.get_rng_state(), before)  # the random crop drew from a forked stream
    assert torch.equal(first[0], module(0).train_set[(0, 1234)][0])
    in_process = [x for x, _, _ in module(0).train_dataloader()]
    in_workers = [x for x, _, _ in module(2).train_dataloader()]
    assert len(in_process) == len(in_workers) > 1
    for a, b in zip(in_process, in_workers, strict=True):
        assert torch.equal(a, b)
