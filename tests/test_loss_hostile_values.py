"""The losses on hostile values and settings (issue 11): no silent wrong number, clear errors."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from msr_loss import (
    InfoNCELoss,
    InterventionalLoss,
    MetaMaskLoss,
    MetaSemanticRegularizer,
    NonSemanticContrastiveLoss,
    NTXentLoss,
    barlow_twins,
    info_nce,
    interventional_loss,
    non_semantic_logits,
    nt_xent,
    texture_negatives,
)

GEN = torch.Generator().manual_seed(11)
Z1, Z2 = torch.randn(8, 16, generator=GEN), torch.randn(8, 16, generator=GEN)
T1, T2 = torch.randn(8, 16, generator=GEN), torch.randn(8, 16, generator=GEN)
STRATA = torch.rand(3, 16, generator=GEN)

LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "nt_xent": lambda a, b: nt_xent(a, b, temperature=0.2),
    "info_nce": lambda a, b: info_nce(a, b, temperature=0.2),
    "interventional_loss": lambda a, b: interventional_loss(a, b, STRATA, temperature=0.2),
    "non_semantic": lambda a, b: NonSemanticContrastiveLoss(temperature=0.2)(a, b, T1, T2),
    "non_semantic_logits": lambda a, b: non_semantic_logits(a, b, temperature=0.2).sum(),
    "barlow_twins": lambda a, b: barlow_twins(a, b),
}


def assert_close_relative(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """Elementwise close, relative to the largest entry of ``want``."""
    torch.testing.assert_close(
        got.double(), want.double(), rtol=rtol, atol=rtol * float(want.abs().max())
    )


@pytest.mark.parametrize("scale", [1e19, 1e30, 1e-30])
@pytest.mark.parametrize("name", LOSSES)
def test_losses_are_scale_invariant_for_huge_and_tiny_finite_rows(name: str, scale: float) -> None:
    """float32 rows whose squared norm overflows (or underflows) give the loss of the unscaled rows.

    The gradient matches float64 (where the squared norms fit) on the same scaled values.
    """
    loss = LOSSES[name]
    a = (Z1 * scale).requires_grad_()
    b = (Z2 * scale).requires_grad_()
    got = loss(a, b)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(loss(Z1.double(), Z2.double()).item(), rel=1e-4, abs=1e-5)
    a64, b64 = (z.detach().double().requires_grad_() for z in (a, b))
    for grad, want in zip(
        torch.autograd.grad(got, [a, b]),
        torch.autograd.grad(loss(a64, b64), [a64, b64]),
        strict=True,
    ):
        assert want.abs().max() > 0
        assert_close_relative(grad, want, rtol=1e-3)


def test_float16_rows_with_tiny_norm_are_not_treated_as_zero() -> None:
    """Norms below float16's 6.1e-5 floor are representable in float32, where the loss runs.

    ``precision="fp32"`` keeps the similarity GEMMs in float32 too (``"auto"`` would read
    bfloat16 operands for half inputs).
    """
    h1, h2 = (Z1 * 1e-6).half(), (Z2 * 1e-6).half()
    assert float(h1.float().norm(dim=1).max()) < 6.1e-5
    for loss in (
        lambda a, b: info_nce(a, b, temperature=0.2, precision="fp32"),
        lambda a, b: interventional_loss(a, b, STRATA, temperature=0.2, precision="fp32"),
        lambda a, b: NonSemanticContrastiveLoss(temperature=0.2, precision="fp32")(a, b, T1, T2),
    ):
        assert loss(h1, h2).item() == pytest.approx(loss(h1.float(), h2.float()).item(), rel=1e-5)


def test_barlow_twins_is_scale_invariant_down_to_the_dtype() -> None:
    """Standardising after scaling each feature by its max-abs: tiny spreads are not 'constant'.

    It stops where the dtype does: a feature whose spread is below ``finfo(dtype).eps`` times its
    largest value cannot be told from a constant and is floored.
    """
    want = barlow_twins(Z1, Z2).item()
    for scale in (1e-10, 1e-20, 1e-35, 1e20, 1e35):
        assert barlow_twins(Z1 * scale, Z2 * scale).item() == pytest.approx(want, rel=1e-4)
    constant = torch.ones(8, 16) + 1e-9 * Z1
    assert barlow_twins(constant, constant, off_diagonal_weight=0.0).item() == pytest.approx(16.0)


def test_non_semantic_loss_rejects_mismatched_negatives_naming_the_argument() -> None:
    criterion = NonSemanticContrastiveLoss(temperature=0.2)
    with pytest.raises(ValueError, match=r"t1 must have shape \(8, 16\) or \(8, K, 16\)"):
        criterion(Z1, Z2, torch.randn(7, 16), torch.randn(9, 16))
    with pytest.raises(ValueError, match=r"t2 must have shape \(8, 16\) or \(8, K, 16\)"):
        criterion(Z1, Z2, T1, torch.randn(9, 16))
    with pytest.raises(ValueError, match=r"t1 must have shape .*got \(8, 15\)"):
        criterion(Z1, Z2, torch.randn(8, 15), T2)
    with pytest.raises(ValueError, match=r"t1 and t2 must have the same shape"):
        criterion(Z1, Z2, torch.randn(8, 2, 16), torch.randn(8, 3, 16))
    with pytest.raises(TypeError, match=r"t2 must be a torch\.Tensor"):
        criterion(Z1, Z2, T1, [0.0] * 16)  # type: ignore[arg-type]


NAN, INF = float("nan"), float("inf")

BAD_SETTINGS: list[tuple[str, Callable[[], object]]] = [
    ("weight", lambda: MetaSemanticRegularizer(16, 2, temperature=0.2, weight=NAN)),
    ("init_std", lambda: MetaSemanticRegularizer(16, 2, temperature=0.2, init_std=INF)),
    ("dim", lambda: MetaSemanticRegularizer(16.5, 2, temperature=0.2)),  # type: ignore[arg-type]
    ("num_strata", lambda: MetaSemanticRegularizer(16, True, temperature=0.2)),
    ("contrastive_weight", lambda: MetaMaskLoss(contrastive_weight=NAN)),
    ("off_diagonal_weight", lambda: MetaMaskLoss(off_diagonal_weight=INF)),
    ("off_diagonal_weight", lambda: barlow_twins(Z1, Z2, off_diagonal_weight=INF)),
    ("alpha", lambda: NonSemanticContrastiveLoss(temperature=0.2, alpha=NAN)),
    ("alpha", lambda: non_semantic_logits(Z1, T1, temperature=0.2, alpha=INF)),
    ("tolerance", lambda: texture_negatives(torch.rand(3, 8, 8), tolerance=NAN)),
    ("gather_distributed", lambda: info_nce(Z1, Z2, temperature=0.2, gather_distributed="no")),  # type: ignore[arg-type]
    ("gather_distributed", lambda: nt_xent(Z1, Z2, temperature=0.2, gather_distributed=1)),  # type: ignore[arg-type]
    (
        "gather_distributed",
        lambda: interventional_loss(Z1, Z2, STRATA, temperature=0.2, gather_distributed="no"),  # type: ignore[arg-type]
    ),
    ("backend", lambda: MetaSemanticRegularizer(16, 2, temperature=0.2, backend="x")),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("name", "call"), BAD_SETTINGS, ids=[n for n, _ in BAD_SETTINGS])
def test_bad_scalar_settings_are_rejected_naming_the_argument(
    name: str, call: Callable[[], object]
) -> None:
    with pytest.raises((ValueError, TypeError), match=name):
        call()


def seeded(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``build()`` under a fixed seed, so that two builds draw the same initial parameters."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build()


TEMPERATURE_TAKERS: dict[str, Callable[[Any], object]] = {
    "nt_xent": lambda t: nt_xent(Z1, Z2, temperature=t),
    "info_nce": lambda t: info_nce(Z1, Z2, temperature=t),
    "interventional_loss": lambda t: interventional_loss(Z1, Z2, STRATA, temperature=t),
    "non_semantic_logits": lambda t: non_semantic_logits(Z1, T1, temperature=t),
    "NTXentLoss": lambda t: NTXentLoss(temperature=t)(Z1, Z2),
    "InfoNCELoss": lambda t: InfoNCELoss(temperature=t)(Z1, Z2),
    "InterventionalLoss": lambda t: InterventionalLoss(temperature=t)(Z1, Z2, STRATA),
    "NonSemanticContrastiveLoss": lambda t: NonSemanticContrastiveLoss(temperature=t)(
        Z1, Z2, T1, T2
    ),
    "MetaSemanticRegularizer": lambda t: seeded(
        lambda: MetaSemanticRegularizer(16, 2, temperature=t)
    )(Z1, Z2),
    "MetaMaskLoss": lambda t: MetaMaskLoss(temperature=t)(Z1, Z2, T1, T2),
}


@pytest.mark.parametrize("name", TEMPERATURE_TAKERS)
def test_every_temperature_is_checked_and_numpy_scalars_accepted(name: str) -> None:
    call = TEMPERATURE_TAKERS[name]
    with pytest.raises(ValueError, match="1/temperature overflows"):
        call(1e-40)
    for bad in (NAN, INF, 0.0):
        with pytest.raises(ValueError, match="temperature"):
            call(bad)
    assert torch.equal(torch.as_tensor(call(np.float32(0.25))), torch.as_tensor(call(0.25)))


def test_numpy_scalars_are_accepted_as_settings() -> None:
    msr = MetaSemanticRegularizer(
        np.int64(16), np.int32(2), temperature=0.2, weight=np.float32(0.5)
    )
    assert msr.strata.shape == (2, 16) and msr.weight == 0.5
    loss = NonSemanticContrastiveLoss(temperature=0.2, alpha=np.float64(3.0))
    assert loss.alpha == 3.0
    assert MetaMaskLoss(contrastive_weight=np.float32(2.0)).contrastive_weight == 2.0


@pytest.mark.parametrize(
    "loss",
    [
        lambda a, b: info_nce(a, b, temperature=0.2),
        lambda a, b: nt_xent(a, b, temperature=0.2),
        lambda a, b: interventional_loss(a, b, STRATA.float(), temperature=0.2),
        lambda a, b: barlow_twins(a, b),
        lambda a, b: NonSemanticContrastiveLoss(temperature=0.2)(a, b, T1, T2),
    ],
)
def test_compute_dtype_follows_every_input(
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> None:
    """float64 anywhere among the inputs means float64, whichever argument it is."""
    want = loss(Z1.double(), Z2.double())
    for a, b in ((Z1.float(), Z2.double()), (Z1.double(), Z2.float())):
        got = loss(a, b)
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(want.item(), rel=1e-12)
    strata64 = interventional_loss(Z1, Z2, STRATA.double(), temperature=0.2)
    assert strata64.dtype == torch.float64
    extra = torch.randn(16, 2, dtype=torch.float64)
    assert info_nce(Z1, Z2, temperature=0.2, extra_negative_logits=extra).dtype == torch.float64


@pytest.mark.parametrize("name", ["nt_xent", "info_nce", "interventional_loss", "barlow_twins"])
def test_views_on_the_meta_device_get_a_clear_error(name: str) -> None:
    with pytest.raises(ValueError, match="z1 is on the meta device"):
        LOSSES[name](Z1.to("meta"), Z2.to("meta"))
    with pytest.raises(ValueError, match="queries is on the meta device"):
        non_semantic_logits(Z1.to("meta"), T1.to("meta"), temperature=0.2)


def test_extra_negative_logits_on_another_device_get_a_clear_error() -> None:
    extra = torch.randn(16, 2, device="meta")
    with pytest.raises(ValueError, match="extra_negative_logits is on meta but the views are on"):
        info_nce(Z1, Z2, temperature=0.2, extra_negative_logits=extra)
    with pytest.raises(ValueError, match="strata is on the meta device"):
        interventional_loss(Z1, Z2, STRATA.to("meta"), temperature=0.2)


def test_texture_negatives_reject_non_finite_images() -> None:
    images = torch.rand(3, 8, 8)
    images[1, 2, 3] = NAN
    with pytest.raises(ValueError, match="images contains NaN"):
        texture_negatives(images)


def reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Plain float64 NT-Xent: the full (2N, 2N) logits and a max-shifted log-sum-exp."""
    views = torch.cat([z1, z2]).double()
    unit = views / views.norm(dim=1, keepdim=True)
    logits = unit @ unit.T / temperature
    n = z1.shape[0]
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool), -math.inf)
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return (torch.logsumexp(logits, dim=1) - logits[torch.arange(2 * n), positive]).mean()


def near_duplicates(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views of 6 images that are all the same direction up to 1e-2 relative noise."""
    gen = torch.Generator().manual_seed(5)
    direction = torch.randn(1, 8, generator=gen, dtype=torch.float64)
    rows = direction + 1e-2 * torch.randn(12, 8, generator=gen, dtype=torch.float64)
    return rows[:6].to(dtype), rows[6:].to(dtype)


@pytest.mark.parametrize("temperature", [0.01, 0.005])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_near_duplicate_negatives_at_low_temperature_match_float64(
    temperature: float, dtype: torch.dtype
) -> None:
    """cos/tau near 100-200: an unshifted exp overflows float32; the torch path must not.

    ``precision="fp32"``: the GEMMs read the float32 unit rows (``"auto"`` would round bfloat16
    inputs' unit rows to bfloat16 again, an error of ~2^-9 / tau in every logit).
    """
    z1, z2 = near_duplicates(dtype)
    z1.requires_grad_()
    z2.requires_grad_()
    a64, b64 = (z.detach().double().requires_grad_() for z in (z1, z2))
    from seed_reference import seed_interventional_loss

    strata = torch.rand(3, 8, generator=torch.Generator().manual_seed(1))
    cases = [
        (
            lambda a, b: nt_xent(a, b, temperature=temperature, backend="torch", precision="fp32"),
            lambda a, b: reference_nt_xent(a, b, temperature),
        ),
        (
            lambda a, b: interventional_loss(
                a, b, strata, temperature=temperature, backend="torch", precision="fp32"
            ),
            lambda a, b: seed_interventional_loss(a, b, strata.double(), temperature, "cross_view"),
        ),
    ]
    for fast, reference in cases:
        got, want = fast(z1, z2), reference(a64, b64)
        assert torch.isfinite(got)
        assert got.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-4)
        for grad, want_grad in zip(
            torch.autograd.grad(got, [z1, z2]), torch.autograd.grad(want, [a64, b64]), strict=True
        ):
            assert torch.isfinite(grad).all()
            assert_close_relative(grad, want_grad, rtol=2e-2)
