"""Unit rows with the fused backward against plain float64 normalisation, at any magnitude."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msr_loss.rows import unit_rows


def rows_of_any_magnitude(
    seed: int, rows: int, dim: int, exponents: list[int | None]
) -> torch.Tensor:
    """Random float64 rows, row ``i`` scaled by ``10 ** exponents[i]`` (None: a zero row)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
    scales = torch.tensor([0.0 if e is None else 10.0**e for e in exponents], dtype=x.dtype)
    return x * scales[:, None]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.integers(1, 9),
    st.lists(st.one_of(st.none(), st.integers(-30, 30)), min_size=1, max_size=6),
)
def test_value_and_gradient_match_plain_normalisation(seed, dim, exponents):
    """Non-zero rows: ``x / ||x||`` and its Jacobian; zero rows: zero, with twice the gradient."""
    x = rows_of_any_magnitude(seed, len(exponents), dim, exponents).requires_grad_()
    grad_out = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(seed))
    got = unit_rows(x, torch.float64)
    (got_grad,) = torch.autograd.grad(got, x, grad_out)
    zero = torch.tensor([e is None for e in exponents])
    plain = x[~zero] / x[~zero].norm(dim=1, keepdim=True)
    (plain_grad,) = torch.autograd.grad(plain, x, grad_out[~zero])
    torch.testing.assert_close(got[~zero], plain, rtol=1e-12, atol=1e-12)
    scale = x.detach().norm(dim=1, keepdim=True)[~zero]
    torch.testing.assert_close(got_grad[~zero] * scale, plain_grad[~zero] * scale)
    assert torch.equal(got[zero], torch.zeros_like(got[zero]))
    assert torch.equal(got_grad[zero], 2 * grad_out[zero])


def test_float32_rows_whose_squares_overflow_or_underflow():
    x = rows_of_any_magnitude(1, 4, 8, [25, -25, 0, 37]).float().requires_grad_()
    grad_out = torch.randn(4, 8)
    got = unit_rows(x, torch.float32)
    (got_grad,) = torch.autograd.grad(got, x, grad_out)
    x64 = x.detach().double().requires_grad_()
    plain = x64 / x64.norm(dim=1, keepdim=True)
    (plain_grad,) = torch.autograd.grad(plain, x64, grad_out.double())
    torch.testing.assert_close(got.double(), plain, rtol=1e-6, atol=1e-6)
    scale = x64.detach().norm(dim=1, keepdim=True)
    torch.testing.assert_close(
        (got_grad.double() * scale), plain_grad * scale, rtol=1e-5, atol=1e-5
    )


def test_twice_differentiable():
    """The backward under ``create_graph=True`` is rebuilt from ``x``: exact second derivatives."""
    x = rows_of_any_magnitude(2, 3, 4, [0, 3, -3]).requires_grad_()

    def fn(rows):
        return unit_rows(rows, torch.float64)

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))
