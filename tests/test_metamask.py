"""MetaMask: Barlow Twins, the masked NT-Xent, the mask and its meta-gradient."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from msr_loss import (
    DimensionalMask,
    MetaMaskLoss,
    MetaMaskModel,
    MetaMaskUpdate,
    barlow_twins,
)


def reference_barlow_twins(z1: torch.Tensor, z2: torch.Tensor, lam: float) -> float:
    """Term by term, in float64 Python arithmetic."""
    a, b = z1.double().tolist(), z2.double().tolist()
    n, d = len(a), len(a[0])

    def standardised(z: list[list[float]]) -> list[list[float]]:
        columns = []
        for j in range(d):
            column = [row[j] for row in z]
            mean = sum(column) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in column) / (n - 1))
            columns.append([(v - mean) / std for v in column])
        return columns

    sa, sb = standardised(a), standardised(b)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(sa[i][k] * sb[j][k] for k in range(n)) / n
            loss += (1 - c) ** 2 if i == j else lam * c * c
    return loss


def reference_nt_xent(c1: torch.Tensor, c2: torch.Tensor, tau: float) -> torch.Tensor:
    """-log(exp(pos) / sum over the 2N-1 other views), averaged over the 2N anchors."""
    views = torch.cat([c1, c2]).double()
    n = c1.shape[0]
    terms = []
    for r in range(2 * n):
        partner = (r + n) % (2 * n)
        denominator = torch.zeros((), dtype=torch.float64)
        for k in range(2 * n):
            if k != r:
                denominator = denominator + torch.exp(
                    torch.cosine_similarity(views[r], views[k], dim=0) / tau
                )
        positive = torch.exp(torch.cosine_similarity(views[r], views[partner], dim=0) / tau)
        terms.append(-torch.log(positive / denominator))
    return torch.stack(terms).mean()


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(2, 6),
    d=st.integers(1, 5),
    lam=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_barlow_twins_matches_reference(n: int, d: int, lam: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    z2 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    got = barlow_twins(z1, z2, off_diagonal_weight=lam)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(reference_barlow_twins(z1, z2, lam), rel=1e-10, abs=1e-10)
    got32 = barlow_twins(z1.float(), z2.float(), off_diagonal_weight=lam)
    assert got32.dtype == torch.float32
    assert got32.item() == pytest.approx(got.item(), rel=1e-4, abs=1e-4)


def test_barlow_twins_closed_form_and_gradient() -> None:
    z = torch.randn(8, 3, dtype=torch.float64)
    assert barlow_twins(z, z, off_diagonal_weight=0.0).item() == pytest.approx(
        sum((1 - 7 / 8) ** 2 for _ in range(3))
    )
    z1 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: barlow_twins(a, b), (z1, z2))


def test_barlow_twins_default_lambda_and_errors() -> None:
    z1, z2 = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    assert barlow_twins(z1, z2).item() == pytest.approx(reference_barlow_twins(z1, z2, 5e-3))
    with pytest.raises(ValueError, match="off_diagonal_weight"):
        barlow_twins(z1, z2, off_diagonal_weight=-1.0)
    with pytest.raises(TypeError, match="off_diagonal_weight"):
        barlow_twins(z1, z2, off_diagonal_weight="0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same shape"):
        barlow_twins(z1, z2[:, :3])
    with pytest.raises(ValueError, match="at least 2"):
        barlow_twins(z1[:1], z2[:1])


def test_metamask_loss_is_bt_plus_weighted_nt_xent() -> None:
    gen = torch.Generator().manual_seed(1)
    z1, z2, c1, c2 = (torch.randn(5, 4, generator=gen, dtype=torch.float64) for _ in range(4))
    criterion = MetaMaskLoss()
    expected = reference_barlow_twins(z1, z2, 5e-3) + 10 * reference_nt_xent(c1, c2, 0.07).item()
    assert criterion(z1, z2, c1, c2).item() == pytest.approx(expected, rel=1e-9)
    custom = MetaMaskLoss(off_diagonal_weight=0.1, temperature=0.5, contrastive_weight=2.0)
    expected = reference_barlow_twins(z1, z2, 0.1) + 2 * reference_nt_xent(c1, c2, 0.5).item()
    assert custom(z1, z2, c1, c2).item() == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="temperature"):
        MetaMaskLoss(temperature=0.0)


def tiny_model(seed: int = 0) -> MetaMaskModel:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(5, 4), nn.Tanh())
    return MetaMaskModel(backbone, 4, nn.Linear(4, 3), nn.Linear(4, 3)).double()


def test_masked_nt_xent_matches_reference() -> None:
    model = tiny_model()
    with torch.no_grad():
        model.mask.logits.copy_(torch.tensor([-1.0, 0.5, 2.0, 0.0]))
    x1, x2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    linear, head = model.backbone[0], model.contrastive_projector

    def reference_head(x: torch.Tensor) -> torch.Tensor:
        features = torch.tanh(x @ linear.weight.T + linear.bias)
        masked = features * (1 / (1 + torch.exp(-model.mask.logits)))
        return masked @ head.weight.T + head.bias

    c1, c2 = model(x1)[1], model(x2)[1]
    got = MetaMaskLoss(temperature=0.2).contrastive(c1, c2)
    expected = reference_nt_xent(reference_head(x1), reference_head(x2), 0.2)
    assert got.item() == pytest.approx(expected.item(), rel=1e-10)


def test_dimensional_mask_starts_at_one_half_and_broadcasts() -> None:
    mask = DimensionalMask(3)
    assert torch.equal(mask.logits, torch.zeros(3))
    features = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        mask.logits.copy_(torch.tensor([0.0, 1.0, -2.0]))
    expected = features * torch.sigmoid(mask.logits)[None, :, None, None]
    assert torch.allclose(mask(features), expected)
    with pytest.raises(ValueError, match=r"\(N, 3, ...\)"):
        mask(torch.randn(2, 4))
    with pytest.raises(TypeError, match="features"):
        mask([1.0, 2.0, 3.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_features"):
        DimensionalMask(0)
    with pytest.raises(TypeError, match="num_features"):
        DimensionalMask(2.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=0.1),
        lambda params: torch.optim.Adam(params, lr=0.5, weight_decay=0.1),
    ],
)
def test_ordinary_step_cannot_move_the_mask(make_optimizer: object) -> None:
    model = tiny_model()
    optimizer = make_optimizer(model.parameters())  # type: ignore[operator]
    before_mask = model.mask.logits.detach().clone()
    before_head = model.contrastive_projector.weight.detach().clone()
    criterion = MetaMaskLoss()
    for _ in range(2):
        x1, x2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
        optimizer.zero_grad()
        criterion(*model(x1), *model(x2)).backward()
        assert model.mask.logits.grad is None
        optimizer.step()
    assert torch.equal(model.mask.logits, before_mask)
    assert not torch.equal(model.contrastive_projector.weight, before_head)
    encoder_ids = {id(p) for p in model.encoder_parameters()}
    assert id(model.mask.logits) not in encoder_ids
    assert len(encoder_ids) == len(list(model.parameters())) - 1


def reference_meta_objective(
    model: MetaMaskModel, m: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, lr: float
) -> torch.Tensor:
    """L_meta(theta - lr * grad_theta L_train(theta, m), m), both NT-Xent at tau 0.5."""
    theta = [p.detach().clone().requires_grad_() for p in model.encoder_parameters()]
    names = [name for name, p in model.named_parameters() if p is not model.mask.logits]

    def contrastive(params: list[torch.Tensor]) -> torch.Tensor:
        weights = dict(zip(names, params, strict=True))
        mask = 1 / (1 + torch.exp(-m))

        def head(x: torch.Tensor) -> torch.Tensor:
            features = torch.tanh(x @ weights["backbone.0.weight"].T + weights["backbone.0.bias"])
            masked = features * mask
            return (
                masked @ weights["contrastive_projector.weight"].T
                + weights["contrastive_projector.bias"]
            )

        return reference_nt_xent(head(x1), head(x2), 0.5)

    grads = torch.autograd.grad(contrastive(theta), theta, allow_unused=True)
    stepped = [
        t.detach() - lr * (torch.zeros_like(t) if g is None else g)
        for t, g in zip(theta, grads, strict=True)
    ]
    return contrastive(stepped)


def central_differences(
    model: MetaMaskModel, x1: torch.Tensor, x2: torch.Tensor, lr: float, h: float = 1e-5
) -> torch.Tensor:
    m = model.mask.logits.detach().clone()
    grad = torch.zeros_like(m)
    for k in range(m.numel()):
        step = torch.zeros_like(m)
        step[k] = h
        plus = reference_meta_objective(model, m + step, x1, x2, lr)
        minus = reference_meta_objective(model, m - step, x1, x2, lr)
        grad[k] = (plus - minus) / (2 * h)
    return grad


def test_meta_gradient_of_the_mask_matches_central_differences() -> None:
    model = tiny_model(seed=3)
    with torch.no_grad():
        model.mask.logits.copy_(torch.tensor([0.3, -0.7, 1.1, 0.0]))
    gen = torch.Generator().manual_seed(4)
    x1 = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    x2 = x1 + 0.3 * torch.randn(6, 5, generator=gen, dtype=torch.float64)
    lr = 0.5
    criterion = MetaMaskLoss(temperature=0.5)

    def contrastive(f: object) -> torch.Tensor:
        return criterion.contrastive(f(x1)[1], f(x2)[1])  # type: ignore[operator]

    numerical = central_differences(model, x1, x2, lr)
    first_order_only = central_differences(model, x1, x2, lr=1e-12)
    assert not torch.allclose(numerical, first_order_only, rtol=1e-3, atol=1e-8)

    exact = MetaMaskUpdate(model, lr=lr, mode="exact").meta_gradients(contrastive, contrastive)
    assert torch.allclose(exact[0], numerical, rtol=1e-6, atol=1e-9)
    approx = MetaMaskUpdate(model, lr=lr).meta_gradients(contrastive, contrastive)
    assert torch.allclose(approx[0], numerical, rtol=1e-3, atol=1e-7)
    assert not model.mask.logits.requires_grad


def test_meta_step_moves_the_mask_with_metamask_defaults() -> None:
    model = tiny_model()
    encoder_optimizer = torch.optim.SGD(model.encoder_parameters(), lr=0.1, momentum=0.9)
    meta = MetaMaskUpdate(model, encoder_optimizer=encoder_optimizer)
    group = meta.meta_optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (1e-3, 0.9, 5e-4)
    assert meta.meta_parameters == [model.mask.logits]
    x1, x2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    criterion = MetaMaskLoss()

    def contrastive(f: object) -> torch.Tensor:
        return criterion.contrastive(f(x1)[1], f(x2)[1])  # type: ignore[operator]

    before = model.mask.logits.detach().clone()
    assert meta.step(contrastive, contrastive)
    assert not torch.equal(model.mask.logits, before)
    assert not model.mask.logits.requires_grad


def test_update_finds_or_rejects_the_mask() -> None:
    with pytest.raises(ValueError, match="exactly one DimensionalMask"):
        MetaMaskUpdate(nn.Linear(3, 3), lr=0.1)
    with pytest.raises(TypeError, match="DimensionalMask"):
        MetaMaskUpdate(nn.Linear(3, 3), nn.Linear(3, 3), lr=0.1)  # type: ignore[arg-type]
    mask = DimensionalMask(3)
    outside = MetaMaskUpdate(nn.Linear(3, 3), mask, lr=0.1)
    assert outside.meta_parameters == [mask.logits]


def test_attached_mask_gets_the_same_meta_gradient() -> None:
    model = tiny_model(seed=3)
    with torch.no_grad():
        model.mask.logits.copy_(torch.tensor([0.3, -0.7, 1.1, 0.0]))
    gen = torch.Generator().manual_seed(4)
    x1 = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    x2 = x1 + 0.3 * torch.randn(6, 5, generator=gen, dtype=torch.float64)
    numerical = central_differences(model, x1, x2, lr=0.5)

    mask = DimensionalMask(4).double()
    with torch.no_grad():
        mask.logits.copy_(model.mask.logits)
    encoder = nn.Sequential(model.backbone, model.contrastive_projector)
    handle = mask.attach(model.backbone)
    criterion = MetaMaskLoss(temperature=0.5)

    def contrastive(f: object) -> torch.Tensor:
        return criterion.contrastive(f(x1), f(x2))  # type: ignore[operator]

    exact = MetaMaskUpdate(encoder, mask, lr=0.5, mode="exact").meta_gradients(
        contrastive, contrastive
    )
    assert torch.allclose(exact[0], numerical, rtol=1e-6, atol=1e-9)
    features = model.backbone(x1)
    handle.remove()
    assert torch.allclose(features, model.backbone(x1) * mask.mask)


def test_barlow_twins_ignores_autocast() -> None:
    z1, z2 = torch.randn(8, 4), torch.randn(8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = barlow_twins(z1, z2)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(barlow_twins(z1, z2).item(), rel=1e-6)
