"""The solo-learn adapter against the real solo-learn and the real Lightning Trainer.

CI runs it on PyPI's solo-learn 1.0.2 (keyword constructor, pytorch-lightning 1.9); the same
file runs on solo-learn main (``__init__(cfg)``, lightning 2.1) in a venv that has it. Models
are resnet18 on 32x32 upsampled scikit-learn digits, batch 8, a few steps, on one CPU thread
(oversubscribed threads make the shared CI cores far slower).
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from msr_loss.adapters import (
    MSRFlags,
    NSNegFlags,
    flags_from_config,
    register,
    solo_api,
    wrap_method,
)
from torch.utils.data import DataLoader, Dataset

from msr_loss import interventional_loss
from msr_loss.losses import NonSemanticContrastiveLoss
from msr_loss.negatives import patch_negatives

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
solo_methods = pytest.importorskip("solo.methods")
sklearn_datasets = pytest.importorskip("sklearn.datasets")
API = solo_api(solo_methods.BaseMethod)
BaseMomentumMethod = pytest.importorskip("solo.methods.base").BaseMomentumMethod
pl = pytest.importorskip("lightning.pytorch" if API == "cfg" else "pytorch_lightning")

BATCH = 8
COMMON = {
    "encoder": "resnet18",
    "num_classes": 10,
    "backbone_args": {"cifar": False, "zero_init_residual": False},
    "max_epochs": 1,
    "batch_size": BATCH,
    "optimizer": "sgd",
    "lars": False,
    "lr": 0.05,
    "weight_decay": 1e-4,
    "classifier_lr": 0.05,
    "exclude_bias_n_norm": False,
    "accumulate_grad_batches": 1,
    "extra_optimizer_args": {"momentum": 0.9},
    "scheduler": "none",
    "min_lr": 0.0,
    "warmup_start_lr": 0.0,
    "warmup_epochs": 0,
    "num_large_crops": 2,
    "num_small_crops": 0,
}
SPECIFIC_KWARGS = {
    "simclr": {"temperature": 0.2},
    "byol": {"pred_hidden_dim": 64},
    "mocov2plus": {"temperature": 0.2, "queue_size": 64},
    "barlow_twins": {"lamb": 0.0051, "scale_loss": 0.1},
    "vicreg": {"sim_loss_weight": 25.0, "var_loss_weight": 25.0, "cov_loss_weight": 1.0},
}
MOMENTUM_KWARGS = {
    "base_tau_momentum": 0.99,
    "final_tau_momentum": 1.0,
    "momentum_classifier": False,
}
FLAGS = MSRFlags(num_strata=4, temperature=0.2, meta_lr=0.1)


class Digits(Dataset):
    """Real scikit-learn digits, upsampled to 32x32 RGB; two views by random shifts and noise."""

    def __init__(self, size: int = 4 * BATCH) -> None:
        digits = sklearn_datasets.load_digits()
        images = torch.tensor(digits.images[:size], dtype=torch.float32)[:, None] / 16.0
        self.images = F.interpolate(images, size=32, mode="bilinear").expand(-1, 3, -1, -1)
        self.labels = torch.tensor(digits.target[:size])

    def __len__(self) -> int:
        return len(self.labels)

    def _view(self, image: torch.Tensor) -> torch.Tensor:
        shift = torch.randint(-3, 4, (2,))
        moved = torch.roll(image, shifts=(int(shift[0]), int(shift[1])), dims=(1, 2))
        return moved + 0.1 * torch.randn_like(moved)

    def __getitem__(self, index: int) -> tuple[int, list[torch.Tensor], torch.Tensor]:
        image = self.images[index]
        return index, [self._view(image), self._view(image)], self.labels[index]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def method_kwargs(method: str) -> dict:
    return {"proj_output_dim": 32, "proj_hidden_dim": 64, **SPECIFIC_KWARGS[method]}


def main_config(method: str):
    """The config solo-learn main's ``parse_cfg`` would hand to ``METHODS[method](cfg)``."""
    from omegaconf import OmegaConf

    return OmegaConf.create(
        {
            "method": method,
            "backbone": {"name": "resnet18", "kwargs": {}},
            "data": {"dataset": "custom", "num_classes": 10},
            "max_epochs": 1,
            "optimizer": {
                "name": "sgd",
                "batch_size": BATCH,
                "lr": COMMON["lr"],
                "weight_decay": COMMON["weight_decay"],
                "classifier_lr": COMMON["classifier_lr"],
                "kwargs": {"momentum": 0.9},
            },
            "scheduler": {"name": "none"},
            "method_kwargs": method_kwargs(method),
            "momentum": {"base_tau": 0.99, "final_tau": 1.0, "classifier": False},
        }
    )


def init_arguments(method: str) -> dict:
    if API == "cfg":
        config = main_config(method)
        config.data.num_large_crops, config.data.num_small_crops = 2, 0
        return {"cfg": config}
    momentum = issubclass(solo_methods.METHODS[method], BaseMomentumMethod)
    return {**COMMON, **method_kwargs(method), **(MOMENTUM_KWARGS if momentum else {})}


def build(method: str, cls: type | None = None, seed: int = 0):
    pl.seed_everything(seed, workers=True)
    cls = cls or solo_methods.METHODS[method]
    return cls(**init_arguments(method))


def backbone(model):
    return model.backbone if API == "cfg" else model.encoder


def fit(model, steps: int, seed: int = 0, callbacks=(), **trainer_kwargs):
    pl.seed_everything(seed, workers=True)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **trainer_kwargs,
    )
    trainer.fit(model, DataLoader(Digits(), batch_size=BATCH))
    return trainer


def encoder_state(model) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if k.startswith(("backbone.", "encoder.", "projector.", "momentum_", "predictor."))
    }


def strata(model) -> torch.Tensor:
    return model.msr_terms["msr"].regularizer.strata.detach().clone()


class GradientProbe(pl.Callback):
    """Records, after each backward, which of the adapter's parameters got no gradient."""

    def __init__(self) -> None:
        self.missing: list[list[str]] = []

    def on_after_backward(self, trainer, module) -> None:
        self.missing.append([n for n, p in module.msr_terms.named_parameters() if p.grad is None])


def test_import_needs_neither_solo_nor_lightning():
    code = (
        "import sys, msr_loss.adapters;"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('solo', 'lightning', 'pytorch_lightning', 'omegaconf')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_detects_which_solo_learn_api_it_faces():
    assert solo_api(solo_methods.SimCLR) == API
    assert hasattr(solo_methods, "MAE") is (API == "cfg")
    with pytest.raises(TypeError, match="method class"):
        solo_api("simclr")


def test_flag_blocks_are_parsed_and_checked():
    config = {"method": "simclr", "msr": {"weight": 1, "num_strata": 3, "meta_mode": "exact"}}
    (flags,) = flags_from_config(config)
    assert (flags.weight, flags.num_strata, flags.meta_mode) == (1.0, 3, "exact")
    assert flags_from_config({"method": "simclr", "msr": {"enabled": False}}) == []
    assert flags_from_config(argparse.Namespace(method="simclr")) == []
    with pytest.raises(ValueError, match="unknown msr flags \\['strata'\\]"):
        flags_from_config({"msr": {"strata": 3}})
    with pytest.raises(TypeError, match=r"msr.num_strata must be a int"):
        flags_from_config({"msr": {"num_strata": 2.5}})
    with pytest.raises(ValueError, match="meta_lr must be > 0"):
        MSRFlags(meta_lr=0.0)
    both = flags_from_config({"msr": {}, "nsneg": {"alpha": 3, "negatives": "all"}})
    assert [type(f) for f in both] == [MSRFlags, NSNegFlags]
    assert (both[1].alpha, both[1].negatives) == (3.0, "all")


def test_register_swaps_the_registry_entry_and_keeps_the_method_name():
    methods = dict(solo_methods.METHODS)
    config = argparse.Namespace(method="byol", msr={"num_strata": 2})
    wrapped = register(config, methods)
    assert methods["byol"] is wrapped and issubclass(wrapped, solo_methods.BYOL)
    assert wrapped is not solo_methods.BYOL and config.method == "byol"
    assert methods["simclr"] is solo_methods.SimCLR
    assert register(argparse.Namespace(method="byol"), methods) is solo_methods.BYOL
    with pytest.raises(ValueError, match=r"config.method must be one of"):
        register({"method": "nope"}, methods)


def test_register_defaults_to_solo_learns_own_registry():
    original = solo_methods.METHODS["simclr"]
    try:
        wrapped = register({"method": "simclr", "msr": {}})
        assert solo_methods.METHODS["simclr"] is wrapped
    finally:
        solo_methods.METHODS["simclr"] = original


def test_methods_without_a_projection_are_refused():
    with pytest.raises(TypeError, match=r"DINO.*prototype logits"):
        wrap_method(solo_methods.DINO, FLAGS)
    if hasattr(solo_methods, "MAE"):
        with pytest.raises(TypeError, match=r"MAE.*no projector"):
            wrap_method(solo_methods.MAE, FLAGS)
    with pytest.raises(ValueError, match="at least one flag block"):
        wrap_method(solo_methods.SimCLR)


@pytest.mark.parametrize("method", ["simclr", "byol", "mocov2plus", "barlow_twins", "vicreg"])
def test_wrapped_loss_is_the_base_loss_plus_the_interventional_loss(method):
    plain = build(method)
    wrapped = build(method, wrap_method(type(plain), FLAGS))
    wrapped_state = encoder_state(wrapped)
    assert all(torch.equal(v, wrapped_state[k]) for k, v in encoder_state(plain).items())
    index, views, labels = next(iter(DataLoader(Digits(), batch_size=BATCH)))
    batch = [index, views, labels]
    base = plain.training_step(copy.deepcopy(batch), 0)
    total = wrapped.training_step(copy.deepcopy(batch), 0)
    with torch.no_grad():
        z1, z2 = (wrapped.projector(backbone(wrapped)(x)) for x in views)
        icl = interventional_loss(z1, z2, strata(wrapped), temperature=FLAGS.temperature)
    torch.testing.assert_close(total, base + icl)


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_trainer_steps_move_the_strata_and_every_added_parameter_gets_a_gradient(method):
    model = build(method, wrap_method(solo_methods.METHODS[method], FLAGS))
    before = strata(model)
    probe = GradientProbe()
    trainer = fit(model, steps=3, callbacks=[probe])
    assert probe.missing == [[], [], []]
    assert model.msr_terms["msr"].meta_calls == 3
    assert (strata(model) - before).abs().max() > 1e-3
    for name in ("train_msr_loss", "train_class_loss"):
        assert torch.isfinite(trainer.callback_metrics[name])


def test_adapter_with_zero_weight_leaves_the_host_training_unchanged():
    plain = build("simclr")
    fit(plain, steps=2)
    zero = build("simclr", wrap_method(solo_methods.SimCLR, MSRFlags(weight=0.0, num_strata=4)))
    fit(zero, steps=2)
    assert zero.msr_terms["msr"].meta_calls == 2
    reference = encoder_state(plain)
    for key, value in encoder_state(zero).items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0, msg=key)


def test_flag_off_leaves_solo_learn_untouched():
    methods = dict(solo_methods.METHODS)
    for config in ({"method": "simclr"}, {"method": "simclr", "msr": {"enabled": False}}):
        assert register(config, methods) is solo_methods.SimCLR
        assert methods == solo_methods.METHODS


def test_checkpoint_round_trips_the_strata_and_the_meta_optimizer(tmp_path):
    cls = wrap_method(solo_methods.BYOL, FLAGS)
    model = build("byol", cls)
    initial = strata(model)
    trainer = fit(model, steps=2)
    path = tmp_path / "byol.ckpt"
    trainer.save_checkpoint(path)
    restored = cls.load_from_checkpoint(path, **init_arguments("byol"))
    assert not torch.equal(strata(restored), initial)
    torch.testing.assert_close(strata(restored), strata(model), rtol=0, atol=0)
    term, original = restored.msr_terms["msr"], model.msr_terms["msr"]
    assert term.meta_calls == original.meta_calls == 2
    torch.testing.assert_close(
        term.meta_optimizer.state_dict(), original.meta_optimizer.state_dict(), rtol=0, atol=0
    )


def test_nsneg_adds_infonce_with_each_crops_patch_negative():
    flags = NSNegFlags(weight=0.5, alpha=2.0, patch_min=0.25, patch_max=0.5)
    plain = build("simclr")
    wrapped = build("simclr", wrap_method(solo_methods.SimCLR, flags))
    index, views, labels = next(iter(DataLoader(Digits(), batch_size=BATCH)))
    base = plain.training_step([index, views, labels], 0)
    torch.manual_seed(7)
    total = wrapped.training_step([index, views, labels], 0)
    torch.manual_seed(7)
    negatives = [patch_negatives(x, patch_range=(0.25, 0.5)) for x in views]
    with torch.no_grad():
        z1, z2 = (wrapped.projector(backbone(wrapped)(x)) for x in views)
        t1, t2 = wrapped.projector(backbone(wrapped)(torch.cat(negatives))).chunk(2)
        criterion = NonSemanticContrastiveLoss(temperature=flags.temperature, alpha=2.0)
        expected = base + 0.5 * criterion(z1, z2, t1, t2)
    torch.testing.assert_close(total, expected)


def test_msr_and_nsneg_train_together_on_a_momentum_method():
    model = build("byol", wrap_method(solo_methods.BYOL, FLAGS, NSNegFlags(weight=0.5)))
    before = strata(model)
    probe = GradientProbe()
    trainer = fit(model, steps=2, callbacks=[probe])
    assert probe.missing == [[], []]
    assert (strata(model) - before).abs().max() > 1e-3
    for name in ("train_msr_loss", "train_nsneg_loss"):
        assert torch.isfinite(trainer.callback_metrics[name])
