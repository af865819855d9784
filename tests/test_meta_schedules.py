"""The meta engine under learning-rate schedules: lr 0 is the identity, the current lr is used."""

import math

import pytest
import torch
from lars_reference import LARS
from meta_problem import make_problem as shared_problem
from torch.func import functional_call

from msr_loss import MetaUpdate, VirtualSGD

MODES = ["exact", "finite_difference"]


def make_problem(seed: int = 0):
    """The shared problem with ICL-MSR in the meta loss too, so its first-order term is not 0."""
    return shared_problem(seed, regularised_meta=True)


def first_order_term(encoder, msr, meta_loss):
    """The meta-gradient when the virtual step does not move the encoder."""
    theta = {n: p.detach() for n, p in encoder.named_parameters()}
    loss = meta_loss(lambda x: functional_call(encoder, theta, (x,)))
    return torch.autograd.grad(loss, [msr.logits])[0]


OPTIMIZERS = {
    "sgd": lambda groups: torch.optim.SGD(groups, momentum=0.9, weight_decay=1e-3),
    "adamw": lambda groups: torch.optim.AdamW(groups, weight_decay=1e-2),
    "lars": lambda groups: LARS(groups, lr=0.1, momentum=0.9, eta=0.02, clip_lars_lr=True),
}


def two_groups(encoder, lr, kind="sgd"):
    """The first layer at ``lr``, the second frozen at lr 0."""
    first, second = encoder[0], encoder[2]
    return OPTIMIZERS[kind](
        [
            {"params": first.parameters(), "lr": lr},
            {"params": second.parameters(), "lr": 0.0},
        ]
    )


def schedule(name, optimizer, steps):
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=0.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: epoch / steps)


def test_virtual_sgd_at_lr_zero_is_the_identity():
    param, grad, buffer = torch.randn(5), torch.randn(5), torch.randn(5)
    step = VirtualSGD(lr=0.0, momentum=0.9, weight_decay=0.1, nesterov=True)
    assert torch.equal(step.apply(param, grad, buffer), param)
    assert torch.equal(VirtualSGD(lr=0.0).apply(param, grad, None), param)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["cosine", "warmup_from_zero"])
@pytest.mark.parametrize("optimizer_kind", list(OPTIMIZERS))
def test_schedule_to_lr_zero_runs_and_gives_the_first_order_term(mode, kind, optimizer_kind):
    encoder, msr, train_loss, meta_loss = make_problem()
    steps = 3
    optimizer = two_groups(encoder, lr=0.2, kind=optimizer_kind)
    scheduler = schedule(kind, optimizer, steps)
    meta = MetaUpdate(
        encoder,
        msr.parameters(),
        torch.optim.SGD(msr.parameters(), lr=0.1),
        encoder_optimizer=optimizer,
        mode=mode,
    )
    seen_zero = False
    for _ in range(steps + 1):
        optimizer.zero_grad()
        train_loss(encoder).backward()
        optimizer.step()
        at_zero = all(group["lr"] == 0 for group in optimizer.param_groups)
        if at_zero:
            seen_zero = True
            (got,) = meta.meta_gradients(train_loss, meta_loss)
            expected = first_order_term(encoder, msr, meta_loss)
            assert expected.abs().max() > 1e-4
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        assert meta.step(train_loss, meta_loss)
        assert torch.isfinite(msr.logits).all()
        scheduler.step()
    assert seen_zero


@pytest.mark.parametrize("mode", MODES)
def test_fixed_lr_zero_gives_the_first_order_term(mode):
    encoder, msr, train_loss, meta_loss = make_problem(1)
    meta = MetaUpdate(
        encoder, msr.parameters(), torch.optim.SGD(msr.parameters(), lr=0.1), lr=0.0, mode=mode
    )
    (got,) = meta.meta_gradients(train_loss, meta_loss)
    torch.testing.assert_close(got, first_order_term(encoder, msr, meta_loss), rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_frozen_group_at_lr_zero_does_not_take_the_virtual_step(mode):
    """Only the first layer moves in the virtual step: the gradient must match that step."""
    encoder, msr, train_loss, meta_loss = make_problem(2)
    lr = 0.3
    optimizer = torch.optim.SGD(
        [
            {"params": encoder[0].parameters(), "lr": lr},
            {"params": encoder[2].parameters(), "lr": 0.0},
        ]
    )
    meta = MetaUpdate(
        encoder,
        msr.parameters(),
        torch.optim.SGD(msr.parameters(), lr=0.1),
        encoder_optimizer=optimizer,
        mode=mode,
    )
    (got,) = meta.meta_gradients(train_loss, meta_loss)
    expected = numerical_meta_gradient(
        encoder, msr, train_loss, meta_loss, {"0.weight": lr, "0.bias": lr}
    )
    tolerance = 1e-6 if mode == "exact" else 1e-3
    assert (got - expected).norm() <= tolerance * expected.norm()


def numerical_meta_gradient(encoder, msr, train_loss, meta_loss, lrs, h=1e-6):
    """Central differences of L_meta(theta'(w)); parameter ``n`` steps by ``lrs.get(n, 0)``."""
    original = msr.logits.detach().clone()

    def objective() -> float:
        theta = {n: p.detach().clone().requires_grad_() for n, p in encoder.named_parameters()}
        with torch.enable_grad():
            loss = train_loss(lambda x: functional_call(encoder, theta, (x,)))
            grads = torch.autograd.grad(loss, list(theta.values()))
        virtual = {
            n: t.detach() - lrs.get(n, 0.0) * g
            for (n, t), g in zip(theta.items(), grads, strict=True)
        }
        return meta_loss(lambda x: functional_call(encoder, virtual, (x,))).item()

    gradient = torch.zeros_like(original)
    with torch.no_grad():
        for index in range(original.numel()):
            for sign in (1.0, -1.0):
                shifted = original.clone().view(-1)
                shifted[index] += sign * h
                msr.logits.copy_(shifted.view_as(original))
                gradient.view(-1)[index] += sign * objective() / (2 * h)
        msr.logits.copy_(original)
    return gradient


@pytest.mark.parametrize("mode", MODES)
def test_the_virtual_step_uses_the_scheduled_lr_not_the_default(mode):
    encoder, msr, train_loss, meta_loss = make_problem(3)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.25 ** (epoch + 1))
    optimizer.zero_grad()
    train_loss(encoder).backward()
    optimizer.step()
    scheduler.step()
    current = optimizer.param_groups[0]["lr"]
    assert math.isclose(current, 1 / 16) and optimizer.defaults["lr"] == 1.0
    meta = MetaUpdate(
        encoder,
        msr.parameters(),
        torch.optim.SGD(msr.parameters(), lr=0.1),
        encoder_optimizer=optimizer,
        mode=mode,
    )
    (got,) = meta.meta_gradients(train_loss, meta_loss)
    lrs = {n: current for n, _ in encoder.named_parameters()}
    expected = numerical_meta_gradient(encoder, msr, train_loss, meta_loss, lrs)
    tolerance = 1e-6 if mode == "exact" else 1e-3
    assert (got - expected).norm() <= tolerance * expected.norm()
