"""When stage 2 runs, what patch negatives leave alone, and resuming from checkpoints.

Same stack, data and models as ``test_solo_learn_adapter.py`` (whose helpers it reuses).
"""

from __future__ import annotations

import copy

import pytest
import torch
from msr_loss.adapters import MetaMaskFlags, NSNegFlags, wrap_method
from test_solo_learn_adapter import (
    API,
    BATCH,
    FLAGS,
    BaseMomentumMethod,
    Digits,
    backbone,
    build,
    fit,
    one_thread,  # noqa: F401  (the autouse fixture pinning torch to one thread)
    pl,
    solo_methods,
    strata,
)
from torch import nn
from torch.utils.data import DataLoader

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
METAMASK = MetaMaskFlags(weight=1.0, head_hidden_dim=32, mask_lr=0.5)


class OverflowingGradScaler(pl.plugins.PrecisionPlugin):
    """AMP's loss scaling on a CPU: a real ``torch.amp.GradScaler`` that starts at a scale whose
    gradients overflow, so its first step is skipped (as a float16 run's inf steps are)."""

    def __init__(self) -> None:
        super().__init__()
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-110)
        self.skipped = 0

    def pre_backward(self, tensor, module):
        return super().pre_backward(self.scaler.scale(tensor), module)

    def optimizer_step(self, optimizer, model, optimizer_idx, closure, **kwargs):
        result = closure()
        self._after_closure(model, optimizer, optimizer_idx)
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        self.skipped += self.scaler.get_scale() < scale
        return result


@pytest.mark.skipif(API != "kwargs", reason="the precision plugin is written for Lightning 1.9")
def test_stage_two_skips_an_optimizer_step_that_amp_skipped():
    model = build("simclr", wrap_method(solo_methods.SimCLR, FLAGS))
    weights = {k: v.clone() for k, v in backbone(model).state_dict().items() if "conv1" in k}
    scaler = OverflowingGradScaler()
    trainer = fit(model, steps=3, plugins=[scaler])
    assert scaler.skipped == 1 and trainer.global_step == 3
    assert model.msr_optimizer_steps == 2
    assert model.msr_terms["msr"].meta_calls == 2
    after = backbone(model).state_dict()
    assert any(not torch.equal(after[k], v) for k, v in weights.items())


def test_stage_two_runs_once_per_real_step_under_gradient_accumulation():
    model = build("byol", wrap_method(solo_methods.BYOL, FLAGS, METAMASK))
    trainer = fit(model, steps=2, accumulate_grad_batches=2)
    assert trainer.global_step == model.msr_optimizer_steps == 2
    assert model.msr_terms["msr"].meta_calls == model.msr_terms["metamask"].meta_calls == 2


def batch_norm_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.clone() for k, v in module.state_dict().items() if "running" in k or "tracked" in k
    }


@pytest.mark.parametrize("method", ["simclr", "barlow_twins", "vicreg", "byol", "mocov2plus"])
def test_patch_negatives_leave_every_batchnorm_statistic_alone(method):
    plain = build(method)
    wrapped = build(method, wrap_method(type(plain), NSNegFlags(weight=0.5)))
    index, views, labels = next(iter(DataLoader(Digits(), batch_size=BATCH)))
    plain.training_step([index, views, labels], 0)
    loss = wrapped.training_step([index, views, labels], 0)
    assert loss.requires_grad
    expected, got = plain.state_dict(), wrapped.state_dict()
    statistics = [k for k in expected if "running" in k or "num_batches_tracked" in k]
    assert any(k.startswith(("momentum_encoder.", "momentum_backbone.")) for k in statistics) is (
        method in ("byol", "mocov2plus")
    )
    for key in statistics:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def test_patch_negatives_of_an_online_encoder_still_train_it():
    wrapped = build("simclr", wrap_method(solo_methods.SimCLR, NSNegFlags(weight=1.0)))
    index, views, labels = next(iter(DataLoader(Digits(), batch_size=BATCH)))
    wrapped.training_step([index, views, labels], 0)
    context = wrapped._msr_pending
    term = wrapped.msr_terms["nsneg"]
    torch.manual_seed(3)
    z = [wrapped.projector(backbone(wrapped)(x)) for x in context.crops]
    loss = term.loss(type(context)(context.crops, tuple(z), context.encoder))
    (grad,) = torch.autograd.grad(loss, [backbone(wrapped).conv1.weight])
    torch.manual_seed(3)
    z = [wrapped.projector(backbone(wrapped)(x)) for x in context.crops]
    detached = term.loss(
        type(context)(context.crops, tuple(z.detach() for z in z), context.encoder)
    )
    (through_negatives,) = torch.autograd.grad(detached, [backbone(wrapped).conv1.weight])
    assert through_negatives.abs().max() > 0
    assert not torch.equal(grad, through_negatives)


def resume(model, steps: int, path, callbacks=()):
    """``trainer.fit(model, ckpt_path=path)``: what solo's ``resume_from_checkpoint`` runs."""
    pl.seed_everything(0, workers=True)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.fit(model, DataLoader(Digits(), batch_size=BATCH), ckpt_path=str(path))
    return trainer


def plain_class(method: str) -> type:
    """The method itself; on 1.0.x a momentum method needs Lightning 1.9's missing argument."""
    cls = solo_methods.METHODS[method]
    if API == "cfg" or not issubclass(cls, BaseMomentumMethod):
        return cls

    class Plain(cls):
        def on_train_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0):
            super().on_train_batch_end(outputs, batch, batch_idx, dataloader_idx)

    return Plain


def save_plain_checkpoint(method: str, tmp_path, steps: int = 2):
    plain = build(method, plain_class(method))
    trainer = fit(plain, steps=steps)
    path = tmp_path / "plain.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize(
    ("method", "flags"),
    [("simclr", (FLAGS,)), ("barlow_twins", (METAMASK,)), ("byol", (FLAGS, NSNegFlags()))],
)
def test_resuming_a_checkpoint_without_the_term_starts_the_term_fresh(
    method, flags, tmp_path, capfd
):
    path = save_plain_checkpoint(method, tmp_path)
    model = build(method, wrap_method(solo_methods.METHODS[method], *flags))
    fresh = {k: v.clone() for k, v in model.msr_terms.state_dict().items()}
    trainer = resume(model, 4, path)
    assert trainer.global_step == 4 and model.msr_optimizer_steps == 2
    message = [line for line in capfd.readouterr().err.splitlines() if "msr-loss" in line]
    names = ", ".join(f.term_type.flag for f in flags if f.term_type.flag != "nsneg")
    assert message == [
        f"msr-loss: the checkpoint has no state for {names}: starting that term fresh, "
        "the rest of the run resumes"
    ]
    for flag in model.msr_terms:
        if flag != "nsneg":
            assert model.msr_terms[flag].meta_calls == 2
    moved = model.msr_terms.state_dict()
    assert any(not torch.equal(moved[k], v) for k, v in fresh.items() if "logits" in k)


def test_resuming_restores_strata_meta_optimizer_and_counter(tmp_path):
    cls = wrap_method(solo_methods.BYOL, FLAGS, METAMASK)
    model = build("byol", cls)
    trainer = fit(model, steps=2)
    path = tmp_path / "msr.ckpt"
    trainer.save_checkpoint(path)

    resumed = build("byol", cls, seed=1)
    assert not torch.equal(strata(resumed), strata(model))
    loaded = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, module):
            term = module.msr_terms["msr"]
            loaded["strata"] = strata(module)
            loaded["calls"] = (term.meta_calls, module.msr_terms["metamask"].meta_calls)
            loaded["adam"] = copy.deepcopy(term.meta_optimizer.state_dict())

    resume(resumed, 3, path, callbacks=[Probe()])
    torch.testing.assert_close(loaded["strata"], strata(model), rtol=0, atol=0)
    assert loaded["calls"] == (2, 2)
    torch.testing.assert_close(
        loaded["adam"], model.msr_terms["msr"].meta_optimizer.state_dict(), rtol=0, atol=0
    )
    assert resumed.msr_terms["msr"].meta_calls == 3
