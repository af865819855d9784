"""The hot spot of every loss: the log-sum-exp over each anchor's negatives, and its backends.

``"torch"`` is the blockwise PyTorch path (:mod:`msr_loss.similarity.blockwise`), on every device
and differentiable twice. ``"triton"`` is the fused kernel (:mod:`msr_loss.similarity.triton`), for
CUDA tensors, or CPU tensors under the Triton interpreter. ``"auto"`` picks Triton for CUDA tensors
in a dtype it supports when the ``triton`` package is installed, and PyTorch otherwise. Both take
``precision`` (:mod:`msr_loss.similarity.precision`): the operands' precision in the GEMMs. If
Triton fails to import or compile on CUDA, a RuntimeWarning says so once and the PyTorch path
takes over (:mod:`msr_loss.similarity.fallback`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

from msr_loss.similarity.blockwise import chunked_negative_logsumexp
from msr_loss.similarity.fallback import record_triton_failure, triton_failed
from msr_loss.similarity.precision import autocast_enabled, resolve_precision
from msr_loss.types import BACKENDS, PRECISIONS, Precision

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_MODULE = "msr_loss.similarity.triton"


def triton_installed() -> bool:
    """Whether the optional ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def _triton_module() -> ModuleType:
    return importlib.import_module(_TRITON_MODULE)


def load_triton_kernels(zhat: torch.Tensor) -> ModuleType | None:
    """The kernel module, or None after a failed import on CUDA (warned once)."""
    try:
        return _triton_module()
    except Exception as error:
        if not zhat.is_cuda:
            raise
        record_triton_failure(error)
        return None


def _check_triton_can_run(zhat: torch.Tensor) -> None:
    if not triton_installed():
        raise ValueError(
            "backend='triton' needs the triton package: pip install 'msr-loss[triton]'"
        )
    if zhat.dtype not in TRITON_DTYPES:
        raise TypeError(
            f"backend='triton' supports float16, bfloat16 and float32 inputs, got {zhat.dtype}; "
            "use backend='torch' or 'auto'"
        )
    if zhat.is_cuda:
        return
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got a tensor on {zhat.device}; use "
            "backend='torch' or 'auto', or set TRITON_INTERPRET=1 to run the kernel in the "
            "(slow) Triton interpreter"
        )
    if not _triton_module().INTERPRETER:
        raise ValueError(
            "TRITON_INTERPRET=1 was set after triton had been imported, so the kernels were "
            "compiled for a GPU; set it before triton is first imported in the process to run "
            "the kernel on CPU tensors"
        )


def uses_triton(zhat: torch.Tensor, backend: str) -> bool:
    """Whether ``backend`` resolves to the Triton kernel for ``zhat``; raises if it cannot run.

    Args:
        zhat: The (2N, D) projections the backend will see.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        True for the Triton kernel, False for the PyTorch path.

    Examples:
        >>> uses_triton(torch.zeros(4, 8), "auto")
        False
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch" or (zhat.is_cuda and triton_failed()):
        return False
    if backend == "auto":
        return zhat.is_cuda and zhat.dtype in TRITON_DTYPES and triton_installed()
    _check_triton_can_run(zhat)
    return True


def negative_logsumexp(
    zhat: torch.Tensor,
    num_images: int,
    temperature: float,
    negatives: str,
    backend: str = "auto",
    precision: Precision = "auto",
) -> torch.Tensor:
    """Log-sum-exp of ``zhat_r . zhat_k / temperature`` over the negatives ``k`` of each row ``r``.

    Args:
        zhat: (2N, D) unit-norm projections, view 1 stacked over view 2.
        num_images: N, the number of images.
        temperature: The softmax temperature, > 0.
        negatives: ``"cross_view"`` (the other view of the other images) or ``"all"``.
        backend: ``"torch"``, ``"triton"`` or ``"auto"`` (Triton for CUDA tensors when installed).
        precision: ``"auto"``, ``"fp32"``, ``"tf32"`` or ``"bf16"``: the GEMM operands' precision;
            ``"auto"`` is ``"bf16"`` for half-precision ``zhat`` or under autocast, and otherwise
            follows ``torch.get_float32_matmul_precision()``.

    Returns:
        A (2N,) tensor in the dtype of ``zhat``.

    Examples:
        >>> zhat = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> negative_logsumexp(zhat, 4, 0.2, "cross_view", backend="torch").shape
        torch.Size([8])
    """
    gemm = resolve_precision(precision, zhat.dtype, autocast_enabled(zhat))
    kernels = load_triton_kernels(zhat) if uses_triton(zhat, backend) else None
    if kernels is not None:
        result: torch.Tensor = kernels.triton_negative_logsumexp(
            zhat, num_images, 1.0 / temperature, negatives, precision=gemm
        )
        return result
    return chunked_negative_logsumexp(
        zhat, num_images, 1.0 / temperature, negatives, precision=gemm
    )


__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "load_triton_kernels",
    "negative_logsumexp",
    "resolve_precision",
    "triton_installed",
    "uses_triton",
]
