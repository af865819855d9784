"""The negatives' log-sum-exp in plain PyTorch, one tile of similarities at a time.

Rows and columns index the M = 2N stacked views ``[view 1; view 2]``: index ``r`` is view ``r // N``
of image ``r % N``. A tile holds a block of rows of one view against at most ``COLUMN_TILE``
columns of one view's copy of the columns, so its excluded entries (the anchor and its positive,
``column % N == row % N``) lie on one diagonal that is filled in place, with no mask, and its
buffers stay in a core's L2 cache through the elementwise passes. With
``negatives="cross_view"`` a row sees the other view only: half the work of ``"all"``.

The similarities and the negative set are symmetric (``k`` is a negative of ``i`` exactly when
``i`` is one of ``k``), so each tile of :meth:`NegativeGeometry.symmetric_tiles` but the squares on
the diagonal also stands for its transpose: its row sums feed its rows' log-sum-exps and its
column sums its columns'. That halves the similarity GEMMs and the exps. The gradient is
``dZ_i = (1/tau) sum_k C_ik Z_k`` with ``C_ik = g_i exp(s_ik - L_i) + g_k exp(s_ik - L_k)``,
symmetric too: a tile's ``C`` adds ``C Z_columns`` to its rows and ``C^T Z_rows`` to its columns.
When every logit is within ``BOUNDED_LOGITS`` (:func:`logits_are_bounded`) the forward needs no
max-shift and the backward one exp per entry, ``C_ik = exp(s_ik) (f_i + f_k)``; otherwise each exp
is shifted by its own log-sum-exp, which is safe at any temperature. ``1/tau`` scales inside each
GEMM; peak extra memory is two tiles, and nothing of size M x M is ever formed. The
twice-differentiable backward (under ``create_graph=True``) goes row block by row block
(:meth:`NegativeGeometry.tiles`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from msr_loss.similarity.geometry import NegativeGeometry, PairTile, RowBlock, Tile
from msr_loss.similarity.precision import GemmPrecision, gemm_context, gemm_operand

ROW_TILE = 256
COLUMN_TILE = 512
BOUNDED_LOGITS = 40.0


def check_stacked(zhat: torch.Tensor, num_images: int) -> None:
    """Raises a ValueError unless ``zhat`` is a (2N, D) stack of two views with N >= 2."""
    if num_images < 2 or zhat.dim() != 2 or zhat.shape[0] != 2 * num_images:
        raise ValueError(
            f"zhat must have shape (2N, D) with N = num_images >= 2; got shape "
            f"{tuple(zhat.shape)} and num_images {num_images}"
        )


def default_chunk_size(num_images: int) -> int:
    """Rows per tile: ``ROW_TILE``, or N if it is smaller."""
    return min(num_images, ROW_TILE)


def _tiles(
    num_images: int, negatives: str, chunk_size: int
) -> Iterator[tuple[RowBlock, list[Tile]]]:
    """Yields every block of rows with its tiles, in row order."""
    geometry = NegativeGeometry.single_process(num_images, negatives)
    for block in geometry.row_blocks(chunk_size):
        yield block, list(geometry.tiles(block, COLUMN_TILE))


def _pair_tiles(num_images: int, negatives: str, chunk_size: int) -> Iterator[PairTile]:
    """The tiles of :meth:`NegativeGeometry.symmetric_tiles`, in a fixed order."""
    geometry = NegativeGeometry.single_process(num_images, negatives)
    return geometry.symmetric_tiles(chunk_size, COLUMN_TILE)


def _buffer(zhat: torch.Tensor, num_images: int, chunk_size: int) -> torch.Tensor:
    """Room for the largest tile: ``chunk_size`` rows of the square or of the widest tile."""
    return zhat.new_empty(chunk_size * max(min(COLUMN_TILE, num_images), chunk_size))


def _shaped(buffer: torch.Tensor, rows: slice, tile: Tile) -> torch.Tensor:
    """The contiguous front of ``buffer`` as a (rows x tile columns) matrix."""
    shape = (rows.stop - rows.start, tile.columns.stop - tile.columns.start)
    return buffer[: shape[0] * shape[1]].view(shape)


def _logits_into(
    buffer: torch.Tensor, zhat: torch.Tensor, inv_temperature: float, rows: slice, tile: Tile
) -> torch.Tensor:
    out = _shaped(buffer, rows, tile)
    torch.addmm(out, zhat[rows], zhat[tile.columns].T, beta=0, alpha=inv_temperature, out=out)
    return tile.fill_excluded(out, float("-inf"))


def logits_are_bounded(zhat: torch.Tensor, inv_temperature: float) -> bool:
    """Whether every logit lies in ``[-BOUNDED_LOGITS, BOUNDED_LOGITS]``, so ``exp`` needs no shift.

    Always False while ``torch.compile`` traces (the bound is a data-dependent branch).
    """
    if torch.compiler.is_compiling():
        return False
    largest = float(torch.linalg.vector_norm(zhat.detach(), dim=1).amax()) ** 2
    return inv_temperature * largest <= BOUNDED_LOGITS


def _forward(
    zhat: torch.Tensor,
    num_images: int,
    inv_temperature: float,
    negatives: str,
    chunk_size: int,
    bounded: bool,
) -> torch.Tensor:
    """Each row's log-sum-exp, from its rows of each tile and, if mirrored, its columns."""
    total = zhat.new_zeros(zhat.shape[0]) if bounded else zhat.new_full(zhat.shape[:1], -math.inf)
    buffer = _buffer(zhat, num_images, chunk_size)
    for pair in _pair_tiles(num_images, negatives, chunk_size):
        logits = _logits_into(buffer, zhat, inv_temperature, pair.rows, pair.tile)
        directions = ((pair.rows, 1), (pair.tile.columns, 0))[: 1 + pair.mirrored]
        if bounded:
            exps = logits.exp_()
            for rows, dim in directions:
                total[rows].add_(exps.sum(dim=dim))
        else:
            for rows, dim in directions:
                torch.logaddexp(total[rows], torch.logsumexp(logits, dim=dim), out=total[rows])
    return total.log_() if bounded else total


TileWeights = Callable[[torch.Tensor, torch.Tensor, slice, slice], torch.Tensor]
"""``(logits, buffer, rows, columns) -> C``: a tile's gradient weights, written into ``buffer``."""


def _tile_gradient(
    zhat: torch.Tensor,
    num_images: int,
    inv_temperature: float,
    negatives: str,
    chunk_size: int,
    weigh: TileWeights,
) -> torch.Tensor:
    """``sum_k C_ik Z_k`` for every row, tile by tile, with each tile's ``C`` from ``weigh``.

    ``C`` is symmetric, so a mirrored tile adds ``C Z_columns`` to its rows and ``C^T Z_rows`` to
    its columns. The tiles come in a fixed order: the sums are bitwise repeatable.
    """
    dz = torch.zeros_like(zhat)
    logits = _buffer(zhat, num_images, chunk_size)
    weights = torch.empty_like(logits)
    for pair in _pair_tiles(num_images, negatives, chunk_size):
        rows, columns = pair.rows, pair.tile.columns
        tile_logits = _logits_into(logits, zhat, inv_temperature, rows, pair.tile)
        tile_weights = weigh(tile_logits, _shaped(weights, rows, pair.tile), rows, columns)
        dz[rows].addmm_(tile_weights, zhat[columns])
        if pair.mirrored:
            dz[columns].addmm_(tile_weights.T, zhat[rows])
    return dz


def _bounded_gradient(
    zhat: torch.Tensor,
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

    def weigh(logits: torch.Tensor, pair: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
        exps = logits.exp_()
        return torch.add(factor[rows, None], factor[None, cols], out=pair).mul_(exps)

    dz = _tile_gradient(zhat, num_images, inv_temperature, negatives, chunk_size, weigh)
    return dz.mul_(peak * inv_temperature)


def _shifted_gradient(
    zhat: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    num_images: int,
    inv_temperature: float,
    negatives: str,
    chunk_size: int,
) -> torch.Tensor:
    """Two exps per entry, each shifted by its own log-sum-exp: safe at any temperature."""
    scaled_grad = grad_lse * inv_temperature

    def weigh(logits: torch.Tensor, buffer: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
        as_row = torch.sub(logits, lse[rows, None], out=buffer).exp_().mul_(scaled_grad[rows, None])
        as_column = logits.sub_(lse[None, cols]).exp_().mul_(scaled_grad[None, cols])
        return as_row.add_(as_column)

    return _tile_gradient(zhat, num_images, inv_temperature, negatives, chunk_size, weigh)


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
    for block, tiles in _tiles(num_images, negatives, chunk_size):
        rows = block.rows
        piece = zhat.new_zeros(rows.stop - rows.start, zhat.shape[1])
        for tile in tiles:
            bias = zhat.new_zeros(rows.stop - rows.start, tile.columns.stop - tile.columns.start)
            tile.fill_excluded(bias, float("-inf"))
            logits = torch.mm(zhat[rows] * inv_temperature, zhat[tile.columns].T) + bias
            weights = (
                torch.exp(logits - lse[rows, None]) * scaled_grad[rows, None]
                + torch.exp(logits - lse[None, tile.columns]) * scaled_grad[None, tile.columns]
            )
            piece = piece + weights @ zhat[tile.columns]
        pieces.append(piece)
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
    """``d (grad_lse . lse) / d zhat`` from the saved log-sum-exps, one tile at a time.

    While autograd records (``torch.is_grad_enabled()``, as inside a backward with
    ``create_graph=True``) it uses differentiable operations, so a second derivative flows through
    ``zhat``, ``lse`` and ``grad_lse``; otherwise in-place operations in two reused tile buffers,
    with one exp per entry where the logits are bounded (:func:`logits_are_bounded`) and two
    elsewhere.
    """
    config = (num_images, inv_temperature, negatives, chunk_size)
    if torch.is_grad_enabled():
        return _differentiable_gradient(zhat, lse, grad_lse, *config)
    compute = _bounded_gradient if logits_are_bounded(zhat, inv_temperature) else _shifted_gradient
    return compute(zhat, lse, grad_lse, *config)


class ChunkedNegativeLogSumExp(torch.autograd.Function):
    """Blockwise log-sum-exp over negatives; the forward keeps only the log-sum-exps.

    The backward recomputes each tile of similarities; it is twice differentiable. ``precision``
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
        with gemm_context(zhat.device, precision):
            lse = _forward(zhat, num_images, inv_temperature, negatives, chunk_size, bounded)
        ctx.save_for_backward(zhat, lse)
        ctx.config = (num_images, inv_temperature, negatives, chunk_size)  # type: ignore[attr-defined]
        ctx.bounded = bounded  # type: ignore[attr-defined]
        ctx.precision = precision  # type: ignore[attr-defined]
        return lse

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_lse: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        zhat, lse = ctx.saved_tensors  # type: ignore[attr-defined]
        config = ctx.config  # type: ignore[attr-defined]
        with gemm_context(zhat.device, ctx.precision):  # type: ignore[attr-defined]
            if torch.is_grad_enabled():
                grad = _differentiable_gradient(zhat, lse, grad_lse, *config)
            else:
                compute = _bounded_gradient if ctx.bounded else _shifted_gradient  # type: ignore[attr-defined]
                grad = compute(zhat, lse, grad_lse, *config)
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
        chunk_size: Rows per tile (at most N); ``ROW_TILE`` by default.
        precision: ``"fp32"``, ``"tf32"`` (TF32 on CUDA, float32 elsewhere) or ``"bf16"``.

    Returns:
        A (2N,) tensor in the dtype of ``zhat``.

    Examples:
        >>> zhat = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> chunked_negative_logsumexp(zhat, 4, 5.0, "all").shape
        torch.Size([8])
    """
    check_stacked(zhat, num_images)
    chunk = default_chunk_size(num_images) if chunk_size is None else chunk_size
    if chunk < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk}")
    work = zhat if zhat.dtype in (torch.float32, torch.float64) else zhat.float()
    operand = gemm_operand(work.contiguous(), precision)
    lse: torch.Tensor = ChunkedNegativeLogSumExp.apply(
        operand, num_images, inv_temperature, negatives, min(chunk, num_images), precision
    )
    return lse.to(zhat.dtype)
