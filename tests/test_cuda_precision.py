"""On a CUDA GPU: both backends in every input dtype and precision against float64, N to 65,536.

Skipped without CUDA; ``make gpu-check`` runs them (marker ``cuda``). The float64 reference is the
blockwise PyTorch path run in float64, itself tested against the definition in
``tests/test_similarity.py``; it sees the inputs already rounded to the tested dtype.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from msr_loss.similarity import negative_logsumexp, triton_installed
from msr_loss.similarity.blockwise import chunked_negative_logsumexp

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PRECISIONS = ("auto", "fp32", "tf32", "bf16")
# Relative error (norm) of the log-sum-exps and of their gradient. "auto" resolves to "bf16" for
# half inputs and to "fp32" for float32 (PyTorch's default matmul precision); long sums over up to
# 131,072 columns lift the float32 bounds over the CPU's (tests/test_gemm_precision.py).
LSE_BOUND = {"fp32": 1e-5, "tf32": 5e-4, "bf16": 3e-3}
GRAD_BOUND = {"fp32": 1e-4, "tf32": 5e-3, "bf16": 3e-2}


def resolved(precision: str, dtype: torch.dtype) -> str:
    if precision != "auto":
        return precision
    return "fp32" if dtype == torch.float32 else "bf16"


@functools.cache
def inputs(num_images: int, dtype: torch.dtype, near_duplicates: bool):
    gen = torch.Generator(device="cuda").manual_seed(num_images)
    z = torch.randn(2 * num_images, 128, generator=gen, device="cuda")
    if near_duplicates:
        z[num_images:] = z[:num_images] + 1e-3 * torch.randn_like(z[:num_images])
    zhat = F.normalize(z, dim=1).to(dtype)
    grad_out = torch.rand(2 * num_images, generator=gen, device="cuda")
    return zhat, grad_out


@functools.cache
def reference(num_images: int, dtype: torch.dtype, near_duplicates: bool, temperature: float):
    zhat, grad_out = inputs(num_images, dtype, near_duplicates)
    leaf = zhat.double().requires_grad_()
    lse = chunked_negative_logsumexp(leaf, num_images, 1 / temperature, "all")
    (grad,) = torch.autograd.grad(lse, leaf, grad_out.double())
    return lse.detach(), grad


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


CASES = [("triton", 1000), ("triton", 65536), ("torch", 1000)]


@pytest.mark.parametrize(("backend", "num_images"), CASES)
@pytest.mark.parametrize("temperature", [0.2, 0.01])
@pytest.mark.parametrize("near_duplicates", [False, True])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_and_precision_is_within_its_bound_of_float64(
    dtype, precision, near_duplicates, temperature, backend, num_images
):
    if backend == "triton" and not triton_installed():
        pytest.skip("triton is not installed")
    zhat, grad_out = inputs(num_images, dtype, near_duplicates)
    expected, expected_grad = reference(num_images, dtype, near_duplicates, temperature)
    leaf = zhat.clone().requires_grad_()
    lse = negative_logsumexp(
        leaf, num_images, temperature, "all", backend=backend, precision=precision
    )
    (grad,) = torch.autograd.grad(lse, leaf, grad_out.to(lse.dtype))
    assert torch.isfinite(lse).all() and torch.isfinite(grad).all()
    chosen = resolved(precision, dtype)
    assert relative(lse.float(), expected) < max(LSE_BOUND[chosen], _rounding(dtype))
    assert relative(grad.float(), expected_grad) < max(GRAD_BOUND[chosen], 10 * _rounding(dtype))


def _rounding(dtype: torch.dtype) -> float:
    """The relative error of returning the result in ``dtype`` itself."""
    return 0.0 if dtype == torch.float32 else float(torch.finfo(dtype).eps)
