import pytest
import torch
from meta_problem import make_problem
from torch import nn
from torch.func import functional_call

from msr_loss import MetaSemanticRegularizer, MetaUpdate, VirtualSGD, info_nce, nt_xent


def brute_force_meta_gradient(encoder, msr, train_loss, meta_loss, virtual_step, step=1e-6):
    """Central differences of L_meta(theta'(w)) in each logit w, with a real virtual step."""
    original = msr.logits.detach().clone()

    def meta_objective() -> float:
        theta = {n: p.detach().clone().requires_grad_() for n, p in encoder.named_parameters()}
        with torch.enable_grad():
            loss = train_loss(lambda x: functional_call(encoder, theta, (x,)))
            grads = torch.autograd.grad(loss, list(theta.values()))
        virtual = {
            name: virtual_step(name, value.detach(), grad)
            for (name, value), grad in zip(theta.items(), grads, strict=True)
        }
        return meta_loss(lambda x: functional_call(encoder, virtual, (x,))).item()

    gradient = torch.zeros_like(original)
    with torch.no_grad():
        for index in range(original.numel()):
            for sign in (1.0, -1.0):
                shifted = original.clone().view(-1)
                shifted[index] += sign * step
                msr.logits.copy_(shifted.view_as(original))
                gradient.view(-1)[index] += sign * meta_objective() / (2 * step)
        msr.logits.copy_(original)
    return gradient


def test_exact_meta_gradient_matches_central_differences():
    encoder, msr, train_loss, meta_loss = make_problem()
    lr = 0.3
    meta = MetaUpdate(encoder, msr.parameters(), torch.optim.SGD(msr.parameters(), lr=1), lr=lr)
    meta.mode = "exact"
    (exact,) = meta.meta_gradients(train_loss, meta_loss)
    expected = brute_force_meta_gradient(
        encoder, msr, train_loss, meta_loss, lambda _, theta, g: theta - lr * g
    )
    assert expected.abs().max() > 1e-4
    torch.testing.assert_close(exact, expected, rtol=1e-5, atol=1e-8)


SGD_SETTINGS = [
    {"momentum": 0.9, "dampening": 0.0, "nesterov": False},
    {"momentum": 0.9, "dampening": 0.3, "nesterov": False},
    {"momentum": 0.8, "dampening": 0.0, "nesterov": True},
]


@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
@pytest.mark.parametrize("sgd", SGD_SETTINGS)
def test_virtual_step_mirrors_sgd_momentum_and_weight_decay(mode, sgd):
    encoder, msr, train_loss, meta_loss = make_problem(1)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.2, weight_decay=0.05, **sgd)
    optimizer.zero_grad()
    train_loss(encoder).backward()
    optimizer.step()
    buffers = {
        name: optimizer.state[p]["momentum_buffer"] for name, p in encoder.named_parameters()
    }
    momentum = sgd["momentum"]

    def sgd_step(name, theta, grad):
        decayed = grad + 0.05 * theta
        buffer = momentum * buffers[name] + (1 - sgd["dampening"]) * decayed
        return theta - 0.2 * (decayed + momentum * buffer if sgd["nesterov"] else buffer)

    expected = brute_force_meta_gradient(encoder, msr, train_loss, meta_loss, sgd_step)
    meta = MetaUpdate(
        encoder,
        msr.parameters(),
        torch.optim.SGD(msr.parameters(), lr=1),
        encoder_optimizer=optimizer,
        mode=mode,
    )
    (got,) = meta.meta_gradients(train_loss, meta_loss)
    tolerance = 1e-5 if mode == "exact" else 1e-3
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance * 1e-2)


def test_finite_difference_agrees_with_exact():
    encoder, msr, train_loss, meta_loss = make_problem(2)
    grads = {}
    for mode in ("exact", "finite_difference"):
        meta = MetaUpdate(
            encoder, msr.parameters(), torch.optim.SGD(msr.parameters(), lr=1), lr=0.5, mode=mode
        )
        (grads[mode],) = meta.meta_gradients(train_loss, meta_loss)
    exact, approx = grads["exact"], grads["finite_difference"]
    assert (approx - exact).norm() <= 1e-3 * exact.norm()


def test_direct_dependence_of_the_meta_loss_is_included():
    encoder, msr, train_loss, _ = make_problem(3)
    x1, x2 = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)

    def meta_loss(f):
        return msr(f(x1), f(x2))

    for mode in ("exact", "finite_difference"):
        meta = MetaUpdate(
            encoder, msr.parameters(), torch.optim.SGD(msr.parameters(), lr=1), lr=0.1, mode=mode
        )
        (got,) = meta.meta_gradients(train_loss, meta_loss)
        expected = brute_force_meta_gradient(
            encoder, msr, train_loss, meta_loss, lambda _, theta, g: theta - 0.1 * g
        )
        tolerance = 1e-6 if mode == "exact" else 1e-3
        assert (got - expected).norm() <= tolerance * expected.norm()


@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_step_moves_the_strata_and_nothing_else(mode):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8))
    msr = MetaSemanticRegularizer(8, 4, temperature=0.2)
    meta = MetaUpdate(
        encoder, msr.parameters(), torch.optim.Adam(msr.parameters(), lr=0.05), lr=0.1, mode=mode
    )
    x1, x2 = torch.randn(16, 8), torch.randn(16, 8)
    params_before = [p.detach().clone() for p in encoder.parameters()]
    buffers_before = [b.clone() for b in encoder.buffers()]
    strata_before = msr.strata.detach().clone()
    for _ in range(3):
        moved = meta.step(
            lambda f: nt_xent(f(x1), f(x2), temperature=0.2) + msr(f(x1), f(x2)),
            lambda f: info_nce(f(x1), f(x2), temperature=0.2),
        )
        assert moved
    strata = msr.strata.detach()
    assert (strata - strata_before).abs().max() > 1e-3
    assert ((strata > 0) & (strata < 1)).all()
    for before, after in zip(params_before, encoder.parameters(), strict=True):
        assert torch.equal(before, after)
    for before, after in zip(buffers_before, encoder.buffers(), strict=True):
        assert torch.equal(before, after)
    assert msr.logits.grad is None


def test_every_schedule():
    encoder, msr, train_loss, meta_loss = make_problem()
    meta = MetaUpdate(
        encoder, msr.parameters(), torch.optim.SGD(msr.parameters(), lr=1.0), lr=0.1, every=3
    )
    before = msr.logits.detach().clone()
    moved = [meta.step(train_loss, meta_loss) for _ in range(7)]
    assert moved == [True, False, False, True, False, False, True]
    assert not torch.equal(before, msr.logits)


def test_virtual_sgd_matches_torch_sgd():
    torch.manual_seed(0)
    param = nn.Parameter(torch.randn(5))
    optimizer = torch.optim.SGD(
        [param], lr=0.1, momentum=0.8, dampening=0.1, weight_decay=0.01, nesterov=False
    )
    for _ in range(2):
        before = param.detach().clone()
        buffer = optimizer.state.get(param, {}).get("momentum_buffer")
        buffer = None if buffer is None else buffer.clone()
        param.grad = torch.randn(5)
        step = VirtualSGD(lr=0.1, momentum=0.8, dampening=0.1, weight_decay=0.01)
        expected = step.apply(before, param.grad, buffer)
        optimizer.step()
        torch.testing.assert_close(param.detach(), expected)


def test_configuration_errors():
    encoder, msr, _, _ = make_problem()
    opt = torch.optim.SGD(msr.parameters(), lr=1)
    with pytest.raises(ValueError, match="exactly one of encoder_optimizer and lr"):
        MetaUpdate(encoder, msr.parameters(), opt)
    with pytest.raises(ValueError, match="mode must be one of"):
        MetaUpdate(encoder, msr.parameters(), opt, lr=0.1, mode="second_order")
    with pytest.raises(ValueError, match="every must be >= 1"):
        MetaUpdate(encoder, msr.parameters(), opt, lr=0.1, every=0)
    with pytest.raises(ValueError, match="lr must be a finite number and >= 0"):
        VirtualSGD(lr=-0.1)
