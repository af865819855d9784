"""Each virtual step against a real step of the optimizer it mirrors: value and derivative."""

import copy

import pytest
import torch
from lars_reference import LARS
from torch import nn

from msr_loss.virtual_step import (
    AdamState,
    VirtualAdam,
    VirtualLARS,
    VirtualSGD,
    mirrors,
    virtual_steps_from_optimizer,
)


def solo_lars_wrapper(groups, **settings):
    lars = pytest.importorskip("solo.utils.lars")
    return lars.LARSWrapper(torch.optim.SGD(groups, lr=0.3, momentum=0.9), **settings)


OPTIMIZERS = {
    "sgd": lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "sgd_maximize": lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.5, maximize=True),
    "adam": lambda g: torch.optim.Adam(g, lr=0.01, weight_decay=0.01),
    "adam_amsgrad": lambda g: torch.optim.Adam(g, lr=0.01, amsgrad=True, betas=(0.8, 0.9)),
    "adamw": lambda g: torch.optim.AdamW(g, lr=0.01, weight_decay=0.1),
    "lars": lambda g: LARS(g, lr=0.3, momentum=0.9, weight_decay=1e-3, eta=0.02),
    "lars_exclude_clip": lambda g: LARS(
        g, lr=0.3, momentum=0.9, eta=0.02, clip_lars_lr=True, exclude_bias_n_norm_lars=True
    ),
    "solo_lars_wrapper": lambda g: solo_lars_wrapper(
        g, eta=0.02, clip=True, exclude_bias_n_norm=True
    ),
}


def model_and_optimizer(name: str):
    """Two parameter groups (the second at a third of the lr, like solo's static-lr groups)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).double()
    groups = [
        {"params": model[0].parameters()},
        {"params": model[1].parameters(), "lr": 0.03},
    ]
    return model, OPTIMIZERS[name](groups)


def real_step(model, optimizer, grads):
    """The parameters after a real step of copies of ``model`` and ``optimizer`` with ``grads``."""
    wrapped = getattr(optimizer, "optim", None)
    if wrapped is None:
        pair = copy.deepcopy({"model": model, "optimizer": optimizer})
        stepped, real = pair["model"], pair["optimizer"]
    else:
        pair = copy.deepcopy({"model": model, "optimizer": wrapped})
        settings = {k: getattr(optimizer, k) for k in ("eta", "clip", "eps", "exclude_bias_n_norm")}
        stepped, real = pair["model"], type(optimizer)(pair["optimizer"], **settings)
    for param, grad in zip(stepped.parameters(), grads, strict=True):
        param.grad = grad.clone()
    real.step()
    return [p.detach() for p in stepped.parameters()]


def advance(model, optimizer, steps):
    for _ in range(steps):
        for param in model.parameters():
            param.grad = torch.randn_like(param)
        optimizer.step()


@pytest.mark.parametrize("warm_steps", [0, 2])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_virtual_step_is_the_real_step(name, warm_steps):
    model, optimizer = model_and_optimizer(name)
    assert mirrors(optimizer)
    advance(model, optimizer, warm_steps)
    grads = [torch.randn_like(p) for p in model.parameters()]
    steps = virtual_steps_from_optimizer(optimizer)
    got = [steps[id(p)](p.detach(), g) for p, g in zip(model.parameters(), grads, strict=True)]
    for a, b in zip(got, real_step(model, optimizer, grads), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_virtual_step_derivative_is_the_real_steps(name):
    """d(step)/d(grad) along a random direction, against central differences of real steps."""
    model, optimizer = model_and_optimizer(name)
    advance(model, optimizer, 2)
    steps = virtual_steps_from_optimizer(optimizer)
    params = list(model.parameters())
    grads = [torch.randn_like(p) for p in params]
    direction = [torch.randn_like(p) for p in params]
    _, derivative = torch.func.jvp(
        lambda *g: tuple(steps[id(p)](p.detach(), gi) for p, gi in zip(params, g, strict=True)),
        tuple(grads),
        tuple(direction),
    )
    h = 1e-6
    plus = real_step(model, optimizer, [g + h * d for g, d in zip(grads, direction, strict=True)])
    minus = real_step(model, optimizer, [g - h * d for g, d in zip(grads, direction, strict=True)])
    numerical = [(p - m) / (2 * h) for p, m in zip(plus, minus, strict=True)]
    assert max(float(d.abs().max()) for d in derivative) > 1e-4
    for a, b in zip(derivative, numerical, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    ("rule", "state"),
    [
        (VirtualSGD(lr=0.0, momentum=0.9, weight_decay=0.1), torch.ones(3)),
        (VirtualAdam(lr=0.0, weight_decay=0.1, decoupled_weight_decay=True), AdamState()),
        (VirtualLARS(lr=0.0, momentum=0.9, clip=True), None),
    ],
)
def test_every_rule_is_the_identity_at_lr_zero(rule, state):
    param, grad = torch.randn(3), torch.randn(3)
    assert rule.apply(param, grad, state) is param


def test_other_optimizers_are_not_mirrored():
    param = nn.Parameter(torch.ones(2))
    assert not mirrors(torch.optim.RMSprop([param]))
    optimizer = torch.optim.Adagrad([param], lr=0.5)
    step = virtual_steps_from_optimizer(optimizer)[id(param)]
    torch.testing.assert_close(step(param.detach(), torch.ones(2)), torch.full((2,), 0.5))


def test_rule_settings_are_checked():
    with pytest.raises(ValueError, match="lr must be a finite number and >= 0"):
        VirtualAdam(lr=float("nan"))
    with pytest.raises(ValueError, match=r"betas\[1\] must be"):
        VirtualAdam(lr=0.1, betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="eta must be"):
        VirtualLARS(lr=0.1, eta=-1.0)
