"""The fused Triton kernels against float64, on a GPU or in the Triton interpreter.

The interpreter (TRITON_INTERPRET=1) must be switched on before triton is first imported, so on a
machine without CUDA the kernel tests run in one subprocess with the variable set, and the rest of
the suite keeps the compiled kernels. The interpreter costs milliseconds per tile step: sizes stay
small (M <= 1024) with large blocks.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from msr_loss import interventional_loss
from msr_loss.similarity import negative_logsumexp, triton_installed

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
RUNS_HERE = triton_installed() and (INTERPRETED or torch.cuda.is_available())
DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"
NEGATIVE_SETS = ["cross_view", "all"]
# (N, D, blocks): ragged rows, columns and D with several D chunks; then one D chunk.
SHAPES = [(37, 40, (32, 32, 16)), (70, 24, (64, 64, 128))]
# Tolerances against float64 given the inputs rounded to the tested dtype: the kernel accumulates
# in float32; on a GPU half inputs also round the backward's weights to their dtype.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.skipif(RUNS_HERE or not triton_installed(), reason="the kernel tests run directly")
@pytest.mark.filterwarnings("ignore")
def test_kernel_tests_pass_in_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k"]
    command.append("not test_kernel_tests_pass_in_the_triton_interpreter")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert re.search(r"^\d+ passed, \d+ deselected in", done.stdout, re.MULTILINE), done.stdout


@pytest.fixture(scope="module")
def kernels():
    if not RUNS_HERE:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1; run by the subprocess test on CPU")
    import msr_loss.similarity.triton as module

    return module


def plain_dense(zhat: torch.Tensor, batch_size: int, inv_t: float, negatives: str):
    index = torch.arange(zhat.shape[0])
    keep = (index[:, None] % batch_size) != (index[None, :] % batch_size)
    if negatives == "cross_view":
        keep &= (index[:, None] // batch_size) != (index[None, :] // batch_size)
    logits = (zhat @ zhat.T) * inv_t
    return torch.logsumexp(logits.masked_fill(~keep, -math.inf), dim=1)


def unit_rows(seed: int, batch_size: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(2 * batch_size, dim, generator=gen), dim=1).to(DEVICE, dtype)


def value_and_grad(fn, zhat: torch.Tensor, grad_out: torch.Tensor):
    leaf = zhat.detach().clone().requires_grad_()
    value = fn(leaf)
    (grad,) = torch.autograd.grad(value, leaf, grad_out.to(value.dtype))
    return value.detach(), grad


def check_against_float64(kernels, batch, dim, blocks, dtype, negatives, inv_t):
    zhat = unit_rows(batch + dim, batch, dim, dtype)
    grad_out = torch.randn(2 * batch, generator=torch.Generator().manual_seed(batch)).to(DEVICE)
    got, got_grad = value_and_grad(
        lambda z: kernels.triton_negative_logsumexp(
            z, batch, inv_t, negatives, kernels.Blocks(*blocks)
        ),
        zhat,
        grad_out,
    )
    expected, expected_grad = value_and_grad(
        lambda z: plain_dense(z, batch, inv_t, negatives), zhat.double(), grad_out.double()
    )
    tol = TOLERANCE[dtype]
    assert got.dtype == dtype and got_grad.dtype == dtype
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol * inv_t)
    torch.testing.assert_close(
        got_grad.double(), expected_grad, rtol=tol, atol=tol * expected_grad.abs().max()
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("negatives", NEGATIVE_SETS)
def test_forward_and_backward_match_float64(kernels, shape, dtype, negatives):
    batch, dim, blocks = shape
    check_against_float64(kernels, batch, dim, blocks, dtype, negatives, 1 / 0.2)


@pytest.mark.parametrize("negatives", NEGATIVE_SETS)
def test_bfloat16_matches_float64(kernels, negatives):
    check_against_float64(kernels, 37, 40, (32, 32, 16), torch.bfloat16, negatives, 1 / 0.2)


@pytest.mark.parametrize("negatives", NEGATIVE_SETS)
def test_temperature_0_01_over_1000_columns_stays_finite_and_exact(kernels, negatives):
    check_against_float64(kernels, 500, 16, (128, 128, 16), torch.float32, negatives, 100.0)


@pytest.mark.parametrize("negatives", NEGATIVE_SETS)
def test_backward_is_bitwise_deterministic(kernels, negatives):
    zhat = unit_rows(0, 45, 20, torch.float32)
    grad_out = torch.randn(90, device=DEVICE)
    grads = [
        value_and_grad(
            lambda z: kernels.triton_negative_logsumexp(
                z, 45, 5.0, negatives, kernels.Blocks(32, 32, 16)
            ),
            zhat,
            grad_out,
        )[1]
        for _ in range(2)
    ]
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("negatives", NEGATIVE_SETS)
def test_public_loss_agrees_across_backends(kernels, negatives):
    gen = torch.Generator().manual_seed(1)
    z1, z2 = (torch.randn(40, 24, generator=gen).to(DEVICE) for _ in range(2))
    strata = torch.rand(4, 24, generator=gen).to(DEVICE)
    results = []
    for backend in ("torch", "triton"):
        inputs = [x.clone().requires_grad_() for x in (z1, z2, strata)]
        loss = interventional_loss(*inputs, temperature=0.1, negatives=negatives, backend=backend)
        results.append((loss, *torch.autograd.grad(loss, inputs)))
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("negatives", NEGATIVE_SETS)
def test_multi_view_loss_agrees_across_backends(kernels, negatives):
    gen = torch.Generator().manual_seed(2)
    views = [torch.randn(24, 16, generator=gen).to(DEVICE) for _ in range(3)]
    strata = torch.rand(4, 16, generator=gen).to(DEVICE)
    results = []
    for backend in ("torch", "triton"):
        inputs = [x.clone().requires_grad_() for x in (*views, strata)]
        loss = interventional_loss(
            *inputs[:2],
            inputs[3],
            temperature=0.1,
            negatives=negatives,
            backend=backend,
            more_views=inputs[2:3],
        )
        results.append((loss, *torch.autograd.grad(loss, inputs)))
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_a_graph_building_backward_gives_the_exact_second_derivative(kernels):
    zhat = unit_rows(2, 12, 8, torch.float32)
    grad_out = torch.randn(24, device=DEVICE)
    second = []
    for backend in ("torch", "triton"):
        leaf = zhat.clone().requires_grad_()
        lse = negative_logsumexp(leaf, 12, 0.3, "cross_view", backend=backend)
        (grad,) = torch.autograd.grad(lse, leaf, grad_out, create_graph=True)
        second.append(torch.autograd.grad(grad.pow(2).sum(), leaf)[0])
    torch.testing.assert_close(second[1], second[0], rtol=1e-5, atol=1e-6)


def test_blocks_must_be_powers_of_two_of_at_least_16(kernels):
    zhat = unit_rows(0, 4, 8, torch.float32)
    with pytest.raises(ValueError, match=r"Blocks.cols must be a power of two >= 16, got 24"):
        kernels.triton_negative_logsumexp(zhat, 4, 2.0, "all", kernels.Blocks(32, 24, 16))
