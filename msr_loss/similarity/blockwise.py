"""The negatives' log-sum-exp in plain PyTorch, one block of rows at a time.

Rows and columns index the M = 2N stacked views ``[view 1; view 2]``: index ``r`` is view ``r // N``
of image ``r % N``. A block holds rows of one view only, so its excluded entries (the anchor and its
positive, ``column % N == row % N``) lie on diagonals that are filled in place, with no mask. With
``negatives="cross_view"`` a block is multiplied by the other view only: half the work of ``"all"``.

The negative set is symmetric (``k`` is a negative of ``i`` exactly when ``i`` is one of ``k``), so
``d lse / d Z`` for a block of rows needs only that block's similarities:
``dZ_i = (1/tau) sum_k C_ik Z_k`` with ``C_ik = g_i exp(s_ik - L_i) + g_k exp(s_ik - L_k)``.
When every logit is within ``BOUNDED_LOGITS`` (:func:`logits_are_bounded`) the forward needs no
max-shift and the backward one exp per entry, ``C_ik = exp(s_ik) (f_i + f_k)``; otherwise each exp
is shifted by its own log-sum-exp, which is safe at any temperature. Peak extra memory is a few
(chunk x M) blocks; nothing of size M x M is ever formed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from msr_loss.similarity.geometry import NegativeGeometry, excluded_entries
from msr_loss.similarity.precision import GemmPrecision, gemm_context, gemm_operand

BLOCK_ENTRIES = 1 << 20
BOUNDED_LOGITS = 40.0


def check_stacked(zhat: torch.Tensor, num_images: int) -> None:
    """Raises a ValueError unless ``zhat`` is a (2N, D) stack of two views with N >= 2."""
    if num_images < 2 or zhat.dim() != 2 or zhat.shape[0] != 2 * num_images:
        raise ValueError(
            f"zhat must have shape (2N, D) with N = num_images >= 2; got shape "
            f"{tuple(zhat.shape)} and num_images {num_images}"
        )


def default_chunk_size(num_images: int, negatives: str) -> int:
    """Rows per block so that a block of similarities holds about ``BLOCK_ENTRIES`` entries."""
    num_cols = NegativeGeometry.single_process(num_images, negatives).num_columns
    return max(1, min(num_images, BLOCK_ENTRIES // num_cols))


def _blocks(num_images: int, negatives: str, chunk_size: int) -> Iterator[tuple[slice, slice, int]]:
    """Yields (rows, columns, first image of the rows) for every block, in row order."""
    for block in NegativeGeometry.single_process(num_images, negatives).row_blocks(chunk_size):
        yield block.rows, block.columns, block.first_image


def _logits_into(
    buffer: torch.Tensor,
    scaled: torch.Tensor,
    zhat: torch.Tensor,
    rows: slice,
    cols: slice,
    first: int,
    num_images: int,
) -> torch.Tensor:
    block = torch.mm(scaled[rows], zhat[cols].T, out=buffer[: rows.stop - rows.start])
    excluded_entries(block, first, num_images).fill_(float("-inf"))
    return block


def _buffer(zhat: torch.Tensor, num_images: int, negatives: str, chunk_size: int) -> torch.Tensor:
    num_cols = NegativeGeometry.single_process(num_images, negatives).num_columns
    return zhat.new_empty(chunk_size, num_cols)


def logits_are_bounded(zhat: torch.Tensor, inv_temperature: float) -> bool:
    """Whether every logit lies in ``[-BOUNDED_LOGITS, BOUNDED_LOGITS]``, so ``exp`` needs no shift.

    Always False while ``torch.compile`` traces (the bound is a data-dependent branch).
    """
    if torch.compiler.is_compiling():
        return False
    largest = float(zhat.detach().square().sum(dim=1).amax())
    return inv_temperature * largest <= BOUNDED_LOGITS


def _forward(
    zhat: torch.Tensor,
    scaled: torch.Tensor,
    num_images: int,
    negatives: str,
    chunk_size: int,
    bounded: bool,
) -> torch.Tensor:
    lse = zhat.new_empty(zhat.shape[0])
    buffer = _buffer(zhat, num_images, negatives, chunk_size)
    for rows, cols, first in _blocks(num_images, negatives, chunk_size):
        block = _logits_into(buffer, scaled, zhat, rows, cols, first, num_images)
        if bounded:
            torch.sum(block.exp_(), dim=1, out=lse[rows]).log_()
            continue
        shift = block.amax(dim=1, keepdim=True)
        lse[rows] = block.sub_(shift).exp_().sum(dim=1).log_().add_(shift.squeeze(1))
    return lse


def _bounded_gradient(
    zhat: torch.Tensor,
    scaled: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    num_images: int,
    inv_temperature: float,
    negatives: str,
    chunk_size: int,
) -> torch.Tensor:
    """One exp per entry: ``C_ik = exp(s_ik) (f_i + f_k)`` with ``f = g exp(-L) / max|g|``.

    Safe when every logit is within ``BOUNDED_LOGITS``: then ``exp(s)`` and ``exp(-L)`` stay far
    from float32's overflow and underflow, and ``g / max|g|`` keeps tiny gradients normal.
    """
    peak = grad_lse.abs().amax().clamp_min(torch.finfo(grad_lse.dtype).tiny)
    factor = torch.exp(-lse).mul_(grad_lse / peak)
    dz = torch.empty_like(zhat)
    logits = _buffer(zhat, num_images, negatives, chunk_size)
    weights = torch.empty_like(logits)
    for rows, cols, first in _blocks(num_images, negatives, chunk_size):
        block = _logits_into(logits, scaled, zhat, rows, cols, first, num_images).exp_()
        pair = torch.add(factor[rows, None], factor[None, cols], out=weights[: block.shape[0]])
        torch.mm(pair.mul_(block), zhat[cols], out=dz[rows])
    return dz.mul_(peak * inv_temperature)


def _shifted_gradient(
    zhat: torch.Tensor,
    scaled: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    num_images: int,
    inv_temperature: float,
    negatives: str,
    chunk_size: int,
) -> torch.Tensor:
    """Two exps per entry, each shifted by its own log-sum-exp: safe at any temperature."""
    scaled_grad = grad_lse * inv_temperature
    dz = torch.empty_like(zhat)
    logits = _buffer(zhat, num_images, negatives, chunk_size)
    weights = torch.empty_like(logits)
    for rows, cols, first in _blocks(num_images, negatives, chunk_size):
        block = _logits_into(logits, scaled, zhat, rows, cols, first, num_images)
        as_row = torch.sub(block, lse[rows, None], out=weights[: block.shape[0]])
        as_row.exp_().mul_(scaled_grad[rows, None])
        as_row.add_(block.sub_(lse[None, cols]).exp_().mul_(scaled_grad[None, cols]))
        torch.mm(as_row, zhat[cols], out=dz[rows])
    return dz


def _differentiable_gradient(
    zhat: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    num_images: int,
    inv_temperature: float,
    negatives: str,
    chunk_size: int,
) -> torch.Tensor:
    scaled_grad = grad_lse * inv_temperature
    pieces = []
    for rows, cols, first in _blocks(num_images, negatives, chunk_size):
        bias = zhat.new_zeros(rows.stop - rows.start, cols.stop - cols.start)
        excluded_entries(bias, first, num_images).fill_(float("-inf"))
        block = torch.mm(zhat[rows] * inv_temperature, zhat[cols].T) + bias
        weights = (
            torch.exp(block - lse[rows, None]) * scaled_grad[rows, None]
            + torch.exp(block - lse[None, cols]) * scaled_grad[None, cols]
        )
        pieces.append(weights @ zhat[cols])
    return torch.cat(pieces)


def lse_gradient(
    zhat: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    num_images: int,
    inv_temperature: float,
    negatives: str,
    chunk_size: int,
) -> torch.Tensor:
    """``d (grad_lse . lse) / d zhat`` from the saved log-sum-exps, one block of rows at a time.

    While autograd records (``torch.is_grad_enabled()``, as inside a backward with
    ``create_graph=True``) it uses differentiable operations, so a second derivative flows through
    ``zhat``, ``lse`` and ``grad_lse``; otherwise in-place operations that reuse each block, with
    one exp per entry where the logits are bounded (:func:`logits_are_bounded`) and two elsewhere.
    """
    config = (num_images, inv_temperature, negatives, chunk_size)
    if torch.is_grad_enabled():
        return _differentiable_gradient(zhat, lse, grad_lse, *config)
    scaled = zhat * inv_temperature
    compute = _bounded_gradient if logits_are_bounded(zhat, inv_temperature) else _shifted_gradient
    return compute(zhat, scaled, lse, grad_lse, *config)


class ChunkedNegativeLogSumExp(torch.autograd.Function):
    """Blockwise log-sum-exp over negatives; the forward keeps only the log-sum-exps.

    The backward recomputes each block of similarities; it is twice differentiable. ``precision``
    is ``"fp32"``, ``"tf32"`` or ``"bf16"`` (the operands arrive already rounded for ``"bf16"``;
    ``"tf32"`` switches CUDA's float32 GEMMs to TF32 in the forward and the backward).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        zhat: torch.Tensor,
        num_images: int,
        inv_temperature: float,
        negatives: str,
        chunk_size: int,
        precision: GemmPrecision,
    ) -> torch.Tensor:
        bounded = logits_are_bounded(zhat, inv_temperature)
        scaled = zhat * inv_temperature
        with gemm_context(zhat.device, precision):
            lse = _forward(zhat, scaled, num_images, negatives, chunk_size, bounded)
        ctx.save_for_backward(zhat, lse, scaled)
        ctx.config = (num_images, inv_temperature, negatives, chunk_size)  # type: ignore[attr-defined]
        ctx.bounded = bounded  # type: ignore[attr-defined]
        ctx.precision = precision  # type: ignore[attr-defined]
        return lse

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_lse: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        zhat, lse, scaled = ctx.saved_tensors  # type: ignore[attr-defined]
        config = ctx.config  # type: ignore[attr-defined]
        with gemm_context(zhat.device, ctx.precision):  # type: ignore[attr-defined]
            if torch.is_grad_enabled():
                grad = _differentiable_gradient(zhat, lse, grad_lse, *config)
            else:
                compute = _bounded_gradient if ctx.bounded else _shifted_gradient  # type: ignore[attr-defined]
                grad = compute(zhat, scaled, lse, grad_lse, *config)
        return grad, None, None, None, None, None


def chunked_negative_logsumexp(
    zhat: torch.Tensor,
    num_images: int,
    inv_temperature: float,
    negatives: str,
    chunk_size: int | None = None,
    precision: GemmPrecision = "fp32",
) -> torch.Tensor:
    """Log-sum-exp of ``inv_temperature * zhat_r . zhat_k`` over the negatives ``k`` of each row.

    Half-precision inputs are computed in float32 and the result cast back; the GEMMs take their
    operands in ``precision`` (:mod:`msr_loss.similarity.precision`).

    Args:
        zhat: (2N, D) projections, view 1 stacked over view 2.
        num_images: N, the number of images.
        inv_temperature: 1 / tau.
        negatives: ``"cross_view"`` (the other view of the other images) or ``"all"``.
        chunk_size: Rows per block (at most N); by default about ``BLOCK_ENTRIES`` similarities
            per block.
        precision: ``"fp32"``, ``"tf32"`` (TF32 on CUDA, float32 elsewhere) or ``"bf16"``.

    Returns:
        A (2N,) tensor in the dtype of ``zhat``.

    Examples:
        >>> zhat = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> chunked_negative_logsumexp(zhat, 4, 5.0, "all").shape
        torch.Size([8])
    """
    check_stacked(zhat, num_images)
    chunk = default_chunk_size(num_images, negatives) if chunk_size is None else chunk_size
    if chunk < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk}")
    work = zhat if zhat.dtype in (torch.float32, torch.float64) else zhat.float()
    operand = gemm_operand(work.contiguous(), precision)
    lse: torch.Tensor = ChunkedNegativeLogSumExp.apply(
        operand, num_images, inv_temperature, negatives, min(chunk, num_images), precision
    )
    return lse.to(zhat.dtype)
