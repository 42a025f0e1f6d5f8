"""Backbones: aliases, --weights really loads (tensors compared), the head is re-initialised, errors."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from imbalance.config import ConfigError, RunConfig
from imbalance.losses import LOSSES, build_loss
from imbalance.model import (
    ImbalanceClassifier,
    WeightsError,
    adamw,
    create_backbone,
    freeze_all_but_head,
    resolve_backbone_name,
)


def test_aliases_and_unknown_names():
    assert resolve_backbone_name("vgg16") == "vgg16"
    assert resolve_backbone_name("ResNet") == "resnet18"
    assert resolve_backbone_name("convnext_atto") == "convnext_atto"
    with pytest.raises(ConfigError, match="--backbone 'resnet_19'.*similar timm names"):
        resolve_backbone_name("resnet_19")


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext"])
@pytest.mark.parametrize("fmt", ["pt", "safetensors", "wrapped"])
@pytest.mark.parametrize("file_classes", [2, 1000])
def test_weights_load_backbone_and_reinitialise_head(tmp_path, name, fmt, file_classes):
    torch.manual_seed(0)
    source = timm.create_model(name, num_classes=file_classes)
    head = source.pretrained_cfg["classifier"]
    with torch.no_grad():
        source.get_classifier().weight.fill_(7.0)  # a head that must not survive the load
    state = source.state_dict()
    path = tmp_path / f"weights.{'safetensors' if fmt == 'safetensors' else 'pt'}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "wrapped":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    else:
        torch.save(state, path)
    torch.manual_seed(1)
    model = create_backbone(name, num_outputs=2, weights=path)
    loaded = model.state_dict()
    backbone_keys = [k for k in state if not k.startswith(head + ".")]
    assert len(backbone_keys) > 10
    for key in backbone_keys:
        torch.testing.assert_close(loaded[key], state[key], msg=key)
    assert model.get_classifier().out_features == 2
    assert not (loaded[head + ".weight"] == 7.0).any()  # re-initialised, not copied from the file


def test_weights_of_another_architecture_are_an_error(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(timm.create_model("test_convnext").state_dict(), path)
    with pytest.raises(WeightsError, match="does not fit backbone"):
        create_backbone("test_resnet", 2, weights=path)
    with pytest.raises(WeightsError, match="does not exist"):
        create_backbone("test_resnet", 2, weights=tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="could not be read"):
        create_backbone("test_resnet", 2, weights=tmp_path / "junk.pt")


def test_torchvision_resnet_state_dict_loads(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    source = torchvision.models.resnet18(num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "tv.pth")
    model = create_backbone("resnet18", 2, weights=tmp_path / "tv.pth")
    torch.testing.assert_close(
        model.state_dict()["layer4.1.conv2.weight"], source.state_dict()["layer4.1.conv2.weight"]
    )


def test_pretrained_without_network_names_weights_flag():
    with pytest.raises(WeightsError, match="--weights PATH"):
        create_backbone("resnet18", 2, pretrained=True)


def test_freeze_trains_only_the_head():
    model = timm.create_model("test_resnet", num_classes=2)
    freeze_all_but_head(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}


# the same gradients into both (a model's forward would let rounding grow through training): the optimiser alone
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.float64, 1e-14)])
def test_fused_adamw_makes_the_per_tensor_update(dtype, atol):
    torch.manual_seed(0)
    shapes = [(16, 3, 3, 3), (16,), (2, 16)]
    loop = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    fused = [torch.nn.Parameter(p.detach().clone()) for p in loop]
    opt_loop = torch.optim.AdamW(loop, lr=0.01, weight_decay=0.05)  # the per-tensor default on a CPU
    opt_fused = adamw(fused, lr=0.01, weight_decay=0.05)
    assert opt_fused.defaults["fused"] and not opt_loop.defaults.get("fused")
    for _ in range(5):
        for a, b in zip(loop, fused, strict=True):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt_loop.step()
        opt_fused.step()
    for a, b in zip(loop, fused, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)
    assert not adamw([torch.nn.Parameter(torch.zeros(2, device="meta"))], 0.1, 0.0).defaults.get("fused")
    assert adamw([{"params": loop[:1]}, {"params": loop[1:], "lr": 0.1}], 0.01, 0.0).defaults["fused"]  # groups too


def test_the_module_trains_with_fused_adamw_on_a_cpu():
    cfg = RunConfig(backbone="test_resnet", image_size=32)
    module = ImbalanceClassifier(create_backbone("test_resnet", 2), build_loss(cfg, [10, 5]), cfg.to_dict(), [10, 5])
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]


def _loss_config(name: str, tmp_path):
    """A RunConfig for every --loss; AutoBalance gets a parameter file as its search would write."""
    from imbalance.config import RunConfig

    if name != "autobalance":
        return RunConfig(loss=name, backbone="test_resnet", image_size=32)
    params = tmp_path / "autobalance_params.json"
    params.write_text(json.dumps({"weights": [0.4, 1.6], "scales": [0.8, 1.25], "offsets": [0.3, -0.3]}))
    return RunConfig(loss=name, backbone="test_resnet", image_size=32, autobalance_params=params)


@pytest.mark.parametrize("fmt", ["checkpoint", "module_state_dict"])
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_weights_from_this_repositorys_checkpoint_for_every_loss(tmp_path, loss_name, fmt):
    """Fine-tuning from an earlier run: the module's state dict holds backbone.* plus loss buffers
    (class weights, margins, adjustments, AutoBalance's omega/delta/offset); only the backbone is taken."""
    cfg = _loss_config(loss_name, tmp_path)
    counts = [90, 10]
    loss = build_loss(cfg, counts)
    torch.manual_seed(0)
    module = ImbalanceClassifier(create_backbone("test_resnet", loss.num_outputs), loss, cfg.to_dict(), counts)
    state = module.state_dict()
    path = tmp_path / "best.ckpt"
    if fmt == "checkpoint":
        torch.save({"state_dict": state, "hyper_parameters": dict(module.hparams), "epoch": 0}, path)
    else:
        torch.save(state, path)
    torch.manual_seed(1)  # a different initialisation, so equal tensors really come from the file
    model = create_backbone("test_resnet", 2, weights=path)  # also from a one-logit run into a 2-logit model
    loaded = model.state_dict()
    backbone_keys = [
        k[len("backbone.") :] for k in state if k.startswith("backbone.") and not k.startswith("backbone.fc.")
    ]
    assert len(backbone_keys) > 10
    for key in backbone_keys:
        torch.testing.assert_close(loaded[key], state[f"backbone.{key}"], msg=key)
    assert model.get_classifier().out_features == 2


def test_weights_from_a_cli_runs_lightning_checkpoint(tmp_path):
    """`--weights runs/A/checkpoints/last.ckpt` of a real run (loss buffers, optimiser and loop states inside)."""
    from experiments import run as run_cli

    tiny = ["--backbone", "test_resnet", "--image-size", "32", "--batch-size", "64", "--num-workers", "0"]
    tiny += ["--logger", "none", "--epochs", "1"]
    assert run_cli.main([*tiny, "--loss", "weighted", "--out", "runs/A"]) == 0
    ckpt = tmp_path / "runs" / "A" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert "loss_fn.class_weights" in saved
    model = create_backbone("test_resnet", 2, weights=ckpt)
    loaded = model.state_dict()
    for key, value in saved.items():
        if key.startswith("backbone.") and not key.startswith("backbone.fc."):
            torch.testing.assert_close(loaded[key[len("backbone.") :]], value, msg=key)
    assert run_cli.main([*tiny, "--loss", "ce", "--weights", str(ckpt), "--out", "runs/B"]) == 0
    assert (tmp_path / "runs" / "B" / "summary.json").is_file()


def test_the_module_takes_a_datasets_uint8_images_as_the_data_module_normalises_them():
    from imbalance.data import normalize_images

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    module = ImbalanceClassifier(
        create_backbone("test_resnet", 2),
        build_loss(RunConfig(), [10, 2]),
        RunConfig().to_dict(),
        [10, 2],
        mean=mean,
        std=std,
    ).eval()
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    normalised = normalize_images(images, mean, std)
    expected = (images.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(normalised, expected, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(module(images), module(normalised))


def test_the_epochs_training_metrics_are_those_of_per_step_updates(monkeypatch):
    # issue 18: the steps' outputs are kept and given to the metrics once, at the epoch's end
    from imbalance.metrics import flatten_metrics, make_metrics

    module = ImbalanceClassifier(
        create_backbone("test_resnet", 2), build_loss(RunConfig(), [10, 2]), RunConfig().to_dict(), [10, 2]
    )
    generator = torch.Generator().manual_seed(0)
    steps = [(torch.rand(7, generator=generator), torch.randint(0, 2, (7,), generator=generator)) for _ in range(5)]
    per_step = make_metrics().clone(prefix="train/")
    for probs, labels in steps:
        per_step.update(probs, labels)
    logged = {}
    monkeypatch.setattr(module, "log_dict", logged.update)
    module._train_outputs.extend(steps)
    module.on_train_epoch_end()
    expected = flatten_metrics(per_step.compute(), module.class_names)
    assert logged.keys() == expected.keys() and not module._train_outputs
    for name, value in expected.items():
        assert logged[name] == pytest.approx(value, abs=1e-6), name
