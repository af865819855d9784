"""The similarity GEMMs' precision switch: its resolution and its error bounds against float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from msr_loss import MetaSemanticRegularizer, info_nce, interventional_loss, nt_xent
from msr_loss.similarity import negative_logsumexp
from msr_loss.similarity.blockwise import chunked_negative_logsumexp, logits_are_bounded
from msr_loss.similarity.precision import gemm_operand, resolve_precision
from msr_loss.types import PRECISIONS

# Relative error (norm) against float64 of the log-sum-exps and of their gradient, N = 256,
# D = 128, at tau 0.2, 0.05 and 0.01, random and near-duplicate rows. Measured maxima (N = 256
# and 1024): fp32 1.8e-7 / 7.2e-6, bf16 7.1e-4 / 8.0e-3. The README states these bounds.
LSE_BOUND = {"fp32": 1e-6, "tf32": 1e-6, "bf16": 3e-3}
GRAD_BOUND = {"fp32": 3e-5, "tf32": 3e-5, "bf16": 3e-2}
TEMPERATURES = (0.2, 0.05, 0.01)


def dense_lse(zhat: torch.Tensor, num_images: int, inv_t: float, negatives: str) -> torch.Tensor:
    index = torch.arange(zhat.shape[0])
    keep = (index[:, None] % num_images) != (index[None, :] % num_images)
    if negatives == "cross_view":
        keep &= (index[:, None] // num_images) != (index[None, :] // num_images)
    return torch.logsumexp(((zhat @ zhat.T) * inv_t).masked_fill(~keep, -math.inf), dim=1)


def stacked_views(kind: str, num_images: int, dim: int, seed: int) -> torch.Tensor:
    """Unit rows in float64: independent, or near-duplicates (pairs of images and their views)."""
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(num_images, dim, generator=gen, dtype=torch.float64)
    if kind == "random":
        z2 = torch.randn(num_images, dim, generator=gen, dtype=torch.float64)
    else:
        half = num_images // 2
        noise = torch.randn(num_images - half, dim, generator=gen, dtype=torch.float64)
        z1[half:] = z1[: num_images - half] + 1e-3 * noise
        z2 = z1 + 1e-3 * torch.randn(num_images, dim, generator=gen, dtype=torch.float64)
    return F.normalize(torch.cat([z1, z2]), dim=1)


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.detach()
    return float((actual.detach().double() - expected).norm() / expected.norm())


@pytest.mark.parametrize("kind", ["random", "near_duplicates"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("negatives", ["cross_view", "all"])
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_lse_and_gradient_are_within_the_stated_bounds_of_float64(
    kind, temperature, negatives, precision
):
    num_images = 256
    zhat = stacked_views(kind, num_images, 128, seed=int(100 * temperature))
    grad_out = torch.randn(2 * num_images, dtype=torch.float64)
    leaf = zhat.clone().requires_grad_()
    expected = dense_lse(leaf, num_images, 1 / temperature, negatives)
    (expected_grad,) = torch.autograd.grad(expected, leaf, grad_out)
    work = zhat.float().requires_grad_()
    value = chunked_negative_logsumexp(
        work, num_images, 1 / temperature, negatives, precision=precision
    )
    (grad,) = torch.autograd.grad(value, work, grad_out.float())
    assert value.dtype == torch.float32
    assert relative(value, expected) < LSE_BOUND[precision]
    assert relative(grad, expected_grad) < GRAD_BOUND[precision]


@pytest.mark.parametrize("temperature", [0.2, 0.01])
def test_one_exp_and_two_exp_backwards_both_run_and_agree_with_float64(temperature):
    zhat = stacked_views("near_duplicates", 64, 32, seed=3)
    assert logits_are_bounded(zhat, 1 / temperature) == (temperature == 0.2)
    grad_out = torch.rand(128, dtype=torch.float64) * 1e-30  # tiny upstream gradients stay exact
    leaf = zhat.clone().requires_grad_()
    (expected,) = torch.autograd.grad(dense_lse(leaf, 64, 1 / temperature, "all"), leaf, grad_out)
    work = zhat.float().requires_grad_()
    lse = chunked_negative_logsumexp(work, 64, 1 / temperature, "all", 7)
    (grad,) = torch.autograd.grad(lse, work, grad_out.float())
    assert relative(grad, expected) < GRAD_BOUND["fp32"]


def test_bf16_rounds_only_the_operands():
    zhat = stacked_views("random", 32, 16, seed=4).float()
    rounded = zhat.bfloat16().float()
    torch.testing.assert_close(
        chunked_negative_logsumexp(zhat, 32, 5.0, "all", precision="bf16"),
        chunked_negative_logsumexp(rounded, 32, 5.0, "all", precision="fp32"),
        rtol=0,
        atol=0,
    )
    assert torch.equal(gemm_operand(zhat, "fp32"), zhat)


def test_bf16_changes_the_result_so_the_bounds_test_can_fail():
    zhat = stacked_views("random", 32, 16, seed=5).float()
    full = chunked_negative_logsumexp(zhat, 32, 100.0, "all", precision="fp32")
    rounded = chunked_negative_logsumexp(zhat, 32, 100.0, "all", precision="bf16")
    assert not torch.equal(full, rounded)


@pytest.mark.parametrize(
    ("matmul", "expected"), [("highest", "fp32"), ("high", "tf32"), ("medium", "tf32")]
)
def test_auto_follows_the_float32_matmul_precision(matmul, expected):
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(matmul)
        assert resolve_precision("auto", torch.float32) == expected
        assert resolve_precision("auto", torch.float32, under_autocast=True) == "bf16"
    finally:
        torch.set_float32_matmul_precision(saved)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_auto_is_bf16_for_half_inputs_and_explicit_choices_win(dtype):
    assert resolve_precision("auto", dtype) == "bf16"
    for precision in ("fp32", "tf32", "bf16"):
        assert resolve_precision(precision, dtype, under_autocast=True) == precision


def test_a_misspelt_precision_names_the_argument():
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("bfloat16", torch.float32)
    with pytest.raises(ValueError, match="precision"):
        negative_logsumexp(torch.zeros(4, 2), 2, 0.5, "all", precision="fp16")  # type: ignore[arg-type]
    assert set(PRECISIONS) == {"auto", "fp32", "tf32", "bf16"}


def test_negative_logsumexp_resolves_auto_from_the_input_dtype():
    zhat = stacked_views("random", 16, 8, seed=6)
    half = negative_logsumexp(zhat.bfloat16(), 16, 0.05, "all", backend="torch")
    expected = chunked_negative_logsumexp(zhat.bfloat16().float(), 16, 20.0, "all")
    torch.testing.assert_close(half.float(), expected.bfloat16().float())
    single = negative_logsumexp(zhat.float(), 16, 0.05, "all", backend="torch")
    torch.testing.assert_close(single, chunked_negative_logsumexp(zhat.float(), 16, 20.0, "all"))


# The same at the loss: interventional_loss (n = 16 strata, negatives "all", inputs of norm 3)
# against its float64 evaluation. Measured maxima (N = 256 and 1024): fp32 2.5e-7 / 1.5e-5,
# bf16 2.6e-4 / 3.2e-2 (near-duplicate rows at tau 0.01: logits of 100 carry bfloat16's 2^-9
# relative rounding).
LOSS_BOUND = {"fp32": 1e-6, "bf16": 5e-4}
LOSS_GRAD_BOUND = {"fp32": 1e-4, "bf16": 6e-2}


@pytest.mark.parametrize("kind", ["random", "near_duplicates"])
@pytest.mark.parametrize("temperature", [0.2, 0.01])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_loss_and_its_gradient_are_within_the_stated_bounds(kind, temperature, precision):
    num_images = 256
    views = 3 * stacked_views(kind, num_images, 128, seed=7)
    strata = torch.rand(16, 128, dtype=torch.float64)

    def loss_and_grad(z, dtype, chosen):
        z1, z2 = (part.to(dtype).requires_grad_() for part in (z[:num_images], z[num_images:]))
        value = interventional_loss(
            z1, z2, strata.to(dtype), temperature=temperature, negatives="all", precision=chosen
        )
        return value, torch.cat(torch.autograd.grad(value, [z1, z2]))

    expected, expected_grad = loss_and_grad(views, torch.float64, "fp32")
    value, grad = loss_and_grad(views, torch.float32, precision)
    assert relative(value, expected) < LOSS_BOUND[precision]
    assert relative(grad, expected_grad) < LOSS_GRAD_BOUND[precision]


def _every_loss(precision: str):
    torch.manual_seed(8)
    strata = torch.rand(4, 16)
    msr = MetaSemanticRegularizer(16, 4, temperature=0.01, precision=precision)  # type: ignore[arg-type]
    return {
        "interventional": lambda a, b: interventional_loss(
            a, b, strata, temperature=0.01, precision=precision
        ),
        "info_nce": lambda a, b: info_nce(a, b, temperature=0.01, precision=precision),
        "nt_xent": lambda a, b: nt_xent(a, b, temperature=0.01, precision=precision),
        "regularizer": msr,
    }


@pytest.mark.parametrize("name", ["interventional", "info_nce", "nt_xent", "regularizer"])
def test_every_loss_passes_precision_on_and_autocast_means_bf16(name):
    torch.manual_seed(9)
    z1, z2 = torch.randn(16, 16), torch.randn(16, 16)
    fp32, bf16, auto = (_every_loss(p)[name] for p in ("fp32", "bf16", "auto"))
    exact, rounded = fp32(z1, z2), bf16(z1, z2)
    assert not torch.equal(exact, rounded)
    assert torch.equal(auto(z1, z2), exact)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(auto(z1, z2), rounded)
        assert torch.equal(fp32(z1, z2), exact)
    assert torch.equal(auto(z1.bfloat16(), z2.bfloat16()), bf16(z1.bfloat16(), z2.bfloat16()))


def test_a_misspelt_precision_on_a_loss_or_the_regularizer_names_the_argument():
    z = torch.randn(4, 8)
    with pytest.raises(ValueError, match="precision must be one of"):
        info_nce(z, z, temperature=0.1, precision="half")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precision must be one of"):
        MetaSemanticRegularizer(8, 2, temperature=0.1, precision="fp16")  # type: ignore[arg-type]


def test_the_solo_learn_flag_blocks_carry_precision_to_their_losses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from msr_loss.adapters.metamask_term import MetaMaskFlags, MetaMaskTerm
    from msr_loss.adapters.msr_term import ICLMSRTerm, MSRFlags
    from msr_loss.adapters.nsneg_term import NonSemanticNegativesTerm, NSNegFlags

    msr = ICLMSRTerm(MSRFlags.from_block({"num_strata": 2, "precision": "bf16"}), 8)
    assert msr.regularizer.precision == "bf16"
    metamask = MetaMaskTerm(MetaMaskFlags.from_block({"precision": "tf32"}), 8)
    seen: dict[str, object] = {}

    def recording_nt_xent(*args: object, **kwargs: object) -> torch.Tensor:
        seen.update(kwargs)
        return torch.zeros(())

    monkeypatch.setattr("msr_loss.adapters.metamask_term.nt_xent", recording_nt_xent)
    metamask._contrastive([torch.randn(4, 8), torch.randn(4, 8)])
    assert seen["precision"] == "tf32"
    nsneg = NonSemanticNegativesTerm(NSNegFlags.from_block({"precision": "fp32"}))
    assert nsneg.criterion.precision == "fp32"
    with pytest.raises(ValueError, match=r"msr\.precision must be one of"):
        MSRFlags.from_block({"precision": "fp16"})
