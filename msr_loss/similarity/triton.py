"""The fused Triton kernels: negatives' log-sum-exp streamed tile by tile, and its backward.

Built like a fused-attention kernel. A program owns a tile of rows of one view; D is a
compile-time constant padded to a power of two, so for D <= 256 the row tile is loaded once and
every column tile costs one ``tl.dot``. The column ranges and the excluded offsets come from
:class:`~msr_loss.similarity.geometry.NegativeGeometry`: a column tile is masked only when it
holds one of its rows' excluded offsets (or runs past the range), with no integer modulo. Logits
live in base 2 (``exp2``, with ``log2(e) / tau`` folded into one scale); the forward keeps an
online maximum and sum per row and writes only the log-sum-exp.

The backward uses the symmetry of the negative set: with ``L`` the log-sum-exps and ``g`` their
incoming gradient, ``dZ_i = (1/tau) sum_k C_ik Z_k`` with ``C_ik = g_i exp(s_ik - L_i) + g_k
exp(s_ik - L_k)`` on negatives: two ``exp2`` per entry, or one, ``C_ik = exp(s_ik) (f_i + f_k)``
with ``f = g exp(-L)``, when every logit is within +-40 (as in the PyTorch path). Each program
recomputes its tiles and accumulates its rows of ``dZ`` on chip (for D > 256, one program per
128-wide slice of ``dZ``, each recomputing the similarities). For few rows, a third grid axis
splits the columns; the partial (max, sum) and ``dZ`` partials are combined in a fixed order
afterwards, so there are no atomics and the result is bitwise deterministic. Under distribution
the rows are one rank's anchors and the columns the gathered batch; the backward then needs only
the gathered log-sum-exps and their gradients.

Operands are float32 (IEEE or TF32 dots) or bfloat16, always with float32 accumulation. The
gradient weights are normalised by a power of two of ``max |g|`` before their cast to bfloat16.
In the Triton interpreter (``TRITON_INTERPRET=1`` before ``triton`` is first imported) a bfloat16
``tl.dot`` is wrong, so there the operands are rounded to bfloat16 and multiplied in float32 (the
same products: bfloat16 products are exact in float32), and TF32 dots run as IEEE float32.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from msr_loss.distributed import gather, rank, world_size
from msr_loss.similarity.blockwise import (
    check_stacked,
    chunked_negative_logsumexp,
    default_chunk_size,
    logits_are_bounded,
    lse_gradient,
)
from msr_loss.similarity.fallback import record_triton_failure
from msr_loss.similarity.geometry import NegativeGeometry, to_global_layout
from msr_loss.similarity.precision import resolve_precision
from msr_loss.types import Precision

LOG2_E = math.log2(math.e)
ON_CHIP_DIM = 256
"""The widest padded D whose row tile and ``dZ`` accumulator stay on chip in one piece."""


@dataclass(frozen=True)
class Blocks:
    """A fixed launch configuration (the interpreter's, and the tests'); CUDA autotunes otherwise.

    Attributes:
        rows: Rows per program.
        cols: Columns per step.
        dim: The slice of D per ``tl.dot`` when the padded D exceeds 256 (and per ``dZ`` program).
        splits: Column splits (the third grid axis); None chooses by the number of rows.
    """

    rows: int = 64
    cols: int = 64
    dim: int = 128
    splits: int | None = None


@triton.jit
def _operand(x, BF16: tl.constexpr, UPCAST: tl.constexpr):  # type: ignore[no-untyped-def]
    if BF16:
        x = x.to(tl.bfloat16)
        if UPCAST:
            x = x.to(tl.float32)
    else:
        x = x.to(tl.float32)
    return x


@triton.jit
def _load(  # type: ignore[no-untyped-def]
    ptr, index, valid, d, dim, EVEN_D: tl.constexpr, BF16: tl.constexpr, UPCAST: tl.constexpr
):
    """A (rows, BLOCK_D) tile; with EVEN_D (D a multiple of BLOCK_D) masked by rows only."""
    mask = valid[:, None] if EVEN_D else valid[:, None] & (d < dim)[None, :]
    return _operand(
        tl.load(ptr + index[:, None] * dim + d[None, :], mask=mask, other=0.0), BF16, UPCAST
    )


@triton.jit
def _row_tile(  # type: ignore[no-untyped-def]
    rows_ptr,
    row_index,
    row_valid,
    dim,
    BLOCK_D: tl.constexpr,
    D_CHUNKS: tl.constexpr,
    EVEN_D: tl.constexpr,
    BF16: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """The row tile, loaded once, when D fits on chip (a placeholder otherwise)."""
    d = tl.arange(0, BLOCK_D)
    return (
        _load(rows_ptr, row_index, row_valid, d, dim, EVEN_D, BF16, UPCAST)
        if D_CHUNKS == 1
        else 0.0
    )


@triton.jit
def _similarity(  # type: ignore[no-untyped-def]
    q,
    rows_ptr,
    row_index,
    row_valid,
    cols_ptr,
    col_index,
    col_valid,
    dim,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_CHUNKS: tl.constexpr,
    EVEN_D: tl.constexpr,
    BF16: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    d = tl.arange(0, BLOCK_D)
    if D_CHUNKS == 1:
        k = _load(cols_ptr, col_index, col_valid, d, dim, EVEN_D, BF16, UPCAST)
        acc = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for chunk in range(D_CHUNKS):
            q_part = _load(
                rows_ptr, row_index, row_valid, chunk * BLOCK_D + d, dim, EVEN_D, BF16, UPCAST
            )
            k = _load(
                cols_ptr, col_index, col_valid, chunk * BLOCK_D + d, dim, EVEN_D, BF16, UPCAST
            )
            acc = tl.dot(q_part, tl.trans(k), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _needs_mask(  # type: ignore[no-untyped-def]
    col_start,
    num_cols,
    first_diag,
    second_diag,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SECOND: tl.constexpr,
):
    """Whether the column tile runs past the range or holds an excluded offset of its rows."""
    col_stop = col_start + BLOCK_N
    hits = (col_start < first_diag + BLOCK_M) & (col_stop > first_diag)
    if SECOND:
        hits = hits | ((col_start < second_diag + BLOCK_M) & (col_stop > second_diag))
    return hits | (col_stop > num_cols)


@triton.jit
def _negatives(cols, diag, num_cols, spacing, SECOND: tl.constexpr):  # type: ignore[no-untyped-def]
    offset = cols[None, :] - diag[:, None]
    keep = (cols < num_cols)[None, :] & (offset != 0)
    if SECOND:
        keep = keep & (offset != spacing)
    return keep


@triton.jit
def _forward_kernel(  # type: ignore[no-untyped-def]
    rows_ptr,
    cols_ptr,
    part_max_ptr,
    part_sum_ptr,
    num_rows_per_view,
    first_image,
    col_start_view0,
    col_start_view1,
    num_cols,
    spacing,
    dim,
    scale_log2,
    splits,
    SECOND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_CHUNKS: tl.constexpr,
    EVEN_D: tl.constexpr,
    BF16: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    view = tl.program_id(1)
    split = tl.program_id(2)
    image = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = image < num_rows_per_view
    row_index = (view * num_rows_per_view + image).to(tl.int64)
    diag = first_image + image
    first_diag = first_image + tl.program_id(0) * BLOCK_M
    col_base = tl.where(view == 0, col_start_view0, col_start_view1)
    q = _row_tile(rows_ptr, row_index, row_valid, dim, BLOCK_D, D_CHUNKS, EVEN_D, BF16, UPCAST)
    tiles_per_split = tl.cdiv(tl.cdiv(num_cols, BLOCK_N), splits)
    col_lo = split * tiles_per_split * BLOCK_N
    col_hi = tl.minimum(col_lo + tiles_per_split * BLOCK_N, num_cols)
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for col_start in range(col_lo, col_hi, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        col_valid = cols < num_cols
        col_index = (col_base + cols).to(tl.int64)
        logits = scale_log2 * _similarity(
            q,
            rows_ptr,
            row_index,
            row_valid,
            cols_ptr,
            col_index,
            col_valid,
            dim,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
            D_CHUNKS,
            EVEN_D,
            BF16,
            UPCAST,
            PRECISION,
        )
        if _needs_mask(
            col_start, num_cols, first_diag, first_diag + spacing, BLOCK_M, BLOCK_N, SECOND
        ):
            keep = _negatives(cols, diag, num_cols, spacing, SECOND)
            logits = tl.where(keep, logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp2(running_max - shift) + tl.sum(
            tl.exp2(logits - shift[:, None]), axis=1
        )
        running_max = new_max
    out = split * 2 * num_rows_per_view + row_index
    tl.store(part_max_ptr + out, running_max, mask=row_valid)
    tl.store(part_sum_ptr + out, running_sum, mask=row_valid)


@triton.jit
def _backward_kernel(  # type: ignore[no-untyped-def]
    rows_ptr,
    cols_ptr,
    lse_log2_ptr,
    grad_ptr,
    dz_ptr,
    num_rows_per_view,
    first_image,
    col_start_view0,
    col_start_view1,
    num_cols,
    spacing,
    dim,
    scale_log2,
    splits,
    SECOND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_CHUNKS: tl.constexpr,
    EVEN_D: tl.constexpr,
    BF16: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    ONE_EXP: tl.constexpr,
):
    view = tl.program_id(1)
    split = tl.program_id(2) // D_CHUNKS
    d_out = tl.program_id(2) % D_CHUNKS
    image = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = image < num_rows_per_view
    row_index = (view * num_rows_per_view + image).to(tl.int64)
    row_global = (view * spacing + first_image + image).to(tl.int64)
    diag = first_image + image
    first_diag = first_image + tl.program_id(0) * BLOCK_M
    col_base = tl.where(view == 0, col_start_view0, col_start_view1)
    d = tl.arange(0, BLOCK_D)
    q = _row_tile(rows_ptr, row_index, row_valid, dim, BLOCK_D, D_CHUNKS, EVEN_D, BF16, UPCAST)
    row_grad = tl.load(grad_ptr + row_global, mask=row_valid, other=0.0)
    if not ONE_EXP:
        row_lse = tl.load(lse_log2_ptr + row_global, mask=row_valid, other=0.0)
    tiles_per_split = tl.cdiv(tl.cdiv(num_cols, BLOCK_N), splits)
    col_lo = split * tiles_per_split * BLOCK_N
    col_hi = tl.minimum(col_lo + tiles_per_split * BLOCK_N, num_cols)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for col_start in range(col_lo, col_hi, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        col_valid = cols < num_cols
        col_index = (col_base + cols).to(tl.int64)
        if D_CHUNKS == 1:
            k = _load(cols_ptr, col_index, col_valid, d, dim, EVEN_D, BF16, UPCAST)
            logits = scale_log2 * tl.dot(q, tl.trans(k), input_precision=PRECISION)
        else:
            logits = scale_log2 * _similarity(
                q,
                rows_ptr,
                row_index,
                row_valid,
                cols_ptr,
                col_index,
                col_valid,
                dim,
                BLOCK_M,
                BLOCK_N,
                BLOCK_D,
                D_CHUNKS,
                EVEN_D,
                BF16,
                UPCAST,
                PRECISION,
            )
            k = _load(
                cols_ptr, col_index, col_valid, d_out * BLOCK_D + d, dim, EVEN_D, BF16, UPCAST
            )
        col_grad = tl.load(grad_ptr + col_index, mask=col_valid, other=0.0)
        if ONE_EXP:
            weights = tl.exp2(logits) * (row_grad[:, None] + col_grad[None, :])
        else:
            col_lse = tl.load(lse_log2_ptr + col_index, mask=col_valid, other=0.0)
            weights = row_grad[:, None] * tl.exp2(logits - row_lse[:, None]) + col_grad[
                None, :
            ] * tl.exp2(logits - col_lse[None, :])
        if _needs_mask(
            col_start, num_cols, first_diag, first_diag + spacing, BLOCK_M, BLOCK_N, SECOND
        ):
            keep = _negatives(cols, diag, num_cols, spacing, SECOND)
            weights = tl.where(keep, weights, 0.0)
        acc = tl.dot(_operand(weights, BF16, UPCAST), k, acc, input_precision=PRECISION)
    out_d = d_out * BLOCK_D + d
    out = dz_ptr + (split * 2 * num_rows_per_view + row_index)[:, None] * dim + out_d[None, :]
    tl.store(out, acc, mask=row_valid[:, None] & (out_d < dim)[None, :])


INTERPRETER = not isinstance(_forward_kernel, triton.JITFunction) and not isinstance(
    tl.cdiv, triton.JITFunction
)
"""Whether the kernels run in the Triton interpreter: TRITON_INTERPRET=1 before triton's import.

Both this module's kernels and Triton's own ``@triton.jit`` helpers (``tl.cdiv``) must have been
decorated in interpreter mode; a variable set between the two imports mixes them, which fails.
"""

_TUNED_SHAPES = [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2)]
"""(BLOCK_M, BLOCK_N, num_warps, num_stages) that the autotuner tries on CUDA."""


SHARED_MEMORY_BUDGET = 160 * 1024
"""Bytes of shared memory a configuration may plan for: the row tile and its pipelined tiles."""


def _fitting(configs: list[triton.Config], named_args: dict[str, Any], **meta: Any) -> list[object]:
    """The configurations whose row tile and ``num_stages`` column tiles fit the budget."""
    width = meta["BLOCK_D"] * named_args["rows_ptr"].element_size()

    def planned(config: triton.Config) -> int:
        tiles = config.kwargs["BLOCK_M"] + config.num_stages * config.kwargs["BLOCK_N"]
        return int(tiles * width)

    fitting = [c for c in configs if planned(c) <= SHARED_MEMORY_BUDGET]
    return fitting or [min(configs, key=planned)]


def _autotuned(kernel: object) -> object:
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
        for m, n, warps, stages in _TUNED_SHAPES
    ]
    return triton.autotune(
        configs,
        key=["num_cols", "dim", "splits", "BLOCK_D", "BF16", "PRECISION"],
        prune_configs_by={"early_config_prune": _fitting},
    )(kernel)


_KERNELS = {"forward": _forward_kernel, "backward": _backward_kernel}
_TUNED = {} if INTERPRETER else {name: _autotuned(k) for name, k in _KERNELS.items()}


@dataclass(frozen=True)
class _Launch:
    """The geometry, scale, operands and tiles of one call, and how to launch its kernels."""

    geometry: NegativeGeometry
    inv_temperature: float
    precision: str
    blocks: Blocks | None

    def splits(self, device: torch.device) -> int:
        """Column splits: enough programs for about two per multiprocessor, >= 512 columns each."""
        if self.blocks is not None and self.blocks.splits is not None:
            return self.blocks.splits
        if device.type != "cuda":
            return 1
        row_programs = 2 * triton.cdiv(self.geometry.local_images, 64)
        processors = torch.cuda.get_device_properties(device).multi_processor_count
        wanted = triton.cdiv(2 * processors, row_programs)
        return max(1, min(wanted, self.geometry.num_columns // 512))

    def d_chunks(self, dim: int) -> tuple[int, int]:
        """(BLOCK_D, number of D slices): D padded to a power of two up to 256, sliced beyond."""
        padded = max(16, triton.next_power_of_2(dim))
        block_d = padded if padded <= ON_CHIP_DIM else (self.blocks or Blocks()).dim
        return block_d, triton.cdiv(dim, block_d)

    def run(
        self, name: str, tensors: tuple[torch.Tensor, ...], splits: int, one_exp: bool = False
    ) -> None:
        """Launches kernel ``name`` on ``tensors`` (rows, columns, then the kernel's others).

        ``one_exp`` (backward only): the gradient tensor holds ``g exp(-L)`` and each weight
        takes one ``exp2``.
        """
        g = self.geometry
        dim = tensors[0].shape[1]
        block_d, d_chunks = self.d_chunks(dim)
        programs = splits * (d_chunks if name == "backward" else 1)
        meta: dict[str, object] = {
            "SECOND": g.views_seen == 2,
            "BLOCK_D": block_d,
            "D_CHUNKS": d_chunks,
            "EVEN_D": dim % block_d == 0,
            "BF16": self.precision == "bf16",
            "UPCAST": INTERPRETER,
            "PRECISION": "tf32" if self.precision == "tf32" and not INTERPRETER else "ieee",
        }
        if name == "backward":
            meta["ONE_EXP"] = one_exp
        scalars = (
            g.local_images,
            g.first_image,
            g.columns(0).start,
            g.columns(1).start,
            g.num_columns,
            g.global_images,
            dim,
            self.inv_temperature * LOG2_E,
            splits,
        )
        if self.blocks is None and not INTERPRETER:

            def grid(config: dict[str, int]) -> tuple[int, int, int]:
                return (triton.cdiv(g.local_images, config["BLOCK_M"]), 2, programs)

            _TUNED[name][grid](*tensors, *scalars, **meta)  # type: ignore[index]
            return
        blocks = self.blocks or Blocks()
        meta.update(BLOCK_M=blocks.rows, BLOCK_N=blocks.cols)
        fixed = (triton.cdiv(g.local_images, blocks.rows), 2, programs)
        _KERNELS[name][fixed](*tensors, *scalars, **meta)


def _on_device(tensor: torch.Tensor) -> AbstractContextManager[object]:
    """Makes ``tensor``'s GPU the current one, where Triton launches."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else nullcontext()


def check_blocks(blocks: Blocks) -> None:
    """Raises a ValueError unless every tile size is a power of two >= 16 and splits >= 1."""
    for name in ("rows", "cols", "dim"):
        size = getattr(blocks, name)
        if size < 16 or size & (size - 1):
            raise ValueError(f"Blocks.{name} must be a power of two >= 16, got {size}")
    if blocks.splits is not None and blocks.splits < 1:
        raise ValueError(f"Blocks.splits must be a positive number of splits, got {blocks.splits}")


def lse_forward(rows: torch.Tensor, columns: torch.Tensor, launch: _Launch) -> torch.Tensor:
    """The (2n,) float32 log-sum-exp over each row's negatives among ``columns``."""
    splits = launch.splits(rows.device)
    part_max = torch.empty(splits, rows.shape[0], dtype=torch.float32, device=rows.device)
    part_sum = torch.empty_like(part_max)
    with _on_device(rows):
        launch.run("forward", (rows, columns, part_max, part_sum), splits)
    top = part_max.amax(dim=0)
    shift = torch.where(torch.isinf(top), 0.0, top)
    total = (part_sum * torch.exp2(part_max - shift)).sum(dim=0)
    return (shift + torch.log2(total)) * math.log(2.0)


def lse_backward(
    rows: torch.Tensor,
    columns: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    launch: _Launch,
    bounded: bool,
) -> torch.Tensor:
    """The float32 gradient of ``sum(grad_lse * lse)`` over every rank with respect to ``rows``.

    ``lse`` and ``grad_lse`` are the (2N,) global log-sum-exps and their gradients, in the
    layout of ``columns``. The gradients are divided by a power of two near ``max |grad_lse|``
    (exact) before the kernel, so its weights are at most about 4 when cast to bfloat16. With
    ``bounded`` logits (:func:`~msr_loss.similarity.blockwise.logits_are_bounded`) the kernel
    reads ``f = g exp(-L)`` and weighs each entry by ``exp(s) (f_i + f_k)``: one ``exp2``.
    """
    grad = grad_lse.float()
    peak = grad.abs().amax()
    unit = torch.where(peak > 0, torch.exp2(torch.floor(torch.log2(peak))), 1.0)
    splits = launch.splits(rows.device)
    parts = torch.empty(splits, *rows.shape, dtype=torch.float32, device=rows.device)
    lse_log2 = (lse.float() * LOG2_E).contiguous()
    weights = grad / unit
    if bounded:
        weights = weights * torch.exp2(-lse_log2)
    tensors = (rows, columns, lse_log2, weights.contiguous(), parts)
    with _on_device(rows):
        launch.run("backward", tensors, splits, one_exp=bounded)
    return parts.sum(dim=0) * (unit * launch.inv_temperature)


def _gathered(zhat: torch.Tensor) -> torch.Tensor:
    """Every rank's (2n, ...) stack in the global layout of :mod:`~msr_loss.similarity.geometry`."""
    return to_global_layout(gather(zhat), world_size())


class TritonNegativeLogSumExp(torch.autograd.Function):
    """The fused kernels as an autograd function; the forward saves only the log-sum-exps.

    With ``distributed``, the rows are this rank's anchors and the columns the gathered batch;
    the forward gathers the (2n,) log-sum-exps and the backward their gradients, nothing of size
    2N x D. A backward that records a graph (``create_graph=True``, as the exact meta-gradient
    needs) is computed by the twice-differentiable PyTorch path instead of the kernel.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        zhat: torch.Tensor,
        num_images: int,
        inv_temperature: float,
        negatives: str,
        precision: str,
        blocks: Blocks | None,
        distributed: bool,
    ) -> torch.Tensor:
        rows = (zhat.to(torch.bfloat16) if precision == "bf16" else zhat).contiguous()
        if distributed:
            columns = _gathered(rows).contiguous()
            geometry = NegativeGeometry(
                num_images, world_size() * num_images, rank() * num_images, negatives
            )
        else:
            columns = rows
            geometry = NegativeGeometry.single_process(num_images, negatives)
        launch = _Launch(geometry, float(inv_temperature), precision, blocks)
        lse = lse_forward(rows, columns, launch)
        global_lse = _gathered(lse) if distributed else lse
        ctx.save_for_backward(zhat, rows, columns, global_lse)
        bounded = logits_are_bounded(columns, launch.inv_temperature)
        ctx.config = (launch, distributed, bounded)  # type: ignore[attr-defined]
        return lse.to(zhat.dtype)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_lse: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        zhat, rows, columns, global_lse = ctx.saved_tensors  # type: ignore[attr-defined]
        launch, distributed, bounded = ctx.config  # type: ignore[attr-defined]
        if torch.is_grad_enabled():
            grad = _recorded_gradient(zhat, grad_lse, launch, distributed)
        else:
            grad = _kernel_gradient(
                zhat, rows, columns, global_lse, grad_lse, launch, distributed, bounded
            )
        return grad.to(zhat.dtype), None, None, None, None, None, None


def _kernel_gradient(
    zhat: torch.Tensor,
    rows: torch.Tensor,
    columns: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    launch: _Launch,
    distributed: bool,
    bounded: bool,
) -> torch.Tensor:
    """The kernel's backward; on CUDA, if it fails, the PyTorch path's (with a warning)."""
    global_grad = _gathered(grad_lse) if distributed else grad_lse
    try:
        return lse_backward(rows, columns, lse, global_grad, launch, bounded)
    except Exception as error:
        if not zhat.is_cuda or isinstance(error, torch.OutOfMemoryError):
            raise
        record_triton_failure(error)
        with torch.enable_grad():
            leaf = zhat.detach().requires_grad_()
            return _recorded_gradient(leaf, grad_lse, launch, distributed).detach()


def _recorded_gradient(
    zhat: torch.Tensor, grad_lse: torch.Tensor, launch: _Launch, distributed: bool
) -> torch.Tensor:
    """The gradient by the PyTorch path, as a differentiable function of its inputs."""
    g = launch.geometry
    if not distributed:
        work = zhat.float()
        recorded = chunked_negative_logsumexp(
            work, g.local_images, launch.inv_temperature, g.negatives
        )
        chunk = default_chunk_size(g.local_images)
        args = (g.local_images, launch.inv_temperature, g.negatives, chunk)
        return lse_gradient(work, recorded, grad_lse.float(), *args)
    from msr_loss.similarity.gathered import torch_gathered_logsumexp

    with torch.enable_grad():
        recorded = torch_gathered_logsumexp(
            zhat.float(), g.local_images, launch.inv_temperature, g.negatives
        )
        (grad,) = torch.autograd.grad(recorded, zhat, grad_lse.float(), create_graph=True)
    return grad


def triton_negative_logsumexp(
    zhat: torch.Tensor,
    num_images: int,
    inv_temperature: float,
    negatives: str,
    blocks: Blocks | None = None,
    *,
    precision: Precision = "fp32",
    distributed: bool = False,
) -> torch.Tensor:
    """Log-sum-exp of ``inv_temperature * zhat_r . zhat_k`` over each row's negatives, fused.

    Accumulates in float32 for float16, bfloat16 and float32 inputs; the operands are those of
    ``precision`` (:mod:`msr_loss.similarity.precision`; ``"auto"`` resolves from the dtype of
    ``zhat`` only). If the kernel fails to compile or run on CUDA, a
    RuntimeWarning says so and the PyTorch path computes the result.

    Args:
        zhat: (2n, D) projections on a CUDA device (or on CPU under ``TRITON_INTERPRET=1``).
        num_images: n, the number of images (of this rank, with ``distributed``).
        inv_temperature: 1 / tau.
        negatives: ``"cross_view"`` or ``"all"``.
        blocks: A fixed launch configuration; by default autotuned on CUDA and
            :class:`Blocks` in the interpreter.
        precision: ``"fp32"`` (IEEE float32 dots), ``"tf32"``, ``"bf16"`` or ``"auto"``.
        distributed: The rows are this rank's anchors, the negatives come from every rank of
            the default process group.

    Returns:
        A (2n,) tensor in the dtype of ``zhat``.

    Examples:
        >>> zhat = torch.randn(8, 16, device="cuda")  # doctest: +SKIP
        >>> triton_negative_logsumexp(zhat, 4, 5.0, "all", precision="bf16").shape  # doctest: +SKIP
        torch.Size([8])
    """
    check_stacked(zhat, num_images)
    if blocks is not None:
        check_blocks(blocks)
    operands = resolve_precision(precision, zhat.dtype)
    config = (num_images, inv_temperature, negatives, operands, blocks, distributed)
    try:
        lse: torch.Tensor = TritonNegativeLogSumExp.apply(zhat, *config)
    except Exception as error:
        if not zhat.is_cuda or isinstance(error, torch.OutOfMemoryError):
            raise
        record_triton_failure(error)
        if distributed:
            from msr_loss.similarity.gathered import torch_gathered_logsumexp

            return torch_gathered_logsumexp(zhat, num_images, inv_temperature, negatives)
        return chunked_negative_logsumexp(zhat, num_images, inv_temperature, negatives)
    return lse
