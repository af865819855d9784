"""The meta-gradient follows the encoder optimizer's real step: SGD, Adam, AdamW, LARS.

Each case's reference takes a real optimizer step (a copy of the optimizer, with its state) as
the virtual step inside central differences of ``L_meta(theta'(w))`` in the strata logits ``w``.
Tolerances: 1e-5 relative for the exact mode (the reference's own round-off), 1e-2 for the finite
difference (its truncation error; measured at most 5.8e-3 here).
"""

import copy
import warnings

import pytest
import torch
from lars_reference import LARS
from meta_problem import make_problem

from msr_loss import MetaUpdate

MODES = ["exact", "finite_difference"]


def solo_lars_wrapper(params, *, clip):
    lars = pytest.importorskip("solo.utils.lars")
    inner = torch.optim.SGD(params, lr=0.3, momentum=0.9, weight_decay=1e-3)
    return lars.LARSWrapper(inner, eta=0.05, clip=clip, exclude_bias_n_norm=True)


OPTIMIZERS = {
    "sgd_nesterov": lambda p: torch.optim.SGD(
        p, lr=0.2, momentum=0.9, weight_decay=1e-2, nesterov=True
    ),
    "adam": lambda p: torch.optim.Adam(p, lr=0.02, weight_decay=1e-2),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=0.02, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.1),
    "lars": lambda p: LARS(
        p, lr=0.3, momentum=0.9, weight_decay=1e-3, eta=0.05, exclude_bias_n_norm_lars=True
    ),
    "lars_clip": lambda p: LARS(p, lr=0.3, momentum=0.9, eta=0.05, clip_lars_lr=True),
    "solo_lars_wrapper": lambda p: solo_lars_wrapper(p, clip=False),
    "solo_lars_wrapper_clip": lambda p: solo_lars_wrapper(p, clip=True),
}


def warmed_up(name, encoder, train_loss, steps=2):
    """The optimizer after ``steps`` real steps, so that its state (moments, buffers) is set."""
    optimizer = OPTIMIZERS[name](list(encoder.parameters()))
    for _ in range(steps):
        optimizer.zero_grad()
        train_loss(encoder).backward()
        optimizer.step()
    optimizer.zero_grad()
    return optimizer


def copies(encoder, optimizer):
    """Deep copies of both, the optimizer holding the copied parameters with its state."""
    wrapped = getattr(optimizer, "optim", None)
    if wrapped is None:
        pair = copy.deepcopy({"encoder": encoder, "optimizer": optimizer})
        return pair["encoder"], pair["optimizer"]
    pair = copy.deepcopy({"encoder": encoder, "optimizer": wrapped})
    settings = {k: getattr(optimizer, k) for k in ("eta", "clip", "eps", "exclude_bias_n_norm")}
    return pair["encoder"], type(optimizer)(pair["optimizer"], **settings)


def objective_after_a_real_step(encoder, optimizer, train_loss, meta_loss) -> float:
    stepped, real = copies(encoder, optimizer)
    real.zero_grad()
    with torch.enable_grad():
        train_loss(stepped).backward()
    real.step()
    with torch.no_grad():
        return meta_loss(stepped).item()


def reference_meta_gradient(encoder, msr, optimizer, train_loss, meta_loss, h=1e-5):
    original = msr.logits.detach().clone()
    gradient = torch.zeros_like(original)
    with torch.no_grad():
        for index in range(original.numel()):
            for sign in (1.0, -1.0):
                shifted = original.clone().view(-1)
                shifted[index] += sign * h
                msr.logits.copy_(shifted.view_as(original))
                value = objective_after_a_real_step(encoder, optimizer, train_loss, meta_loss)
                gradient.view(-1)[index] += sign * value / (2 * h)
        msr.logits.copy_(original)
    return gradient


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_meta_gradient_through_the_real_optimizer_step(name, mode):
    encoder, msr, train_loss, meta_loss = make_problem(1)
    optimizer = warmed_up(name, encoder, train_loss)
    expected = reference_meta_gradient(encoder, msr, optimizer, train_loss, meta_loss)
    meta = MetaUpdate(
        encoder,
        msr.parameters(),
        torch.optim.SGD(msr.parameters(), lr=1.0),
        encoder_optimizer=optimizer,
        mode=mode,
    )
    (got,) = meta.meta_gradients(train_loss, meta_loss)
    error = float((got - expected).norm() / expected.norm())
    assert expected.abs().max() > 1e-5
    assert error <= (1e-5 if mode == "exact" else 1e-2), f"relative error {error:.2e}"


def test_an_optimizer_it_cannot_mirror_warns_once_and_takes_plain_sgd():
    encoder, msr, train_loss, meta_loss = make_problem(2)
    optimizer = torch.optim.RMSprop(encoder.parameters(), lr=0.05)
    with pytest.warns(UserWarning, match="cannot mirror RMSprop") as record:
        meta = MetaUpdate(
            encoder,
            msr.parameters(),
            torch.optim.SGD(msr.parameters(), lr=1.0),
            encoder_optimizer=optimizer,
            mode="exact",
        )
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (got,) = meta.meta_gradients(train_loss, meta_loss)
    plain = MetaUpdate(
        encoder, msr.parameters(), torch.optim.SGD(msr.parameters(), lr=1.0), lr=0.05, mode="exact"
    )
    (expected,) = plain.meta_gradients(train_loss, meta_loss)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
