"""The training-recipe options: --augment, --crop-scale and --warmup-epochs, from their validation through the
transforms and the learning-rate schedule to a run, a resume, a decoupled stage 2 and an old run's folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from experiments import run as run_cli
from imbalance.config import ConfigError, RunConfig
from imbalance.data import (
    DataError,
    ImbalanceDataModule,
    cached_transform,
    embedded_digits,
    load_split,
    make_transform,
    normalize_images,
)
from imbalance.decoupled import DecoupledClassifier, read_stage1, stage2_config
from imbalance.losses import CrossEntropy
from imbalance.model import ImbalanceClassifier, create_backbone, lr_factor
from imbalance.train import resumed_config

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = 24
SEEDS = range(8)
NEW_KEYS = ("augment", "crop_scale", "warmup_epochs")


def old_train_transform(cached: bool) -> v2.Compose:
    """The photos' training transform as it was before --augment and --crop-scale, built by hand."""
    finish = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(MEAN), std=list(STD))]
    if not cached:
        finish = [v2.ToImage(), *finish]
    augment = [v2.RandomResizedCrop(SIZE, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    return v2.Compose(augment + finish)


def seeded(transform, image, seed: int) -> torch.Tensor:
    """`transform(image)` seeded as `ImageDataset.__getitem__` seeds a training item."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)


def normalized(item: torch.Tensor) -> torch.Tensor:
    """A uint8 item as the data module hands it to the model: normalised on the batch (`normalize_images`)."""
    assert item.dtype == torch.uint8
    return normalize_images(item[None], MEAN, STD)[0]


@pytest.fixture
def photo() -> Image.Image:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (30, 40, 3), dtype=torch.uint8, generator=generator)
    return Image.fromarray(pixels.numpy(), "RGB")


@pytest.fixture
def pet_split(pet_tree):
    return load_split(RunConfig(data_dir=pet_tree, seed=0))


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"augment": "cutmix"}, "--augment 'cutmix' is unknown; choose one of: crop-flip, trivial"),
        ({"crop_scale": 0.0}, "--crop-scale must be in (0, 1]"),
        ({"crop_scale": -0.2}, "got -0.2"),
        ({"crop_scale": 1.5}, "got 1.5"),
        ({"warmup_epochs": -1}, "--warmup-epochs -1 with --epochs 10"),
        ({"warmup_epochs": 3, "epochs": 3}, "--warmup-epochs 3 with --epochs 3"),
        ({"warmup_epochs": 5, "epochs": 2}, "--warmup-epochs 5 with --epochs 2"),
    ],
)
def test_out_of_range_recipe_options_are_one_line_errors(options, message, tmp_path):
    with pytest.raises(ConfigError) as error:
        RunConfig(data_dir=tmp_path, **options).validate()
    assert message in str(error.value) and "\n" not in str(error.value)
    flag = "--" + next(iter(options)).replace("_", "-")
    assert str(error.value).startswith(flag)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--augment", "trivial"], "--augment trivial augments photos"),
        (["--crop-scale", "0.3"], "--crop-scale 0.3 sets the random crop of photos"),
        (["--warmup-epochs", "2", "--epochs", "2"], "--warmup-epochs 2 with --epochs 2"),
        (["--crop-scale", "0"], "--crop-scale must be in (0, 1]"),
    ],
)
def test_recipe_errors_from_the_cli(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli.main([*args, "--logger", "none"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    if "photos" in message:  # the embedded digits: the error says what to add
        assert "--data-dir" in err


def test_the_edges_of_the_ranges_are_accepted(tmp_path):
    RunConfig(data_dir=tmp_path, augment="trivial", crop_scale=1.0, warmup_epochs=9, epochs=10).validate()
    RunConfig(data_dir=tmp_path, crop_scale=1e-3, warmup_epochs=0, epochs=1).validate()
    # a resumed run takes its data from its stored configuration: no --data-dir to check here
    RunConfig(resume=True, out=tmp_path, augment="trivial").validate()


def test_a_digits_manifest_with_a_photo_augmentation_is_refused_by_the_data_module():
    split = embedded_digits(0)
    with pytest.raises(DataError, match="--augment trivial augments photos"):
        ImbalanceDataModule(split, 16, MEAN, STD, 8, augment="trivial")
    with pytest.raises(DataError, match="--crop-scale 0.3"):
        ImbalanceDataModule(split, 16, MEAN, STD, 8, crop_scale=0.3)


# ------------------------------------------------------------------------------------------ transforms


@pytest.mark.parametrize("cached", [False, True], ids=["pil", "uint8"])
def test_the_default_training_transform_is_the_old_one(photo, cached):
    image = v2.functional.pil_to_tensor(photo) if cached else photo
    new = cached_transform(SIZE, True) if cached else make_transform(SIZE, True, True)
    old = old_train_transform(cached)
    for seed in SEEDS:
        assert torch.equal(normalized(seeded(new, image, seed)), seeded(old, image, seed)), seed


def test_the_default_data_module_trains_on_the_old_transform(pet_split, pet_tree):
    plain = ImbalanceDataModule(pet_split, SIZE, MEAN, STD, 8)
    cached = ImbalanceDataModule(pet_split, SIZE, MEAN, STD, 8, cache=True)
    for index in (0, 5):
        with Image.open(pet_tree / pet_split.train[index][0]) as img:
            photo = img.convert("RGB")
        cached_input = cached.train_set.load_input(index)
        for seed in SEEDS:
            expected = seeded(old_train_transform(False), photo, seed)
            assert torch.equal(normalized(plain.train_set[(index, seed)][0]), expected)
            expected = seeded(old_train_transform(True), cached_input, seed)
            assert torch.equal(normalized(cached.train_set[(index, seed)][0]), expected)


@pytest.mark.parametrize("cached", [False, True], ids=["pil", "uint8"])
def test_trivial_augment_follows_the_crop_and_flip_on_uint8_items(cached):
    build = cached_transform if cached else (lambda *a, **k: make_transform(*a[:2], True, **k))
    transform = build(SIZE, True, augment="trivial", crop_scale=0.3)
    kinds = [type(t) for t in transform.transforms]
    expected = [v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.TrivialAugmentWide]
    expected += [] if cached else [v2.ToImage]  # the normalisation follows on the batch (normalize_images)
    assert kinds == expected
    assert transform.transforms[0].scale == (0.3, 1.0)
    # evaluation is never augmented: the recipe options leave it as it was
    evaluation = cached_transform(SIZE, False) if cached else make_transform(SIZE, False, True)
    assert not any(isinstance(t, (v2.TrivialAugmentWide, v2.RandomResizedCrop)) for t in evaluation.transforms)


@pytest.mark.parametrize("cache", [False, True], ids=["uncached", "cached"])
def test_trivial_augment_changes_the_batch_and_is_the_same_for_the_same_seed(pet_split, cache):
    default = ImbalanceDataModule(pet_split, SIZE, MEAN, STD, 8, cache=cache)
    trivial = ImbalanceDataModule(pet_split, SIZE, MEAN, STD, 8, cache=cache, augment="trivial")
    changed = 0
    for seed in SEEDS:
        first, again = trivial.train_set[(3, seed)][0], trivial.train_set[(3, seed)][0]
        assert torch.equal(first, again), f"seed {seed}: the same seed gave another augmented tensor"
        assert first.shape == (3, SIZE, SIZE) and first.dtype == torch.uint8
        changed += not torch.equal(first, default.train_set[(3, seed)][0])
    assert changed > 0, "TrivialAugmentWide changed no sample"
    assert not torch.equal(trivial.train_set[(3, 0)][0], trivial.train_set[(3, 1)][0])
    # the evaluation sets are the default module's, exactly
    assert torch.equal(trivial.val_set[0][0], default.val_set[0][0])
    assert torch.equal(trivial.dev_set[0][0], default.dev_set[0][0])


@pytest.mark.parametrize("cache", [False, True], ids=["uncached", "cached"])
def test_crop_scale_reaches_the_random_crop(pet_split, cache):
    module = ImbalanceDataModule(pet_split, SIZE, MEAN, STD, 8, cache=cache, crop_scale=0.3)
    crop = module.train_set.transform.transforms[0]
    assert isinstance(crop, v2.RandomResizedCrop) and crop.scale == (0.3, 1.0)
    default = ImbalanceDataModule(pet_split, SIZE, MEAN, STD, 8, cache=cache)
    differs = [not torch.equal(module.train_set[(2, s)][0], default.train_set[(2, s)][0]) for s in SEEDS]
    assert any(differs)


# ---------------------------------------------------------------------------------------------- warm-up

# E = 6, W = 2: (e + 1) / 3 for e < 2, then 0.5 (1 + cos(pi (e - 2) / 4))
WARMUP_6_2 = [1 / 3, 2 / 3, 1.0, 0.5 + math.sqrt(2) / 4, 0.5, 0.5 - math.sqrt(2) / 4, 0.0]


def old_cosine(epoch: int, epochs: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * min(epoch, epochs) / epochs))


def scheduler_of(module) -> torch.optim.lr_scheduler.LambdaLR:
    return module.configure_optimizers()["lr_scheduler"]["scheduler"]


def classifier(config: dict) -> ImbalanceClassifier:
    return ImbalanceClassifier(create_backbone("test_resnet", 2), CrossEntropy(), config, [10, 90])


def test_warmup_factors_for_six_epochs_two_of_them_warm_up():
    assert [lr_factor(e, 6, 2) for e in range(7)] == pytest.approx(WARMUP_6_2, abs=1e-12)
    schedule = scheduler_of(classifier(RunConfig(epochs=6, warmup_epochs=2, lr=0.01).to_dict()))
    assert [schedule.lr_lambdas[0](e) for e in range(7)] == pytest.approx(WARMUP_6_2, abs=1e-12)
    assert schedule.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 / 3)  # the first epoch's
    # beyond the run's epochs (a resume that grows --epochs builds a new schedule): stays at 0
    assert lr_factor(9, 6, 2) == 0.0


@pytest.mark.parametrize("epochs", [1, 2, 6, 10, 37])
def test_no_warmup_is_exactly_the_old_cosine(epochs):
    config = RunConfig(epochs=epochs).to_dict()
    old_run = {k: v for k, v in config.items() if k not in NEW_KEYS}  # a checkpoint of an earlier version
    for values in (config, old_run):
        factor = scheduler_of(classifier(values)).lr_lambdas[0]
        assert [factor(e) for e in range(epochs + 2)] == [old_cosine(e, epochs) for e in range(epochs + 2)]


def test_decoupled_stage2_keeps_its_own_cosine_without_the_stage1_warmup(tmp_path):
    # stage 2 inherits --warmup-epochs 4 from stage 1, more than its own 2 epochs: it must not warm up
    config = RunConfig(
        decoupled="crt", from_run=tmp_path, epochs=6, warmup_epochs=4, stage2_epochs=2, stage2_lr=0.05
    ).to_dict()
    module = DecoupledClassifier(create_backbone("test_resnet", 2), CrossEntropy(), config, [10, 90])
    schedule = scheduler_of(module)
    assert [schedule.lr_lambdas[0](e) for e in range(3)] == [old_cosine(e, 2) for e in range(3)]
    assert schedule.optimizer.param_groups[0]["lr"] == 0.05


# --------------------------------------------------------------------- resume, stage 2 and old run folders


def old_run_folder(run_dir: Path, **options) -> dict:
    """A run folder as an earlier version wrote it: a config.json without the recipe options."""
    stored = {k: v for k, v in RunConfig(**options).to_dict().items() if k not in NEW_KEYS}
    (run_dir / "checkpoints").mkdir(parents=True)
    for name in ("manifest.json", "summary.json", "checkpoints/last.ckpt"):
        (run_dir / name).write_text("{}")
    (run_dir / "config.json").write_text(json.dumps(stored))
    return stored


def test_the_options_are_recorded_and_an_old_config_loads_with_the_defaults(tmp_path):
    stored = RunConfig(augment="trivial", crop_scale=0.3, warmup_epochs=2).to_dict()
    assert (stored["augment"], stored["crop_scale"], stored["warmup_epochs"]) == ("trivial", 0.3, 2)
    assert RunConfig.from_stored(stored) == RunConfig(augment="trivial", crop_scale=0.3, warmup_epochs=2)
    old = old_run_folder(tmp_path / "old", lr=0.002, dev_fraction=0.1)
    loaded = RunConfig.from_stored(old)
    assert (loaded.augment, loaded.crop_scale, loaded.warmup_epochs) == ("crop-flip", 0.5, 0)
    assert RunConfig.from_dict(old) == loaded  # a checkpoint's config, as experiments.evaluate reads it
    assert read_stage1(tmp_path / "old") == loaded  # --from-run


def test_resume_of_an_old_run_keeps_the_defaults_and_a_different_value_contradicts(tmp_path):
    run_dir = tmp_path / "runs" / "old"
    old_run_folder(run_dir, lr=0.002)
    cfg = RunConfig(out=run_dir, resume=True)
    resumed = resumed_config(cfg, given={"out", "resume"})
    assert (resumed.augment, resumed.crop_scale, resumed.warmup_epochs, resumed.lr) == ("crop-flip", 0.5, 0, 0.002)
    for name, value, shown in (
        ("warmup_epochs", 1, "1"),
        ("augment", "trivial", "trivial"),
        ("crop_scale", 0.3, "0.3"),
    ):
        with pytest.raises(ConfigError) as error:
            resumed_config(RunConfig(out=run_dir, resume=True, **{name: value}), given={"out", "resume", name})
        flag = "--" + name.replace("_", "-")
        assert f"{flag} {shown} (the run has " in str(error.value) and "\n" not in str(error.value)


def test_a_decoupled_stage2_inherits_the_stage1_recipe(tmp_path):
    stage1 = RunConfig(data_dir=tmp_path, augment="trivial", crop_scale=0.3, warmup_epochs=3, epochs=6)
    cfg = RunConfig(decoupled="crt", from_run=tmp_path / "s1", out=tmp_path / "s2")
    merged = stage2_config(cfg, stage1, given={"decoupled", "from_run", "out"})
    assert (merged.augment, merged.crop_scale, merged.warmup_epochs) == ("trivial", 0.3, 3)
    with pytest.raises(ConfigError, match=r"--warmup-epochs 1 \(the stage-1 run has 3\)"):
        stage2_config(RunConfig(decoupled="crt", from_run=tmp_path / "s1", warmup_epochs=1), stage1, {"warmup_epochs"})


# ------------------------------------------------------------------------------------------------ a run


def test_a_photo_run_with_the_recipe_options_from_the_cli(pet_tree, tmp_path, monkeypatch):
    seen = {}
    original = ImbalanceClassifier.on_train_epoch_start

    def record(module):
        seen["lr"] = module.trainer.optimizers[0].param_groups[0]["lr"]
        seen["transform"] = module.trainer.datamodule.train_set.transform
        seen["config"] = dict(module.hparams.config)
        original(module)

    monkeypatch.setattr(ImbalanceClassifier, "on_train_epoch_start", record)
    args = ["--backbone", "test_resnet", "--image-size", "32", "--batch-size", "16", "--num-workers", "0"]
    args += ["--data-dir", str(pet_tree), "--logger", "none", "--fast-dev-run", "--lr", "0.004"]
    assert run_cli.main([*args, "--augment", "trivial", "--warmup-epochs", "1", "--crop-scale", "0.3"]) == 0
    assert seen["lr"] == pytest.approx(0.004 / 2)  # epoch 0 of a one-epoch warm-up: (0 + 1) / (1 + 1)
    kinds = [type(t) for t in seen["transform"].transforms]
    assert kinds[:3] == [v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.TrivialAugmentWide]
    assert seen["transform"].transforms[0].scale == (0.3, 1.0)
    assert {k: seen["config"][k] for k in NEW_KEYS} == {"augment": "trivial", "crop_scale": 0.3, "warmup_epochs": 1}
    assert not list(tmp_path.glob("runs/**/*.*")), "a --fast-dev-run smoke test writes nothing"
