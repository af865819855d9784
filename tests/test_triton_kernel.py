"""The fused Triton kernels against float64, on a GPU or in the Triton interpreter.

The interpreter (TRITON_INTERPRET=1) must be switched on before triton is first imported, so on a
machine without CUDA the kernel tests run in one subprocess with the variable set, and the rest of
the suite keeps the compiled kernels. The interpreter costs milliseconds per tile step: sizes stay
small (M <= 1024) with large blocks. In the interpreter a bfloat16 ``tl.dot`` is wrong, so the
kernel rounds its operands to bfloat16 and multiplies them in float32 there (the products a GPU
forms), and TF32 runs as IEEE float32: the ``"tf32"`` cases check TF32's tolerance only on CUDA.

Tolerances are against float64 on the inputs rounded to the tested dtype, so they measure the
kernel alone: IEEE float32 (and TF32 in the interpreter) ``2e-5``; TF32 on CUDA ``2e-3``;
bfloat16 operands ``2^-8`` of the logit scale for the log-sum-exps and ``3e-2`` of the largest
gradient entry (each operand rounded to 8 bits).

The ``test_cuda_*`` tests run only on CUDA (``make gpu-check``): every dtype and precision up to
N = 65,536 against a float64 (blockwise) reference.
"""

from __future__ import annotations

import datetime
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from msr_loss import info_nce, interventional_loss
from msr_loss.similarity import negative_logsumexp, triton_installed
from msr_loss.similarity.blockwise import chunked_negative_logsumexp
from msr_loss.similarity.gathered import gathered_negative_logsumexp
from msr_loss.similarity.geometry import NegativeGeometry

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
RUNS_HERE = triton_installed() and (INTERPRETED or torch.cuda.is_available())
ON_CUDA = torch.cuda.is_available() and not INTERPRETED
DEVICE = "cuda" if ON_CUDA else "cpu"
NEGATIVE_SETS = ["cross_view", "all"]
# (input dtype, precision): every operand precision from every input dtype the losses pass.
PRECISION_CASES = [
    (torch.float32, "fp32"),
    (torch.float32, "tf32"),
    (torch.float32, "bf16"),
    (torch.float16, "fp32"),
    (torch.float16, "bf16"),
    (torch.bfloat16, "bf16"),
    (torch.bfloat16, "fp32"),
]
# (N, D, blocks): ragged rows, columns and D, several column tiles; D of one on-chip tile.
SHAPES = [(37, 40, (32, 32, 16)), (70, 24, (64, 64, 128))]


def tolerances(dtype: torch.dtype, precision: str, inv_t: float) -> tuple[float, float]:
    """(absolute error of the log-sum-exps, error of the gradient relative to its largest entry).

    bfloat16 operands from wider inputs round every similarity's factors to 8 bits; from bfloat16
    inputs only the backward's weights are rounded.
    """
    if precision == "bf16" and dtype != torch.bfloat16:
        return 2**-8 * inv_t, 3e-2
    if precision == "bf16":
        return 2e-5 * inv_t, 1e-2
    if precision == "tf32" and ON_CUDA:
        return 2e-3 * inv_t, 2e-2
    return 2e-5 * inv_t, 2e-5


def assert_close_to_float64(got, got_grad, expected, expected_grad, precision, inv_t):
    """The tolerances above, plus the rounding of the results to their own dtype."""
    lse_tol, grad_tol = tolerances(got.dtype, precision, inv_t)
    eps = 0.0 if got.dtype == torch.float32 else torch.finfo(got.dtype).eps
    lse_scale, grad_scale = expected.abs().max(), expected_grad.abs().max()
    assert got.dtype == got_grad.dtype
    assert torch.isfinite(got).all() and torch.isfinite(got_grad).all()
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=lse_tol + eps * lse_scale)
    torch.testing.assert_close(
        got_grad.double(), expected_grad, rtol=0, atol=(grad_tol + eps) * grad_scale
    )


@pytest.mark.skipif(RUNS_HERE or not triton_installed(), reason="the kernel tests run directly")
@pytest.mark.filterwarnings("ignore")
def test_kernel_tests_pass_in_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k"]
    command.append("not test_kernel_tests_pass_in_the_triton_interpreter")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert re.search(r"^\d+ passed, \d+ skipped, \d+ deselected in", done.stdout, re.MULTILINE), (
        done.stdout
    )


@pytest.fixture(scope="module")
def kernels():
    if not RUNS_HERE:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1; run by the subprocess test on CPU")
    import msr_loss.similarity.triton as module

    return module


def plain_dense(zhat: torch.Tensor, batch_size: int, inv_t: float, negatives: str):
    index = torch.arange(zhat.shape[0], device=zhat.device)
    keep = (index[:, None] % batch_size) != (index[None, :] % batch_size)
    if negatives == "cross_view":
        keep &= (index[:, None] // batch_size) != (index[None, :] // batch_size)
    logits = (zhat @ zhat.T) * inv_t
    return torch.logsumexp(logits.masked_fill(~keep, -math.inf), dim=1)


def unit_rows(seed: int, batch_size: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(2 * batch_size, dim, generator=gen), dim=1).to(DEVICE, dtype)


def near_duplicates(seed: int, batch_size: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Unit rows in groups of near-copies (cosine ~0.9999): the hardest negatives at small tau."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(2, batch_size // 8), dim, generator=gen)
    pick = torch.randint(0, centres.shape[0], (2 * batch_size,), generator=gen)
    rows = centres[pick] + 1e-2 * torch.randn(2 * batch_size, dim, generator=gen)
    return F.normalize(rows, dim=1).to(DEVICE, dtype)


def value_and_grad(fn, zhat: torch.Tensor, grad_out: torch.Tensor):
    leaf = zhat.detach().clone().requires_grad_()
    value = fn(leaf)
    (grad,) = torch.autograd.grad(value, leaf, grad_out.to(value.dtype))
    return value.detach(), grad


def kernel_fn(kernels, batch, inv_t, negatives, blocks, precision):
    chosen = None if blocks is None else kernels.Blocks(*blocks)
    return lambda z: kernels.triton_negative_logsumexp(
        z, batch, inv_t, negatives, chosen, precision=precision
    )


def check_against_float64(kernels, zhat, batch, inv_t, negatives, blocks, precision):
    grad_out = torch.randn(2 * batch, generator=torch.Generator().manual_seed(batch)).to(DEVICE)
    fn = kernel_fn(kernels, batch, inv_t, negatives, blocks, precision)
    got, got_grad = value_and_grad(fn, zhat, grad_out)
    expected, expected_grad = value_and_grad(
        lambda z: plain_dense(z, batch, inv_t, negatives), zhat.double(), grad_out.double()
    )
    assert got.dtype == zhat.dtype
    assert_close_to_float64(got, got_grad, expected, expected_grad, precision, inv_t)
    return got, got_grad


@pytest.mark.parametrize("negatives", NEGATIVE_SETS)
@pytest.mark.parametrize(("dtype", "precision"), PRECISION_CASES)
def test_every_precision_matches_float64(kernels, dtype, precision, negatives):
    zhat = unit_rows(3, 37, 40, dtype)
    check_against_float64(kernels, zhat, 37, 5.0, negatives, (32, 32, 16), precision)


@pytest.mark.parametrize("negatives", NEGATIVE_SETS)
@pytest.mark.parametrize("shape", SHAPES)
def test_ragged_shapes_match_float64(kernels, shape, negatives):
    batch, dim, blocks = shape
    zhat = unit_rows(batch + dim, batch, dim, torch.float32)
    check_against_float64(kernels, zhat, batch, 5.0, negatives, blocks, "fp32")


@pytest.mark.parametrize("negatives", NEGATIVE_SETS)
@pytest.mark.parametrize("dim", [1, 17, 256, 257, 520])
def test_every_width_from_1_to_520_matches_float64(kernels, dim, negatives):
    """D = 256 is the widest on-chip tile; 257 and 520 are sliced into 128-wide D chunks."""
    zhat = unit_rows(dim, 20, dim, torch.float32)
    check_against_float64(kernels, zhat, 20, 5.0, negatives, (16, 32, 128), "fp32")


@pytest.mark.parametrize("negatives", NEGATIVE_SETS)
@pytest.mark.parametrize(
    ("dtype", "precision"), [(torch.float32, "fp32"), (torch.bfloat16, "bf16")]
)
@pytest.mark.parametrize("temperature", [0.01, 0.005])
def test_near_duplicate_negatives_at_small_temperature(
    kernels, temperature, dtype, precision, negatives
):
    zhat = near_duplicates(11, 150, 16, dtype)
    check_against_float64(kernels, zhat, 150, 1 / temperature, negatives, (64, 64, 16), precision)


@pytest.mark.parametrize("negatives", NEGATIVE_SETS)
def test_temperature_0_01_over_1000_columns_stays_finite_and_exact(kernels, negatives):
    zhat = unit_rows(516, 500, 16, torch.float32)
    check_against_float64(kernels, zhat, 500, 100.0, negatives, (128, 128, 16), "fp32")


@pytest.mark.parametrize("negatives", NEGATIVE_SETS)
@pytest.mark.parametrize("splits", [2, 5])
def test_the_column_split_grid_matches_float64(kernels, splits, negatives):
    """Five splits of three column tiles leave some splits empty: their partials must vanish."""
    zhat = unit_rows(7, 45, 20, torch.float32)
    check_against_float64(kernels, zhat, 45, 5.0, negatives, (32, 32, 16, splits), "fp32")


def test_a_split_whose_first_tile_is_fully_masked_for_a_row_stays_finite(kernels):
    """Image 16 of 17: the second split's only column is its own view's (-inf - -inf guard)."""
    zhat = unit_rows(8, 17, 8, torch.float32)
    check_against_float64(kernels, zhat, 17, 5.0, "cross_view", (16, 16, 16, 2), "fp32")


@pytest.mark.parametrize("negatives", NEGATIVE_SETS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_forward_and_backward_are_bitwise_repeatable(kernels, precision, negatives):
    zhat = unit_rows(0, 45, 20, torch.float32)
    grad_out = torch.randn(90, device=DEVICE)
    fn = kernel_fn(kernels, 45, 5.0, negatives, (32, 32, 16, 3), precision)
    first, second = (value_and_grad(fn, zhat, grad_out) for _ in range(2))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("one_exp", [False, True])
@pytest.mark.parametrize("negatives", NEGATIVE_SETS)
@pytest.mark.parametrize("first_image", [0, 5, 16])
def test_one_ranks_rows_against_the_global_columns(kernels, first_image, negatives, one_exp):
    """The rank's row offset in the exclusion rule, without a process group: 8 of 24 images.

    Logits within +-5 are bounded, so both backward forms apply: one ``exp2`` per entry and two.
    """
    columns = unit_rows(first_image, 24, 12, torch.float32)
    rows = torch.cat([columns[first_image : first_image + 8], columns[24 + first_image :][:8]])
    geometry = NegativeGeometry(8, 24, first_image, negatives)
    launch = kernels._Launch(geometry, 5.0, "fp32", kernels.Blocks(16, 16, 16))
    full = plain_dense(columns.double(), 24, 5.0, negatives)
    expected = torch.cat([full[first_image : first_image + 8], full[24 + first_image :][:8]])
    got = kernels.lse_forward(rows, columns, launch)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-4)
    grad_full = torch.randn(48, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    leaf = columns.double().requires_grad_()
    (expected_grad,) = torch.autograd.grad(plain_dense(leaf, 24, 5.0, negatives), leaf, grad_full)
    got_grad = kernels.lse_backward(rows, columns, full.float(), grad_full.float(), launch, one_exp)
    local = torch.cat(
        [expected_grad[first_image : first_image + 8], expected_grad[24 + first_image :][:8]]
    )
    torch.testing.assert_close(got_grad.double(), local, rtol=0, atol=1e-5)


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
    with pytest.raises(ValueError, match=r"Blocks.splits must be a positive number"):
        kernels.triton_negative_logsumexp(zhat, 4, 2.0, "all", kernels.Blocks(32, 32, 16, 0))


def test_an_unknown_precision_is_a_clear_error(kernels):
    with pytest.raises(ValueError, match=r"precision must be one of .*'fp64'"):
        kernels.triton_negative_logsumexp(
            unit_rows(0, 4, 8, torch.float32), 4, 2.0, "all", precision="fp64"
        )


def test_tiny_incoming_gradients_keep_their_digits_in_bfloat16(kernels):
    """Weights of 2^-116 x softmax would be subnormal in bfloat16 if cast unscaled."""
    zhat = unit_rows(4, 20, 16, torch.float32)
    fn = kernel_fn(kernels, 20, 5.0, "all", (32, 32, 16), "bf16")
    _, tiny = value_and_grad(fn, zhat, torch.full((40,), 2.0**-116, device=DEVICE))
    _, unit = value_and_grad(fn, zhat, torch.ones(40, device=DEVICE))
    assert torch.equal(tiny * 2.0**116, unit)


# Two gloo ranks running the kernel under DDP (in the interpreter on CPU).
WORLD, LOCAL, DIM = 2, 9, 24


def ddp_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    batch = WORLD * LOCAL
    return {
        "zhat": F.normalize(torch.randn(2 * batch, DIM, generator=gen), dim=1),
        "grad": torch.randn(2 * batch, generator=gen),
        "z1": torch.randn(batch, DIM, generator=gen),
        "z2": torch.randn(batch, DIM, generator=gen),
    }


def anchors_of(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    batch = WORLD * LOCAL
    return torch.cat(
        [t[rank * LOCAL : (rank + 1) * LOCAL] for t in (tensor[:batch], tensor[batch:])]
    )


def ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=300),
    )
    try:
        data = ddp_inputs()
        results: dict[str, Any] = {}
        for negatives in NEGATIVE_SETS:
            runs = []
            for _ in range(2):
                leaf = anchors_of(data["zhat"], rank).clone().requires_grad_()
                lse = gathered_negative_logsumexp(leaf, LOCAL, 0.2, negatives, backend="triton")
                (grad,) = torch.autograd.grad(lse, leaf, anchors_of(data["grad"], rank))
                runs.append((lse.detach(), grad))
            results[negatives] = runs
        second = []
        for backend in ("torch", "triton"):
            leaf = anchors_of(data["zhat"], rank).clone().requires_grad_()
            lse = gathered_negative_logsumexp(leaf, LOCAL, 0.3, "all", backend=backend)
            (grad,) = torch.autograd.grad(
                lse, leaf, anchors_of(data["grad"], rank), create_graph=True
            )
            second.append(torch.autograd.grad(grad.pow(2).sum(), leaf)[0])
        results["second"] = second
        views = [
            t[rank * LOCAL : (rank + 1) * LOCAL].clone().requires_grad_()
            for t in (data["z1"], data["z2"])
        ]
        loss = info_nce(*views, temperature=0.1, backend="triton", gather_distributed=True)
        results["info_nce"] = (loss.detach(), *torch.autograd.grad(loss, views))
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_ranks(kernels, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    if ON_CUDA:
        pytest.skip("the gloo ranks run the kernel on CPU tensors, in the interpreter")
    tmp = tmp_path_factory.mktemp("gloo_triton")
    mp.spawn(ddp_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("negatives", NEGATIVE_SETS)
def test_ddp_kernel_matches_the_single_process_float64_result(ddp_ranks, negatives):
    data = ddp_inputs()
    leaf = data["zhat"].double().requires_grad_()
    full = plain_dense(leaf, WORLD * LOCAL, 5.0, negatives)
    (full_grad,) = torch.autograd.grad(full, leaf, data["grad"].double())
    for rank, result in enumerate(ddp_ranks):
        (lse, grad), (lse_again, grad_again) = result[negatives]
        assert torch.equal(lse, lse_again) and torch.equal(grad, grad_again)
        torch.testing.assert_close(lse.double(), anchors_of(full.detach(), rank), rtol=0, atol=1e-4)
        expected = anchors_of(full_grad, rank)
        torch.testing.assert_close(
            grad.double(), expected, rtol=0, atol=2e-5 * expected.abs().max()
        )


def test_ddp_kernel_second_derivative_equals_the_pytorch_path(ddp_ranks):
    for result in ddp_ranks:
        torch.testing.assert_close(result["second"][1], result["second"][0], rtol=1e-5, atol=1e-6)


def test_ddp_public_loss_matches_the_single_process_loss(ddp_ranks):
    data = ddp_inputs()
    views = [data[k].clone().requires_grad_() for k in ("z1", "z2")]
    loss = info_nce(*views, temperature=0.1, backend="torch")
    grads = torch.autograd.grad(loss * WORLD, views)
    torch.testing.assert_close(sum(r["info_nce"][0] for r in ddp_ranks) / WORLD, loss.detach())
    for rank, result in enumerate(ddp_ranks):
        for got, expected in zip(result["info_nce"][1:], grads, strict=True):
            local = expected[rank * LOCAL : (rank + 1) * LOCAL]
            torch.testing.assert_close(got, local, rtol=1e-5, atol=1e-6)


# On CUDA only (make gpu-check): every dtype and precision, up to N = 65,536.
def cuda_only(test):
    return pytest.mark.cuda(pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")(test))


CUDA_CASES = [
    *[
        (4096, 128, dtype, precision, negatives)
        for dtype, precision in PRECISION_CASES
        for negatives in NEGATIVE_SETS
    ],
    (65536, 128, torch.float32, "fp32", "all"),
    (65536, 128, torch.float32, "tf32", "all"),
    (65536, 128, torch.float32, "bf16", "all"),
    (65536, 128, torch.bfloat16, "bf16", "cross_view"),
    (2048, 256, torch.bfloat16, "bf16", "all"),
    (3000, 520, torch.float32, "fp32", "cross_view"),
    (3000, 520, torch.float32, "bf16", "all"),
]


def float64_reference(zhat, batch, inv_t, negatives, grad_out):
    leaf = zhat.double().requires_grad_()
    chunk = max(1, (1 << 26) // (2 * batch))
    lse = chunked_negative_logsumexp(leaf, batch, inv_t, negatives, chunk)
    (grad,) = torch.autograd.grad(lse, leaf, grad_out.double())
    return lse.detach(), grad


def check_on_cuda(kernels, zhat, batch, inv_t, precision, negatives):
    grad_out = torch.randn(2 * batch, device=DEVICE) / (2 * batch)
    fn = kernel_fn(kernels, batch, inv_t, negatives, None, precision)
    got, got_grad = value_and_grad(fn, zhat, grad_out)
    expected, expected_grad = float64_reference(zhat, batch, inv_t, negatives, grad_out)
    assert_close_to_float64(got, got_grad, expected, expected_grad, precision, inv_t)
    again = value_and_grad(fn, zhat, grad_out)
    assert torch.equal(again[0], got) and torch.equal(again[1], got_grad)


@cuda_only
@pytest.mark.parametrize(("batch", "dim", "dtype", "precision", "negatives"), CUDA_CASES)
def test_cuda_every_dtype_and_precision_matches_float64(
    kernels, batch, dim, dtype, precision, negatives
):
    zhat = unit_rows(batch, batch, dim, dtype)
    check_on_cuda(kernels, zhat, batch, 10.0, precision, negatives)


@cuda_only
@pytest.mark.parametrize("temperature", [0.01, 0.005])
@pytest.mark.parametrize(
    ("dtype", "precision"), [(torch.float32, "fp32"), (torch.bfloat16, "bf16")]
)
def test_cuda_near_duplicates_at_small_temperature(kernels, temperature, dtype, precision):
    zhat = near_duplicates(3, 8192, 128, dtype)
    check_on_cuda(kernels, zhat, 8192, 1 / temperature, precision, "all")


def test_autotuning_keeps_only_configurations_that_fit_shared_memory(kernels):
    import triton

    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in kernels._TUNED_SHAPES
    ]
    wide = {"rows_ptr": torch.zeros(1, dtype=torch.float32)}
    narrow = {"rows_ptr": torch.zeros(1, dtype=torch.bfloat16)}
    assert len(kernels._fitting(configs, narrow, BLOCK_D=128)) == len(configs)
    fitting = kernels._fitting(configs, wide, BLOCK_D=256)
    assert 0 < len(fitting) < len(configs)
    assert all(
        (c.kwargs["BLOCK_M"] + c.num_stages * c.kwargs["BLOCK_N"]) * 256 * 4 <= 160 * 1024
        for c in fitting
    )


@cuda_only
def test_cuda_a_kernel_that_fails_to_compile_falls_back_with_a_warning(kernels, monkeypatch):
    from msr_loss.similarity import fallback, uses_triton

    def broken(*args: object) -> None:
        raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(fallback, "_FAILURES", [])
    monkeypatch.setattr(kernels, "lse_forward", broken)
    zhat = unit_rows(0, 64, 32, torch.float32)
    with pytest.warns(RuntimeWarning, match="PTX assembly failed"):
        got = negative_logsumexp(zhat, 64, 0.2, "all", backend="auto", precision="fp32")
    expected = negative_logsumexp(zhat, 64, 0.2, "all", backend="torch", precision="fp32")
    torch.testing.assert_close(got, expected)
    assert not uses_triton(zhat, "auto")


@cuda_only
def test_cuda_a_backward_that_fails_falls_back_with_a_warning(kernels, monkeypatch):
    from msr_loss.similarity import fallback

    def broken(*args: object) -> None:
        raise RuntimeError("out of shared memory")

    monkeypatch.setattr(fallback, "_FAILURES", [])
    monkeypatch.setattr(kernels, "lse_backward", broken)
    zhat = unit_rows(1, 64, 32, torch.float32)
    grad_out = torch.randn(128, device=DEVICE)
    with pytest.warns(RuntimeWarning, match="out of shared memory"):
        _, got = value_and_grad(kernel_fn(kernels, 64, 5.0, "all", None, "fp32"), zhat, grad_out)
    _, expected = value_and_grad(
        lambda z: chunked_negative_logsumexp(z, 64, 5.0, "all"), zhat, grad_out
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
