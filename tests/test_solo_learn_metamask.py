"""The ``metamask`` flag block against the real solo-learn and the real Lightning Trainer.

Same stack, data and models as ``test_solo_learn_adapter.py`` (whose helpers it reuses):
resnet18 on 32x32 scikit-learn digits, batch 8, a few steps, one CPU thread.
"""

from __future__ import annotations

import copy

import pytest
import torch
from msr_loss.adapters import (
    TERMS,
    MetaMaskFlags,
    MetaMaskTerm,
    MSRFlags,
    flags_from_config,
    wrap_method,
)
from test_solo_learn_adapter import (
    BATCH,
    Digits,
    build,
    encoder_state,
    fit,
    init_arguments,
    one_thread,  # noqa: F401  (the autouse fixture pinning torch to one thread)
    pl,
    solo_methods,
)
from torch.utils.data import DataLoader

from msr_loss.functional import nt_xent

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
FLAGS = MetaMaskFlags(weight=2.0, temperature=0.1, head_hidden_dim=64, mask_lr=0.05)
STEPS = 3


def term(model) -> MetaMaskTerm:
    return model.msr_terms["metamask"]


def logits(model) -> torch.Tensor:
    return term(model).mask.logits.detach().clone()


class GradientProbe(pl.Callback):
    """After each backward: the trainable term parameters without a gradient, and the mask's."""

    def __init__(self) -> None:
        self.missing: list[list[str]] = []
        self.mask_grads: list[torch.Tensor | None] = []

    def on_after_backward(self, trainer, module) -> None:
        params = module.msr_terms.named_parameters()
        self.missing.append([n for n, p in params if p.requires_grad and p.grad is None])
        self.mask_grads.append(term(module).mask.logits.grad)


@pytest.fixture(scope="module", params=["barlow_twins", "simclr"])
def trained(request):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        method = request.param
        cls = wrap_method(solo_methods.METHODS[method], FLAGS)
        model = build(method, cls)
        before = {"mask": logits(model), "head": copy.deepcopy(term(model).head.state_dict())}
        probe = GradientProbe()
        trainer = fit(model, steps=STEPS, callbacks=[probe])
    finally:
        torch.set_num_threads(threads)
    return method, cls, model, trainer, probe, before


def test_flag_block_is_registered_parsed_and_checked():
    assert TERMS["metamask"] == MetaMaskFlags.from_block
    (flags,) = flags_from_config({"method": "barlow_twins", "metamask": {"weight": 1}})
    assert flags == MetaMaskFlags(weight=1.0)
    assert (flags.temperature, flags.mask_lr, flags.meta_mode) == (0.07, 1e-3, "finite_difference")
    assert MetaMaskFlags().weight == 10.0
    both = flags_from_config({"msr": {}, "metamask": {"meta_mode": "exact"}})
    assert [type(f) for f in both] == [MSRFlags, MetaMaskFlags]
    assert flags_from_config({"metamask": {"enabled": False}}) == []
    with pytest.raises(ValueError, match=r"unknown metamask flags \['lr'\]"):
        flags_from_config({"metamask": {"lr": 0.1}})
    with pytest.raises(ValueError, match="meta_mode must be one of"):
        MetaMaskFlags(meta_mode="second_order")
    with pytest.raises(ValueError, match="mask_lr must be > 0"):
        MetaMaskFlags(mask_lr=0.0)
    with pytest.raises(ValueError, match="temperature"):
        MetaMaskFlags(temperature=0.0)


@pytest.mark.parametrize("method", ["barlow_twins", "simclr"])
def test_wrapped_loss_is_the_masked_base_loss_plus_weighted_nt_xent(method):
    plain = build(method)
    plain.projector.register_forward_pre_hook(lambda _module, args: (args[0] * 0.5,))
    wrapped = build(method, wrap_method(type(plain), FLAGS))
    wrapped_state = encoder_state(wrapped)
    assert all(torch.equal(v, wrapped_state[k]) for k, v in encoder_state(plain).items())
    assert torch.equal(term(wrapped).mask.mask, torch.full_like(term(wrapped).mask.mask, 0.5))
    index, views, labels = next(iter(DataLoader(Digits(), batch_size=BATCH)))
    batch = [index, views, labels]
    base = plain.training_step(copy.deepcopy(batch), 0)
    total = wrapped.training_step(copy.deepcopy(batch), 0)
    head = term(wrapped).head
    with torch.no_grad():
        c1, c2 = (head(0.5 * wrapped(x)["feats"]) for x in views)
        expected = base + FLAGS.weight * nt_xent(c1, c2, temperature=FLAGS.temperature)
    torch.testing.assert_close(total, expected)


def test_trainer_steps_move_the_mask_and_train_the_head(trained):
    _, _, model, trainer, probe, before = trained
    assert probe.missing == [[]] * STEPS
    assert probe.mask_grads == [None] * STEPS
    assert not term(model).mask.logits.requires_grad
    assert term(model).meta_calls == STEPS
    assert (logits(model) - before["mask"]).abs().max() > 1e-6
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in term(model).head.parameters())
    assert id(term(model).mask.logits) not in optimized
    head = term(model).head.state_dict()
    assert any(not torch.equal(head[k], v) for k, v in before["head"].items())
    for name in ("train_metamask_loss", "train_class_loss"):
        assert torch.isfinite(trainer.callback_metrics[name])


def test_the_ordinary_step_alone_leaves_the_mask_unchanged(monkeypatch):
    monkeypatch.setattr(MetaMaskTerm, "after_optimizer_step", lambda *_: None)
    model = build("barlow_twins", wrap_method(solo_methods.BarlowTwins, FLAGS))
    encoder_before = encoder_state(model)
    fit(model, steps=2)
    assert torch.equal(logits(model), torch.zeros_like(logits(model)))
    encoder_after = encoder_state(model)
    assert any(not torch.equal(v, encoder_after[k]) for k, v in encoder_before.items())


def test_checkpoint_round_trips_the_mask_and_its_optimizer(trained, tmp_path):
    method, cls, model, trainer, _, before = trained
    path = tmp_path / f"{method}.ckpt"
    trainer.save_checkpoint(path)
    restored = cls.load_from_checkpoint(path, **init_arguments(method))
    assert not torch.equal(logits(restored), before["mask"])
    torch.testing.assert_close(logits(restored), logits(model), rtol=0, atol=0)
    torch.testing.assert_close(
        term(restored).head.state_dict(), term(model).head.state_dict(), rtol=0, atol=0
    )
    assert term(restored).meta_calls == term(model).meta_calls == STEPS
    state = term(restored).mask_optimizer.state_dict()
    assert state["state"], "the mask optimizer has momentum buffers to restore"
    torch.testing.assert_close(state, term(model).mask_optimizer.state_dict(), rtol=0, atol=0)
