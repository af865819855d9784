"""Rows as unit vectors, safe for any finite magnitude, with a fused backward.

Every loss normalises its projections first; autograd's composition of ``x / max|x|`` and
``F.normalize`` spends about eight (M x D) passes on the backward, this module's
:class:`UnitRows` two: ``dx = (g - u (u . g)) / (max|x| ||x / max|x|||)``.
"""

from __future__ import annotations

import torch


def scale_rows(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``x`` divided by its largest absolute entry along ``dim`` (detached); zeros stay zeros.

    Every loss here is invariant to that scale, and after it no square overflows or underflows:
    finite rows of any magnitude normalise correctly.

    Examples:
        >>> scale_rows(torch.tensor([[2.0, -4.0], [0.0, 0.0]]))
        tensor([[ 0.5000, -1.0000],
                [ 0.0000,  0.0000]])
    """
    largest = x.detach().abs().amax(dim=dim, keepdim=True)
    return x / torch.where(largest > 0, largest, torch.ones_like(largest))


def _unit_and_scale(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unit rows of ``x`` and each row's divisor, by differentiable operations.

    A non-zero row scaled by its largest entry has norm >= 1, so clamping the norm at 0.5 only
    meets zero rows: they stay zero and their gradient is twice the incoming one.
    """
    largest = x.detach().abs().amax(dim=-1, keepdim=True)
    largest = torch.where(largest > 0, largest, torch.ones_like(largest))
    scaled = x / largest
    norm = torch.linalg.vector_norm(scaled, dim=-1, keepdim=True).clamp_min(0.5)
    return scaled / norm, largest * norm


def _unit_rows_gradient(
    grad: torch.Tensor, unit: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    along = (unit * grad).sum(dim=-1, keepdim=True)
    return torch.addcmul(grad, unit, along, value=-1.0) / scale


class UnitRows(torch.autograd.Function):
    """``x / ||x||`` along the last dimension (zero rows stay zero); twice differentiable.

    The backward from the saved unit rows costs two passes; under ``create_graph=True`` it is
    rebuilt from ``x`` by differentiable operations, so second derivatives are exact.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        unit, scale = _unit_and_scale(x)
        ctx.save_for_backward(x, unit, scale)
        return unit

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        x, unit, scale = ctx.saved_tensors  # type: ignore[attr-defined]
        if torch.is_grad_enabled():
            unit, scale = _unit_and_scale(x)
        return _unit_rows_gradient(grad, unit, scale)


def unit_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The rows of ``x`` (last dimension) as unit vectors in ``dtype``; zero rows stay zero.

    Examples:
        >>> unit_rows(torch.tensor([[3e30, 4e30], [0.0, 0.0]]), torch.float32)
        tensor([[0.6000, 0.8000],
                [0.0000, 0.0000]])
    """
    unit: torch.Tensor = UnitRows.apply(x.to(dtype))
    return unit
