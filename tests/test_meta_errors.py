"""MetaUpdate's bad inputs: each a named error at construction, never a silent no-op."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from msr_loss import DimensionalMask, MetaMaskUpdate, MetaSemanticRegularizer, MetaUpdate, nt_xent

TAU = 0.5
MODES = ["exact", "finite_difference"]


def problem():
    torch.manual_seed(0)
    encoder = nn.Linear(4, 4)
    msr = MetaSemanticRegularizer(4, 2, temperature=TAU)
    x1, x2 = torch.randn(6, 4), torch.randn(6, 4)

    def train_loss(f):
        z1, z2 = f(x1), f(x2)
        return nt_xent(z1, z2, temperature=TAU) + msr(z1, z2)

    return encoder, msr, train_loss


def meta_for(encoder, msr, **kwargs):
    kwargs.setdefault("lr", 0.1)
    return MetaUpdate(encoder, msr.parameters(), torch.optim.SGD(msr.parameters(), lr=1), **kwargs)


def test_a_meta_optimizer_without_the_meta_parameters_is_refused():
    encoder, msr, _ = problem()
    other = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"meta_optimizer does not hold the meta parameters"):
        MetaUpdate(encoder, msr.parameters(), torch.optim.SGD([other], lr=1), lr=0.1)


def test_a_meta_parameter_without_requires_grad_is_refused():
    encoder, msr, train_loss = problem()
    msr.logits.requires_grad_(False)
    with pytest.raises(ValueError, match=r"requires_grad=False"):
        meta_for(encoder, msr)
    msr.logits.requires_grad_(True)
    meta = meta_for(encoder, msr)
    msr.logits.requires_grad_(False)
    with pytest.raises(ValueError, match=r"requires_grad=False"):
        meta.step(train_loss, train_loss)


def test_metamask_frozen_mask_is_accepted():
    mask = DimensionalMask(4)
    assert not mask.logits.requires_grad
    MetaMaskUpdate(nn.Linear(4, 4), mask, lr=0.1)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"lr": float("nan")}, ValueError, r"lr must be a finite number and >= 0, got nan"),
        ({"lr": float("inf")}, ValueError, r"lr must be a finite number"),
        ({"lr": -0.1}, ValueError, r"lr must be a finite number and >= 0"),
        ({"lr": "0.1"}, TypeError, r"lr must be a float"),
        ({"every": 1.5}, TypeError, r"every must be an integer, got float 1.5"),
        ({"every": 0}, ValueError, r"every must be >= 1"),
        ({"mode": "second_order"}, ValueError, r"mode must be one of"),
    ],
)
def test_settings_are_checked_at_construction(kwargs, error, message):
    encoder, msr, _ = problem()
    with pytest.raises(error, match=message):
        meta_for(encoder, msr, **kwargs)


@pytest.mark.parametrize("mode", MODES)
def test_bad_mode_of_metamask_update(mode):
    with pytest.raises(ValueError, match="mode must be one of"):
        MetaMaskUpdate(nn.Linear(4, 4), DimensionalMask(4), lr=0.1, mode=mode + "x")


@pytest.mark.parametrize("mode", MODES)
def test_a_meta_loss_independent_of_the_encoder_gives_the_first_order_term(mode):
    encoder, msr, train_loss = problem()
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    (got,) = meta_for(encoder, msr, mode=mode).meta_gradients(train_loss, lambda f: msr(z1, z2))
    (expected,) = torch.autograd.grad(msr(z1, z2), [msr.logits])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_a_meta_loss_without_any_gradient_gives_zeros(mode):
    encoder, msr, train_loss = problem()
    z1 = torch.randn(6, 4)
    meta = meta_for(encoder, msr, mode=mode)
    (got,) = meta.meta_gradients(train_loss, lambda f: z1.sum())
    assert torch.equal(got, torch.zeros_like(msr.logits))


@pytest.mark.parametrize("mode", MODES)
def test_a_train_loss_without_any_gradient_leaves_the_first_order_term(mode):
    encoder, msr, _ = problem()
    x1, x2 = torch.randn(6, 4), torch.randn(6, 4)

    def meta_loss(f):
        return msr(f(x1), f(x2))

    theta = {n: p.detach() for n, p in encoder.named_parameters()}
    (expected,) = torch.autograd.grad(
        meta_loss(lambda x: functional_call(encoder, theta, (x,))), [msr.logits]
    )
    (got,) = meta_for(encoder, msr, mode=mode).meta_gradients(lambda f: x1.sum(), meta_loss)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
