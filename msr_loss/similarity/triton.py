"""The fused Triton kernels: negatives' log-sum-exp streamed tile by tile, and its backward.

Rows are processed one view at a time: row ``p`` of view ``v`` is image ``p``. Its columns are the
other view (``negatives="cross_view"``, N of them) or both views (``"all"``, 2N), and column ``c``
is excluded when ``c % N == p`` (the anchor itself and its positive). The forward keeps an online
maximum and sum per row and writes only the log-sum-exp; nothing of size N x N is ever stored.

The backward uses the symmetry of the negative set: with ``L`` the log-sum-exps and ``g`` their
incoming gradient, ``dZ_i = (1/tau) sum_k C_ik Z_k`` with ``C_ik = g_i exp(s_ik - L_i) + g_k
exp(s_ik - L_k)`` on negatives. Each program owns a block of rows, recomputes its similarity tiles
and accumulates its own rows of ``dZ``: no atomics, so the result is bitwise deterministic.

Set ``TRITON_INTERPRET=1`` before ``triton`` is first imported in the process to run the kernels on
CPU tensors (the Triton interpreter; slow, meant for tests).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from msr_loss.similarity.blockwise import (
    check_stacked,
    chunked_negative_logsumexp,
    default_chunk_size,
    lse_gradient,
)


@dataclass(frozen=True)
class Blocks:
    """Tile sizes: rows per program, columns per step, and the chunk of D per ``tl.dot``."""

    rows: int = 64
    cols: int = 64
    dim: int = 128


@triton.jit
def _similarity_tile(  # type: ignore[no-untyped-def]
    z_ptr,
    row_index,
    row_valid,
    col_index,
    col_valid,
    dim,
    d_offsets,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d_start in range(0, dim, BLOCK_D):
        d = d_start + d_offsets
        d_valid = d < dim
        q = tl.load(
            z_ptr + row_index[:, None] * dim + d[None, :],
            mask=row_valid[:, None] & d_valid[None, :],
            other=0.0,
        )
        k = tl.load(
            z_ptr + col_index[:, None] * dim + d[None, :],
            mask=col_valid[:, None] & d_valid[None, :],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
            k = k.to(tl.float32)
        acc = tl.dot(q, tl.trans(k), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _negative_lse_forward_kernel(  # type: ignore[no-untyped-def]
    z_ptr,
    lse_ptr,
    num_images,
    dim,
    inv_temperature,
    CROSS_VIEW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    view = tl.program_id(1)
    image = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = image < num_images
    row_index = (view * num_images + image).to(tl.int64)
    if CROSS_VIEW:
        col_base = (1 - view) * num_images
        num_cols = num_images
    else:
        col_base = 0
        num_cols = 2 * num_images
    d_offsets = tl.arange(0, BLOCK_D)
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for col_start in range(0, num_cols, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        col_valid = cols < num_cols
        col_index = (col_base + cols).to(tl.int64)
        logits = _similarity_tile(
            z_ptr,
            row_index,
            row_valid,
            col_index,
            col_valid,
            dim,
            d_offsets,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
            UPCAST,
            PRECISION,
        )
        negative = col_valid[None, :] & ((cols % num_images)[None, :] != image[:, None])
        logits = tl.where(negative, logits * inv_temperature, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(
            tl.exp(logits - shift[:, None]), axis=1
        )
        running_max = new_max
    tl.store(lse_ptr + row_index, running_max + tl.log(running_sum), mask=row_valid)


@triton.jit
def _negative_lse_backward_kernel(  # type: ignore[no-untyped-def]
    z_ptr,
    lse_ptr,
    grad_ptr,
    dz_ptr,
    num_images,
    dim,
    inv_temperature,
    CROSS_VIEW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    view = tl.program_id(1)
    image = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = image < num_images
    row_index = (view * num_images + image).to(tl.int64)
    if CROSS_VIEW:
        col_base = (1 - view) * num_images
        num_cols = num_images
    else:
        col_base = 0
        num_cols = 2 * num_images
    d_offsets = tl.arange(0, BLOCK_D)
    row_lse = tl.load(lse_ptr + row_index, mask=row_valid, other=0.0)
    row_grad = tl.load(grad_ptr + row_index, mask=row_valid, other=0.0) * inv_temperature
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for col_start in range(0, num_cols, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        col_valid = cols < num_cols
        col_index = (col_base + cols).to(tl.int64)
        logits = _similarity_tile(
            z_ptr,
            row_index,
            row_valid,
            col_index,
            col_valid,
            dim,
            d_offsets,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
            UPCAST,
            PRECISION,
        )
        logits = logits * inv_temperature
        col_lse = tl.load(lse_ptr + col_index, mask=col_valid, other=0.0)
        col_grad = tl.load(grad_ptr + col_index, mask=col_valid, other=0.0) * inv_temperature
        negative = col_valid[None, :] & ((cols % num_images)[None, :] != image[:, None])
        weights = row_grad[:, None] * tl.exp(logits - row_lse[:, None]) + col_grad[
            None, :
        ] * tl.exp(logits - col_lse[None, :])
        weights = tl.where(negative, weights, 0.0)
        for d_start in range(0, dim, BLOCK_D):
            d = d_start + d_offsets
            d_valid = d < dim
            k = tl.load(
                z_ptr + col_index[:, None] * dim + d[None, :],
                mask=col_valid[:, None] & d_valid[None, :],
                other=0.0,
            )
            if UPCAST:
                k = k.to(tl.float32)
            w = weights.to(k.dtype)
            out = dz_ptr + row_index[:, None] * dim + d[None, :]
            out_mask = row_valid[:, None] & d_valid[None, :]
            if SINGLE_D:
                acc = tl.dot(w, k, acc, input_precision=PRECISION)
            else:
                partial = tl.load(out, mask=out_mask, other=0.0)
                partial = tl.dot(w, k, partial, input_precision=PRECISION)
                tl.store(out, partial, mask=out_mask)
                tl.debug_barrier()
    if SINGLE_D:
        tl.store(
            dz_ptr + row_index[:, None] * dim + d_offsets[None, :],
            acc,
            mask=row_valid[:, None] & (d_offsets < dim)[None, :],
        )


INTERPRETER = isinstance(_negative_lse_forward_kernel, InterpretedFunction) and not any(
    isinstance(getattr(tl, name), JITFunction) for name in dir(tl)
)
"""Whether the kernels run in the Triton interpreter: TRITON_INTERPRET=1 before triton's import."""


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _launch_config(
    zhat: torch.Tensor, num_images: int, blocks: Blocks
) -> tuple[tuple[int, int], int, dict[str, object]]:
    dim = zhat.shape[1]
    block_d = max(16, min(blocks.dim, triton.next_power_of_2(dim)))
    grid = (triton.cdiv(num_images, blocks.rows), 2)
    meta: dict[str, object] = {
        "BLOCK_M": blocks.rows,
        "BLOCK_N": blocks.cols,
        "BLOCK_D": block_d,
        "UPCAST": INTERPRETER,
        "PRECISION": _precision(zhat.dtype),
    }
    return grid, block_d, meta


def _on_device(tensor: torch.Tensor) -> AbstractContextManager[object]:
    """Makes ``tensor``'s GPU the current one, where Triton launches."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else nullcontext()


def check_blocks(blocks: Blocks) -> None:
    """Raises a ValueError unless every tile size is a power of two and at least 16."""
    for name in ("rows", "cols", "dim"):
        size = getattr(blocks, name)
        if size < 16 or size & (size - 1):
            raise ValueError(f"Blocks.{name} must be a power of two >= 16, got {size}")


def lse_forward(
    zhat: torch.Tensor,
    num_images: int,
    inv_temperature: float,
    negatives: str,
    blocks: Blocks = Blocks(),
) -> torch.Tensor:
    """The (2N,) float32 log-sum-exp over each row's negatives, computed by the fused kernel."""
    z = zhat.contiguous()
    lse = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
    grid, _, meta = _launch_config(z, num_images, blocks)
    with _on_device(z):
        _negative_lse_forward_kernel[grid](
            z,
            lse,
            num_images,
            z.shape[1],
            float(inv_temperature),
            CROSS_VIEW=negatives == "cross_view",
            **meta,
        )
    return lse


def lse_backward(
    zhat: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    num_images: int,
    inv_temperature: float,
    negatives: str,
    blocks: Blocks = Blocks(),
) -> torch.Tensor:
    """The float32 gradient of ``sum(grad_lse * lse)`` with respect to ``zhat``, row-parallel."""
    z = zhat.contiguous()
    grid, block_d, meta = _launch_config(z, num_images, blocks)
    single_d = z.shape[1] <= block_d
    allocate = torch.empty if single_d else torch.zeros
    dz = allocate(z.shape, dtype=torch.float32, device=z.device)
    with _on_device(z):
        _negative_lse_backward_kernel[grid](
            z,
            lse.float().contiguous(),
            grad_lse.float().contiguous(),
            dz,
            num_images,
            z.shape[1],
            float(inv_temperature),
            CROSS_VIEW=negatives == "cross_view",
            SINGLE_D=single_d,
            **meta,
        )
    return dz


class TritonNegativeLogSumExp(torch.autograd.Function):
    """The fused kernels as an autograd function; the forward saves only the log-sum-exps.

    A backward that records a graph (``create_graph=True``, as the exact meta-gradient needs) is
    computed by the twice-differentiable PyTorch path instead of the kernel.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        zhat: torch.Tensor,
        num_images: int,
        inv_temperature: float,
        negatives: str,
        blocks: Blocks,
    ) -> torch.Tensor:
        lse = lse_forward(zhat, num_images, inv_temperature, negatives, blocks)
        ctx.save_for_backward(zhat, lse)
        ctx.config = (num_images, inv_temperature, negatives, blocks)  # type: ignore[attr-defined]
        return lse.to(zhat.dtype)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_lse: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        zhat, lse = ctx.saved_tensors  # type: ignore[attr-defined]
        num_images, inv_temperature, negatives, blocks = ctx.config  # type: ignore[attr-defined]
        if torch.is_grad_enabled():
            work = zhat.float()
            recorded = chunked_negative_logsumexp(work, num_images, inv_temperature, negatives)
            chunk = default_chunk_size(num_images, negatives)
            grad = lse_gradient(
                work, recorded, grad_lse.float(), num_images, inv_temperature, negatives, chunk
            )
        else:
            grad = lse_backward(zhat, lse, grad_lse, num_images, inv_temperature, negatives, blocks)
        return grad.to(zhat.dtype), None, None, None, None


def triton_negative_logsumexp(
    zhat: torch.Tensor,
    num_images: int,
    inv_temperature: float,
    negatives: str,
    blocks: Blocks | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Log-sum-exp of ``inv_temperature * zhat_r . zhat_k`` over each row's negatives, fused.

    Accumulates in float32 for float16, bfloat16 and float32 inputs. A float32 ``tl.dot`` follows
    ``torch.get_float32_matmul_precision()``: IEEE float32 at ``"highest"`` (PyTorch's default),
    TF32 otherwise.

    Args:
        zhat: (2N, D) projections on a CUDA device (or on CPU under ``TRITON_INTERPRET=1``).
        num_images: N, the number of images.
        inv_temperature: 1 / tau.
        negatives: ``"cross_view"`` or ``"all"``.
        blocks: Tile sizes, powers of two >= 16; defaults to :class:`Blocks`.
        precision: ``"bf16"`` reads bfloat16 tiles; ``"fp32"`` and ``"tf32"`` read ``zhat`` as is.

    Returns:
        A (2N,) tensor in the dtype of ``zhat``.

    Examples:
        >>> zhat = torch.randn(8, 16, device="cuda")  # doctest: +SKIP
        >>> triton_negative_logsumexp(zhat, 4, 5.0, "all").shape  # doctest: +SKIP
        torch.Size([8])
    """
    check_stacked(zhat, num_images)
    chosen = Blocks() if blocks is None else blocks
    check_blocks(chosen)
    tiles = zhat.to(torch.bfloat16) if precision == "bf16" else zhat
    lse: torch.Tensor = TritonNegativeLogSumExp.apply(
        tiles, num_images, inv_temperature, negatives, chosen
    )
    return lse.to(zhat.dtype)
