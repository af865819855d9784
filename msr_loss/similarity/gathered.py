"""The negatives' log-sum-exp with the negatives gathered from every rank (PyTorch path).

Each rank keeps its own 2n anchors as rows, ``[view 1 of its n images; view 2 of them]``, and
uses the 2N = 2nW views of the global batch as columns, in the single-process layout ``[view 1 of
images 0..N-1; view 2 of images 0..N-1]``; local image ``i`` of rank ``r`` is global image
``r * n + i``. The rows are a subset of the columns, so the backward has two terms: the rows' own
gradient and the columns' (the transposed product), which :func:`msr_loss.distributed.gather`
routes back to the ranks that own them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from msr_loss.distributed import gather, rank, world_size
from msr_loss.similarity import BACKENDS, negative_logsumexp
from msr_loss.similarity.precision import (
    autocast_enabled,
    gemm_context,
    gemm_operand,
    resolve_precision,
)
from msr_loss.types import Precision


def _chunk_mask(
    start: int,
    stop: int,
    num_images: int,
    first_image: int,
    global_images: int,
    negatives: str,
    device: torch.device,
) -> torch.Tensor:
    local_rows = torch.arange(start, stop, device=device)
    row_image = first_image + local_rows % num_images
    cols = torch.arange(2 * global_images, device=device)
    other_image = row_image[:, None] != (cols % global_images)[None, :]
    if negatives == "all":
        return other_image
    row_view = local_rows // num_images
    return other_image & (row_view[:, None] != (cols // global_images)[None, :])


def _masked_blocks(
    rows: torch.Tensor,
    columns: torch.Tensor,
    first_image: int,
    inv_temperature: float,
    negatives: str,
    chunk_size: int,
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Yields (start, stop, logits, negatives mask) for each chunk of rows against all columns."""
    num_images, global_images = rows.shape[0] // 2, columns.shape[0] // 2
    for start in range(0, rows.shape[0], chunk_size):
        stop = min(start + chunk_size, rows.shape[0])
        mask = _chunk_mask(
            start, stop, num_images, first_image, global_images, negatives, rows.device
        )
        yield start, stop, (rows[start:stop] @ columns.T) * inv_temperature, mask


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
            torch.logsumexp(logits.masked_fill(~mask, float("-inf")), dim=1)
            for _, _, logits, mask in _masked_blocks(rows, columns, *config)
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
        for start, stop, logits, mask in _masked_blocks(rows, columns, *config):
            softmax = torch.exp(logits - lse[start:stop, None]) * grad_lse[start:stop, None]
            weights = torch.where(mask, softmax, torch.zeros((), dtype=logits.dtype))
            row_pieces.append((weights @ columns) * inv_temperature)
            grad_columns = grad_columns + (weights.T @ rows[start:stop]) * inv_temperature
        return torch.cat(row_pieces), grad_columns, None, None, None, None


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
    itself. Under distribution only the PyTorch path exists: ``backend="auto"`` uses it and
    ``backend="triton"`` raises ValueError. Each chunk of rows holds about 2**22 similarities.

    Args:
        zhat: (2n, D) this rank's unit-norm projections, view 1 stacked over view 2.
        num_images: n, this rank's number of images (the same on every rank).
        temperature: The softmax temperature, > 0.
        negatives: ``"cross_view"`` or ``"all"``, over the global batch.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (single process only).
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
    ranks = world_size()
    if ranks == 1:
        return negative_logsumexp(zhat, num_images, temperature, negatives, backend, precision)
    if backend == "triton":
        raise ValueError(
            "backend='triton' does not support gather_distributed=True; "
            "use backend='auto' or 'torch'"
        )
    dim = zhat.shape[1]
    columns = gather(zhat).view(ranks, 2, num_images, dim).transpose(0, 1).reshape(-1, dim)
    chunk = max(1, min(zhat.shape[0], (1 << 22) // columns.shape[0]))
    gemm = resolve_precision(precision, zhat.dtype, autocast_enabled(zhat))
    with gemm_context(zhat.device, gemm):
        result: torch.Tensor = GatheredNegativeLogSumExp.apply(
            gemm_operand(zhat, gemm),
            gemm_operand(columns, gemm),
            rank() * num_images,
            1.0 / temperature,
            negatives,
            chunk,
        )
    return result
