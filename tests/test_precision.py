"""The GPU defaults exercised on the CPU: bf16 autocast for every loss (AutoBalance's search included),
channels-last and torch.compile.

On a GPU a run defaults to `--precision bf16-mixed` and channels-last, paths that a CPU-only test suite would
otherwise never take. The runs here are `--fast-dev-run` (one training and one validation batch) of the
embedded digits, in this process, so the whole file takes seconds; the losses, the logits' dtype and the
logged validation metrics are recorded by wrapping the module's hooks.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from experiments import run as run_cli
from imbalance.autobalance import AutoBalanceSearch, ParametricLoss, head_hypergradient
from imbalance.config import RunConfig
from imbalance.losses import LOSSES, build_loss
from imbalance.model import ImbalanceClassifier

TINY = [
    "--backbone",
    "test_resnet",
    "--image-size",
    "32",
    "--batch-size",
    "16",
    "--num-workers",
    "0",
    "--logger",
    "none",
    "--fast-dev-run",
]
COUNTS = [90, 10]  # label order: negative, positive


def autobalance_params(tmp_path) -> str:
    path = tmp_path / "autobalance_params.json"
    path.write_text(json.dumps({"weights": [0.4, 1.6], "scales": [0.8, 1.25], "offsets": [0.3, -0.3]}))
    return str(path)


def loss_variants(tmp_path) -> dict[str, torch.nn.Module]:
    """Every --loss as the command line builds it, plus the variants with other buffers or code paths."""
    losses = {}
    for name in LOSSES:
        extra = {"autobalance_params": autobalance_params(tmp_path)} if name == "autobalance" else {}
        losses[name] = build_loss(RunConfig(loss=name, **extra), COUNTS)
    losses["weighted-smoothing"] = build_loss(RunConfig(loss="weighted", label_smoothing=0.1), COUNTS)
    losses["bce-pos-weight"] = build_loss(RunConfig(loss="bce", pos_weight=9.0), COUNTS)
    losses["focal-alpha"] = build_loss(RunConfig(loss="focal", alpha=(0.75,)), COUNTS)
    losses["sigmoid-focal-alpha"] = build_loss(RunConfig(loss="sigmoid-focal", alpha=(0.75,)), COUNTS)
    losses["cb-focal"] = build_loss(RunConfig(loss="cb", cb_base="focal", beta=0.99), COUNTS)
    drw = build_loss(RunConfig(loss="ldam", drw_epoch=0, ldam_scale=30.0), COUNTS)
    drw.set_epoch(0)
    losses["ldam-drw"] = drw
    losses["autobalance-trainable"] = ParametricLoss(2, [0.4, 1.6], [0.8, 1.25], [0.3, -0.3], trainable=True)
    return losses


VARIANTS = [
    *LOSSES,
    "weighted-smoothing",
    "bce-pos-weight",
    "focal-alpha",
    "sigmoid-focal-alpha",
    "cb-focal",
    "ldam-drw",
    "autobalance-trainable",
]


@pytest.mark.parametrize("name", VARIANTS)
def test_every_loss_is_computed_in_float32_under_bf16_autocast(tmp_path, name):
    """bf16 logits from an autocast forward: the loss is float32 and equals the float32 computation on the
    same logits, so no buffer (class weights, margins, log prior, alpha) is rounded to bf16 on the way."""
    loss = loss_variants(tmp_path)[name]
    torch.manual_seed(0)
    head = torch.nn.Linear(8, loss.num_outputs)
    feats, target = torch.randn(64, 8) * 3, torch.randint(0, 2, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(feats)
        assert logits.dtype == torch.bfloat16  # what the model hands the loss under bf16-mixed
        value = loss(logits, target)
    assert value.dtype == torch.float32
    reference = loss(logits.detach().float(), target)
    torch.testing.assert_close(value, reference, rtol=1e-6, atol=1e-7)
    value.backward()
    assert torch.isfinite(value) and all(torch.isfinite(p.grad).all() for p in head.parameters())


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("magnitude", [100.0, -100.0])
def test_losses_are_finite_at_extreme_bf16_logits(tmp_path, name, magnitude):
    loss = loss_variants(tmp_path)[name]
    base = torch.tensor([[magnitude, -magnitude], [-magnitude, magnitude], [magnitude, magnitude]])
    logits = (base[:, :1] if loss.num_outputs == 1 else base).bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(logits, torch.tensor([0, 1, 1]))
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("objective", ["balanced-ce", "soft-f1"])
@pytest.mark.parametrize("feature_dtype", [torch.float32, torch.bfloat16])
def test_hypergradient_under_bf16_autocast_equals_float32(objective, feature_dtype):
    """AutoBalance's search runs its upper step inside the training step's autocast, with bf16 features; the
    unrolled head step and its hypergradient are still computed in float32."""
    torch.manual_seed(0)
    feats_train, y_train = torch.randn(48, 16).to(feature_dtype), torch.randint(0, 2, (48,))
    feats_val, y_val = torch.randn(32, 16).to(feature_dtype), torch.tensor([0, 1] * 16)
    head = torch.nn.Linear(16, 2)
    loss = ParametricLoss(2, weights=[0.7, 1.3], scales=[0.8, 1.25], offsets=[0.3, -0.3], trainable=True)
    args = (loss, head, feats_train, y_train, feats_val, y_val, 0.5, objective)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value, grads = head_hypergradient(*args)
    ref_value, ref_grads = head_hypergradient(
        loss, head, feats_train.float(), y_train, feats_val.float(), y_val, 0.5, objective
    )
    torch.testing.assert_close(value, ref_value, rtol=1e-6, atol=1e-7)
    for grad, ref, param in zip(grads, ref_grads, (loss.omega, loss.delta, loss.offset), strict=True):
        assert grad.dtype == param.dtype == torch.float32  # assigned to p.grad, so it must match
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-7)


@pytest.fixture
def probe(monkeypatch):
    """Wraps the module hooks the runs go through and records what they see."""
    seen: dict[str, list] = {"train": [], "val_steps": [], "val": [], "search": []}

    def forward(self, images):
        logits = original["forward"](self, images)
        seen["logits_dtype"] = logits.dtype
        return logits

    def training_step(self, batch, batch_idx):
        loss = original["training_step"](self, batch, batch_idx)
        conv = next(p for p in self.backbone.parameters() if p.ndim == 4)
        seen["train"].append(
            {
                "loss": float(loss.detach()),
                "loss_dtype": loss.dtype,
                "autocast": torch.is_autocast_enabled("cpu"),
                "logits_dtype": seen.pop("logits_dtype"),
                "channels_last": conv.is_contiguous(memory_format=torch.channels_last),
                "compiled": getattr(self.backbone, "_compiled_call_impl", None) is not None,
            }
        )
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        seen["val_steps"].append(torch.is_autocast_enabled("cpu"))
        return original["validation_step"](self, batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self):
        original["on_validation_epoch_end"](self)
        seen["val"].append({k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")})

    def search_step(self, batch, batch_idx):
        out = original["search_step"](self, batch, batch_idx)
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("search/")}
        seen["search"].append({"autocast": torch.is_autocast_enabled("cpu"), **metrics, **self.loss_fn.as_dict()})
        return out

    original = {
        "forward": ImbalanceClassifier.forward,
        "training_step": ImbalanceClassifier.training_step,
        "validation_step": ImbalanceClassifier.validation_step,
        "on_validation_epoch_end": ImbalanceClassifier.on_validation_epoch_end,
        "search_step": AutoBalanceSearch.training_step,
    }
    monkeypatch.setattr(ImbalanceClassifier, "forward", forward)
    monkeypatch.setattr(ImbalanceClassifier, "training_step", training_step)
    monkeypatch.setattr(ImbalanceClassifier, "validation_step", validation_step)
    monkeypatch.setattr(ImbalanceClassifier, "on_validation_epoch_end", on_validation_epoch_end)
    monkeypatch.setattr(AutoBalanceSearch, "training_step", search_step)
    return seen


def check_run(seen: dict[str, list], precision: str = "bf16-mixed") -> dict:
    """One training step and one validation epoch ran under `precision`, with finite loss and metrics."""
    assert len(seen["train"]) == 1 and seen["val_steps"] and len(seen["val"]) == 1
    step = seen["train"][0]
    bf16 = precision == "bf16-mixed"
    assert step["autocast"] is bf16 and all(a is bf16 for a in seen["val_steps"])
    assert step["logits_dtype"] == (torch.bfloat16 if bf16 else torch.float32)
    assert step["loss_dtype"] == torch.float32 and math.isfinite(step["loss"]), step
    val = seen["val"][0]
    for key in ("val/loss", "val/f1", "val/precision", "val/recall", "val/auroc", "val/average_precision"):
        assert key in val and math.isfinite(val[key]), (key, val)
    assert all(math.isfinite(v) for v in val.values()), val
    return step


@pytest.mark.parametrize("loss", list(LOSSES))
def test_bf16_mixed_trains_and_validates_every_loss(probe, loss):
    extra = ["--autobalance-search-epochs", "1"] if loss == "autobalance" else []
    assert run_cli.main([*TINY, "--precision", "bf16-mixed", "--loss", loss, *extra]) == 0
    check_run(probe)
    if loss == "autobalance":  # the search ran its lower and upper step under autocast too
        assert len(probe["search"]) == 1
        search = probe["search"][0]
        assert search["autocast"] is True
        assert math.isfinite(search["search/train_loss"]) and math.isfinite(search["search/val_loss"])
        found = [v for key in ("weights", "scales", "offsets") for v in search[key]]
        assert len(found) == 6 and all(math.isfinite(v) for v in found)


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_channels_last_trains_and_validates(probe, precision):
    assert run_cli.main([*TINY, "--precision", precision, "--loss", "ldam", "--channels-last"]) == 0
    assert check_run(probe, precision)["channels_last"]


def test_channels_last_is_off_by_default_on_the_cpu(probe):
    assert run_cli.main([*TINY, "--precision", "32-true", "--loss", "ce"]) == 0
    assert not check_run(probe, "32-true")["channels_last"]


def inductor_problem() -> str | None:
    """Why torch.compile's CPU inductor cannot run here (no C++ compiler, ...), or None when it can."""
    try:
        compiled = torch.compile(lambda x: torch.relu(x) * 2 + 1, backend="inductor")
        torch.testing.assert_close(compiled(torch.arange(-4.0, 4.0)), torch.relu(torch.arange(-4.0, 4.0)) * 2 + 1)
    except Exception as error:  # whatever the toolchain lacks, the message says it
        return f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
    return None


@pytest.mark.slow  # inductor compiles C++: ~40-80 s on 2 cores with a cold cache, ~4 s with a warm one
def test_compile_with_the_gpu_defaults_trains_and_validates(probe):
    problem = inductor_problem()
    if problem is not None:
        pytest.skip(f"torch.compile's CPU inductor does not work on this machine: {problem}")
    args = [*TINY, "--precision", "bf16-mixed", "--channels-last", "--compile", "--loss", "weighted"]
    assert run_cli.main(args) == 0
    step = check_run(probe)
    assert step["compiled"] and step["channels_last"]


@pytest.mark.parametrize("precision, dtype", [("64-true", torch.float64), ("bf16-true", torch.bfloat16)])
def test_a_true_precision_gets_its_own_dtype_from_the_uint8_batches(tmp_path, precision, dtype):
    # the loaders' uint8 images pass over Lightning's conversion of float batches, so the data module converts
    # them after normalising: without it, a float64 or bf16 model got float32 input and the run crashed
    seen = []
    original = ImbalanceClassifier.training_step

    def training_step(self, batch, batch_idx):
        seen.append(batch[0].dtype)
        return original(self, batch, batch_idx)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ImbalanceClassifier, "training_step", training_step)
        assert run_cli.main([*TINY, "--precision", precision, "--out", str(tmp_path / "run")]) == 0
    assert seen == [dtype]
