"""Mixed precision (autocast, half inputs) against float32, and torch.compile(fullgraph=True)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from msr_loss import MetaSemanticRegularizer, info_nce, interventional_loss, nt_xent
from msr_loss.types import Precision

TAU = 0.1
HALF_DTYPES = (torch.bfloat16, torch.float16)
# Relative error of the loss and of the encoder's gradient (norm) under autocast, against the
# float32 computation; the README states them. They cover the projector's rounding only.
LOSS_RTOL = {torch.bfloat16: 5e-3, torch.float16: 5e-4}
GRAD_RTOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_losses(precision: Precision = "auto") -> dict[str, Loss]:
    torch.manual_seed(0)
    strata = torch.rand(4, 16)
    extra = torch.randn(32, 3)
    msr = MetaSemanticRegularizer(16, 4, temperature=TAU, precision=precision)
    return {
        "interventional": lambda z1, z2: interventional_loss(
            z1, z2, strata, temperature=TAU, precision=precision
        ),
        "interventional_all_extra": lambda z1, z2: interventional_loss(
            z1,
            z2,
            strata,
            temperature=TAU,
            negatives="all",
            extra_negative_logits=extra,
            precision=precision,
        ),
        "info_nce": lambda z1, z2: info_nce(z1, z2, temperature=TAU, precision=precision),
        "nt_xent": lambda z1, z2: nt_xent(z1, z2, temperature=TAU, precision=precision),
        "regularizer": msr,
    }


LOSSES = make_losses()
# precision="fp32": under autocast and for half inputs "auto" means bfloat16 similarity GEMMs
# (tests/test_gemm_precision.py); with "fp32" everything inside is float32.
FP32_LOSSES = make_losses("fp32")


def projector_run(loss: Loss, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    projector = nn.Linear(32, 16)
    x1, x2 = torch.randn(16, 32), torch.randn(16, 32)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        value = loss(projector(x1), projector(x2))
    value.backward()
    return value.detach(), projector.weight.grad


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_autocast_matches_float32_within_the_stated_tolerance(name, dtype):
    value, grad = projector_run(LOSSES[name], dtype)
    expected_value, expected_grad = projector_run(LOSSES[name], None)
    assert value.dtype == torch.float32
    assert grad.dtype == torch.float32
    assert relative(value, expected_value) < LOSS_RTOL[dtype]
    assert relative(grad, expected_grad) < GRAD_RTOL[dtype]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_autocast_computes_in_float32_inside(name, dtype):
    torch.manual_seed(2)
    z1, z2 = torch.randn(16, 16).to(dtype), torch.randn(16, 16).to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        inside = FP32_LOSSES[name](z1, z2)
    torch.testing.assert_close(inside, FP32_LOSSES[name](z1.float(), z2.float()), rtol=1e-6, atol=0)


def half_and_single(z1: torch.Tensor, z2: torch.Tensor, dtype: torch.dtype):
    half = [z.to(dtype).requires_grad_() for z in (z1, z2)]
    return half, [z.detach().float().requires_grad_() for z in half]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_inputs_with_tiny_rows_at_low_temperature_match_float32(dtype):
    torch.manual_seed(3)
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    z1[1] *= 1e-4  # its squares underflow in float16
    z2[2] *= 1e-4
    strata = torch.rand(3, 16)
    for loss in (
        lambda a, b: interventional_loss(a, b, strata, temperature=0.05, precision="fp32"),
        # solo-learn's fp16 overflows below 0.09
        lambda a, b: nt_xent(a, b, temperature=0.05, precision="fp32"),
    ):
        half, single = half_and_single(z1, z2, dtype)
        value, expected = loss(*half), loss(*single)
        value.backward()
        expected.backward()
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=0)
        for h, s in zip(half, single, strict=True):
            assert torch.isfinite(h.grad).all()
            torch.testing.assert_close(h.grad.float(), s.grad, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_a_zero_row_in_half_precision_gives_finite_values_and_nt_xent_gradients(dtype):
    torch.manual_seed(4)
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    z1[0] = 0.0  # F.normalize's default eps is 0 in float16 (lightly #1259)
    half, single = half_and_single(z1, z2, dtype)
    strata = torch.rand(3, 16)
    value = interventional_loss(*half, strata, temperature=0.1, precision="fp32")
    torch.testing.assert_close(value, interventional_loss(*single, strata, temperature=0.1))
    value = nt_xent(*half, temperature=0.1, precision="fp32")
    torch.testing.assert_close(value, nt_xent(*single, temperature=0.1))
    value.backward()
    assert all(torch.isfinite(h.grad).all() for h in half)


def all_losses(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    return torch.stack([loss(z1, z2) for loss in LOSSES.values()])


def eager_and_compiled(fn: Loss, backend: str):
    torch._dynamo.reset()
    torch.manual_seed(5)
    z1, z2 = torch.randn(16, 16), torch.randn(16, 16)
    results = []
    for run in (fn, torch.compile(fn, fullgraph=True, backend=backend, dynamic=False)):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        value = run(a, b)
        value.sum().backward()
        results.append((value.detach(), a.grad, b.grad))
    return results


def test_every_loss_compiles_with_fullgraph_and_matches_eager():
    eager, compiled = eager_and_compiled(all_losses, "aot_eager")
    for got, expected in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, expected)


def test_inductor_compiles_the_interventional_loss_with_fullgraph():
    eager, compiled = eager_and_compiled(LOSSES["interventional"], "inductor")
    for got, expected in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
