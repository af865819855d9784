import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from seed_reference import seed_interventional_loss

from msr_loss import info_nce, interventional_loss, nt_xent

NEGATIVE_SETS = ["cross_view", "all"]


def random_inputs(seed: int, batch: int, dim: int, num_strata: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(batch, dim, generator=gen, dtype=dtype)
    z2 = torch.randn(batch, dim, generator=gen, dtype=dtype)
    strata = torch.rand(num_strata, dim, generator=gen, dtype=dtype) * 0.98 + 0.01
    return z1, z2, strata


shapes = st.tuples(
    st.integers(0, 2**31 - 1),
    st.integers(2, 6),
    st.integers(1, 8),
    st.integers(1, 4),
    st.floats(0.05, 2.0),
    st.sampled_from(NEGATIVE_SETS),
)


@settings(max_examples=30, deadline=None)
@given(shapes)
def test_matches_the_seed_formula_forward_and_backward(case):
    seed, batch, dim, num_strata, temperature, negatives = case
    inputs = [x.requires_grad_() for x in random_inputs(seed, batch, dim, num_strata)]
    fast = interventional_loss(*inputs, temperature=temperature, negatives=negatives)
    fast_grads = torch.autograd.grad(fast, inputs)
    slow = seed_interventional_loss(*inputs, temperature, negatives)
    slow_grads = torch.autograd.grad(slow, inputs)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    for got, expected in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("negatives", NEGATIVE_SETS)
def test_gradcheck_including_the_strata(negatives):
    inputs = [x.requires_grad_() for x in random_inputs(0, 5, 4, 3)]

    def loss(z1, z2, strata):
        return interventional_loss(z1, z2, strata, temperature=0.3, negatives=negatives)

    assert torch.autograd.gradcheck(loss, inputs)
    assert torch.autograd.gradgradcheck(loss, inputs)


@settings(max_examples=20, deadline=None)
@given(shapes)
def test_one_unit_stratum_is_info_nce(case):
    seed, batch, dim, _, temperature, negatives = case
    z1, z2, _ = random_inputs(seed, batch, dim, 1)
    ones = torch.ones(1, dim, dtype=z1.dtype)
    torch.testing.assert_close(
        interventional_loss(z1, z2, ones, temperature=temperature, negatives=negatives),
        info_nce(z1, z2, temperature=temperature, negatives=negatives),
    )


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 16), st.integers(1, 32), st.floats(0.05, 1.0))
def test_all_negatives_with_unit_stratum_is_lightly_nt_xent(seed, batch, dim, temperature):
    from lightly.loss import NTXentLoss

    z1, z2, _ = random_inputs(seed, batch, dim, 1, dtype=torch.float32)
    expected = NTXentLoss(temperature=temperature)(z1, z2)
    ones = torch.ones(1, dim)
    got = interventional_loss(z1, z2, ones, temperature=temperature, negatives="all")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nt_xent(z1, z2, temperature=temperature), expected)


@pytest.mark.parametrize("negatives", NEGATIVE_SETS)
def test_identical_embeddings_give_the_closed_form(negatives):
    batch = 7
    z = torch.ones(batch, 5, dtype=torch.float64)
    num_negatives = batch - 1 if negatives == "cross_view" else 2 * batch - 2
    loss = interventional_loss(
        z, z, torch.ones(1, 5, dtype=torch.float64), temperature=0.1, negatives=negatives
    )
    assert loss.item() == pytest.approx(math.log(1 + num_negatives), rel=1e-12)


@settings(max_examples=20, deadline=None)
@given(shapes)
def test_invariances(case):
    seed, batch, dim, num_strata, temperature, negatives = case
    z1, z2, strata = random_inputs(seed, batch, dim, num_strata)

    def loss(a, b):
        return interventional_loss(a, b, strata, temperature=temperature, negatives=negatives)

    reference = loss(z1, z2)
    perm = torch.randperm(batch, generator=torch.Generator().manual_seed(seed))
    scale = torch.rand(batch, 1, dtype=z1.dtype, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(loss(z1[perm], z2[perm]), reference)
    torch.testing.assert_close(loss(z1 * (scale + 0.1), z2 * (3 * scale + 0.5)), reference)
    torch.testing.assert_close(loss(z2, z1), reference)


def test_reductions_agree():
    z1, z2, strata = random_inputs(1, 6, 5, 3)
    per_anchor = interventional_loss(z1, z2, strata, temperature=0.2, reduction="none")
    assert per_anchor.shape == (12,)
    torch.testing.assert_close(
        interventional_loss(z1, z2, strata, temperature=0.2, reduction="sum"), per_anchor.sum()
    )
    torch.testing.assert_close(
        interventional_loss(z1, z2, strata, temperature=0.2), per_anchor.mean()
    )


def test_extra_negative_logits_join_the_negatives():
    z1, z2, strata = random_inputs(2, 5, 4, 2)
    extra = torch.randn(10, 3, dtype=torch.float64)
    got = interventional_loss(
        z1, z2, strata, temperature=0.5, reduction="none", extra_negative_logits=extra
    )
    anchors = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    positives = torch.cat([anchors[5:], anchors[:5]])
    expected = []
    for r in range(10):
        negs = [
            torch.exp(anchors[r] @ anchors[c] / 0.5)
            for c in range(10)
            if c % 5 != r % 5 and c // 5 != r // 5
        ]
        neg = torch.stack(negs).sum() + torch.exp(extra[r]).sum()
        probs = []
        for a in strata:
            modulated = a * positives[r]
            pos = torch.exp(anchors[r] @ modulated / modulated.norm() / 0.5)
            probs.append(pos / (pos + neg))
        expected.append(-torch.log(torch.stack(probs).mean()))
    torch.testing.assert_close(got, torch.stack(expected))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computes_in_float32(dtype):
    z1, z2, strata = random_inputs(3, 16, 32, 4, dtype=torch.float32)
    z1h, z2h = z1.to(dtype).requires_grad_(), z2.to(dtype).requires_grad_()
    loss = interventional_loss(z1h, z2h, strata, temperature=0.1, precision="fp32")
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    expected = interventional_loss(z1h.float(), z2h.float(), strata, temperature=0.1)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        loss, interventional_loss(z1, z2, strata, temperature=0.1), rtol=2e-2, atol=2e-2
    )
    loss.backward()
    assert z1h.grad is not None and z1h.grad.dtype == dtype
    assert torch.isfinite(z1h.grad.float()).all()


def test_tiny_temperature_stays_finite():
    z1, z2, strata = random_inputs(4, 64, 16, 4, dtype=torch.float32)
    z1.requires_grad_()
    loss = interventional_loss(z1, z2, strata, temperature=0.01)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z1.grad).all()
