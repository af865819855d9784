"""The precision of the similarity GEMMs: resolving ``precision="auto"`` and preparing operands.

Every backend multiplies its operands in the chosen precision and accumulates in float32 (float64
for float64 inputs); the log-sum-exps, the positives, the strata and the loss stay in float32.

- ``"fp32"``: IEEE float32 operands.
- ``"tf32"``: TensorFloat-32 operands (10-bit mantissa) on CUDA; CPUs have no TF32 unit, so there
  it is ``"fp32"``.
- ``"bf16"``: bfloat16 operands (8-bit mantissa). The Triton kernel reads bfloat16 tiles. The
  PyTorch path rounds its operands to bfloat16 and multiplies them with the float32 GEMM: the
  same numbers (a product of two bfloat16 values is exact in float32) without the output being
  rounded to bfloat16, as PyTorch's bfloat16 GEMM does; on CPUs without AMX that GEMM is no
  faster than float32 anyway (see ``benchmarks/RESULTS.md``).
- ``"auto"``: ``"bf16"`` for half-precision inputs or inside ``torch.autocast``, otherwise what
  ``torch.get_float32_matmul_precision()`` asks for (``"highest"``: ``"fp32"``; ``"high"`` or
  ``"medium"``: ``"tf32"``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch

from msr_loss.types import PRECISIONS

GemmPrecision = Literal["fp32", "tf32", "bf16"]
HALF_DTYPES = (torch.float16, torch.bfloat16)


def resolve_precision(
    precision: str, dtype: torch.dtype, under_autocast: bool = False
) -> GemmPrecision:
    """The GEMM precision that ``precision`` stands for, given the inputs' dtype.

    Args:
        precision: ``"auto"``, ``"fp32"``, ``"tf32"`` or ``"bf16"``.
        dtype: The dtype of the projections as the caller passed them.
        under_autocast: Whether the caller ran inside an enabled ``torch.autocast`` region.

    Returns:
        ``"fp32"``, ``"tf32"`` or ``"bf16"``.

    Raises:
        ValueError: ``precision`` is not one of ``PRECISIONS``.

    Examples:
        >>> resolve_precision("auto", torch.bfloat16)
        'bf16'
        >>> resolve_precision("auto", torch.float32)
        'fp32'
        >>> resolve_precision("tf32", torch.float16)
        'tf32'
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return "fp32"
    if precision == "tf32":
        return "tf32"
    if precision == "bf16" or under_autocast or dtype in HALF_DTYPES:
        return "bf16"
    return "fp32" if _float32_matmul_precision() == "highest" else "tf32"


@torch.compiler.assume_constant_result
def _float32_matmul_precision() -> str:
    """PyTorch's float32 matmul setting; ``torch.compile`` reads it once, when it traces."""
    return torch.get_float32_matmul_precision()


def autocast_enabled(tensor: torch.Tensor) -> bool:
    """Whether autocast is on for the device type of ``tensor``."""
    return torch.is_autocast_enabled(tensor.device.type)


def gemm_operand(work: torch.Tensor, precision: GemmPrecision) -> torch.Tensor:
    """``work`` (float32 or float64) as the PyTorch path's GEMMs read it.

    ``"bf16"`` rounds it to bfloat16 and back to its own dtype; the other precisions return
    ``work`` itself.

    Examples:
        >>> gemm_operand(torch.tensor([1.0 + 2**-10]), "bf16")
        tensor([1.])
    """
    if precision != "bf16":
        return work
    return work.to(torch.bfloat16).to(work.dtype)


def gemm_context(device: torch.device, precision: GemmPrecision) -> AbstractContextManager[None]:
    """A context in which a float32 CUDA GEMM uses TF32 exactly when ``precision`` is ``"tf32"``."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return nullcontext()
    return _CudaTf32(precision == "tf32")


class _CudaTf32(AbstractContextManager[None]):
    def __init__(self, allow: bool) -> None:
        self.allow = allow
        self.saved = False

    def __enter__(self) -> None:
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.allow

    def __exit__(self, *exc: object) -> None:
        torch.backends.cuda.matmul.allow_tf32 = self.saved


__all__ = [
    "GemmPrecision",
    "autocast_enabled",
    "gemm_context",
    "gemm_operand",
    "resolve_precision",
]
