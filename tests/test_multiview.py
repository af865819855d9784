"""V > 2 views of each image (multi-crop) against the plain-loop reference, and its guarantees."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from seed_reference import seed_multiview_interventional_loss
from torch.utils._python_dispatch import TorchDispatchMode

from msr_loss import (
    InfoNCELoss,
    InterventionalLoss,
    MetaSemanticRegularizer,
    NTXentLoss,
    info_nce,
    interventional_loss,
    nt_xent,
)
from msr_loss.multiview import multiview_interventional
from msr_loss.rows import unit_rows

NEGATIVES = ("cross_view", "all")
TAU = 0.3


def draw_views(num_views: int, batch: int, dim: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, dim, generator=gen, dtype=torch.float64).requires_grad_()
        for _ in range(num_views)
    ]


def draw_strata(num_strata: int, dim: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(num_strata, dim, generator=gen, dtype=torch.float64).requires_grad_()


def icl(views, strata, **kwargs):
    return interventional_loss(
        views[0], views[1], strata, temperature=TAU, more_views=views[2:], **kwargs
    )


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("num_views", [3, 4])
@pytest.mark.parametrize("negatives", NEGATIVES)
def test_interventional_loss_matches_the_plain_loop(num_views, negatives):
    views, strata = draw_views(num_views, 5, 6), draw_strata(3, 6)
    extra = torch.randn(num_views * 5, 2, dtype=torch.float64, requires_grad=True)
    for extra_logits in (None, extra):
        inputs = [*views, strata] + ([] if extra_logits is None else [extra])
        got = icl(views, strata, negatives=negatives, reduction="none", **_extra(extra_logits))
        expected = seed_multiview_interventional_loss(views, strata, TAU, negatives, extra_logits)
        close(got, expected)
        weights = torch.linspace(0.5, 2.0, got.numel(), dtype=torch.float64)
        for a, b in zip(
            torch.autograd.grad((got * weights).sum(), inputs),
            torch.autograd.grad((expected * weights).sum(), inputs),
            strict=True,
        ):
            close(a, b)
    expected = seed_multiview_interventional_loss(views, strata, TAU, negatives)
    close(icl(views, strata, negatives=negatives), expected.mean())
    close(icl(views, strata, negatives=negatives, reduction="sum"), expected.sum())


def _extra(extra_logits):
    return {} if extra_logits is None else {"extra_negative_logits": extra_logits}


@pytest.mark.parametrize("negatives", NEGATIVES)
def test_info_nce_and_nt_xent_are_the_one_stratum_identity(negatives):
    views = draw_views(3, 4, 5)
    ones = torch.ones(1, 5, dtype=torch.float64)
    expected = seed_multiview_interventional_loss(views, ones, TAU, negatives)
    got = info_nce(
        views[0],
        views[1],
        temperature=TAU,
        negatives=negatives,
        reduction="none",
        more_views=views[2:],
    )
    close(got, expected)
    if negatives == "all":
        close(nt_xent(views[0], views[1], temperature=TAU, more_views=views[2:]), expected.mean())


@pytest.mark.parametrize("negatives", NEGATIVES)
def test_gradcheck_and_gradgradcheck(negatives):
    views, strata = draw_views(3, 3, 4), draw_strata(2, 4)

    def loss(*tensors):
        return icl(list(tensors[:-1]), tensors[-1], negatives=negatives, reduction="none")

    assert torch.autograd.gradcheck(loss, (*views, strata))
    assert torch.autograd.gradgradcheck(loss, (*views, strata))


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(2, 5),
    dim=st.integers(1, 5),
    num_views=st.integers(3, 5),
    num_strata=st.integers(1, 3),
    negatives=st.sampled_from(NEGATIVES),
    temperature=st.floats(0.1, 2.0),
    seed=st.integers(0, 2**16),
)
def test_any_shape_matches_the_plain_loop(
    batch, dim, num_views, num_strata, negatives, temperature, seed
):
    views, strata = draw_views(num_views, batch, dim, seed), draw_strata(num_strata, dim, seed)
    got = interventional_loss(
        views[0],
        views[1],
        strata,
        temperature=temperature,
        negatives=negatives,
        reduction="none",
        more_views=views[2:],
    )
    close(got, seed_multiview_interventional_loss(views, strata, temperature, negatives))


@pytest.mark.parametrize("negatives", NEGATIVES)
def test_two_views_are_todays_loss(negatives):
    views, strata = draw_views(2, 6, 5), draw_strata(4, 5)
    today = interventional_loss(*views, strata, temperature=TAU, negatives=negatives)
    assert torch.equal(icl(views, strata, negatives=negatives), today)
    for fn in (info_nce, InfoNCELoss(temperature=TAU, negatives=negatives)):
        kwargs = {"temperature": TAU, "negatives": negatives} if fn is info_nce else {}
        assert torch.equal(fn(*views, more_views=(), **kwargs), fn(*views, **kwargs))
    unit = [unit_rows(view, torch.float64) for view in views]
    composed = multiview_interventional(unit, strata, TAU, negatives, "torch", None, False, "fp32")
    close(
        composed,
        interventional_loss(*views, strata, temperature=TAU, negatives=negatives, reduction="none"),
    )


@pytest.mark.parametrize("negatives", NEGATIVES)
def test_invariant_to_view_order_image_order_and_row_scale(negatives):
    views, strata = draw_views(4, 5, 6), draw_strata(3, 6)
    per_anchor = icl(views, strata, negatives=negatives, reduction="none").view(4, 5)
    order = [2, 0, 3, 1]
    permuted = icl([views[v] for v in order], strata, negatives=negatives, reduction="none")
    close(permuted.view(4, 5), per_anchor[order])
    images = torch.tensor([3, 1, 4, 0, 2])
    shuffled = icl([v[images] for v in views], strata, negatives=negatives, reduction="none")
    close(shuffled.view(4, 5), per_anchor[:, images])
    scale = torch.rand(4, 5, 1, dtype=torch.float64) * 100 + 0.01
    scaled = icl([v * s for v, s in zip(views, scale, strict=True)], strata, negatives=negatives)
    close(scaled, per_anchor.mean())


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("negatives", NEGATIVES)
def test_no_tensor_of_all_views_against_all_views_is_formed(negatives):
    num_views, batch, dim = 4, 64, 8
    views = [torch.randn(batch, dim, requires_grad=True) for _ in range(num_views)]
    strata = torch.rand(16, dim, requires_grad=True)
    with LargestTensor() as record:
        loss = interventional_loss(
            views[0],
            views[1],
            strata,
            temperature=TAU,
            negatives=negatives,
            more_views=views[2:],
            backend="torch",
        )
        loss.backward()
    # Two views' stack against itself is (2N)^2 entries; all views against all views (VN)^2.
    assert record.largest <= (2 * batch) ** 2 < (num_views * batch) ** 2


def test_the_modules_and_the_regularizer_take_more_views():
    views, strata = draw_views(3, 4, 5), draw_strata(2, 5)
    loss = InterventionalLoss(temperature=TAU)
    close(loss(views[0], views[1], strata, more_views=views[2:]), icl(views, strata))
    expected = info_nce(views[0], views[1], temperature=TAU, negatives="all", more_views=views[2:])
    close(NTXentLoss(temperature=TAU)(views[0], views[1], more_views=views[2:]), expected)
    msr = MetaSemanticRegularizer(5, 2, temperature=TAU, weight=0.5).double()
    close(msr(views[0], views[1], more_views=views[2:]), 0.5 * icl(views, msr.strata))


def test_bad_more_views_are_named():
    z1, z2, z3 = torch.randn(4, 5), torch.randn(4, 5), torch.randn(3, 5)
    strata = torch.rand(2, 5)
    with pytest.raises(ValueError, match=r"more_views\[0\] must have the shape of z1"):
        interventional_loss(z1, z2, strata, temperature=TAU, more_views=[z3])
    with pytest.raises(TypeError, match="more_views must be a sequence"):
        info_nce(z1, z2, temperature=TAU, more_views=torch.randn(1, 4, 5))
    with pytest.raises(ValueError, match=r"more_views\[1\] must be finite|more_views\[1\]"):
        info_nce(z1, z2, temperature=TAU, more_views=[z1, z2 * float("nan")])
    with pytest.raises(ValueError, match=r"extra_negative_logits must have shape \(12, K\)"):
        interventional_loss(
            z1, z2, strata, temperature=TAU, more_views=[z2], extra_negative_logits=torch.ones(8, 2)
        )


@pytest.mark.parametrize("negatives", NEGATIVES)
def test_hostile_values_stay_finite_and_match_float64(negatives):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(6, 8, generator=gen)
    views = [base + 1e-3 * torch.randn(6, 8, generator=gen) for _ in range(4)]
    views[2] = views[2] * 1e30
    views[3] = views[3] * 1e-30
    strata = torch.rand(3, 8, generator=gen)
    results = []
    for dtype in (torch.float32, torch.float64):
        inputs = [x.to(dtype).requires_grad_() for x in (*views, strata)]
        loss = interventional_loss(
            inputs[0],
            inputs[1],
            inputs[4],
            temperature=0.01,
            negatives=negatives,
            more_views=inputs[2:4],
        )
        grads = torch.autograd.grad(loss, inputs)
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
        results.append([t.detach() for t in (loss, *grads)])
    for got, expected in zip(*results, strict=True):
        scale = expected.abs().max().item()
        torch.testing.assert_close(got.double(), expected, rtol=1e-3, atol=1e-3 * scale)


def test_precision_reaches_the_view_blocks():
    gen = torch.Generator().manual_seed(4)
    views = [torch.randn(16, 32, generator=gen) for _ in range(3)]
    strata = torch.rand(2, 32, generator=gen)
    losses = {
        precision: interventional_loss(
            views[0], views[1], strata, temperature=0.1, more_views=views[2:], precision=precision
        )
        for precision in ("fp32", "bf16")
    }
    assert not torch.equal(losses["fp32"], losses["bf16"])
    torch.testing.assert_close(losses["bf16"], losses["fp32"], rtol=2e-2, atol=2e-2)
