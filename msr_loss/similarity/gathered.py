"""The negatives' log-sum-exp with the negatives gathered from every rank.

Each rank keeps its own 2n anchors as rows and uses the 2N = 2nW views of the global batch as
columns, in the layout of :mod:`msr_loss.similarity.geometry`; local image ``i`` of rank ``r`` is
global image ``r * n + i``. On CUDA (or with ``backend="triton"``) the fused kernel computes it
(:class:`msr_loss.similarity.triton.TritonNegativeLogSumExp`); otherwise the PyTorch path here,
whose backward has two terms: the rows' own gradient and the columns' (the transposed product),
which :func:`msr_loss.distributed.gather` routes back to the ranks that own them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from msr_loss.distributed import gather, rank, world_size
from msr_loss.similarity import BACKENDS, load_triton_kernels, negative_logsumexp, uses_triton
from msr_loss.similarity.geometry import NegativeGeometry, excluded_entries, to_global_layout
from msr_loss.similarity.precision import (
    GemmPrecision,
    autocast_enabled,
    gemm_context,
    gemm_operand,
    resolve_precision,
)
from msr_loss.types import Precision


def _masked_blocks(
    rows: torch.Tensor,
    columns: torch.Tensor,
    first_image: int,
    inv_temperature: float,
    negatives: str,
    chunk_size: int,
) -> Iterator[tuple[slice, slice, torch.Tensor]]:
    """Yields (rows, columns, logits with -inf on the excluded entries) for each block of rows."""
    geometry = NegativeGeometry(rows.shape[0] // 2, columns.shape[0] // 2, first_image, negatives)
    for block in geometry.row_blocks(chunk_size):
        bias = rows.new_zeros(block.rows.stop - block.rows.start, geometry.num_columns)
        excluded_entries(bias, block.first_image, geometry.global_images).fill_(float("-inf"))
        logits = (rows[block.rows] @ columns[block.columns].T) * inv_temperature + bias
        yield block.rows, block.columns, logits


class GatheredNegativeLogSumExp(torch.autograd.Function):
    """Row-chunked log-sum-exp of local anchors against the global columns.

    The backward recomputes each (chunk x 2N) block of similarities; it is written in
    differentiable operations, so the exact meta-gradient can differentiate through it.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        rows: torch.Tensor,
        columns: torch.Tensor,
        first_image: int,
        inv_temperature: float,
        negatives: str,
        chunk_size: int,
    ) -> torch.Tensor:
        config = (first_image, inv_temperature, negatives, chunk_size)
        pieces = [
            torch.logsumexp(logits, dim=1)
            for _, _, logits in _masked_blocks(rows, columns, *config)
        ]
        lse = torch.cat(pieces)
        ctx.save_for_backward(rows, columns, lse)
        ctx.config = config  # type: ignore[attr-defined]
        return lse

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_lse: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        rows, columns, lse = ctx.saved_tensors  # type: ignore[attr-defined]
        config = ctx.config  # type: ignore[attr-defined]
        inv_temperature = config[1]
        row_pieces = []
        grad_columns = torch.zeros_like(columns)
        for row_block, col_block, logits in _masked_blocks(rows, columns, *config):
            weights = torch.exp(logits - lse[row_block, None]) * grad_lse[row_block, None]
            row_pieces.append((weights @ columns[col_block]) * inv_temperature)
            column_grad = (weights.T @ rows[row_block]) * inv_temperature
            grad_columns = grad_columns.index_add(
                0, torch.arange(col_block.start, col_block.stop, device=columns.device), column_grad
            )
        return torch.cat(row_pieces), grad_columns, None, None, None, None


def torch_gathered_logsumexp(
    zhat: torch.Tensor,
    num_images: int,
    inv_temperature: float,
    negatives: str,
    precision: GemmPrecision = "fp32",
) -> torch.Tensor:
    """The PyTorch path of :func:`gathered_negative_logsumexp`; twice differentiable."""
    ranks = world_size()
    columns = to_global_layout(gather(zhat), ranks)
    chunk = max(1, min(num_images, (1 << 22) // columns.shape[0]))
    with gemm_context(zhat.device, precision):
        result: torch.Tensor = GatheredNegativeLogSumExp.apply(
            gemm_operand(zhat, precision),
            gemm_operand(columns, precision),
            rank() * num_images,
            inv_temperature,
            negatives,
            chunk,
        )
    return result


def gathered_negative_logsumexp(
    zhat: torch.Tensor,
    num_images: int,
    temperature: float,
    negatives: str,
    backend: str = "auto",
    precision: Precision = "auto",
) -> torch.Tensor:
    """:func:`msr_loss.similarity.negative_logsumexp` with the negatives of every rank.

    Without an initialised process group, or with one rank, this is ``negative_logsumexp``
    itself. Under distribution ``backend`` chooses as there: the fused kernel for CUDA tensors
    with ``"auto"`` (or any device it can run on with ``"triton"``), the PyTorch path otherwise,
    whose blocks of rows hold about 2**22 similarities each.

    Args:
        zhat: (2n, D) this rank's unit-norm projections, view 1 stacked over view 2.
        num_images: n, this rank's number of images (the same on every rank).
        temperature: The softmax temperature, > 0.
        negatives: ``"cross_view"`` or ``"all"``, over the global batch.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        precision: The GEMM operands' precision (see :mod:`msr_loss.similarity.precision`).

    Returns:
        A (2n,) tensor in the dtype of ``zhat``.

    Examples:
        >>> zhat = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> gathered_negative_logsumexp(zhat, 4, 0.2, "cross_view").shape
        torch.Size([8])
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if world_size() == 1:
        return negative_logsumexp(zhat, num_images, temperature, negatives, backend, precision)
    gemm = resolve_precision(precision, zhat.dtype, autocast_enabled(zhat))
    kernels = load_triton_kernels(zhat) if uses_triton(zhat, backend) else None
    if kernels is not None:
        result: torch.Tensor = kernels.triton_negative_logsumexp(
            zhat, num_images, 1.0 / temperature, negatives, precision=gemm, distributed=True
        )
        return result
    return torch_gathered_logsumexp(zhat, num_images, 1.0 / temperature, negatives, gemm)
