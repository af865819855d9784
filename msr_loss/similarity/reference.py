"""The negatives' log-sum-exp in plain PyTorch: a dense version and a row-chunked one.

Rows and columns index the M = 2N stacked views ``[view 1; view 2]``: index ``r`` is view ``r // N``
of image ``r % N``. The negative set of an anchor is symmetric (``k`` is a negative of ``i`` exactly
when ``i`` is one of ``k``), which lets the chunked backward compute each row block of the gradient
on its own, with no atomics and no M x M buffer.
"""

from __future__ import annotations

import torch


def negative_mask(
    rows: torch.Tensor, num_rows: int, batch_size: int, negatives: str
) -> torch.Tensor:
    """Boolean (len(rows), num_rows) mask of the negatives of each row in ``rows``."""
    cols = torch.arange(num_rows, device=rows.device)
    other_image = (rows[:, None] % batch_size) != (cols[None, :] % batch_size)
    if negatives == "all":
        return other_image
    other_view = (rows[:, None] // batch_size) != (cols[None, :] // batch_size)
    return other_image & other_view


def default_chunk_size(num_rows: int) -> int:
    """Rows per chunk so that one chunk's similarity block holds about 2**22 entries."""
    return max(1, min(num_rows, (1 << 22) // max(num_rows, 1)))


def dense_negative_logsumexp(
    zhat: torch.Tensor, batch_size: int, inv_temperature: float, negatives: str
) -> torch.Tensor:
    """Materialises the full similarity matrix; differentiable by autograd (the reference)."""
    num_rows = zhat.shape[0]
    logits = (zhat @ zhat.T) * inv_temperature
    rows = torch.arange(num_rows, device=zhat.device)
    mask = negative_mask(rows, num_rows, batch_size, negatives)
    return torch.logsumexp(logits.masked_fill(~mask, float("-inf")), dim=1)


def _chunk_logits(
    zhat: torch.Tensor,
    start: int,
    stop: int,
    batch_size: int,
    inv_temperature: float,
    negatives: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(start, stop, device=zhat.device)
    mask = negative_mask(rows, zhat.shape[0], batch_size, negatives)
    logits = (zhat[start:stop] @ zhat.T) * inv_temperature
    return logits, mask


class ChunkedNegativeLogSumExp(torch.autograd.Function):
    """Row-chunked log-sum-exp over negatives whose backward recomputes the similarity blocks.

    Peak extra memory is O(chunk x M). The backward is written in differentiable operations, so
    a second derivative (the exact meta-gradient) flows through it.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        zhat: torch.Tensor,
        batch_size: int,
        inv_temperature: float,
        negatives: str,
        chunk_size: int,
    ) -> torch.Tensor:
        pieces = []
        for start in range(0, zhat.shape[0], chunk_size):
            stop = min(start + chunk_size, zhat.shape[0])
            logits, mask = _chunk_logits(zhat, start, stop, batch_size, inv_temperature, negatives)
            pieces.append(torch.logsumexp(logits.masked_fill_(~mask, float("-inf")), dim=1))
        lse = torch.cat(pieces)
        ctx.save_for_backward(zhat, lse)
        ctx.config = (batch_size, inv_temperature, negatives, chunk_size)  # type: ignore[attr-defined]
        return lse

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_lse: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        zhat, lse = ctx.saved_tensors  # type: ignore[attr-defined]
        batch_size, inv_temperature, negatives, chunk_size = ctx.config  # type: ignore[attr-defined]
        pieces = []
        for start in range(0, zhat.shape[0], chunk_size):
            stop = min(start + chunk_size, zhat.shape[0])
            logits, mask = _chunk_logits(zhat, start, stop, batch_size, inv_temperature, negatives)
            as_row = torch.exp(logits - lse[start:stop, None]) * grad_lse[start:stop, None]
            as_col = torch.exp(logits - lse[None, :]) * grad_lse[None, :]
            weights = torch.where(mask, as_row + as_col, torch.zeros((), dtype=logits.dtype))
            pieces.append((weights @ zhat) * inv_temperature)
        return torch.cat(pieces), None, None, None, None


def chunked_negative_logsumexp(
    zhat: torch.Tensor,
    batch_size: int,
    inv_temperature: float,
    negatives: str,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Log-sum-exp over each row's negatives with O(chunk x M) extra memory."""
    chunk = chunk_size if chunk_size is not None else default_chunk_size(zhat.shape[0])
    result: torch.Tensor = ChunkedNegativeLogSumExp.apply(
        zhat, batch_size, inv_temperature, negatives, chunk
    )
    return result
