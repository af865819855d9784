"""The virtual step of stage 2 is the step solo-learn's own optimizer takes, on every group.

Models are built and trained by solo-learn 1.0.2 itself (``configure_optimizers``: SGD, SGD in
its ``LARSWrapper``, Adam, AdamW; the ``warmup_cosine`` schedule; SimSiam's ``static_lr``
predictor group, the classifier group with its own lr and no weight decay, the group of the
metamask head), then the engine's mirror of that optimizer is compared with a real step of it
on the same gradient.
"""

from __future__ import annotations

import pytest
import torch
from msr_loss.adapters import MetaMaskFlags, MSRFlags, wrap_method
from test_solo_learn_adapter import API, BATCH, Digits, pl, solo_methods
from test_solo_learn_training import (
    default_schedule,
    one_thread,  # noqa: F401  (pins torch to one thread)
)
from torch.utils.data import DataLoader

virtual_step = pytest.importorskip("msr_loss.virtual_step")
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.skipif(API != "kwargs", reason="solo-learn 1.0.x's optimizer set-up"),
]
OPTIMIZERS = {
    "sgd": {"optimizer": "sgd", "lars": False, "extra_optimizer_args": {"momentum": 0.9}},
    "lars": {"optimizer": "sgd", "lars": True, "extra_optimizer_args": {"momentum": 0.9}},
    "adam": {"optimizer": "adam", "lars": False, "extra_optimizer_args": {}},
    "adamw": {"optimizer": "adamw", "lars": False, "extra_optimizer_args": {}},
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_virtual_step_is_solos_own_step_on_every_parameter_group(name):
    kwargs = {
        **default_schedule("simclr"),
        "num_small_crops": 0,
        "accumulate_grad_batches": 1,
        "max_epochs": 6,
        "warmup_epochs": 4,
        "warmup_start_lr": 0.01,
        "weight_decay": 1e-4,
        "classifier_lr": 0.2,
        "pred_hidden_dim": 16,
        **OPTIMIZERS[name],
    }
    del kwargs["temperature"]
    cls = wrap_method(
        solo_methods.SimSiam, MSRFlags(num_strata=4), MetaMaskFlags(head_hidden_dim=8)
    )
    pl.seed_everything(0, workers=True)
    model = cls(**kwargs)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(Digits(size=BATCH), batch_size=BATCH))
    optimizer = trainer.optimizers[0]
    assert model.msr_terms["msr"]._meta.encoder_optimizer is optimizer
    groups = {
        group.get("name", f"group {i}"): group for i, group in enumerate(optimizer.param_groups)
    }
    assert {"encoder", "classifier", "msr_terms"} <= groups.keys()
    assert groups["classifier"]["weight_decay"] == 0
    lrs = {name: group["lr"] for name, group in groups.items()}
    assert lrs["group 3"] == kwargs["lr"], "SimSiam's predictor group has a static lr"
    assert 0 < lrs["encoder"] < kwargs["lr"] and 0 < lrs["classifier"] < kwargs["classifier_lr"]
    assert lrs["classifier"] != lrs["encoder"]

    params = [p for group in optimizer.param_groups for p in group["params"]]
    generator = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=generator) * 1e-2 for p in params]
    steps = virtual_step.virtual_steps_from_optimizer(optimizer)
    with torch.no_grad():
        expected = [steps[id(p)](p.detach().clone(), g) for p, g in zip(params, grads, strict=True)]
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad.clone()
        optimizer.step()
    for param, virtual in zip(params, expected, strict=True):
        torch.testing.assert_close(param.detach(), virtual, rtol=1e-5, atol=1e-7)
